#!/usr/bin/env bash
# Runs every Tripod test: unit tests, the CRD drift test, buildd with
# buildah and with a real BuildKit daemon, tripod.exe under Wine, the
# end-to-end tests against a real control plane and a real node (kubelet,
# containerd, runc; built once from their Go modules into ~/.cache/tripod)
# running the Dockerfile's buildd image, kwok's simulated nodes, and the
# Dockerfile built with buildah (tests/image.rs). Installs what it needs. Needs root (the real
# node: containerd, a bridge, iptables).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tripod/target}"

need_apt=()
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v git >/dev/null || need_apt+=(git)
command -v buildah >/dev/null || need_apt+=(buildah)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v htpasswd >/dev/null || need_apt+=(apache2-utils)
command -v lua5.4 >/dev/null || need_apt+=(lua5.4)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v curl >/dev/null || need_apt+=(curl)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v gcc >/dev/null || need_apt+=(gcc)
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
[ -f /usr/include/seccomp.h ] || need_apt+=(libseccomp-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v capsh >/dev/null || [ -x /usr/sbin/capsh ] || need_apt+=(libcap2-bin)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing packages: ${need_apt[*]} (install them with apt-get)" >&2; exit 1
  fi
fi
command -v go >/dev/null || { echo "Go (1.26 or newer) is required to build the control plane" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required" >&2; exit 1; }

started=$(date +%s)
# Seconds since the start on each step: what a cold machine spends where.
step() { echo "==> $* (+$(( $(date +%s) - started ))s)" >&2; }
# Everything below prints its progress while it compiles, and takes seconds
# once cached under ~/.cache/tripod.
step "Kubernetes control plane and kubelet (~7 minutes the first time)"
bash testenv/build.sh >/dev/null
step "containerd, runc, kwok (~3 minutes the first time)"
bash testenv/node.sh >/dev/null
# helm, for the chart tests: also built once from the Go modules.
bash testenv/helm.sh >/dev/null
# crane, the independent registry client the index tests read with.
bash testenv/crane.sh >/dev/null
step "CoreDNS (~2 minutes the first time)"
bash testenv/coredns.sh >/dev/null
step "Flux kustomize-controller (~3 minutes the first time)"
bash testenv/flux.sh >/dev/null
step "BuildKit: buildkitd and buildctl (~2 minutes the first time)"
bash testenv/buildkit.sh >/dev/null
# tripod.exe and BuildKit's Windows binaries, run under Wine by
# tests/windows_exe.rs (mingw-w64 and wine64 from apt).
step "tripod.exe, buildkitd.exe, buildctl.exe (~6 minutes the first time)"
bash testenv/windows-exe.sh >/dev/null
# The Dockerfile's base images, seeded into a local registry (tests/image.rs):
# debootstrap and this machine's Rust toolchain, ~3 minutes the first time.
step "Dockerfile base images (~1 minute the first time)"
bash testenv/base-images.sh >/dev/null
# The images build Pods run: the Dockerfile's buildd target (a release build
# of Tripod inside it, ~6 minutes the first time, 1-3 after a source change).
step "buildd, pause and busybox images"
bash testenv/images.sh build

step "cargo build --workspace --bins (the tests run tripod and tripod-dev)"
cargo build --locked --workspace --bins
step "cargo test"
baseline="$(mktemp)"
bash testenv/check-clean.sh --sysctls "$baseline"
cargo test --locked --workspace --all-targets -- --test-threads "${TRIPOD_TEST_THREADS:-4}"
# The real node of the tests tears itself down once the test process is
# gone: check that it left nothing behind.
step "nothing left on the machine"
bash testenv/check-clean.sh "$baseline"
rm -f "$baseline"
