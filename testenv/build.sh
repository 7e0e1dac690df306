#!/usr/bin/env bash
# Compiles the Kubernetes binaries Tripod's tests and `tripod dev` use
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, and
# the real node's kubelet and kube-proxy)
# from the Go modules pinned in this directory, into
#   ${TRIPOD_CACHE:-~/.cache/tripod}/testenv/<k8s version>/bin
# A second run finds the binaries and returns at once. Prints the bin dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kver="$(sed -n 's#^[[:space:]]*k8s.io/kubernetes \(v[0-9.]*\).*#\1#p' "$here/go.mod" | head -1)"
[ -n "$kver" ] || { echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
cache="${TRIPOD_CACHE:-$HOME/.cache/tripod}/testenv/$kver"
bin="$cache/bin"
stamp="$cache/.stamp"
want="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    [ -x "$bin/$b" ] || { rm -f "$stamp"; break; }
  done
  [ -f "$stamp" ] && { echo "$bin"; exit 0; }
fi
command -v go >/dev/null || { echo "build.sh: Go is required to build the control plane" >&2; exit 1; }
mkdir -p "$bin.tmp"
minor="${kver#v1.}"; minor="${minor%%.*}"
V=k8s.io/component-base/version
ldf="-s -w -X $V.gitVersion=$kver -X $V.gitMajor=1 -X $V.gitMinor=$minor -X $V.gitTreeState=clean"
start=$(date +%s)
echo "building Kubernetes $kver (control plane, kubelet, kube-proxy) into $bin (first time only, ~7 minutes on 2 cores)" >&2
(
  cd "$here"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  go build -p "$(nproc)" -trimpath -ldflags "$ldf" -o "$bin.tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  go build -trimpath -ldflags "-s -w" -o "$bin.tmp/etcd" go.etcd.io/etcd/server/v3
) >&2
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "$want" > "$stamp"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
