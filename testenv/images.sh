#!/usr/bin/env bash
# The images a Tripod node runs, made on this machine (no registry on the
# internet is reachable from here):
#
#   images.sh build          builds, once per source change, into
#                            ${TRIPOD_CACHE:-~/.cache/tripod}/images/build-storage:
#                              localhost/tripod-buildd:src-<hash>  the Dockerfile's `buildd`
#                                target (base images from testenv/base-images.sh)
#                              localhost/tripod-controller:src-<hash>  its `controller`
#                                target (the chart's image)
#                              localhost/tripod-pause:1            a static pause program
#                              localhost/tripod-busybox:1          Debian's busybox-static
#                              localhost/tripod-busybox:1-arm64    the same for arm64
#                                (Debian's arm64 package, from emulation.sh)
#                              localhost/tripod-windows-synthetic:ltsc2022 and :ltsc2019
#                                synthetic Windows base images (see windows_image)
#   images.sh push REGISTRY  pushes them (plain HTTP) as
#                              REGISTRY/tripod/buildd:src-<hash>
#                              REGISTRY/tripod/controller:src-<hash>
#                              REGISTRY/tripod/pause:1
#                              REGISTRY/base/busybox:1
#                              REGISTRY/base/busybox:1-arm64
#                              REGISTRY/base/windows-synthetic:ltsc2022 (and :ltsc2019)
#                              REGISTRY/base/debian:bookworm (the debootstrap Debian of
#                                base-images.sh, as the buildd build pulled it)
#                            and prints one `name=reference` line each.
#
# Needs root, buildah, gcc, busybox-static, and what base-images.sh needs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/images"
storage="$cache/build-storage"
runroot="/run/tripod-images"
b() { buildah --root "$storage" --runroot "$runroot" --storage-driver overlay "$@"; }

