//! One Pod's life on the node: directory, volumes, init containers,
//! sidecars, main containers, status, deadline, termination.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::launch::{self, Launch, PodDirs};
use super::process::{self, Proc};
use super::refs::{Refs, retry};
use super::status::{ContainerModel, Phase, PodModel, State, now};
use super::{Ctx, pod_dir};

/// What the runner loop tells a Pod task after starting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Keep going.
    Run,
    /// The Pod got a `deletionTimestamp`: stop every container (`SIGTERM`,
    /// this grace, `SIGKILL`) and end.
    Delete {
        /// Already capped at `max_grace`.
        grace: Duration,
    },
    /// The Pod no longer exists: stop every container and end.
    Gone,
}

type ExitFuture = Pin<Box<dyn Future<Output = (usize, io::Result<ExitStatus>)> + Send>>;

enum Event {
    Exit(usize, io::Result<ExitStatus>),
    Control(Control),
    Deadline,
}

/// A container of the Pod and its process, if running.
struct Slot {
    container: Container,
    sidecar: bool,
    launch: Option<Launch>,
    proc: Option<Proc>,
    started_at: Option<String>,
}

/// How long containers get between `SIGTERM` and `SIGKILL` when the runner
/// stops them itself: `terminationGracePeriodSeconds` (default 30) capped
/// at `max`.
pub(crate) fn stop_grace(pod: &Pod, max: Duration) -> Duration {
    let secs = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0)).min(max)
}

/// Runs `pod` to completion, or until `control` says stop. The Pod must
/// have a name, a namespace and a uid.
pub(crate) async fn run(ctx: Arc<Ctx>, pod: Pod, control: watch::Receiver<Control>) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut slots = Vec::new();
    let mut init_models = Vec::new();
    let mut main_models = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        let sidecar = c.restart_policy.as_deref() == Some("Always");
        init_models.push(ContainerModel::new(
            &c.name,
            c.image.as_deref().unwrap_or_default(),
            sidecar,
            "PodInitializing",
        ));
        slots.push(Slot::new(c.clone(), sidecar));
    }
    let main_waiting = if slots.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    for c in &spec.containers {
        main_models.push(ContainerModel::new(
            &c.name,
            c.image.as_deref().unwrap_or_default(),
            false,
            main_waiting,
        ));
        slots.push(Slot::new(c.clone(), false));
    }
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "True")
        });
    let deadline = spec
        .active_deadline_seconds
        .map(|s| Instant::now() + Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let task = PodTask {
        api: Api::namespaced(ctx.client.clone(), &namespace),
        dir: pod_dir(&ctx.cfg.root, &pod),
        n_init: init_models.len(),
        status: PodModel::new(init_models, main_models, !scheduled),
        grace: stop_grace(&pod, ctx.cfg.max_grace),
        ctx,
        pod,
        slots,
        exits: FuturesUnordered::new(),
        control,
        deadline,
    };
    task.run().await;
}

impl Slot {
    fn new(container: Container, sidecar: bool) -> Self {
        Slot {
            container,
            sidecar,
            launch: None,
            proc: None,
            started_at: None,
        }
    }
}

struct PodTask {
    ctx: Arc<Ctx>,
    api: Api<Pod>,
    pod: Pod,
    dir: PathBuf,
    /// Init containers first, then the main ones.
    slots: Vec<Slot>,
    n_init: usize,
    exits: FuturesUnordered<ExitFuture>,
    control: watch::Receiver<Control>,
    deadline: Option<Instant>,
    status: PodModel,
    /// `SIGTERM` → `SIGKILL` when the runner stops containers itself.
    grace: Duration,
}

