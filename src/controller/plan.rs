//! Plan: the pure heart of the reconciler. Given an ImageBuild and what was
//! observed of its Pods and of the BuildRunners, decide which Pods to create
//! and delete, the status to write and the events to emit. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use super::cached_pod::CachedPod;
use super::pod::{PodKey, PodSettings, build_pod, pod_name};
use super::runner_leg::RunnerLeg;
pub use super::runner_leg::{Expiry, LeaseRequest};
use super::validate::{BuildRequest, InvalidSpec, check_placement, validate};
use crate::api::{
    ANNOTATION_REBUILD, ANNOTATION_RETRY_FAILED, BuildRunner, ExecutorRef, ImageBuild,
    ImageBuildStatus, ImageStatus, LABEL_BUILD_ID, Phase, PlatformStatus,
};
use crate::platform::{Os, Platform};

/// Everything the plan looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The ImageBuild, with its current status.
    pub build: &'a ImageBuild,
    /// The Pods it owns (of any build), as the cache keeps them.
    pub pods: &'a [CachedPod],
    /// Its runner Lease objects (of any build).
    pub leases: &'a [Lease],
    /// All BuildRunners.
    pub runners: &'a [BuildRunner],
    /// The time to plan at.
    pub now: Timestamp,
    /// Why the spec cannot be built, found by the caller outside it: a
    /// Secret it names may not be used (wrong type, not opted in), or a
    /// Windows platform's node selector contradicts its base image.
    pub secret_problem: Option<&'a InvalidSpec>,
    /// The OS build each Windows platform built in Pods runs on
    /// (`node.kubernetes.io/windows-build`), from its base image or the
    /// spec, by platform.
    pub windows_builds: &'a BTreeMap<String, String>,
    /// What came of pushing the image index of the platforms' digests
    /// in the status, when the caller tried.
    pub index: Option<&'a IndexOutcome>,
    /// Names of the build Pods this process created less than
    /// [`STATUS_HOLD`] ago.
    pub just_created: &'a BTreeSet<String>,
}

/// How long the first status of a new build may wait for its build Pods,
/// just created, to be bound (see [`Plan::defer_status`]).
pub const STATUS_HOLD: Duration = Duration::from_secs(1);

/// What came of pushing an image index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOutcome {
    /// Pushed under every tag, read back and verified.
    Pushed {
        /// The index digest.
        digest: String,
        /// The platform digests it joins, in the order of the status.
        children: Vec<String>,
    },
    /// Not pushed, for a reason that may pass (the registry did not
    /// answer): tried again with backoff until `spec.timeout`.
    Retry(String),
    /// Not pushed, for a reason that will not pass (two platforms make the
    /// same index entry, a platform image is not of its platform).
    Invalid(String),
}

/// The platform digests of `status`, when every platform succeeded and an
/// image index still has to be pushed for them.
pub fn index_children(status: &ImageBuildStatus) -> Option<Vec<String>> {
    if status.image.is_some() || status.phase.is_some_and(Phase::is_finished) {
        return None;
    }
    platform_digests(status)
}

/// The digest of every platform, when all of them succeeded.
fn platform_digests(status: &ImageBuildStatus) -> Option<Vec<String>> {
    if status.platforms.is_empty() {
        return None;
    }
    status
        .platforms
        .iter()
        .map(|p| match (p.phase, &p.digest) {
            (Phase::Succeeded, Some(d)) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// Kind of a planned Kubernetes Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Something expected happened.
    Normal,
    /// Something went wrong.
    Warning,
}

/// A Kubernetes Event to publish about the ImageBuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Normal or Warning.
    pub kind: EventKind,
    /// PascalCase reason, e.g. `Building`.
    pub reason: String,
    /// Human-readable note.
    pub message: String,
}

/// A platform that reached a final phase in this plan (for metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Its OS.
    pub os: Os,
    /// `succeeded`, `failed` or `cancelled`.
    pub result: &'static str,
    /// Time from the start of the build.
    pub duration: Duration,
}

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Pods to create (server-side apply).
    pub create: Vec<Pod>,
    /// Names of Pods to delete.
    pub delete: Vec<String>,
    /// The status to write.
    pub status: ImageBuildStatus,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
    /// Platforms that finished.
    pub finished: Vec<Finished>,
    /// When to look again even if nothing changes.
    pub requeue_after: Option<Duration>,
    /// The spec is invalid: do not retry until it changes.
    pub invalid: Option<InvalidSpec>,
    /// Leases to hand to runners.
    pub leases: Vec<LeaseRequest>,
    /// Leases whose runner is gone, to delete (if unchanged).
    pub expire: Vec<Expiry>,
    /// Names of Lease objects to delete.
    pub delete_leases: Vec<String>,
    /// A platform waits for a matching runner to come Online.
    pub waits_for_runner: bool,
    /// Every platform succeeded: their image index is to be pushed.
    pub wants_index: bool,
    /// Pushing the index failed for a reason that may pass: retried with
    /// backoff.
    pub index_retry: Option<String>,
    /// The status is not written yet; reconcile again after
    /// [`STATUS_HOLD`]. It is the first status of a new build, and every
    /// platform's Pod is created by this plan or was created moments ago:
    /// Pods are usually bound within the hold, and the status then goes
    /// to Building in one write instead of two. A build still waiting for
    /// a node says so after the hold.
    pub defer_status: bool,
}

/// Condition types (kstatus).
pub const READY: &str = "Ready";
/// kstatus: the object is being worked on.
pub const RECONCILING: &str = "Reconciling";
/// kstatus: the object cannot progress without a change.
pub const STALLED: &str = "Stalled";

/// How much later than `spec.timeout` a build Pod's
/// `activeDeadlineSeconds` ends it.
pub const POD_DEADLINE_GRACE: Duration = Duration::from_secs(10);

fn annotation<'a>(ib: &'a ImageBuild, key: &str) -> Option<&'a str> {
    ib.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn rebuild_value(ib: &ImageBuild) -> Option<&str> {
    annotation(ib, ANNOTATION_REBUILD)
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn millis_between(from: &Time, to: Timestamp) -> i64 {
    to.as_millisecond() - from.0.as_millisecond()
}

fn non_negative(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0).unsigned_abs())
}

fn is_terminating(pod: &CachedPod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn lease_build_id(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_BUILD_ID))
        .map(String::as_str)
}

fn lease_is_open(lease: &Lease) -> bool {
    lease.metadata.deletion_timestamp.is_none()
}

fn pod_build_id(pod: &CachedPod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_BUILD_ID))
        .map(String::as_str)
}

