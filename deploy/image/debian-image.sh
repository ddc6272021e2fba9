#!/usr/bin/env bash
# Make a Docker image from Debian packages, for machines that cannot pull official images (no Docker Hub):
#   deploy/image/debian-image.sh NAME PACKAGE... [-- DOCKERFILE_INSTRUCTION...]
# e.g. deploy/image/debian-image.sh akconv/python:3.11-bookworm python3 python3-venv ca-certificates
#      deploy/image/debian-image.sh akconv/nginx:bookworm nginx -- 'CMD ["nginx", "-g", "daemon off;"]'
#
# debootstrap (minbase) makes a bookworm root file system, the packages are installed into it, and `docker import`
# turns it into image NAME, with the instructions after `--` (CMD, ENTRYPOINT, ...) applied. The Debian mirror is
# read from this machine's apt sources when the script runs; it is never written into the repository, and the
# image's own apt sources, lists and caches are emptied before import. Needs root, debootstrap and a Docker engine.
# `docker import` takes CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME and WORKDIR (not STOPSIGNAL).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,4p' "$0" >&2
    exit 2
fi
name=$1
shift
packages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    packages+=("$1")
    shift
done
[ $# -gt 0 ] && shift
changes=()
for instruction in "$@"; do
    changes+=(--change "$instruction")
done

# The first Debian archive URI of this machine's apt sources (deb822 .sources files or the one-line format).
mirror=$(
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}' || true
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {print $2}' || true
    } | awk '!/security|updates/' | head -n1
)
if [ -z "$mirror" ]; then
    echo "debian-image.sh: no Debian mirror found in /etc/apt/sources.list{,.d}" >&2
    exit 1
fi

rootfs=$(mktemp -d /tmp/debian-image.XXXXXX)
trap 'umount "$rootfs/proc" 2>/dev/null || true; rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
mount -t proc proc "$rootfs/proc"
# No services start inside the chroot while packages install (nginx's would), and apt needs no pty or sandbox user.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
apt_options=(-qq -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0)
chroot "$rootfs" apt-get "${apt_options[@]}" update
DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get "${apt_options[@]}" install -y --no-install-recommends \
    "${packages[@]}" >/dev/null
chroot "$rootfs" apt-get clean
rm "$rootfs/usr/sbin/policy-rc.d"
umount "$rootfs/proc"

# Nothing of this machine stays in the image: its mirror, its package lists, its resolver and host name.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log "$rootfs"/tmp/*
: >"$rootfs/etc/apt/sources.list"
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

tar --numeric-owner -C "$rootfs" -c . | docker import "${changes[@]}" - "$name" >/dev/null
echo "built $name from Debian bookworm (${packages[*]})"
