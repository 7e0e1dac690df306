//! The gRPC side of a runner's session: converts messages, maps errors to
//! `tonic::Status`, and runs the session loop (heartbeats, offers, take
//! backs, progress, one outcome per lease). What counts is decided in
//! [`Executors`] (authentication, fencing) and the [`RunnerHub`] (liveness,
//! capacity).
//!
//! [`RunnerHub`]: super::runners::RunnerHub

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::grpc::{assignment_to_proto, claim_from, outcome_from};
use super::leases::{RunnerClaim, lease_key};
use super::runners::{Connection, HEARTBEAT_INTERVAL, LeaseKey, OFFLINE_AFTER};
use super::{Assignment, Authenticated, Claim, ExecutorError, Executors};
use crate::proto::executor::v1 as pb;

type Tx = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

fn lease_claim(r: pb::LeaseRef) -> Claim {
    claim_from(pb::Hello {
        token: String::new(),
        namespace: r.namespace,
        image_build: r.image_build,
        build_id: r.build_id,
        platform: r.platform,
        attempt: r.attempt,
        agent_version: String::new(),
        pod: r.lease,
        image_build_uid: r.image_build_uid,
    })
}

/// The wire form of a lease.
pub fn lease_ref(c: &Claim) -> pb::LeaseRef {
    pb::LeaseRef {
        namespace: c.namespace.clone(),
        image_build: c.image_build.clone(),
        image_build_uid: c.image_build_uid.clone(),
        build_id: c.build_id.clone(),
        platform: c.platform.clone(),
        attempt: c.attempt,
        lease: c.pod.clone(),
    }
}

/// The claim of a RunnerHello.
pub fn runner_claim_from(h: pb::RunnerHello) -> RunnerClaim {
    RunnerClaim {
        token: h.token,
        runner: h.runner,
        agent_version: h.agent_version,
        capacity: h.capacity,
        platforms: h.platforms,
        emulated_platforms: h.emulated_platforms,
        held: h.held.into_iter().map(lease_claim).collect(),
        draining: h.draining,
        labels: h.labels.into_iter().collect(),
    }
}

async fn send(tx: &Tx, m: pb::controller_message::Message) -> bool {
    tx.send(Ok(pb::ControllerMessage { message: Some(m) }))
        .await
        .is_ok()
}

/// A lease this session knows: offered here, or held by the agent when it
/// said hello.
struct Known {
    auth: Option<(Authenticated, Assignment)>,
    step: Option<String>,
    last_write: Option<Instant>,
    /// When it was offered on this session (None: held from before).
    offered_at: Option<Instant>,
    /// Heartbeats in a row that did not list it as held.
    missing: u8,
    /// Its outcome is being checked and recorded.
    recording: bool,
}

impl Known {
    fn held() -> Self {
        Known {
            auth: None,
            step: None,
            last_write: None,
            offered_at: None,
            missing: 0,
            recording: false,
        }
    }
}

/// Heartbeats in a row that must omit an offered lease before its attempt
/// fails as never taken (and how long after the offer counting starts).
const MISSING_HEARTBEATS: u8 = 2;
const OFFER_SETTLE: Duration = Duration::from_secs(15);

/// A recorded (or refused) outcome, back from its task.
struct Recorded {
    key: LeaseKey,
    ack: pb::LeaseAck,
    forget: bool,
}

