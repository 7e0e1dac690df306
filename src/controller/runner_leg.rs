//! The plan's runner leg: platforms built on BuildRunners (darwin always,
//! linux ones listed in `spec.executor.runnerPlatforms`). Pure, like the
//! rest of the plan: it asks for leases ([`LeaseRequest`]) and expiries,
//! the reconciler hands them out through the runner hub.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use super::plan::{Plan, retry_after_failure, take_report};
use super::pod::{PodKey, pod_name};
use crate::api::{BuildRunner, ExecutorRef, ImageBuild, Phase, PlatformStatus, RunnerPhase};
use crate::executor::leases::is_emulated;
use crate::executor::runners::{ANNOTATION_EMULATED, Candidate, OFFLINE_AFTER, lease_holder};
use crate::outcome::ExecutorReport;
use crate::platform::Platform;

/// A platform attempt that needs a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Canonical platform.
    pub platform: String,
    /// Name of the Lease object to make.
    pub name: String,
    /// The attempt (fencing token).
    pub attempt: u32,
    /// Online runners that match, by name.
    pub candidates: Vec<Candidate>,
}

/// A Lease object to delete because its runner is gone: only if it is
/// still at `resource_version` (no outcome recorded meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Name of the Lease object.
    pub name: String,
    /// Its resourceVersion when the plan saw it.
    pub resource_version: Option<String>,
}

/// What the runner leg looks at for one platform.
pub struct RunnerLeg<'a> {
    /// The ImageBuild.
    pub build: &'a ImageBuild,
    /// The build ID.
    pub id: &'a str,
    /// Its generation.
    pub generation: i64,
    /// The rebuild annotation's value.
    pub rebuild: Option<&'a str>,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The platform.
    pub platform: &'a Platform,
    /// The ImageBuild's Lease objects (of any build).
    pub leases: &'a [Lease],
    /// All BuildRunners.
    pub runners: &'a [BuildRunner],
    /// Now.
    pub now: Timestamp,
}

/// Whether `runner` may build `platform` for `build`: its labels carry the
/// runner selector, and it builds the platform natively (`Some(false)`) or
/// through emulation (`Some(true)`).
pub fn runner_builds(
    runner: &BuildRunner,
    build: &ImageBuild,
    platform: &Platform,
) -> Option<bool> {
    let selector = build.spec.executor.as_ref().map(|e| &e.runner_selector);
    let labelled = selector
        .into_iter()
        .flatten()
        .all(|(k, v)| runner.spec.labels.get(k) == Some(v));
    if !labelled {
        return None;
    }
    if runner.spec.os.as_str() == platform.os().as_str() && runner.spec.arch == platform.arch() {
        // A Windows host builds (and RUNs) images of its own OS build only:
        // a platform that names a build wants a runner labelled with it.
        if let Some(build) = platform.os_version()
            && runner
                .spec
                .labels
                .get(super::pod::WINDOWS_BUILD_LABEL)
                .map(String::as_str)
                != Some(build)
        {
            return None;
        }
        return Some(false);
    }
    if platform.os() == crate::platform::Os::Windows
        && runner.spec.os.as_str() == "linux"
        && runner
            .spec
            .windows_archs
            .iter()
            .any(|a| a == platform.arch())
    {
        return Some(false);
    }
    is_emulated(runner, platform).then_some(true)
}

fn phase_of(r: &BuildRunner) -> Option<RunnerPhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

fn wanted(build: &ImageBuild, platform: &Platform) -> String {
    let mut wanted = format!("os={}, arch={}", platform.os(), platform.arch());
    if let Some(build) = platform.os_version() {
        wanted.push_str(&format!(
            " (a Linux runner with BuildKit, or a Windows one labelled {}={build})",
            super::pod::WINDOWS_BUILD_LABEL
        ));
    }
    for (k, v) in build
        .spec
        .executor
        .as_ref()
        .map(|e| e.runner_selector.clone())
        .unwrap_or_default()
    {
        wanted.push_str(&format!(", {k}={v}"));
    }
    wanted
}

