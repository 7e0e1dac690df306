//! The `tripod.buildd.v1.Builder` service: converts proto ↔ domain, maps
//! errors to `tonic::Status`, and runs builds on a [`Backend`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Backend, BuildEvent, BuildFailure, BuildOutput, BuildSpec};
use crate::platform::Platform;
use crate::proto::buildd::v1 as pb;
use crate::tls::TlsDir;

/// File in the TLS directory holding buildd's `host:port` once it listens.
pub const ADDRESS_FILE: &str = "address";

/// Errors of the buildd server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS files could not be prepared.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The Builder service over a backend.
pub struct BuilderService<B> {
    backend: Arc<B>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl<B: Backend> BuilderService<B> {
    /// A service building with `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend: Arc::new(backend),
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Cancels every running build (on shutdown).
    pub fn cancel_all(&self) {
        if let Ok(running) = self.running.lock() {
            for token in running.values() {
                token.cancel();
            }
        }
    }

    fn handle(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            running: self.running.clone(),
        }
    }
}

/// Converts a request to the domain, naming the field at fault.
pub fn spec_from_proto(req: pb::BuildRequest) -> Result<BuildSpec, Status> {
    let field = |name: &str, msg: String| Status::invalid_argument(format!("{name}: {msg}"));
    if req.build_id.is_empty() {
        return Err(field("build_id", "must not be empty".into()));
    }
    if req.context_dir.is_empty() {
        return Err(field("context_dir", "must not be empty".into()));
    }
    let platform: Platform = req
        .platform
        .parse()
        .map_err(|e: crate::platform::PlatformError| field("platform", e.to_string()))?;
    if req.tags.is_empty() {
        return Err(field("tags", "at least one reference to push".into()));
    }
    for (i, tag) in req.tags.iter().enumerate() {
        crate::reference::ImageRef::parse(tag)
            .map_err(|e| field(&format!("tags[{i}]"), e.to_string()))?;
    }
    Ok(BuildSpec {
        build_id: req.build_id,
        context_dir: PathBuf::from(req.context_dir),
        dockerfile: PathBuf::from(if req.dockerfile.is_empty() {
            "Dockerfile".to_string()
        } else {
            req.dockerfile
        }),
        target: (!req.target.is_empty()).then_some(req.target),
        build_args: req
            .build_args
            .into_iter()
            .map(|a| (a.name, a.value))
            .collect(),
        labels: req.labels.into_iter().collect(),
        platform,
        tags: req.tags,
        push_by_digest: req.push_by_digest,
        cache_image: (!req.cache_image.is_empty()).then_some(req.cache_image),
        docker_config_json: (!req.docker_config_json.is_empty()).then_some(req.docker_config_json),
        insecure: req.insecure,
    })
}

fn event_to_proto(ev: BuildEvent) -> pb::BuildEvent {
    let event = match ev {
        BuildEvent::Step { text, index, total } => {
            pb::build_event::Event::Step(pb::Step { text, index, total })
        }
        BuildEvent::Log(line) => pb::build_event::Event::Log(pb::LogLine { line }),
    };
    pb::BuildEvent { event: Some(event) }
}

fn result_to_proto(res: Result<BuildOutput, BuildFailure>) -> pb::BuildEvent {
    let event = match res {
        Ok(out) => pb::build_event::Event::Result(pb::BuildResult {
            digest: out.digest,
            size: out.size,
            reference: out.reference,
        }),
        Err(f) => {
            let message = f.to_string();
            let (reason, step, last_lines) = match f {
                BuildFailure::StepFailed {
                    step, last_lines, ..
                } => (pb::FailureReason::StepFailed, step, last_lines),
                BuildFailure::PushFailed { last_lines, .. } => {
                    (pb::FailureReason::PushFailed, String::new(), last_lines)
                }
                BuildFailure::Invalid(_) => {
                    (pb::FailureReason::InvalidRequest, String::new(), Vec::new())
                }
                BuildFailure::Cancelled => {
                    (pb::FailureReason::Cancelled, String::new(), Vec::new())
                }
                BuildFailure::Internal(_) => {
                    (pb::FailureReason::Internal, String::new(), Vec::new())
                }
            };
            pb::build_event::Event::Failure(pb::BuildFailure {
                reason: reason.into(),
                step,
                message,
                last_lines,
            })
        }
    };
    pb::BuildEvent { event: Some(event) }
}

#[tonic::async_trait]
impl<B: Backend> pb::builder_server::Builder for BuilderService<B> {
    type BuildStream = ReceiverStream<Result<pb::BuildEvent, Status>>;

