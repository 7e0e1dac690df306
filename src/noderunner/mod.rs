//! The node runner: a kubelet stand-in that runs the Pods bound to one
//! local Linux node as processes of this machine.
//!
//! Tripod's tests and `tripod dev` have no container runtime. For one node
//! (e.g. [`crate::testenv::LINUX_AMD64`]) this runner takes the kubelet's
//! place for Pods: it watches the Pods with `spec.nodeName=<node>` (all
//! namespaces), runs each as local processes, and reports their status
//! through the API server as a kubelet would. Pod specs stay what a real
//! cluster needs; this module maps them onto the machine as follows. The
//! node object itself (heartbeat, capacity) is not the runner's business.
//!
//! # The Pod directory
//!
//! Every Pod gets `<root>/<namespace>_<name>_<uid>/` (mode 0700):
//!
//! | path | what |
//! |---|---|
//! | `volumes/<volume>/` | each volume |
//! | `logs/<container>.log` | the container's stdout and stderr, appended |
//! | `termination/<container>` | the container's `terminationMessagePath` |
//!
//! The directory stays after the Pod finished (logs, volumes) and is removed
//! when the Pod is deleted. On start, directories of Pods that no longer
//! exist are removed.
//!
//! # Volumes
//!
//! * `emptyDir` → an empty directory (`medium` and `sizeLimit` ignored);
//! * `secret` / `configMap` → a directory with one file per key (or per
//!   `items` entry, at its `path`), mode from the item's `mode`, else
//!   `defaultMode`, else 0644; `optional` honoured (a missing optional
//!   source gives an empty directory);
//! * any other kind fails the Pod (reason `UnsupportedVolume`, the message
//!   names the volume and its kind). A missing Secret or ConfigMap fails it
//!   with reason `FailedMount`; a kubelet would keep retrying instead.
//!
//! # Paths
//!
//! There is no mount namespace, so container paths are *rewritten*. Each
//! `volumeMounts[].mountPath` stands for its volume's directory (joined
//! with `subPath`, or `subPathExpr` expanded, created if missing), and the
//! container's `terminationMessagePath` (default `/dev/termination-log`)
//! stands for `termination/<container>`. An env value, a `command` or
//! `args` word, or `workingDir` that **equals** such a container path or
//! **starts with it followed by `/`** is rewritten to the host path (the
//! longest container path wins). So a process finds `/workspace` through
//! `TRIPOD_WORKSPACE=/workspace`, or a mounted token through the argument
//! pair `--token-file /var/run/secrets/token`. Only whole values are
//! rewritten: `--token-file=/var/run/secrets/token` is not, and neither
//! are paths inside scripts (`sh -c 'cat /data/x'`); pass those through
//! the environment instead (`sh -c 'cat "$DATA/x"'` with `DATA=/data`).
//! `readOnly` is not enforced; processes run as the runner's user, with
//! the runner's privileges, without any isolation.
//!
//! # Containers
//!
//! Images are ignored: nothing is pulled, and `image` is only reported back
//! in the container status. Hence `command` is required (the image's
//! ENTRYPOINT/CMD are unknown; a container without one fails the Pod with
//! `CreateContainerConfigError`). `command` + `args` get Kubernetes'
//! `$(VAR)` expansion, then path rewriting. The program, `command[0]`:
//!
//! * file name `tripod` or `tripod.exe` (any directory) →
//!   [`NodeRunnerConfig::tripod_binary`];
//! * containing a `/` → that path (relative to the working directory);
//! * else looked up on the container's `PATH`.
//!
//! A program that is not found fails the container with reason
//! `StartError` (exit code 128). The working directory is `workingDir`
//! (mapped; created if inside a volume) or else the Pod directory.
//! Security contexts, resources, probes, ports, lifecycle hooks and
//! `imagePullPolicy` are ignored.
//!
//! # Network
//!
//! None of its own: every Pod shares this machine's network (as with
//! `hostNetwork: true`) and reports `127.0.0.1` as its Pod and host IP.
//! Ports are not remapped, so two Pods listening on the same port
//! conflict. Containers of one Pod reach each other on `127.0.0.1`, as in
//! a real Pod.
//!
//! # Environment
//!
//! Nothing of the runner's own environment is passed on except `PATH`.
//! Each process gets `PATH` (the runner's), `HOME=<pod dir>`,
//! `HOSTNAME=<pod name>`, then the container's `envFrom` (Secrets and
//! ConfigMaps, with `prefix`) and `env` on top, in order, with `$(VAR)`
//! expansion and path rewriting. `valueFrom` supports `secretKeyRef` and
//! `configMapKeyRef` (honouring `optional`: a missing optional key leaves
//! the variable unset) and `fieldRef` for `metadata.name`,
//! `metadata.namespace`, `metadata.uid`, `metadata.labels['…']`,
//! `metadata.annotations['…']`, `spec.nodeName`, `spec.serviceAccountName`
//! (`default` when empty) and `status.podIP(s)`/`status.hostIP(s)`
//! (`127.0.0.1`). Anything else fails the Pod with
//! `CreateContainerConfigError`. No Service environment variables.
//!
//! # Order and processes
//!
//! As a kubelet does with `restartPolicy: Never`: regular init containers
//! run one after another, each to completion, and a non-zero exit fails the
//! Pod (reason `InitContainerFailed`); init containers with
//! `restartPolicy: Always` (native sidecars) are started in order and kept
//! running (one that exits is not restarted); then all main containers
//! start together. When every main container has exited, the sidecars are
//! stopped and the phase becomes `Succeeded` if every main container
//! exited 0, else `Failed` (reason `ContainerFailed`, message e.g.
//! `container agent exited with code 2`). Containers are never restarted:
//! `restartPolicy` `Always`/`OnFailure` of the Pod is treated as `Never`.
//!
//! Each container is one process started through
//! [`crate::testenv::supervised_command`] (it gets `SIGKILL` when the
//! runner's process dies) as the leader of a new process group, with stdin
//! from `/dev/null`. When its main process exits, the rest of its group is
//! killed (a container ends with its PID 1). Stopping a container means
//! `SIGTERM` to its group, then `SIGKILL` after the grace period:
//! `terminationGracePeriodSeconds` (for deletions the deletion's grace
//! period) capped at [`NodeRunnerConfig::max_grace`]. All of a Pod's
//! containers are stopped at once. If the runner's task is aborted, every
//! process it started is killed.
//!
//! # Status
//!
//! Written to the `status` subresource by strategic merge patch:
//! `startTime`, `hostIP(s)`/`podIP(s)` `127.0.0.1`, conditions
//! `PodScheduled` (only when the scheduler did not set it), `Initialized`,
//! `ContainersReady`, `Ready` (running counts as ready: no probes run),
//! phase `Pending` → `Running` (main containers started) →
//! `Succeeded`/`Failed`, and `initContainerStatuses`/`containerStatuses`
//! (`restartCount` 0, `containerID` `tripod://<pid>`) with state `waiting`
//! (`PodInitializing`, `ContainerCreating`, `CreateContainerConfigError`),
//! `running`, or `terminated` (exit code or 128 + signal, reason
//! `Completed`/`Error`/`StartError`). The terminated `message` is the
//! termination-message file (first 4 KiB), or, with
//! `terminationMessagePolicy: FallbackToLogsOnError`, a non-zero exit and
//! an empty file, the end of the log (at most 2 KiB and 80 lines).
//!
//! `activeDeadlineSeconds` (counted from the runner's start of the Pod):
//! everything is stopped and the Pod fails with reason `DeadlineExceeded`.
//!
//! # Deletion and restarts
//!
//! A Pod with a `deletionTimestamp` has its containers stopped, then the
//! runner removes its directory and deletes it with grace period 0 (as a
//! kubelet does: once the Pod is gone from the API, nothing of it is left); Pods deleted while no runner ran are finished off the same way
//! when the runner starts. A non-terminal Pod that a runner had started
//! before (it has a `startTime` or is `Running`) but whose processes this
//! runner does not have — the runner restarted — is failed with reason
//! `NodeRunnerRestarted`; it is not run again.

