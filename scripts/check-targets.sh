#!/usr/bin/env bash
# Builds Tripod for the targets it cannot run on here:
#
# x86_64-pc-windows-gnu (Windows build Pods and runners): `tripod.exe` is
# compiled and linked with Debian's mingw-w64, then run under Debian's
# wine64: `--version`, `agent --help` and `buildd --help` must work. Wine 8
# lacks bcryptprimitives.dll (Rust's std imports ProcessPrng from it): a
# stand-in built from .ci/wine-shim is put next to the binary for Wine only.
#
# aarch64-apple-darwin (macOS runners): type-checked. `cargo check` compiles the Rust code
# for the target without linking; the only C it needs is ring's, which its
# build script compiles with clang against a few stand-in headers of
# Apple's SDK (.ci/apple-sdk-shim: TargetConditionals.h, assert.h,
# string.h), since Apple's SDK is not available here. The objects are never
# linked. Installs clang and the Rust target when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need=()
command -v clang >/dev/null || need+=(clang)
command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
[ -x /usr/lib/wine/wine64 ] || need+=(wine64)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> apt-get install ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

rustup target list --installed | grep -qx x86_64-pc-windows-gnu \
  || rustup target add x86_64-pc-windows-gnu
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CC_x86_64_pc_windows_gnu=x86_64-w64-mingw32-gcc
echo "==> cargo build --release --target x86_64-pc-windows-gnu (tripod.exe)" >&2
CARGO_TARGET_DIR="$HOME/.cache/tripod/target-cross" \
  cargo build --locked --release --target x86_64-pc-windows-gnu -p tripod --bin tripod
exe="$HOME/.cache/tripod/target-cross/x86_64-pc-windows-gnu/release/tripod.exe"
wdir="$(mktemp -d)"
trap 'rm -rf "$wdir"' EXIT
cp "$exe" "$wdir/tripod.exe"
x86_64-w64-mingw32-gcc -shared -O2 -s -o "$wdir/bcryptprimitives.dll" .ci/wine-shim/bcryptprimitives.c -ladvapi32
export WINEPREFIX="$wdir/prefix" WINEDEBUG=-all
wine() { (cd "$wdir" && timeout 300 /usr/lib/wine/wine64 ./tripod.exe "$@"); }
echo "==> wine64 tripod.exe --version / agent --help / buildd --help" >&2
version="$(wine --version)"
[ "$version" = "tripod $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] \
  || { echo "tripod.exe --version printed: $version" >&2; exit 1; }
wine agent --help | grep -q -- "--runner" || { echo "tripod.exe agent --help lacks --runner" >&2; exit 1; }
wine buildd --help | grep -q "npipe:////./pipe/buildkitd" \
  || { echo "tripod.exe buildd --help lacks the Windows buildkitd default" >&2; exit 1; }
echo "$version runs under $(/usr/lib/wine/wine64 --version)" >&2
rustup target list --installed | grep -qx aarch64-apple-darwin \
  || rustup target add aarch64-apple-darwin
resource="$(clang -print-resource-dir)"
export CC_aarch64_apple_darwin=clang
export CFLAGS_aarch64_apple_darwin="-ffreestanding -nostdinc -isystem $resource/include -I$PWD/.ci/apple-sdk-shim"
export CARGO_TARGET_DIR="$HOME/.cache/tripod/target-cross"
echo "==> cargo check --target aarch64-apple-darwin" >&2
cargo check --locked --target aarch64-apple-darwin -p tripod --lib --bins
