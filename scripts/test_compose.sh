# Sourced by scripts/test_container.sh (its $work, $PYTHON, say, fail, cleanup): docker-compose.yml
# under docker-compose.test.yml, for real: the S3 stand-in (docker/s3-standin), the init job (buckets and
# the sample corpus), trainer-cpu on the image make image-cpu built, checkpoints in the bucket.
# Compose: `docker compose` (v2) when the plugin is there, else docker-compose (Debian bookworm: 1.29.2,
# installed by apt when neither is).
if docker compose version > /dev/null 2>&1; then
    compose_cmd=(docker compose)
else
    command -v docker-compose > /dev/null || { say "installing docker-compose (apt)"; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose > /dev/null; }
    compose_cmd=(docker-compose)
fi
compose_version=$("${compose_cmd[@]}" version 2>/dev/null | head -1)
# docker-compose.yml as it is, less two things this machine refuses and an override cannot take away:
# minio's published ports (host networking refuses port bindings, "host" network_mode is incompatible
# with port_bindings; compose concatenates an override's `ports`), and memlock -1 where the host's hard
# limit is lower (runc: "error setting rlimit type 8: operation not permitted"; here it is 8192 kB).
# Relative paths stay relative to the repository (--project-directory).
memlock_hard=$(ulimit -Hl)
"$PYTHON" -c "
import sys, yaml
c = yaml.safe_load(open('docker-compose.yml'))
c['services']['minio'].pop('ports')
if sys.argv[2] != 'unlimited':
    c['services']['trainer-cpu']['ulimits'].pop('memlock')
yaml.safe_dump(c, open(sys.argv[1], 'w'), sort_keys=False)" "$work/docker-compose.yml" "$memlock_hard"
compose_cmd+=(--env-file "$work/compose.env" -p zh-pretrain-test --project-directory "$PWD"
              -f "$work/docker-compose.yml" -f docker-compose.test.yml)
compose() { "${compose_cmd[@]}" "$@"; }
say "compose: $compose_version"

standin_ctx="$work/s3-standin"
cp -r docker/s3-standin "$standin_ctx"
cp "${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$standin_ctx/host-ca.crt"
docker build --network host -q --build-arg BASE="$IMAGE_CPU" -t zh-pretrain-s3-standin:test "$standin_ctx" \
    > "$work/standin-build.log" 2>&1 || { tail -30 "$work/standin-build.log" >&2; fail "the S3 stand-in did not build"; }

port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
cat > "$work/compose.env" <<ENV
S3_PORT=$port
MINIO_ROOT_USER=root-test
MINIO_ROOT_PASSWORD=root-test-password
AWS_ACCESS_KEY_ID=trainer-test
AWS_SECRET_ACCESS_KEY=trainer-test-secret
ENV
compose config > "$work/compose-config.yml" || fail "docker-compose.yml + docker-compose.test.yml do not merge"
had_cuda_image=$(docker image inspect zh-pretrain:latest > /dev/null 2>&1 && echo yes || echo no)
# Detached, then wait for the trainer: --exit-code-from would stop everything when the init job exits.
timeout "$RUN_TIMEOUT" "${compose_cmd[@]}" up -d --no-build trainer-cpu > "$work/compose.log" 2>&1 \
    || { tail -40 "$work/compose.log" >&2; fail "docker-compose up trainer-cpu failed"; }
trainer_id=$(compose ps -q trainer-cpu)
[ -n "$trainer_id" ] || fail "docker-compose up started no trainer-cpu container"
rc=$(timeout "$RUN_TIMEOUT" docker wait "$trainer_id") || rc="timeout"
docker logs "$trainer_id" > "$work/compose-trainer.log" 2>&1
[ "$rc" = 0 ] || { tail -40 "$work/compose-trainer.log" >&2; fail "trainer-cpu under compose exited $rc"; }
[ "$had_cuda_image" = yes ] || ! docker image inspect zh-pretrain:latest > /dev/null 2>&1 \
    || fail "docker-compose up trainer-cpu made the CUDA image zh-pretrain:latest"
init_rc=$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q minio-init)")
[ "$init_rc" = 0 ] || fail "minio-init (the stand-in's init job) exited $init_rc"
# The stand-in keeps objects in memory: read the bucket while it still runs.
keys=$(AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x "$PYTHON" -c "import boto3; c = boto3.client('s3', endpoint_url='http://127.0.0.1:$port', region_name='us-east-1'); print('\n'.join(o['Key'] for p in c.get_paginator('list_objects_v2').paginate(Bucket='runs') for o in p.get('Contents', [])))")
for key in zh-pretrain/runs/compose-cpu/checkpoints/LATEST zh-pretrain/runs/compose-cpu/final/model.safetensors; do
    grep -qx "$key" <<< "$keys" || { tail -20 "$work/compose.log" >&2; fail "s3://runs/$key missing after compose up"; }
done
say "compose: init job exit 0, trainer-cpu exit 0, $(grep -c /checkpoints/ <<< "$keys") checkpoint objects in s3://runs/zh-pretrain/runs/compose-cpu"
compose down -v --remove-orphans > /dev/null 2>&1
