#!/usr/bin/env bash
# Build the detector image (`make image`, `make image VARIANT=gpu`): deploy/image/build.sh [cpu|gpu]
#
# Base: the official python image when this machine has it or can pull it; otherwise (no Docker Hub, or CI=true,
# where nothing is pulled) a stand-in made from Debian packages by debian-image.sh, made once and kept.
# pip inside the build trusts this machine's CA bundle (a network that intercepts TLS, a company proxy): it is
# copied to the ignored .build/ folder and named by PIP_CA_BUNDLE; PIP_INDEX_URL, when set, is passed on.
# Environment: IMAGE (default akconv-detector:0.1.0, with -gpu appended for the GPU variant), PYTHON_IMAGE,
# STANDIN_PYTHON_IMAGE, PIP_INDEX_URL, HOST_CA_BUNDLE.
set -euo pipefail
cd "$(dirname "$0")/../.."

variant=${1:-cpu}
case "$variant" in
cpu) image=${IMAGE:-akconv-detector:0.1.0} ;;
gpu) image=${IMAGE:-akconv-detector:0.1.0-gpu} ;;
*)
    echo "build.sh: variant must be cpu or gpu, not '$variant'" >&2
    exit 2
    ;;
esac
official=${PYTHON_IMAGE:-python:3.11.13-slim-bookworm}
standin=${STANDIN_PYTHON_IMAGE:-akconv/python:3.11-bookworm}

has_image() { docker image inspect "$1" >/dev/null 2>&1; }

if has_image "$official" || { [ "${CI:-}" != true ] && docker pull -q "$official" >/dev/null 2>&1; }; then
    base=$official
else
    base=$standin
    if ! has_image "$base"; then
        echo "no $official here; making $base from Debian packages"
        deploy/image/debian-image.sh "$base" python3 python3-venv ca-certificates -- 'ENV LANG=C.UTF-8' \
            'CMD ["python3"]'
    fi
fi

args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$variant")
if [ -n "${PIP_INDEX_URL:-}" ]; then
    args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
fi
host_bundle=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$host_bundle" ]; then
    mkdir -p .build
    cp "$host_bundle" .build/pip-ca.crt
    args+=(--build-arg PIP_CA_BUNDLE=.build/pip-ca.crt)
fi

echo "building $image ($variant) on $base"
start=$(date +%s)
docker build "${args[@]}" -t "$image" .
echo "built $image in $(($(date +%s) - start)) s: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
