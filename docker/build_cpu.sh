#!/usr/bin/env bash
# make image-cpu: the Dockerfile's CPU flavour (FLAVOUR=cpu) as $IMAGE_CPU (default zh-pretrain:cpu),
# from a clean export of the committed tree (git archive HEAD: what CI tests is what is committed, not
# the working tree), on the Debian bookworm base docker/engine.sh makes, with
# - the CPU torch wheel `make install` uses ($TORCH_SPEC, fetched by pip download into the context's
#   .whl/: from pip's configured find-links or cache on these machines, so the build downloads no GB);
# - the host's CA bundle ($CA_BUNDLE) in .whl/ and PIP_CERT naming it: PyPI is reached through a
#   TLS-inspecting proxy here, whose CA the base image does not trust. Builder stage only.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_CPU=${IMAGE_CPU:-zh-pretrain:cpu}
BASE_IMAGE=${BASE_IMAGE:-zh-pretrain-base:bookworm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

say() { echo "[image-cpu] $*"; }
die() { echo "[image-cpu] error: $*" >&2; exit 1; }

[[ $TORCH_SPEC == torch==* ]] || die "TORCH_SPEC must pin one version (torch==X.Y.Z), not '$TORCH_SPEC'"
[ -f "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (set CA_BUNDLE)"
git rev-parse --verify -q HEAD > /dev/null || die "not a git checkout with a commit: the image is built from git archive HEAD"
BASE_IMAGE=$BASE_IMAGE bash docker/engine.sh

context=$(mktemp -d /tmp/zh-pretrain-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
git archive HEAD | tar -x -C "$context"
if [ -n "$(git status --porcelain --untracked-files=no -- Dockerfile pyproject.toml entrypoint.py trainer configs data)" ]; then
    say "note: uncommitted changes under the image's inputs are NOT in this build (it is HEAD $(git rev-parse --short HEAD))"
fi
mkdir -p "$context/.whl"
say "pip download $TORCH_SPEC (no deps) into the build context"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$context/.whl" "$TORCH_SPEC" \
    || die "pip could not fetch $TORCH_SPEC"
ls "$context"/.whl/torch-*.whl > /dev/null 2>&1 || die "pip download left no torch wheel in $context/.whl"
cp "$CA_BUNDLE" "$context/.whl/host-ca.crt"

say "docker build $IMAGE_CPU from HEAD $(git rev-parse --short HEAD) on $BASE_IMAGE"
start=$SECONDS
# --network host: the daemon runs without a bridge, so a build step has no other network to reach PyPI.
docker build --network host -t "$IMAGE_CPU" \
    --build-arg FLAVOUR=cpu \
    --build-arg BUILDER_BASE="$BASE_IMAGE" \
    --build-arg RUNTIME_BASE="$BASE_IMAGE" \
    --build-arg TORCH_VERSION="${TORCH_SPEC#torch==}" \
    --build-arg TORCH_CUDA_VERSION= \
    --build-arg PIP_CERT=/tmp/wheels/host-ca.crt \
    "$context"
say "built $IMAGE_CPU in $((SECONDS - start)) s"