mod launch;
mod pod;
mod process;
mod refs;
mod spec;
mod status;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};
use tracing::Instrument;

use pod::Control;
use status::now;

/// `PATH` when the runner has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the runner needs to know.
#[derive(Debug, Clone)]
pub struct NodeRunnerConfig {
    /// The node whose Pods to run, e.g. [`crate::testenv::LINUX_AMD64`].
    pub node_name: String,
    /// A private directory for the Pods' directories
    /// (`<namespace>_<name>_<uid>`, mode 0700). Created (mode 0700) if
    /// missing.
    pub root: PathBuf,
    /// What a container command `tripod` or `tripod.exe` (in any
    /// directory) runs.
    pub tripod_binary: PathBuf,
    /// Cap on every grace period (`terminationGracePeriodSeconds`, a
    /// deletion's grace period), e.g. 10 s.
    pub max_grace: Duration,
}

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on the root directory failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The Pod watch ended (it retries errors, so this does not happen
    /// while the API server's client lives).
    #[error("the Pod watch ended")]
    WatchEnded,
}

/// Shared by the runner loop and the Pod tasks.
pub(crate) struct Ctx {
    pub client: kube::Client,
    pub cfg: NodeRunnerConfig,
    /// The runner's `PATH`.
    pub path_env: String,
}