/// Authenticates a runner's hello, registers the session and runs it in a
/// task; the returned channel is the controller's side of the stream.
pub async fn start(
    logic: Executors,
    hello: pb::RunnerHello,
    mut inbound: Streaming<pb::AgentMessage>,
    step_interval: Duration,
) -> Result<mpsc::Receiver<Result<pb::ControllerMessage, Status>>, Status> {
    let claim = runner_claim_from(hello);
    let hub = logic.hub()?.clone();
    if !logic.synced() {
        return Err(Status::unavailable(
            "the controller is still loading its caches; retry",
        ));
    }
    let identity = logic.authenticate_runner(&claim).await?;
    let runner = identity.name.clone();
    let handle = hub.connect(
        &runner,
        Connection {
            capacity: identity.capacity,
            draining: claim.draining,
            agent_version: claim.agent_version.chars().take(64).collect(),
            rotation: identity.rotation.clone(),
            uid: identity.uid.clone(),
        },
    );
    let (tx, rx) = mpsc::channel(64);
    send(
        &tx,
        pb::controller_message::Message::Welcome(pb::RunnerWelcome {
            heartbeat_seconds: HEARTBEAT_INTERVAL.as_secs() as u32,
            offline_after_seconds: OFFLINE_AFTER.as_secs() as u32,
            capacity: identity.capacity,
        }),
    )
    .await;
    let span = tracing::info_span!("runner_session", runner = %runner, session = handle.id);
    tokio::spawn(
        async move {
            tracing::info!(capacity = identity.capacity, held = claim.held.len(), "runner connected");
            let mut known: HashMap<LeaseKey, Known> = claim
                .held
                .iter()
                .map(|c| (lease_key(c), Known::held()))
                .collect();
            let mut draining = claim.draining;
            let mut drained = false;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Outcomes are checked (registry calls) and recorded in tasks of
            // their own: heartbeats keep being read meanwhile.
            let (recorded_tx, mut recorded_rx) = mpsc::channel::<Recorded>(64);
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    Some(r) = recorded_rx.recv() => {
                        if r.forget {
                            known.remove(&r.key);
                        } else if let Some(k) = known.get_mut(&r.key) {
                            k.recording = false;
                        }
                        if !send(&tx, pb::controller_message::Message::LeaseAck(r.ack)).await { break; }
                        hub.wake_waiters();
                        continue;
                    }
                    _ = handle.poke.notified() => {
                        if !scan(&logic, &runner, draining, &mut known, &tx).await { break; }
                        continue;
                    }
                    _ = tick.tick() => {
                        flush_steps(&logic, &mut known, step_interval).await;
                        if !scan(&logic, &runner, draining, &mut known, &tx).await { break; }
                        continue;
                    }
                    _ = handle.closed.cancelled() => {
                        let _ = tx.send(Err(Status::aborted(
                            "this runner session was replaced by a newer one, or the runner's token was rotated or the BuildRunner deleted",
                        ))).await;
                        break;
                    }
                };
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(error = %e, "runner session broke");
                        break;
                    }
                };
                match msg.message {
                    Some(pb::agent_message::Message::Heartbeat(h)) => {
                        draining |= h.draining;
                        drained = h.draining && h.running.is_empty() && known.is_empty();
                        hub.heard(&runner, handle.id, h.draining);
                        let held: HashSet<LeaseKey> =
                            h.held.into_iter().map(|r| lease_key(&lease_claim(r))).collect();
                        for (key, k) in known.iter_mut() {
                            let settled = k.offered_at.is_some_and(|t| t.elapsed() > OFFER_SETTLE);
                            if held.contains(key) || k.recording || !settled {
                                k.missing = 0;
                                continue;
                            }
                            k.missing = k.missing.saturating_add(1);
                            if k.missing == MISSING_HEARTBEATS
                                && let Some((auth, _)) = k.auth.clone()
                            {
                                // Offered, never taken (lost on the way, or
                                // refused by the agent): the attempt fails
                                // rather than wait for ever.
                                k.recording = true;
                                let logic = logic.clone();
                                let recorded_tx = recorded_tx.clone();
                                let key = key.clone();
                                let runner = runner.clone();
                                tokio::spawn(async move {
                                    let f = crate::outcome::Failed {
                                        reason: "LeaseNotTaken".into(),
                                        message: format!("runner {runner} was offered this lease but does not hold it"),
                                    };
                                    let placeholder = placeholder(&auth);
                                    let result = logic.outcome(&auth, super::Outcome::Failed(f), &placeholder).await;
                                    tracing::warn!(lease = %key, ?result, "an offered lease the runner does not hold failed its attempt");
                                    let _ = recorded_tx
                                        .send(Recorded {
                                            key: key.clone(),
                                            ack: pb::LeaseAck {
                                                lease: Some(pb::LeaseRef {
                                                    namespace: key.namespace.clone(),
                                                    lease: key.name.clone(),
                                                    ..Default::default()
                                                }),
                                                ack: Some(pb::Ack {
                                                    accepted: false,
                                                    message: "the lease was not taken: its attempt failed".into(),
                                                }),
                                                done: true,
                                            },
                                            forget: true,
                                        })
                                        .await;
                                });
                            }
                        }
                    }
                    Some(pb::agent_message::Message::LeaseProgress(p)) => {
                        hub.heard(&runner, handle.id, draining);
                        let (Some(r), Some(progress)) = (p.lease, p.progress) else {
                            continue;
                        };
                        let key = lease_key(&lease_claim(r));
                        if let Some(k) = known.get_mut(&key)
                            && !progress.step.is_empty()
                        {
                            k.step = Some(crate::outcome::cap(&progress.step, crate::outcome::MAX_STEP));
                        }
                    }
                    Some(pb::agent_message::Message::LeaseOutcome(o)) => {
                        hub.heard(&runner, handle.id, draining);
                        let Some(r) = o.lease else { continue };
                        let key = lease_key(&lease_claim(r.clone()));
                        let entry = known.entry(key.clone()).or_insert_with(Known::held);
                        if entry.recording {
                            continue; // a resend while the first is checked
                        }
                        entry.recording = true;
                        let assignment = entry.auth.as_ref().map(|(_, a)| a.clone());
                        let logic = logic.clone();
                        let runner = runner.clone();
                        let recorded_tx = recorded_tx.clone();
                        tokio::spawn(async move {
                            let (ack, forget) = outcome(&logic, &runner, r, o.outcome, assignment).await;
                            let _ = recorded_tx.send(Recorded { key, ack, forget }).await;
                        });
                    }
                    _ => {}
                }
            }
            hub.disconnect(&runner, handle.id, drained);
            tracing::info!(drained, "runner disconnected");
        }
        .instrument(span),
    );
    Ok(rx)
}

