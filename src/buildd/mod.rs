//! `tripod buildd`: the builder. A gRPC server (`tripod.buildd.v1.Builder`,
//! mTLS on loopback) around a backend; buildah on Linux.
//!
//! Domain types here are free of proto: [`server`] converts.

pub mod buildah;
pub mod buildkit;
#[cfg(unix)]
pub mod darwin;
pub mod server;
pub mod spawn;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::platform::Platform;

/// One build, as buildd understands it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    /// Unique ID of the build attempt.
    pub build_id: String,
    /// Directory holding the build context.
    pub context_dir: PathBuf,
    /// Dockerfile path (absolute, or relative to the context).
    pub dockerfile: PathBuf,
    /// Multi-stage target.
    pub target: Option<String>,
    /// Build arguments, in order.
    pub build_args: Vec<(String, String)>,
    /// Labels for the image config.
    pub labels: BTreeMap<String, String>,
    /// The platform to build.
    pub platform: Platform,
    /// References to push; the first one's digest is the result.
    pub tags: Vec<String>,
    /// Push by digest only, to the repository of the first tag (no tag
    /// is written): an index will join the platforms.
    pub push_by_digest: bool,
    /// Layer cache repository.
    pub cache_image: Option<String>,
    /// A docker config.json with credentials.
    pub docker_config_json: Option<Vec<u8>>,
    /// Plain HTTP / no TLS verification to registries.
    pub insecure: bool,
}

impl BuildSpec {
    /// The Dockerfile's path: `dockerfile` when absolute, else inside the
    /// context.
    pub fn dockerfile_path(&self) -> PathBuf {
        if self.dockerfile.is_absolute() {
            self.dockerfile.clone()
        } else {
            self.context_dir.join(&self.dockerfile)
        }
    }

    /// What a pushed image is called: the first tag, or `repo@digest`
    /// when pushed by digest.
    pub fn pushed_reference(&self, digest: &str) -> String {
        let first = self.tags.first().cloned().unwrap_or_default();
        if !self.push_by_digest {
            return first;
        }
        crate::reference::ImageRef::parse(&first)
            .map(|r| r.pinned(digest))
            .unwrap_or(first)
    }

    /// A registry client for the push (plain HTTP to the output registry
    /// when `insecure`) and the push credentials for `reference`'s registry.
    pub fn output_registry(
        &self,
        reference: &str,
    ) -> Result<
        (
            crate::registry::RegistryClient,
            Option<crate::registry::Credentials>,
        ),
        String,
    > {
        let image = crate::reference::ImageRef::parse(reference).map_err(|e| e.to_string())?;
        let creds = match &self.docker_config_json {
            Some(json) => crate::registry::credentials_for(json, &image.registry)
                .map_err(|e| e.to_string())?,
            None => None,
        };
        let insecure = if self.insecure {
            vec![image.registry]
        } else {
            Vec::new()
        };
        Ok((crate::registry::RegistryClient::new(insecure), creds))
    }

    /// `Ok` when the platform's OS is `os`, the only one `backend` builds.
    pub fn require_os(&self, os: crate::platform::Os, backend: &str) -> Result<(), BuildFailure> {
        if self.platform.os() == os {
            return Ok(());
        }
        Err(BuildFailure::Invalid(format!(
            "platform {}: the {backend} backend builds {os} platforms only",
            self.platform
        )))
    }
}

/// `id` as a file name: `[A-Za-z0-9-]`, anything else `_`, at most `max`
/// characters (`build` when nothing is left).
pub fn safe_name(id: &str, max: usize) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if s.is_empty() { "build".into() } else { s }
}

/// A build's scratch directory under a backend's work directory, removed
/// when dropped.
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// Creates `root/<build id>`.
    pub fn create(root: &std::path::Path, build_id: &str) -> Result<WorkDir, BuildFailure> {
        // Cut names end in a hash of the whole ID: two builds whose IDs
        // differ only past the cut (a long ImageBuild name, two Windows OS
        // builds of one platform) never share a directory.
        let name = if build_id.chars().count() <= 64 {
            safe_name(build_id, 64)
        } else {
            use sha2::Digest as _;
            let hash: String = sha2::Sha256::digest(build_id.as_bytes())
                .iter()
                .take(6)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{}-{hash}", safe_name(build_id, 51))
        };
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| BuildFailure::Internal(format!("create {}: {e}", dir.display())))?;
        Ok(WorkDir(dir))
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `cmd` (a builder program) with its standard output and error
/// piped, and returns the child with one channel of both streams' lines.
pub fn spawn_lines(
    mut cmd: tokio::process::Command,
    what: &str,
) -> Result<(tokio::process::Child, tokio::sync::mpsc::Receiver<String>), BuildFailure> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| BuildFailure::Internal(format!("cannot run {what}: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    fn forward(
        stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        tx: tokio::sync::mpsc::Sender<String>,
    ) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).await.is_err() {
                    break;
                }
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        forward(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward(err, tx);
    }
    Ok((child, rx))
}

