#!/usr/bin/env bash
# Builds Flux's kustomize-controller (github.com/fluxcd/kustomize-controller)
# from the Go module proxy into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/tools/flux-<version>/
# once: the `kustomize-controller` binary and, in crds/, the CRDs it needs
# (Kustomization from its module; ExternalArtifact and the other source kinds
# it watches from source-controller's module of the same release). Prints the directory. A second run finds it
# and returns at once. The tests run it against the test cluster to see
# Tripod's ImageBuilds through Flux's health checks; the product never uses
# it.
#
# The module's go.mod replaces its api module with ./api, which the module
# archive does not hold (it is a module of its own), so `go install …@v`
# refuses it: the build runs in a copy with that replace dropped and the api
# module required at the same version. v1.10 needs Go 1.27; v1.9.6 builds
# with this machine's Go 1.26.
set -euo pipefail
version="${FLUX_KUSTOMIZE_VERSION:-v1.9.6}"
source_version="${FLUX_SOURCE_VERSION:-v1.9.0}"
dir="${TRIPOD_CACHE:-$HOME/.cache/tripod}/tools/flux-$version"
stamp="$dir/.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -x "$dir/kustomize-controller" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$dir"; exit 0
fi
command -v go >/dev/null || { echo "flux.sh: Go is required to build kustomize-controller" >&2; exit 1; }
start=$(date +%s)
echo "building Flux kustomize-controller $version into $dir (first time only, ~5 minutes)" >&2
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp/crds"
work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
moddir() { GOFLAGS=-mod=mod go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p'; }
(
  src="$(moddir "github.com/fluxcd/kustomize-controller@$version")"
  cp -r "$src/." "$work/kc"; chmod -R u+w "$work/kc"
  cp "$src/config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml" "$dir.tmp/crds/"
  sc="$(moddir "github.com/fluxcd/source-controller@$source_version")"
  # It watches every source kind, so all of source-controller's CRDs.
  cp "$sc"/config/crd/bases/source.toolkit.fluxcd.io_*.yaml "$dir.tmp/crds/"
  cd "$work/kc"
  go mod edit -dropreplace github.com/fluxcd/kustomize-controller/api
  go mod edit -require "github.com/fluxcd/kustomize-controller/api@$version"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  go mod tidy
  nice go build -trimpath -ldflags "-s -w" -o "$dir.tmp/kustomize-controller" .
) >&2
echo "$want" > "$dir.tmp/.stamp"
rm -rf "$dir"; mv "$dir.tmp" "$dir"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dir"