/// Offers `runner` what it holds and was not offered, takes back what it
/// no longer holds. False when the session is gone.
async fn scan(
    logic: &Executors,
    runner: &str,
    draining: bool,
    known: &mut HashMap<LeaseKey, Known>,
    tx: &Tx,
) -> bool {
    let keys: HashSet<LeaseKey> = known.keys().cloned().collect();
    for key in logic.withdrawn(runner, &keys) {
        known.remove(&key);
        tracing::info!(lease = %key, "lease taken back");
        let (namespace, name) = (key.namespace.clone(), key.name.clone());
        let m = pb::controller_message::Message::LeaseCancel(pb::LeaseCancel {
            lease: Some(pb::LeaseRef {
                namespace,
                lease: name,
                ..Default::default()
            }),
            reason: "the lease was taken back (cancelled, expired, or the build moved on)".into(),
        });
        if !send(tx, m).await {
            return false;
        }
    }
    if draining {
        return true;
    }
    for offer in logic.offers(runner, &keys) {
        let key = lease_key(&offer.claim);
        let assignment = match logic.assignment(&offer.auth).await {
            Ok(a) => a,
            Err(e) => {
                // A Secret that went away since the reconcile checked it:
                // the build fails this attempt rather than wait unseen.
                tracing::warn!(lease = %key, error = %e, "cannot make the assignment");
                if let ExecutorError::Secret(message) = &e {
                    let f = crate::outcome::Failed {
                        reason: "SecretRefused".into(),
                        message: message.clone(),
                    };
                    let _ = logic
                        .outcome(
                            &offer.auth,
                            super::Outcome::Failed(f),
                            &placeholder(&offer.auth),
                        )
                        .await;
                }
                continue;
            }
        };
        tracing::info!(lease = %key, platform = %offer.auth.platform, emulated = offer.emulated, "offering lease");
        let m = pb::controller_message::Message::LeaseOffer(pb::LeaseOffer {
            lease: Some(lease_ref(&offer.claim)),
            assignment: Some(assignment_to_proto(&assignment)),
            emulated: offer.emulated,
        });
        known.insert(
            key,
            Known {
                auth: Some((offer.auth, assignment)),
                offered_at: Some(Instant::now()),
                ..Known::held()
            },
        );
        if !send(tx, m).await {
            return false;
        }
    }
    true
}

