#!/usr/bin/env bash
# A Docker engine for `make image`, `make deploy-up` and the container tests (`make docker-engine`).
# Where `docker info` answers already (a laptop's Docker Desktop, a running daemon) nothing happens. Otherwise, on a
# Debian machine as root: Debian's docker.io, debootstrap and docker-compose are installed when missing and dockerd
# is started in the background (log: /var/log/dockerd.log), waiting up to 60 s for it to answer.
# Exit 1 when no engine answers; outside CI that is only a warning (the container tests then skip, saying why),
# in CI (CI=true) it fails the run.
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi

give_up() {
    echo "docker-engine.sh: $1" >&2
    if [ "${CI:-}" = true ]; then
        exit 1
    fi
    echo "docker-engine.sh: no Docker engine: the container tests will skip" >&2
    exit 0
}

missing=()
for tool in dockerd debootstrap docker-compose; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        give_up "missing ${missing[*]}: install Docker (and debootstrap, docker-compose) or run as root on Debian"
    fi
    echo "installing docker.io, debootstrap, docker-compose (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap \
        docker-compose >/dev/null
fi

if [ "$(id -u)" != 0 ]; then
    give_up "dockerd is not running and only root can start it"
fi
echo "starting dockerd (log: /var/log/dockerd.log)"
setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
give_up "dockerd did not answer within 60 s; see /var/log/dockerd.log"
