//! `tripod agent`: an executor. `--once` is the agent inside a build Pod: it
//! opens a session with the controller's executor service, authenticates
//! with its build's token, fetches the source, drives buildd over loopback
//! mTLS, streams progress and reports one outcome; its exit code reflects
//! it. `--runner NAME` is the long-lived agent of a BuildRunner ([`runner`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::buildd::spawn;
use crate::proto::buildd::v1 as bpb;
use crate::proto::executor::v1 as pb;
use crate::source::{self, GitCredentials, Source};
use crate::tls::TlsDir;

pub mod journal;
pub mod runner;

/// `tripod agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Run one build (the build Pod form) and exit with its result.
    #[arg(long, conflicts_with = "name")]
    pub once: bool,
    /// Runner mode.
    #[command(flatten)]
    pub runner: runner::RunnerArgs,
}

/// Errors of the agent. Each ends the process with a non-zero code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A required environment variable is missing or malformed.
    #[error("environment: {0}")]
    Env(String),
    /// The token directory could not be read.
    #[error("token: cannot read {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The executor service could not be reached or refused the session.
    #[error("executor service: {0}")]
    Executor(String),
    /// buildd could not be reached.
    #[error("buildd: {0}")]
    Buildd(String),
    /// The build failed (reported to the controller).
    #[error("build failed: {0}")]
    Failed(String),
    /// The controller did not accept the pushed image.
    #[error("the controller did not accept the result: {0}")]
    NotAccepted(String),
}

/// Where the agent finds everything (from the build Pod's environment).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Executor service address, `host:port`.
    pub executor_address: String,
    /// Namespace of the ImageBuild.
    pub namespace: String,
    /// Name of the ImageBuild.
    pub image_build: String,
    /// UID of the ImageBuild.
    pub image_build_uid: String,
    /// Name of the build Pod.
    pub pod: String,
    /// Build ID.
    pub build_id: String,
    /// Platform.
    pub platform: String,
    /// Attempt.
    pub attempt: u32,
    /// Directory with `token` and `ca.crt`.
    pub token_dir: PathBuf,
    /// Workspace shared with buildd.
    pub workspace: PathBuf,
    /// buildd's TLS directory (in the workspace).
    pub buildd_tls_dir: PathBuf,
}