    async fn build(
        &self,
        request: Request<pb::BuildRequest>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        let spec = spec_from_proto(request.into_inner())?;
        let id = spec.build_id.clone();
        let token = CancellationToken::new();
        {
            let mut running = self
                .running
                .lock()
                .map_err(|_| Status::internal("build registry poisoned"))?;
            if running.contains_key(&id) {
                return Err(Status::already_exists(format!(
                    "build {id} is already running"
                )));
            }
            running.insert(id.clone(), token.clone());
        }
        let (out_tx, out_rx) = mpsc::channel(256);
        let svc = self.handle();
        let span = tracing::info_span!("build", build_id = %id, platform = %spec.platform);
        tokio::spawn(
            async move {
                let (ev_tx, mut ev_rx) = mpsc::channel(256);
                let backend = svc.backend.clone();
                let build = tokio::spawn(
                    async move { backend.build(spec, ev_tx, token).await }.in_current_span(),
                );
                while let Some(ev) = ev_rx.recv().await {
                    // A gone client does not stop the build; Cancel does.
                    let _ = out_tx.send(Ok(event_to_proto(ev))).await;
                }
                let res = match build.await {
                    Ok(r) => r,
                    Err(e) => Err(BuildFailure::Internal(format!("build task failed: {e}"))),
                };
                match &res {
                    Ok(o) => tracing::info!(digest = %o.digest, "built and pushed"),
                    Err(f) => tracing::warn!(failure = %f, "build failed"),
                }
                let _ = out_tx.send(Ok(result_to_proto(res))).await;
                if let Ok(mut running) = svc.running.lock() {
                    running.remove(&id);
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = request.into_inner().build_id;
        let token = self
            .running
            .lock()
            .map_err(|_| Status::internal("build registry poisoned"))?
            .get(&id)
            .cloned();
        let cancelled = match token {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        };
        Ok(Response::new(pb::CancelResponse { cancelled }))
    }
}

/// How long open connections may stay once buildd is stopping.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Where and how buildd serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// TLS directory.
    pub tls: TlsDir,
    /// Stop when standard input closes.
    pub exit_with_stdin: bool,
}

/// Serves `service` with mTLS from `opts.tls` on `opts.addr`. Prints
/// `LISTENING host:port` on stdout once bound (the handshake a spawning
/// agent reads), and stops on SIGTERM/SIGINT (or standard input closing,
/// when asked) after cancelling running builds.
pub async fn serve<B: Backend>(
    opts: ServeOptions,
    service: BuilderService<B>,
) -> Result<(), ServeError> {
    let ServeOptions {
        addr,
        tls,
        exit_with_stdin,
    } = opts;
    tls.ensure()?;
    let tls_config = tls.server_config()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "LISTENING {bound}");
        let _ = out.flush();
    }
    // The address file tells a sidecar's agent where to dial: buildd listens
    // on a free port, since Pods with hostNetwork (Windows HostProcess) and
    // runners share the host's ports.
    let address_file = tls.path().join(ADDRESS_FILE);
    let tmp = tls.path().join(".address.tmp");
    if let Err(e) =
        std::fs::write(&tmp, bound.to_string()).and_then(|()| std::fs::rename(&tmp, &address_file))
    {
        tracing::warn!(error = %e, file = %address_file.display(), "cannot write the address file");
    }
    tracing::info!(%bound, tls = %tls.path().display(), "buildd listening");
    let handle = service.handle();
    let shutdown = async move {
        let stdin_closed = async {
            if !exit_with_stdin {
                return std::future::pending::<()>().await;
            }
            // A plain thread: a blocking read cannot be cancelled, and one
            // on the runtime's blocking pool would hold its shutdown up.
            let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
            let reader = std::thread::Builder::new()
                .name("stdin-watch".into())
                .spawn(move || {
                    use std::io::Read;
                    let mut stdin = std::io::stdin();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stdin.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = closed_tx.send(());
                });
            if reader.is_err() {
                return std::future::pending::<()>().await;
            }
            let _ = closed_rx.await;
            tracing::info!("standard input closed: the agent is gone");
        };
        match crate::os::StopSignals::new() {
            Ok(mut stop) => {
                tokio::select! {
                    _ = stop.recv() => {}
                    _ = stdin_closed => {}
                }
            }
            Err(_) => stdin_closed.await,
        }
        tracing::info!("stopping: cancelling running builds");
        handle.cancel_all();
    };
    // Once stopping, open connections get a short grace to end (their
    // builds were cancelled); a client that keeps its connection open does
    // not hold buildd up.
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .tls_config(tls_config)?
        .add_service(pb::builder_server::BuilderServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(STOP_GRACE).await;
        } => tracing::info!("stopped with connections still open"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::BuildRequest {
        pb::BuildRequest {
            build_id: "b1".into(),
            context_dir: "/ctx".into(),
            platform: "linux/x86_64".into(),
            tags: vec!["r.io/a:1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn converts_and_defaults() {
        let spec = spec_from_proto(req()).unwrap();
        assert_eq!(spec.platform.to_string(), "linux/amd64");
        assert_eq!(spec.dockerfile, PathBuf::from("Dockerfile"));
        assert_eq!(spec.target, None);
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut r = req();
        r.platform = "plan9/amd64".into();
        let e = spec_from_proto(r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("platform:"), "{}", e.message());
        let mut r = req();
        r.tags = vec!["r.io/a@sha256:00".into()];
        assert!(
            spec_from_proto(r)
                .unwrap_err()
                .message()
                .starts_with("tags[0]:")
        );
    }

    #[test]
    fn failures_keep_their_reason() {
        let ev = result_to_proto(Err(BuildFailure::StepFailed {
            step: "STEP 2/2: RUN false".into(),
            message: "exit status 1".into(),
            last_lines: vec!["x".into()],
        }));
        match ev.event {
            Some(pb::build_event::Event::Failure(f)) => {
                assert_eq!(f.reason(), pb::FailureReason::StepFailed);
                assert_eq!(f.step, "STEP 2/2: RUN false");
            }
            other => panic!("{other:?}"),
        }
    }
}
