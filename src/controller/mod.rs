//! The ImageBuild controller: read → validate → plan → apply → status.
//!
//! `plan` and `validate` are pure and unit-tested; this module does the I/O:
//! it lists what the plan needs, applies the plan with server-side apply
//! under one field manager, publishes Events and keeps the metrics.

pub mod cached_pod;
pub mod endpoint;
pub mod events;
pub mod index;
pub mod lease;
pub mod plan;
pub mod pod;
mod runner_leg;
pub mod runners;
pub mod validate;
pub mod windows;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, SeccompProfile, Secret, SecurityContext};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, field};

use crate::api::{
    BuildRunner, ImageBuild, ImageBuildStatus, LABEL_ATTEMPT, LABEL_BUILD_ID, LABEL_NAME, Phase,
    RunnerPhase,
};
use crate::executor::runners::{LeaseKey, NoRunner, RunnerHub};
use crate::executor::token::{self, TokenKey};
use crate::http::{self, Health};
use crate::leader::{LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
use crate::outcome::{ANNOTATION_FAILURE, ANNOTATION_RESULT, ANNOTATION_RESULT_MAC, Failed};
use crate::platform::{Os, Platform};
use cached_pod::CachedPod;
use k8s_openapi::api::coordination::v1::Lease;
use plan::{EventKind, Observed};
use pod::{PodSettings, name_label};

/// The field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "tripod-controller";

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// An API request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The HTTP server could not start.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// Leader election failed.
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    /// Another replica took the Lease: this one stops so it restarts clean.
    #[error("lost leadership of lease {0}")]
    LostLeadership(String),
    /// The executor TLS material could not be prepared.
    #[error(transparent)]
    ExecutorTls(#[from] crate::executor::tls::ExecutorTlsError),
    /// The API server refused a build Pod (the message says why); retried
    /// with backoff.
    #[error("{0}")]
    PodRejected(String),
    /// The token key could not be read or created, or a token issued.
    #[error(transparent)]
    Token(#[from] crate::executor::token::TokenError),
    /// A Secret with a build Pod's name exists but is not its token Secret
    /// (another owner, or not made by Tripod): the Pod is not created.
    #[error("{0}")]
    TokenSecretConflict(String),
    /// A signal handler could not be installed.
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    /// The ImageBuild has no namespace (it is namespaced: a malformed event).
    #[error("ImageBuild {0} has no namespace")]
    NoNamespace(String),
    /// A runner reported an outcome while its lease was being expired:
    /// the reconcile is repeated with what was recorded.
    #[error("{0}")]
    LeaseChanged(String),
    /// The base image of a Windows platform could not be read (the
    /// registry did not answer): retried with backoff.
    #[error("{0}")]
    BaseImageUnreadable(String),
    /// The image index could not be pushed (the registry did not answer,
    /// refused the push): retried with backoff until `spec.timeout`.
    #[error("{0}")]
    IndexPush(String),
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ControllerError {
    let action = action.into();
    move |source| ControllerError::Kube { action, source }
}

/// Settings of `tripod controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerConfig {
    /// Watch ImageBuilds in this namespace only (default: all namespaces).
    #[arg(long, env = "TRIPOD_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "TRIPOD_METRICS_ADDRESS")]
    pub metrics_address: SocketAddr,
    /// Namespace of the leader-election Lease (default: the controller's own, from
    /// POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "tripod-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds between Lease renewals.
    #[arg(long, default_value_t = 2)]
    pub lease_renew_seconds: u64,
    /// Seconds the leader keeps leading without a successful renewal; then
    /// it stops reconciling and serving the executor. Must be more than
    /// --lease-renew-seconds and less than --lease-duration-seconds.
    #[arg(long, default_value_t = 10)]
    pub lease_renew_deadline_seconds: u64,
    /// Image of the agent container of Linux build Pods. It fetches git
    /// sources with `git`, so by default it is the buildd image, which
    /// carries git (the controller image holds only the `tripod` binary).
    #[arg(long, env = "TRIPOD_AGENT_IMAGE", default_value = concat!("ghcr.io/tripod-build/tripod-buildd:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// Image of the buildd sidecar of Linux build Pods (carries buildah).
    #[arg(long, env = "TRIPOD_BUILDD_IMAGE", default_value = concat!("ghcr.io/tripod-build/tripod-buildd:", env!("CARGO_PKG_VERSION")))]
    pub buildd_image: String,
    /// Image of the buildd sidecar of Windows build Pods.
    #[arg(long, env = "TRIPOD_WINDOWS_BUILDD_IMAGE", default_value = concat!("ghcr.io/tripod-build/tripod-buildd-windows:", env!("CARGO_PKG_VERSION")))]
    pub windows_buildd_image: String,
    /// Where Windows build Pods dial the node's buildkitd (a Windows service
    /// beside containerd; HostProcess containers share its named pipe and
    /// loopback): `npipe:////./pipe/buildkitd` or `tcp://127.0.0.1:PORT`.
    #[arg(
        long,
        env = "TRIPOD_WINDOWS_BUILDKIT_ADDR",
        default_value = "npipe:////./pipe/buildkitd"
    )]
    pub windows_buildkit_addr: String,
    /// Address agents in build Pods dial to reach this controller.
    #[arg(
        long,
        env = "TRIPOD_EXECUTOR_ADDRESS",
        default_value = "tripod.tripod-system.svc:9443"
    )]
    pub executor_address: String,
    /// ServiceAccount of build Pods.
    #[arg(long, env = "TRIPOD_BUILD_SERVICE_ACCOUNT")]
    pub build_service_account: Option<String>,
    /// Address the executor gRPC service (TLS) listens on.
    #[arg(long, default_value = "0.0.0.0:9443", env = "TRIPOD_EXECUTOR_LISTEN")]
    pub executor_listen: SocketAddr,
    /// DNS names and IP addresses of the executor serving certificate, used
    /// when the controller creates its TLS Secret (default: tripod,
    /// tripod.<namespace>.svc, localhost, 127.0.0.1).
    #[arg(long = "executor-tls-san")]
    pub executor_tls_sans: Vec<String>,
    /// The securityContext of the buildd container of Linux build Pods, as
    /// JSON (a Kubernetes SecurityContext), replacing the default: root,
    /// not privileged, no privilege escalation, the runtime's default
    /// capabilities, `--buildd-seccomp-profile` (a context without a
    /// seccompProfile gets the Pod's, RuntimeDefault). buildah without
    /// CAP_SYS_ADMIN needs a user namespace (docs/security.md), which the
    /// runtime's default seccomp profile refuses; with it buildd mounts
    /// overlay storage instead of vfs, e.g.
    /// '{"runAsUser":0,"capabilities":{"add":["SYS_ADMIN"]},"appArmorProfile":{"type":"Unconfined"}}'
    #[arg(long, value_name = "JSON", value_parser = parse_security_context)]
    pub buildd_security_context: Option<SecurityContext>,
    /// Run Linux build Pods in a user namespace (`hostUsers: false`): root
    /// in the Pod is an unprivileged user on the node. Needs a node and
    /// runtime with user-namespace support.
    #[arg(long)]
    pub build_pod_user_namespace: bool,
    /// The seccomp profile of the buildd container of Linux build Pods:
    /// `RuntimeDefault`, `Unconfined`, or the path of a Localhost profile
    /// under the kubelet's seccomp directory. The default,
    /// `tripod/buildd.json`, is the runtime's default profile plus the
    /// system calls buildah needs for a user namespace of its own (the chart
    /// installs it on every node; docs/security.md). Not used when
    /// `--buildd-security-context` is given.
    #[arg(
        long,
        default_value = crate::controller::pod::DEFAULT_BUILDD_SECCOMP_PROFILE,
        env = "TRIPOD_BUILDD_SECCOMP_PROFILE",
        value_parser = crate::controller::pod::parse_seccomp_profile,
    )]
    pub buildd_seccomp_profile: SeccompProfile,
    /// Most concurrent executor sessions (one per running build Pod);
    /// more are refused with RESOURCE_EXHAUSTED and the agent retries.
    #[arg(long, default_value_t = 2000, env = "TRIPOD_EXECUTOR_MAX_SESSIONS")]
    pub executor_max_sessions: usize,
    /// Label selector of the BuildRunners this controller manages (their
    /// tokens, status and leases), when several Tripod installations share a
    /// cluster; BuildRunners it does not select do not exist for it.
    /// Default: all.
    #[arg(long, value_name = "SELECTOR", env = "TRIPOD_BUILDRUNNER_SELECTOR")]
    pub buildrunner_selector: Option<String>,
    /// Where ImageBuilds may place their build Pods.
    #[command(flatten)]
    pub placement: validate::PlacementPolicy,
    /// Most ImageBuilds reconciled at once (0: no bound). Each reconcile
    /// may hold API requests open; the bound keeps a burst of thousands of
    /// new builds from opening as many connections.
    #[arg(long, default_value_t = 256, env = "TRIPOD_RECONCILE_CONCURRENCY")]
    pub reconcile_concurrency: u16,
    /// Milliseconds a reconcile waits for more changes of the same build
    /// (its Pod created, bound and started in quick succession) before it
    /// runs, so that they are handled once.
    #[arg(long, default_value_t = 0, env = "TRIPOD_RECONCILE_DEBOUNCE_MS")]
    pub reconcile_debounce_ms: u64,
    /// Least milliseconds between two writes of a platform's current step.
    #[arg(long, default_value_t = 2000)]
    pub step_interval_ms: u64,
    /// A selector-less Service in the Lease's namespace whose endpoint the
    /// leader publishes (an EndpointSlice holding `--pod-ip`), so that
    /// agents reach the leader alone while every replica is Ready. The
    /// chart sets it to its Service.
    #[arg(long, env = "TRIPOD_EXECUTOR_SERVICE", requires = "pod_ip")]
    pub executor_service: Option<String>,
    /// This replica's Pod IP (the chart sets it from `status.podIP`).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// This replica's Pod UID (the chart sets it from `metadata.uid`): the
    /// published EndpointSlice is owned by the Pod, so it goes with it.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
}