impl RunnerLeg<'_> {
    /// Drives one platform on the runner leg.
    pub fn drive(&self, ps: &mut PlatformStatus, out: &mut Plan) {
        if ps.attempts <= 0 {
            ps.attempts = 1;
            ps.attempt_start_time = Some(jiff_time(self.now));
        }
        loop {
            let attempt = ps.attempts.unsigned_abs();
            let key = PodKey {
                platform: self.platform,
                build_id: self.id,
                attempt,
                windows_build: None,
            };
            let name = pod_name(&self.build.name_any(), self.generation, self.rebuild, &key);
            let leased_to = ps
                .executor
                .as_ref()
                .filter(|e| e.kind == "Runner" && ps.phase == Phase::Building)
                .map(|e| e.name.clone());
            let Some(lease) = self.leases.iter().find(|l| l.name_any() == name) else {
                if let Some(runner) = leased_to {
                    let failure = format!(
                        "the lease of runner {runner} on attempt {attempt} ended without a report (its Lease object {name} was deleted)"
                    );
                    if self.retry(ps, out, &failure) {
                        continue;
                    }
                    return;
                }
                self.request(&name, attempt, ps, out);
                return;
            };
            let holder = lease_holder(lease).unwrap_or_default().to_string();
            let emulated = lease
                .annotations()
                .get(ANNOTATION_EMULATED)
                .is_some_and(|v| v == "true");
            ps.executor = Some(ExecutorRef {
                kind: "Runner".into(),
                name: holder.clone(),
                node: None,
                emulated,
            });
            let reported = ExecutorReport::from_meta(&lease.metadata);
            if take_report(ps, &reported) {
                return;
            }
            if let Some(f) = &reported.failed {
                if self.retry(ps, out, &f.to_string()) {
                    continue;
                }
                return;
            }
            if lease.metadata.deletion_timestamp.is_some() {
                ps.phase = Phase::Scheduling;
                ps.message = Some(format!("lease {name} is being taken back"));
                return;
            }
            let runner = self.runners.iter().find(|r| r.name_any() == holder);
            let gone = match runner {
                None => Some(format!(
                    "BuildRunner {holder} was deleted: its lease expired"
                )),
                Some(r) if phase_of(r) == Some(RunnerPhase::Offline) => Some(format!(
                    "runner {holder} went Offline (no heartbeat for {}s): its lease expired",
                    OFFLINE_AFTER.as_secs()
                )),
                Some(_) => None,
            };
            if let Some(failure) = gone {
                out.expire.push(Expiry {
                    name: name.clone(),
                    resource_version: lease.metadata.resource_version.clone(),
                });
                if self.retry(ps, out, &failure) {
                    continue;
                }
                return;
            }
            ps.phase = Phase::Building;
            ps.message = Some(format!(
                "building on runner {holder}{}",
                if emulated { " (emulated)" } else { "" }
            ));
            return;
        }
    }

    fn retry(&self, ps: &mut PlatformStatus, out: &mut Plan, failure: &str) -> bool {
        ps.executor = None;
        retry_after_failure(ps, out, self.platform, self.max_attempts, failure, self.now)
    }

    /// Asks for a lease of this attempt, or says which runner is missing.
    fn request(&self, name: &str, attempt: u32, ps: &mut PlatformStatus, out: &mut Plan) {
        ps.executor = None;
        ps.phase = Phase::Scheduling;
        let mut matching: Vec<(&BuildRunner, bool)> = self
            .runners
            .iter()
            .filter_map(|r| runner_builds(r, self.build, self.platform).map(|e| (r, e)))
            .collect();
        matching.sort_by_key(|(r, _)| r.name_any());
        let wanted = wanted(self.build, self.platform);
        let candidates: Vec<Candidate> = matching
            .iter()
            .filter(|(r, _)| phase_of(r) == Some(RunnerPhase::Online))
            .map(|(r, emulated)| Candidate {
                runner: r.name_any(),
                emulated: *emulated,
            })
            .collect();
        if candidates.is_empty() {
            ps.message = Some(if matching.is_empty() {
                format!("waiting for a BuildRunner with {wanted}: none is registered")
            } else {
                let states: Vec<String> = matching
                    .iter()
                    .map(|(r, _)| {
                        format!(
                            "{} {}",
                            r.name_any(),
                            phase_of(r).map(|p| p.as_str()).unwrap_or("never connected")
                        )
                    })
                    .collect();
                format!(
                    "waiting for a BuildRunner with {wanted}: {} registered, none Online ({})",
                    matching.len(),
                    states.join(", ")
                )
            });
            out.waits_for_runner = true;
            return;
        }
        ps.message = Some(format!(
            "waiting for a free runner with {wanted} ({} Online)",
            candidates.len()
        ));
        out.leases.push(LeaseRequest {
            platform: self.platform.to_string(),
            name: name.to_string(),
            attempt,
            candidates,
        });
    }
}

fn jiff_time(t: Timestamp) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t)
}
