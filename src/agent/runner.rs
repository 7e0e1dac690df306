//! `tripod agent --runner NAME`: the long-lived agent of a BuildRunner.
//!
//! It keeps one session with the leading controller's executor service
//! (reconnecting with backoff, to whichever replica leads), heartbeats, and
//! builds the leases it is offered, up to its capacity: each through a
//! `tripod buildd` it spawns for that build (the `LISTENING host:port`
//! handshake on stdout, an mTLS dial, SIGTERM then SIGKILL; buildd also
//! ends when the agent does, through its standard input). Progress and one
//! outcome per lease go back over the session; outcomes are journaled first
//! ([`super::journal`]), so none is lost to a broken connection or a restart.
//! SIGTERM drains: no new leases, running builds finish (until
//! `--drain-timeout`, then they are stopped and reported as failed), then
//! the agent leaves.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::journal::{Entry, Journal, LeaseId, Outcome};
use super::{AgentError, build_request, drive_buildd, source_from};
use crate::buildd::BackendKind;
use crate::buildd::spawn;
use crate::platform::{Os, Platform};
use crate::proto::buildd::v1 as bpb;
use crate::proto::executor::v1 as pb;
use crate::source;

/// Runner mode's flags (`tripod agent --runner NAME …`).
#[derive(clap::Args, Debug, Clone)]
pub struct RunnerArgs {
    /// Run as the agent of BuildRunner NAME: long-lived, building what the
    /// controller leases to it.
    #[arg(long = "runner", value_name = "NAME")]
    pub name: Option<String>,
    /// The controller's executor service, `https://HOST:PORT` or `HOST:PORT`.
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// File holding the runner token (key `token` of the Secret
    /// `tripod-runner-NAME`); read again at every reconnect, so a rotated
    /// token can be dropped in place.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The executor service's CA certificate (key `ca.crt` of the same Secret).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Name to expect in the executor service's certificate. Default: the
    /// host of --controller.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Most builds at once (the BuildRunner's spec.capacity caps it too).
    #[arg(long, default_value_t = 1)]
    pub capacity: u32,
    /// A label this host really has, KEY=VALUE (repeatable): the controller
    /// refuses the session if the BuildRunner says otherwise.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Working directory: the journal, per-build directories, image storage.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tripod-runner")]
    pub work_dir: PathBuf,
    /// How long draining (after SIGTERM) waits for running builds before
    /// stopping them.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub drain_timeout: u64,
    /// TEST MODE for hosts that are not macOS: also build darwin/ARCH with
    /// the darwin backend, from Dockerfiles without RUN (RUN is refused: it
    /// needs Seatbelt). For trying the darwin leg without a Mac.
    #[arg(long, value_name = "ARCH")]
    pub test_darwin: Option<String>,
    /// The buildah program (Linux hosts).
    #[arg(long, default_value = "buildah")]
    pub buildah: PathBuf,
    /// buildah's storage driver (Linux hosts): `auto` takes overlay when
    /// the runner may mount it (root, or CAP_SYS_ADMIN) and vfs otherwise.
    #[arg(long, value_enum, default_value_t = crate::buildd::buildah::StorageDriver::Auto)]
    pub storage_driver: crate::buildd::buildah::StorageDriver,
    /// The address of a buildkitd on this host (`unix:///…`,
    /// `npipe:////./pipe/buildkitd`, `tcp://127.0.0.1:PORT`): builds may
    /// use the BuildKit backend, and the runner also builds windows/ARCH
    /// (on a Linux host: Dockerfiles whose target platform has no RUN).
    #[arg(long, env = "TRIPOD_BUILDKIT_ADDR", value_name = "ADDR")]
    pub buildkit_addr: Option<String>,
    /// The buildctl program (with --buildkit-addr).
    #[arg(long, default_value = "buildctl")]
    pub buildctl: PathBuf,
}

/// The OS of this host, as platforms name it.
pub fn host_os() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

/// The architecture of this host, as platforms name it.
pub fn host_arch() -> &'static str {
    arch_name(std::env::consts::ARCH)
}

