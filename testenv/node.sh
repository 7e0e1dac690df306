#!/usr/bin/env bash
# Builds what a real Linux node and the simulated nodes need, from their Go
# modules, into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/node/<key>/bin
# and prints that directory. A second run finds the binaries and returns at
# once.
#
#   containerd, ctr, containerd-shim-runc-v2   github.com/containerd/containerd/v2
#   runc (with seccomp; needs libseccomp-dev)   github.com/opencontainers/runc
#   kwok                                        sigs.k8s.io/kwok (+ kwokctl's
#                                               default stage files in ../stages.yaml)
#
# The kubelet comes from testenv/build.sh (same Kubernetes modules as the
# control plane). The CNI plugins are Debian's containernetworking-plugins.
set -euo pipefail
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
RUNC_VERSION="${RUNC_VERSION:-v1.5.3}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
key="containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION-kwok-$KWOK_VERSION"
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/node/$key"
bin="$cache/bin"
stamp="$cache/.stamp"
want="$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  ok=1
  for b in containerd ctr containerd-shim-runc-v2 runc kwok; do
    [ -x "$bin/$b" ] || ok=0
  done
  [ -f "$cache/stages.yaml" ] || ok=0
  [ $ok = 1 ] && { echo "$bin"; exit 0; }
fi
command -v go >/dev/null || { echo "node.sh: Go is required" >&2; exit 1; }
[ -f /usr/include/seccomp.h ] || {
  echo "node.sh: runc needs libseccomp-dev and pkg-config (apt-get install libseccomp-dev pkg-config)" >&2; exit 1; }
start=$(date +%s)
rm -rf "$bin.tmp"; mkdir -p "$bin.tmp"
export GOBIN="$bin.tmp" GOFLAGS=-mod=mod

step() { echo "node.sh: $* (+$(( $(date +%s) - start ))s)" >&2; }

PKG=github.com/containerd/containerd/v2
ldf="-s -w -X $PKG/version.Version=$CONTAINERD_VERSION -X $PKG/version.Revision=module-proxy -X $PKG/version.Package=$PKG"
step "building containerd $CONTAINERD_VERSION (first time only, ~2 min)"
CGO_ENABLED=0 go install -trimpath -tags urfave_cli_no_docs -ldflags "$ldf" \
  "$PKG/cmd/containerd@$CONTAINERD_VERSION" "$PKG/cmd/ctr@$CONTAINERD_VERSION" >&2
CGO_ENABLED=0 go install -trimpath -tags "urfave_cli_no_docs no_grpc" -ldflags "$ldf" \
  "$PKG/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" >&2

step "building runc $RUNC_VERSION (user namespaces need runc >= 1.2)"
CGO_ENABLED=1 go install -trimpath -tags "seccomp urfave_cli_no_docs" \
  -ldflags "-s -w -X main.version=${RUNC_VERSION#v} -X main.gitCommit=module-proxy" \
  "github.com/opencontainers/runc@$RUNC_VERSION" >&2

step "building kwok $KWOK_VERSION (first time only, ~1 min)"
CGO_ENABLED=0 go install -trimpath \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
  "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
# kwok run standalone has no stages built in: kwokctl's defaults, from the
# same module.
moddir="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
stages=""
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
         pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  [ -f "$moddir/kustomize/stage/$f" ] || { echo "node.sh: kwok module lacks kustomize/stage/$f" >&2; exit 1; }
  stages+="$(cat "$moddir/kustomize/stage/$f")"$'\n---\n'
done
printf '%s' "$stages" > "$cache/stages.yaml.tmp"

rm -rf "$bin"; mv "$bin.tmp" "$bin"
mv "$cache/stages.yaml.tmp" "$cache/stages.yaml"
echo "$want" > "$stamp"
step "built"
echo "$bin"
