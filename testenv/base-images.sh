#!/usr/bin/env bash
# Seeds a registry's storage with the base images the Dockerfile names
# (its ARG RUST_IMAGE and ARG BASE_IMAGE defaults), made on this machine
# without pulling anything from Docker Hub:
#
#   library/debian:<suite>-slim   debootstrap --variant=minbase <suite>,
#                                 without apt lists, docs and man pages
#   library/rust:<X.Y>-<suite>    that image + gcc, libc6-dev, make, ca-certificates
#                                 (and this machine's extra CAs from
#                                 /usr/local/share/ca-certificates) + this
#                                 machine's Rust toolchain in /usr/local/rust,
#                                 CARGO_HOME=/usr/local/cargo
#
# The images go into a docker-registry data directory,
#   ${TRIPOD_CACHE:-~/.cache/tripod}/images/registry
# which a registry started on it serves as docker.io's mirror (see
# tests/image.rs). Prints that directory. Cached: a second run with the same
# script, Dockerfile base images, toolchain and CAs returns at once.
#
# Needs root, debootstrap, buildah, docker-registry and a Debian mirror
# (http://deb.debian.org/debian unless DEBIAN_MIRROR says otherwise).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dockerfile="$here/../Dockerfile"
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/images"
data="$cache/registry"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

arg_default() { sed -n "s/^ARG $1=//p" "$dockerfile" | head -1; }
rust_image="$(arg_default RUST_IMAGE)"
base_image="$(arg_default BASE_IMAGE)"
for image in "$rust_image" "$base_image"; do
  case "$image" in
    docker.io/library/*:*) ;;
    *) echo "base-images.sh: $image: expected docker.io/library/<name>:<tag> in the Dockerfile" >&2; exit 1 ;;
  esac
done
base_path="${base_image#docker.io/}"          # library/debian:bookworm-slim
rust_path="${rust_image#docker.io/}"          # library/rust:1.95-bookworm
suite="${base_path##*:}"; suite="${suite%-slim}"
rust_suite="${rust_path##*-}"
[ "$suite" = "$rust_suite" ] || {
  echo "base-images.sh: $base_image and $rust_image name different Debian suites" >&2; exit 1; }

sysroot="$(rustc --print sysroot)"
host="$(rustc -vV | sed -n 's/^host: //p')"
want="$( (cat "${BASH_SOURCE[0]}"; echo "$rust_image $base_image $mirror"; rustc -vV;
          cat /usr/local/share/ca-certificates/* 2>/dev/null || true) | sha256sum | cut -c1-16)"
stamp="$data/.stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$data"; exit 0
fi

for tool in debootstrap buildah docker-registry; do
  command -v "$tool" >/dev/null || {
    echo "base-images.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

start=$(date +%s)
echo "seeding $base_image and $rust_image into $data (first time only)" >&2
work="$cache/seed.tmp"
rm -rf "$work" "$data"
mkdir -p "$work" "$data"
registry_pid=""
cleanup() {
  [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true
  [ -z "$registry_pid" ] || wait "$registry_pid" 2>/dev/null || true
  b rm --all >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
b() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }

# The Debian base: a minbase debootstrap, slimmed like the official -slim tags.
debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" >&2
rm -rf "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/var/cache/apt/*.bin \
       "$work/rootfs"/var/cache/apt/archives/*.deb \
       "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* \
       "$work/rootfs"/usr/share/locale/* "$work/rootfs"/usr/share/info/* \
       "$work/rootfs"/var/log/*.log
tar -C "$work/rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' \
    --exclude='./sys/*' -cf "$work/rootfs.tar" .
c="$(b from scratch)"
b add "$c" "$work/rootfs.tar" / >/dev/null
b config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd bash --os linux --arch "$(dpkg --print-architecture)" "$c"
b commit -q "$c" "$base_image" >/dev/null

# The Rust builder: what the official rust image offers a Dockerfile, i.e.
# cargo and rustc on PATH, a C compiler, make (jemalloc's build) and the C
# library's static archives.
c="$(b from "$base_image")"
b run --isolation chroot "$c" -- sh -c 'apt-get update -q >/dev/null \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       gcc libc6-dev make ca-certificates >/dev/null \
  && rm -rf /var/lib/apt/lists/*' >&2
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  b copy "$c" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
  b run --isolation chroot "$c" -- update-ca-certificates >/dev/null
fi
b copy "$c" "$sysroot/bin" /usr/local/rust/bin >/dev/null
for lib in "$sysroot"/lib/*.so*; do
  b copy "$c" "$lib" /usr/local/rust/lib/ >/dev/null
done
b copy "$c" "$sysroot/lib/rustlib/$host" "/usr/local/rust/lib/rustlib/$host" >/dev/null
b copy "$c" "$sysroot/lib/rustlib/etc" /usr/local/rust/lib/rustlib/etc >/dev/null
b config --env CARGO_HOME=/usr/local/cargo \
  --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
b run --isolation chroot "$c" -- cargo --version >&2
b commit -q "$c" "$rust_image" >/dev/null

# Push both into a registry whose storage is $data.
port=""
for _ in $(seq 50); do
  p=$((20000 + RANDOM % 40000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || { echo "base-images.sh: no free port" >&2; exit 1; }
cat > "$work/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $data
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
b push -q --tls-verify=false "$base_image" "docker://127.0.0.1:$port/$base_path" >&2
b push -q --tls-verify=false "$rust_image" "docker://127.0.0.1:$port/$rust_path" >&2

echo "$want" > "$stamp"
echo "seeded in $(( $(date +%s) - start ))s" >&2
echo "$data"