impl AgentConfig {
    /// Reads the `TRIPOD_*` variables a build Pod sets.
    pub fn from_env() -> Result<Self, AgentError> {
        let var =
            |k: &str| std::env::var(k).map_err(|_| AgentError::Env(format!("{k} is not set")));
        let workspace = PathBuf::from(var("TRIPOD_WORKSPACE")?);
        Ok(Self {
            executor_address: var("TRIPOD_EXECUTOR_ADDRESS")?,
            namespace: var("TRIPOD_NAMESPACE")?,
            image_build: var("TRIPOD_IMAGEBUILD")?,
            image_build_uid: var("TRIPOD_IMAGEBUILD_UID")?,
            pod: var("TRIPOD_POD_NAME")?,
            build_id: var("TRIPOD_BUILD_ID")?,
            platform: var("TRIPOD_PLATFORM")?,
            attempt: var("TRIPOD_ATTEMPT")?
                .parse()
                .map_err(|_| AgentError::Env("TRIPOD_ATTEMPT is not a number".into()))?,
            token_dir: PathBuf::from(var("TRIPOD_TOKEN_DIR")?),
            buildd_tls_dir: std::env::var_os("TRIPOD_BUILDD_TLS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join(".buildd-tls")),
            workspace,
        })
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, AgentError> {
    std::fs::read(&path).map_err(|source| AgentError::Token { path, source })
}

pub(crate) fn source_from(a: &pb::Assignment) -> Result<Source, AgentError> {
    match a.source.as_ref().and_then(|s| s.source.as_ref()) {
        Some(pb::source::Source::Git(g)) => {
            let credentials = if !g.ssh_private_key.is_empty() {
                Some(GitCredentials::SshKey {
                    private_key: g.ssh_private_key.clone(),
                    known_hosts: (!g.known_hosts.is_empty()).then(|| g.known_hosts.clone()),
                })
            } else if !g.username.is_empty() || !g.password.is_empty() {
                Some(GitCredentials::Basic {
                    username: g.username.clone(),
                    password: g.password.clone(),
                })
            } else {
                None
            };
            Ok(Source::Git {
                url: g.url.clone(),
                revision: (!g.revision.is_empty()).then(|| g.revision.clone()),
                context_dir: (!g.context_dir.is_empty()).then(|| g.context_dir.clone()),
                credentials,
            })
        }
        Some(pb::source::Source::Inline(i)) => Ok(Source::Inline {
            dockerfile: i.dockerfile.clone(),
            files: i.files.clone().into_iter().collect(),
        }),
        None => Err(AgentError::Executor("the assignment has no source".into())),
    }
}

pub(crate) fn failed(
    reason: &str,
    step: &str,
    message: &str,
    last_lines: Vec<String>,
) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(pb::agent_message::Message::Outcome(pb::Outcome {
            outcome: Some(pb::outcome::Outcome::Failed(pb::Failed {
                reason: reason.into(),
                step: step.into(),
                message: message.into(),
                last_lines,
            })),
        })),
    }
}

/// Runs one build. Ok only when the controller accepted a pushed image.
pub async fn run_once(cfg: AgentConfig) -> Result<(), AgentError> {
    tracing::info!(platform = %cfg.platform, attempt = cfg.attempt, "agent started");
    let token = String::from_utf8_lossy(&read(cfg.token_dir.join("token"))?)
        .trim()
        .to_string();
    let ca = read(cfg.token_dir.join("ca.crt"))?;
    let host = cfg
        .executor_address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| cfg.executor_address.clone());
    let endpoint = Endpoint::from_shared(format!("https://{}", cfg.executor_address))
        .map_err(|e| AgentError::Env(format!("TRIPOD_EXECUTOR_ADDRESS: {e}")))?
        .tls_config(
            ClientTlsConfig::new()
                .domain_name(host)
                .ca_certificate(Certificate::from_pem(ca)),
        )
        .map_err(|e| AgentError::Executor(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        // A controller that went away mid-build is noticed within 30 s.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let hello = pb::Hello {
        token,
        namespace: cfg.namespace.clone(),
        image_build: cfg.image_build.clone(),
        build_id: cfg.build_id.clone(),
        platform: cfg.platform.clone(),
        attempt: cfg.attempt,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        pod: cfg.pod.clone(),
        image_build_uid: cfg.image_build_uid.clone(),
    };
    // A Pod being deleted (cancel, timeout, deletion) gets SIGTERM. The
    // agent is its container's PID 1, so without a handler SIGTERM would be
    // ignored: handle it from the start.
    let mut term = crate::os::StopSignals::new()
        .map_err(|e| AgentError::Env(format!("cannot handle stop signals: {e}")))?;
    let (out_tx, mut inbound, assignment) = tokio::select! {
        session = open_session_with_retry(&endpoint, &hello, HELLO_RETRY_WITHIN) => session?,
        _ = term.recv() => {
            return Err(AgentError::Failed("terminated before the build started".into()));
        }
    };
    tracing::info!(platform = %assignment.platform, tags = ?assignment.tags, "assignment received");

    // SIGTERM during the build: stop it in buildd at once, so its RUN
    // processes end within the Pod's grace period, and exit without
    // reporting.
    let outcome = tokio::select! {
        outcome = build(&cfg, &assignment, &out_tx) => outcome,
        _ = term.recv() => {
            tracing::info!("SIGTERM: cancelling the build");
            cancel_in_buildd(&cfg).await;
            return Err(AgentError::Failed("terminated: the build Pod is being stopped".into()));
        }
    };
    let (msg, failure) = match outcome {
        Ok(pushed) => (
            pb::AgentMessage {
                message: Some(pb::agent_message::Message::Outcome(pb::Outcome {
                    outcome: Some(pb::outcome::Outcome::Pushed(pushed)),
                })),
            },
            None,
        ),
        Err((reason, step, message, last)) => (
            failed(&reason, &step, &message, last),
            Some(format!("{reason}: {message}")),
        ),
    };
    // Report on this session; if the controller went away meanwhile (a
    // restart, a new leader), report on a new session until one answers.
    let report = async {
        let mut ack = send_outcome(&out_tx, &mut inbound, msg.clone()).await;
        drop(out_tx);
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let e = match ack {
                Ok(a) => break Ok(a),
                // The attempt is over (its outcome was recorded and the
                // build moved on), or the token is no longer valid: no
                // retry changes that.
                Err(Refusal::Final(e)) => break Err(e.to_string()),
                Err(Refusal::Retry(e)) => e,
            };
            if Instant::now() > deadline {
                break Err(e.to_string());
            }
            tracing::warn!(error = %e, "reporting the outcome failed; reconnecting");
            tokio::time::sleep(Duration::from_secs(1)).await;
            ack = match open_session(&endpoint, &hello).await {
                Ok((tx, mut inbound, _)) => send_outcome(&tx, &mut inbound, msg.clone()).await,
                Err(r) => Err(r),
            };
        }
    };
    let ack = tokio::select! {
        ack = report => ack,
        _ = term.recv() => Err("terminated before the outcome was acknowledged".to_string()),
    };
    let ack = ack.map_err(AgentError::Executor)?;
    match failure {
        Some(f) => Err(AgentError::Failed(f)),
        None if ack.accepted => {
            tracing::info!(message = %ack.message, "result accepted");
            Ok(())
        }
        None => Err(AgentError::NotAccepted(ack.message)),
    }
}

