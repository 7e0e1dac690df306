//! Command-line interface: `tripod controller | crds | dev`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::controller::ControllerConfig;

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

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller: reconciler, leader election, /metrics, /healthz, /readyz.
    Controller(Box<ControllerConfig>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// A local Tripod on this machine: control plane, nodes and controller.
    Dev(DevArgs),
}

/// `tripod dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: DevCommand,
}

/// `tripod dev` subcommands.
#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Start the local control plane, fake nodes and the controller in the background.
    Up {
        /// Directory for state, logs and the env file.
        #[arg(long, default_value = ".tripod/dev")]
        dir: PathBuf,
    },
    /// Stop everything `tripod dev up` started.
    Down {
        /// Directory given to `tripod dev up`.
        #[arg(long, default_value = ".tripod/dev")]
        dir: PathBuf,
        /// Also delete the state directory.
        #[arg(long)]
        purge: bool,
    },
    /// Run the local environment in the foreground (what `up` starts in the background).
    #[command(hide = true)]
    Serve {
        /// Directory for state, logs and the env file.
        #[arg(long)]
        dir: PathBuf,
    },
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
        Command::Dev(args) => runtime().and_then(|rt| {
            rt.block_on(crate::dev::run(args.command))
                .map_err(Into::into)
        }),
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

fn runtime() -> Result<tokio::runtime::Runtime, Box<dyn std::error::Error>> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
