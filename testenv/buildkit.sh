#!/usr/bin/env bash
# Builds BuildKit's daemon and client from the Go module into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/buildkit/<version>/bin
# and prints that directory. A second run finds the binaries and returns at
# once.
#
#   buildkitd, buildctl    github.com/moby/buildkit
#
# `buildkit.sh windows` builds buildkitd.exe and buildctl.exe (GOOS=windows,
# for Dockerfile.windows) into .../<version>/windows-amd64 instead and
# prints that directory.
#
# buildkitd runs here with its OCI worker, which executes RUN steps with the
# runc that testenv/node.sh builds (the same runc the real node uses).
set -euo pipefail
BUILDKIT_VERSION="${BUILDKIT_VERSION:-v0.34.2}"
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/buildkit/$BUILDKIT_VERSION"
bin="$cache/bin"
goos=linux
goarch="$(go env GOHOSTARCH 2>/dev/null || echo amd64)"
exe=""
if [ "${1:-}" = windows ]; then
  bin="$cache/windows-amd64"; goos=windows; goarch=amd64; exe=".exe"
fi
stamp="$bin.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && [ -f "$bin/buildkitd$exe" ] && [ -f "$bin/buildctl$exe" ]; then
  echo "$bin"; exit 0
fi
command -v go >/dev/null || { echo "buildkit.sh: Go is required" >&2; exit 1; }
start=$(date +%s)
rm -rf "$bin.tmp"; mkdir -p "$bin.tmp"
export GOFLAGS=-mod=mod
PKG=github.com/moby/buildkit
echo "buildkit.sh: building buildkitd and buildctl $BUILDKIT_VERSION for $goos (first time only, ~5 min)" >&2
# BuildKit's go.mod has exclude directives, which `go install pkg@version`
# refuses: build from a copy of the module, as the main module.
src="$cache/src-$goos"
rm -rf "$src"
moddir="$(go mod download -json "$PKG@$BUILDKIT_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
[ -n "$moddir" ] && [ -d "$moddir" ] || {
  echo "buildkit.sh: go mod download $PKG@$BUILDKIT_VERSION failed:" >&2
  go mod download -json "$PKG@$BUILDKIT_VERSION" >&2 || true
  exit 1; }
cp -r "$moddir" "$src"
chmod -R u+w "$src"
(cd "$src" && CGO_ENABLED=0 GOOS=$goos GOARCH=$goarch go build -trimpath -tags "osusergo netgo static_build" \
  -ldflags "-s -w -X $PKG/version.Version=$BUILDKIT_VERSION -X $PKG/version.Revision=module-proxy -X $PKG/version.Package=$PKG" \
  -o "$bin.tmp/" ./cmd/buildkitd ./cmd/buildctl) >&2
rm -rf "$src"
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "$want" > "$stamp"
echo "buildkit.sh: built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
