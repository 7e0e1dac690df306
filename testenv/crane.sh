#!/usr/bin/env bash
# Builds crane (github.com/google/go-containerregistry) from the Go module
# proxy into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/tools/crane-<version>/crane
# once, and prints the binary's path. A second run finds it and returns at
# once. crane is the independent registry client the tests and
# `tripod dev up` read Tripod's image indexes with: it resolves an index
# entry per platform as container runtimes do. The product never uses it.
set -euo pipefail
version="${CRANE_VERSION:-v0.22.1}"
dir="${TRIPOD_CACHE:-$HOME/.cache/tripod}/tools/crane-$version"
stamp="$dir/.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -x "$dir/crane" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$dir/crane"; exit 0
fi
command -v go >/dev/null || { echo "crane.sh: Go is required to build crane" >&2; exit 1; }
start=$(date +%s)
echo "building crane $version into $dir (first time only)" >&2
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
(
  cd "$dir.tmp"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  GOBIN="$dir.tmp" go install -trimpath -ldflags "-s -w" \
    "github.com/google/go-containerregistry/cmd/crane@$version"
) >&2
"$dir.tmp/crane" version >&2
echo "$want" > "$dir.tmp/.stamp"
rm -rf "$dir"; mv "$dir.tmp" "$dir"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dir/crane"