/// Plans one reconcile of an ImageBuild.
pub fn plan(obs: Observed<'_>, settings: &PodSettings) -> Plan {
    let ib = obs.build;
    let generation = ib.metadata.generation.unwrap_or(0);
    let old = ib.status.clone().unwrap_or_default();
    let id = ib.build_id();
    let mut out = Plan::default();

    // Pods and leases of older builds are stopped whatever happens next.
    for pod in obs.pods {
        if pod_build_id(pod) != Some(id.as_str()) && !is_terminating(pod) {
            out.delete.push(pod.name_any());
        }
    }
    for lease in obs.leases {
        if lease_build_id(lease) != Some(id.as_str()) && lease_is_open(lease) {
            out.delete_leases.push(lease.name_any());
        }
    }

    let checked = validate(&ib.spec)
        .and_then(|req| check_placement(&ib.spec, &settings.placement).map(|()| req))
        .and_then(|req| match obs.secret_problem {
            Some(problem) => Err(problem.clone()),
            None => Ok(req),
        });
    let req = match checked {
        Ok(req) => req,
        Err(invalid) => {
            for pod in obs.pods {
                if !is_terminating(pod) && !out.delete.contains(&pod.name_any()) {
                    out.delete.push(pod.name_any());
                }
            }
            for lease in obs.leases {
                if lease_is_open(lease) && !out.delete_leases.contains(&lease.name_any()) {
                    out.delete_leases.push(lease.name_any());
                }
            }
            let mut status = ImageBuildStatus {
                observed_generation: Some(generation),
                phase: Some(Phase::Failed),
                build_id: Some(id),
                rebuild: rebuild_value(ib).map(str::to_string),
                retry_failed: annotation(ib, ANNOTATION_RETRY_FAILED).map(str::to_string),
                start_time: None,
                completion_time: old.completion_time.clone().or(Some(time(obs.now))),
                image: None,
                platforms: Vec::new(),
                conditions: Vec::new(),
            };
            status.conditions = conditions(
                &old.conditions,
                generation,
                Phase::Failed,
                "InvalidSpec",
                &invalid.to_string(),
                obs.now,
            );
            if old.phase != Some(Phase::Failed)
                || condition_message(&old, STALLED) != Some(&invalid.to_string())
            {
                out.events.push(PlannedEvent {
                    kind: EventKind::Warning,
                    reason: "InvalidSpec".into(),
                    message: invalid.to_string(),
                });
            }
            out.status = status;
            out.invalid = Some(invalid);
            return out;
        }
    };

    let new_build = old.build_id.as_deref() != Some(id.as_str());
    let mut status = if new_build {
        ImageBuildStatus {
            observed_generation: Some(generation),
            phase: Some(Phase::Pending),
            build_id: Some(id.clone()),
            rebuild: rebuild_value(ib).map(str::to_string),
            retry_failed: annotation(ib, ANNOTATION_RETRY_FAILED).map(str::to_string),
            start_time: Some(time(obs.now)),
            completion_time: None,
            image: None,
            platforms: req
                .platforms
                .iter()
                .map(|p| PlatformStatus {
                    platform: p.to_string(),
                    phase: Phase::Pending,
                    attempt_limit: attempts_per_round(&req),
                    ..Default::default()
                })
                .collect(),
            conditions: old.conditions.clone(),
        }
    } else {
        let mut s = old.clone();
        s.observed_generation = Some(generation);
        s
    };
    let mut old_phase = if new_build { None } else { old.phase };
    // A new value of the retry-failed annotation, once the build has
    // finished (asked earlier, it is answered when it finishes): the failed
    // (and cancelled) platforms of this build start over, the others keep
    // their verified digests; a build that failed at its index pushes it
    // again.
    let retry = annotation(ib, ANNOTATION_RETRY_FAILED);
    if !new_build
        && retry.is_some()
        && retry != old.retry_failed.as_deref()
        && old.phase.is_some_and(Phase::is_finished)
    {
        status.retry_failed = retry.map(str::to_string);
        if !ib.spec.cancel && old.phase == Some(Phase::Failed) {
            let retried = retry_failed(&mut status, &req, obs.now);
            let message = match retried.as_slice() {
                [] if platform_digests(&status).is_some() => {
                    // Every platform has its digest: only the index failed.
                    status.phase = Some(Phase::Building);
                    status.start_time = Some(time(obs.now));
                    status.completion_time = None;
                    Some(format!(
                        "pushing the image index again (asked by {ANNOTATION_RETRY_FAILED}); every platform keeps its digest"
                    ))
                }
                [] => None,
                some => Some(format!(
                    "rebuilding {} (asked by {ANNOTATION_RETRY_FAILED}); the other platforms keep their digests",
                    some.join(", ")
                )),
            };
            if let Some(message) = message {
                old_phase = None;
                out.events.push(PlannedEvent {
                    kind: EventKind::Normal,
                    reason: "RetryingFailed".into(),
                    message,
                });
            }
        }
    }
    let old_platform_phases: Vec<Phase> = status.platforms.iter().map(|p| p.phase).collect();
    let start = status.start_time.clone().unwrap_or_else(|| time(obs.now));
    let elapsed = non_negative(millis_between(&start, obs.now));

    let mut reason = "Building".to_string();
    let mut index_message: Option<String> = None;
    let current_pods: Vec<&CachedPod> = obs
        .pods
        .iter()
        .filter(|p| pod_build_id(p) == Some(id.as_str()))
        .collect();
    let current_leases: Vec<&Lease> = obs
        .leases
        .iter()
        .filter(|l| lease_build_id(l) == Some(id.as_str()))
        .collect();

    let finished_before = status.phase.is_some_and(Phase::is_finished);
    if !finished_before {
        if ib.spec.cancel {
            stop(
                &mut status,
                (&current_pods, &current_leases),
                &mut out,
                Phase::Cancelled,
                "cancelled by spec.cancel",
            );
            reason = "Cancelled".into();
        } else if elapsed >= req.timeout
            && !matches!(obs.index, Some(IndexOutcome::Pushed { children, .. })
                if Some(children) == platform_digests(&status).as_ref())
        {
            // (An index pushed for exactly these platforms is the build's
            // result even when the clock ran out meanwhile: the tags
            // point at it.)
            let msg = format!(
                "the build exceeded spec.timeout ({})",
                ib.spec.timeout.as_deref().unwrap_or("1h")
            );
            stop(
                &mut status,
                (&current_pods, &current_leases),
                &mut out,
                Phase::Failed,
                &msg,
            );
            reason = "Timeout".into();
        } else {
            drive_platforms(
                ib,
                &req,
                &id,
                &current_pods,
                obs,
                settings,
                &mut status,
                &mut out,
            );
            if let Some(failed) = status.platforms.iter().find(|p| p.phase == Phase::Failed) {
                // The others finish, unless the user asked to stop them.
                if req.fail_fast {
                    let msg = format!("stopped because {} failed (spec.failFast)", failed.platform);
                    stop(
                        &mut status,
                        (&current_pods, &current_leases),
                        &mut out,
                        Phase::Cancelled,
                        &msg,
                    );
                }
                reason = "BuildFailed".into();
            }
            let remaining = req.timeout.saturating_sub(elapsed);
            out.requeue_after = Some(remaining);
            // The node enforces the timeout too, should the controller be
            // away when it passes; a little later than the controller, so
            // that its message ("exceeded spec.timeout") is the one shown.
            let deadline = i64::try_from((remaining + POD_DEADLINE_GRACE).as_secs())
                .unwrap_or(i64::MAX)
                .max(1);
            for pod in &mut out.create {
                if let Some(spec) = pod.spec.as_mut() {
                    spec.active_deadline_seconds = Some(deadline);
                }
            }
        }
    } else {
        reason = finished_reason(&old);
    }

    // Aggregate.
    let mut phase = aggregate(&status, finished_before, old.phase, &reason);
    if phase == Phase::Succeeded && status.image.is_none() {
        if req.index {
            // Every platform is pushed by digest: their index makes the image.
            let children = platform_digests(&status);
            match obs.index {
                Some(IndexOutcome::Pushed {
                    digest,
                    children: joined,
                }) if Some(joined) == children.as_ref() => {
                    status.image = Some(ImageStatus {
                        reference: req.image.to_string(),
                        digest: digest.clone(),
                        pinned: req.image.pinned(digest),
                    });
                }
                Some(IndexOutcome::Invalid(message)) => {
                    phase = Phase::Failed;
                    reason = "IndexInvalid".into();
                    index_message = Some(format!("the image index cannot be made: {message}"));
                }
                Some(IndexOutcome::Retry(message)) => {
                    phase = Phase::Building;
                    out.index_retry = Some(message.clone());
                    index_message = Some(format!(
                        "pushing the image index failed, retrying: {message}"
                    ));
                }
                _ => {
                    phase = Phase::Building;
                    out.wants_index = true;
                    index_message = Some(format!(
                        "joining {} platforms into an image index",
                        status.platforms.len()
                    ));
                }
            }
        } else if let [only] = status.platforms.as_slice()
            && let Some(digest) = &only.digest
        {
            status.image = Some(ImageStatus {
                reference: req.image.to_string(),
                digest: digest.clone(),
                pinned: req.image.pinned(digest),
            });
        }
    }
    status.phase = Some(phase);
    if phase.is_finished() && status.completion_time.is_none() {
        status.completion_time = Some(time(obs.now));
    }

    // Metrics: platforms that reached a final phase now.
    for (i, ps) in status.platforms.iter().enumerate() {
        let was_final = old_platform_phases.get(i).is_some_and(|p| p.is_finished());
        if ps.phase.is_finished()
            && !was_final
            && let Ok(p) = ps.platform.parse::<Platform>()
        {
            out.finished.push(Finished {
                os: p.os(),
                result: match ps.phase {
                    Phase::Succeeded => "succeeded",
                    Phase::Failed => "failed",
                    _ => "cancelled",
                },
                duration: elapsed,
            });
        }
    }

    // A build that had finished keeps what its conditions said (a spec or
    // Secret problem is not derivable from the platforms).
    let message = match (condition_message(&old, READY), index_message) {
        (Some(m), _) if finished_before && !m.is_empty() => m.clone(),
        (_, Some(m)) => m,
        _ => summary(&status, phase, &reason),
    };
    let cond_reason = match phase {
        Phase::Failed | Phase::Cancelled => reason.as_str(),
        other => other.as_str(),
    };
    status.conditions = conditions(
        &old.conditions,
        generation,
        phase,
        cond_reason,
        &message,
        obs.now,
    );

    // One Event per build outcome; the phases on the way (Scheduling,
    // Building) are in the status and its conditions, not in Events: each
    // Event is an API write per build.
    if (old_phase != Some(phase) || new_build) && phase.is_finished() {
        out.events.push(PlannedEvent {
            kind: if phase == Phase::Failed {
                EventKind::Warning
            } else {
                EventKind::Normal
            },
            reason: if phase == Phase::Failed {
                reason.clone()
            } else {
                phase.as_str().to_string()
            },
            message: message.clone(),
        });
    }

    if out.wants_index {
        out.requeue_after = Some(Duration::from_secs(1));
    }

    // Cleanup of finished builds after their TTL.
    if phase.is_finished() {
        out.requeue_after = None;
        if let (Some(ttl), Some(done)) = (req.ttl_after_finished, &status.completion_time) {
            let since = non_negative(millis_between(done, obs.now));
            if since >= ttl {
                for pod in &current_pods {
                    let name = pod.name_any();
                    if !is_terminating(pod) && !out.delete.contains(&name) {
                        out.delete.push(name);
                    }
                }
                for lease in &current_leases {
                    let name = lease.name_any();
                    if lease_is_open(lease) && !out.delete_leases.contains(&name) {
                        out.delete_leases.push(name);
                    }
                }
            } else {
                out.requeue_after = Some(ttl - since);
            }
        }
    }

    out.defer_status = phase == Phase::Scheduling
        && old.phase.is_none_or(|p| p == Phase::Pending)
        && !status.platforms.is_empty()
        && status.platforms.iter().all(|p| {
            p.executor.as_ref().is_some_and(|e| {
                e.kind == "Pod"
                    && (obs.just_created.contains(&e.name)
                        || out
                            .create
                            .iter()
                            .any(|c| c.metadata.name.as_deref() == Some(&e.name)))
            })
        });
    out.status = status;
    out
}