fn arch_name(machine: &str) -> &str {
    match machine {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" | "i386" | "i686" => "386",
        "powerpc64le" | "ppc64le" => "ppc64le",
        "loongarch64" => "loong64",
        "mips64el" => "mips64le",
        other => other,
    }
}

/// Linux architectures binfmt_misc runs through qemu-user on this host.
pub fn emulated_arches() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc/sys/fs/binfmt_misc") else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let machine = name.strip_prefix("qemu-")?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            (text.lines().next() == Some("enabled")).then(|| arch_name(machine).to_string())
        })
        .filter(|a| a != host_arch())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The platforms this host builds, and which of them are emulated.
pub fn host_platforms(host: &Host<'_>) -> (Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    // A Windows host builds its own platform through BuildKit only.
    if host.os != "windows" || host.buildkit {
        all.push(format!("{}/{}", host.os, host_arch()));
    }
    let mut emulated = Vec::new();
    if host.os == "linux" {
        for a in emulated_arches() {
            let p = format!("linux/{a}");
            all.push(p.clone());
            emulated.push(p);
        }
    }
    if host.buildkit && host.os == "linux" {
        // BuildKit builds Windows images on Linux, RUN steps excepted: for
        // any Windows architecture, as nothing of the image runs here.
        for arch in ["amd64", "arm64"] {
            all.push(format!("windows/{arch}"));
        }
    }
    if let Some(arch) = host.test_darwin
        && host.os != "darwin"
    {
        all.push(format!("darwin/{arch}"));
    }
    (all, emulated)
}

/// What a runner's host can build with.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// Its OS, as platforms name it.
    pub os: &'a str,
    /// `--test-darwin ARCH`.
    pub test_darwin: Option<&'a str>,
    /// Whether a buildkitd was given (`--buildkit-addr`).
    pub buildkit: bool,
}

impl<'a> Host<'a> {
    /// This host, as the runner's flags describe it.
    pub fn of(args: &'a RunnerArgs) -> Self {
        Host {
            os: host_os(),
            test_darwin: args.test_darwin.as_deref(),
            buildkit: args.buildkit_addr.is_some(),
        }
    }
}

/// The backend for `target` on this host, in the seeds' order: the
/// ImageBuild's `spec.executor.backend`, then `TRIPOD_BACKEND` on the host,
/// then the host×target matrix. An impossible pair is an error saying why.
pub fn choose_backend(
    requested: &str,
    env: Option<&str>,
    host: &Host<'_>,
    target: &Platform,
) -> Result<BackendKind, String> {
    let parse = |name: &str, from: &str| match name {
        "buildah" => Ok(BackendKind::Buildah),
        "darwin" => Ok(BackendKind::Darwin),
        "buildkit" => Ok(BackendKind::Buildkit),
        other => Err(format!(
            "{from}: unknown backend {other:?} (buildah, buildkit or darwin)"
        )),
    };
    let (kind, from) = if !requested.is_empty() {
        (
            parse(requested, "spec.executor.backend")?,
            "spec.executor.backend",
        )
    } else if let Some(e) = env.filter(|e| !e.is_empty()) {
        (
            parse(e, "TRIPOD_BACKEND on the runner")?,
            "TRIPOD_BACKEND on the runner",
        )
    } else {
        match target.os() {
            Os::Linux if host.os == "linux" || !host.buildkit => {
                (BackendKind::Buildah, "this host")
            }
            Os::Linux => (BackendKind::Buildkit, "this host"),
            Os::Darwin => (BackendKind::Darwin, "this host"),
            Os::Windows if host.buildkit => (BackendKind::Buildkit, "this host"),
            Os::Windows => {
                return Err(format!(
                    "{target}: no backend on this runner builds windows platforms (start it with --buildkit-addr)"
                ));
            }
        }
    };
    let possible = match kind {
        BackendKind::Buildah => host.os == "linux" && target.os() == Os::Linux,
        BackendKind::Darwin => {
            target.os() == Os::Darwin && (host.os == "darwin" || host.test_darwin.is_some())
        }
        BackendKind::Buildkit => {
            host.buildkit
                && match target.os() {
                    Os::Linux => host.os == "linux",
                    Os::Windows => host.os == "linux" || host.os == "windows",
                    Os::Darwin => false,
                }
        }
    };
    if !possible {
        let hint = if kind == BackendKind::Buildkit && !host.buildkit {
            " (the runner was started without --buildkit-addr)"
        } else {
            ""
        };
        return Err(format!(
            "{from} chose the {} backend, which cannot build {target} on a {} host{hint}",
            kind.as_str(),
            host.os
        ));
    }
    Ok(kind)
}

