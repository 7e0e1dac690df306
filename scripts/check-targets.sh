#!/usr/bin/env bash
# Type-checks Tripod for the targets it cannot run on here:
# aarch64-apple-darwin (macOS runners). `cargo check` compiles the Rust code
# for the target without linking; the only C it needs is ring's, which its
# build script compiles with clang against a few stand-in headers of
# Apple's SDK (.ci/apple-sdk-shim: TargetConditionals.h, assert.h,
# string.h), since Apple's SDK is not available here. The objects are never
# linked. Installs clang and the Rust target when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v clang >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang; }
rustup target list --installed | grep -qx aarch64-apple-darwin \
  || rustup target add aarch64-apple-darwin
resource="$(clang -print-resource-dir)"
export CC_aarch64_apple_darwin=clang
export CFLAGS_aarch64_apple_darwin="-ffreestanding -nostdinc -isystem $resource/include -I$PWD/.ci/apple-sdk-shim"
export CARGO_TARGET_DIR="$HOME/.cache/tripod/target-cross"
echo "==> cargo check --target aarch64-apple-darwin" >&2
cargo check --locked --target aarch64-apple-darwin -p tripod --lib --bins
