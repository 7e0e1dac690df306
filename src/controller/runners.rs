//! BuildRunner upkeep, on the leader: each BuildRunner's token Secret
//! (`tripod-runner-<name>` in the controller's namespace, owned by the
//! BuildRunner, re-issued when the runner's `build.tripod.dev/rotate-token`
//! annotation changes) and its status (phase, last heartbeat at a bounded
//! rate, active builds, agent version, a Ready condition).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};

use super::FIELD_MANAGER;
use super::pod::{fit, name_label};
use crate::api::{ActiveBuild, BuildRunner, BuildRunnerStatus, RunnerPhase};
use crate::executor::leases::rotation;
use crate::executor::runners::{LABEL_RUNNER, Liveness, OFFLINE_AFTER, RunnerHub};
use crate::executor::token::{CA_KEY, RunnerSubject, TOKEN_KEY, TokenKey};

/// How often the upkeep looks at every runner.
const TICK: Duration = Duration::from_secs(1);
/// `lastHeartbeatTime` is rewritten when it is this far behind (and with any
/// other change): a runner's status is not written per heartbeat.
pub const HEARTBEAT_WRITE_EVERY: Duration = Duration::from_secs(30);
/// Annotation on a runner token Secret: the rotation it was issued for.
const ANNOTATION_SECRET_ROTATION: &str = "build.tripod.dev/rotation";
/// Key in the runner token Secret: the runner's name.
const RUNNER_KEY: &str = "runner";