/// What every build task shares.
struct Shared {
    args: RunnerArgs,
    journal: Journal,
    slots: Semaphore,
    running: Mutex<HashMap<String, Running>>,
    events: mpsc::UnboundedSender<Event>,
    program: PathBuf,
    /// buildah's storage driver for every build, chosen once at start
    /// (`auto` probes; builds share one store, so they share one driver).
    storage_driver: &'static str,
}

struct Running {
    lease: LeaseId,
    cancel: CancellationToken,
    /// Stopped because the controller took the lease back: nothing to report.
    taken_back: bool,
}

enum Event {
    Step(LeaseId, String),
    Done(LeaseId),
    /// An outcome that could not be journaled: sent as it is.
    Unjournaled(LeaseId, Outcome),
}

fn read_trimmed(path: &PathBuf) -> Result<String, AgentError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| AgentError::Token {
            path: path.clone(),
            source,
        })
}

fn endpoint(args: &RunnerArgs) -> Result<Endpoint, AgentError> {
    let url = args
        .controller
        .clone()
        .ok_or_else(|| AgentError::Env("--controller is required with --runner".into()))?;
    let address = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let ca = std::fs::read(
        args.ca_file
            .as_ref()
            .ok_or_else(|| AgentError::Env("--ca-file is required with --runner".into()))?,
    )
    .map_err(|source| AgentError::Token {
        path: args.ca_file.clone().unwrap_or_default(),
        source,
    })?;
    let host = args.tls_server_name.clone().unwrap_or_else(|| {
        address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| address.clone())
    });
    Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| AgentError::Env(format!("--controller: {e}")))?
        .tls_config(
            ClientTlsConfig::new()
                .domain_name(host)
                .ca_certificate(Certificate::from_pem(ca)),
        )
        .map_err(|e| AgentError::Executor(e.to_string()))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
}

