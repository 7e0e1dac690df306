//! gRPC handlers of `tripod.executor.v1.Executor`: convert proto ↔ domain
//! and map [`ExecutorError`] to `tonic::Status`. The logic is in [`Executors`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{AssignedSource, Assignment, Claim, ExecutorError, Executors, Outcome};
use crate::outcome::{Failed, Pushed};
use crate::proto::executor::v1 as pb;

impl From<ExecutorError> for Status {
    fn from(e: ExecutorError) -> Self {
        match &e {
            ExecutorError::InvalidClaim(_) => Status::invalid_argument(e.to_string()),
            ExecutorError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            ExecutorError::Stale(_) => Status::failed_precondition(e.to_string()),
            ExecutorError::Secret(_) => Status::failed_precondition(e.to_string()),
            ExecutorError::Mismatch(_) => Status::failed_precondition(e.to_string()),
            ExecutorError::NotYet(_) => Status::unavailable(e.to_string()),
            ExecutorError::Busy(_) => Status::resource_exhausted(e.to_string()),
            ExecutorError::Kube { .. } => Status::unavailable(e.to_string()),
            ExecutorError::AlreadyReported(_) => Status::already_exists(e.to_string()),
        }
    }
}

/// How long a new session may take to send its `Hello`.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Most concurrent HTTP/2 streams (sessions) on one connection: an agent
/// needs one, a reconnecting agent two.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// HTTP/2 PING interval; a connection that does not answer within
/// [`KEEPALIVE_TIMEOUT`] is closed, ending its sessions.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message an agent may send (a failure with its last lines fits
/// many times over).
pub const MAX_AGENT_MESSAGE: usize = 256 * 1024;

/// The claim of a Hello.
pub fn claim_from(h: pb::Hello) -> Claim {
    Claim {
        token: h.token,
        namespace: h.namespace,
        image_build: h.image_build,
        build_id: h.build_id,
        platform: h.platform,
        attempt: h.attempt,
        pod: h.pod,
        image_build_uid: h.image_build_uid,
    }
}

