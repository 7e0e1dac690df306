#!/usr/bin/env bash
# A flat apt repository (Packages and the .deb files) of jq and the
# libraries it needs, downloaded from this machine's Debian bookworm
# sources once and cached under ~/.cache/tripod/jq-repo, for the Debian
# build of the end-to-end bench (build Pods cannot reach the internet).
# Prints its directory.
set -euo pipefail
dir="$HOME/.cache/tripod/jq-repo"
if [ ! -s "$dir/Packages" ]; then
  if ! command -v dpkg-scanpackages >/dev/null; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >&2
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  cd "$tmp"
  if ! apt-get download jq libjq1 libonig5 >&2; then
    apt-get update -qq >&2
    apt-get download jq libjq1 libonig5 >&2
  fi
  dpkg-scanpackages --multiversion . /dev/null > Packages 2>/dev/null
  rm -rf "$dir" && mkdir -p "$(dirname "$dir")" && cp -r "$tmp" "$dir"
fi
echo "$dir"