/// Runs the runner until it has drained after SIGTERM/SIGINT.
pub async fn run(args: RunnerArgs) -> Result<(), AgentError> {
    let name = args
        .name
        .clone()
        .ok_or_else(|| AgentError::Env("--runner NAME is required".into()))?;
    let token_file = args
        .token_file
        .clone()
        .ok_or_else(|| AgentError::Env("--token-file is required with --runner".into()))?;
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| AgentError::Env(format!("--label {l}: not KEY=VALUE")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let endpoint = endpoint(&args)?;
    let journal = Journal::open(&args.work_dir.join("leases"))
        .map_err(|e| AgentError::Env(format!("--work-dir {}: {e}", args.work_dir.display())))?;
    // Leases left running by an earlier process died with it: reported
    // as lost (the attempt is retried), not silently dropped.
    for mut e in journal.all() {
        if e.outcome.is_none() {
            tracing::warn!(lease = %e.lease.key(), "this lease was running when the runner stopped");
            e.outcome = Some(Outcome::Failed {
                reason: "RunnerRestarted".into(),
                step: String::new(),
                message: format!("runner {name} restarted during the build"),
                last_lines: Vec::new(),
            });
            let _ = journal.write(&e);
        }
    }
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let program = std::env::current_exe()
        .map_err(|e| AgentError::Env(format!("cannot find the tripod binary: {e}")))?;
    let (platforms, emulated) = host_platforms(&Host::of(&args));
    tracing::info!(runner = %name, ?platforms, ?emulated, capacity = args.capacity, "runner starting");
    let storage_driver = if cfg!(target_os = "linux") {
        let root = args.work_dir.join("storage").join("root");
        let (driver, why) = args.storage_driver.resolve(&args.buildah, &root).await;
        tracing::info!(storage_driver = driver, reason = %why, "buildah storage driver");
        driver
    } else {
        "vfs"
    };
    let shared = Arc::new(Shared {
        storage_driver,
        slots: Semaphore::new(args.capacity.max(1) as usize),
        args: args.clone(),
        journal,
        running: Mutex::new(HashMap::new()),
        events: events_tx,
        program,
    });
    let mut term = crate::os::StopSignals::new()
        .map_err(|e| AgentError::Env(format!("cannot handle stop signals: {e}")))?;
    let mut draining_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(500);
    loop {
        let token = read_trimmed(&token_file)?;
        let hello = pb::RunnerHello {
            token,
            runner: name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capacity: args.capacity.max(1),
            host_os: host_os().into(),
            host_arch: host_arch().into(),
            platforms: platforms.clone(),
            emulated_platforms: emulated.clone(),
            held: shared
                .journal
                .all()
                .iter()
                .map(|e| e.lease.to_ref())
                .collect(),
            draining: draining_since.is_some(),
            labels: labels.clone().into_iter().collect(),
        };
        let session = Session {
            shared: &shared,
            endpoint: &endpoint,
            events: &mut events_rx,
            term: &mut term,
            draining_since: &mut draining_since,
        };
        match session.run(hello).await {
            Ok(SessionEnd::Drained) => {
                tracing::info!("drained; stopping");
                return Ok(());
            }
            Ok(SessionEnd::Broken(why)) => {
                tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "session with the controller ended; reconnecting");
                if why.contains("established") {
                    delay = Duration::from_millis(500);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "the controller refused this runner; retrying");
            }
        }
        // Signals and build events are still handled while waiting.
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = term.recv() => start_draining(&shared, &mut draining_since),
                Some(ev) = events_rx.recv() => {
                    if let Event::Done(l) = ev {
                        tracing::info!(lease = %l.key(), "build ended while disconnected; reported on reconnect");
                    }
                }
            }
        }
        if draining_since.is_some()
            && shared.journal.all().is_empty()
            && running_count(&shared) == 0
        {
            tracing::info!("drained while disconnected; stopping");
            return Ok(());
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn running_count(shared: &Shared) -> usize {
    shared.running.lock().map(|r| r.len()).unwrap_or(0)
}

fn start_draining(shared: &Shared, since: &mut Option<Instant>) {
    if since.is_none() {
        tracing::info!(
            running = running_count(shared),
            "draining: no new builds; running builds finish"
        );
        *since = Some(Instant::now());
    }
}

enum SessionEnd {
    Drained,
    Broken(String),
}

struct Session<'a> {
    shared: &'a Arc<Shared>,
    endpoint: &'a Endpoint,
    events: &'a mut mpsc::UnboundedReceiver<Event>,
    term: &'a mut crate::os::StopSignals,
    draining_since: &'a mut Option<Instant>,
}

