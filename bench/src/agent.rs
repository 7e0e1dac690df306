//! The bench's agent for build Pods on kwok's simulated nodes.
//!
//! Nothing runs on a simulated node, so a build Pod there would wait
//! forever. This agent does, from outside the Pod, what the real agent in
//! it does, with the same inputs and through the same protocol:
//!
//! 1. it waits until kwok reports the Pod `Running`;
//! 2. it reads the Pod's `TRIPOD_*` environment (the agent container's)
//!    and the build's token Secret (same name as the Pod: `token`,
//!    `ca.crt`), as the real agent reads its mounted files;
//! 3. it opens an executor session over TLS (one connection per Pod, as
//!    each real agent has its own), says Hello with the build's real
//!    token, and receives the Assignment;
//! 4. it reports one step, then pushes a real image to the registry under
//!    the Assignment's tags: one small layer shared by every build, and a
//!    config of its own with the Assignment's labels (the build-ID label
//!    the controller checks) and the Pod's platform;
//! 5. it reports `Pushed` with the digest the registry answered and waits
//!    for the controller's Ack. The controller verifies the tag, the
//!    digest, the label and the platform against the registry, and
//!    records the signed result on the Pod; a kwok Stage
//!    ([`RESULT_STAGE`]) then ends the Pod `Succeeded`, as the real
//!    agent's exit would.
//!
//! What it skips: pulling images, starting containers, buildd, fetching
//! the source and buildah itself. The controller's side is unchanged.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tripod::proto::executor::v1 as pb;
use tripod::registry::RegistryClient;

/// kwok Stage: a Running Pod whose result the controller has recorded
/// (`build.tripod.dev/result`) ends `Succeeded`, its containers exited 0.
pub const RESULT_STAGE: &str = r#"apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: tripod-build-result
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.metadata.annotations["build.tripod.dev/result"]'
      operator: 'Exists'
  next:
    statusTemplate: |
      {{ $now := Now }}
      containerStatuses:
      {{ range $index, $item := .spec.containers }}
      - image: {{ $item.image | Quote }}
        name: {{ $item.name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: Succeeded
"#;

/// What went wrong for one Pod.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Pod lacks what a build Pod has.
    #[error("pod {pod}: {what}")]
    Pod {
        /// Pod name.
        pod: String,
        /// What is missing.
        what: String,
    },
    /// A Kubernetes request failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The executor session failed.
    #[error("executor: {0}")]
    Executor(String),
    /// The push failed.
    #[error("registry: {0}")]
    Registry(#[from] tripod::registry::RegistryError),
}

/// Counts the agents keep.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Sessions that ended with an accepted result.
    pub accepted: AtomicU64,
    /// Sessions that failed (an error, or a result not accepted).
    pub failed: AtomicU64,
}

/// The agents of one namespace's build Pods; they stop when dropped.
#[derive(Debug)]
pub struct Agents {
    task: tokio::task::JoinHandle<()>,
    go: tokio::sync::watch::Sender<bool>,
    /// What they did.
    pub stats: Arc<AgentStats>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One shared layer: a gzipped tar holding `/bench.txt`.
fn layer() -> (Vec<u8>, String) {
    use std::io::Write;
    let mut tar = tar::Builder::new(Vec::new());
    let data = b"tripod bench\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    let _ = tar.append_data(&mut header, "bench.txt", &data[..]);
    let raw = tar.into_inner().unwrap_or_default();
    let diff_id = tripod::index::digest_of(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(&raw);
    (gz.finish().unwrap_or_default(), diff_id)
}

impl Agents {
    /// Holds new sessions back (a Pod's agent waits, as one whose
    /// container starts late would) until [`Agents::resume`].
    pub fn pause(&self) {
        self.go.send_replace(false);
    }

    /// Lets held sessions and new ones run.
    pub fn resume(&self) {
        self.go.send_replace(true);
    }

    /// Starts agents for the build Pods of `namespace`, at most
    /// `concurrency` sessions at once.
    pub fn start(client: Client, namespace: &str, concurrency: usize) -> Agents {
        let (go, go_rx) = tokio::sync::watch::channel(true);
        let stats = Arc::new(AgentStats::default());
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let secrets: Api<Secret> = Api::namespaced(client, namespace);
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let layer = Arc::new(layer());
        let s = stats.clone();
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=tripod");
            let mut events = watcher(pods, config).applied_objects().boxed();
            while let Some(event) = events.next().await {
                let Ok(pod) = event else { continue };
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let done = pod
                    .annotations()
                    .contains_key(tripod::outcome::ANNOTATION_RESULT);
                let Some(uid) = pod.uid() else { continue };
                if !running || done || !seen.insert(uid) {
                    continue;
                }
                let (secrets, limit, layer, stats, mut go) = (
                    secrets.clone(),
                    limit.clone(),
                    layer.clone(),
                    s.clone(),
                    go_rx.clone(),
                );
                tokio::spawn(async move {
                    if go.wait_for(|g| *g).await.is_err() {
                        return;
                    }
                    let Ok(_permit) = limit.acquire_owned().await else {
                        return;
                    };
                    match run(&pod, &secrets, &layer).await {
                        Ok(()) => stats.accepted.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(pod = %pod.name_any(), error = %e, "bench agent failed");
                            stats.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                });
            }
        });
        Agents { task, go, stats }
    }
}

/// `pod` lacks `what` a build Pod has.
fn missing(pod: &Pod, what: &str) -> AgentError {
    AgentError::Pod {
        pod: pod.name_any(),
        what: what.to_string(),
    }
}

/// One build Pod's session, as its agent would run it.
async fn run(
    pod: &Pod,
    secrets: &Api<Secret>,
    layer: &(Vec<u8>, String),
) -> Result<(), AgentError> {
    let missing = |what: &str| missing(pod, what);
    let env: BTreeMap<String, String> = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "agent"))
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .ok_or_else(|| missing(&format!("no {k}")))
    };
    let secret = secrets.get(&pod.name_any()).await?;
    let data = secret.data.unwrap_or_default();
    let token = data
        .get("token")
        .ok_or_else(|| missing("token Secret has no token"))?;
    let ca = data
        .get("ca.crt")
        .ok_or_else(|| missing("token Secret has no ca.crt"))?;
    let address = var("TRIPOD_EXECUTOR_ADDRESS")?;
    let host = address
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| address.clone());
    let exec = |e: tonic::transport::Error| AgentError::Executor(e.to_string());
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .map_err(exec)?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name(host)
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.0)),
        )
        .map_err(exec)?
        .connect()
        .await
        .map_err(exec)?;
    let mut client = pb::executor_client::ExecutorClient::new(channel);
    // As the real agent does, a Hello answered UNAVAILABLE (the status does
    // not record this attempt yet) is said again, for up to 180 s.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        match session(&mut client, pod, &env, &token.0, layer).await {
            Err(AgentError::Executor(m))
                if m.starts_with("UNAVAILABLE") && std::time::Instant::now() < until =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// One executor session: Hello, Assignment, a step, the push, the outcome.
