"""storage.local_dir is scratch space that belongs to one job's bucket.

Two jobs with the same run.id on two buckets that share storage.local_dir would stage checkpoints
and append metrics in the same local_dir/runs/<id>/ folder (each bucket then got the other job's
losses). A bucket inside the scratch folder, or the scratch folder inside the bucket, lets one
delete what the other holds (export removed its own staged folder when they were the same). Both
are refused before anything is written (ConfigError, exit 2), naming the keys to change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.config import ConfigError, StorageConfig
from trainer.io.storage import is_s3

OWNER_FILE = "bucket.json"  # local_dir/runs/<id>/bucket.json: the bucket whose run this scratch holds


def check_scratch_apart(s: StorageConfig) -> None:
    """ConfigError when a local storage.bucket and storage.local_dir are the same folder or one holds the other."""
    if is_s3(s.bucket):
        return
    bucket, scratch = Path(s.bucket).expanduser().resolve(), Path(s.local_dir).expanduser().resolve()
    if bucket == scratch or bucket.is_relative_to(scratch) or scratch.is_relative_to(bucket):
        where = ("the same folder" if bucket == scratch else
                 "inside storage.local_dir" if bucket.is_relative_to(scratch) else "holding storage.local_dir")
        raise ConfigError(f"storage.bucket ({s.bucket}) is {where} ({s.local_dir}): the job's scratch space and its "
                          f"bucket must be apart (the job deletes staged files it would then delete from the bucket); "
                          f"set storage.local_dir to a folder outside the bucket")


def claim_scratch(s: StorageConfig, run_id: str) -> None:
    """Mark local_dir/runs/<run_id>/ as the scratch of this bucket's run; ConfigError when it holds the
    same run.id of another bucket (its metrics and staged checkpoints would mix with this job's)."""
    check_scratch_apart(s)
    folder = Path(s.local_dir) / "runs" / run_id
    marker = folder / OWNER_FILE
    bucket = s.bucket.rstrip("/") if is_s3(s.bucket) else str(Path(s.bucket).expanduser().resolve())
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("bucket")
        except (ValueError, AttributeError):
            owner = None
        if owner and owner != bucket:
            raise ConfigError(f"storage.local_dir {s.local_dir} holds run '{run_id}' of another bucket ({owner}); "
                              f"jobs on different buckets need their own storage.local_dir (or another run.id; "
                              f"or delete {folder} if that job is gone)")
        if owner == bucket:
            return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{OWNER_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"bucket": bucket}), encoding="utf-8")
    os.replace(tmp, marker)
