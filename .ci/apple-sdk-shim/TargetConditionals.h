/* The one header of Apple's SDK that ring's C sources include on macOS,
 * for `cargo check --target aarch64-apple-darwin` on Linux (.ci/run). The
 * objects compiled with it are never linked: check only type-checks Rust. */
#ifndef TRIPOD_TARGET_CONDITIONALS_SHIM
#define TRIPOD_TARGET_CONDITIONALS_SHIM
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_SIMULATOR 0
#define TARGET_OS_EMBEDDED 0
#endif
