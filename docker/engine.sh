#!/usr/bin/env bash
# A Docker engine and the CPU flavour's base image, made here when missing (CI is a clean machine).
#
# - Engine: `docker info` answers, or docker.io is installed (apt) and dockerd started with no bridge and
#   no iptables (no bridge network on these machines: containers use --network host or none). The
#   daemon started here keeps running after the script (its log: $DOCKERD_LOG).
# - Base: $BASE_IMAGE (default zh-pretrain-base:bookworm) exists, or Debian bookworm is debootstrapped
#   and imported as it (about 2 min): no registry image can be pulled here, Debian's mirror is reachable.
# Needs root for the installs and the daemon; prints what it did.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-zh-pretrain-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-zh-pretrain.log}

say() { echo "[engine] $*"; }
die() { echo "[engine] error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (or do it yourself: $2)"; }

apt_install() {  # apt_install PACKAGE...: once per run, quietly
    need_root "installing $*" "apt-get install -y $*"
    say "installing $* (apt)"
    if [ -z "${_apt_updated:-}" ]; then apt-get update -qq; _apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}

if ! docker info > /dev/null 2>&1; then
    command -v dockerd > /dev/null || apt_install docker.io
    command -v docker > /dev/null || apt_install docker.io
    if ! pgrep -x dockerd > /dev/null; then
        need_root "starting dockerd" "dockerd --bridge=none --iptables=false &"
        say "starting dockerd --bridge=none --iptables=false (log: $DOCKERD_LOG)"
        nohup dockerd --bridge=none --iptables=false > "$DOCKERD_LOG" 2>&1 &
    fi
    for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
    docker info > /dev/null 2>&1 || die "the Docker engine did not answer within 60 s; see $DOCKERD_LOG"
fi
say "docker engine $(docker version --format '{{.Server.Version}}')"

if docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    say "base image $BASE_IMAGE present"
else
    command -v debootstrap > /dev/null || apt_install debootstrap
    need_root "debootstrap" "debootstrap bookworm DIR && tar -C DIR -c . | docker import - $BASE_IMAGE"
    rootfs=$(mktemp -d /tmp/zh-pretrain-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap bookworm from $DEBIAN_MIRROR (about 2 min; log: $rootfs.log)"
    start=$SECONDS
    debootstrap bookworm "$rootfs" "$DEBIAN_MIRROR" > "$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" > /dev/null
    say "imported $BASE_IMAGE in $((SECONDS - start)) s"
fi