/// Parses `--buildd-security-context`: a JSON Kubernetes SecurityContext,
/// unknown fields refused so that a typo does not silently drop a setting.
fn parse_security_context(json: &str) -> Result<SecurityContext, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let parsed: SecurityContext = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a Kubernetes SecurityContext: {e}"))?;
    let round_trip = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
    match unknown_field(&value, &round_trip, "") {
        Some(path) => Err(format!("unknown SecurityContext field {path:?}")),
        None => Ok(parsed),
    }
}

/// The first object key of `given` (as a dotted path) that `known`, the
/// same JSON after a round trip through the Kubernetes type, lacks.
fn unknown_field(
    given: &serde_json::Value,
    known: &serde_json::Value,
    prefix: &str,
) -> Option<String> {
    let (serde_json::Value::Object(given), serde_json::Value::Object(known)) = (given, known)
    else {
        return None;
    };
    given.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known.get(key) {
            None => Some(path),
            Some(k) => unknown_field(value, k, &path),
        }
    })
}

impl ControllerConfig {
    fn pod_settings(&self) -> PodSettings {
        PodSettings {
            agent_image: self.agent_image.clone(),
            buildd_image: self.buildd_image.clone(),
            windows_buildd_image: self.windows_buildd_image.clone(),
            windows_buildkit_addr: self.windows_buildkit_addr.clone(),
            executor_address: self.executor_address.clone(),
            service_account: self.build_service_account.clone(),
            buildd_security_context: self.buildd_security_context.clone(),
            user_namespace: self.build_pod_user_namespace,
            buildd_seccomp_profile: self.buildd_seccomp_profile.clone(),
            placement: self.placement.clone(),
        }
    }
}

/// Shared state of reconciles.
pub struct Context {
    client: Client,
    settings: PodSettings,
    metrics: Metrics,
    events: events::EventWriter,
    builds: Store<ImageBuild>,
    runners: Store<BuildRunner>,
    failures: Mutex<HashMap<ObjectRef<ImageBuild>, u32>>,
    executor_ca: String,
    token_key: TokenKey,
    leases: Store<Lease>,
    hub: Arc<RunnerHub>,
    /// The caches (ImageBuilds, BuildRunners, Leases) have loaded.
    synced: Arc<AtomicBool>,
    /// Base images of Windows platforms, read once per generation.
    windows_bases: Mutex<HashMap<(String, i64), BTreeMap<String, windows::BaseBuild>>>,
    /// Build Pods (Tripod's label), from a watch.
    pods: Store<CachedPod>,
    /// The cached Pods of each ImageBuild.
    pod_index: Arc<Mutex<PodIndex>>,
    /// The status this process last wrote per ImageBuild (by UID): the
    /// resourceVersion the cache showed then and a hash of the status.
    /// While the cache still shows that version, the write has not come
    /// back through the watch, and the same status is not written again.
    written: Mutex<HashMap<String, (String, u64)>>,
    /// Build Pods this process created (`{owner UID}/{name}`), when, and
    /// whether the cache has shown them since: until it does, a reconcile
    /// does not create them again.
    created: Mutex<HashMap<String, Created>>,
}

/// A build Pod this process created.
#[derive(Debug, Clone, Copy)]
struct Created {
    at: Instant,
    /// The Pod cache has shown it since.
    seen: bool,
}
/// How long a created build Pod is trusted to exist while the cache does
/// not show it yet.
const CREATED_MEMORY: Duration = Duration::from_secs(30);

/// A status about to be written, and whether this process wrote exactly
/// it already while the cache has not caught up.
struct StatusWrite {
    uid: String,
    resource_version: String,
    hash: u64,
    already: bool,
}

impl Context {
    /// Looks up the last status written for `ib`. A record whose version
    /// the cache has moved past is dropped: from then on the cache tells.
    fn written_status(&self, ib: &ImageBuild, status: &ImageBuildStatus) -> StatusWrite {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(status)
            .unwrap_or_default()
            .hash(&mut h);
        let uid = ib.uid().unwrap_or_default();
        let resource_version = ib.resource_version().unwrap_or_default();
        let hash = h.finish();
        let mut already = false;
        if let Ok(mut m) = self.written.lock() {
            match m.get(&uid) {
                Some((rv, hs)) if *rv == resource_version => already = *hs == hash,
                Some(_) => {
                    m.remove(&uid);
                }
                None => {}
            }
        }
        StatusWrite {
            uid,
            resource_version,
            hash,
            already,
        }
    }

    /// Drops the status records the cache has caught up with (it shows a
    /// later version than the one seen when the status was written), and
    /// those of ImageBuilds no longer in it (deleted; no reconcile follows
    /// a deletion). A finished build is not reconciled again, so its record
    /// would otherwise stay.
    fn forget_deleted(&self) {
        let versions: HashMap<String, String> = self
            .builds
            .state()
            .iter()
            .filter_map(|b| Some((b.uid()?, b.resource_version()?)))
            .collect();
        if let Ok(mut m) = self.written.lock() {
            m.retain(|uid, (rv, _)| versions.get(uid) == Some(rv));
        }
    }

    /// Records a status written.
    fn remember_status(&self, w: StatusWrite) {
        if let Ok(mut m) = self.written.lock() {
            m.insert(w.uid, (w.resource_version, w.hash));
        }
    }

    /// Whether this process created `pod` for the ImageBuild `owner` (its
    /// UID) recently, and the Pod cache has not shown it yet.
    fn created_unseen(&self, owner: &str, pod: &str) -> bool {
        let key = format!("{owner}/{pod}");
        self.created
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
            .is_some_and(|c| !c.seen && c.at.elapsed() < CREATED_MEMORY)
    }