type Session = (
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::ControllerMessage>,
    pb::Assignment,
);

/// How long the agent keeps saying hello while the controller answers
/// "not yet" or "busy" (its status write lags the Pod, a restart, a new
/// leader).
const HELLO_RETRY_WITHIN: Duration = Duration::from_secs(180);

/// Why a session did not open.
#[derive(Debug)]
enum Refusal {
    /// Worth another try (unreachable, not yet recorded, busy).
    Retry(AgentError),
    /// Will not change (unauthenticated, stale attempt, invalid hello).
    Final(AgentError),
}

impl From<Refusal> for AgentError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Retry(e) | Refusal::Final(e) => e,
        }
    }
}

fn refusal(s: tonic::Status) -> Refusal {
    let e = AgentError::Executor(format!("{}: {}", s.code(), s.message()));
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::ResourceExhausted
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Aborted
        | tonic::Code::Internal
        | tonic::Code::Unknown
        | tonic::Code::Cancelled => Refusal::Retry(e),
        _ => Refusal::Final(e),
    }
}

/// [`open_session`] again, with backoff (0.5 s doubling to 10 s), while the
/// refusal is worth retrying and `within` has not passed.
async fn open_session_with_retry(
    endpoint: &Endpoint,
    hello: &pb::Hello,
    within: Duration,
) -> Result<Session, AgentError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(500);
    loop {
        match open_session(endpoint, hello).await {
            Ok(session) => return Ok(session),
            Err(Refusal::Retry(e)) if start.elapsed() + delay < within => {
                tracing::info!(error = %e, retry_in_ms = delay.as_millis() as u64, "hello not answered yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(r) => return Err(r.into()),
        }
    }
}

/// Connects, says hello and waits for the assignment.
async fn open_session(endpoint: &Endpoint, hello: &pb::Hello) -> Result<Session, Refusal> {
    let channel = connect_with_retry(endpoint, Duration::from_secs(60))
        .await
        .map_err(Refusal::Retry)?;
    let mut executor = pb::executor_client::ExecutorClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(64);
    out_tx
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello.clone())),
        })
        .await
        .map_err(|_| Refusal::Retry(AgentError::Executor("session closed".into())))?;
    let mut inbound = executor
        .session(ReceiverStream::new(out_rx))
        .await
        .map_err(refusal)?
        .into_inner();
    match inbound.message().await {
        Ok(Some(pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Assignment(a)),
        })) => Ok((out_tx, inbound, a)),
        Ok(_) => Err(Refusal::Retry(AgentError::Executor("no assignment".into()))),
        Err(s) => Err(refusal(s)),
    }
}