/// How many attempts a platform gets per round: `1 + spec.retries`.
fn attempts_per_round(req: &BuildRequest) -> i32 {
    i32::try_from(req.retries + 1).unwrap_or(i32::MAX)
}

/// Starts the failed and cancelled platforms of `status` over with a new
/// round of attempts (and the build's clock anew: `spec.timeout` counts
/// from now). Returns the platforms retried.
fn retry_failed(status: &mut ImageBuildStatus, req: &BuildRequest, now: Timestamp) -> Vec<String> {
    let mut retried = Vec::new();
    for ps in status
        .platforms
        .iter_mut()
        .filter(|p| matches!(p.phase, Phase::Failed | Phase::Cancelled))
    {
        ps.attempts += 1;
        ps.attempt_limit = ps.attempts - 1 + attempts_per_round(req);
        ps.attempt_start_time = Some(time(now));
        ps.phase = Phase::Pending;
        ps.executor = None;
        ps.step = None;
        ps.digest = None;
        ps.message = Some(format!("retrying (asked by {ANNOTATION_RETRY_FAILED})"));
        retried.push(ps.platform.clone());
    }
    if !retried.is_empty() {
        status.phase = Some(Phase::Building);
        status.start_time = Some(time(now));
        status.completion_time = None;
        status.image = None;
    }
    retried
}

fn finished_reason(old: &ImageBuildStatus) -> String {
    old.conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.clone())
        .unwrap_or_else(|| old.phase.unwrap_or_default().as_str().to_string())
}

fn condition_message<'a>(status: &'a ImageBuildStatus, type_: &str) -> Option<&'a String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| &c.message)
}

/// Stops every unfinished platform with `phase` and deletes their Pods and
/// takes back their leases.
fn stop(
    status: &mut ImageBuildStatus,
    (pods, leases): (&[&CachedPod], &[&Lease]),
    out: &mut Plan,
    phase: Phase,
    message: &str,
) {
    for ps in status
        .platforms
        .iter_mut()
        .filter(|p| !p.phase.is_finished())
    {
        // A Pod the status names but the cache does not show yet (it may
        // be running) is deleted by name too.
        if let Some(e) = ps.executor.as_ref().filter(|e| e.kind == "Pod")
            && !pods.iter().any(|p| p.name_any() == e.name)
            && !out.delete.contains(&e.name)
        {
            out.delete.push(e.name.clone());
        }
        ps.phase = phase;
        ps.message = Some(message.to_string());
        ps.step = None;
    }
    for pod in pods {
        let name = pod.name_any();
        if !is_terminating(pod) && !out.delete.contains(&name) && pod_is_active(pod) {
            out.delete.push(name);
        }
    }
    for lease in leases {
        let name = lease.name_any();
        if crate::executor::runners::lease_is_active(lease) && !out.delete_leases.contains(&name) {
            out.delete_leases.push(name);
        }
    }
}