async fn session(
    client: &mut pb::executor_client::ExecutorClient<tonic::transport::Channel>,
    pod: &Pod,
    env: &BTreeMap<String, String>,
    token: &[u8],
    layer: &(Vec<u8>, String),
) -> Result<(), AgentError> {
    let missing = |what: &str| missing(pod, what);
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .ok_or_else(|| missing(&format!("no {k}")))
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let send = |m: pb::agent_message::Message| {
        let tx = tx.clone();
        async move {
            tx.send(pb::AgentMessage { message: Some(m) })
                .await
                .map_err(|_| AgentError::Executor("session closed".into()))
        }
    };
    send(pb::agent_message::Message::Hello(pb::Hello {
        token: String::from_utf8_lossy(token).to_string(),
        namespace: var("TRIPOD_NAMESPACE")?,
        image_build: var("TRIPOD_IMAGEBUILD")?,
        build_id: var("TRIPOD_BUILD_ID")?,
        platform: var("TRIPOD_PLATFORM")?,
        attempt: var("TRIPOD_ATTEMPT")?
            .parse()
            .map_err(|_| missing("TRIPOD_ATTEMPT is not a number"))?,
        agent_version: "tripod-bench".into(),
        pod: var("TRIPOD_POD_NAME")?,
        image_build_uid: var("TRIPOD_IMAGEBUILD_UID")?,
    }))
    .await?;
    let status = |s: tonic::Status| {
        let code = format!("{:?}", s.code()).to_uppercase();
        AgentError::Executor(format!("{code}: {}", s.message()))
    };
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(status)?
        .into_inner();
    let assignment = loop {
        match inbound.message().await.map_err(status)? {
            Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Assignment(a)),
            }) => break a,
            Some(_) => continue,
            None => return Err(AgentError::Executor("no assignment".into())),
        }
    };
    send(pb::agent_message::Message::Progress(pb::Progress {
        step: "STEP 1/1: COPY bench.txt /bench.txt".into(),
        log_lines: Vec::new(),
    }))
    .await?;
    let (os, arch) = assignment
        .platform
        .split_once('/')
        .ok_or_else(|| missing("platform is not os/arch"))?;
    let config = serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {"Labels": assignment.labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.1]},
    });
    let registry = RegistryClient::new(
        assignment
            .tags
            .iter()
            .filter(|_| assignment.insecure)
            .filter_map(|t| t.split('/').next().map(str::to_string))
            .collect(),
    );
    // As buildah does, a failed push is tried again.
    let mut tries = 0;
    let (digest, size) = loop {
        tries += 1;
        match registry
            .push_image(
                &assignment.tags,
                vec![layer.0.clone()],
                serde_json::to_vec(&config).unwrap_or_default(),
                None,
            )
            .await
        {
            Ok(pushed) => break pushed,
            Err(e) if tries >= 3 => return Err(e.into()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    send(pb::agent_message::Message::Outcome(pb::Outcome {
        outcome: Some(pb::outcome::Outcome::Pushed(pb::Pushed { digest, size })),
    }))
    .await?;
    loop {
        match inbound.message().await.map_err(status)? {
            Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Ack(a)),
            }) => {
                return if a.accepted {
                    Ok(())
                } else {
                    Err(AgentError::Executor(format!("not accepted: {}", a.message)))
                };
            }
            Some(_) => continue,
            None => return Err(AgentError::Executor("no ack".into())),
        }
    }
}