    /// The build Pods this process created for the ImageBuild `owner` (its
    /// UID) less than [`plan::STATUS_HOLD`] ago.
    fn just_created(&self, owner: &str) -> BTreeSet<String> {
        let prefix = format!("{owner}/");
        self.created
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, c)| c.at.elapsed() < plan::STATUS_HOLD)
                    .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a build Pod created by this process; forgets old records.
    fn remember_created(&self, owner: &str, pod: &str) {
        if let Ok(mut m) = self.created.lock() {
            m.retain(|_, c| c.at.elapsed() < CREATED_MEMORY);
            let created = Created {
                at: Instant::now(),
                seen: false,
            };
            m.insert(format!("{owner}/{pod}"), created);
        }
    }

    /// Forgets the records of Pods the cache now shows: from then on it
    /// tells (a deleted Pod is created again when the plan wants it).
    fn seen_created(&self, owner: &str, pods: &[CachedPod]) {
        if let Ok(mut m) = self.created.lock() {
            for p in pods {
                if let Some(c) = m.get_mut(&format!("{owner}/{}", p.name_any())) {
                    c.seen = true;
                }
            }
        }
    }
}

/// Runs the controller until SIGTERM/SIGINT, or until leadership is lost.
pub async fn run(cfg: ControllerConfig) -> Result<(), ControllerError> {
    let client = Client::try_default()
        .await
        .map_err(ControllerError::Client)?;
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let leading = Arc::new(AtomicBool::new(false));

    let identity = cfg.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "tripod".into());
        format!("{host}-{}", std::process::id())
    });
    let lease_namespace = cfg
        .lease_namespace
        .clone()
        .or_else(|| cfg.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let lease = LeaseConfig {
        namespace: lease_namespace,
        name: cfg.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(cfg.lease_duration_seconds),
        renew_every: Duration::from_secs(cfg.lease_renew_seconds),
        renew_deadline: Duration::from_secs(cfg.lease_renew_deadline_seconds),
    };
    lease.validate()?;
    let elector = LeaderElector::new(client.clone(), lease);
    let bound = http::serve(
        cfg.metrics_address,
        Health {
            leading: leading.clone(),
            synced: ready.clone(),
            standing_by: elector.standing_by(),
            metrics: metrics.clone(),
        },
    )
    .await?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");

    let shutdown = shutdown_signal()?;
    // `true` once this replica stops: on SIGTERM/SIGINT, or when it can no
    // longer renew its Lease. The executor service and the reconciler stop
    // on it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            }
            .instrument(tracing::info_span!("signals")),
        );
    }
    let mut on_signal = stop_rx.clone();
    let held_since = tokio::select! {
        r = elector.acquire() => r?,
        _ = on_signal.wait_for(|s| *s) => {
            tracing::info!("stopping before leadership was acquired");
            return Ok(());
        }
    };
    leading.store(true, Ordering::SeqCst);
    metrics.leader.set(1);
    tracing::info!(%identity, lease = %cfg.lease_name, "leading");
    // Renewals start at once, before anything else is set up: a replica
    // that cannot renew stops (`stop_rx`) whatever it is doing.
    let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
    {
        let holder = elector.clone();
        let stop_tx = stop_tx.clone();
        tokio::spawn(
            async move {
                holder.hold(held_since).await;
                let _ = lost_tx.send(true);
                let _ = stop_tx.send(true);
            }
            .instrument(tracing::info_span!("lease")),
        );
    }

    let tls_namespace = elector.config().namespace.clone();
    let sans = if cfg.executor_tls_sans.is_empty() {
        vec![
            "tripod".to_string(),
            format!("tripod.{tls_namespace}.svc"),
            format!("tripod.{tls_namespace}.svc.cluster.local"),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ]
    } else {
        cfg.executor_tls_sans.clone()
    };
    let executor_tls = crate::executor::tls::ensure(&client, &tls_namespace, &sans).await?;
    let token_key = token::ensure_key(&client, &tls_namespace).await?;

    let (ib_api, pod_api): (Api<ImageBuild>, Api<CachedPod>) = match &cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let runner_api: Api<BuildRunner> = Api::all(client.clone());
    let (runner_store, runner_writer) = reflector::store();
    // Every ImageBuild is looked at again when a runner's spec or phase
    // changes (not for its heartbeat time or active builds).
    let mut seen: HashMap<String, (Option<i64>, Option<RunnerPhase>)> = HashMap::new();
    let runner_events = reflector::reflector(
        runner_writer,
        watcher(
            runner_api,
            match &cfg.buildrunner_selector {
                Some(selector) => watcher::Config::default().labels(selector),
                None => watcher::Config::default(),
            },
        ),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(move |r| {
        let changed = match r {
            Ok(r) => {
                let now = (
                    r.metadata.generation,
                    r.status.as_ref().and_then(|s| s.phase),
                );
                seen.insert(r.name_any(), now) != Some(now)
            }
            Err(e) => {
                tracing::warn!(error = %e, "BuildRunner watch failed");
                false
            }
        };
        async move { changed.then_some(()) }
    });
    // Runner Lease objects, cached for the hub and the executor service;
    // a change reconciles the owning ImageBuild.
    let lease_api: Api<Lease> = match &cfg.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (lease_store, lease_writer) = reflector::store();
    let lease_events = reflector::reflector(
        lease_writer,
        watcher(
            lease_api,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=tripod"),
        ),
    )
    .default_backoff()
    .touched_objects();
    // Build Pods, cached as the plan reads them (decoded into `CachedPod`,
    // managedFields dropped): a reconcile reads its build's Pods here
    // instead of listing them from the API server.
    let (pod_store, pod_writer) = reflector::store();
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(
            pod_api,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=tripod"),
        )
        .modify(CachedPod::slim),
    )
    .default_backoff();
    // Changed Pods reconcile their owner. A re-list (after 410 Gone)
    // reconciles every build once the cache holds the new list: the Pods
    // re-announced during the list would be planned on the old one, and
    // Pods deleted meanwhile announce nothing.
    let pod_index = Arc::new(Mutex::new(PodIndex::default()));
    let (relisted_tx, relisted_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pod_events = {
        let index = pod_index.clone();
        pod_events.filter_map(move |ev| {
            if let (Ok(e), Ok(mut i)) = (&ev, index.lock()) {
                i.apply(e);
            }
            let out = match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::Delete(p)) => Some(Ok(p)),
                Ok(watcher::Event::InitDone) => {
                    let _ = relisted_tx.send(());
                    None
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(out)
        })
    };
    let runner_events = futures::stream::select(
        runner_events,
        tokio_stream::wrappers::UnboundedReceiverStream::new(relisted_rx),
    );
    let (trigger_tx, trigger_rx) = tokio::sync::mpsc::unbounded_channel();
    let hub = RunnerHub::new(lease_store.clone(), trigger_tx);

    // ImageBuilds, cached without managedFields and kubectl's copy of the
    // last applied spec (a large share of each object, never read here).
    let (ib_store, ib_writer) = reflector::store();
    let ib_events = reflector::reflector(
        ib_writer,
        watcher(ib_api, watcher::Config::default().any_semantic()).modify(slim_build),
    )
    .default_backoff()
    .applied_objects();
    let controller = Controller::for_stream(ib_events, ib_store)
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(cfg.reconcile_concurrency)
                .debounce(Duration::from_millis(cfg.reconcile_debounce_ms)),
        )
        .owns_stream(pod_events)
        .owns_stream(lease_events)
        .reconcile_all_on(runner_events)
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            trigger_rx,
        ));
    let builds = controller.store();
    {
        let service = crate::executor::grpc::ExecutorService::new(
            crate::executor::Executors::new(crate::executor::ExecutorsConfig {
                client: client.clone(),
                key: token_key.clone(),
                builds: Some(builds.clone()),
                max_sessions: cfg.executor_max_sessions,
                runners: Some(runner_store.clone()),
                hub: Some(hub.clone()),
                synced: ready.clone(),
            }),
            Duration::from_millis(cfg.step_interval_ms),
        );
        let mut stop = stop_rx.clone();
        let tls = executor_tls.clone();
        let addr = cfg.executor_listen;
        tokio::spawn(
            async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                tracing::info!(%addr, "serving the executor service");
                if let Err(e) = crate::executor::grpc::serve(addr, &tls, service, shutdown).await {
                    tracing::error!(error = %e, "executor service stopped");
                }
            }
            .instrument(tracing::info_span!("executor_service")),
        );
    }

    let events = events::EventWriter::new(client.clone(), FIELD_MANAGER, &identity);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: cfg.pod_settings(),
        metrics: metrics.clone(),
        events,
        builds: builds.clone(),
        runners: runner_store.clone(),
        failures: Mutex::new(HashMap::new()),
        executor_ca: executor_tls.ca_pem.clone(),
        token_key: token_key.clone(),
        leases: lease_store.clone(),
        hub: hub.clone(),
        synced: ready.clone(),
        windows_bases: Mutex::new(HashMap::new()),
        pods: pod_store.clone(),
        pod_index,
        created: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
    });
    // The gauges are counted from the caches on a timer, off the reconcile
    // path (a count per reconcile would scan every ImageBuild each time).
    {
        let ctx = ctx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        update_gauges(&ctx);
                        ctx.forget_deleted();
                    }
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        });
    }
    {
        let upkeep = runners::Upkeep {
            client: client.clone(),
            namespace: tls_namespace.clone(),
            key: token_key,
            ca_pem: executor_tls.ca_pem.clone(),
            runners: runner_store.clone(),
            hub: hub.clone(),
        };
        let mut stop = stop_rx.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = upkeep.run() => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            .instrument(tracing::info_span!("runners")),
        );
    }

    let endpoint = match (&cfg.executor_service, cfg.pod_ip) {
        (Some(service), Some(address)) => Some(endpoint::LeaderEndpoint {
            namespace: tls_namespace.clone(),
            service: service.clone(),
            address,
            ports: vec![
                ("executor".to_string(), cfg.executor_listen.port()),
                ("metrics".to_string(), bound.port()),
            ],
            pod: cfg.identity.clone().zip(cfg.pod_uid.clone()),
        }),
        _ => None,
    };
    let readiness = {
        let ready = ready.clone();
        let builds = builds.clone();
        let runners = runner_store.clone();
        let leases = lease_store.clone();
        let pods = pod_store.clone();
        let client = client.clone();
        let endpoint = endpoint.clone();
        let stop = stop_rx.clone();
        let lost = lost_rx.clone();
        tokio::spawn(
            async move {
                let all_synced = async {
                    if let Err(e) = synced(&builds).await {
                        tracing::error!(error = %e, "ImageBuild cache never synced");
                        return false;
                    }
                    if let Err(e) = synced(&runners).await {
                        tracing::error!(error = %e, "BuildRunner cache never synced");
                        return false;
                    }
                    if let Err(e) = synced(&leases).await {
                        tracing::error!(error = %e, "Lease cache never synced");
                        return false;
                    }
                    if let Err(e) = synced(&pods).await {
                        tracing::error!(error = %e, "Pod cache never synced");
                        return false;
                    }
                    true
                };
                // A replica stopping before its caches loaded never turns
                // ready nor publishes itself.
                let mut stopping = stop.clone();
                let ok = tokio::select! {
                    ok = all_synced => ok && !*stop.borrow(),
                    _ = stopping.wait_for(|s| *s) => false,
                };
                if !ok {
                    return;
                }
                ready.store(true, Ordering::SeqCst);
                tracing::info!("watches synced; ready");
                if let Some(endpoint) = endpoint {
                    endpoint.keep(&client, stop, lost).await;
                }
            }
            .instrument(tracing::info_span!("readiness")),
        )
    };

    // Not ready from the moment it stops (its executor service stops then).
    {
        let ready = ready.clone();
        let mut stopping = stop_rx.clone();
        tokio::spawn(async move {
            let _ = stopping.wait_for(|s| *s).await;
            ready.store(false, Ordering::SeqCst);
        });
    }
    let stop = {
        let mut stopping = stop_rx.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    };
    // In-flight reconciles get a grace period to finish: short when the
    // Lease is lost (another replica may lead any moment now), longer on
    // SIGTERM. After it they are abandoned (a reconcile stuck on an API
    // server that does not answer must not keep a former leader writing).
    let abandon = {
        let mut stopping = stop_rx.clone();
        let mut lost = lost_rx.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
            // SIGTERM's grace ends early if the Lease is lost meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(SHUTDOWN_GRACE) => {}
                _ = lost.wait_for(|l| *l) => tokio::time::sleep(LOST_LEASE_GRACE).await,
            }
        }
    };

    let reconciling = controller
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        });
    tokio::select! {
        _ = reconciling => {}
        _ = abandon => tracing::warn!("in-flight reconciles abandoned at the end of the grace period"),
    }
    ready.store(false, Ordering::SeqCst);
    // The executor endpoint is withdrawn (unless the Lease was lost) before
    // the Lease is released, so the withdrawal cannot land after the next
    // leader's publish.
    if tokio::time::timeout(WITHDRAW_TIMEOUT, readiness)
        .await
        .is_err()
    {
        tracing::warn!("the executor endpoint was not withdrawn in time");
    }

    if *lost_rx.borrow() {
        return Err(ControllerError::LostLeadership(cfg.lease_name));
    }
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %e, "could not release the lease");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the queue-depth and runner gauges are counted.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping leader waits for its executor endpoint to be
/// withdrawn before it releases the Lease anyway.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight reconciles may take to finish once the Lease is lost.
const LOST_LEASE_GRACE: Duration = Duration::from_secs(1);
/// How long they may take on SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Waits until a store has seen its initial list. `Store::wait_until_ready`
/// wakes only the last of several concurrent waiters (the controller waits on
/// the same store), so poll it in short rounds rather than once.
async fn synced<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(res) =
            tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await
        {
            return res;
        }
    }
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ControllerError> {
    let mut stop = crate::os::StopSignals::new().map_err(ControllerError::Signal)?;
    Ok(async move {
        stop.recv().await;
    })
}

