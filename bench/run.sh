#!/usr/bin/env bash
# Tripod's benchmarks: runs them and writes docs/benchmarks.md with its
# plots (docs/bench/*.png) and the results they come from (docs/bench/*.json).
#
#   bash bench/run.sh                 the full run (release builds): 2,000
#                                     ImageBuilds, 400 at 20/s, 10 minutes of
#                                     steady state, 10,000 builds for memory
#                                     (about 40 minutes on 2 cores)
#   bash bench/run.sh --before REV    also measures the controller of git
#                                     revision REV (built in a worktree under
#                                     ~/.cache/tripod) and the current one at
#                                     the small size, release builds, for the
#                                     page's before/after table
#   bash bench/run.sh --only e2e      only the end-to-end bench (5 runs), then
#                                     the page again from the last scale
#                                     results (--only scale: the opposite)
#   bash bench/run.sh --small         what CI runs so the bench cannot rot:
#                                     200 builds, 30 s of steady state, 1,000
#                                     for memory, one end-to-end run of each
#                                     build, the debug build; the page goes
#                                     to $CARGO_TARGET_DIR/bench-small/
#
# The scale bench needs no root: it runs the control plane, a registry and
# kwok on loopback (no real node). The end-to-end bench runs the real node
# (containerd, a bridge, iptables) and needs root; without it, it is skipped
# and the page says so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tripod/target}"
small=0
before=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=1 ;;
    --before) before="$2"; shift ;;
    --only) only="$2"; shift
      case "$only" in scale|e2e) ;; *) echo "bench/run.sh: --only scale or --only e2e" >&2; exit 2 ;; esac ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
started=$(date +%s)
step() { echo "==> bench: $* (+$(( $(date +%s) - started ))s)" >&2; }

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
  "$bin/tripod-bench" scale --n 200 --latency-builds 100 --steady-seconds 30 \
    --memory-builds 1000 --tripod "$bin/tripod" --label small \
    --dir "${TMPDIR:-/tmp}/tripod-bench-small" --out "$out/scale.json"
  if [ "$(id -u)" = 0 ]; then
    step "end to end on the real node, one run of each build (about 5 minutes)"
    "$bin/tripod-bench" e2e --runs 1 --tripod "$bin/tripod" --label small \
      --dir "${TMPDIR:-/tmp}/tripod-bench-e2e-small" --out "$out/e2e.json"
  else
    step "not root: the end-to-end bench is skipped"
    rm -f "$out/e2e.json"
  fi
  "$bin/tripod-bench" report --scale "$out/scale.json" --e2e "$out/e2e.json" \
    --out "$out/benchmarks.md" --font "$font"
  step "wrote $out/benchmarks.md"
  exit 0
fi

step "building tripod and tripod-bench (release; the first time takes several minutes)"
cargo build --locked --release -p tripod --bin tripod
cargo build --locked --release -p tripod-bench
bin="$CARGO_TARGET_DIR/release"
full=(--n 2000 --latency-builds 400 --steady-seconds 600 --memory-builds 10000)
small_size=(--n 200 --latency-builds 100 --steady-seconds 60 --memory-builds 1000)
before_args=()
if [ -n "$before" ] && [ "$only" != e2e ]; then
  wt="$HOME/.cache/tripod/bench-before"
  step "building the controller of $before (release, in $wt)"
  git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
  git worktree add --detach "$wt" "$before" >&2
  (cd "$wt" && CARGO_TARGET_DIR="$HOME/.cache/tripod/target-before" cargo build --release -q --bin tripod)
  # The controller before the optimisations lists Pods per reconcile: at
  # the full size it would take hours. Both sides of the comparison run at
  # the small size, one after the other.
  step "scale, small, the controller of $before"
  "$bin/tripod-bench" scale "${small_size[@]}" --tripod "$HOME/.cache/tripod/target-before/release/tripod" \
    --label "before ($(git rev-parse --short "$before"))" --out docs/bench/scale-before.json
  git worktree remove --force "$wt"
  step "scale, small, the current controller"
  "$bin/tripod-bench" scale "${small_size[@]}" --tripod "$bin/tripod" \
    --label "after ($(git rev-parse --short HEAD))" --out docs/bench/scale-after-small.json
fi
[ -f docs/bench/scale-before.json ] && before_args=(--before docs/bench/scale-before.json)
[ -f docs/bench/scale-after-small.json ] && before_args+=(--after docs/bench/scale-after-small.json)
if [ "$only" != e2e ]; then
  step "scale (release)"
  "$bin/tripod-bench" scale "${full[@]}" --tripod "$bin/tripod" \
    --label "after ($(git rev-parse --short HEAD))" --out docs/bench/scale.json
fi
if [ "$only" != scale ]; then
  if [ "$(id -u)" = 0 ]; then
    step "end to end on the real node, 5 runs of each build (about 20 minutes)"
    "$bin/tripod-bench" e2e --runs 5 --tripod "$bin/tripod" \
      --label "$(git rev-parse --short HEAD)" --out docs/bench/e2e.json
  else
    echo "bench/run.sh: the end-to-end bench needs root (the real node); docs/bench/e2e.json is kept as it was" >&2
  fi
fi
"$bin/tripod-bench" report --scale docs/bench/scale.json "${before_args[@]}" --font "$font"
step "wrote docs/benchmarks.md"