fn pod_is_active(pod: &CachedPod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

#[allow(clippy::too_many_arguments)]
fn drive_platforms(
    ib: &ImageBuild,
    req: &BuildRequest,
    id: &str,
    pods: &[&CachedPod],
    obs: Observed<'_>,
    settings: &PodSettings,
    status: &mut ImageBuildStatus,
    out: &mut Plan,
) {
    let generation = ib.metadata.generation.unwrap_or(0);
    let rebuild = rebuild_value(ib);
    let platforms = req.platforms.iter().zip(req.on_runner.iter());
    for ((platform, on_runner), ps) in platforms.zip(status.platforms.iter_mut()) {
        if ps.phase.is_finished() {
            continue;
        }
        if *on_runner {
            RunnerLeg {
                build: ib,
                id,
                generation,
                rebuild,
                max_attempts: req.retries + 1,
                platform,
                leases: obs.leases,
                runners: obs.runners,
                now: obs.now,
            }
            .drive(ps, out);
        } else {
            drive_pod_platform(
                ib, req, id, generation, rebuild, platform, pods, obs, settings, ps, out,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn drive_pod_platform(
    ib: &ImageBuild,
    req: &BuildRequest,
    id: &str,
    generation: i64,
    rebuild: Option<&str>,
    platform: &Platform,
    pods: &[&CachedPod],
    obs: Observed<'_>,
    settings: &PodSettings,
    ps: &mut PlatformStatus,
    out: &mut Plan,
) {
    let max_attempts = req.retries + 1;
    if ps.attempts <= 0 {
        ps.attempts = 1;
        ps.attempt_start_time = Some(time(obs.now));
    }
    loop {
        let attempt = ps.attempts.unsigned_abs();
        let key = PodKey {
            platform,
            build_id: id,
            attempt,
            windows_build: obs
                .windows_builds
                .get(&platform.to_string())
                .map(String::as_str),
        };
        let name = pod_name(&ib.name_any(), generation, rebuild, &key);
        // The Pod of this attempt was running (bound to a node) when last
        // seen: if it is gone now, it was deleted or lost with its node.
        let was_running = ps.phase == Phase::Building
            && ps
                .executor
                .as_ref()
                .is_some_and(|e| e.name == name && e.node.is_some());
        ps.executor = Some(ExecutorRef {
            kind: "Pod".into(),
            name: name.clone(),
            node: None,
            emulated: false,
        });
        let found = pods.iter().find(|p| p.name_any() == name);
        if found.is_none() && was_running {
            let failure = format!("build Pod {name} disappeared (deleted, or lost with its node)");
            if retry_after_failure(ps, out, platform, max_attempts, &failure, obs.now) {
                continue;
            }
            return;
        }
        let Some(pod) = found else {
            out.create.push(build_pod(ib, &name, &key, settings));
            ps.phase = Phase::Scheduling;
            ps.message = Some(waiting_for_node(platform, key.windows_build));
            return;
        };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if let Some(exec) = ps.executor.as_mut() {
            exec.node = node.clone();
        }
        let pod_phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let reported = ExecutorReport::from_meta(&pod.metadata);
        if take_report(ps, &reported) {
            return;
        }
        let failure = match (&reported.failed, pod_phase) {
            (Some(f), _) => Some(f.to_string()),
            (None, "Failed") => Some(pod_failure(pod)),
            (None, "Succeeded") => {
                Some("the executor exited without reporting a pushed digest".to_string())
            }
            _ => None,
        };
        if let Some(failure) = failure {
            if retry_after_failure(ps, out, platform, max_attempts, &failure, obs.now) {
                continue;
            }
            return;
        }
        if is_terminating(pod) {
            ps.phase = Phase::Scheduling;
            ps.message = Some(format!("Pod {name} is being deleted"));
            return;
        }
        match node {
            Some(node) => {
                ps.phase = Phase::Building;
                ps.message = Some(format!("running on node {node}"));
            }
            None => {
                ps.phase = Phase::Scheduling;
                ps.message = Some(
                    unschedulable_message(pod)
                        .unwrap_or_else(|| waiting_for_node(platform, key.windows_build)),
                );
            }
        }
        return;
    }
}

/// Takes what an executor object's annotations report into the platform:
/// a verified push makes it Succeeded (returns true), else its step.
pub(super) fn take_report(ps: &mut PlatformStatus, reported: &ExecutorReport) -> bool {
    if let Some(pushed) = &reported.pushed {
        ps.digest = Some(pushed.digest.clone());
        ps.phase = Phase::Succeeded;
        ps.step = None;
        ps.message = None;
        return true;
    }
    if let Some(step) = &reported.step {
        ps.step = Some(step.clone());
    }
    false
}

/// Records that the current attempt of a platform failed: the next
/// attempt (and a `Retrying` Event) while attempts remain, else the
/// platform fails. Returns whether to go on with the next attempt.
pub(super) fn retry_after_failure(
    ps: &mut PlatformStatus,
    out: &mut Plan,
    platform: &Platform,
    max_attempts: u32,
    failure: &str,
    now: Timestamp,
) -> bool {
    let attempt = ps.attempts.unsigned_abs();
    // A retry-failed request raised this platform's limit.
    let max_attempts = if ps.attempt_limit > 0 {
        ps.attempt_limit.unsigned_abs()
    } else {
        max_attempts
    };
    if attempt < max_attempts {
        out.events.push(PlannedEvent {
            kind: EventKind::Warning,
            reason: "Retrying".into(),
            message: format!("{platform}: attempt {attempt} of {max_attempts} failed: {failure}"),
        });
        ps.attempts += 1;
        ps.attempt_start_time = Some(time(now));
        ps.digest = None;
        ps.step = None;
        return true;
    }
    ps.phase = Phase::Failed;
    ps.message = Some(format!(
        "attempt {attempt} of {max_attempts} failed: {failure}"
    ));
    false
}

/// What a platform's build Pod waits for: a node of its OS and arch (and
/// Windows OS build).
fn waiting_for_node(platform: &Platform, windows_build: Option<&str>) -> String {
    let mut m = format!(
        "waiting for a node with kubernetes.io/os={}, kubernetes.io/arch={}",
        platform.os(),
        platform.node_arch()
    );
    if let Some(build) = windows_build {
        m.push_str(&format!(", {}={build}", super::pod::WINDOWS_BUILD_LABEL));
    }
    m
}

fn unschedulable_message(pod: &CachedPod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .and_then(|c| c.message.clone())
        .map(|m| format!("not scheduled yet: {m}"))
}

pub use crate::outcome::{
    ANNOTATION_FAILURE, ANNOTATION_RESULT, ANNOTATION_STEP, ExecutorReport, Failed, Pushed,
};

/// Why a Pod failed, from its status and its containers' termination states.
pub fn pod_failure(pod: &CachedPod) -> String {
    let Some(status) = pod.status.as_ref() else {
        return "the build Pod failed".into();
    };
    let mut parts = Vec::new();
    // The per-container details below say the same as these Pod reasons.
    let generic = matches!(
        status.reason.as_deref(),
        Some("ContainerFailed" | "InitContainerFailed")
    );
    if let Some(reason) = status.reason.as_ref().filter(|_| !generic) {
        parts.push(match &status.message {
            Some(m) => format!("{reason}: {m}"),
            None => reason.clone(),
        });
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            let detail = t
                .message
                .as_deref()
                .and_then(|m| m.trim().lines().last())
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            parts.push(format!(
                "container {} exited with code {}{detail}",
                c.name, t.exit_code
            ));
        }
    }
    if parts.is_empty() {
        "the build Pod failed".into()
    } else {
        parts.join("; ")
    }
}

fn aggregate(
    status: &ImageBuildStatus,
    finished_before: bool,
    old: Option<Phase>,
    reason: &str,
) -> Phase {
    if finished_before {
        return old.unwrap_or(Phase::Failed);
    }
    let phases: Vec<Phase> = status.platforms.iter().map(|p| p.phase).collect();
    if reason == "Cancelled" {
        return Phase::Cancelled;
    }
    if reason == "Timeout" {
        return Phase::Failed;
    }
    // A failed platform fails the build once the others have finished too.
    if !phases.is_empty() && phases.iter().all(|p| p.is_finished()) {
        if phases.contains(&Phase::Failed) {
            return Phase::Failed;
        }
        if phases.iter().all(|p| *p == Phase::Succeeded) {
            return Phase::Succeeded;
        }
        return Phase::Cancelled;
    }
    if phases.contains(&Phase::Building) {
        Phase::Building
    } else if phases.contains(&Phase::Scheduling) {
        Phase::Scheduling
    } else {
        Phase::Pending
    }
}

fn summary(status: &ImageBuildStatus, phase: Phase, reason: &str) -> String {
    if phase == Phase::Succeeded
        && let Some(img) = &status.image
    {
        return format!("pushed {}", img.pinned);
    }
    let mut parts: Vec<String> = status
        .platforms
        .iter()
        .map(|p| match &p.message {
            Some(m) => format!("{}: {} ({m})", p.platform, p.phase),
            None => format!("{}: {}", p.platform, p.phase),
        })
        .collect();
    if phase == Phase::Failed && reason == "Timeout" {
        parts.insert(0, "timed out".into());
    }
    parts.join("; ")
}

/// The kstatus conditions for a phase, keeping transition times of
/// conditions whose status did not change.
pub fn conditions(
    old: &[Condition],
    generation: i64,
    phase: Phase,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Vec<Condition> {
    let flags = match phase {
        Phase::Succeeded => (true, false, false),
        Phase::Failed => (false, false, true),
        Phase::Cancelled => (false, false, false),
        Phase::Pending | Phase::Scheduling | Phase::Building => (false, true, false),
    };
    kstatus(old, generation, flags, reason, message, now)
}

/// Ready, Reconciling and Stalled with the given truth values, one reason
/// and message, keeping the transition time of a condition whose status did
/// not change since `old`.
fn kstatus(
    old: &[Condition],
    generation: i64,
    (ready, reconciling, stalled): (bool, bool, bool),
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Vec<Condition> {
    let make = |type_: &str, value: bool| {
        let status = if value { "True" } else { "False" }.to_string();
        let last = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| time(now));
        Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: truncate(message, 1024),
            observed_generation: Some(generation),
            last_transition_time: last,
        }
    };
    vec![
        make(READY, ready),
        make(RECONCILING, reconciling),
        make(STALLED, stalled),
    ]
}

/// Reason of `Stalled=True` while the API server refuses a build Pod.
pub const REASON_POD_REJECTED: &str = "BuildPodRejected";
/// Reason of `Stalled=True` while a Secret the build names does not exist.
pub const REASON_SECRET_NOT_FOUND: &str = "SecretNotFound";
/// The base image of a Windows platform could not be read (the registry
/// did not answer): its Pod waits.
pub const REASON_BASE_IMAGE_UNREADABLE: &str = "BaseImageUnreadable";

impl Plan {
    /// The build Pod of `platform` is not made now, for `reason` (the API
    /// server refused it, a Secret is missing, its token Secret name is
    /// taken): the platform and the conditions say so ([`waiting`]), with
    /// one Warning Event per message.
    pub fn hold_back(
        &mut self,
        platform: &str,
        reason: &str,
        message: &str,
        generation: i64,
        now: Timestamp,
    ) {
        waiting(&mut self.status, platform, reason, message, generation, now);
        // The user hears of it now.
        self.defer_status = false;
        if !self
            .events
            .iter()
            .any(|e| e.reason == reason && e.message == message)
        {
            self.events.push(PlannedEvent {
                kind: EventKind::Warning,
                reason: reason.to_string(),
                message: message.to_string(),
            });
        }
    }
}

impl Plan {
    /// Drops the Warnings of builds held back (`BuildPodRejected`,
    /// `SecretNotFound`, `BaseImageUnreadable`) that `old`, the status as
    /// it is, already says: `Stalled` for that reason and the same message
    /// on a platform. A held-back build is retried with backoff until the
    /// cause goes; its user heard of it the first time.
    pub fn drop_repeated_warnings(&mut self, old: Option<&ImageBuildStatus>) {
        let Some(old) = old else { return };
        self.events.retain(|e| {
            let held_back = [
                REASON_POD_REJECTED,
                REASON_SECRET_NOT_FOUND,
                REASON_BASE_IMAGE_UNREADABLE,
            ]
            .contains(&e.reason.as_str());
            let stalled = old
                .conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == e.reason);
            let said = old
                .platforms
                .iter()
                .any(|p| p.message.as_deref() == Some(e.message.as_str()));
            !(held_back && stalled && said)
        });
    }
}

/// Marks `status` for a platform whose build Pod cannot be made yet, for
/// `reason`: the message on that platform, `Stalled=True` with
/// `Reconciling=True` (the controller keeps trying) and `Ready=False`.
pub fn waiting(
    status: &mut ImageBuildStatus,
    platform: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) {
    for ps in status.platforms.iter_mut() {
        if ps.platform == platform {
            ps.message = Some(message.to_string());
        }
    }
    status.conditions = kstatus(
        &status.conditions,
        generation,
        (false, true, true),
        reason,
        message,
        now,
    );
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        BuildRunnerSpec, BuildRunnerStatus, BuildSource, ExecutorSpec, ImageBuildSpec,
        InlineSource, Output, RunnerOs, RunnerPhase,
    };
    use crate::controller::cached_pod::{
        CachedContainerState, CachedContainerStatus, CachedPodCondition, CachedPodSpec,
        CachedPodStatus, CachedTermination,
    };
    use std::collections::BTreeMap;

    fn settings() -> PodSettings {
        PodSettings {
            agent_image: "a".into(),
            buildd_image: "b".into(),
            windows_buildd_image: "w".into(),
            windows_buildkit_addr: "npipe:////./pipe/buildkitd".into(),
            executor_address: "x:1".into(),
            service_account: None,
            buildd_security_context: None,
            user_namespace: false,
            buildd_seccomp_profile: crate::controller::pod::parse_seccomp_profile(
                crate::controller::pod::DEFAULT_BUILDD_SECCOMP_PROFILE,
            )
            .expect("default profile"),
            placement: Default::default(),
        }
    }

    fn ib(platforms: &[&str]) -> ImageBuild {
        let mut ib = ImageBuild::new(
            "app",
            ImageBuildSpec {
                source: BuildSource {
                    inline: Some(InlineSource {
                        dockerfile: "FROM scratch".into(),
                        files: BTreeMap::new(),
                    }),
                    git: None,
                },
                platforms: platforms.iter().map(|s| s.to_string()).collect(),
                output: Output {
                    image: "registry.local/team/app:1".into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        ib.metadata.namespace = Some("ns".into());
        ib.metadata.uid = Some("uid".into());
        ib.metadata.generation = Some(1);
        ib
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn run(ib: &ImageBuild, pods: &[CachedPod], runners: &[BuildRunner], now: Timestamp) -> Plan {
        run_with_leases(ib, pods, &[], runners, now)
    }

    static NO_WINDOWS_BUILDS: BTreeMap<String, String> = BTreeMap::new();
    static NONE_JUST_CREATED: BTreeSet<String> = BTreeSet::new();

    /// What the plan sees of `ib` and its `pods` at `now`, and nothing else.
    fn observed<'a>(ib: &'a ImageBuild, pods: &'a [CachedPod], now: Timestamp) -> Observed<'a> {
        Observed {
            build: ib,
            pods,
            leases: &[],
            runners: &[],
            now,
            secret_problem: None,
            windows_builds: &NO_WINDOWS_BUILDS,
            index: None,
            just_created: &NONE_JUST_CREATED,
        }
    }

    fn run_with_leases(
        ib: &ImageBuild,
        pods: &[CachedPod],
        leases: &[Lease],
        runners: &[BuildRunner],
        now: Timestamp,
    ) -> Plan {
        let obs = Observed {
            leases,
            runners,
            ..observed(ib, pods, now)
        };
        plan(obs, &settings())
    }

    /// Applies a plan the way the API server would: status written, Pods created/deleted.
    fn apply(ib: &mut ImageBuild, pods: &mut Vec<CachedPod>, plan: &Plan) {
        ib.status = Some(plan.status.clone());
        pods.retain(|p| !plan.delete.contains(&p.name_any()));
        pods.extend(plan.create.iter().map(|p| CachedPod::of(p).unwrap()));
    }

    fn cond<'a>(status: &'a ImageBuildStatus, t: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn set_pod(pod: &mut CachedPod, node: Option<&str>, phase: &str) {
        pod.spec
            .get_or_insert_with(CachedPodSpec::default)
            .node_name = node.map(str::to_string);
        pod.status = Some(CachedPodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
    }

    fn run_just_created(
        ib: &ImageBuild,
        pods: &[CachedPod],
        just: &[&str],
        now: Timestamp,
    ) -> Plan {
        let just: BTreeSet<String> = just.iter().map(|s| s.to_string()).collect();
        let obs = Observed {
            just_created: &just,
            ..observed(ib, pods, now)
        };
        plan(obs, &settings())
    }

    #[test]
    fn the_first_status_waits_briefly_for_pods_just_created_to_be_bound() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        let mut pods = Vec::new();
        // The plan that creates the Pods defers the status.
        let p = run(&b, &pods, &[], at(0));
        assert_eq!(p.create.len(), 2);
        assert_eq!(p.status.phase, Some(Phase::Scheduling));
        assert!(p.defer_status);
        pods.extend(p.create.iter().map(|p| CachedPod::of(p).unwrap()));
        let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // Shown unbound, created moments ago: still deferred.
        let p = run_just_created(&b, &pods, &names, at(0));
        assert!(p.create.is_empty());
        assert!(p.defer_status);
        // One created longer ago (not in the set): the status is written.
        assert!(!run_just_created(&b, &pods, &names[..1], at(1)).defer_status);
        // Both bound within the hold: Building, written at once.
        for pod in &mut pods {
            set_pod(pod, Some("n"), "Pending");
        }
        let p = run_just_created(&b, &pods, &names, at(0));
        assert_eq!(p.status.phase, Some(Phase::Building));
        assert!(!p.defer_status);
        // A build that already has a status is not held back again.
        for pod in &mut pods {
            set_pod(pod, None, "Pending");
        }
        let p = run_just_created(&b, &pods, &names, at(0));
        apply(&mut b, &mut pods, &p);
        assert!(!run_just_created(&b, &pods, &names, at(1)).defer_status);
    }

    #[test]
    fn a_build_held_back_again_for_the_same_reason_is_not_told_again() {
        let b = ib(&["linux/amd64"]);
        let mut p = run(&b, &[], &[], at(0));
        p.hold_back("linux/amd64", REASON_POD_REJECTED, "refused", 1, at(0));
        let told = p.status.clone();
        p.drop_repeated_warnings(None);
        assert_eq!(p.events.len(), 1, "the first time: {:?}", p.events);

        // The next reconcile, same cause: the status says it already.
        let mut again = run(&b, &[], &[], at(5));
        again.hold_back("linux/amd64", REASON_POD_REJECTED, "refused", 1, at(5));
        again.drop_repeated_warnings(Some(&told));
        assert!(again.events.is_empty(), "{:?}", again.events);

        // Another message is news.
        let mut other = run(&b, &[], &[], at(9));
        other.hold_back(
            "linux/amd64",
            REASON_POD_REJECTED,
            "refused: quota",
            1,
            at(9),
        );
        other.drop_repeated_warnings(Some(&told));
        assert_eq!(other.events.len(), 1);
    }

    #[test]
    fn a_pod_held_back_is_reported_without_delay() {
        let b = ib(&["linux/amd64"]);
        let mut p = run(&b, &[], &[], at(0));
        assert!(p.defer_status);
        p.hold_back("linux/amd64", REASON_POD_REJECTED, "refused", 1, at(0));
        assert!(!p.defer_status);
    }

    #[test]
    fn refused_pod_stalls_until_a_reconcile_creates_it() {
        let b = ib(&["linux/amd64", "linux/arm64"]);
        let mut p = run(&b, &[], &[], at(0));
        waiting(
            &mut p.status,
            "linux/arm64",
            REASON_POD_REJECTED,
            "the API server refused build Pod x: violates PodSecurity",
            1,
            at(1),
        );
        let other = p.status.platforms[0].message.as_deref().unwrap_or("");
        assert!(!other.contains("refused"), "{other}");
        assert!(
            p.status.platforms[1]
                .message
                .as_deref()
                .unwrap()
                .contains("PodSecurity")
        );
        let stalled = cond(&p.status, STALLED);
        assert_eq!(stalled.status, "True");
        assert_eq!(stalled.reason, REASON_POD_REJECTED);
        assert_eq!(stalled.last_transition_time, time(at(1)));
        assert_eq!(stalled.observed_generation, Some(1));
        assert_eq!(cond(&p.status, RECONCILING).status, "True");
        assert_eq!(cond(&p.status, READY).status, "False");
        // Reconciling stayed True: its transition time is kept.
        assert_eq!(
            cond(&p.status, RECONCILING).last_transition_time,
            time(at(0))
        );

        // Refused again later: Stalled keeps its transition time.
        let mut again = p.status.clone();
        waiting(
            &mut again,
            "linux/arm64",
            REASON_POD_REJECTED,
            "still refused",
            1,
            at(5),
        );
        assert_eq!(cond(&again, STALLED).last_transition_time, time(at(1)));
    }

    #[test]
    fn new_build_creates_pods_and_darwin_waits_for_a_runner() {
        let b = ib(&["linux/amd64", "windows/amd64", "darwin/arm64"]);
        let p = run(&b, &[], &[], at(0));
        assert_eq!(p.create.len(), 2);
        let names: Vec<String> = p.create.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["app-1-linux-amd64-1", "app-1-windows-amd64-1"]);
        assert_eq!(p.status.phase, Some(Phase::Scheduling));
        assert_eq!(p.status.observed_generation, Some(1));
        let darwin = &p.status.platforms[2];
        assert_eq!(darwin.phase, Phase::Scheduling);
        let msg = darwin.message.as_deref().unwrap();
        assert!(
            msg.contains("os=darwin, arch=arm64") && msg.contains("none is registered"),
            "{msg}"
        );
        assert_eq!(cond(&p.status, RECONCILING).status, "True");
        assert_eq!(cond(&p.status, READY).status, "False");
        assert_eq!(cond(&p.status, STALLED).status, "False");
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(3600)));
    }

    fn runner(name: &str, os: RunnerOs, arch: &str, phase: RunnerPhase) -> BuildRunner {
        let mut r = BuildRunner::new(
            name,
            BuildRunnerSpec {
                os,
                arch: arch.into(),
                capacity: 2,
                labels: BTreeMap::from([("pool".to_string(), "a".to_string())]),
                emulated_archs: if os == RunnerOs::Linux {
                    vec!["arm64".into()]
                } else {
                    Vec::new()
                },
                windows_archs: Vec::new(),
            },
        );
        r.status = Some(BuildRunnerStatus {
            phase: Some(phase),
            ..Default::default()
        });
        r
    }

    /// Applies the runner leg as the reconciler would: the first candidate
    /// gets each lease; expired and taken-back leases are deleted.
    fn apply_leases(ib: &mut ImageBuild, leases: &mut Vec<Lease>, plan: &Plan) {
        let mut status = plan.status.clone();
        leases.retain(|l| {
            !plan.delete_leases.contains(&l.name_any())
                && !plan.expire.iter().any(|e| e.name == l.name_any())
        });
        for req in &plan.leases {
            let c = &req.candidates[0];
            let platform: Platform = req.platform.parse().unwrap();
            let id = ib.build_id();
            leases.push(crate::controller::lease::build_lease(
                &crate::controller::lease::LeaseFor {
                    build: ib,
                    name: &req.name,
                    key: PodKey {
                        platform: &platform,
                        build_id: &id,
                        attempt: req.attempt,
                        windows_build: None,
                    },
                    runner: &c.runner,
                    emulated: c.emulated,
                    now: at(0),
                },
            ));
            let ps = status
                .platforms
                .iter_mut()
                .find(|p| p.platform == req.platform)
                .unwrap();
            ps.phase = Phase::Building;
            ps.executor = Some(ExecutorRef {
                kind: "Runner".into(),
                name: c.runner.clone(),
                node: None,
                emulated: c.emulated,
            });
        }
        ib.status = Some(status);
    }

    #[test]
    fn a_windows_os_build_goes_to_a_windows_runner_of_that_build_or_a_linux_buildkit_one() {
        use super::super::runner_leg::runner_builds;
        let b = ib(&["windows(10.0.17763)/amd64"]);
        let p: Platform = "windows(10.0.17763)/amd64".parse().unwrap();
        let mut win = runner("w", RunnerOs::Windows, "amd64", RunnerPhase::Online);
        assert_eq!(runner_builds(&win, &b, &p), None, "no build label");
        win.spec.labels.insert(
            super::super::pod::WINDOWS_BUILD_LABEL.into(),
            "10.0.20348".into(),
        );
        assert_eq!(runner_builds(&win, &b, &p), None, "another build");
        win.spec.labels.insert(
            super::super::pod::WINDOWS_BUILD_LABEL.into(),
            "10.0.17763".into(),
        );
        assert_eq!(runner_builds(&win, &b, &p), Some(false));
        let mut linux = runner("l", RunnerOs::Linux, "amd64", RunnerPhase::Online);
        linux.spec.windows_archs = vec!["amd64".into()];
        assert_eq!(runner_builds(&linux, &b, &p), Some(false));
    }

    #[test]
    fn offline_runner_is_named_in_the_message() {
        let b = ib(&["darwin/arm64"]);
        let r = runner("mac-1", RunnerOs::Darwin, "arm64", RunnerPhase::Offline);
        let p = run(&b, &[], &[r], at(0));
        let msg = p.status.platforms[0].message.clone().unwrap();
        assert!(
            msg.contains("1 registered, none Online (mac-1 Offline)"),
            "{msg}"
        );
        assert!(p.create.is_empty() && p.leases.is_empty());
        assert!(p.waits_for_runner);
    }

    #[test]
    fn runner_platforms_are_leased_to_matching_online_runners_emulated_last() {
        let mut b = ib(&["linux/amd64", "linux/arm64", "darwin/arm64"]);
        b.spec.executor = Some(ExecutorSpec {
            runner_platforms: vec!["linux/arm64".into()],
            runner_selector: BTreeMap::from([("pool".to_string(), "a".to_string())]),
            ..Default::default()
        });
        let runners = [
            runner("linux-1", RunnerOs::Linux, "amd64", RunnerPhase::Online),
            runner("mac-1", RunnerOs::Darwin, "arm64", RunnerPhase::Online),
            runner("mac-2", RunnerOs::Darwin, "arm64", RunnerPhase::Draining),
        ];
        let p = run(&b, &[], &runners, at(0));
        // linux/amd64 stays a Pod.
        assert_eq!(p.create.len(), 1);
        let reqs: Vec<(&str, Vec<(&str, bool)>)> = p
            .leases
            .iter()
            .map(|r| {
                (
                    r.platform.as_str(),
                    r.candidates
                        .iter()
                        .map(|c| (c.runner.as_str(), c.emulated))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            reqs,
            [
                ("linux/arm64", vec![("linux-1", true)]),
                ("darwin/arm64", vec![("mac-1", false)]),
            ]
        );
        assert_eq!(p.leases[0].name, "app-1-linux-arm64-1");
        // A selector no runner carries: none matches.
        b.spec.executor.as_mut().unwrap().runner_selector =
            BTreeMap::from([("pool".to_string(), "b".to_string())]);
        let p = run(&b, &[], &runners, at(0));
        let msg = p.status.platforms[2].message.clone().unwrap();
        assert!(msg.contains("pool=b: none is registered"), "{msg}");
    }

    #[test]
    fn a_lost_runner_expires_its_lease_counts_the_attempt_and_goes_elsewhere() {
        let mut b = ib(&["darwin/arm64"]);
        b.spec.retries = Some(1);
        let mut runners = vec![
            runner("mac-1", RunnerOs::Darwin, "arm64", RunnerPhase::Online),
            runner("mac-2", RunnerOs::Darwin, "arm64", RunnerPhase::Offline),
        ];
        let mut leases = Vec::new();
        let p = run_with_leases(&b, &[], &leases, &runners, at(0));
        assert_eq!(p.leases[0].candidates[0].runner, "mac-1");
        apply_leases(&mut b, &mut leases, &p);
        let p = run_with_leases(&b, &[], &leases, &runners, at(1));
        let ps = &p.status.platforms[0];
        assert_eq!((ps.phase, ps.attempts), (Phase::Building, 1));
        assert_eq!(ps.executor.as_ref().unwrap().name, "mac-1");
        assert!(p.leases.is_empty() && p.expire.is_empty());
        b.status = Some(p.status.clone());
        // mac-1 goes Offline, mac-2 comes Online.
        runners[0].status.as_mut().unwrap().phase = Some(RunnerPhase::Offline);
        runners[1].status.as_mut().unwrap().phase = Some(RunnerPhase::Online);
        let p = run_with_leases(&b, &[], &leases, &runners, at(30));
        assert_eq!(p.expire.len(), 1);
        assert_eq!(p.expire[0].name, "app-1-darwin-arm64-1");
        let ps = &p.status.platforms[0];
        assert_eq!(ps.attempts, 2);
        assert_eq!(p.leases[0].name, "app-1-darwin-arm64-2");
        assert_eq!(p.leases[0].candidates[0].runner, "mac-2");
        assert!(
            p.events
                .iter()
                .any(|e| e.reason == "Retrying" && e.message.contains("runner mac-1 went Offline"))
        );
        apply_leases(&mut b, &mut leases, &p);
        // The second runner reports a verified push.
        let l = leases
            .iter_mut()
            .find(|l| l.name_any() == "app-1-darwin-arm64-2")
            .unwrap();
        l.metadata.annotations.get_or_insert_default().insert(
            ANNOTATION_RESULT.into(),
            format!("{{\"digest\":\"sha256:{}\"}}", "d".repeat(64)),
        );
        let p = run_with_leases(&b, &[], &leases, &runners, at(40));
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        let ps = &p.status.platforms[0];
        assert_eq!(ps.executor.as_ref().unwrap().name, "mac-2");
        assert!(ps.digest.as_deref().unwrap().ends_with("dddd"));
    }

    #[test]
    fn a_lease_that_vanishes_costs_its_attempt_and_cancel_takes_leases_back() {
        let mut b = ib(&["darwin/arm64"]);
        let runners = [runner(
            "mac-1",
            RunnerOs::Darwin,
            "arm64",
            RunnerPhase::Online,
        )];
        let mut leases = Vec::new();
        let p = run_with_leases(&b, &[], &leases, &runners, at(0));
        apply_leases(&mut b, &mut leases, &p);
        b.spec.cancel = true;
        let p = run_with_leases(&b, &[], &leases, &runners, at(1));
        assert_eq!(p.delete_leases, ["app-1-darwin-arm64-1"]);
        assert_eq!(p.status.phase, Some(Phase::Cancelled));
        b.spec.cancel = false;
        let p = run_with_leases(&b, &[], &[], &runners, at(2));
        let ps = &p.status.platforms[0];
        assert_eq!(ps.phase, Phase::Failed);
        assert!(
            ps.message
                .as_deref()
                .unwrap()
                .contains("ended without a report")
        );
    }

    #[test]
    fn bound_pod_moves_platform_to_building_without_new_pods() {
        let mut b = ib(&["linux/arm64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("node-a"), "Running");
        let p = run(&b, &pods, &[], at(5));
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert_eq!(p.status.phase, Some(Phase::Building));
        let exec = p.status.platforms[0].executor.clone().unwrap();
        assert_eq!(exec.node.as_deref(), Some("node-a"));
        assert_eq!(exec.kind, "Pod");
        assert!(p.events.is_empty(), "{:?}", p.events);
        // The start time stays that of the build.
        assert_eq!(p.status.start_time, Some(Time(at(0))));
    }

    #[test]
    fn failed_attempt_is_retried_then_fails_and_stalls() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        b.spec.retries = Some(1);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("n"), "Failed");
        pods[0].status.as_mut().unwrap().container_statuses = Some(vec![CachedContainerStatus {
            name: "agent".into(),
            state: Some(CachedContainerState {
                terminated: Some(CachedTermination {
                    exit_code: 2,
                    message: Some("step 2 failed\nRUN make: exit 2".into()),
                    ..Default::default()
                }),
            }),
        }]);
        let p = run(&b, &pods, &[], at(10));
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].name_any(), "app-1-linux-amd64-2");
        assert_eq!(p.status.platforms[0].attempts, 2);
        assert!(
            p.events
                .iter()
                .any(|e| e.reason == "Retrying" && e.message.contains("RUN make"))
        );
        apply(&mut b, &mut pods, &p);
        let second = pods
            .iter_mut()
            .find(|p| p.name_any() == "app-1-linux-amd64-2")
            .unwrap();
        set_pod(second, Some("n"), "Failed");
        let p = run(&b, &pods, &[], at(20));
        assert!(p.create.is_empty());
        assert_eq!(p.status.platforms[0].phase, Phase::Failed);
        assert!(
            p.status.platforms[0]
                .message
                .as_deref()
                .unwrap()
                .contains("attempt 2 of 2")
        );
        // The other platform goes on (spec.failFast is false): the build
        // fails once it has finished.
        assert!(p.delete.is_empty());
        assert_eq!(p.status.phase, Some(Phase::Scheduling));
        assert_eq!(p.finished.len(), 1);
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-arm64-1", "sha256:arm");
        let p = run(&b, &pods, &[], at(30));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(p.status.platforms[1].digest.as_deref(), Some("sha256:arm"));
        assert!(p.status.image.is_none());
        assert!(!p.wants_index);
        assert_eq!(cond(&p.status, STALLED).status, "True");
        assert_eq!(cond(&p.status, STALLED).reason, "BuildFailed");
        assert_eq!(cond(&p.status, READY).status, "False");
        assert!(
            cond(&p.status, READY)
                .message
                .contains("linux/amd64: Failed"),
            "{}",
            cond(&p.status, READY).message
        );
        assert!(p.status.completion_time.is_some());
        assert_eq!(p.finished.len(), 1);
        assert_eq!(p.finished[0].result, "succeeded");
        assert_eq!(p.events.last().unwrap().kind, EventKind::Warning);
    }

    /// A build Pod reports a verified push of `digest`.
    fn push(pods: &mut [CachedPod], name: &str, digest: &str) {
        let pod = pods.iter_mut().find(|p| p.name_any() == name).unwrap();
        set_pod(pod, Some("n"), "Succeeded");
        pod.metadata.annotations = Some(
            [(
                ANNOTATION_RESULT.to_string(),
                format!(r#"{{"digest":"{digest}","size":10}}"#),
            )]
            .into(),
        );
    }

    fn run_with_index(
        ib: &ImageBuild,
        pods: &[CachedPod],
        index: &IndexOutcome,
        now: Timestamp,
    ) -> Plan {
        let obs = Observed {
            index: Some(index),
            ..observed(ib, pods, now)
        };
        plan(obs, &settings())
    }

    #[test]
    fn fail_fast_stops_the_other_platforms() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        b.spec.fail_fast = true;
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[1], Some("n"), "Running");
        set_pod(&mut pods[0], Some("n"), "Failed");
        let p = run(&b, &pods, &[], at(10));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(p.status.platforms[1].phase, Phase::Cancelled);
        assert!(
            p.status.platforms[1]
                .message
                .as_deref()
                .unwrap()
                .contains("spec.failFast")
        );
        assert_eq!(p.delete, ["app-1-linux-arm64-1"]);
        assert_eq!(p.finished.len(), 2);
    }

    #[test]
    fn several_platforms_succeed_once_their_index_is_pushed() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-amd64-1", "sha256:amd");
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.status.phase, Some(Phase::Scheduling));
        assert!(!p.wants_index);
        apply(&mut b, &mut pods, &p);
        assert_eq!(index_children(b.status.as_ref().unwrap()), None);
        push(&mut pods, "app-1-linux-arm64-1", "sha256:arm");
        // Both pushed: the index is asked for, the build not done yet.
        let p = run(&b, &pods, &[], at(10));
        assert_eq!(p.status.phase, Some(Phase::Building));
        assert!(p.wants_index);
        assert!(p.status.image.is_none());
        assert!(cond(&p.status, READY).message.contains("image index"));
        apply(&mut b, &mut pods, &p);
        let children = index_children(b.status.as_ref().unwrap()).unwrap();
        assert_eq!(children, ["sha256:amd", "sha256:arm"]);
        // A registry outage: retried, still Building.
        let retry = IndexOutcome::Retry("connection refused".into());
        let p = run_with_index(&b, &pods, &retry, at(11));
        assert_eq!(p.status.phase, Some(Phase::Building));
        assert_eq!(p.index_retry.as_deref(), Some("connection refused"));
        // An index for other digests (a stale status) is not taken.
        let stale = IndexOutcome::Pushed {
            digest: "sha256:old".into(),
            children: vec!["sha256:x".into(), "sha256:arm".into()],
        };
        let p = run_with_index(&b, &pods, &stale, at(12));
        assert_eq!(p.status.phase, Some(Phase::Building));
        let pushed = IndexOutcome::Pushed {
            digest: "sha256:idx".into(),
            children,
        };
        let p = run_with_index(&b, &pods, &pushed, at(12));
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        let image = p.status.image.clone().unwrap();
        assert_eq!(image.digest, "sha256:idx");
        assert_eq!(image.pinned, "registry.local/team/app@sha256:idx");
        assert!(p.events.iter().any(|e| e.reason == "Succeeded"));
        // A platform image that cannot go into an index fails the build.
        let invalid = IndexOutcome::Invalid("two entries for windows/amd64".into());
        let p = run_with_index(&b, &pods, &invalid, at(12));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(cond(&p.status, READY).reason, "IndexInvalid");
    }

    #[test]
    fn retry_failed_waits_for_the_build_to_finish_and_can_push_the_index_again() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        // Asked while running: not answered yet.
        b.metadata.annotations =
            Some([(ANNOTATION_RETRY_FAILED.to_string(), "1".to_string())].into());
        let p = run(&b, &pods, &[], at(1));
        assert_eq!(p.status.retry_failed, None);
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-amd64-1", "sha256:amd");
        push(&mut pods, "app-1-linux-arm64-1", "sha256:arm");
        let p = run(&b, &pods, &[], at(5));
        apply(&mut b, &mut pods, &p);
        // The index cannot be made: Failed, every platform with its digest.
        let invalid = IndexOutcome::Invalid("registry refused access".into());
        let p = run_with_index(&b, &pods, &invalid, at(6));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(p.status.retry_failed, None, "not answered while it ran");
        apply(&mut b, &mut pods, &p);
        // Now finished: the pending request is answered by pushing the
        // index again, nothing rebuilt.
        let p = run(&b, &pods, &[], at(7));
        assert_eq!(p.status.retry_failed.as_deref(), Some("1"));
        assert!(p.create.is_empty());
        assert_eq!(p.status.phase, Some(Phase::Building));
        assert!(p.wants_index);
        assert!(p.events.iter().any(|e| e.reason == "RetryingFailed"));
    }

    #[test]
    fn index_always_makes_an_index_of_one_platform() {
        let mut b = ib(&["linux/amd64"]);
        b.spec.output.index = Some(crate::api::IndexPolicy::Always);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-amd64-1", "sha256:amd");
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.status.phase, Some(Phase::Building));
        assert!(p.wants_index);
    }

    #[test]
    fn retry_failed_rebuilds_only_the_failed_platforms() {
        let mut b = ib(&["linux/amd64", "linux/arm64"]);
        b.spec.retries = Some(1);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-amd64-1", "sha256:amd");
        set_pod(&mut pods[1], Some("n"), "Failed");
        let p = run(&b, &pods, &[], at(10));
        apply(&mut b, &mut pods, &p);
        set_pod(
            pods.iter_mut()
                .find(|p| p.name_any() == "app-1-linux-arm64-2")
                .unwrap(),
            Some("n"),
            "Failed",
        );
        let p = run(&b, &pods, &[], at(20));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        apply(&mut b, &mut pods, &p);
        // Nothing happens until the annotation changes.
        let p = run(&b, &pods, &[], at(30));
        assert!(p.create.is_empty());
        b.metadata.annotations =
            Some([(ANNOTATION_RETRY_FAILED.to_string(), "1".to_string())].into());
        let p = run(&b, &pods, &[], at(40));
        assert_eq!(p.status.build_id, Some(b.build_id()), "same build");
        assert_eq!(p.status.retry_failed.as_deref(), Some("1"));
        let names: Vec<String> = p.create.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["app-1-linux-arm64-3"]);
        assert_eq!(p.status.platforms[0].phase, Phase::Succeeded);
        assert_eq!(p.status.platforms[0].digest.as_deref(), Some("sha256:amd"));
        assert_eq!(p.status.platforms[1].attempts, 3);
        assert_eq!(p.status.platforms[1].attempt_limit, 4);
        assert_eq!(p.status.phase, Some(Phase::Scheduling));
        assert_eq!(p.status.start_time, Some(Time(at(40))));
        assert!(p.status.completion_time.is_none());
        assert!(p.events.iter().any(|e| e.reason == "RetryingFailed"));
        apply(&mut b, &mut pods, &p);
        // Answered once: the next reconcile does not retry again.
        let p = run(&b, &pods, &[], at(41));
        assert!(p.create.is_empty());
        // The new round has its own retries: attempt 3 fails, 4 runs.
        set_pod(
            pods.iter_mut()
                .find(|p| p.name_any() == "app-1-linux-arm64-3")
                .unwrap(),
            Some("n"),
            "Failed",
        );
        let p = run(&b, &pods, &[], at(50));
        let names: Vec<String> = p.create.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["app-1-linux-arm64-4"]);
        apply(&mut b, &mut pods, &p);
        push(&mut pods, "app-1-linux-arm64-4", "sha256:arm");
        let p = run(&b, &pods, &[], at(60));
        assert!(p.wants_index);
        apply(&mut b, &mut pods, &p);
        assert_eq!(
            index_children(b.status.as_ref().unwrap()).unwrap(),
            ["sha256:amd", "sha256:arm"]
        );
    }

    #[test]
    fn new_generation_replaces_pods() {
        let mut b = ib(&["linux/amd64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        b.metadata.generation = Some(2);
        b.spec.target = Some("release".into());
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.delete, ["app-1-linux-amd64-1"]);
        assert_eq!(p.create[0].name_any(), "app-2-linux-amd64-1");
        assert_eq!(p.status.observed_generation, Some(2));
        assert_ne!(p.status.build_id, b.status.as_ref().unwrap().build_id);
        assert_eq!(p.status.start_time, Some(Time(at(5))));
        assert_eq!(cond(&p.status, READY).observed_generation, Some(2));
    }

    #[test]
    fn rebuild_annotation_starts_a_new_build_of_the_same_generation() {
        let mut b = ib(&["linux/amd64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        b.metadata.annotations = Some([(ANNOTATION_REBUILD.to_string(), "1".to_string())].into());
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.delete, ["app-1-linux-amd64-1"]);
        assert_eq!(p.create.len(), 1);
        assert_ne!(p.create[0].name_any(), "app-1-linux-amd64-1");
        assert_eq!(p.status.rebuild.as_deref(), Some("1"));
    }

    #[test]
    fn cancel_stops_pods_and_reports_cancelled() {
        let mut b = ib(&["linux/amd64", "darwin/arm64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        b.spec.cancel = true;
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.status.phase, Some(Phase::Cancelled));
        assert_eq!(p.delete, ["app-1-linux-amd64-1"]);
        assert!(
            p.status
                .platforms
                .iter()
                .all(|s| s.phase == Phase::Cancelled)
        );
        assert_eq!(cond(&p.status, READY).reason, "Cancelled");
        assert_eq!(cond(&p.status, STALLED).status, "False");
        assert_eq!(cond(&p.status, RECONCILING).status, "False");
        assert!(p.events.iter().any(|e| e.reason == "Cancelled"));
        // Nothing more happens afterwards.
        apply(&mut b, &mut pods, &p);
        let again = run(&b, &pods, &[], at(10));
        assert!(again.create.is_empty() && again.delete.is_empty() && again.events.is_empty());
    }

    #[test]
    fn a_secret_that_may_not_be_used_stalls_the_build_naming_the_field() {
        let b = ib(&["linux/amd64"]);
        let problem = InvalidSpec {
            field: "spec.output.pushSecretRef".into(),
            message: "Secret ns/push does not allow builds to use it".into(),
        };
        let obs = Observed {
            secret_problem: Some(&problem),
            ..observed(&b, &[], at(0))
        };
        let p = plan(obs, &settings());
        assert!(p.create.is_empty());
        assert_eq!(p.status.phase, Some(Phase::Failed));
        let stalled = cond(&p.status, STALLED);
        assert_eq!(stalled.status, "True");
        assert!(
            stalled.message.starts_with("spec.output.pushSecretRef: "),
            "{}",
            stalled.message
        );
        assert_eq!(p.invalid, Some(problem));
        // The next reconcile of the finished build (which does not check
        // the Secrets again) keeps the message.
        let mut b2 = b.clone();
        let mut pods = Vec::new();
        apply(&mut b2, &mut pods, &p);
        let p2 = run(&b2, &pods, &[], at(5));
        let stalled = cond(&p2.status, STALLED);
        assert_eq!(stalled.status, "True");
        assert!(
            stalled.message.starts_with("spec.output.pushSecretRef: "),
            "{}",
            stalled.message
        );
        assert_eq!(p2.status.phase, Some(Phase::Failed));
    }

    #[test]
    fn a_running_pod_that_disappears_costs_its_attempt() {
        let mut b = ib(&["linux/amd64"]);
        b.spec.retries = Some(1);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("n1"), "Running");
        let p = run(&b, &pods, &[], at(1));
        assert_eq!(p.status.platforms[0].phase, Phase::Building);
        apply(&mut b, &mut pods, &p);
        // Deleted (or gone with its node): attempt 2, a new Pod.
        pods.clear();
        let p = run(&b, &pods, &[], at(2));
        assert_eq!(p.status.platforms[0].attempts, 2);
        assert_eq!(p.create.len(), 1);
        assert!(
            p.create[0].name_any().ends_with("-2"),
            "{}",
            p.create[0].name_any()
        );
        assert!(p.events.iter().any(|e| e.message.contains("disappeared")));
        // A Pod that was never seen running is simply created (again).
        let mut fresh = ib(&["linux/amd64"]);
        let mut none = Vec::new();
        let p = run(&fresh, &none, &[], at(0));
        apply(&mut fresh, &mut none, &p);
        none.clear();
        let p = run(&fresh, &none, &[], at(1));
        assert_eq!(p.status.platforms[0].attempts, 1);
        assert_eq!(p.create.len(), 1);
    }

    #[test]
    fn build_pods_carry_the_remaining_timeout_as_active_deadline() {
        let mut b = ib(&["linux/amd64"]);
        b.spec.timeout = Some("10m".into());
        b.spec.retries = Some(1);
        let p = run(&b, &[], &[], at(0));
        let deadline = p.create[0].spec.as_ref().unwrap().active_deadline_seconds;
        assert_eq!(deadline, Some(600 + POD_DEADLINE_GRACE.as_secs() as i64));
        // A retry 4 minutes into the build gets what is left.
        let mut b2 = b.clone();
        let mut pods = Vec::new();
        apply(&mut b2, &mut pods, &p);
        set_pod(&mut pods[0], Some("n1"), "Failed");
        let p2 = run(&b2, &pods, &[], at(240));
        let deadline = p2.create[0].spec.as_ref().unwrap().active_deadline_seconds;
        assert_eq!(deadline, Some(360 + POD_DEADLINE_GRACE.as_secs() as i64));
    }

    #[test]
    fn timeout_fails_the_build() {
        let mut b = ib(&["linux/amd64"]);
        b.spec.timeout = Some("10m".into());
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        assert_eq!(p.requeue_after, Some(Duration::from_secs(600)));
        apply(&mut b, &mut pods, &p);
        let p = run(&b, &pods, &[], at(601));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(cond(&p.status, STALLED).reason, "Timeout");
        assert!(
            p.status.platforms[0]
                .message
                .as_deref()
                .unwrap()
                .contains("spec.timeout (10m)")
        );
        assert_eq!(p.delete, ["app-1-linux-amd64-1"]);
    }

    #[test]
    fn invalid_spec_stalls_with_the_field_named() {
        let mut b = ib(&["linux/amd64", "linux/x86_64"]);
        let p = run(&b, &[], &[], at(0));
        assert!(p.create.is_empty());
        let invalid = p.invalid.clone().unwrap();
        assert_eq!(invalid.field, "spec.platforms[1]");
        assert_eq!(cond(&p.status, STALLED).status, "True");
        assert_eq!(cond(&p.status, STALLED).reason, "InvalidSpec");
        assert!(
            cond(&p.status, STALLED)
                .message
                .contains("spec.platforms[1]")
        );
        assert_eq!(p.events.len(), 1);
        // A second look changes nothing and emits no event.
        b.status = Some(p.status.clone());
        let again = run(&b, &[], &[], at(5));
        assert!(again.events.is_empty());
        assert_eq!(
            cond(&again.status, STALLED).last_transition_time,
            cond(&p.status, STALLED).last_transition_time
        );
    }

    #[test]
    fn success_with_digest_pins_the_image_and_ttl_cleans_up() {
        let mut b = ib(&["linux/amd64"]);
        b.spec.ttl_seconds_after_finished = Some(60);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("n"), "Succeeded");
        pods[0].metadata.annotations = Some(
            [(
                ANNOTATION_RESULT.to_string(),
                r#"{"digest":"sha256:abc","size":10}"#.to_string(),
            )]
            .into(),
        );
        let p = run(&b, &pods, &[], at(30));
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        let image = p.status.image.clone().unwrap();
        assert_eq!(image.pinned, "registry.local/team/app@sha256:abc");
        assert_eq!(cond(&p.status, READY).status, "True");
        assert_eq!(p.requeue_after, Some(Duration::from_secs(60)));
        assert!(p.delete.is_empty());
        apply(&mut b, &mut pods, &p);
        let p = run(&b, &pods, &[], at(95));
        assert_eq!(p.delete, ["app-1-linux-amd64-1"]);
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
    }

    #[test]
    fn reported_failure_and_step_reach_the_status() {
        let mut b = ib(&["linux/amd64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("n"), "Running");
        pods[0].metadata.annotations = Some(
            [(
                ANNOTATION_STEP.to_string(),
                "STEP 2/3: RUN make".to_string(),
            )]
            .into(),
        );
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(
            p.status.platforms[0].step.as_deref(),
            Some("STEP 2/3: RUN make")
        );
        assert_eq!(p.status.phase, Some(Phase::Building));
        apply(&mut b, &mut pods, &p);
        pods[0].metadata.annotations.as_mut().unwrap().insert(
            ANNOTATION_FAILURE.to_string(),
            r#"{"reason":"StepFailed","message":"STEP 2/3: RUN make: exit status 2"}"#.to_string(),
        );
        let p = run(&b, &pods, &[], at(6));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        let msg = p.status.platforms[0].message.clone().unwrap();
        assert!(msg.contains("StepFailed: STEP 2/3: RUN make"), "{msg}");
    }

    #[test]
    fn succeeded_pod_without_digest_is_a_failed_attempt() {
        let mut b = ib(&["linux/amd64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        set_pod(&mut pods[0], Some("n"), "Succeeded");
        let p = run(&b, &pods, &[], at(5));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert!(
            p.status.platforms[0]
                .message
                .as_deref()
                .unwrap()
                .contains("without reporting")
        );
    }

    #[test]
    fn unschedulable_reason_reaches_the_platform_message() {
        let mut b = ib(&["linux/arm64"]);
        b.spec.executor = Some(ExecutorSpec::default());
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        pods[0].status = Some(CachedPodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![CachedPodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                message: Some("0/3 nodes are available".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let p = run(&b, &pods, &[], at(5));
        let msg = p.status.platforms[0].message.clone().unwrap();
        assert!(msg.contains("0/3 nodes are available"), "{msg}");
    }

    #[test]
    fn transition_times_are_kept_while_status_is_unchanged() {
        let mut b = ib(&["linux/amd64"]);
        let mut pods = Vec::new();
        let p = run(&b, &pods, &[], at(0));
        apply(&mut b, &mut pods, &p);
        let p2 = run(&b, &pods, &[], at(50));
        assert_eq!(
            cond(&p2.status, RECONCILING).last_transition_time,
            Time(at(0))
        );
        assert!(p2.events.is_empty());
    }
}