/// The windows-build selector of each Windows platform built in Pods,
/// or why the spec contradicts its base image. Reads the base images once
/// per generation, and only while the build may still create Pods.
async fn windows_selectors(
    ib: &ImageBuild,
    ctx: &Context,
) -> Result<(BTreeMap<String, String>, Option<validate::InvalidSpec>), String> {
    let finished = ib
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_finished())
        && ib.status.as_ref().and_then(|s| s.observed_generation) == ib.metadata.generation;
    let Ok(req) = validate::validate(&ib.spec) else {
        return Ok((BTreeMap::new(), None));
    };
    let platforms = windows::pod_platforms(&req);
    if platforms.is_empty() || finished {
        return Ok((BTreeMap::new(), None));
    }
    let key = (
        ib.uid().unwrap_or_default(),
        ib.metadata.generation.unwrap_or(0),
    );
    let cached = ctx
        .windows_bases
        .lock()
        .ok()
        .and_then(|c| c.get(&key).cloned());
    let bases = match cached {
        Some(b) => b,
        None => {
            let b = windows::read_bases(ib, &platforms).await?;
            for (p, base) in &b {
                tracing::info!(platform = %p, ?base, "Windows base image");
            }
            if let Ok(mut c) = ctx.windows_bases.lock() {
                if c.len() >= 4096 {
                    c.clear();
                }
                c.insert(key, b.clone());
            }
            b
        }
    };
    let spec_value = ib
        .spec
        .executor
        .as_ref()
        .and_then(|e| e.node_selector.get(pod::WINDOWS_BUILD_LABEL))
        .map(String::as_str);
    let mut out = BTreeMap::new();
    for p in &platforms {
        let base = bases
            .get(&p.to_string())
            .cloned()
            .unwrap_or_else(|| windows::BaseBuild::Unknown("not read".into()));
        match windows::selector(spec_value, p, &base) {
            Ok(Some(build)) => {
                out.insert(p.to_string(), build);
            }
            Ok(None) => {}
            Err(invalid) => return Ok((out, Some(invalid))),
        }
    }
    Ok((out, None))
}

/// The request and the platform digests of a build whose platforms all
/// succeeded (per its status, for its current build and generation) and
/// whose index is still to be pushed.
fn index_due(ib: &ImageBuild) -> Option<(validate::BuildRequest, Vec<String>)> {
    let status = ib.status.as_ref()?;
    if ib.spec.cancel
        || status.build_id.as_deref() != Some(ib.build_id().as_str())
        || status.observed_generation != ib.metadata.generation
    {
        return None;
    }
    let req = validate::validate(&ib.spec).ok()?;
    // Out of time: the plan fails the build; no index goes out first.
    let started = status.start_time.as_ref()?.0;
    let elapsed_ms = jiff::Timestamp::now().as_millisecond() - started.as_millisecond();
    if u128::try_from(elapsed_ms).unwrap_or(0) >= req.timeout.as_millis() {
        return None;
    }
    let same_platforms = req.platforms.len() == status.platforms.len()
        && req
            .platforms
            .iter()
            .zip(&status.platforms)
            .all(|(p, s)| p.to_string() == s.platform);
    if !req.index || !same_platforms {
        return None;
    }
    let children = plan::index_children(status)?;
    Some((req, children))
}

