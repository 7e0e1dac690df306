#!/usr/bin/env bash
# Times the hello build through Tripod (a rebuild of examples/hello.yaml in
# the `tripod dev` environment: annotate → Succeeded with a new build ID)
# next to a direct `buildah bud` + `buildah push` of the same context on the
# same machine, N times each, and the build Pod's start latency on the real
# node (Pod created → agent container running, polled every 0.1 s). Prints a
# Markdown table. Usage:
#   bench/hello.sh [N]      (needs `tripod dev up` running in .tripod/dev)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-5}"
dir="${TRIPOD_DEV_DIR:-.tripod/dev}"
# shellcheck disable=SC1091
. "$dir/env"
ms() { date +%s%3N; }

through_tripod=()
pod_start=()
for i in $(seq "$n"); do
  before=$(kubectl get ib hello -o jsonpath='{.status.buildID}')
  t0=$(ms)
  kubectl annotate --overwrite ib hello "build.tripod.dev/rebuild=bench-$t0-$i" >/dev/null
  created=""; started=""
  while :; do
    read -r id phase < <(kubectl get ib hello -o jsonpath='{.status.buildID} {.status.phase}{"\n"}') || true
    if [ "$id" != "$before" ] && [ -n "$id" ] && [ -z "$started" ]; then
      state=$(kubectl get pods -l "build.tripod.dev/build-id=$id" \
        -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="agent")].state}' 2>/dev/null || true)
      [ -z "$created" ] && kubectl get pods -l "build.tripod.dev/build-id=$id" -o name 2>/dev/null | grep -q . && created=$(ms)
      case "$state" in *running*|*terminated*) [ -n "$created" ] && started=$(ms) ;; esac
    fi
    if [ "$id" != "$before" ] && [ "$phase" = Succeeded ]; then break; fi
    if [ "$id" != "$before" ] && [ "$phase" = Failed ]; then echo "build failed" >&2; exit 1; fi
    sleep 0.1
  done
  through_tripod+=($(( $(ms) - t0 )))
  [ -n "$started" ] && pod_start+=($(( started - created )))
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ctx"
printf 'FROM scratch\nCOPY hello.txt /hello.txt\n' > "$work/ctx/Dockerfile"
printf 'Hello from Tripod\n' > "$work/ctx/hello.txt"
direct=()
for i in $(seq "$n"); do
  t0=$(ms)
  buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs \
    bud --isolation chroot --layers -t "$TRIPOD_REGISTRY/bench/direct:$i" "$work/ctx" >/dev/null
  buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs \
    push --tls-verify=false --digestfile "$work/digest" "$TRIPOD_REGISTRY/bench/direct:$i" \
    "docker://$TRIPOD_REGISTRY/bench/direct:$i" >/dev/null 2>&1
  direct+=($(( $(ms) - t0 )))
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| path | runs (ms) | median (ms) |"
echo "|---|---|---|"
echo "| through Tripod (annotate → Succeeded, registry-verified) | ${through_tripod[*]} | $(median "${through_tripod[@]}") |"
echo "| direct buildah bud + push | ${direct[*]} | $(median "${direct[@]}") |"
if [ ${#pod_start[@]} -gt 0 ]; then
  echo "| build Pod start on the real node (Pod seen → agent running) | ${pod_start[*]} | $(median "${pod_start[@]}") |"
fi
