#!/usr/bin/env bash
# Runs every Tripod test: unit tests, the CRD drift test, the end-to-end
# tests against a real control plane (built once from the Kubernetes Go
# modules into ~/.cache/tripod/testenv) and the Dockerfile built with buildah
# (tests/image.rs). Installs what it needs.
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
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing packages: ${need_apt[*]} (install them with apt-get)" >&2; exit 1
  fi
fi
command -v go >/dev/null || { echo "Go (1.26 or newer) is required to build the control plane" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required" >&2; exit 1; }

# The control plane: seconds when cached, ~15 minutes the first time.
bash testenv/build.sh >/dev/null
# helm, for the chart tests: also built once from the Go modules.
bash testenv/helm.sh >/dev/null
# The Dockerfile's base images, seeded into a local registry (tests/image.rs):
# debootstrap and this machine's Rust toolchain, ~3 minutes the first time.
bash testenv/base-images.sh >/dev/null

cargo test --locked --all-targets -- --test-threads "${TRIPOD_TEST_THREADS:-4}"