fn needs_runners(ib: &ImageBuild) -> bool {
    ib.spec
        .platforms
        .iter()
        .any(|p| p.parse::<Platform>().is_ok_and(|p| p.os() == Os::Darwin))
        || ib
            .spec
            .executor
            .as_ref()
            .is_some_and(|e| !e.runner_platforms.is_empty())
}

async fn reconcile(ib: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let span = tracing::info_span!(
        "reconcile",
        namespace = field::Empty,
        name = %ib.name_any(),
        build_id = field::Empty
    );
    let ns = ib
        .namespace()
        .ok_or_else(|| ControllerError::NoNamespace(ib.name_any()))?;
    span.record("namespace", ns.as_str());
    span.record("build_id", ib.build_id().as_str());
    let started = Instant::now();
    let result = reconcile_inner(&ib, &ns, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&ObjectRef::from_obj(ib.as_ref()));
    }
    result
}

async fn reconcile_inner(
    ib: &ImageBuild,
    ns: &str,
    ctx: &Context,
) -> Result<Action, ControllerError> {
    if ib.metadata.deletion_timestamp.is_some() {
        if let Ok(mut m) = ctx.written.lock() {
            m.remove(&ib.uid().unwrap_or_default());
        }
        // Its Pods go with it: the garbage collector follows their ownerReferences.
        return Ok(Action::await_change());
    }
    // Until the caches have loaded, a build's Pods (and a runner's
    // leases) would look absent: nothing is planned on them.
    if !ctx.synced.load(Ordering::SeqCst) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let name = ib.name_any();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let uid = ib.uid().unwrap_or_default();
    let owned = ctx
        .pod_index
        .lock()
        .map(|i| i.owned_by(&uid))
        .unwrap_or_default();
    let pods: Vec<CachedPod> = owned
        .into_iter()
        .filter_map(|key| ctx.pods.get(&key))
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && p.owner_references().iter().any(|o| o.uid == uid)
        })
        .map(|p| unsigned_result_to_failure((*p).clone(), &ctx.token_key))
        .collect();
    ctx.seen_created(&uid, &pods);
    // Runner leases: read fresh (like the Pods) when the build uses
    // runners or the cache shows it has some.
    let has_leases = ctx
        .leases
        .state()
        .iter()
        .any(|l| l.owner_references().iter().any(|o| o.uid == uid));
    let uses_runners = needs_runners(ib) || has_leases;
    let leases: Vec<Lease> = if uses_runners {
        Api::<Lease>::namespaced(ctx.client.clone(), ns)
            .list(&ListParams::default().labels(&format!("{LABEL_NAME}={}", name_label(&name))))
            .await
            .map_err(kube_err(format!("list Leases of {ns}/{name}")))?
            .items
            .into_iter()
            .filter(|l| l.owner_references().iter().any(|o| o.uid == uid))
            .map(|mut l| {
                unsigned_result_in(&mut l.metadata, "Lease", &ctx.token_key);
                l
            })
            .collect()
    } else {
        Vec::new()
    };
    let runners: Vec<BuildRunner> = if uses_runners {
        ctx.runners.state().iter().map(|r| (**r).clone()).collect()
    } else {
        Vec::new()
    };

    let secrets = if needs_secret_check(ib) {
        check_secrets(ib, ns, ctx).await?
    } else {
        SecretCheck::Usable
    };
    let (secret_problem, secret_missing) = match secrets {
        SecretCheck::Usable => (None, None),
        SecretCheck::Missing(message) => (None, Some(message)),
        SecretCheck::Refused(invalid) => (Some(invalid), None),
    };

    // The registry could not be asked: the Windows Pods wait (the
    // platforms saying why, retried with backoff); the rest goes on.
    let (windows_builds, windows_problem, windows_unreadable) =
        match windows_selectors(ib, ctx).await {
            Ok((builds, problem)) => (builds, problem, None),
            Err(message) => (BTreeMap::new(), None, Some(message)),
        };
    // Every platform pushed its manifest by digest (as recorded in the
    // status): their index is pushed now, and the plan records it.
    let index_outcome = match index_due(ib) {
        Some((req, children)) => Some(index::push(&ctx.client, ib, &req, &children).await),
        None => None,
    };
    let just_created = ctx.just_created(&uid);
    let plan = plan::plan(
        Observed {
            build: ib,
            pods: &pods,
            leases: &leases,
            runners: &runners,
            now: jiff::Timestamp::now(),
            secret_problem: secret_problem.as_ref().or(windows_problem.as_ref()),
            windows_builds: &windows_builds,
            index: index_outcome.as_ref(),
            just_created: &just_created,
        },
        &ctx.settings,
    );

    // Apply.
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut plan = plan;
    // A build Pod the API server refuses (a missing ServiceAccount, a quota,
    // Pod Security admission): said in the platform's status and an Event,
    // then retried with backoff, since fixing it happens outside the spec.
    let mut rejected: Option<String> = None;
    let mut windows_rejected: Option<String> = None;
    // Build Pods refused (platform, why): marked after the loop over
    // `plan.create`, which borrows the plan.
    let mut held_back: Vec<(String, String)> = Vec::new();
    let mut cache_behind = false;
    let generation = ib.metadata.generation.unwrap_or(0);
    // A Secret the build needs does not exist yet (it may be applied with
    // the ImageBuild, or made by another controller): no Pod until it does;
    // the platforms say so and the reconcile is retried with backoff.
    if let Some(message) = secret_missing
        && !plan.create.is_empty()
    {
        for pod in std::mem::take(&mut plan.create) {
            plan.hold_back(
                &pod_platform(&pod),
                plan::REASON_SECRET_NOT_FOUND,
                &message,
                generation,
                jiff::Timestamp::now(),
            );
        }
        rejected = Some(message);
    }
    if let Some(message) = windows_unreadable {
        let (windows, others): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut plan.create)
            .into_iter()
            .partition(|p| pod_platform(p).starts_with("windows"));
        plan.create = others;
        for pod in &windows {
            plan.hold_back(
                &pod_platform(pod),
                plan::REASON_BASE_IMAGE_UNREADABLE,
                &message,
                generation,
                jiff::Timestamp::now(),
            );
        }
        if !windows.is_empty() {
            windows_rejected = Some(message);
        }
    }
    for pod in &plan.create {
        let pod_name = pod.name_any();
        if ctx.created_unseen(&uid, &pod_name) {
            // Created by this process moments ago; the cache is behind.
            // Looked at again soon, in case it never shows. Its first
            // status waits no longer than for a Pod created now.
            cache_behind = true;
            plan.defer_status &= just_created.contains(&pod_name);
            continue;
        }
        if let Err(conflict) = ensure_token_secret(&secrets_api, ib, pod, ctx).await? {
            tracing::warn!(pod = %pod_name, "{conflict}");
            held_back.push((pod_platform(pod), conflict.clone()));
            rejected = Some(conflict);
            continue;
        }
        // Created, not applied: a build Pod is never changed after, and a
        // create costs the API server less than an apply of the whole Pod.
        let create = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match pods_api.create(&create, pod).await {
            Ok(_) => {
                ctx.remember_created(&uid, &pod_name);
                tracing::info!(pod = %pod_name, "created build Pod");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Created before (the cache is behind), or someone else's.
                match existing_pod(&pods_api, &pod_name, &uid).await? {
                    ExistingPod::Ours => ctx.remember_created(&uid, &pod_name),
                    // Deleted since: looked at again soon.
                    ExistingPod::Gone => cache_behind = true,
                    ExistingPod::Foreign(message) => {
                        // The token Secret just made for this name must not
                        // be mounted by that Pod: it goes again.
                        match secrets_api
                            .delete(&pod_name, &DeleteParams::default())
                            .await
                        {
                            Ok(_) => {}
                            Err(kube::Error::Api(s)) if s.code == 404 => {}
                            Err(e) => {
                                return Err(kube_err(format!(
                                    "delete token Secret {ns}/{pod_name}"
                                ))(e));
                            }
                        }
                        tracing::warn!(pod = %pod_name, "{message}");
                        held_back.push((pod_platform(pod), message.clone()));
                        rejected = Some(message);
                    }
                }
            }
            Err(kube::Error::Api(s)) if pod_refused(s.code) => {
                let message = format!("the API server refused build Pod {pod_name}: {}", s.message);
                tracing::warn!(pod = %pod_name, code = s.code, "{message}");
                held_back.push((pod_platform(pod), message.clone()));
                rejected = Some(message);
            }
            Err(e) => return Err(kube_err(format!("create Pod {ns}/{pod_name}"))(e)),
        }
    }
    for (platform, message) in held_back {
        plan.hold_back(
            &platform,
            plan::REASON_POD_REJECTED,
            &message,
            generation,
            jiff::Timestamp::now(),
        );
    }
    plan.drop_repeated_warnings(ib.status.as_ref());
    for pod_name in &plan.delete {
        match pods_api.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pod = %pod_name, "deleted build Pod"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("delete Pod {ns}/{pod_name}"))(e)),
        }
        match secrets_api.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("delete token Secret {ns}/{pod_name}"))(e)),
        }
    }

    let pokes = apply_leases(ib, ns, &leases, &mut plan, ctx).await?;

    // Status.
    let ib_api: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), ns);
    // A build finishing by this plan may have finished already: the cache
    // can be behind the API server (a re-list after it restarted). Asked
    // directly, once per final transition: if so, its status, Events and
    // metrics are not written a second time.
    let finishes_now = plan.status.phase.is_some_and(Phase::is_finished)
        && !ib
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_finished);
    if (!plan.finished.is_empty() || finishes_now)
        && let Ok(fresh) = ib_api.get_status(&name).await
        && let Some(s) = fresh.status.as_ref()
        && s.build_id == plan.status.build_id
        && s.retry_failed == plan.status.retry_failed
        && s.phase == plan.status.phase
        && s.phase.is_some_and(|p| p.is_finished())
    {
        tracing::info!(phase = ?s.phase, "already recorded as finished (the cache was behind)");
        // The watch brings that status, and with it the usual reconcile
        // (TTL and all). Not asked again on a timer: a cache is behind when
        // the API server is, and a GET per build per second kept it so
        // (1,500 builds behind for minutes in the scale bench).
        return Ok(Action::await_change());
    }
    // A status the cache already holds is not written again: most
    // reconciles (a Pod bound, started, annotated; a re-list) change
    // nothing a user reads.
    // The first status of a new build may wait for its Pods to be bound
    // (`Plan::defer_status`), unless one of them was not created now.
    let hold = plan.defer_status;
    let written = ctx.written_status(ib, &plan.status);
    if !hold && !same_status(ib.status.as_ref(), &plan.status) && !written.already {
        let status_patch = serde_json::json!({
            "apiVersion": ImageBuild::api_version(&()),
            "kind": ImageBuild::kind(&()),
            "status": plan.status,
        });
        ib_api
            .patch_status(&name, &ssa, &Patch::Apply(&status_patch))
            .await
            .map_err(kube_err(format!("update status of {ns}/{name}")))?;
        ctx.remember_status(written);
    }

    // Runners with new work or work taken back hear of it now that the
    // status records it.
    for runner in &pokes {
        ctx.hub.poke(runner);
    }
    if !plan.expire.is_empty() || !plan.delete_leases.is_empty() {
        ctx.hub.wake_waiters();
    }

    // Events and metrics, after the status is written.
    let reference = ib.object_ref(&());
    for ev in &plan.events {
        let kind = match ev.kind {
            EventKind::Normal => events::EventType::Normal,
            EventKind::Warning => events::EventType::Warning,
        };
        let published = ctx
            .events
            .publish(&reference, kind, &ev.reason, &ev.message)
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, reason = %ev.reason, "could not publish event");
        }
    }
    for f in &plan.finished {
        ctx.metrics
            .builds_total
            .with_label_values(&[f.os.as_str(), f.result])
            .inc();
        ctx.metrics
            .build_duration
            .with_label_values(&[f.os.as_str()])
            .observe(f.duration.as_secs_f64());
    }
    if let Some(message) = rejected {
        return Err(ControllerError::PodRejected(message));
    }
    if let Some(message) = windows_rejected {
        return Err(ControllerError::BaseImageUnreadable(message));
    }
    if let Some(message) = plan.index_retry {
        return Err(ControllerError::IndexPush(message));
    }
    if let Some(invalid) = &plan.invalid {
        tracing::warn!(%invalid, "invalid spec; waiting for a change");
        return Ok(Action::await_change());
    }
    if let Some(phase) = plan.status.phase {
        tracing::debug!(%phase, "reconciled");
    }
    if hold || cache_behind {
        return Ok(Action::requeue(plan::STATUS_HOLD));
    }
    // An unfinished build is looked at again at least every minute, even
    // if no watch event comes (a safety net: its Pods and Leases are read
    // from caches).
    let finished = plan.status.phase.is_some_and(Phase::is_finished);
    Ok(match plan.requeue_after {
        Some(after) if !finished => {
            Action::requeue(after.clamp(Duration::from_secs(1), UNFINISHED_REQUEUE))
        }
        Some(after) => Action::requeue(after.max(Duration::from_secs(1))),
        None if !finished => Action::requeue(UNFINISHED_REQUEUE),
        None => Action::await_change(),
    })
}

