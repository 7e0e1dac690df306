#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS each
# (default 30) from the committed corpus (fuzz/corpus/<target>), and fails on
# the first crash. New inputs go to a scratch copy, so the committed corpus
# only changes on purpose: `scripts/fuzz.sh --grow` writes them back.
# Installs cargo-fuzz (crates.io) and Rust nightly (rustup) when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${FUZZ_SECONDS:-30}"
grow=false
[ "${1:-}" = "--grow" ] && grow=true
tools="$HOME/.cache/tripod/tools/cargo-fuzz"
export PATH="$tools/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || {
  echo "==> rustup toolchain install nightly (once)" >&2
  rustup toolchain install nightly --profile minimal >&2
}
command -v cargo-fuzz >/dev/null || {
  echo "==> cargo install cargo-fuzz (once, ~2 minutes)" >&2
  cargo install --locked cargo-fuzz --root "$tools" >&2
}
# Its own target directory: nightly and sanitizer builds of the product.
export CARGO_TARGET_DIR="$HOME/.cache/tripod/fuzz-target"
cd fuzz
targets=$(cargo +nightly fuzz list)
echo "==> building fuzz targets (release, address sanitizer; dependencies not run by the targets unoptimised)" >&2
cargo +nightly fuzz build >&2
for t in $targets; do
  scratch=$(mktemp -d)
  mkdir -p "corpus/$t"
  echo "==> fuzz $t for ${seconds}s ($(ls "corpus/$t" | wc -l) corpus inputs)" >&2
  if ! cargo +nightly fuzz run "$t" "$scratch" "corpus/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 2>"$scratch.log"; then
    tail -40 "$scratch.log" >&2
    echo "fuzz target $t failed: reproduce with the artifact above (fuzz/artifacts/$t)" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch.log" | tail -2 >&2 || true
  if $grow; then
    # libFuzzer keeps only inputs that reached new coverage.
    cp -n "$scratch"/* "corpus/$t/" 2>/dev/null || true
  fi
  rm -rf "$scratch" "$scratch.log"
done
echo "==> fuzzing done: $(echo $targets | wc -w) targets, ${seconds}s each, 0 crashes" >&2
