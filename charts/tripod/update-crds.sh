#!/usr/bin/env bash
# Regenerates templates/crds.yaml: the output of `tripod crds` (crds/tripod.yaml)
# with `helm.sh/resource-policy: keep` on every CRD, so `helm upgrade` updates
# the CRDs and `helm uninstall` keeps them (and every ImageBuild).
# Usage: charts/tripod/update-crds.sh [--from-file]   (default: cargo run -q -- crds)
set -euo pipefail
chart="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$chart/../.." && pwd)"
if [ "${1:-}" = "--from-file" ]; then
  src="$(cat "$root/crds/tripod.yaml")"
else
  src="$(cd "$root" && cargo run -q -- crds)"
fi
printf '%s\n' "$src" | awk '
  { print }
  /^metadata:$/ { print "  annotations:"; print "    helm.sh/resource-policy: keep" }
' > "$chart/templates/crds.yaml.tmp"
mv "$chart/templates/crds.yaml.tmp" "$chart/templates/crds.yaml"
echo "wrote $chart/templates/crds.yaml" >&2