/// Starts [`run`] as a tokio task in tracing span `noderunner` (with the
/// node name). An error is logged, never panicked on. Aborting the task
/// kills every process it started. Must be called within a Tokio runtime.
pub fn spawn(client: kube::Client, cfg: NodeRunnerConfig) -> tokio::task::JoinHandle<()> {
    let span = tracing::info_span!("noderunner", node = %cfg.node_name);
    tokio::spawn(
        async move {
            if let Err(e) = run(client, cfg).await {
                tracing::error!(error = %e, "node runner stopped");
            }
        }
        .instrument(span),
    )
}

/// Runs the Pods bound to `cfg.node_name` until the returned future is
/// dropped (see the [module docs](self)); returns only if the root
/// directory cannot be created or the watch ends. Dropping the future kills
/// every process it started.
pub async fn run(client: kube::Client, cfg: NodeRunnerConfig) -> Result<(), Error> {
    create_root(&cfg.root)?;
    let fields = format!("spec.nodeName={}", cfg.node_name);
    let path_env = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let api: Api<Pod> = Api::all(client.clone());
    let mut runner = Runner {
        ctx: Arc::new(Ctx {
            client,
            cfg,
            path_env,
        }),
        known: HashMap::new(),
        tasks: JoinSet::new(),
        task_info: HashMap::new(),
        listing: None,
        cleaned_root: false,
    };
    tracing::info!(root = %runner.ctx.cfg.root.display(), "node runner started");
    let events = watcher(api, watcher::Config::default().fields(&fields)).default_backoff();
    let mut events = std::pin::pin!(events);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => runner.on_event(event),
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => return Err(Error::WatchEnded),
            },
            Some(done) = runner.tasks.join_next_with_id(), if !runner.tasks.is_empty() => {
                runner.on_task_done(done);
            }
        }
    }
}

