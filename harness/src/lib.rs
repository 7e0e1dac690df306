//! Tripod's test harness and `tripod-dev`: everything a test or a local
//! Tripod needs on one machine, none of which ships in the product.
//!
//! * [`controlplane`]: etcd, kube-apiserver, kube-controller-manager and
//!   kube-scheduler built from the Kubernetes Go modules (`testenv/build.sh`);
//! * [`node`]: a real Linux node, the kubelet with containerd, runc and the
//!   CNI bridge plugin, on a network that never leaves the machine;
//! * [`kwok`]: simulated nodes (other OSes and architectures, scale);
//! * [`registry`]: Debian's docker-registry;
//! * [`env`]: all of them together, with the images build Pods run, as
//!   `tripod-dev serve` runs them for `tripod dev up` and for the tests;
//! * [`dev`]: `tripod-dev up | down | serve`.
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub mod addons;
pub mod buildkit;
pub mod certs;
pub mod chart;
pub mod controlplane;
pub mod dev;
pub mod env;
pub mod kwok;
pub mod node;
pub mod process;
pub mod registry;
pub mod runner;
pub mod scripts;

pub use certs::{ADMIN_GROUP, ADMIN_USER, Pki};
pub use controlplane::{ControlPlane, KUBERNETES_VERSION, Options, ensure_binaries, free_port};
pub use process::{spawn_supervised, supervised_command};
pub use registry::{Registry, http_request, http_send, start_registry};

/// Errors of the test environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Generating the certificates or keys failed.
    #[error("generating testenv certificates: {0}")]
    Certs(#[from] rcgen::Error),
    /// A control-plane binary could not be started.
    #[error("starting {name} ({}): {source}", .binary.display())]
    Spawn {
        /// Component name, e.g. `kube-apiserver`.
        name: &'static str,
        /// The binary that was run.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A component exited while the control plane was starting.
    #[error(
        "{name} exited ({status}) before it became ready\n--- last lines of {} ---\n{log_tail}",
        .log.display()
    )]
    Exited {
        /// Component name.
        name: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log file.
        log_tail: String,
    },
    /// A component did not become ready in time.
    #[error(
        "{name} did not become ready within {}s (last probe: {last_probe})\n--- last lines of {} ---\n{log_tail}",
        .waited.as_secs(),
        .log.display()
    )]
    NotReady {
        /// Component name.
        name: &'static str,
        /// How long it was given.
        waited: Duration,
        /// The last readiness probe's error.
        last_probe: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log file.
        log_tail: String,
    },
    /// The kubeconfig could not be read or turned into a client config.
    #[error("kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The real node, kwok or the host's network could not be set up.
    #[error("node: {0}")]
    Node(String),
    /// A harness script (`testenv/*.sh`) failed or gave no answer.
    #[error("{0}")]
    Script(String),
    /// A Kubernetes API call (or building a client) failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
