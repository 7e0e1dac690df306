#!/usr/bin/env bash
# Builds Tripod for the targets it cannot run on here:
#
# x86_64-pc-windows-gnu (Windows build Pods and runners): `tripod.exe` is
# compiled and linked with Debian's mingw-w64 (testenv/windows-exe.sh, with
# BuildKit's Windows binaries), then run under Debian's wine64:
# `--version`, `agent --help` and `buildd --help` must work. (A build
# through tripod.exe under Wine runs in the tests: tests/windows_exe.rs.)
#
# aarch64-apple-darwin (macOS runners): type-checked. `cargo check` compiles the Rust code
# for the target without linking; the only C it needs is ring's, which its
# build script compiles with clang against a few stand-in headers of
# Apple's SDK (.ci/apple-sdk-shim: TargetConditionals.h, assert.h,
# string.h), since Apple's SDK is not available here. The objects are never
# linked. Installs clang and the Rust target when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v clang >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang; }

echo "==> tripod.exe, buildkitd.exe, buildctl.exe (bash testenv/windows-exe.sh)" >&2
dir="$(bash testenv/windows-exe.sh)"
wdir="$(mktemp -d)"
trap '/usr/lib/wine/wineserver -k 2>/dev/null || true; rm -rf "$wdir"' EXIT
bash testenv/windows-exe.sh prefix "$wdir/prefix" >/dev/null
mkdir -p "$wdir/tmp"
export WINEPREFIX="$wdir/prefix" WINEDEBUG=-all TMPDIR="$wdir/tmp"
wine() { (cd "$dir" && timeout 300 /usr/lib/wine/wine64 "$@"); }
echo "==> wine64 tripod.exe --version / agent --help / buildd --help, buildctl.exe --version" >&2
version="$(wine ./tripod.exe --version)"
[ "$version" = "tripod $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] \
  || { echo "tripod.exe --version printed: $version" >&2; exit 1; }
wine ./tripod.exe agent --help | grep -q -- "--runner" || { echo "tripod.exe agent --help lacks --runner" >&2; exit 1; }
wine ./tripod.exe buildd --help | grep -q "npipe:////./pipe/buildkitd" \
  || { echo "tripod.exe buildd --help lacks the Windows buildkitd default" >&2; exit 1; }
wine ./buildctl.exe --version | grep -q "buildctl github.com/moby/buildkit" \
  || { echo "buildctl.exe --version failed" >&2; exit 1; }
echo "$version runs under $(/usr/lib/wine/wine64 --version)" >&2

rustup target list --installed | grep -qx aarch64-apple-darwin \
  || rustup target add aarch64-apple-darwin
resource="$(clang -print-resource-dir)"
export CC_aarch64_apple_darwin=clang
export CFLAGS_aarch64_apple_darwin="-ffreestanding -nostdinc -isystem $resource/include -I$PWD/.ci/apple-sdk-shim"
export CARGO_TARGET_DIR="$HOME/.cache/tripod/target-cross"
echo "==> cargo check --target aarch64-apple-darwin" >&2
cargo check --locked --target aarch64-apple-darwin -p tripod --lib --bins