/// The longest an unfinished build goes without a reconcile.
const UNFINISHED_REQUEUE: Duration = Duration::from_secs(60);

/// Applies the runner leg of a plan: expires the leases of runners that are
/// gone (only if unchanged since read: an outcome recorded meanwhile wins),
/// takes back leases, and hands out new ones through the hub. Returns the
/// runners to wake once the status is written.
async fn apply_leases(
    ib: &ImageBuild,
    ns: &str,
    leases: &[Lease],
    plan: &mut plan::Plan,
    ctx: &Context,
) -> Result<Vec<String>, ControllerError> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    let mut pokes = Vec::new();
    let holder = |name: &str| {
        leases
            .iter()
            .find(|l| l.name_any() == name)
            .and_then(|l| crate::executor::runners::lease_holder(l))
            .map(str::to_string)
    };
    for expiry in &plan.expire {
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: expiry.resource_version.clone(),
                uid: None,
            }),
            ..Default::default()
        };
        match api.delete(&expiry.name, &params).await {
            Ok(_) => {
                tracing::info!(lease = %expiry.name, "lease expired: its runner is gone");
                ctx.hub.release(&LeaseKey {
                    namespace: ns.to_string(),
                    name: expiry.name.clone(),
                });
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Err(ControllerError::LeaseChanged(format!(
                    "lease {ns}/{} changed while expiring it (its runner reported); looking again",
                    expiry.name
                )));
            }
            Err(e) => return Err(kube_err(format!("expire lease {ns}/{}", expiry.name))(e)),
        }
        pokes.extend(holder(&expiry.name));
    }
    for name in &plan.delete_leases {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(lease = %name, "lease taken back");
                // Its reservation must not count against the runner again.
                ctx.hub.release(&LeaseKey {
                    namespace: ns.to_string(),
                    name: name.clone(),
                });
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("delete lease {ns}/{name}"))(e)),
        }
        pokes.extend(holder(name));
    }
    let mut waiting = plan.waits_for_runner;
    let mut room: Option<crate::executor::runners::Room> = None;
    let generation = ib.metadata.generation.unwrap_or(0);
    let id = ib.build_id();
    for request in std::mem::take(&mut plan.leases) {
        let key = LeaseKey {
            namespace: ns.to_string(),
            name: request.name.clone(),
        };
        let chosen = match ctx.hub.reserve(&request.candidates, key.clone()) {
            Ok(c) => c,
            Err(NoRunner { why, room: seen }) => {
                room = Some(match room.take() {
                    Some(r) => r.min(&seen),
                    None => seen,
                });
                for ps in plan.status.platforms.iter_mut() {
                    if ps.platform == request.platform {
                        ps.message = Some(format!("waiting for a runner: {why}"));
                    }
                }
                waiting = true;
                continue;
            }
        };
        let Ok(platform) = request.platform.parse::<Platform>() else {
            ctx.hub.release(&key);
            continue;
        };
        let object = lease::build_lease(&lease::LeaseFor {
            build: ib,
            name: &request.name,
            key: pod::PodKey {
                platform: &platform,
                build_id: &id,
                attempt: request.attempt,
                windows_build: None,
            },
            runner: &chosen.runner,
            emulated: chosen.emulated,
            now: jiff::Timestamp::now(),
        });
        // Created, never applied over: a Lease of that name that exists
        // (a lagging read) is not silently handed to another runner.
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                ctx.hub.release(&key);
                return Err(ControllerError::LeaseChanged(format!(
                    "lease {ns}/{} exists already; looking again",
                    request.name
                )));
            }
            Err(e) => {
                ctx.hub.release(&key);
                return Err(kube_err(format!("create lease {ns}/{}", request.name))(e));
            }
        }
        tracing::info!(lease = %request.name, runner = %chosen.runner, emulated = chosen.emulated, generation, "leased to runner");
        for ps in plan.status.platforms.iter_mut() {
            if ps.platform == request.platform {
                ps.phase = Phase::Building;
                ps.executor = Some(crate::api::ExecutorRef {
                    kind: "Runner".into(),
                    name: chosen.runner.clone(),
                    node: None,
                    emulated: chosen.emulated,
                });
                ps.message = Some(format!(
                    "leased to runner {}{}",
                    chosen.runner,
                    if chosen.emulated { " (emulated)" } else { "" }
                ));
            }
        }
        pokes.push(chosen.runner);
    }
    if waiting {
        ctx.hub.wait(ObjectRef::from_obj(ib), room);
    }
    Ok(pokes)
}