/// Errors of the runner upkeep (logged; the next tick tries again).
#[derive(Debug, thiserror::Error)]
pub enum RunnersError {
    /// A Kubernetes request failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A token could not be issued.
    #[error(transparent)]
    Token(#[from] crate::executor::token::TokenError),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> RunnersError {
    let what = what.into();
    move |source| RunnersError::Kube { what, source }
}

/// Name of the token Secret of runner `name`.
pub fn secret_name(name: &str) -> String {
    fit(&format!("tripod-runner-{name}"), "", 253)
}

/// What the upkeep needs.
pub struct Upkeep {
    /// Kubernetes client.
    pub client: Client,
    /// The controller's namespace (token Secrets).
    pub namespace: String,
    /// The token key.
    pub key: TokenKey,
    /// The executor CA, handed to runners with their token.
    pub ca_pem: String,
    /// BuildRunners.
    pub runners: Store<BuildRunner>,
    /// The hub.
    pub hub: Arc<RunnerHub>,
}

impl Upkeep {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        // Token Secrets known good: runner name -> (uid, rotation).
        let mut secrets: HashMap<String, (String, String)> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let runners = self.runners.state();
            for runner in &runners {
                let name = runner.name_any();
                let uid = runner.uid().unwrap_or_default();
                let rot = rotation(runner);
                self.hub.close_if_stale(&name, &uid, &rot);
                if secrets.get(&name) != Some(&(uid.clone(), rot.clone())) {
                    match self.ensure_secret(runner, &rot).await {
                        Ok(()) => {
                            secrets.insert(name.clone(), (uid, rot));
                        }
                        Err(e) => tracing::warn!(runner = %name, error = %e, "runner token Secret"),
                    }
                }
                if let Err(e) = self.write_status(runner).await {
                    tracing::warn!(runner = %name, error = %e, "runner status");
                }
            }
            self.hub.wake_if_room();
            let names: Vec<String> = runners.iter().map(|r| r.name_any()).collect();
            secrets.retain(|n, _| names.contains(n));
            for connected in self.hub.connected() {
                if !names.contains(&connected) {
                    tracing::info!(runner = %connected, "BuildRunner deleted: closing its session");
                    self.hub.close(&connected);
                }
            }
        }
    }

    /// Makes sure runner's token Secret holds a token for its current UID
    /// and rotation (a new one otherwise: the old token stops working).
    async fn ensure_secret(&self, runner: &BuildRunner, rot: &str) -> Result<(), RunnersError> {
        let name = runner.name_any();
        let uid = runner.uid().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret_name = secret_name(&name);
        let what = format!("runner token Secret {}/{secret_name}", self.namespace);
        let subject = RunnerSubject {
            runner: &name,
            uid: &uid,
            rotation: rot,
        };
        if let Some(existing) = api
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(format!("get {what}")))?
        {
            let data = existing.data.clone().unwrap_or_default();
            let token = data
                .get(TOKEN_KEY)
                .map(|t| String::from_utf8_lossy(&t.0).to_string());
            let owned = existing.owner_references().iter().any(|o| o.uid == uid);
            let ca_ok = data
                .get(CA_KEY)
                .is_some_and(|c| c.0 == self.ca_pem.as_bytes());
            if owned && ca_ok && token.is_some_and(|t| self.key.verify_runner(&subject, &t)) {
                return Ok(());
            }
            api.delete(&secret_name, &DeleteParams::default())
                .await
                .map_err(kube_err(format!("delete {what}")))?;
            tracing::info!(runner = %name, "runner token re-issued (rotation, new key or a recreated BuildRunner)");
        }
        let token = self.key.issue_runner(&subject)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "tripod".to_string(),
                    ),
                    (LABEL_RUNNER.to_string(), name_label(&name)),
                ])),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_SECRET_ROTATION.to_string(),
                    rot.to_string(),
                )])),
                owner_references: Some(vec![OwnerReference {
                    api_version: BuildRunner::api_version(&()).to_string(),
                    kind: BuildRunner::kind(&()).to_string(),
                    name: name.clone(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (TOKEN_KEY.to_string(), ByteString(token.into_bytes())),
                (
                    CA_KEY.to_string(),
                    ByteString(self.ca_pem.clone().into_bytes()),
                ),
                (
                    RUNNER_KEY.to_string(),
                    ByteString(name.clone().into_bytes()),
                ),
            ])),
            ..Default::default()
        };
        crate::executor::create_or_get(&api, &secret)
            .await
            .map_err(kube_err(format!("create {what}")))?;
        Ok(())
    }

    /// Writes the runner's status when it changed (the heartbeat time only
    /// every [`HEARTBEAT_WRITE_EVERY`]).
    async fn write_status(&self, runner: &BuildRunner) -> Result<(), RunnersError> {
        let name = runner.name_any();
        let old = runner.status.clone().unwrap_or_default();
        let live = self.hub.liveness(&name);
        let connection = self.hub.connection(&name);
        let phase = match live {
            Liveness::Online => Some(RunnerPhase::Online),
            Liveness::Draining => Some(RunnerPhase::Draining),
            Liveness::Offline => Some(RunnerPhase::Offline),
            Liveness::Unknown => old.phase,
        };
        let mut active: Vec<ActiveBuild> = self
            .hub
            .active_leases(&name)
            .iter()
            .map(|l| ActiveBuild {
                namespace: l.namespace().unwrap_or_default(),
                name: l
                    .owner_references()
                    .iter()
                    .find(|o| o.kind == "ImageBuild")
                    .map(|o| o.name.clone())
                    .unwrap_or_default(),
                platform: l
                    .annotations()
                    .get(crate::api::ANNOTATION_PLATFORM)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        active.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.platform).cmp(&(&b.namespace, &b.name, &b.platform))
        });
        let heard = self.hub.last_heard(&name);
        let last_heartbeat = match (heard, &old.last_heartbeat_time) {
            (Some(h), Some(Time(w)))
                if h.duration_since(*w).unsigned_abs() < HEARTBEAT_WRITE_EVERY && h >= *w =>
            {
                Some(Time(*w))
            }
            (Some(h), _) => Some(Time(h)),
            (None, w) => w.clone(),
        };
        let capacity = connection.as_ref().map(|c| c.capacity);
        let (ready, reason, message) = match phase {
            Some(RunnerPhase::Online) => (
                true,
                "Online",
                format!(
                    "connected; {} of {} build(s) running",
                    active.len(),
                    capacity.unwrap_or(runner.spec.capacity.unsigned_abs())
                ),
            ),
            Some(RunnerPhase::Draining) => (
                false,
                "Draining",
                format!("draining: {} build(s) left, no new ones", active.len()),
            ),
            Some(RunnerPhase::Offline) if heard.is_none() && old.last_heartbeat_time.is_none() => (
                false,
                "NeverConnected",
                format!(
                    "no agent has connected: start `tripod agent --runner {name}` with the token in Secret {}/{}",
                    self.namespace,
                    secret_name(&name)
                ),
            ),
            Some(RunnerPhase::Offline) => (
                false,
                "Offline",
                format!(
                    "no heartbeat for more than {}s; its leases expire and their builds are retried elsewhere",
                    OFFLINE_AFTER.as_secs()
                ),
            ),
            None => return Ok(()),
        };
        let generation = runner.metadata.generation;
        let status_str = if ready { "True" } else { "False" };
        let transition = old
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == status_str)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(jiff::Timestamp::now()));
        let new = BuildRunnerStatus {
            phase,
            last_heartbeat_time: last_heartbeat,
            active_builds: active,
            agent_version: connection
                .map(|c| c.agent_version)
                .or(old.agent_version.clone()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status_str.into(),
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: transition,
            }],
        };
        if new == old {
            return Ok(());
        }
        if new.phase != old.phase {
            tracing::info!(runner = %name, phase = ?new.phase, was = ?old.phase, "runner phase");
        }
        let api: Api<BuildRunner> = Api::all(self.client.clone());
        let patch = serde_json::json!({
            "apiVersion": BuildRunner::api_version(&()),
            "kind": BuildRunner::kind(&()),
            "status": new,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_err(format!("update status of BuildRunner {name}")))?;
        Ok(())
    }
}