impl PodTask {
    async fn run(mut self) {
        tracing::info!(dir = %self.dir.display(), "starting pod");
        if let Err(e) = self.prepare_dir() {
            let message = format!("creating the Pod directory {}: {e}", self.dir.display());
            return self.fail("NodeRunnerError", message).await;
        }
        self.patch().await;

        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let mut refs = Refs::new(&self.ctx.client, &namespace);
        let volumes = match super::volumes::materialise(&self.pod, &self.dir, &mut refs).await {
            Ok(v) => v,
            Err(failure) => return self.fail(failure.reason, failure.message).await,
        };
        let dirs = PodDirs {
            pod_dir: &self.dir,
            volumes: &volumes,
            path_env: &self.ctx.path_env,
            tripod_binary: &self.ctx.cfg.tripod_binary,
        };
        let mut config_error = None;
        for (slot, s) in self.slots.iter_mut().enumerate() {
            match launch::resolve(&self.pod, &s.container, &dirs, &mut refs).await {
                Ok(l) => s.launch = Some(l),
                Err(e) => {
                    config_error = Some((slot, s.container.name.clone(), e));
                    break;
                }
            }
        }
        if let Some((slot, name, e)) = config_error {
            let reason = "CreateContainerConfigError";
            if let Some(c) = self.status.container_mut(slot) {
                c.state = State::Waiting {
                    reason: reason.into(),
                    message: Some(e.clone()),
                };
            }
            return self.fail(reason, format!("container {name}: {e}")).await;
        }

        // Init containers: regular ones to completion, sidecars kept running.
        for slot in 0..self.n_init {
            if let Err(message) = self.start(slot).await {
                self.stop_all(self.grace).await;
                return self.fail("StartError", message).await;
            }
            self.patch().await;
            if self.slots[slot].sidecar {
                continue;
            }
            let code = loop {
                match self.next_event().await {
                    Event::Exit(s, result) => {
                        let code = self.record_exit(s, result).await;
                        if s == slot {
                            break code;
                        }
                        self.patch().await;
                    }
                    Event::Control(c) => return self.stop_for(c).await,
                    Event::Deadline => return self.deadline_exceeded().await,
                }
            };
            if code != 0 {
                self.stop_all(self.grace).await;
                let name = self.slots[slot].container.name.clone();
                return self
                    .fail(
                        "InitContainerFailed",
                        format!("init container {name} exited with code {code}"),
                    )
                    .await;
            }
        }

        // Main containers, all at once.
        for slot in self.n_init..self.slots.len() {
            // A container that cannot start counts as failed; the others run.
            let _ = self.start(slot).await;
        }
        self.status.phase = Phase::Running;
        self.patch().await;
        while self.slots[self.n_init..].iter().any(|s| s.proc.is_some()) {
            match self.next_event().await {
                Event::Exit(s, result) => {
                    self.record_exit(s, result).await;
                    if self.slots[self.n_init..].iter().any(|s| s.proc.is_some()) {
                        self.patch().await;
                    }
                }
                Event::Control(c) => return self.stop_for(c).await,
                Event::Deadline => return self.deadline_exceeded().await,
            }
        }

        // Every main container exited: stop the sidecars, report.
        self.stop_all(self.grace).await;
        let failures: Vec<String> = self
            .status
            .main
            .iter()
            .filter_map(|c| match &c.state {
                State::Terminated {
                    exit_code, reason, ..
                } if *exit_code != 0 => Some(if reason == "StartError" {
                    format!("container {} could not be started", c.name)
                } else {
                    format!("container {} exited with code {exit_code}", c.name)
                }),
                _ => None,
            })
            .collect();
        if failures.is_empty() {
            self.status.phase = Phase::Succeeded;
            tracing::info!("pod succeeded");
            self.patch().await;
        } else {
            self.fail("ContainerFailed", failures.join("; ")).await;
        }
    }

    /// `<pod dir>` (0700) with `logs/`, `termination/` and `volumes/`.
    fn prepare_dir(&self) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        for sub in ["logs", "termination", "volumes"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        Ok(())
    }

    /// Starts the container of `slot`; on failure records a `StartError`
    /// termination and returns its message.
    async fn start(&mut self, slot: usize) -> Result<(), String> {
        let s = &mut self.slots[slot];
        let name = s.container.name.clone();
        let Some(launch) = s.launch.as_ref() else {
            return Err(format!("container {name} was not resolved"));
        };
        let started_at = now();
        let program = match &launch.program {
            Ok(p) => p.display().to_string(),
            Err(e) => e.clone(),
        };
        match process::start(launch).await {
            Ok((proc, exit)) => {
                tracing::info!(
                    container = %name,
                    pid = proc.pid,
                    %program,
                    "container started"
                );
                let pid = proc.pid;
                s.proc = Some(proc);
                s.started_at = Some(started_at.clone());
                self.exits.push(Box::pin(async move {
                    let result = exit.await.unwrap_or_else(|_| {
                        Err(io::Error::other(
                            "the process waiter ended without a result",
                        ))
                    });
                    (slot, result)
                }));
                if let Some(c) = self.status.container_mut(slot) {
                    c.state = State::Running { started_at };
                    c.container_id = Some(format!("tripod://{pid}"));
                }
                Ok(())
            }
            Err(e) => {
                let message = match &launch.program {
                    Ok(p) => format!("container {name}: starting {}: {e}", p.display()),
                    Err(_) => format!("container {name}: {e}"),
                };
                tracing::warn!(container = %name, error = %e, "container could not be started");
                if let Some(c) = self.status.container_mut(slot) {
                    c.state = State::Terminated {
                        exit_code: 128,
                        reason: "StartError".into(),
                        message: Some(message.clone()),
                        started_at: None,
                        finished_at: now(),
                    };
                }
                Err(message)
            }
        }
    }

