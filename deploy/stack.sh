#!/usr/bin/env bash
# The compose stack on this machine (`make deploy-up`, `make deploy-down`):
#   deploy/stack.sh up [-f FILE ...]     docker-compose.yml (plus any override files) up, waiting for healthy replicas
#   deploy/stack.sh down [-f FILE ...]   and down again
#
# The compose file names the official, pinned images. Where one is neither here nor pullable (no Docker Hub; in CI
# nothing is pulled), a stand-in made from Debian packages by deploy/image/debian-image.sh takes its place through
# the variable the compose file reads: NGINX_IMAGE (Debian's nginx 1.22), PROMETHEUS_IMAGE (Debian's Prometheus
# 2.42). Grafana has no such source (not in Debian, not on PyPI): without its image the stack runs without it, and
# says so. A variable already set wins. The detector image is built by `make image`.
# Environment read by docker-compose.yml: DETECTOR_IMAGE, DETECTOR_REPLICAS, PUBLISH_ADDRESS (127.0.0.1), LB_PORT,
# GRAFANA_PORT, PROMETHEUS_PORT; COMPOSE_PROJECT_NAME names the stack.
set -euo pipefail
cd "$(dirname "$0")/.."

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    else
        docker-compose "$@"
    fi
}

available() { # IMAGE: here already, or pulled now (never in CI)
    docker image inspect "$1" >/dev/null 2>&1 || { [ "${CI:-}" != true ] && docker pull -q "$1" >/dev/null 2>&1; }
}

standin() { # VARIABLE OFFICIAL STANDIN PACKAGE -- INSTRUCTION...: export VARIABLE as the image the stack runs
    local variable=$1 official=$2 replacement=$3 package=$4
    shift 4
    if [ -n "${!variable:-}" ]; then
        return
    fi
    if available "$official"; then
        export "$variable=$official"
        return
    fi
    if ! docker image inspect "$replacement" >/dev/null 2>&1; then
        deploy/image/debian-image.sh "$replacement" "$package" "$@"
    fi
    echo "$official cannot be pulled here: $replacement (Debian's $package) stands in"
    export "$variable=$replacement"
}

action=${1:-}
shift || true
files=(-f docker-compose.yml "$@")

case "$action" in
up)
    standin NGINX_IMAGE nginx:1.27.3-alpine akconv/nginx:bookworm nginx -- \
        'CMD ["nginx", "-g", "daemon off;"]'
    standin PROMETHEUS_IMAGE prom/prometheus:v2.53.2 akconv/prometheus:bookworm prometheus -- \
        'WORKDIR /prometheus' 'ENTRYPOINT ["/usr/bin/prometheus"]'
    services=(detector lb prometheus)
    if [ -n "${GRAFANA_IMAGE:-}" ] || available grafana/grafana:11.2.0; then
        services+=(grafana)
    else
        echo "grafana/grafana:11.2.0 cannot be pulled here and has no Debian or PyPI stand-in: the stack runs without Grafana"
    fi
    # up -d returns once the load balancer has started, which waits for healthy (warmed-up) detector replicas.
    compose "${files[@]}" up -d --no-build "${services[@]}"
    compose "${files[@]}" ps
    echo "up: http://${PUBLISH_ADDRESS:-127.0.0.1}:${LB_PORT:-8080}/detect (load balancer)," \
        "Prometheus on http://127.0.0.1:${PROMETHEUS_PORT:-9090}"
    ;;
down)
    compose "${files[@]}" down --remove-orphans --timeout 60
    ;;
*)
    sed -n '2,4p' "$0" >&2
    exit 2
    ;;
esac
