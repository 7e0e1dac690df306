//! Command-line interface: `tripod controller | crds | agent | buildd | dev`.
//!
//! Each subcommand's arguments live with the module they configure; this
//! module only assembles them and maps outcomes to exit codes.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::agent::AgentArgs;
use crate::buildd::BuilddArgs;
use crate::controller::ControllerConfig;
use crate::telemetry::LogFormat;

/// Tripod builds container images natively on the OS they target.
#[derive(Parser, Debug)]
#[command(name = "tripod", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TRIPOD_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller: reconciler, leader election, /metrics, /healthz, /readyz.
    Controller(Box<ControllerConfig>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Run the builder: a gRPC server (mTLS on loopback) around buildah.
    Buildd(BuilddArgs),
    /// Run an executor: `--once` inside a build Pod.
    Agent(AgentArgs),
    /// A local Tripod on this machine (runs `tripod-dev` from the source
    /// tree: control plane, a real node, simulated nodes, registry, controller).
    Dev(DevArgs),
}

/// `tripod dev`: everything after `dev` goes to `tripod-dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// `up [--dir DIR] [--no-example]`, `down [--dir DIR] [--purge]`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<std::ffi::OsString>,
}

/// Runs a parsed command line and maps the outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    crate::telemetry::init(cli.log_format);
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Crds => crate::api::crds_yaml()
            .map(|y| print!("{y}"))
            .map_err(Into::into),
        Command::Controller(cfg) => runtime().and_then(|rt| {
            rt.block_on(crate::controller::run(*cfg))
                .map_err(Into::into)
        }),
        Command::Agent(args) => {
            if args.once {
                crate::agent::AgentConfig::from_env()
                    .and_then(|cfg| {
                        runtime()
                            .map_err(|e| crate::agent::AgentError::Env(e.to_string()))
                            .map(|rt| (cfg, rt))
                    })
                    .and_then(|(cfg, rt)| rt.block_on(crate::agent::run_once(cfg)))
                    .map_err(Into::into)
            } else if args.runner.name.is_some() {
                runtime().and_then(|rt| {
                    rt.block_on(crate::agent::runner::run(args.runner))
                        .map_err(Into::into)
                })
            } else {
                Err(
                    "tripod agent needs --once (in a build Pod) or --runner NAME (on a build host)"
                        .into(),
                )
            }
        }
        Command::Buildd(args) => {
            runtime().and_then(|rt| rt.block_on(crate::buildd::run(args)).map_err(Into::into))
        }
        Command::Dev(args) => return dev(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tripod: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// `tripod dev …` runs `tripod-dev …` from beside this binary (both come
/// out of the same `cargo build --workspace`): the local environment is
/// not part of the product.
fn dev(args: DevArgs) -> ExitCode {
    let me = std::env::current_exe().ok();
    let Some(dev) = me
        .as_ref()
        .and_then(|m| m.parent())
        .map(|d| d.join("tripod-dev"))
        .filter(|p| p.exists())
    else {
        eprintln!(
            "tripod: `tripod dev` runs tripod-dev, which is not installed next to this binary; \
             from the source tree run `cargo run --bin tripod-dev -- up` (or `cargo build --workspace`)"
        );
        return ExitCode::FAILURE;
    };
    let mut cmd = std::process::Command::new(&dev);
    cmd.args(&args.args);
    if let Some(me) = me
        && matches!(args.args.first().and_then(|a| a.to_str()), Some("up"))
    {
        cmd.env("TRIPOD_BINARY", me);
    }
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tripod: run {}: {e}", dev.display());
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Box<dyn std::error::Error>> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