    /// Records the exit of `slot`'s process, kills what is left of its
    /// process group (a container ends with its main process), and returns
    /// the exit code.
    async fn record_exit(&mut self, slot: usize, result: io::Result<ExitStatus>) -> i32 {
        let s = &mut self.slots[slot];
        let mut proc = s.proc.take();
        if let Some(p) = proc.as_mut() {
            p.mark_exited();
            process::signal_group(p.pid, "KILL").await;
        }
        let name = s.container.name.clone();
        let (code, wait_error) = match result {
            Ok(status) => (process::exit_code(&status), None),
            Err(e) => (255, Some(format!("waiting for the process failed: {e}"))),
        };
        let fallback =
            s.container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        let message = wait_error
            .or_else(|| {
                s.launch
                    .as_ref()
                    .and_then(|l| process::termination_message(&l.termination_log))
            })
            .or_else(|| {
                (fallback && code != 0)
                    .then(|| s.launch.as_ref().and_then(|l| process::log_tail(&l.log)))
                    .flatten()
            });
        tracing::info!(container = %name, exit_code = code, "container exited");
        let started_at = s.started_at.clone();
        if let Some(c) = self.status.container_mut(slot) {
            c.state = State::Terminated {
                exit_code: code,
                reason: if code == 0 { "Completed" } else { "Error" }.into(),
                message,
                started_at,
                finished_at: now(),
            };
        }
        code
    }

    async fn next_event(&mut self) -> Event {
        let deadline = self.deadline;
        let exits = &mut self.exits;
        let control = &mut self.control;
        tokio::select! {
            Some((slot, result)) = exits.next(), if !exits.is_empty() => Event::Exit(slot, result),
            c = next_control(control) => Event::Control(c),
            () = sleep_until(deadline) => Event::Deadline,
        }
    }

    /// `SIGTERM` to every running container's process group, up to `grace`
    /// for them to exit, then `SIGKILL`; records every exit.
    async fn stop_all(&mut self, grace: Duration) {
        let running: Vec<u32> = self
            .slots
            .iter()
            .filter_map(|s| s.proc.as_ref().map(|p| p.pid))
            .collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(processes = running.len(), ?grace, "stopping containers");
        for pid in &running {
            process::signal_group(*pid, "TERM").await;
        }
        let until = Instant::now() + grace;
        while self.slots.iter().any(|s| s.proc.is_some()) {
            tokio::select! {
                Some((slot, result)) = self.exits.next() => {
                    self.record_exit(slot, result).await;
                }
                () = tokio::time::sleep_until(until) => break,
            }
        }
        let left: Vec<u32> = self
            .slots
            .iter()
            .filter_map(|s| s.proc.as_ref().map(|p| p.pid))
            .collect();
        if left.is_empty() {
            return;
        }
        tracing::info!(processes = left.len(), "grace period over; killing");
        for pid in &left {
            process::signal_group(*pid, "KILL").await;
        }
        let until = Instant::now() + Duration::from_secs(10);
        while self.slots.iter().any(|s| s.proc.is_some()) {
            tokio::select! {
                Some((slot, result)) = self.exits.next() => {
                    self.record_exit(slot, result).await;
                }
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!("processes survived SIGKILL for 10s");
                    break;
                }
            }
        }
    }

    /// The Pod is being deleted or is gone: stop everything. The runner
    /// loop deletes the Pod object and its directory once this task ended.
    async fn stop_for(&mut self, control: Control) {
        let grace = match control {
            Control::Delete { grace } => grace,
            Control::Run | Control::Gone => self.grace,
        };
        tracing::info!(?control, "stopping pod");
        self.stop_all(grace).await;
    }

    async fn deadline_exceeded(&mut self) {
        tracing::info!("activeDeadlineSeconds exceeded");
        self.stop_all(self.grace).await;
        self.fail(
            "DeadlineExceeded",
            "Pod was active on the node longer than the specified deadline".into(),
        )
        .await;
    }

    async fn fail(&mut self, reason: &str, message: String) {
        tracing::info!(reason, %message, "pod failed");
        self.status.phase = Phase::Failed;
        self.status.reason = Some(reason.to_string());
        self.status.message = Some(message);
        self.patch().await;
    }

    /// Writes the whole status (strategic merge patch on `status`).
    async fn patch(&mut self) {
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let patch = self.status.next_patch();
        let api = &self.api;
        let pp = PatchParams::default();
        let patch = Patch::Strategic(&patch);
        let result = retry("patch pod status", || api.patch_status(&name, &pp, &patch)).await;
        match result {
            Ok(_) => tracing::debug!(phase = ?self.status.phase, "status written"),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::debug!("pod gone; status not written");
            }
            Err(e) => tracing::warn!(error = %e, "writing the pod status failed"),
        }
    }
}

/// The next `control` value other than [`Control::Run`]; never resolves
/// once the runner loop is gone.
async fn next_control(rx: &mut watch::Receiver<Control>) -> Control {
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let c = *rx.borrow_and_update();
        if c != Control::Run {
            return c;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
