#!/usr/bin/env bash
# User-mode emulation for the emulating Linux runner: Debian's
# qemu-user-static with binfmt_misc runs arm64 binaries on this machine, so
# `buildah --platform linux/arm64` can execute RUN steps of arm64 images.
# Also fetches Debian's arm64 busybox-static (the arm64 busybox base image
# of images.sh) into ${TRIPOD_CACHE:-~/.cache/tripod}/emulation.
#
# Installs qemu-user-static and binfmt-support (apt), mounts binfmt_misc if
# it is not, and enables the qemu-aarch64 handler (flags F: the interpreter
# is opened at registration, so it works inside chroots). Like an installed
# package, the handler stays enabled afterwards. Needs root. Prints the
# path of the arm64 busybox.
set -euo pipefail
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/emulation"
mkdir -p "$cache"
if ! command -v update-binfmts >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  echo "emulation.sh: installing qemu-user-static binfmt-support" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support >&2
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ "$(head -1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" != enabled ]; then
  update-binfmts --enable qemu-aarch64 >&2
fi
busybox="$cache/busybox-arm64"
if [ ! -x "$busybox" ]; then
  echo "emulation.sh: fetching Debian's arm64 busybox-static" >&2
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -qq >&2
  fi
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -qq busybox-static:arm64 >&2 || { apt-get update -qq >&2 && apt-get download -qq busybox-static:arm64 >&2; })
  dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/x"
  cp "$tmp/x/bin/busybox" "$busybox.tmp" && mv "$busybox.tmp" "$busybox"
  rm -rf "$tmp"
fi
[ "$("$busybox" uname -m)" = aarch64 ] || { echo "emulation.sh: the arm64 busybox does not run through qemu" >&2; exit 1; }
echo "$busybox"
