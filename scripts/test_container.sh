#!/usr/bin/env bash
# make test-container: the CPU image built and run for real (docs/image.md).
#   1. make image-cpu (docker/build_cpu.sh: git archive HEAD, Docker and the base made when missing)
#   2. the job in the container (--network host, uid 1000, bucket on a mounted host folder owned by
#      uid 1000): an uninterrupted run; a second run stopped with `docker stop` after its first
#      published checkpoint (exit 75, LATEST and a manifest in the bucket), then run again: it resumes
#      and its final model.safetensors has the same sha256 as the uninterrupted run's
#   3. the same job against a loopback S3 server (moto's, from the venv, on 127.0.0.1)
#   4. docker-compose.yml under docker-compose.test.yml (skip with SKIP_COMPOSE=1)
# configs/tiny.yaml with more steps, so a run takes tens of seconds on 2 cores. Every container, the
# compose project and the temporary folders are removed on exit; the image stays (it is make image-cpu's
# product and the next build's cache; KEEP_IMAGE=0 removes it too).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_CPU=${IMAGE_CPU:-zh-pretrain:cpu}
PYTHON=${PYTHON:-.venv/bin/python}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}  # seconds for one container run
KEEP_IMAGE=${KEEP_IMAGE:-1}
LABEL=zh-pretrain-test-container=$$
# 1500 steps of the 2-layer model: checkpoints every 250, so a stop lands between two of them.
JOB=(run --config /app/configs/tiny.yaml --train.max_steps=1500 --train.checkpoint_every_steps=250
     --train.eval_every_steps=500 --train.log_every_steps=50)

say() { echo "[test-container $(date -u +%H:%M:%S)] $*"; }
fail() { echo "[test-container] FAIL: $*" >&2; exit 1; }

work=$(mktemp -d /tmp/zh-pretrain-test-container.XXXXXX)
moto_pid=""
cleanup() {
    local ids
    ids=$(docker ps -aq --filter "label=$LABEL" 2>/dev/null || true)
    [ -n "$ids" ] && docker rm -f $ids > /dev/null 2>&1
    [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null
    [ -f "$work/compose.env" ] && compose down -v --remove-orphans > /dev/null 2>&1
    [ "$KEEP_IMAGE" = 0 ] && docker rmi "$IMAGE_CPU" zh-pretrain-s3-standin:test > /dev/null 2>&1
    rm -rf "$work"
    return 0
}
trap cleanup EXIT

bucket_dir() {  # a fresh host folder the image's uid 1000 can write (Docker would make a root-owned one)
    mkdir -p "$work/$1" && chown 1000:1000 "$work/$1" && echo "$work/$1"
}

docker_run() {  # docker_run NAME BUCKET_DIR [docker args...] -- runs the job to its end, prints the exit code
    local name=$1 dir=$2; shift 2
    timeout "$RUN_TIMEOUT" docker run --name "$name" --label "$LABEL" --network host \
        -v "$dir:/bucket" -e BUCKET=/bucket "$@" "$IMAGE_CPU" "${JOB[@]}" > "$work/$name.log" 2>&1 && rc=0 || rc=$?
    echo "$rc"
}

final_sha() { sha256sum "$1/runs/tiny/final/model.safetensors" | cut -d' ' -f1; }

start=$SECONDS
say "1/4 make image-cpu"
IMAGE_CPU=$IMAGE_CPU PYTHON=$PYTHON bash docker/build_cpu.sh > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; fail "the image did not build (last lines above)"; }
grep '^\[image-cpu\]' "$work/build.log"
docker run --rm --label "$LABEL" --network none --entrypoint id "$IMAGE_CPU" -u | grep -qx 1000 \
    || fail "the image does not run as uid 1000"
# The console script and the configs installed with the package, from a folder with no checkout.
docker run --rm --label "$LABEL" --network none -w /tmp --entrypoint zh-pretrain "$IMAGE_CPU" \
    config --config demo > "$work/console.log" 2>&1 && grep -q "id: demo" "$work/console.log" \
    || { tail -20 "$work/console.log" >&2; fail "zh-pretrain config --config demo failed in /tmp"; }

say "2/4 uninterrupted run (bucket: a mounted host folder)"
straight=$(bucket_dir straight)
rc=$(docker_run straight "$straight")
[ "$rc" = 0 ] || { tail -30 "$work/straight.log" >&2; fail "uninterrupted run exited $rc"; }
[ -f "$straight/runs/tiny/checkpoints/LATEST" ] || fail "no checkpoints/LATEST in the uninterrupted run's bucket"
say "uninterrupted: exit 0, final model.safetensors $(final_sha "$straight" | cut -c1-16)"