/// Progress of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A Dockerfile step started.
    Step {
        /// e.g. `STEP 3/7: RUN make`.
        text: String,
        /// 1-based index.
        index: u32,
        /// Number of steps.
        total: u32,
    },
    /// A line of builder output.
    Log(String),
}

/// A pushed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// Manifest digest reported by the push.
    pub digest: String,
    /// Compressed size of config and layers.
    pub size: i64,
    /// The first pushed reference.
    pub reference: String,
}

/// Why a build did not produce an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildFailure {
    /// A Dockerfile step failed.
    #[error("{step}: {message}")]
    StepFailed {
        /// The step, e.g. `STEP 2/3: RUN false`.
        step: String,
        /// What the builder said.
        message: String,
        /// The last lines of output.
        last_lines: Vec<String>,
    },
    /// Pushing to the registry failed.
    #[error("push to {reference} failed: {message}")]
    PushFailed {
        /// The reference being pushed.
        reference: String,
        /// What the builder said.
        message: String,
        /// The last lines of output.
        last_lines: Vec<String>,
    },
    /// The request cannot be built.
    #[error("invalid build request: {0}")]
    Invalid(String),
    /// The build was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The builder itself failed.
    #[error("builder failure: {0}")]
    Internal(String),
}

/// A way to build images.
pub trait Backend: Send + Sync + 'static {
    /// Builds and pushes `spec`, sending progress to `events`, until done or
    /// `cancel` fires.
    fn build(
        &self,
        spec: BuildSpec,
        events: tokio::sync::mpsc::Sender<BuildEvent>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = Result<BuildOutput, BuildFailure>> + Send;
}

/// Parses buildah's `STEP n/m: text` progress lines.
pub fn parse_step(line: &str) -> Option<BuildEvent> {
    let rest = line.strip_prefix("STEP ")?;
    let (counts, _) = rest.split_once(':')?;
    let (index, total) = counts.split_once('/')?;
    Some(BuildEvent::Step {
        text: line.trim().to_string(),
        index: index.trim().parse().ok()?,
        total: total.trim().parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps() {
        assert_eq!(
            parse_step("STEP 2/5: RUN make all"),
            Some(BuildEvent::Step {
                text: "STEP 2/5: RUN make all".into(),
                index: 2,
                total: 5
            })
        );
        assert_eq!(parse_step("STEP x/5: RUN"), None);
        assert_eq!(parse_step("Writing manifest"), None);
    }
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
    /// buildkit backend: the `buildctl` program.
    #[arg(long, default_value = "buildctl")]
    pub buildctl: PathBuf,
    /// buildkit backend: the address of the `buildkitd` to build with
    /// (`unix:///…`, `npipe:////./pipe/…`, `tcp://host:port`).
    #[arg(long, env = "TRIPOD_BUILDKIT_ADDR", default_value = DEFAULT_BUILDKIT_ADDR)]
    pub buildkit_addr: String,
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
    /// buildah backend: the storage driver. `auto` takes overlay when
    /// buildd may mount it (CAP_SYS_ADMIN, e.g. through the controller's
    /// `--buildd-security-context`) and vfs otherwise.
    #[arg(long, value_enum, default_value_t = buildah::StorageDriver::Auto)]
    pub storage_driver: buildah::StorageDriver,
    /// Scratch directory for per-build files. Default: a directory under the TLS directory's parent.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Share the TLS directory with this group (read-only): the agent's
    /// group when buildd runs as another user (root in a build Pod).
    #[arg(long, value_name = "GID")]
    pub tls_group: Option<u32>,
    /// Stop (cancelling running builds) when standard input closes: a
    /// runner's agent spawns buildd so, and buildd ends with it however the
    /// agent ends.
    #[arg(long)]
    pub exit_with_stdin: bool,
    /// darwin backend: a path RUN steps may not read (repeatable: the
    /// runner's work directory, token and CA files), the build's own root
    /// excepted.
    #[arg(long = "sandbox-private", value_name = "PATH")]
    pub sandbox_private: Vec<PathBuf>,
}

/// Where buildkitd listens by default on this OS.
#[cfg(windows)]
pub const DEFAULT_BUILDKIT_ADDR: &str = "npipe:////./pipe/buildkitd";
/// Where buildkitd listens by default on this OS.
#[cfg(not(windows))]
pub const DEFAULT_BUILDKIT_ADDR: &str = "unix:///run/buildkit/buildkitd.sock";

/// Build backends.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// buildah (Linux).
    Buildah,
    /// darwin: macOS images (RUN only on macOS hosts).
    Darwin,
    /// BuildKit: Linux images, and Windows images (RUN only on Windows
    /// hosts), through a running buildkitd.
    Buildkit,
}

impl From<crate::api::BackendName> for BackendKind {
    fn from(b: crate::api::BackendName) -> Self {
        match b {
            crate::api::BackendName::Buildah => BackendKind::Buildah,
            crate::api::BackendName::Darwin => BackendKind::Darwin,
            crate::api::BackendName::Buildkit => BackendKind::Buildkit,
        }
    }
}

impl BackendKind {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Buildah => "buildah",
            BackendKind::Darwin => "darwin",
            BackendKind::Buildkit => "buildkit",
        }
    }
}

