#!/usr/bin/env bash
# Builds CoreDNS (github.com/coredns/coredns) from the Go module proxy into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/tools/coredns-<version>/coredns
# once, and prints the binary's path. A second run finds it and returns at
# once. The harness runs it as the cluster DNS of the test cluster (the
# `kube-dns` Service): Pods of the Helm-installed controller and their build
# Pods resolve `<service>.<namespace>.svc` names with it. It has no upstream.
set -euo pipefail
version="${COREDNS_VERSION:-v1.15.0}"
dir="${TRIPOD_CACHE:-$HOME/.cache/tripod}/tools/coredns-$version"
stamp="$dir/.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -x "$dir/coredns" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$dir/coredns"; exit 0
fi
command -v go >/dev/null || { echo "coredns.sh: Go is required to build CoreDNS" >&2; exit 1; }
start=$(date +%s)
echo "building CoreDNS $version into $dir (first time only, ~2 minutes)" >&2
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
(
  cd "$dir.tmp"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  GOBIN="$dir.tmp" go install -trimpath -ldflags "-s -w" \
    "github.com/coredns/coredns@$version"
) >&2
"$dir.tmp/coredns" -version >&2
echo "$want" > "$dir.tmp/.stamp"
rm -rf "$dir"; mv "$dir.tmp" "$dir"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dir/coredns"