impl Session<'_> {
    async fn run(self, hello: pb::RunnerHello) -> Result<SessionEnd, AgentError> {
        let shared = self.shared;
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| AgentError::Executor(format!("cannot connect: {e}")))?;
        let mut client = pb::executor_client::ExecutorClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
        let send = |m: pb::agent_message::Message| pb::AgentMessage { message: Some(m) };
        let _ = tx
            .send(send(pb::agent_message::Message::RunnerHello(hello)))
            .await;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| AgentError::Executor(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        let welcome = match inbound.message().await {
            Ok(Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Welcome(w)),
            })) => w,
            Ok(_) => return Ok(SessionEnd::Broken("no welcome".into())),
            Err(s) => {
                return Err(AgentError::Executor(format!(
                    "{}: {}",
                    s.code(),
                    s.message()
                )));
            }
        };
        tracing::info!(
            capacity = welcome.capacity,
            heartbeat_s = welcome.heartbeat_seconds,
            "connected to the controller"
        );
        // Outcomes owed from before (a broken session, a restart).
        for e in shared.journal.all() {
            if let Some(o) = &e.outcome {
                let _ = tx
                    .send(send(pb::agent_message::Message::LeaseOutcome(
                        pb::LeaseOutcome {
                            lease: Some(e.lease.to_ref()),
                            outcome: Some(o.to_proto()),
                        },
                    )))
                    .await;
            }
        }
        let mut beat = tokio::time::interval(Duration::from_secs(u64::from(
            welcome.heartbeat_seconds.max(1),
        )));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drain_timeout = Duration::from_secs(shared.args.drain_timeout);
        let mut last_resend = Instant::now();
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = match m {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(SessionEnd::Broken("the controller closed the session (established)".into())),
                        Err(s) => return Ok(SessionEnd::Broken(format!("established session broke: {}: {}", s.code(), s.message()))),
                    };
                    self.handle(m);
                }
                Some(ev) = self.events.recv() => {
                    let m = match ev {
                        Event::Step(l, step) => pb::agent_message::Message::LeaseProgress(pb::LeaseProgress {
                            lease: Some(l.to_ref()),
                            progress: Some(pb::Progress { step, log_lines: Vec::new() }),
                        }),
                        Event::Done(l) => {
                            let Some(Entry { outcome: Some(o), .. }) = shared.journal.get(&l.key()) else { continue };
                            pb::agent_message::Message::LeaseOutcome(pb::LeaseOutcome {
                                lease: Some(l.to_ref()),
                                outcome: Some(o.to_proto()),
                            })
                        }
                        Event::Unjournaled(l, o) => pb::agent_message::Message::LeaseOutcome(pb::LeaseOutcome {
                            lease: Some(l.to_ref()),
                            outcome: Some(o.to_proto()),
                        }),
                    };
                    if tx.send(send(m)).await.is_err() {
                        return Ok(SessionEnd::Broken("session closed (established)".into()));
                    }
                }
                _ = beat.tick() => {
                    let running: Vec<pb::LeaseRef> = shared
                        .running
                        .lock()
                        .map(|r| r.values().map(|x| x.lease.to_ref()).collect())
                        .unwrap_or_default();
                    let draining = self.draining_since.is_some();
                    let owed = shared.journal.all();
                    let held: Vec<pb::LeaseRef> = owed.iter().map(|e| e.lease.to_ref()).collect();
                    if draining && running.is_empty() && owed.is_empty() {
                        let _ = tx.send(send(pb::agent_message::Message::Heartbeat(pb::Heartbeat { running, draining, held }))).await;
                        // Let the last heartbeat leave before closing.
                        drop(tx);
                        let _ = tokio::time::timeout(Duration::from_secs(2), inbound.message()).await;
                        return Ok(SessionEnd::Drained);
                    }
                    if tx.send(send(pb::agent_message::Message::Heartbeat(pb::Heartbeat { running, draining, held }))).await.is_err() {
                        return Ok(SessionEnd::Broken("session closed (established)".into()));
                    }
                    if let Some(since) = *self.draining_since && since.elapsed() > drain_timeout {
                        stop_all(shared, "the runner was draining and its drain timeout passed");
                    }
                    // Outcomes not acknowledged for a while are sent again.
                    if last_resend.elapsed() > Duration::from_secs(30) {
                        last_resend = Instant::now();
                        for e in owed {
                            if let Some(o) = &e.outcome {
                                let _ = tx.send(send(pb::agent_message::Message::LeaseOutcome(pb::LeaseOutcome {
                                    lease: Some(e.lease.to_ref()),
                                    outcome: Some(o.to_proto()),
                                }))).await;
                            }
                        }
                    }
                }
                _ = self.term.recv() => {
                    start_draining(shared, self.draining_since);
                    beat.reset_immediately();
                }
            }
        }
    }

    fn handle(&self, m: pb::ControllerMessage) {
        let shared = self.shared;
        match m.message {
            Some(pb::controller_message::Message::LeaseOffer(offer)) => {
                let (Some(r), Some(a)) = (offer.lease, offer.assignment) else {
                    return;
                };
                let lease = LeaseId::from(&r);
                if shared.journal.get(&lease.key()).is_some() {
                    return;
                }
                if self.draining_since.is_some() {
                    tracing::warn!(lease = %lease.key(), "offered a lease while draining: reported failed (RunnerDraining), to be retried elsewhere");
                }
                let entry = Entry {
                    lease: lease.clone(),
                    outcome: None,
                };
                if let Err(e) = shared.journal.write(&entry) {
                    tracing::error!(lease = %lease.key(), error = %e, "cannot journal the lease; reporting it failed");
                    let _ = shared.events.send(Event::Unjournaled(
                        lease,
                        failure(
                            "RunnerJournal",
                            &format!("the runner cannot write its journal: {e}"),
                        ),
                    ));
                    return;
                }
                let cancel = CancellationToken::new();
                if let Ok(mut r) = shared.running.lock() {
                    r.insert(
                        lease.key(),
                        Running {
                            lease: lease.clone(),
                            cancel: cancel.clone(),
                            taken_back: false,
                        },
                    );
                }
                tracing::info!(lease = %lease.key(), platform = %lease.platform, attempt = lease.attempt, emulated = offer.emulated, "lease taken");
                let shared = shared.clone();
                let refuse_drain = self.draining_since.is_some();
                tokio::spawn(async move {
                    let outcome = if refuse_drain {
                        Some(failure(
                            "RunnerDraining",
                            "the runner is draining and takes no new builds",
                        ))
                    } else {
                        build_lease(&shared, &lease, &a, cancel).await
                    };
                    let taken_back = shared
                        .running
                        .lock()
                        .ok()
                        .and_then(|mut r| r.remove(&lease.key()))
                        .is_some_and(|r| r.taken_back);
                    match outcome {
                        Some(o) if !taken_back => {
                            let entry = Entry {
                                lease: lease.clone(),
                                outcome: Some(o),
                            };
                            if let Err(e) = shared.journal.write(&entry) {
                                tracing::error!(lease = %lease.key(), error = %e, "cannot journal the outcome");
                            }
                            let _ = shared.events.send(Event::Done(lease));
                        }
                        _ => {
                            shared.journal.remove(&lease.key());
                        }
                    }
                });
            }
            Some(pb::controller_message::Message::LeaseCancel(c)) => {
                let Some(r) = c.lease else { return };
                let key = format!("{}/{}", r.namespace, r.lease);
                let found = shared.running.lock().ok().and_then(|mut running| {
                    running.get_mut(&key).map(|x| {
                        x.taken_back = true;
                        x.cancel.clone()
                    })
                });
                match found {
                    Some(cancel) => {
                        tracing::info!(lease = %key, reason = %c.reason, "lease taken back: stopping its build");
                        cancel.cancel();
                    }
                    // Finished meanwhile: its outcome will be refused; forget it.
                    None => shared.journal.remove(&key),
                }
            }
            Some(pb::controller_message::Message::LeaseAck(ack)) => {
                let Some(r) = ack.lease else { return };
                let key = format!("{}/{}", r.namespace, r.lease);
                let a = ack.ack.unwrap_or_default();
                if ack.done {
                    if a.accepted {
                        tracing::info!(lease = %key, message = %a.message, "outcome accepted");
                    } else {
                        tracing::warn!(lease = %key, message = %a.message, "outcome not accepted");
                    }
                    shared.journal.remove(&key);
                } else {
                    tracing::info!(lease = %key, message = %a.message, "outcome not recorded yet; sent again later");
                }
            }
            _ => {}
        }
    }
}

