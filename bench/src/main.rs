//! `tripod-bench`: Tripod's benchmarks. `bench/run.sh` runs them all and
//! writes `docs/benchmarks.md`; see `bench/README.md`.

#![forbid(unsafe_code)]

mod agent;
mod audit;
mod e2e;
mod e2e_report;
mod env;
mod report;
mod scale;
mod stats;

use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Errors of the benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The test environment failed.
    #[error("environment: {0}")]
    Env(#[from] tripod_harness::Error),
    /// A Kubernetes request failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A file or process operation failed.
    #[error("{0}")]
    Io(String),
    /// A benchmark could not measure what it measures.
    #[error("{0}")]
    Bench(String),
}

/// Where a run happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Online CPUs.
    pub cores: usize,
    /// `MemTotal`, GiB.
    pub memory_gib: f64,
    /// Kubernetes (control plane, kubelet).
    pub kubernetes: String,
    /// Tripod's version and build profile of the bench.
    pub tripod: String,
    /// When (UTC, RFC 3339).
    pub date: String,
}

impl Machine {
    fn read() -> Machine {
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kubernetes: tripod_harness::KUBERNETES_VERSION.to_string(),
            tripod: format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                }
            ),
            date,
        }
    }
}

#[derive(Parser)]
#[command(name = "tripod-bench", about = "Tripod's benchmarks")]
struct Cli {
    /// The Tripod source tree.
    #[arg(long, default_value = ".", global = true)]
    source_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Scale on kwok's simulated nodes: throughput against bare Pods,
    /// create-to-Pod latency, API writes per build and in steady state,
    /// controller memory.
    Scale(scale::ScaleArgs),
    /// The overhead of a build through Tripod on the real node, next to
    /// buildah run directly (needs root).
    E2e(e2e::E2eArgs),
    /// Writes docs/benchmarks.md and its plots from the results.
    Report(report::ReportArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Scale(args) => scale::run(&args, cli.source_dir.clone())
            .await
            .and_then(|r| write_json(&args.out, &r)),
        Command::E2e(args) => e2e::run(&args, cli.source_dir.clone())
            .await
            .and_then(|r| write_json(&args.out, &r)),
        Command::Report(args) => report::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tripod-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn write_json(path: &std::path::Path, value: &impl Serialize) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Io(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}