/// How long the controller may take to acknowledge an outcome (it asks the
/// registry first).
const ACK_DEADLINE: Duration = Duration::from_secs(120);

/// Sends the outcome and waits for the controller's acknowledgement.
async fn send_outcome(
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ControllerMessage>,
    msg: pb::AgentMessage,
) -> Result<pb::Ack, Refusal> {
    let retry = |m: String| Refusal::Retry(AgentError::Executor(m));
    tx.send(msg)
        .await
        .map_err(|_| retry("the session closed before the outcome".into()))?;
    let deadline = tokio::time::Instant::now() + ACK_DEADLINE;
    loop {
        let next = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .map_err(|_| {
                retry(format!(
                    "no acknowledgement within {}s",
                    ACK_DEADLINE.as_secs()
                ))
            })?;
        match next {
            Ok(Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Ack(a)),
            })) => return Ok(a),
            Ok(Some(_)) => continue,
            Ok(None) => return Err(retry("the session ended without an acknowledgement".into())),
            Err(s) => return Err(refusal(s)),
        }
    }
}

async fn connect_with_retry(
    endpoint: &Endpoint,
    within: Duration,
) -> Result<tonic::transport::Channel, AgentError> {
    let start = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < within => {
                tracing::debug!(error = %e, "executor service not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(AgentError::Executor(format!("cannot connect: {e}"))),
        }
    }
}

/// buildd's ID of this Pod's build.
fn buildd_build_id(cfg: &AgentConfig) -> String {
    format!(
        "{}-{}-{}",
        cfg.build_id,
        cfg.platform.replace('/', "-"),
        cfg.attempt
    )
}

/// Asks the sidecar buildd to cancel this Pod's build (best effort, 5 s).
async fn cancel_in_buildd(cfg: &AgentConfig) {
    let tls = TlsDir::new(&cfg.buildd_tls_dir);
    let address_file = cfg.buildd_tls_dir.join(crate::buildd::server::ADDRESS_FILE);
    let Some(addr) = std::fs::read_to_string(&address_file)
        .ok()
        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
    else {
        return;
    };
    let cancel = async {
        let mut client = spawn::connect(addr, &tls).await.ok()?;
        client
            .cancel(bpb::CancelRequest {
                build_id: buildd_build_id(cfg),
            })
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(5), cancel).await {
        Ok(Some(r)) => tracing::info!(
            cancelled = r.into_inner().cancelled,
            "buildd cancelled the build"
        ),
        _ => tracing::warn!("buildd could not be asked to cancel the build"),
    }
}

pub(crate) type Failure = (String, String, String, Vec<String>);