pub(crate) fn assignment_to_proto(a: &Assignment) -> pb::Assignment {
    let source = match &a.source {
        AssignedSource::Git {
            url,
            revision,
            context_dir,
            username,
            password,
            ssh_private_key,
            known_hosts,
        } => pb::source::Source::Git(pb::GitSource {
            url: url.clone(),
            revision: revision.clone().unwrap_or_default(),
            context_dir: context_dir.clone().unwrap_or_default(),
            username: username.clone().unwrap_or_default(),
            password: password.clone().unwrap_or_default(),
            ssh_private_key: ssh_private_key.clone().unwrap_or_default(),
            known_hosts: known_hosts.clone().unwrap_or_default(),
        }),
        AssignedSource::Inline { dockerfile, files } => {
            pb::source::Source::Inline(pb::InlineSource {
                dockerfile: dockerfile.clone(),
                files: files.clone().into_iter().collect(),
            })
        }
    };
    pb::Assignment {
        source: Some(pb::Source {
            source: Some(source),
        }),
        dockerfile: a.dockerfile.clone().unwrap_or_default(),
        target: a.target.clone().unwrap_or_default(),
        build_args: a
            .build_args
            .iter()
            .map(|(name, value)| pb::BuildArg {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        tags: a.tags.clone(),
        push_by_digest: a.push_by_digest,
        cache_image: a.cache_image.clone().unwrap_or_default(),
        docker_config_json: a.docker_config_json.clone().unwrap_or_default(),
        insecure: a.insecure,
        labels: a.labels.clone().into_iter().collect(),
        platform: a.platform.clone(),
        backend: a
            .backend
            .map(|b| b.as_str().to_string())
            .unwrap_or_default(),
    }
}

/// The outcome an agent reports, checked (a sha256 digest; a failure's
/// message capped).
pub fn outcome_from(o: pb::Outcome) -> Result<Outcome, Status> {
    match o.outcome {
        Some(pb::outcome::Outcome::Pushed(p)) => {
            if !p.digest.starts_with("sha256:") || p.digest.len() != 71 {
                return Err(Status::invalid_argument(format!(
                    "outcome.pushed.digest: {:?} is not a sha256 digest",
                    p.digest
                )));
            }
            Ok(Outcome::Pushed(Pushed {
                digest: p.digest,
                size: p.size,
            }))
        }
        Some(pb::outcome::Outcome::Failed(f)) => {
            let mut message = f.message;
            if let Some(last) = f.last_lines.last()
                && !message.contains(last.as_str())
            {
                message = format!("{message} (last output: {last})");
            }
            Ok(Outcome::Failed(Failed {
                reason: if f.reason.is_empty() {
                    "Failed".into()
                } else {
                    f.reason
                },
                message: crate::outcome::cap(&message, crate::outcome::MAX_MESSAGE),
            }))
        }
        None => Err(Status::invalid_argument("outcome: empty")),
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct ExecutorService {
    logic: Executors,
    step_interval: Duration,
}

impl ExecutorService {
    /// A service over the executor logic; steps are written at most once per `step_interval`.
    pub fn new(logic: Executors, step_interval: Duration) -> Self {
        Self {
            logic,
            step_interval,
        }
    }
}

fn controller_message(m: pb::controller_message::Message) -> Result<pb::ControllerMessage, Status> {
    Ok(pb::ControllerMessage { message: Some(m) })
}

#[tonic::async_trait]
impl pb::executor_server::Executor for ExecutorService {
    type SessionStream = ReceiverStream<Result<pb::ControllerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        // A stream that never says hello is not kept open.
        let first = tokio::time::timeout(HELLO_DEADLINE, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {}s of opening the session",
                    HELLO_DEADLINE.as_secs()
                ))
            })??;
        let hello = match first.and_then(|m| m.message) {
            Some(pb::agent_message::Message::Hello(h)) => h,
            Some(pb::agent_message::Message::RunnerHello(h)) => {
                let rx =
                    super::runner_grpc::start(self.logic.clone(), h, inbound, self.step_interval)
                        .await?;
                return Ok(Response::new(ReceiverStream::new(rx)));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello or runner_hello",
                ));
            }
        };
        let claim = claim_from(hello);
        let auth = self.logic.authenticate(&claim).await?;
        let guard = self.logic.sessions().register(&auth.namespace, &auth.pod)?;
        let assignment = self.logic.assignment(&auth).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(controller_message(
            pb::controller_message::Message::Assignment(assignment_to_proto(&assignment)),
        ))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
        let logic = self.logic.clone();
        let interval = self.step_interval;
        let span = tracing::info_span!(
            "executor_session",
            namespace = %auth.namespace,
            name = %claim.image_build,
            build_id = %claim.build_id,
            platform = %auth.platform,
            attempt = claim.attempt
        );
        tokio::spawn(
            async move {
                let _registered = guard;
                tracing::info!("agent connected");
                // The first step is written once the interval has passed
                // since the agent connected (a build done sooner writes no
                // step at all, only its result); later ones at most once
                // per interval.
                let mut last_write = Instant::now();
                let mut pending_step: Option<String> = None;
                loop {
                    let flush_at = last_write + interval;
                    let next = tokio::select! {
                        m = inbound.message() => Some(m),
                        _ = tokio::time::sleep_until(flush_at.into()), if pending_step.is_some() => None,
                    };
                    let msg = match next {
                        None => {
                            if let Some(step) = pending_step.take() {
                                if let Err(e) = logic.progress(&auth, &step).await {
                                    tracing::warn!(error = %e, "could not record step");
                                }
                                last_write = Instant::now();
                            }
                            continue;
                        }
                        Some(Ok(Some(m))) => m,
                        Some(Ok(None)) => break,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "session broke");
                            break;
                        }
                    };
                    match msg.message {
                        Some(pb::agent_message::Message::Progress(p)) if !p.step.is_empty() => {
                            pending_step = Some(p.step);
                        }
                        Some(pb::agent_message::Message::Outcome(o)) => {
                            tracing::info!("outcome received");
                            let ack = match outcome_from(o) {
                                Ok(outcome) => match logic.outcome(&auth, outcome, &assignment).await {
                                    Ok((accepted, message)) => pb::Ack { accepted, message },
                                    Err(e) => {
                                        let _ = tx.send(Err(Status::from(e))).await;
                                        break;
                                    }
                                },
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    break;
                                }
                            };
                            tracing::info!(accepted = ack.accepted, message = %ack.message, "outcome recorded");
                            let _ = tx
                                .send(controller_message(pb::controller_message::Message::Ack(ack)))
                                .await;
                            break;
                        }
                        _ => {}
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the executor service with TLS on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    tls: &super::tls::ExecutorTls,
    service: ExecutorService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
    tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        .add_service(
            pb::executor_server::ExecutorServer::new(service)
                .max_decoding_message_size(MAX_AGENT_MESSAGE),
        )
        .serve_with_shutdown(addr, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_convert_and_bad_digests_are_refused() {
        let ok = outcome_from(pb::Outcome {
            outcome: Some(pb::outcome::Outcome::Pushed(pb::Pushed {
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 3,
            })),
        })
        .unwrap();
        assert!(matches!(ok, Outcome::Pushed(p) if p.size == 3));
        let bad = outcome_from(pb::Outcome {
            outcome: Some(pb::outcome::Outcome::Pushed(pb::Pushed {
                digest: "md5:x".into(),
                size: 0,
            })),
        })
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().starts_with("outcome.pushed.digest"));
        let failed = outcome_from(pb::Outcome {
            outcome: Some(pb::outcome::Outcome::Failed(pb::Failed {
                reason: "StepFailed".into(),
                step: "STEP 2/2: RUN false".into(),
                message: "STEP 2/2: RUN false: exit status 1".into(),
                last_lines: vec!["boom".into()],
            })),
        })
        .unwrap();
        assert!(matches!(failed, Outcome::Failed(f) if f.message.contains("boom")));
    }

    #[test]
    fn errors_map_to_status_codes() {
        assert_eq!(
            Status::from(ExecutorError::Unauthenticated("x".into())).code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            Status::from(ExecutorError::Stale("x".into())).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
