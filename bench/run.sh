#!/usr/bin/env bash
# Tripod's benchmarks: runs them and writes docs/benchmarks.md with its
# plots (docs/bench/*.png) and the results they come from (docs/bench/*.json).
#
#   bash bench/run.sh                 the full run (release builds): 2,000
#                                     ImageBuilds, 400 at 20/s, 10 minutes of
#                                     steady state, 10,000 builds for memory
#                                     (about 40 minutes on 2 cores)
#   bash bench/run.sh --before REV    also measures the controller of git
#                                     revision REV the same way first (built
#                                     in a worktree under ~/.cache/tripod),
#                                     for the page's before/after columns
#   bash bench/run.sh --small         what CI runs so the bench cannot rot:
#                                     200 builds, 60 s of steady state, 1,000
#                                     for memory, the debug build; the page
#                                     goes to $CARGO_TARGET_DIR/bench-small/
#
# No root needed: the scale bench runs the control plane, a registry and kwok
# on loopback (no real node).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tripod/target}"
small=0
before=""
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=1 ;;
    --before) before="$2"; shift ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
step() { echo "==> bench: $*" >&2; }

font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [ ! -f "$font" ]; then
  step "installing fonts-dejavu-core (the plots' font)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >&2
fi
bash testenv/build.sh >/dev/null
bash testenv/node.sh >/dev/null

if [ "$small" = 1 ]; then
  step "building tripod and tripod-bench (debug)"
  cargo build --locked -q -p tripod --bin tripod
  cargo build --locked -q -p tripod-bench
  bin="$CARGO_TARGET_DIR/debug"
  out="$CARGO_TARGET_DIR/bench-small"
  mkdir -p "$out"
  step "scale, small (about 6 minutes)"
  "$bin/tripod-bench" scale --n 200 --latency-builds 100 --steady-seconds 60 \
    --memory-builds 1000 --tripod "$bin/tripod" --label small \
    --dir "${TMPDIR:-/tmp}/tripod-bench-small" --out "$out/scale.json"
  "$bin/tripod-bench" report --scale "$out/scale.json" --out "$out/benchmarks.md" --font "$font"
  step "wrote $out/benchmarks.md"
  exit 0
fi

step "building tripod and tripod-bench (release; the first time takes several minutes)"
cargo build --locked --release -p tripod --bin tripod
cargo build --locked --release -p tripod-bench
bin="$CARGO_TARGET_DIR/release"
full=(--n 2000 --latency-builds 400 --steady-seconds 600 --memory-builds 10000)
before_args=()
if [ -n "$before" ]; then
  wt="$HOME/.cache/tripod/bench-before"
  step "building the controller of $before (release, in $wt)"
  git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
  git worktree add --detach "$wt" "$before" >&2
  (cd "$wt" && CARGO_TARGET_DIR="$HOME/.cache/tripod/target-before" cargo build --release -q --bin tripod)
  step "scale, the controller of $before"
  "$bin/tripod-bench" scale "${full[@]}" --tripod "$HOME/.cache/tripod/target-before/release/tripod" \
    --label "before ($(git rev-parse --short "$before"))" --out docs/bench/scale-before.json
  git worktree remove --force "$wt"
fi
[ -f docs/bench/scale-before.json ] && before_args=(--before docs/bench/scale-before.json)
step "scale (release)"
"$bin/tripod-bench" scale "${full[@]}" --tripod "$bin/tripod" \
  --label "after ($(git rev-parse --short HEAD))" --out docs/bench/scale.json
"$bin/tripod-bench" report --scale docs/bench/scale.json "${before_args[@]}" --font "$font"
step "wrote docs/benchmarks.md"
