//! The runner side of the executor service: a runner's agent authenticates
//! with its runner token, and each lease it holds is checked before anything
//! it says about it counts: the Lease object exists, this runner holds it,
//! and its attempt (the fencing token) is the platform's current one.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use super::runners::{ANNOTATION_EMULATED, LeaseKey, RunnerHub, lease_holder, lease_is_active};
use super::token::{ANNOTATION_ROTATE, RunnerSubject};
use super::{Authenticated, Claim, ExecutorError, Executors, currentness, kube_err};
use crate::api::{BuildRunner, LABEL_ATTEMPT, LABEL_BUILD_ID, is_dns1123_subdomain};
use crate::platform::{Os, Platform};

/// Who a runner's agent says it is, and what its host builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerClaim {
    /// The runner token.
    pub token: String,
    /// Name of the BuildRunner.
    pub runner: String,
    /// Agent version.
    pub agent_version: String,
    /// Builds the agent takes at once.
    pub capacity: u32,
    /// Platforms the host builds.
    pub platforms: Vec<String>,
    /// Of those, the emulated ones.
    pub emulated_platforms: Vec<String>,
    /// Leases the agent holds (each with an empty token).
    pub held: Vec<Claim>,
    /// It is draining.
    pub draining: bool,
    /// Labels the agent was started with.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// An authenticated runner.
#[derive(Debug, Clone)]
pub struct RunnerIdentity {
    /// Name of the BuildRunner.
    pub name: String,
    /// The token rotation it authenticated with.
    pub rotation: String,
    /// The BuildRunner's UID.
    pub uid: String,
    /// The capacity leased up to: the lower of the agent's and the spec's.
    pub capacity: u32,
}

/// A lease a runner is to be offered.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The lease, as the runner will name it.
    pub claim: Claim,
    /// The authenticated lease.
    pub auth: Authenticated,
    /// Built through emulation.
    pub emulated: bool,
}

/// The rotation value of a BuildRunner.
pub fn rotation(runner: &BuildRunner) -> String {
    runner
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ROTATE))
        .cloned()
        .unwrap_or_default()
}

/// The platforms a BuildRunner promises: its own os/arch natively, plus
/// linux/<arch> for each emulated arch and windows/<arch> for each Windows
/// arch it builds through BuildKit.
pub fn promised_platforms(runner: &BuildRunner) -> Vec<String> {
    let mut out = vec![format!("{}/{}", runner.spec.os.as_str(), runner.spec.arch)];
    out.extend(
        runner
            .spec
            .emulated_archs
            .iter()
            .map(|a| format!("linux/{a}")),
    );
    out.extend(
        runner
            .spec
            .windows_archs
            .iter()
            .map(|a| format!("windows/{a}")),
    );
    out
}

/// The key of the Lease object a claim names.
pub fn lease_key(claim: &Claim) -> LeaseKey {
    LeaseKey {
        namespace: claim.namespace.clone(),
        name: claim.pod.clone(),
    }
}

fn platform_of(lease: &Lease) -> Option<String> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(crate::api::ANNOTATION_PLATFORM)
        .cloned()
}

impl Executors {
    /// Whether the controller's caches have loaded (before that, what a
    /// runner holds cannot be told from what it lost).
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The runner hub, or why runner sessions are not served.
    pub fn hub(&self) -> Result<&Arc<RunnerHub>, ExecutorError> {
        self.hub.as_ref().ok_or_else(|| {
            ExecutorError::Mismatch("this executor service does not lease builds to runners".into())
        })
    }

    /// The BuildRunner `name`, from the controller's cache only: an
    /// unauthenticated client costs no API request, and a BuildRunner this
    /// controller does not manage (`--buildrunner-selector`) is unknown. A
    /// runner connecting right after its BuildRunner was created retries.
    fn build_runner(&self, name: &str) -> Result<Option<BuildRunner>, ExecutorError> {
        let store = self.runners.as_ref().ok_or_else(|| {
            ExecutorError::Mismatch("this executor service does not lease builds to runners".into())
        })?;
        Ok(store.get(&ObjectRef::new(name)).map(|r| (*r).clone()))
    }

