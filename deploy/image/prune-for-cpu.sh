#!/bin/sh
# CPU variant of the image: delete the CUDA libraries that torch never loads on a CPU.
#   prune-for-cpu.sh SITE_PACKAGES
# PyPI's torch for Linux is a CUDA build: importing it links a dozen CUDA libraries (libtorch_cuda.so needs them),
# so those stay, but the rest of the nvidia-* wheels (cuDNN's kernels, which cuDNN opens only on a GPU, NCCL's
# device code, NVSHMEM's transports, static libraries, headers) is never opened on a CPU. What stays is exactly
# what the dynamic linker resolves for torch's Python extension; the build then imports torch and runs a
# convolution to prove it (Dockerfile).
set -eu
site=$1
keep=$(ldd "$site"/torch/_C.cpython-*.so | awk '$3 ~ /\/nvidia\// {print $3}' | xargs -r realpath)
if [ -z "$keep" ]; then
    echo "prune-for-cpu.sh: torch links no nvidia library here; nothing to prune" >&2
    exit 1
fi
find "$site/nvidia" -type f | while read -r file; do
    if ! printf '%s\n' "$keep" | grep -qxF "$(realpath "$file")"; then
        rm -f "$file"
    fi
done
find "$site/nvidia" -depth -type d -empty -delete