fn create_root(root: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io_error = |context: &str, source| Error::Io {
        context: format!("{context} {}", root.display()),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| io_error("create", e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_error("chmod", e))
}

/// `<root>/<namespace>_<name>_<uid>`.
pub(crate) fn pod_dir(root: &Path, pod: &Pod) -> PathBuf {
    let m = &pod.metadata;
    root.join(format!(
        "{}_{}_{}",
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
        m.uid.as_deref().unwrap_or_default()
    ))
}

/// A Pod the runner has seen, by uid.
struct Known {
    /// The latest version seen.
    pod: Pod,
    /// Talks to the Pod's task while it runs.
    control: Option<watch::Sender<Control>>,
    /// Deleting the Pod object (grace 0) has been started.
    finishing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskKind {
    /// A Pod's lifecycle ([`pod::run`]).
    Pod,
    /// Finishing a deletion, failing a Pod, removing a directory.
    Aux,
}

struct Runner {
    ctx: Arc<Ctx>,
    known: HashMap<String, Known>,
    /// Dropped with the runner: aborts the Pod tasks, which kills their
    /// processes.
    tasks: JoinSet<()>,
    task_info: HashMap<Id, (String, TaskKind, PathBuf)>,
    /// The uids listed since the watch (re)started, until the list is done.
    listing: Option<HashSet<String>>,
    cleaned_root: bool,
}

impl Runner {
    fn on_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => self.on_apply(pod),
            watcher::Event::Delete(pod) => self.on_delete(pod),
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let vanished: Vec<Pod> = self
                    .known
                    .iter()
                    .filter(|(uid, _)| !listed.contains(*uid))
                    .map(|(_, k)| k.pod.clone())
                    .collect();
                for pod in vanished {
                    self.on_delete(pod);
                }
                if !self.cleaned_root {
                    self.cleaned_root = true;
                    self.clean_root();
                }
            }
        }
    }

    fn on_apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if pod.metadata.name.is_none() || pod.metadata.namespace.is_none() {
            return;
        }
        if let Some(listed) = &mut self.listing {
            listed.insert(uid.clone());
        }
        let deleting = pod.metadata.deletion_timestamp.is_some();
        if let Some(known) = self.known.get_mut(&uid) {
            known.pod = pod;
            if !deleting {
                return;
            }
            match &known.control {
                Some(control) => {
                    let grace = deletion_grace(&known.pod, self.ctx.cfg.max_grace);
                    control.send_if_modified(|c| {
                        let first = *c == Control::Run;
                        if first {
                            *c = Control::Delete { grace };
                        }
                        first
                    });
                }
                None if !known.finishing => {
                    known.finishing = true;
                    let pod = known.pod.clone();
                    self.finish_off(pod);
                }
                None => {}
            }
            return;
        }

        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let terminal = matches!(phase, Some("Succeeded" | "Failed"));
        let mut known = Known {
            pod: pod.clone(),
            control: None,
            finishing: false,
        };
        if deleting {
            known.finishing = true;
            self.finish_off(pod);
        } else if terminal {
            // Finished before; its directory stays until it is deleted.
        } else if started_before(&pod) {
            self.fail_restarted(pod);
        } else {
            let (tx, rx) = watch::channel(Control::Run);
            known.control = Some(tx);
            let span = pod_span(&pod);
            let dir = pod_dir(&self.ctx.cfg.root, &pod);
            let handle = self
                .tasks
                .spawn(pod::run(self.ctx.clone(), pod, rx).instrument(span));
            self.task_info
                .insert(handle.id(), (uid.clone(), TaskKind::Pod, dir));
        }
        self.known.insert(uid, known);
    }

    fn on_delete(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        match self.known.remove(&uid) {
            // The task removes nothing itself: its end (uid unknown by
            // then) triggers the removal of the directory.
            Some(Known {
                control: Some(control),
                ..
            }) => {
                control.send_replace(Control::Gone);
            }
            _ => self.remove_dir(&pod),
        }
    }

    fn on_task_done(&mut self, done: Result<(Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => {
                if !e.is_cancelled() {
                    tracing::error!(error = %e, "node runner task failed");
                }
                e.id()
            }
        };
        let Some((uid, kind, dir)) = self.task_info.remove(&id) else {
            return;
        };
        if kind != TaskKind::Pod {
            return;
        }
        match self.known.get_mut(&uid) {
            None => self.spawn_aux(
                &uid,
                dir.clone(),
                tracing::info_span!("pod_cleanup", dir = %dir.display()),
                async move {
                    remove_dir(&dir).await;
                },
            ),
            Some(known) => {
                known.control = None;
                if known.pod.metadata.deletion_timestamp.is_some() && !known.finishing {
                    known.finishing = true;
                    let pod = known.pod.clone();
                    self.finish_off(pod);
                }
            }
        }
    }

    /// Removes the Pod's directory, then deletes the Pod object (grace 0):
    /// like the kubelet, which cleans up volumes before the final delete, so
    /// that a Pod gone from the API has left nothing on the node.
    fn finish_off(&mut self, pod: Pod) {
        let ctx = self.ctx.clone();
        let dir = pod_dir(&ctx.cfg.root, &pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let span = tracing::info_span!(
            "pod_finish",
            namespace = pod.metadata.namespace.as_deref().unwrap_or_default(),
            name = pod.metadata.name.as_deref().unwrap_or_default(),
        );
        let task_dir = dir.clone();
        self.spawn_aux(&uid, dir, span, async move {
            remove_dir(&task_dir).await;
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: pod.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match refs::retry("delete pod", || api.delete(&name, &params)).await {
                Ok(_) => tracing::info!("deleted terminating pod"),
                // Gone already, or replaced by a Pod of the same name.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => tracing::warn!(error = %e, "deleting pod failed"),
            }
        });
    }

    /// Fails a Pod a previous runner had started: its processes are gone.
    fn fail_restarted(&mut self, pod: Pod) {
        let ctx = self.ctx.clone();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = pod_dir(&ctx.cfg.root, &pod);
        let span = pod_span(&pod);
        self.spawn_aux(&uid, dir, span, async move {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let patch = restarted_patch(&pod);
            let pp = PatchParams::default();
            let patch = Patch::Strategic(&patch);
            match refs::retry("patch pod status", || api.patch_status(&name, &pp, &patch)).await {
                Ok(_) => tracing::info!("failed pod: the node runner restarted"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => tracing::warn!(error = %e, "failing pod failed"),
            }
        });
    }

    fn remove_dir(&mut self, pod: &Pod) {
        let dir = pod_dir(&self.ctx.cfg.root, pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let task_dir = dir.clone();
        self.spawn_aux(&uid, dir, pod_span(pod), async move {
            remove_dir(&task_dir).await;
        });
    }

    fn spawn_aux(
        &mut self,
        uid: &str,
        dir: PathBuf,
        span: tracing::Span,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task.instrument(span));
        self.task_info
            .insert(handle.id(), (uid.to_string(), TaskKind::Aux, dir));
    }

    /// Removes the directories of `root` that belong to no known Pod
    /// (left by an earlier runner). Runs once, right after the first list,
    /// before any later Pod could have created its directory.
    fn clean_root(&self) {
        let entries = match std::fs::read_dir(&self.ctx.cfg.root) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the runner's root");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let uid = name.rsplit('_').next().unwrap_or_default();
            if self.known.contains_key(uid) {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed the directory of a gone pod")
                }
                Err(e) => tracing::warn!(dir = %path.display(), error = %e, "cannot remove"),
            }
        }
    }
}

