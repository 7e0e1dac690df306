//! The `tripod` binary: a thin shell around the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    tripod::cli::run(tripod::cli::Cli::parse())
}
