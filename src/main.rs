//! The `tripod` binary: a thin shell around the library.
#![forbid(unsafe_code)]

use clap::Parser;

/// jemalloc on Linux: it returns what bursts of reconciles and re-lists
/// freed, where glibc's malloc kept it (with 3,000 builds the controller's
/// RSS is a third lower; docs/benchmarks.md, memory).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tripod::cli::run(tripod::cli::Cli::parse())
}
