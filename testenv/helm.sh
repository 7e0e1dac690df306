#!/usr/bin/env bash
# Builds helm from the Go module proxy into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/tools/helm-<version>/helm
# once, and prints the binary's path. A second run finds it and returns at once.
# The ldflags are those of helm's Makefile: the version, and the Kubernetes
# version (from helm's k8s.io/client-go, v0.X -> 1.X) that `helm lint` and
# `helm template` assume without a cluster (otherwise v1.20).
set -euo pipefail
version="${HELM_VERSION:-v3.22.0}"
major="${version%%.*}"                      # v3
dir="${TRIPOD_CACHE:-$HOME/.cache/tripod}/tools/helm-$version"
stamp="$dir/.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -x "$dir/helm" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$dir/helm"; exit 0
fi
command -v go >/dev/null || { echo "helm.sh: Go is required to build helm" >&2; exit 1; }
start=$(date +%s)
echo "building helm $version into $dir (first time only)" >&2
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
(
  cd "$dir.tmp"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  mod="helm.sh/helm/$major"
  go mod download "$mod@$version"
  gomod="$(go mod download -json "$mod@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
  cg="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -1)"
  [ -n "$cg" ] || { echo "helm.sh: no k8s.io/client-go version in $gomod" >&2; exit 1; }
  ldf="-s -w -X $mod/internal/version.version=$version -X $mod/internal/version.gitTreeState=clean"
  for p in pkg/lint/rules pkg/chartutil; do
    ldf="$ldf -X $mod/$p.k8sVersionMajor=1 -X $mod/$p.k8sVersionMinor=$cg"
  done
  GOBIN="$dir.tmp" go install -trimpath -ldflags "$ldf" "$mod/cmd/helm@$version"
) >&2
"$dir.tmp/helm" version --short >&2
echo "$want" > "$dir.tmp/.stamp"
rm -rf "$dir"; mv "$dir.tmp" "$dir"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dir/helm"