/// An assignment standing in where only a failure is recorded.
fn placeholder(auth: &Authenticated) -> Assignment {
    Assignment {
        source: super::AssignedSource::Inline {
            dockerfile: String::new(),
            files: Default::default(),
        },
        dockerfile: None,
        target: None,
        build_args: Vec::new(),
        tags: Vec::new(),
        push_by_digest: false,
        cache_image: None,
        docker_config_json: None,
        insecure: false,
        labels: Default::default(),
        platform: auth.platform.to_string(),
        backend: None,
    }
}

async fn flush_steps(logic: &Executors, known: &mut HashMap<LeaseKey, Known>, interval: Duration) {
    for (key, k) in known.iter_mut() {
        let due = k.last_write.is_none_or(|t| t.elapsed() >= interval);
        let (Some(step), Some((auth, _))) = (k.step.as_ref(), k.auth.as_ref()) else {
            continue;
        };
        if !due || !logic.lease_active(key) {
            continue;
        }
        if let Err(e) = logic.progress(auth, step).await {
            tracing::warn!(lease = %key, error = %e, "could not record step");
        }
        k.step = None;
        k.last_write = Some(Instant::now());
    }
}

/// Checks and records one lease's outcome: the ack, and whether the
/// session is done with the lease.
async fn outcome(
    logic: &Executors,
    runner: &str,
    r: pb::LeaseRef,
    o: Option<pb::Outcome>,
    assignment: Option<Assignment>,
) -> (pb::LeaseAck, bool) {
    let claim = lease_claim(r.clone());
    let key = lease_key(&claim);
    let ack = |accepted: bool, message: String, done: bool| {
        (
            pb::LeaseAck {
                lease: Some(r.clone()),
                ack: Some(pb::Ack { accepted, message }),
                done,
            },
            done,
        )
    };
    let auth = match logic.authenticate_lease(runner, &claim).await {
        Ok(a) => a,
        Err(
            e @ (ExecutorError::NotYet(_) | ExecutorError::Kube { .. } | ExecutorError::Busy(_)),
        ) => {
            return ack(false, e.to_string(), false);
        }
        Err(e) => {
            // The fencing: a report for an attempt that is over (its lease
            // expired, the build moved on) never counts.
            tracing::warn!(lease = %key, attempt = claim.attempt, error = %e, "refused a runner's report: its lease is not current");
            return ack(false, format!("refused: {e}"), true);
        }
    };
    // A malformed outcome fails the attempt (rather than leave it hanging).
    let outcome = match o.map(outcome_from) {
        Some(Ok(o)) => o,
        Some(Err(s)) => super::Outcome::Failed(crate::outcome::Failed {
            reason: "InvalidOutcome".into(),
            message: s.message().to_string(),
        }),
        None => super::Outcome::Failed(crate::outcome::Failed {
            reason: "InvalidOutcome".into(),
            message: "lease_outcome.outcome: empty".into(),
        }),
    };
    // Only a push is verified against the assignment (its tags, registry
    // credentials, labels); a failure needs none.
    let assignment = match (&outcome, assignment) {
        (super::Outcome::Failed(_), _) => placeholder(&auth),
        (_, Some(a)) => a,
        (_, None) => match logic.assignment(&auth).await {
            Ok(a) => a,
            Err(ExecutorError::Secret(m)) => {
                let f = crate::outcome::Failed {
                    reason: "SecretRefused".into(),
                    message: m,
                };
                let _ = logic
                    .outcome(&auth, super::Outcome::Failed(f), &placeholder(&auth))
                    .await;
                return ack(
                    false,
                    "refused: the push Secret may no longer be used".into(),
                    true,
                );
            }
            Err(e) => return ack(false, e.to_string(), false),
        },
    };
    match logic.outcome(&auth, outcome, &assignment).await {
        Ok((accepted, message)) => {
            tracing::info!(lease = %key, accepted, %message, "lease outcome recorded");
            ack(accepted, message, true)
        }
        Err(e @ (ExecutorError::Kube { .. } | ExecutorError::Busy(_))) => {
            ack(false, e.to_string(), false)
        }
        Err(e) => {
            tracing::warn!(lease = %key, error = %e, "refused a runner's report");
            ack(false, format!("refused: {e}"), true)
        }
    }
}
