#!/usr/bin/env bash
# The job on one rented GPU host where you can run Docker (Lambda, a vast.ai VM, any cloud VM with the
# NVIDIA Container Toolkit). On RunPod / vast.ai templates, give the same image and variables instead.
#
#   export BUCKET=s3://my-bucket/zh-pretrain AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   export AWS_ENDPOINT_URL=https://<account>.r2.cloudflarestorage.com   # R2, MinIO, ...; not for AWS S3
#   RUN_ID=my-run CONFIG=configs/my.yaml infra/docker-run.sh [--train.max_steps=5000 ...]
#
# CONFIG: a config file on this host (mounted read-only) or a path inside the image (default
# /app/configs/demo.yaml). IMAGE: default zh-pretrain:latest. Arguments go to `run` as overrides.
# Exit 75 = stopped by SIGTERM (docker stop, host shutdown) after a checkpoint: run it again to resume.
# Several hosts: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) and run this on each of them.
set -euo pipefail

: "${BUCKET:?set BUCKET=s3://bucket/prefix: where checkpoints and the model go}"
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (S3 credentials are read from the environment)}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY (S3 credentials are read from the environment)}"
IMAGE="${IMAGE:-zh-pretrain:latest}"
CONFIG="${CONFIG:-/app/configs/demo.yaml}"

extra=()
if [ -f "$CONFIG" ]; then  # a file on this host: mount it
  name="$(basename "$CONFIG")"
  extra+=(-v "$(cd "$(dirname "$CONFIG")" && pwd)/$name:/config/$name:ro")
  CONFIG="/config/$name"
fi
if [ "${NNODES:-1}" -gt 1 ]; then  # NCCL and the rendezvous between hosts use the host's addresses
  extra+=(--network host)
fi
export CONFIG

# `-e NAME` copies NAME from this shell when it is set, so no value is written on the command line.
# --stop-timeout: longer than train.grace_seconds (25 s) so the job can checkpoint after `docker stop`.
exec docker run --rm --name "zh-pretrain-${RUN_ID:-run}" --gpus all --ipc=host \
  --ulimit memlock=-1 --ulimit stack=67108864 --stop-timeout 60 \
  -v zh-pretrain-scratch:/scratch ${extra[@]+"${extra[@]}"} \
  -e CONFIG -e RUN_ID -e BUCKET -e AWS_ENDPOINT_URL -e AWS_REGION \
  -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
  -e NNODES -e NODE_RANK -e MASTER_ADDR -e MASTER_PORT -e NPROC \
  "$IMAGE" run "$@"
