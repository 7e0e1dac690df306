#!/usr/bin/env bash
# Pins another Kubernetes version: rewrites go.mod's require and the replace
# list of k8s.io staging modules (generated from the go.mod the module proxy
# serves for k8s.io/kubernetes), then tidies. Usage: testenv/update.sh v1.37.2
set -euo pipefail
kver="${1:?usage: $0 v1.MINOR.PATCH}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
sver="v0.${kver#v1.}"
mod="$(cd "$(mktemp -d)" && go mod download -json "k8s.io/kubernetes@$kver" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
etcd="$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[0-9.]*\).*#\1#p' "$mod" | head -1)"
for m in $(go list -m -f '{{.Path}}' all 2>/dev/null | grep '^k8s.io/' || true); do
  go mod edit -dropreplace="$m" 2>/dev/null || true
done
for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$mod"); do
  go mod edit -replace="$m=$m@$sver"
done
go mod edit -require="k8s.io/kubernetes@$kver" -require="go.etcd.io/etcd/server/v3@${etcd:-v3.7.0}"
GOFLAGS=-mod=mod go mod tidy
echo "pinned Kubernetes $kver (staging $sver, etcd ${etcd:-unchanged}); run testenv/build.sh"