/// Whether the Secrets of a build are (re)checked: while it has not
/// finished. A finished build keeps its result whatever becomes of them.
fn needs_secret_check(ib: &ImageBuild) -> bool {
    let status = ib.status.as_ref();
    status.and_then(|s| s.build_id.as_deref()) != Some(ib.build_id().as_str())
        || !status.and_then(|s| s.phase).is_some_and(Phase::is_finished)
}

/// What the Secrets an ImageBuild names allow.
enum SecretCheck {
    /// Every Secret named may be used.
    Usable,
    /// A Secret named does not exist (yet): wait and look again.
    Missing(String),
    /// A Secret named may not be used (type, opt-in): the build stalls.
    Refused(validate::InvalidSpec),
}

/// Reads the Secrets the spec names and says why one may not be used
/// (secret_policy), naming its field.
async fn check_secrets(
    ib: &ImageBuild,
    ns: &str,
    ctx: &Context,
) -> Result<SecretCheck, ControllerError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let refs = [
        (
            "spec.source.git.secretRef",
            ib.spec
                .source
                .git
                .as_ref()
                .and_then(|g| g.secret_ref.as_ref()),
            crate::secret_policy::GIT_TYPES,
        ),
        (
            "spec.output.pushSecretRef",
            ib.spec.output.push_secret_ref.as_ref(),
            crate::secret_policy::PUSH_TYPES,
        ),
    ];
    for (field, reference, types) in refs {
        let Some(r) = reference else { continue };
        let secret = api
            .get_opt(&r.name)
            .await
            .map_err(kube_err(format!("get Secret {ns}/{}", r.name)))?;
        if secret.is_none() {
            return Ok(SecretCheck::Missing(format!(
                "{field}: Secret {ns}/{} not found; waiting for it",
                r.name
            )));
        }
        if let Err(message) =
            crate::secret_policy::check(field, ns, &r.name, secret.as_ref(), types)
        {
            let message = message
                .strip_prefix(&format!("{field}: "))
                .unwrap_or(&message)
                .to_string();
            return Ok(SecretCheck::Refused(validate::InvalidSpec {
                field: field.to_string(),
                message: format!(
                    "{message} (then request a rebuild: annotate the ImageBuild with {}=<any new value>)",
                    crate::api::ANNOTATION_REBUILD
                ),
            }));
        }
    }
    Ok(SecretCheck::Usable)
}

fn pod_platform(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(pod::ANNOTATION_PLATFORM))
        .cloned()
        .unwrap_or_default()
}

/// Creates the token Secret of a build Pod about to be created. A Secret of
/// that name that already exists is used only when it is this build's:
/// owned by this ImageBuild's UID, made by Tripod, with a token that
/// verifies for this Pod. Anything else is a conflict (`Ok(Err(message))`):
/// the Pod is not created, since it would mount someone else's Secret.
async fn ensure_token_secret(
    api: &Api<Secret>,
    ib: &ImageBuild,
    pod: &Pod,
    ctx: &Context,
) -> Result<Result<(), String>, ControllerError> {
    let ns = ib.namespace().unwrap_or_default();
    let pod_name = pod.name_any();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let build_id = label(LABEL_BUILD_ID);
    let attempt: u32 = label(LABEL_ATTEMPT).parse().unwrap_or(0);
    let platform = pod_platform(pod);
    let name = ib.name_any();
    let uid = ib.uid().unwrap_or_default();
    let subject = token::Subject {
        namespace: &ns,
        image_build: &name,
        image_build_uid: &uid,
        pod: &pod_name,
        build_id: &build_id,
        platform: &platform,
        attempt,
    };
    let mut secret = pod::token_secret(pod);
    secret.data = Some(BTreeMap::from([
        (
            token::TOKEN_KEY.to_string(),
            ByteString(ctx.token_key.issue(&subject)?.into_bytes()),
        ),
        (
            token::CA_KEY.to_string(),
            ByteString(ctx.executor_ca.clone().into_bytes()),
        ),
    ]));
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => return Ok(Ok(())),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(kube_err(format!("create token Secret {ns}/{pod_name}"))(e)),
    }
    // Created before (a reconcile that stopped between the Secret and the
    // Pod): keep its token, if it is ours.
    let existing = api
        .get_opt(&pod_name)
        .await
        .map_err(kube_err(format!("get token Secret {ns}/{pod_name}")))?;
    let Some(existing) = existing else {
        return Ok(Err(format!(
            "token Secret {ns}/{pod_name} vanished while being created; retrying"
        )));
    };
    let owned = controlled_by(&existing, &uid);
    let managed = existing
        .labels()
        .get("app.kubernetes.io/managed-by")
        .is_some_and(|v| v == "tripod");
    let data = existing.data.clone().unwrap_or_default();
    let token_ok = data.get(token::TOKEN_KEY).is_some_and(|t| {
        ctx.token_key
            .verify(&subject, &String::from_utf8_lossy(&t.0))
    });
    let ca_ok = data
        .get(token::CA_KEY)
        .is_some_and(|c| c.0 == ctx.executor_ca.as_bytes());
    if owned && managed && token_ok && ca_ok {
        return Ok(Ok(()));
    }
    if owned && managed {
        // Ours, from before the token key or the executor CA changed:
        // replaced (the next reconcile creates it afresh).
        api.delete(&pod_name, &DeleteParams::default())
            .await
            .map_err(kube_err(format!(
                "delete stale token Secret {ns}/{pod_name}"
            )))?;
        return Ok(Err(format!(
            "token Secret {ns}/{pod_name} was stale (another token key or executor CA); \
             replacing it"
        )));
    }
    Ok(Err(format!(
        "Secret {ns}/{pod_name} already exists and is not the token Secret Tripod made for this \
         build Pod (owner UID, managed-by label or token do not match); the Pod is not created \
         until it is deleted"
    )))
}

/// A result annotation without the controller's valid MAC (written by
/// someone else with `pods/patch`) is read as a failure of the attempt.
fn unsigned_result_to_failure(mut pod: CachedPod, key: &TokenKey) -> CachedPod {
    unsigned_result_in(&mut pod.metadata, "Pod", key);
    pod
}