say "2/4 the same run, docker stop after its first checkpoint, then run again"
stopped=$(bucket_dir stopped)
docker run -d --name stopped --label "$LABEL" --network host -v "$stopped:/bucket" -e BUCKET=/bucket \
    "$IMAGE_CPU" "${JOB[@]}" > /dev/null
for _ in $(seq $((RUN_TIMEOUT * 2))); do
    docker logs stopped 2>&1 | grep -q "checkpoint step-.* published" && break
    [ "$(docker inspect -f '{{.State.Running}}' stopped)" = true ] || break
    sleep 0.5
done
docker logs stopped 2>&1 | grep -q "checkpoint step-.* published" \
    || { docker logs stopped 2>&1 | tail -30 >&2; fail "no checkpoint published before the stop"; }
[ "$(docker inspect -f '{{.State.Running}}' stopped)" = true ] || fail "the run finished before it could be stopped"
docker stop -t 60 stopped > /dev/null
rc=$(docker inspect -f '{{.State.ExitCode}}' stopped)
docker logs stopped > "$work/stopped-1.log" 2>&1
[ "$rc" = 75 ] || { tail -30 "$work/stopped-1.log" >&2; fail "docker stop: exit $rc, expected 75 (preempted)"; }
latest=$(cat "$stopped/runs/tiny/checkpoints/LATEST" 2>/dev/null) || fail "no checkpoints/LATEST after the stop"
[ -f "$stopped/runs/tiny/checkpoints/$latest/MANIFEST.json" ] || fail "LATEST names $latest, which has no manifest"
[ ! -e "$stopped/runs/tiny/final" ] || fail "the stopped run exported a final model"
say "stopped: exit 75, LATEST=$latest with a manifest"
docker rm stopped > /dev/null
rc=$(docker_run stopped "$stopped")
[ "$rc" = 0 ] || { tail -30 "$work/stopped.log" >&2; fail "the resumed run exited $rc"; }
grep -qi "resum" "$work/stopped.log" || { tail -30 "$work/stopped.log" >&2; fail "the second run did not say it resumed"; }
a=$(final_sha "$straight"); b=$(final_sha "$stopped")
[ "$a" = "$b" ] || fail "stop + resume gave other weights than the uninterrupted run ($b vs $a)"
say "resumed: exit 0, final model.safetensors equal to the uninterrupted run's ($(echo "$a" | cut -c1-16))"

say "3/4 against a loopback S3 server (moto)"
port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PYTHON" -m moto.server -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto_pid=$!
s3() {  # s3 PYTHON-CODE: boto3 client `c` on the moto server
    AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$PYTHON" -c "import boto3; c = boto3.client('s3', endpoint_url='http://127.0.0.1:$port', region_name='us-east-1'); $1"
}
for _ in $(seq 60); do s3 "c.list_buckets()" 2> /dev/null && break; sleep 0.5; done
s3 "c.create_bucket(Bucket='zh-test')" > /dev/null || { cat "$work/moto.log" >&2; fail "moto server did not start"; }
timeout "$RUN_TIMEOUT" docker run --name s3 --label "$LABEL" --network host -e BUCKET=s3://zh-test/job \
    -e AWS_ENDPOINT_URL="http://127.0.0.1:$port" -e AWS_REGION=us-east-1 \
    -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test "$IMAGE_CPU" "${JOB[@]}" > "$work/s3.log" 2>&1 \
    || { tail -30 "$work/s3.log" >&2; fail "the run against S3 failed"; }
keys=$(s3 "print('\n'.join(o['Key'] for p in c.get_paginator('list_objects_v2').paginate(Bucket='zh-test') for o in p.get('Contents', [])))")
for key in job/runs/tiny/checkpoints/LATEST job/runs/tiny/final/model.safetensors job/runs/tiny/final/MANIFEST.json; do
    grep -qx "$key" <<< "$keys" || fail "s3://zh-test/$key missing after the S3 run"
done
say "S3: exit 0, $(grep -c /checkpoints/ <<< "$keys") checkpoint objects and the export in s3://zh-test/job"
kill "$moto_pid"; moto_pid=""

if [ "${SKIP_COMPOSE:-0}" = 1 ]; then
    say "4/4 compose skipped (SKIP_COMPOSE=1)"
else
    say "4/4 docker-compose.yml under docker-compose.test.yml"
    . scripts/test_compose.sh
fi
say "passed in $((SECONDS - start)) s"