src_hash() {
  (cd "$repo" && find Dockerfile Cargo.toml Cargo.lock build.rs harness/Cargo.toml bench/Cargo.toml proto src -type f -print0 \
     | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
}
hash="$(src_hash)"
buildd_tag="localhost/tripod-buildd:src-$hash"
controller_tag="localhost/tripod-controller:src-$hash"
pause_tag="localhost/tripod-pause:$(sha256sum "$here/pause.c" | cut -c1-12)"
busybox_tag="localhost/tripod-busybox:1"
busybox_arm64_tag="localhost/tripod-busybox:1-arm64"
# Windows Server 2022 and 2019 builds (os.version of the synthetic bases).
windows_2022_version="10.0.20348.2700"
windows_2019_version="10.0.17763.6414"
windows_2022_tag="localhost/tripod-windows-synthetic:ltsc2022-${windows_2022_version}"
windows_2019_tag="localhost/tripod-windows-synthetic:ltsc2019-${windows_2019_version}"

have() { b inspect --type image "$1" >/dev/null 2>&1; }

# busybox_image TAG BUSYBOX ARCH [CONFIG ARGS…]: a base image of one busybox
# binary and its applets (listed by this host's busybox: the same package).
busybox_image() {
  local tag="$1" binary="$2" arch="$3"
  shift 3
  local tmp
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/bin" "$tmp/etc" "$tmp/tmp"
  chmod 1777 "$tmp/tmp"
  cp "$binary" "$tmp/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$tmp/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' > "$tmp/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$tmp/etc/group"
  local c
  c="$(b from scratch)"
  b copy "$c" "$tmp" / >/dev/null
  b config --env PATH=/bin --cmd /bin/sh --os linux --arch "$arch" "$@" "$c"
  b commit -q "$c" "$tag" >/dev/null
  rm -rf "$tmp"
}

# windows_image TAG OS_VERSION: a synthetic Windows base image. There is no
# Windows base image to pull here, and BuildKit on Linux only needs what a
# real one has in its layer layout: `Files/` (the file system, here a few
# text files where Windows keeps them) and `Hives/` (registry hives, here
# empty files), with a config saying os windows, its os.version.
windows_image() {
  local tag="$1" version="$2" tmp c
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/Files/Windows/System32/drivers/etc" "$tmp/Files/ProgramData" "$tmp/Hives"
  printf '127.0.0.1 localhost\r\n' > "$tmp/Files/Windows/System32/drivers/etc/hosts"
  printf 'Synthetic Windows base for Tripod tests (not Windows): os.version %s\r\n' "$version" > "$tmp/Files/License.txt"
  for hive in DefaultUser_Delta Sam_Delta Security_Delta Software_Delta System_Delta; do
    : > "$tmp/Hives/$hive"
  done
  c="$(b from scratch)"
  b copy "$c" "$tmp" / >/dev/null
  b config --os windows --arch amd64 --os-version "$version" \
    --env 'PATH=C:\Windows\system32;C:\Windows' --cmd 'c:\windows\system32\cmd.exe' "$c"
  b commit -q "$c" "$tag" >/dev/null
  rm -rf "$tmp"
}

build() {
  mkdir -p "$storage"
  for pair in "$windows_2022_tag=$windows_2022_version" "$windows_2019_tag=$windows_2019_version"; do
    if ! have "${pair%%=*}"; then
      echo "images.sh: building the synthetic Windows base ${pair%%=*}" >&2
      windows_image "${pair%%=*}" "${pair#*=}"
    fi
  done
  if ! have "$pause_tag"; then
    echo "images.sh: building the pause image" >&2
    tmp="$(mktemp -d)"
    gcc -static -Os -s -o "$tmp/pause" "$here/pause.c"
    c="$(b from scratch)"
    b copy "$c" "$tmp/pause" /pause >/dev/null
    b config --entrypoint '["/pause"]' --user 65535:65535 --os linux --arch "$(dpkg --print-architecture)" "$c"
    b commit -q "$c" "$pause_tag" >/dev/null
    rm -rf "$tmp"
  fi
  if ! have "$busybox_tag"; then
    echo "images.sh: building the busybox base image" >&2
    busybox_image "$busybox_tag" /bin/busybox "$(dpkg --print-architecture)"
  fi
  if ! have "$busybox_arm64_tag"; then
    echo "images.sh: building the arm64 busybox base image" >&2
    arm64="$(bash "$here/emulation.sh")"
    busybox_image "$busybox_arm64_tag" "$arm64" arm64 --variant v8
  fi
  if ! have "$buildd_tag" || ! have "$controller_tag"; then
    start=$(date +%s)
    echo "images.sh: building the Dockerfile's buildd and controller targets as $buildd_tag, $controller_tag (compiles Tripod in release mode: minutes)" >&2
    data="$(bash "$here/base-images.sh")"
    port=""
    for _ in $(seq 50); do
      p=$((20000 + RANDOM % 40000))
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
    done
    [ -n "$port" ] || { echo "images.sh: no free port" >&2; exit 1; }
    tmp="$(mktemp -d)"
    printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
      "$data" "$port" > "$tmp/registry.yml"
    docker-registry serve "$tmp/registry.yml" >"$tmp/registry.log" 2>&1 &
    reg=$!
    trap 'kill $reg 2>/dev/null || true; rm -rf "$tmp"' EXIT
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    printf 'unqualified-search-registries = []\n\n[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\nlocation = "127.0.0.1:%s"\ninsecure = true\n' \
      "$port" > "$tmp/registries.conf"
    b rm --all >/dev/null 2>&1 || true
    CONTAINERS_REGISTRIES_CONF="$tmp/registries.conf" \
      b bud --layers --isolation chroot --target buildd -t "$buildd_tag" -f "$repo/Dockerfile" "$repo" >&2
    # The same `build` stage, from the layer cache.
    CONTAINERS_REGISTRIES_CONF="$tmp/registries.conf" \
      b bud --layers --isolation chroot --target controller -t "$controller_tag" -f "$repo/Dockerfile" "$repo" >&2
    # Older source versions of the images: no longer wanted.
    for old in $(b images --format '{{.Name}}:{{.Tag}}' | grep -E '^localhost/tripod-(buildd|controller):src-' \
                 | grep -vxF -e "$buildd_tag" -e "$controller_tag" || true); do
      b rmi "$old" >/dev/null 2>&1 || true
    done
    echo "images.sh: built in $(( $(date +%s) - start ))s" >&2
  fi
}

push() {
  registry="$1"
  build
  for pair in "buildd=$buildd_tag=tripod/buildd:${buildd_tag##*:}" \
              "controller=$controller_tag=tripod/controller:${controller_tag##*:}" \
              "pause=$pause_tag=tripod/pause:1" \
              "busybox=$busybox_tag=base/busybox:1" \
              "busybox_arm64=$busybox_arm64_tag=base/busybox:1-arm64" \
              "windows_${windows_2022_version}=$windows_2022_tag=base/windows-synthetic:ltsc2022" \
              "windows_${windows_2019_version}=$windows_2019_tag=base/windows-synthetic:ltsc2019"; do
    name="${pair%%=*}"; rest="${pair#*=}"; tag="${rest%%=*}"; dest="$registry/${rest#*=}"
    b push -q --tls-verify=false "$tag" "docker://$dest" >&2
    echo "$name=$dest"
  done
  debian="$(sed -n 's/^ARG BASE_IMAGE=//p' "$repo/Dockerfile" | head -1)"
  if have "$debian"; then
    b push -q --tls-verify=false "$debian" "docker://$registry/base/debian:bookworm" >&2
    echo "debian=$registry/base/debian:bookworm"
  fi
}

case "${1:-}" in
  build) build ;;
  push) [ -n "${2:-}" ] || { echo "usage: images.sh push REGISTRY" >&2; exit 2; }; push "$2" ;;
  *) echo "usage: images.sh build | push REGISTRY" >&2; exit 2 ;;
esac