async fn build(
    cfg: &AgentConfig,
    a: &pb::Assignment,
    out: &mpsc::Sender<pb::AgentMessage>,
) -> Result<pb::Pushed, Failure> {
    let fail =
        |reason: &str, message: String| (reason.to_string(), String::new(), message, Vec::new());
    let src = source_from(a).map_err(|e| fail("SourceFailed", e.to_string()))?;
    let dockerfile = (!a.dockerfile.is_empty()).then_some(a.dockerfile.as_str());
    let context = source::fetch(&src, dockerfile, &cfg.workspace.join("source"))
        .await
        .map_err(|e| fail("SourceFailed", e.to_string()))?;

    // buildd is the Pod's sidecar: wait for its TLS files and port.
    let tls = TlsDir::new(&cfg.buildd_tls_dir);
    let start = Instant::now();
    let address_file = cfg.buildd_tls_dir.join(crate::buildd::server::ADDRESS_FILE);
    let mut client = loop {
        let addr: Option<SocketAddr> = std::fs::read_to_string(&address_file)
            .ok()
            .and_then(|a| a.trim().parse().ok());
        if let Some(addr) = addr
            && let Ok(c) = spawn::connect(addr, &tls).await
        {
            break c;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(fail(
                "Internal",
                format!(
                    "buildd did not answer within 120s ({})",
                    address_file.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let request = build_request(buildd_build_id(cfg), &context, a);
    drive_buildd(
        &mut client,
        request,
        |step| {
            // Never wait on progress: the session may be gone (a
            // controller restart) while the build goes on.
            let _ = out.try_send(pb::AgentMessage {
                message: Some(pb::agent_message::Message::Progress(pb::Progress {
                    step,
                    log_lines: Vec::new(),
                })),
            });
        },
        // buildah's output, as it comes: the Pod log (`kubectl logs`) is
        // where a user reads why a build failed.
        |line| {
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{line}");
        },
    )
    .await
}

/// buildd's request for an assignment, its context fetched.
pub(crate) fn build_request(
    build_id: String,
    context: &source::Context,
    a: &pb::Assignment,
) -> bpb::BuildRequest {
    bpb::BuildRequest {
        build_id,
        context_dir: context.dir.display().to_string(),
        dockerfile: context.dockerfile.display().to_string(),
        target: a.target.clone(),
        build_args: a
            .build_args
            .iter()
            .map(|b| bpb::BuildArg {
                name: b.name.clone(),
                value: b.value.clone(),
            })
            .collect(),
        labels: {
            // The commit a git source was checked out at: the image says
            // which revision it is (and the index, when every platform
            // agrees).
            let mut labels = a.labels.clone();
            if let Some(rev) = &context.revision {
                labels
                    .entry("org.opencontainers.image.revision".to_string())
                    .or_insert_with(|| rev.clone());
            }
            labels
        },
        platform: a.platform.clone(),
        tags: a.tags.clone(),
        push_by_digest: a.push_by_digest,
        cache_image: a.cache_image.clone(),
        docker_config_json: a.docker_config_json.clone(),
        insecure: a.insecure,
    }
}

/// Runs one build on buildd: its steps go to `on_step`, its output lines
/// to `on_log`; the pushed image, or why not.
pub(crate) async fn drive_buildd(
    client: &mut crate::proto::buildd::v1::builder_client::BuilderClient<tonic::transport::Channel>,
    request: bpb::BuildRequest,
    mut on_step: impl FnMut(String),
    mut on_log: impl FnMut(String),
) -> Result<pb::Pushed, Failure> {
    let fail =
        |reason: &str, message: String| (reason.to_string(), String::new(), message, Vec::new());
    let mut stream = client
        .build(request)
        .await
        .map_err(|s| {
            fail(
                "Internal",
                format!("buildd refused the build: {}", s.message()),
            )
        })?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| fail("Internal", format!("buildd stream: {}", s.message())))?;
        match ev.event {
            Some(bpb::build_event::Event::Step(s)) => {
                tracing::debug!(step = %s.text, "step");
                on_step(s.text);
            }
            Some(bpb::build_event::Event::Log(l)) => on_log(l.line),
            Some(bpb::build_event::Event::Result(r)) => {
                return Ok(pb::Pushed {
                    digest: r.digest,
                    size: r.size,
                });
            }
            Some(bpb::build_event::Event::Failure(f)) => {
                let reason = match f.reason() {
                    bpb::FailureReason::StepFailed => "StepFailed",
                    bpb::FailureReason::PushFailed => "PushFailed",
                    bpb::FailureReason::Cancelled => "Cancelled",
                    bpb::FailureReason::InvalidRequest => "InvalidRequest",
                    _ => "Internal",
                };
                return Err((reason.to_string(), f.step, f.message, f.last_lines));
            }
            None => {}
        }
    }
    Err(fail(
        "Internal",
        "buildd ended the build without a result".into(),
    ))
}
