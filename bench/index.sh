#!/usr/bin/env bash
# The index step's overhead: examples/multi-os.yaml (linux/amd64 in a build
# Pod, linux/arm64 on an emulating runner, windows/amd64 through a runner's
# BuildKit, darwin/arm64 on a darwin test runner, joined into one index)
# next to each of its platforms built alone from the same spec (one
# platform, so no index: pushed under the tag), N rounds, in the
# `tripod dev` environment. Each build is started by a new rebuild
# annotation and timed from it to Succeeded (polled every 0.1 s); for the
# four-platform build also to the moment every platform had succeeded
# (the index is pushed after that). Prints a Markdown table. Usage:
#   bench/index.sh [N]      (needs `tripod dev up` running in .tripod/dev)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-5}"
dir="${TRIPOD_DEV_DIR:-.tripod/dev}"
# shellcheck disable=SC1091
. "$dir/env"
ms() { date +%s%3N; }
work=$(mktemp -d)
trap 'rm -rf "$work"; kubectl delete ib -l bench.tripod.dev/index=single --ignore-not-found >/dev/null' EXIT

# The example with the local registry, and one single-platform copy per
# platform (same Dockerfile, same build arguments, same executor).
sed "s/127.0.0.1:5000/$TRIPOD_REGISTRY/g" examples/multi-os.yaml > "$work/multi.yaml"
kubectl apply -f "$work/multi.yaml" >/dev/null
kubectl create --dry-run=client -o json -f "$work/multi.yaml" > "$work/multi.json"
platforms=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["spec"]["platforms"]))' "$work/multi.json")
for p in $platforms; do
  python3 - "$work/multi.json" "$p" > "$work/single-${p//\//-}.json" <<'PY'
import json, sys
doc, p = json.load(open(sys.argv[1])), sys.argv[2]
slug = p.replace("/", "-")
doc["metadata"] = {"name": f"bench-{slug}", "labels": {"bench.tripod.dev/index": "single"}}
spec = doc["spec"]
spec["platforms"] = [p]
spec["platformBuildArgs"] = [a for a in spec.get("platformBuildArgs", []) if a["platform"] == p]
spec["output"]["image"] = spec["output"]["image"].replace("/multi-os:", f"/bench-{slug}:")
spec["output"].pop("additionalTags", None)
ex = spec.get("executor", {})
ex["runnerPlatforms"] = [r for r in ex.get("runnerPlatforms", []) if r == p]
json.dump(doc, sys.stdout)
PY
  kubectl apply -f "$work/single-${p//\//-}.json" >/dev/null
done

# run NAME: prints the ms from a rebuild annotation to Succeeded, and to
# the moment every platform had succeeded.
run() {
  local name="$1" before t0 id phase oks
  before=$(kubectl get ib "$name" -o jsonpath='{.status.buildID}')
  t0=$(ms); all_ok_ms=""
  kubectl annotate --overwrite ib "$name" "build.tripod.dev/rebuild=bench-$t0" >/dev/null
  while :; do
    # buildID, phase, and whether every platform has succeeded.
    read -r id phase oks < <(kubectl get ib "$name" -o json | python3 -c '
import json, sys
s = json.load(sys.stdin).get("status", {})
ps = s.get("platforms", [])
ok = bool(ps) and all(p.get("phase") == "Succeeded" for p in ps)
print(s.get("buildID", "-"), s.get("phase", "-"), "yes" if ok else "no")') || true
    if [ "$id" != "$before" ] && [ "$id" != "-" ]; then
      if [ -z "$all_ok_ms" ] && [ "$oks" = yes ]; then
        all_ok_ms=$(( $(ms) - t0 ))
      fi
      [ "$phase" = Succeeded ] && break
      if [ "$phase" = Failed ]; then echo "$name failed" >&2; kubectl get ib "$name" -o yaml >&2; exit 1; fi
    fi
    sleep 0.1
  done
  echo "$(( $(ms) - t0 )) ${all_ok_ms:-0}"
}

# One warm-up round of each (bases pulled, caches warm), then N.
run multi-os >/dev/null
for p in $platforms; do run "bench-${p//\//-}" >/dev/null; done
declare -A single
multi=(); joined=()
for i in $(seq "$n"); do
  read -r t ok < <(run multi-os); multi+=("$t"); joined+=($(( t - ok )))
  for p in $platforms; do
    read -r t _ < <(run "bench-${p//\//-}")
    single[$p]="${single[$p]:-} $t"
  done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
slowest=0; slowest_p=""
echo "Machine: $(nproc) cores; $(tripod --version 2>/dev/null || true)"
echo
echo "| build | runs (ms) | median (ms) |"
echo "|---|---|---|"
for p in $platforms; do
  # shellcheck disable=SC2086
  m=$(median ${single[$p]})
  echo "| $p alone |${single[$p]} | $m |"
  if [ "$m" -gt "$slowest" ]; then slowest=$m; slowest_p=$p; fi
done
echo "| all four, one index | ${multi[*]} | $(median "${multi[@]}") |"
echo "| of which: last platform succeeded → index pushed, verified, Succeeded | ${joined[*]} | $(median "${joined[@]}") |"
echo
echo "Four platforms with their index vs the slowest platform alone ($slowest_p): $(median "${multi[@]}") ms vs $slowest ms."