fn stop_all(shared: &Shared, why: &str) {
    if let Ok(r) = shared.running.lock() {
        for x in r.values() {
            if !x.cancel.is_cancelled() {
                tracing::warn!(lease = %x.lease.key(), "{why}: stopping the build");
                x.cancel.cancel();
            }
        }
    }
}

fn failure(reason: &str, message: &str) -> Outcome {
    Outcome::Failed {
        reason: reason.into(),
        step: String::new(),
        message: message.into(),
        last_lines: Vec::new(),
    }
}

/// Builds one lease; `None` when it was stopped because the controller
/// took it back.
async fn build_lease(
    shared: &Arc<Shared>,
    lease: &LeaseId,
    a: &pb::Assignment,
    cancel: CancellationToken,
) -> Option<Outcome> {
    let Ok(_slot) = shared.slots.acquire().await else {
        return Some(failure("Internal", "the runner is shutting down"));
    };
    // Cancellation is handled inside, so buildd is always asked to stop
    // its build and is shut down.
    let result = build_in_buildd(shared, lease, a, &cancel).await;
    Some(match result {
        Ok(p) => Outcome::Pushed {
            digest: p.digest,
            size: p.size,
        },
        Err((reason, step, message, last_lines)) => Outcome::Failed {
            reason: if cancel.is_cancelled() && reason == "Cancelled" {
                "RunnerStopped".into()
            } else {
                reason
            },
            step,
            message,
            last_lines,
        },
    })
}

