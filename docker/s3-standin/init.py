"""minio-init's job on the S3 stand-in: buckets `corpus` and `runs`, the sample corpus at
s3://corpus/poetry/ (what docker-compose.yml's mc script does), with boto3 (moto's dependency)."""

import glob
import os
import sys

import boto3

s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")
for bucket in ("corpus", "runs"):
    s3.create_bucket(Bucket=bucket)
files = sorted(glob.glob("/sample/*.jsonl.zst"))
if not files:
    sys.exit("no /sample/*.jsonl.zst: the compose file mounts ./data/sample there")
for path in files:
    s3.upload_file(path, "corpus", "poetry/" + os.path.basename(path))
print("\n".join(o["Key"] for o in s3.list_objects_v2(Bucket="corpus")["Contents"]))