/// Errors of `tripod buildd`.
#[derive(Debug, thiserror::Error)]
pub enum BuilddError {
    /// No TLS directory was given or derivable.
    #[error("--tls-dir is required (or set TRIPOD_WORKSPACE)")]
    NoTlsDir,
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// The backend does not exist on this OS.
    #[error("--backend: {0}")]
    Unsupported(String),
}

/// Runs `tripod buildd`.
pub async fn run(args: BuilddArgs) -> Result<(), BuilddError> {
    let tls_dir = match args.tls_dir {
        Some(d) => d,
        None => std::env::var_os("TRIPOD_WORKSPACE")
            .map(|w| PathBuf::from(w).join(".buildd-tls"))
            .ok_or(BuilddError::NoTlsDir)?,
    };
    let work_dir = args.work_dir.unwrap_or_else(|| {
        tls_dir
            .parent()
            .map(|p| p.join(".buildd-work"))
            .unwrap_or_else(|| PathBuf::from("/tmp/tripod-buildd-work"))
    });
    let tls = match args.tls_group {
        Some(gid) => crate::tls::TlsDir::shared_with_group(tls_dir, gid),
        None => crate::tls::TlsDir::new(tls_dir),
    };
    let opts = server::ServeOptions {
        addr: args.listen,
        tls,
        exit_with_stdin: args.exit_with_stdin,
    };
    match args.backend {
        BackendKind::Buildah => {
            let (driver, why) = args
                .storage_driver
                .resolve(&args.buildah, &args.storage_root)
                .await;
            tracing::info!(storage_driver = driver, reason = %why, "buildah storage driver");
            let backend = buildah::Buildah {
                program: args.buildah,
                root: args.storage_root,
                runroot: args.runroot,
                storage_driver: driver.into(),
                work_dir,
            };
            server::serve(opts, server::BuilderService::new(backend)).await?;
        }
        #[cfg(unix)]
        BackendKind::Darwin => {
            let backend = darwin::Darwin {
                work_dir,
                private: args.sandbox_private,
            };
            server::serve(opts, server::BuilderService::new(backend)).await?;
        }
        #[cfg(not(unix))]
        BackendKind::Darwin => {
            let _ = args.sandbox_private;
            return Err(BuilddError::Unsupported(
                "the darwin backend runs on macOS (and, for COPY-only builds, Linux) hosts".into(),
            ));
        }
        BackendKind::Buildkit => {
            let backend = buildkit::Buildkit {
                program: args.buildctl,
                addr: args.buildkit_addr,
                work_dir,
                host_os: crate::platform::Os::host(),
            };
            server::serve(opts, server::BuilderService::new(backend)).await?;
        }
    }
    Ok(())
}