    /// Checks a runner's hello: fields first, then the token's MAC against
    /// the BuildRunner's name, UID and rotation, then that the host builds
    /// every platform the BuildRunner promises.
    pub async fn authenticate_runner(
        &self,
        claim: &RunnerClaim,
    ) -> Result<RunnerIdentity, ExecutorError> {
        if !is_dns1123_subdomain(&claim.runner) {
            let shown: String = claim.runner.chars().take(80).collect();
            return Err(ExecutorError::InvalidClaim(format!(
                "runner_hello.runner: {shown:?} is not a BuildRunner name"
            )));
        }
        if claim.token.len() > 200 {
            return Err(ExecutorError::InvalidClaim(
                "runner_hello.token: longer than 200 bytes".into(),
            ));
        }
        for held in &claim.held {
            held.validate()?;
        }
        // Unknown runner and wrong token look the same from outside.
        let unauthenticated = || ExecutorError::Unauthenticated(format!("runner {}", claim.runner));
        let runner = self
            .build_runner(&claim.runner)?
            .ok_or_else(unauthenticated)?;
        let rotation = rotation(&runner);
        let subject = RunnerSubject {
            runner: &claim.runner,
            uid: runner.metadata.uid.as_deref().unwrap_or_default(),
            rotation: &rotation,
        };
        if !self.key.verify_runner(&subject, &claim.token) {
            return Err(unauthenticated());
        }
        let canonical = |p: &str| p.parse::<Platform>().map(|p| p.to_string()).ok();
        let host: HashSet<String> = claim
            .platforms
            .iter()
            .filter_map(|p| canonical(p))
            .collect();
        for want in promised_platforms(&runner) {
            let want = canonical(&want).unwrap_or(want);
            if !host.contains(&want) {
                let mut offered: Vec<&String> = claim.platforms.iter().collect();
                offered.sort();
                return Err(ExecutorError::Mismatch(format!(
                    "BuildRunner {} promises {want}, but this host builds only {}: run the agent on a host that builds it{}, or change the BuildRunner",
                    claim.runner,
                    if offered.is_empty() {
                        "nothing".to_string()
                    } else {
                        offered
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    if want.starts_with("linux/") {
                        " (emulated arches need qemu-user-static with binfmt_misc)"
                    } else if want.starts_with("windows/") && runner.spec.os.as_str() == "linux" {
                        " (a Linux runner builds Windows images with a BuildKit daemon: start the agent with --buildkit-addr)"
                    } else {
                        ""
                    }
                )));
            }
        }
        for (k, v) in &claim.labels {
            if runner.spec.labels.get(k) != Some(v) {
                return Err(ExecutorError::Mismatch(format!(
                    "the agent was started with --label {k}={v}, but BuildRunner {} has {}: make them agree",
                    claim.runner,
                    match runner.spec.labels.get(k) {
                        Some(other) => format!("{k}={other}"),
                        None => format!("no label {k}"),
                    }
                )));
            }
        }
        let spec_capacity = u32::try_from(runner.spec.capacity.max(1)).unwrap_or(1);
        Ok(RunnerIdentity {
            name: claim.runner.clone(),
            rotation,
            uid: runner.metadata.uid.clone().unwrap_or_default(),
            capacity: claim.capacity.max(1).min(spec_capacity),
        })
    }

    fn lease_from_store(&self, key: &LeaseKey) -> Option<Arc<Lease>> {
        self.hub.as_ref().and_then(|hub| hub.lease(key))
    }

    /// Checks a lease `runner` speaks for: the Lease object exists, is held
    /// by `runner`, names this ImageBuild, build, platform and attempt, and
    /// that attempt is the platform's current one (read from the API
    /// server when the cache does not show it yet).
    pub async fn authenticate_lease(
        &self,
        runner: &str,
        claim: &Claim,
    ) -> Result<Authenticated, ExecutorError> {
        let platform = claim.validate()?;
        let canonical = platform.to_string();
        let key = lease_key(claim);
        let lease = match self.lease_from_store(&key) {
            Some(l) => Some((*l).clone()),
            None => Api::<Lease>::namespaced(self.client.clone(), &claim.namespace)
                .get_opt(&claim.pod)
                .await
                .map_err(kube_err(format!("get Lease {key}")))?,
        };
        let lease = lease.ok_or_else(|| {
            ExecutorError::Stale(format!(
                "lease {key} no longer exists: it expired or was taken back"
            ))
        })?;
        let labels = lease.metadata.labels.clone().unwrap_or_default();
        let owned = lease
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == claim.image_build_uid && o.kind == "ImageBuild");
        let matches = lease_holder(&lease) == Some(runner)
            && owned
            && labels.get(LABEL_BUILD_ID) == Some(&claim.build_id)
            && labels.get(LABEL_ATTEMPT) == Some(&claim.attempt.to_string())
            && platform_of(&lease).as_deref() == Some(canonical.as_str());
        if !matches {
            return Err(ExecutorError::Unauthenticated(format!(
                "lease {key} is not held by runner {runner} for {}/{} {canonical} attempt {}",
                claim.namespace, claim.image_build, claim.attempt
            )));
        }
        if lease.metadata.deletion_timestamp.is_some() {
            return Err(ExecutorError::Stale(format!(
                "lease {key} is being taken back"
            )));
        }
        let build = self.current_build(claim, &canonical).await?;
        Ok(Authenticated {
            build,
            namespace: claim.namespace.clone(),
            pod: claim.pod.clone(),
            platform,
            runner: Some(runner.to_string()),
        })
    }