fn pod_span(pod: &Pod) -> tracing::Span {
    tracing::info_span!(
        "pod",
        namespace = pod.metadata.namespace.as_deref().unwrap_or_default(),
        name = pod.metadata.name.as_deref().unwrap_or_default(),
    )
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => tracing::debug!(dir = %dir.display(), "removed pod directory"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove pod directory"),
    }
}

/// The deletion's grace period (else `terminationGracePeriodSeconds`)
/// capped at `max`.
fn deletion_grace(pod: &Pod, max: Duration) -> Duration {
    match pod.metadata.deletion_grace_period_seconds {
        Some(secs) => Duration::from_secs(u64::try_from(secs).unwrap_or(0)).min(max),
        None => pod::stop_grace(pod, max),
    }
}

/// Whether some runner had started this Pod: it has a `startTime`, is
/// `Running`, or has a container that ran.
fn started_before(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status.start_time.is_some()
        || status.phase.as_deref() == Some("Running")
        || status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
}

/// Phase `Failed`, reason `NodeRunnerRestarted`; every container that was
/// not terminated is reported terminated with exit code 137 and reason
/// `ContainerStatusUnknown`, as a kubelet does for lost containers.
fn restarted_patch(pod: &Pod) -> serde_json::Value {
    let now = now();
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let statuses = |containers: &[k8s_openapi::api::core::v1::Container],
                    old: &[k8s_openapi::api::core::v1::ContainerStatus]| {
        containers
            .iter()
            .map(|c| {
                let old = old.iter().find(|s| s.name == c.name);
                let old_state = old.and_then(|s| s.state.clone()).unwrap_or_default();
                let state = match (&old_state.terminated, &old_state.running) {
                    (Some(t), _) => serde_json::to_value(t).unwrap_or_default(),
                    (None, running) => json!({
                        "exitCode": 137,
                        "reason": "ContainerStatusUnknown",
                        "message": "The container could not be located when the pod was terminated",
                        "startedAt": running.as_ref().and_then(|r| r.started_at.clone()),
                        "finishedAt": now,
                    }),
                };
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": old.map(|s| s.image_id.clone()).unwrap_or_default(),
                    "containerID": old.and_then(|s| s.container_id.clone()),
                    "ready": false,
                    "started": false,
                    "restartCount": 0,
                    "state": {"terminated": state},
                })
            })
            .collect::<Vec<_>>()
    };
    let not_ready = |type_: &str| {
        json!({
            "type": type_,
            "status": "False",
            "reason": "PodFailed",
            "message": null,
            "lastProbeTime": null,
            "lastTransitionTime": now,
        })
    };
    json!({"status": {
        "phase": "Failed",
        "reason": "NodeRunnerRestarted",
        "message": "the tripod node runner restarted while this Pod ran; its processes are gone",
        "conditions": [not_ready("ContainersReady"), not_ready("Ready")],
        "initContainerStatuses": statuses(
            spec.init_containers.as_deref().unwrap_or_default(),
            status.init_container_statuses.as_deref().unwrap_or_default(),
        ),
        "containerStatuses": statuses(
            &spec.containers,
            status.container_statuses.as_deref().unwrap_or_default(),
        ),
    }})
}
