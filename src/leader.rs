//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Only the replica holding the Lease runs the reconciler, serves the
//! executor and writes. The holder renews it every `renew_every`; each
//! renewal has a timeout, and a holder that has not renewed within
//! `renew_deadline` (shorter than `lease_duration`) stops leading, before
//! anyone else may take over. A standby takes the Lease over once it has
//! seen the same Lease record, unchanged, for `lease_duration` by its own
//! clock (as client-go does): the holder's `renewTime` is never compared
//! with the local wall clock, so clock skew between replicas cannot make a
//! live Lease look expired. Writes use the Lease's resourceVersion, so two
//! replicas can never both win the same round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed a Lease request.
    #[error("lease {name}: {source}")]
    Api {
        /// The Lease name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A Lease request did not finish within its timeout.
    #[error("lease {name}: no answer within {seconds}s")]
    Timeout {
        /// The Lease name.
        name: String,
        /// The timeout.
        seconds: u64,
    },
    /// The durations do not fit together.
    #[error(
        "leader election: need renew interval ({renew_every:?}) < renew deadline ({renew_deadline:?}) < lease duration ({lease_duration:?})"
    )]
    Durations {
        /// Renewal interval.
        renew_every: Duration,
        /// Renew deadline.
        renew_deadline: Duration,
        /// Lease duration.
        lease_duration: Duration,
    },
}

/// Settings of leader election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its Pod name in a cluster).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How long the holder keeps leading without a successful renewal
    /// (each renewal attempt is also bounded by it).
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    /// Checks renew interval < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.renew_every < self.renew_deadline && self.renew_deadline < self.lease_duration {
            Ok(())
        } else {
            Err(LeaderError::Durations {
                renew_every: self.renew_every,
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            })
        }
    }
}

/// The Lease record as last observed by this replica, and when (by the
/// local monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    record: (String, String, Option<String>),
    at: tokio::time::Instant,
}

/// Whether a Lease held by another replica has expired: its record has not
/// changed for `duration` of local time. `record` is (holder, renew time,
/// resourceVersion) as read now; `last` the previous observation, replaced
/// when the record changed.
fn expired(
    last: &mut Option<Observation>,
    record: (String, String, Option<String>),
    now: tokio::time::Instant,
    duration: Duration,
) -> bool {
    match last {
        Some(o) if o.record == record => now.duration_since(o.at) >= duration,
        _ => {
            *last = Some(Observation { record, at: now });
            false
        }
    }
}