async fn build_in_buildd(
    shared: &Arc<Shared>,
    lease: &LeaseId,
    a: &pb::Assignment,
    cancel: &CancellationToken,
) -> Result<pb::Pushed, super::Failure> {
    let fail =
        |reason: &str, message: String| (reason.to_string(), String::new(), message, Vec::new());
    let target: Platform = a
        .platform
        .parse()
        .map_err(|e| fail("InvalidRequest", format!("platform: {e}")))?;
    let backend = choose_backend(
        &a.backend,
        std::env::var("TRIPOD_BACKEND").ok().as_deref(),
        &Host::of(&shared.args),
        &target,
    )
    .map_err(|m| fail("InvalidRequest", m))?;
    let dir = shared
        .args
        .work_dir
        .join("builds")
        .join(crate::buildd::safe_name(&lease.key(), 200));
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let src = source_from(a).map_err(|e| fail("SourceFailed", e.to_string()))?;
    let dockerfile = (!a.dockerfile.is_empty()).then_some(a.dockerfile.as_str());
    let source_dir = dir.join("source");
    let context = tokio::select! {
        c = source::fetch(&src, dockerfile, &source_dir) => {
            c.map_err(|e| fail("SourceFailed", e.to_string()))?
        }
        _ = cancel.cancelled() => return Err(fail("Cancelled", "the build was stopped".into())),
    };
    let mut buildd_args = vec![
        "--backend".to_string(),
        backend.as_str().to_string(),
        "--work-dir".to_string(),
        dir.join("work").display().to_string(),
        "--exit-with-stdin".to_string(),
    ];
    if backend == BackendKind::Darwin {
        // RUN (macOS) may not read the runner's token, journal or other builds.
        let private = [
            Some(shared.args.work_dir.clone()),
            shared.args.token_file.clone(),
            shared.args.ca_file.clone(),
        ];
        for p in private.into_iter().flatten() {
            buildd_args.push("--sandbox-private".to_string());
            buildd_args.push(p.display().to_string());
        }
    }
    if backend == BackendKind::Buildah {
        let storage = shared.args.work_dir.join("storage");
        buildd_args.extend([
            "--buildah".to_string(),
            shared.args.buildah.display().to_string(),
            "--storage-root".to_string(),
            storage.join("root").display().to_string(),
            "--runroot".to_string(),
            storage.join("run").display().to_string(),
            "--storage-driver".to_string(),
            shared.storage_driver.to_string(),
        ]);
    }
    if backend == BackendKind::Buildkit
        && let Some(addr) = &shared.args.buildkit_addr
    {
        buildd_args.extend([
            "--buildkit-addr".to_string(),
            addr.clone(),
            "--buildctl".to_string(),
            shared.args.buildctl.display().to_string(),
        ]);
    }
    let buildd = spawn::spawn(
        &shared.program,
        &dir.join("tls"),
        &buildd_args,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| fail("Internal", e.to_string()))?;
    let result = async {
        let mut client = buildd
            .connect()
            .await
            .map_err(|e| fail("Internal", e.to_string()))?;
        let build_id = format!(
            "{}-{}",
            lease.build_id,
            crate::buildd::safe_name(&lease.lease, 200)
        );
        let request: bpb::BuildRequest = build_request(build_id.clone(), &context, a);
        let events = shared.events.clone();
        let key = lease.key();
        let run = drive_buildd(
            &mut client,
            request,
            |step| {
                let _ = events.send(Event::Step(lease.clone(), step));
            },
            |line| tracing::info!(lease = %key, "{line}"),
        );
        tokio::select! {
            r = run => r,
            _ = cancel.cancelled() => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.cancel(bpb::CancelRequest { build_id }),
                )
                .await;
                Err(fail("Cancelled", "the build was stopped".into()))
            }
        }
    }
    .await;
    // The outcome goes out now; buildd stops and its directory goes in
    // the background.
    tokio::spawn(async move {
        buildd.shutdown(Duration::from_secs(10)).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_follow_override_then_host_then_matrix_and_refuse_impossible_pairs() {
        let linux: Platform = "linux/arm64".parse().unwrap();
        let darwin: Platform = "darwin/arm64".parse().unwrap();
        let windows: Platform = "windows/amd64".parse().unwrap();
        let host = |os, test_darwin: bool, buildkit| Host {
            os,
            test_darwin: test_darwin.then_some("arm64"),
            buildkit,
        };
        let plain = host("linux", false, false);
        assert_eq!(
            choose_backend("", None, &plain, &linux),
            Ok(BackendKind::Buildah)
        );
        assert_eq!(
            choose_backend("", None, &host("darwin", false, false), &darwin),
            Ok(BackendKind::Darwin)
        );
        assert_eq!(
            choose_backend("", None, &host("linux", true, false), &darwin),
            Ok(BackendKind::Darwin)
        );
        let err = choose_backend("", None, &plain, &darwin).unwrap_err();
        assert!(
            err.contains("cannot build darwin/arm64 on a linux host"),
            "{err}"
        );
        let err =
            choose_backend("buildah", None, &host("linux", true, false), &darwin).unwrap_err();
        assert!(
            err.starts_with("spec.executor.backend chose the buildah backend"),
            "{err}"
        );
        let err =
            choose_backend("", Some("darwin"), &host("linux", true, false), &linux).unwrap_err();
        assert!(err.starts_with("TRIPOD_BACKEND on the runner"), "{err}");
        assert!(choose_backend("", Some("nope"), &plain, &linux).is_err());
        // The spec's choice comes before the host's.
        assert_eq!(
            choose_backend("buildah", Some("darwin"), &plain, &linux),
            Ok(BackendKind::Buildah)
        );
        // Windows needs BuildKit; BuildKit needs a daemon.
        let err = choose_backend("", None, &plain, &windows).unwrap_err();
        assert!(err.contains("--buildkit-addr"), "{err}");
        let err = choose_backend("buildkit", None, &plain, &linux).unwrap_err();
        assert!(err.contains("without --buildkit-addr"), "{err}");
        let bk = host("linux", false, true);
        assert_eq!(
            choose_backend("", None, &bk, &windows),
            Ok(BackendKind::Buildkit)
        );
        assert_eq!(
            choose_backend("buildkit", None, &bk, &linux),
            Ok(BackendKind::Buildkit)
        );
        assert_eq!(
            choose_backend("", Some("buildkit"), &bk, &linux),
            Ok(BackendKind::Buildkit)
        );
        assert_eq!(
            choose_backend("", None, &bk, &linux),
            Ok(BackendKind::Buildah)
        );
        assert!(choose_backend("buildkit", None, &bk, &darwin).is_err());
        let (platforms, _) = host_platforms(&bk);
        assert!(
            platforms.contains(&format!("windows/{}", host_arch())),
            "{platforms:?}"
        );
        let (platforms, _) = host_platforms(&plain);
        assert!(
            !platforms.iter().any(|p| p.starts_with("windows/")),
            "{platforms:?}"
        );
    }

    #[test]
    fn arch_names_follow_platforms() {
        assert_eq!(arch_name("x86_64"), "amd64");
        assert_eq!(arch_name("aarch64"), "arm64");
        assert_eq!(arch_name("riscv64"), "riscv64");
    }
}
