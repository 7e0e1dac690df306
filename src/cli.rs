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
    /// Run the builder: a gRPC server (mTLS on loopback) around buildah.
    Buildd(BuilddArgs),
    /// Run an executor: `--once` inside a build Pod.
    Agent(AgentArgs),
    /// A local Tripod on this machine: control plane, nodes and controller.
    Dev(DevArgs),
}

/// `tripod agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Run one build (the build Pod form) and exit with its result.
    #[arg(long)]
    pub once: bool,
}

/// `tripod buildd`.
#[derive(Args, Debug)]
pub struct BuilddArgs {
    /// Address to listen on (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: std::net::SocketAddr,
    /// TLS directory (mode 0700): CA, server and client certificates, created
    /// when empty. Default: `$TRIPOD_WORKSPACE/.buildd-tls`.
    #[arg(long, env = "TRIPOD_BUILDD_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The build backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Buildah)]
    pub backend: BackendKind,
    /// The buildah program.
    #[arg(long, default_value = "buildah")]
    pub buildah: PathBuf,
    /// Image storage root.
    #[arg(
        long,
        env = "TRIPOD_BUILDAH_ROOT",
        default_value = "/var/lib/containers/storage"
    )]
    pub storage_root: PathBuf,
    /// Runtime state root.
    #[arg(
        long,
        env = "TRIPOD_BUILDAH_RUNROOT",
        default_value = "/run/containers/storage"
    )]
    pub runroot: PathBuf,
    /// Storage driver: vfs or overlay.
    #[arg(long, default_value = "vfs")]
    pub storage_driver: String,
    /// Scratch directory for per-build files. Default: a directory under the TLS directory's parent.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Build backends.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// buildah (Linux).
    Buildah,
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
    /// Start the local control plane, nodes, registry and controller in the
    /// background, then build examples/hello.yaml and print its digest.
    Up {
        /// Directory for state, logs and the env file.
        #[arg(long, default_value = ".tripod/dev")]
        dir: PathBuf,
        /// Do not build the example.
        #[arg(long)]
        no_example: bool,
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
            } else {
                Err("runner mode (long-lived agents on macOS BuildRunners) is not available in this version; use --once".into())
            }
        }
        Command::Buildd(args) => {
            runtime().and_then(|rt| rt.block_on(crate::buildd::run(args)).map_err(Into::into))
        }
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