    /// Leases `runner` holds that it has not been offered (`known`), whose
    /// ImageBuild's status (in the cache) already records them: ready to
    /// offer. The status is written right after the Lease object; until the
    /// cache shows it, the lease waits for the next look.
    pub fn offers(&self, runner: &str, known: &HashSet<LeaseKey>) -> Vec<Offer> {
        let (Some(hub), Some(builds)) = (self.hub.as_ref(), self.builds.as_ref()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for lease in hub.active_leases(runner) {
            let Some(claim) = claim_of(&lease) else {
                continue;
            };
            if known.contains(&lease_key(&claim)) {
                continue;
            }
            let Ok(platform) = claim.validate() else {
                continue;
            };
            let canonical = platform.to_string();
            let Some(build) =
                builds.get(&ObjectRef::new(&claim.image_build).within(&claim.namespace))
            else {
                continue;
            };
            let recorded = build.status.as_ref().is_some_and(|s| {
                s.platforms.iter().any(|p| {
                    p.platform == canonical
                        && p.executor
                            .as_ref()
                            .is_some_and(|e| e.kind == "Runner" && e.name == runner)
                })
            });
            if !recorded || currentness(&build, &claim, &canonical).is_err() {
                continue;
            }
            let emulated = lease
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.get(ANNOTATION_EMULATED).is_some_and(|v| v == "true"));
            out.push(Offer {
                auth: Authenticated {
                    build: (*build).clone(),
                    namespace: claim.namespace.clone(),
                    pod: claim.pod.clone(),
                    platform,
                    runner: Some(runner.to_string()),
                },
                claim,
                emulated,
            });
        }
        out
    }

    /// Of the leases in `known`, those `runner` no longer holds (the Lease
    /// object was deleted: cancelled, expired, or the build moved on), to
    /// be taken back from it.
    pub fn withdrawn(&self, runner: &str, known: &HashSet<LeaseKey>) -> Vec<LeaseKey> {
        let Some(hub) = self.hub.as_ref() else {
            return Vec::new();
        };
        known
            .iter()
            .filter(|k| {
                hub.lease(k).is_none_or(|l| {
                    l.metadata.deletion_timestamp.is_some() || lease_holder(&l) != Some(runner)
                })
            })
            .cloned()
            .collect()
    }

    /// Whether the lease `key` still has no outcome recorded.
    pub fn lease_active(&self, key: &LeaseKey) -> bool {
        self.hub
            .as_ref()
            .and_then(|h| h.lease(key))
            .is_some_and(|l| lease_is_active(&l))
    }
}

/// The claim a Lease object stands for (its runner speaks it back).
pub fn claim_of(lease: &Lease) -> Option<Claim> {
    let labels = lease.metadata.labels.as_ref()?;
    let owner = lease
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "ImageBuild")?;
    Some(Claim {
        token: String::new(),
        namespace: lease.metadata.namespace.clone()?,
        image_build: owner.name.clone(),
        build_id: labels.get(LABEL_BUILD_ID)?.clone(),
        platform: platform_of(lease)?,
        attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()?,
        pod: lease.metadata.name.clone()?,
        image_build_uid: owner.uid.clone(),
    })
}

/// Whether `platform` is one a runner's host builds only through
/// emulation, given its BuildRunner.
pub fn is_emulated(runner: &BuildRunner, platform: &Platform) -> bool {
    platform.os() == Os::Linux
        && runner.spec.os.as_str() == "linux"
        && runner.spec.arch != platform.arch()
        && runner
            .spec
            .emulated_archs
            .iter()
            .any(|a| a == platform.arch())
}