/// [`unsigned_result_to_failure`] for the metadata of any executor object.
fn unsigned_result_in(meta: &mut ObjectMeta, kind: &str, key: &TokenKey) {
    let uid = meta.uid.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let Some(annotations) = meta.annotations.as_mut() else {
        return;
    };
    let Some(result) = annotations.get(ANNOTATION_RESULT).cloned() else {
        return;
    };
    let signed = annotations
        .get(ANNOTATION_RESULT_MAC)
        .is_some_and(|mac| key.verify_result(&uid, &result, mac));
    if !signed {
        annotations.remove(ANNOTATION_RESULT);
        let failed = Failed {
            reason: "ResultNotSigned".into(),
            message: format!(
                "the result annotation of {kind} {name} does not carry the controller's signature; \
                 it was not written by the executor service"
            ),
        };
        annotations.insert(
            ANNOTATION_FAILURE.to_string(),
            serde_json::to_string(&failed).unwrap_or_default(),
        );
    }
}

/// Whether the object with UID `uid` is `obj`'s controller (its
/// controlling ownerReference).
fn controlled_by(obj: &impl Resource, uid: &str) -> bool {
    obj.owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// What a Pod that was there when a build Pod of the same name was
/// created is.
enum ExistingPod {
    /// A build Pod of this ImageBuild (created before; the cache is behind).
    Ours,
    /// Deleted again since.
    Gone,
    /// Someone else's: why the build Pod cannot be created.
    Foreign(String),
}

/// Reads the existing Pod `name`: whether the ImageBuild with UID `uid`
/// controls it.
async fn existing_pod(
    api: &Api<Pod>,
    name: &str,
    uid: &str,
) -> Result<ExistingPod, ControllerError> {
    let existing = api
        .get_opt(name)
        .await
        .map_err(kube_err(format!("get Pod {name}")))?;
    Ok(match existing {
        // Going: a build deleted and made again under the same name waits
        // for its old Pod to be gone.
        None => ExistingPod::Gone,
        Some(p) if p.metadata.deletion_timestamp.is_some() => ExistingPod::Gone,
        Some(p) if controlled_by(&p, uid) => ExistingPod::Ours,
        Some(_) => ExistingPod::Foreign(format!(
            "a Pod named {name} exists and is not this build's: delete or rename it"
        )),
    })
}

/// Whether an API error on a Pod create is a refusal that retrying the same
/// request will not fix by itself (not a conflict, throttling or server error).
fn pod_refused(code: u16) -> bool {
    (400..500).contains(&code) && code != 409 && code != 429
}

fn update_gauges(ctx: &Context) {
    let mut waiting: HashMap<&'static str, i64> = HashMap::new();
    for ib in ctx.builds.state() {
        let Some(status) = ib.status.as_ref() else {
            continue;
        };
        for ps in &status.platforms {
            if matches!(ps.phase, Phase::Pending | Phase::Scheduling)
                && let Ok(p) = ps.platform.parse::<Platform>()
            {
                *waiting.entry(p.os().as_str()).or_default() += 1;
            }
        }
    }
    for os in Os::ALL {
        ctx.metrics
            .queue_depth
            .with_label_values(&[os.as_str()])
            .set(waiting.get(os.as_str()).copied().unwrap_or(0));
    }
    let mut phases: HashMap<&'static str, i64> = HashMap::new();
    for r in ctx.runners.state() {
        if let Some(phase) = r.status.as_ref().and_then(|s| s.phase) {
            *phases.entry(phase.as_str()).or_default() += 1;
        }
    }
    for phase in [
        RunnerPhase::Online,
        RunnerPhase::Offline,
        RunnerPhase::Draining,
    ] {
        ctx.metrics
            .runners
            .with_label_values(&[phase.as_str()])
            .set(phases.get(phase.as_str()).copied().unwrap_or(0));
    }
}

/// The cached build Pods by the UID of the ImageBuild owning them, kept
/// beside the Pod cache from the same watch events (a list as it comes, then
/// swapped in whole, as the cache does).
#[derive(Default)]
struct PodIndex {
    current: HashMap<String, std::collections::BTreeSet<(String, String)>>,
    listing: Option<HashMap<String, std::collections::BTreeSet<(String, String)>>>,
}

impl PodIndex {
    fn key(p: &CachedPod) -> Option<(String, (String, String))> {
        let owner = p.owner_references().first()?.uid.clone();
        Some((owner, (p.namespace()?, p.name_any())))
    }

    fn apply(&mut self, e: &watcher::Event<CachedPod>) {
        match e {
            watcher::Event::Apply(p) => {
                if let Some((o, k)) = Self::key(p) {
                    self.current.entry(o).or_default().insert(k);
                }
            }
            watcher::Event::Delete(p) => {
                if let Some((o, k)) = Self::key(p)
                    && let Some(set) = self.current.get_mut(&o)
                {
                    set.remove(&k);
                    if set.is_empty() {
                        self.current.remove(&o);
                    }
                }
            }
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let (Some((o, k)), Some(l)) = (Self::key(p), self.listing.as_mut()) {
                    l.entry(o).or_default().insert(k);
                }
            }
            watcher::Event::InitDone => {
                if let Some(l) = self.listing.take() {
                    self.current = l;
                }
            }
        }
    }

    /// References of the Pods owned by `uid`.
    fn owned_by(&self, uid: &str) -> Vec<ObjectRef<CachedPod>> {
        self.current
            .get(uid)
            .into_iter()
            .flatten()
            .map(|(ns, name)| ObjectRef::new(name).within(ns))
            .collect()
    }
}

/// What the cache keeps of an ImageBuild: all but managedFields and
/// `kubectl.kubernetes.io/last-applied-configuration` (a second copy of
/// the spec when it was applied with `kubectl apply`).
fn slim_build(b: &mut ImageBuild) {
    b.managed_fields_mut().clear();
    b.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Whether `planned` says nothing `current` does not: compared as JSON,
/// with empty lists, maps and nulls the same as absent (how they read back
/// after a server-side apply).
fn same_status(current: Option<&ImageBuildStatus>, planned: &ImageBuildStatus) -> bool {
    fn prune(v: serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        match v {
            Value::Null => None,
            Value::Array(a) => {
                let a: Vec<Value> = a.into_iter().filter_map(prune).collect();
                (!a.is_empty()).then_some(Value::Array(a))
            }
            Value::Object(o) => {
                let o: serde_json::Map<String, Value> = o
                    .into_iter()
                    .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                    .collect();
                (!o.is_empty()).then_some(Value::Object(o))
            }
            other => Some(other),
        }
    }
    let json = |s: &ImageBuildStatus| serde_json::to_value(s).ok().and_then(prune);
    match current {
        Some(c) => json(c) == json(planned),
        None => json(planned).is_none(),
    }
}

/// Per-object exponential backoff: 1 s, 2 s, 4 s … capped at 5 minutes.
fn error_policy(ib: Arc<ImageBuild>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    let key = ObjectRef::from_obj(ib.as_ref());
    let failures = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(failures);
    tracing::warn!(
        namespace = ib.namespace().unwrap_or_default(),
        name = %ib.name_any(),
        %error,
        failures,
        retry_in_s = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(9);
    Duration::from_secs((1u64 << exp).min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildd_security_context_is_parsed_and_typos_refused() {
        let sc = parse_security_context(
            r#"{"runAsUser":0,"capabilities":{"add":["SYS_ADMIN"]},"appArmorProfile":{"type":"Unconfined"}}"#,
        )
        .unwrap();
        assert_eq!(sc.run_as_user, Some(0));
        assert_eq!(
            sc.capabilities.unwrap().add.unwrap(),
            vec!["SYS_ADMIN".to_string()]
        );
        let err = parse_security_context(r#"{"capabilities":{"addd":["SYS_ADMIN"]}}"#).unwrap_err();
        assert!(err.contains("capabilities.addd"), "{err}");
        let err = parse_security_context(r#"{"privileged":"yes"}"#).unwrap_err();
        assert!(err.contains("not a Kubernetes SecurityContext"), "{err}");
        let err = parse_security_context("{").unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