/// Acquires and renews a Lease.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Arc<Mutex<Option<Observation>>>,
    standing_by: Arc<AtomicBool>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// An elector for the Lease in `cfg`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Arc::new(Mutex::new(None)),
            standing_by: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True while [`Self::acquire`] waits and its last attempt reached the
    /// API server (another replica leads): a standby that could take over.
    /// False before the first answer and after a failed attempt.
    pub fn standing_by(&self) -> Arc<AtomicBool> {
        self.standing_by.clone()
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            name: format!("{}/{}", self.cfg.namespace, self.cfg.name),
            source,
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// [`Self::try_acquire_or_renew_inner`] within the renew deadline.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew_inner())
            .await
            .unwrap_or_else(|_| {
                Err(LeaderError::Timeout {
                    name: format!("{}/{}", self.cfg.namespace, self.cfg.name),
                    seconds: self.cfg.renew_deadline.as_secs(),
                })
            })
    }

    /// Takes the Lease if it is free or expired, renews it if held by us.
    /// Returns whether this replica holds it now.
    async fn try_acquire_or_renew_inner(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let resource_version = lease.metadata.resource_version.clone();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        if !ours && !holder.is_empty() {
            // The holder's own duration, as it wrote it (at least ours).
            let valid_for = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            )
            .max(self.cfg.lease_duration);
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let record = (holder.clone(), renewed, resource_version);
            let now_local = tokio::time::Instant::now();
            let mut observed = self
                .observed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !expired(&mut observed, record, now_local, valid_for) {
                return Ok(false);
            }
        }
        if !ours {
            spec.holder_identity = Some(self.cfg.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(MicroTime(now));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Waits until this replica holds the Lease; returns when the successful
    /// attempt started (what [`Self::hold`] counts its deadline from).
    pub async fn acquire(&self) -> Result<tokio::time::Instant, LeaderError> {
        let mut logged = false;
        loop {
            let started = tokio::time::Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    self.standing_by.store(false, Ordering::SeqCst);
                    return Ok(started);
                }
                Ok(false) => {
                    self.standing_by.store(true, Ordering::SeqCst);
                    if !logged {
                        tracing::info!(lease = %self.cfg.name, "another replica leads; standing by");
                        logged = true;
                    }
                }
                Err(e) => {
                    self.standing_by.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %e, "leader election failed; retrying");
                }
            }
            tokio::time::sleep(self.cfg.renew_every).await;
        }
    }

    /// Renews the Lease until no renewal succeeded within the renew deadline
    /// (or another replica took it); then returns, and the caller stops
    /// leading, before the Lease can expire for the others.
    /// `held_since` is when the last successful acquisition or renewal was
    /// *sent*: the API server may have stored it any time after, so the
    /// deadline counts from the earliest moment.
    pub async fn hold(&self, held_since: tokio::time::Instant) {
        tracing::debug!(
            lease = %self.cfg.name,
            every_s = self.cfg.renew_every.as_secs(),
            deadline_s = self.cfg.renew_deadline.as_secs(),
            "holding the lease"
        );
        let mut last_ok = held_since;
        loop {
            let deadline = last_ok + self.cfg.renew_deadline;
            let next = (tokio::time::Instant::now() + self.cfg.renew_every).min(deadline);
            tokio::time::sleep_until(next).await;
            let sent = tokio::time::Instant::now();
            let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => {
                    tracing::trace!(lease = %self.cfg.name, "renewed");
                    last_ok = sent;
                }
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.cfg.name, "another replica took the lease");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease failed"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
            if tokio::time::Instant::now() >= last_ok + self.cfg.renew_deadline {
                tracing::error!(
                    lease = %self.cfg.name,
                    renew_deadline_s = self.cfg.renew_deadline.as_secs(),
                    "no renewal within the renew deadline; stopping leading"
                );
                return;
            }
        }
    }

    /// Gives the Lease up so that a standby takes over at once.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_by_local_time_since_the_record_last_changed() {
        let t0 = tokio::time::Instant::now();
        let d = Duration::from_secs(15);
        let rec = |rv: &str| {
            (
                "other".to_string(),
                // A renew time an hour in the past (the holder's clock is
                // behind): irrelevant, only changes count.
                "2026-11-30T10:00:00Z".to_string(),
                Some(rv.to_string()),
            )
        };
        let mut last = None;
        assert!(!expired(&mut last, rec("1"), t0, d), "first sight");
        assert!(!expired(
            &mut last,
            rec("1"),
            t0 + Duration::from_secs(14),
            d
        ));
        // Renewed (a new resourceVersion): the clock starts again.
        assert!(!expired(
            &mut last,
            rec("2"),
            t0 + Duration::from_secs(14),
            d
        ));
        assert!(!expired(
            &mut last,
            rec("2"),
            t0 + Duration::from_secs(28),
            d
        ));
        assert!(expired(
            &mut last,
            rec("2"),
            t0 + Duration::from_secs(29),
            d
        ));
    }

    #[test]
    fn durations_must_nest() {
        let cfg = |every, deadline, duration| LeaseConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "i".into(),
            lease_duration: Duration::from_secs(duration),
            renew_every: Duration::from_secs(every),
            renew_deadline: Duration::from_secs(deadline),
        };
        assert!(cfg(2, 10, 15).validate().is_ok());
        assert!(cfg(2, 15, 15).validate().is_err());
        assert!(cfg(10, 10, 15).validate().is_err());
    }
}
