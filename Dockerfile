# Tripod's Linux images, built natively for the architecture of the machine
# that builds them (amd64 or arm64):
#
#   buildah bud --target controller -t ghcr.io/tripod-build/tripod:<version> .
#       The controller: one static `tripod` binary, CA certificates and a
#       passwd entry, nothing else. Runs as 65532:65532.
#   buildah bud --target buildd -t ghcr.io/tripod-build/tripod-buildd:<version> .
#       The build Pods' image (both the `agent` and the `buildd` container):
#       Debian slim with buildah (chroot isolation, vfs storage) and git.
#
# Without --target the controller image is built (it is the last stage).
# Base images are build arguments; a registry mirror in registries.conf works
# as well (this is how CI builds the file without reaching Docker Hub).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# --- the static binary ------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# glibc, statically linked: no loader and no shared libraries at run time.
# (Name resolution uses glibc's built-in files and dns sources.) The Linux
# binary allocates with jemalloc (src/main.rs), whose build needs `make`.
# jemalloc takes the page size of the machine it is built on; arm64 kernels
# run with 4, 16 or 64 KiB pages, so on arm64 it is built for 64 KiB, which
# works on all three.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# Dependencies first, in a layer of their own: it is rebuilt only when the
# manifest, the lock file, the build script or the protocol files change.
# The workspace's other members (the test harness, tripod-harness, and the
# benchmarks, tripod-bench) are not built; cargo only needs their
# manifests, so they get empty sources.
COPY Cargo.toml Cargo.lock build.rs ./
COPY harness/Cargo.toml harness/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
COPY proto proto
RUN mkdir -p src harness/src/bin bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && : > harness/src/lib.rs \
 && echo 'fn main() {}' > harness/src/bin/tripod-dev.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && if [ "$(uname -m)" = aarch64 ]; then export JEMALLOC_SYS_WITH_LG_PAGE=16; fi \
 && cargo build --release --locked -p tripod --target "$(uname -m)-unknown-linux-gnu" \
 && rm -rf src

COPY src src
# touch: the copied sources may be older than the placeholder build above.
RUN touch src/main.rs src/lib.rs \
 && target="$(uname -m)-unknown-linux-gnu" \
 && if [ "$(uname -m)" = aarch64 ]; then export JEMALLOC_SYS_WITH_LG_PAGE=16; fi \
 && cargo build --release --locked -p tripod --target "$target" --bin tripod \
 && install -D -m 0755 "target/$target/release/tripod" /out/usr/local/bin/tripod \
 && /out/usr/local/bin/tripod --version

# The controller image's whole file system besides the binary.
RUN install -d -m 0755 /rootfs/etc/ssl/certs \
 && install -m 0644 /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' > /rootfs/etc/passwd \
 && echo 'nonroot:x:65532:' > /rootfs/etc/group

# --- build Pods: agent and buildd -------------------------------------------
FROM ${BASE_IMAGE} AS buildd
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      buildah ca-certificates git \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# buildd passes --isolation chroot and its storage driver itself (overlay
# when it may mount it, else vfs; its log says which). These make a
# `buildah` typed into the container use vfs, which works on any file
# system; add `--storage-driver overlay` when buildd's log says overlay.
RUN mkdir -p /etc/containers \
 && printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
      > /etc/containers/storage.conf
COPY --from=build /out/ /
ENV BUILDAH_ISOLATION=chroot
ENTRYPOINT ["/usr/local/bin/tripod"]
CMD ["buildd"]

# --- controller (default target) --------------------------------------------
FROM scratch AS controller
COPY --from=build /rootfs/ /
COPY --from=build /out/ /
ENV PATH=/usr/local/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tripod"]
CMD ["controller"]
