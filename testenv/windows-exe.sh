#!/usr/bin/env bash
# Builds Tripod's Windows binaries and what runs them under Wine here, and
# prints the directory holding them:
#
#   tripod.exe              cargo build --target x86_64-pc-windows-gnu, the
#                           debug profile without debug info (Debian's
#                           mingw-w64 links it; in release it took 9 minutes
#                           from cold on 2 cores), cached in
#                           ~/.cache/tripod/target-cross
#   buildkitd.exe, buildctl.exe
#                           testenv/buildkit.sh windows (GOOS=windows)
#   bcryptprimitives.dll    .ci/wine-shim: Wine 8 (Debian bookworm) lacks this
#                           DLL, which Rust's std and Go's runtime import for
#                           random bytes; the stand-in forwards to
#                           RtlGenRandom. For Wine only, never shipped.
#
# Installs (apt) mingw-w64 and wine64, and the Rust target, when missing.
# `windows-exe.sh prefix DIR` also prepares a Wine prefix in DIR with the
# stand-in DLL in its system32 (Go loads it from there only).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${TRIPOD_CACHE:-$HOME/.cache/tripod}/windows-exe"
need=()
command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
[ -x /usr/lib/wine/wine64 ] || need+=(wine64)
if [ ${#need[@]} -gt 0 ]; then
  echo "windows-exe.sh: apt-get install ${need[*]}" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" = prefix ]; then
  dir="$2"
  # A fresh prefix takes Wine minutes (wineboot): made once, cached, and
  # copied for each use.
  template="${TRIPOD_CACHE:-$HOME/.cache/tripod}/wine-prefix"
  if [ ! -f "$template/.done" ]; then
    echo "windows-exe.sh: creating a Wine prefix (first time only, ~2 min)" >&2
    rm -rf "$template" "$template.tmp"
    mkdir -p "$template" "$template.tmp"
    # Its wineserver's socket directory: in $template.tmp, not /tmp.
    WINEPREFIX="$template" WINEDEBUG=-all TMPDIR="$template.tmp" \
      /usr/lib/wine/wine64 wineboot --init >/dev/null 2>&1 || true
    WINEPREFIX="$template" TMPDIR="$template.tmp" /usr/lib/wine/wineserver -w || true
    rm -rf "$template.tmp"
    [ -d "$template/drive_c/windows/system32" ] || { echo "windows-exe.sh: wineboot made no prefix" >&2; exit 1; }
    touch "$template/.done"
  fi
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  cp -a "$template" "$dir"
  cp "$out/bcryptprimitives.dll" "$dir/drive_c/windows/system32/"
  echo "$dir"
  exit 0
fi
# Built already from these sources: nothing to do (the tests call this
# script; a cargo run nested in `cargo test` would rebuild for its
# environment).
src_hash="$( (cd "$repo" && find Cargo.toml Cargo.lock build.rs proto src .ci/wine-shim testenv/buildkit.sh -type f -print0 \
  | sort -z | xargs -0 sha256sum; sha256sum < "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$src_hash" ] \
   && [ -f "$out/tripod.exe" ] && [ -f "$out/buildctl.exe" ] && [ -f "$out/bcryptprimitives.dll" ]; then
  echo "$out"; exit 0
fi
rustup target list --installed | grep -qx x86_64-pc-windows-gnu \
  || rustup target add x86_64-pc-windows-gnu >&2
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CC_x86_64_pc_windows_gnu=x86_64-w64-mingw32-gcc
echo "windows-exe.sh: cargo build --target x86_64-pc-windows-gnu (first time: minutes)" >&2
(cd "$repo" && CARGO_TARGET_DIR="${TRIPOD_CACHE:-$HOME/.cache/tripod}/target-cross" \
  CARGO_PROFILE_DEV_DEBUG=0 cargo build --locked --target x86_64-pc-windows-gnu -p tripod --bin tripod >&2)
bk="$(bash "$here/buildkit.sh" windows)"
mkdir -p "$out"
cp "${TRIPOD_CACHE:-$HOME/.cache/tripod}/target-cross/x86_64-pc-windows-gnu/debug/tripod.exe" "$out/"
cp "$bk/buildkitd.exe" "$bk/buildctl.exe" "$out/"
x86_64-w64-mingw32-gcc -shared -O2 -s -o "$out/bcryptprimitives.dll" "$repo/.ci/wine-shim/bcryptprimitives.c" -ladvapi32
echo "$src_hash" > "$out/.stamp"
echo "$out"
