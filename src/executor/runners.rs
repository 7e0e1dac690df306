//! The runner hub: the leading controller's view of the runners connected
//! to its executor service. It knows which runner is connected and when it
//! was last heard, hands out leases within each runner's capacity (fair
//! across runners), wakes the session of a runner that has new work, and
//! wakes the reconciles of ImageBuilds waiting for a free runner.
//!
//! Which leases a runner holds is not kept here: the Lease objects are the
//! record (read from the controller's watch cache), so a new leader starts
//! from the same truth. The hub only adds the leases it handed out and the
//! cache does not show yet.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::api::ImageBuild;
use crate::outcome::{ANNOTATION_FAILURE, ANNOTATION_RESULT};

/// How often a runner's agent sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A runner not heard from for this long is Offline, and its leases expire.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(20);
/// How long a lease handed out is counted against its runner before the
/// watch cache shows its Lease object (after that, the cache counts it).
const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// Label on Lease objects: the runner holding the lease.
pub const LABEL_RUNNER: &str = "build.tripod.dev/runner";
/// Annotation on Lease objects: the platform is built through emulation.
pub const ANNOTATION_EMULATED: &str = "build.tripod.dev/emulated";

/// Whether a runner can take work, as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Connected and heard from within [`OFFLINE_AFTER`].
    Online,
    /// Connected, finishing its leases, taking no new ones.
    Draining,
    /// Not heard from within [`OFFLINE_AFTER`], or gone after draining.
    Offline,
    /// This controller has led for less than [`OFFLINE_AFTER`] and not heard
    /// from the runner yet: whatever its status says stands for now.
    Unknown,
}

/// What a connected runner's agent said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Builds it takes at once (the lower of the agent's and the BuildRunner's).
    pub capacity: u32,
    /// It is draining.
    pub draining: bool,
    /// Its `tripod agent` version.
    pub agent_version: String,
    /// The token rotation its session authenticated with.
    pub rotation: String,
    /// The UID of the BuildRunner it authenticated as.
    pub uid: String,
}

/// A runner that may take a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Name of the BuildRunner.
    pub runner: String,
    /// It would build the platform through emulation.
    pub emulated: bool,
}

/// A Lease object, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A registered session; the hub cancels `closed` when a newer session of
/// the same runner replaces it or its token is rotated.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Session number.
    pub id: u64,
    /// Notified when the runner may have new work or leases taken back.
    pub poke: Arc<Notify>,
    /// Cancelled when this session must end.
    pub closed: CancellationToken,
}

struct Conn {
    info: Connection,
    handle: SessionHandle,
}

#[derive(Default)]
struct State {
    conns: HashMap<String, Conn>,
    /// When each runner was last heard from (kept after it disconnects).
    seen: HashMap<String, Instant>,
    /// The same, by the wall clock (for its status).
    seen_at: HashMap<String, jiff::Timestamp>,
    /// The last phase seen of a runner that disconnected (Online or Draining).
    last_draining: HashMap<String, bool>,
    /// Runners that drained and left.
    departed: HashSet<String>,
    reservations: HashMap<LeaseKey, (String, Instant)>,
    /// A counter per runner of the last lease handed to it (fairness).
    last_assigned: HashMap<String, u64>,
    assignments: u64,
    sessions: u64,
    /// ImageBuilds waiting for a runner, each with the free slots of
    /// every runner when it found none.
    waiters: HashMap<ObjectRef<ImageBuild>, Room>,
}

/// See the module documentation.
pub struct RunnerHub {
    state: Mutex<State>,
    leases: Store<Lease>,
    started: Instant,
    trigger: mpsc::UnboundedSender<ObjectRef<ImageBuild>>,
}

impl std::fmt::Debug for RunnerHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunnerHub(..)")
    }
}

/// Why no runner took a lease, and the room every runner had then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct NoRunner {
    /// What was missing, for the platform's message.
    pub why: String,
    /// Free slots per runner when the lease found none: a waiter is woken
    /// when a runner has more than this.
    pub room: Room,
}

/// Free slots per connected runner that takes work, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Room(HashMap<String, usize>);

impl Room {
    /// The smaller room of each runner (a reconcile that found no runner
    /// for several leases waits for more than the least it saw).
    pub fn min(mut self, other: &Room) -> Room {
        for (runner, free) in &other.0 {
            let slot = self.0.entry(runner.clone()).or_insert(*free);
            *slot = (*slot).min(*free);
        }
        self
    }

    /// Whether some runner has more free slots in `now` than here.
    fn exceeded_by(&self, now: &Room) -> bool {
        now.0
            .iter()
            .any(|(runner, free)| *free > self.0.get(runner).copied().unwrap_or(0))
    }
}

/// Whether a Lease object is still held: no outcome recorded, not being deleted.
pub fn lease_is_active(lease: &Lease) -> bool {
    let annotations = lease.metadata.annotations.as_ref();
    lease.metadata.deletion_timestamp.is_none()
        && !annotations.is_some_and(|a| {
            a.contains_key(ANNOTATION_RESULT) || a.contains_key(ANNOTATION_FAILURE)
        })
}

/// The runner a Lease object names.
pub fn lease_holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

impl RunnerHub {
    /// A hub reading Lease objects from `leases`; reconciles of waiting
    /// ImageBuilds are requested on `trigger`.
    pub fn new(
        leases: Store<Lease>,
        trigger: mpsc::UnboundedSender<ObjectRef<ImageBuild>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            leases,
            started: Instant::now(),
            trigger,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the session of `runner`, replacing (and closing) an older one.
    pub fn connect(&self, runner: &str, info: Connection) -> SessionHandle {
        let mut st = self.lock();
        st.sessions += 1;
        let handle = SessionHandle {
            id: st.sessions,
            poke: Arc::new(Notify::new()),
            closed: CancellationToken::new(),
        };
        if let Some(old) = st.conns.insert(
            runner.to_string(),
            Conn {
                info,
                handle: handle.clone(),
            },
        ) {
            old.handle.closed.cancel();
        }
        st.seen.insert(runner.to_string(), Instant::now());
        st.seen_at
            .insert(runner.to_string(), jiff::Timestamp::now());
        st.departed.remove(runner);
        drop(st);
        self.wake_waiters();
        handle
    }

    /// A message from `runner`'s session `session`.
    pub fn heard(&self, runner: &str, session: u64, draining: bool) {
        let mut st = self.lock();
        let Some(conn) = st.conns.get_mut(runner).filter(|c| c.handle.id == session) else {
            return;
        };
        let newly_draining = draining && !conn.info.draining;
        conn.info.draining |= draining;
        st.seen.insert(runner.to_string(), Instant::now());
        st.seen_at
            .insert(runner.to_string(), jiff::Timestamp::now());
        drop(st);
        if newly_draining {
            tracing::info!(runner, "runner is draining");
        }
    }

    /// The session `session` of `runner` ended. `drained`: it said goodbye
    /// after draining, holding nothing; it is Offline at once.
    pub fn disconnect(&self, runner: &str, session: u64, drained: bool) {
        let mut st = self.lock();
        if st.conns.get(runner).is_some_and(|c| c.handle.id == session) {
            if let Some(conn) = st.conns.remove(runner) {
                st.last_draining
                    .insert(runner.to_string(), conn.info.draining);
            }
            if drained {
                st.departed.insert(runner.to_string());
            }
        }
        drop(st);
        self.wake_waiters();
    }

    /// Whether `runner` can take work.
    pub fn liveness(&self, runner: &str) -> Liveness {
        let st = self.lock();
        let now = Instant::now();
        let recent = st
            .seen
            .get(runner)
            .is_some_and(|t| now.duration_since(*t) <= OFFLINE_AFTER);
        if let Some(conn) = st.conns.get(runner) {
            return match (recent, conn.info.draining) {
                (false, _) => Liveness::Offline,
                (true, true) => Liveness::Draining,
                (true, false) => Liveness::Online,
            };
        }
        if st.departed.contains(runner) {
            return Liveness::Offline;
        }
        if st.seen.contains_key(runner) {
            // Disconnected: it may be reconnecting (a network blip, a new
            // leader); Offline once the bound has passed.
            return match (recent, st.last_draining.get(runner) == Some(&true)) {
                (false, _) => Liveness::Offline,
                (true, true) => Liveness::Draining,
                (true, false) => Liveness::Online,
            };
        }
        if now.duration_since(self.started) <= OFFLINE_AFTER {
            Liveness::Unknown
        } else {
            Liveness::Offline
        }
    }

    /// When `runner` was last heard from, by the wall clock.
    pub fn last_heard(&self, runner: &str) -> Option<jiff::Timestamp> {
        self.lock().seen_at.get(runner).copied()
    }

    /// What `runner`'s connected agent said, if it is connected.
    pub fn connection(&self, runner: &str) -> Option<Connection> {
        self.lock().conns.get(runner).map(|c| c.info.clone())
    }

    /// The names of the runners connected now.
    pub fn connected(&self) -> Vec<String> {
        self.lock().conns.keys().cloned().collect()
    }

    /// The Lease object `key`, from the cache.
    pub fn lease(&self, key: &LeaseKey) -> Option<Arc<Lease>> {
        self.leases
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    /// Lease objects held by `runner` and still active.
    pub fn active_leases(&self, runner: &str) -> Vec<Arc<Lease>> {
        self.leases
            .state()
            .into_iter()
            .filter(|l| lease_holder(l) == Some(runner) && lease_is_active(l))
            .collect()
    }

    /// Leases counted against `runner`: active Lease objects plus leases
    /// handed out that the cache does not show yet.
    fn load(&self, st: &State, runner: &str) -> usize {
        let mut keys: HashSet<LeaseKey> = self
            .active_leases(runner)
            .iter()
            .map(|l| LeaseKey {
                namespace: l.namespace().unwrap_or_default(),
                name: l.name_any(),
            })
            .collect();
        let now = Instant::now();
        for (key, (r, at)) in &st.reservations {
            // Once the cache shows the Lease object, it counts (or not:
            // finished, being deleted) from there.
            if r == runner && now.duration_since(*at) < RESERVATION_TTL && self.lease(key).is_none()
            {
                keys.insert(key.clone());
            }
        }
        keys.len()
    }

    /// Hands lease `key` to one of `candidates`: a connected, not draining
    /// runner below its capacity; natively building runners before
    /// emulating ones, then the least loaded (relative to capacity), then
    /// the one that waited longest for work. Never above capacity: the
    /// choice and its count happen under one lock.
    pub fn reserve(&self, candidates: &[Candidate], key: LeaseKey) -> Result<Candidate, NoRunner> {
        let mut st = self.lock();
        self.prune(&mut st);
        let now = Instant::now();
        // A retry of the same lease keeps its runner.
        if let Some((runner, _)) = st.reservations.get(&key)
            && let Some(c) = candidates.iter().find(|c| &c.runner == runner)
        {
            return Ok(c.clone());
        }
        let mut best: Option<(bool, u64, u64, &Candidate)> = None;
        let (mut connected, mut busy) = (0, 0);
        for c in candidates {
            let Some(conn) = st.conns.get(&c.runner) else {
                continue;
            };
            let heard = st
                .seen
                .get(&c.runner)
                .is_some_and(|t| now.duration_since(*t) <= OFFLINE_AFTER);
            if conn.info.draining || !heard {
                continue;
            }
            connected += 1;
            let capacity = u64::from(conn.info.capacity.max(1));
            let load = self.load(&st, &c.runner) as u64;
            if load >= capacity {
                busy += 1;
                continue;
            }
            // Load relative to capacity, compared without division.
            let rank = (
                c.emulated,
                load * 1000 / capacity,
                st.last_assigned.get(&c.runner).copied().unwrap_or(0),
            );
            if best.as_ref().is_none_or(|(e, l, a, _)| rank < (*e, *l, *a)) {
                best = Some((rank.0, rank.1, rank.2, c));
            }
        }
        let Some((_, _, _, chosen)) = best else {
            return Err(NoRunner {
                why: if connected == 0 {
                    format!(
                        "none of the {} matching runner(s) is connected and taking work",
                        candidates.len()
                    )
                } else {
                    format!("all {busy} matching connected runner(s) are at capacity")
                },
                // Seen under the same lock as the choice: room that frees
                // up after this moment wakes the build, even before it
                // registers as a waiter.
                room: self.room(&st),
            });
        };
        let chosen = chosen.clone();
        st.assignments += 1;
        let n = st.assignments;
        st.last_assigned.insert(chosen.runner.clone(), n);
        st.reservations.insert(key, (chosen.runner.clone(), now));
        Ok(chosen)
    }

    /// Forgets lease `key` handed out (its Lease object was not made, or it
    /// is over): the runner's count no longer includes it.
    pub fn release(&self, key: &LeaseKey) {
        self.lock().reservations.remove(key);
        self.wake_waiters();
    }

    /// Wakes `runner`'s session: it has new work, or work taken back.
    pub fn poke(&self, runner: &str) {
        if let Some(conn) = self.lock().conns.get(runner) {
            conn.handle.poke.notify_one();
        }
    }

    /// Forgets reservations that are old, or whose Lease object the cache
    /// shows (from then on the cache counts it; once it is deleted, it
    /// must not count again through its reservation).
    fn prune(&self, st: &mut State) {
        let now = Instant::now();
        st.reservations.retain(|key, (_, at)| {
            now.duration_since(*at) < RESERVATION_TTL && self.lease(key).is_none()
        });
    }

    /// Free slots of every connected runner that takes work.
    fn room(&self, st: &State) -> Room {
        Room(
            st.conns
                .iter()
                .filter(|(_, c)| !c.info.draining)
                .map(|(name, c)| {
                    let cap = c.info.capacity.max(1) as usize;
                    (name.clone(), cap.saturating_sub(self.load(st, name)))
                })
                .collect(),
        )
    }

    /// Reconciles `build` again when a runner connects or has more room
    /// than `room` (what its lease requests saw; now, when not given).
    pub fn wait(&self, build: ObjectRef<ImageBuild>, room: Option<Room>) {
        let mut st = self.lock();
        let room = room.unwrap_or_else(|| self.room(&st));
        st.waiters.insert(build, room);
    }

    /// Wakes each waiting ImageBuild for which a connected runner that
    /// takes work has more free slots than when it found none (the upkeep
    /// calls it every second: a lease that ended frees room whatever path
    /// it took; a runner whose room stays unused wakes nobody again, and
    /// room freed between a failed choice and the wait still counts).
    pub fn wake_if_room(&self) {
        let mut st = self.lock();
        self.prune(&mut st);
        if st.waiters.is_empty() {
            return;
        }
        let now = self.room(&st);
        let ready: Vec<ObjectRef<ImageBuild>> = st
            .waiters
            .iter()
            .filter(|(_, then)| then.exceeded_by(&now))
            .map(|(build, _)| build.clone())
            .collect();
        for build in &ready {
            st.waiters.remove(build);
        }
        drop(st);
        for w in ready {
            let _ = self.trigger.send(w);
        }
    }

    /// Requests reconciles of every waiting ImageBuild.
    pub fn wake_waiters(&self) {
        let waiters: Vec<_> = self.lock().waiters.drain().map(|(w, _)| w).collect();
        for w in waiters {
            let _ = self.trigger.send(w);
        }
    }

    /// Ends the session of `runner` when it authenticated as another
    /// BuildRunner of that name (deleted and created again, `uid`) or with
    /// another rotation than `rotation` (its token was rotated).
    pub fn close_if_stale(&self, runner: &str, uid: &str, rotation: &str) {
        let st = self.lock();
        if let Some(conn) = st.conns.get(runner)
            && (conn.info.rotation != rotation || conn.info.uid != uid)
        {
            tracing::info!(
                runner,
                "runner token rotated or BuildRunner recreated: closing its session"
            );
            conn.handle.closed.cancel();
        }
    }

    /// Ends the session of a runner that no longer exists.
    pub fn close(&self, runner: &str) {
        if let Some(conn) = self.lock().conns.get(runner) {
            conn.handle.closed.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;

    fn hub() -> Arc<RunnerHub> {
        let (store, _writer) = reflector::store::<Lease>();
        let (tx, _rx) = mpsc::unbounded_channel();
        // The writer is dropped: the store stays empty, reservations count.
        RunnerHub::new(store, tx)
    }

    fn conn(capacity: u32) -> Connection {
        Connection {
            capacity,
            draining: false,
            agent_version: "0.1.0".into(),
            rotation: String::new(),
            uid: "u".into(),
        }
    }

    fn key(i: usize) -> LeaseKey {
        LeaseKey {
            namespace: "ns".into(),
            name: format!("l{i}"),
        }
    }

    fn cand(r: &str, emulated: bool) -> Candidate {
        Candidate {
            runner: r.into(),
            emulated,
        }
    }

    #[test]
    fn leases_spread_fairly_and_never_above_capacity() {
        let hub = hub();
        hub.connect("a", conn(2));
        hub.connect("b", conn(2));
        let cands = [cand("a", false), cand("b", false)];
        let assigned: Vec<String> = (0..4)
            .map(|i| hub.reserve(&cands, key(i)).unwrap().runner)
            .collect();
        // Alternating: each goes to the less loaded runner.
        assert_eq!(assigned, ["a", "b", "a", "b"]);
        let err = hub.reserve(&cands, key(9)).unwrap_err();
        assert!(err.why.contains("at capacity"), "{err}");
        // The same lease asked again keeps its runner.
        assert_eq!(hub.reserve(&cands, key(1)).unwrap().runner, "b");
        hub.release(&key(0));
        assert!(hub.reserve(&cands, key(9)).is_ok());
    }

    #[test]
    fn a_lease_seen_then_deleted_does_not_count_again_through_its_reservation() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        use kube::runtime::watcher::Event;
        let (store, mut writer) = reflector::store::<Lease>();
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = RunnerHub::new(store, tx);
        hub.connect("a", conn(1));
        let cands = [cand("a", false)];
        hub.reserve(&cands, key(1)).unwrap();
        let mut lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        lease.metadata.name = Some("l1".into());
        lease.metadata.namespace = Some("ns".into());
        writer.apply_watcher_event(&Event::Apply(lease.clone()));
        assert!(hub.reserve(&cands, key(2)).is_err(), "the Lease counts");
        // Taken back: gone from the cache. Its reservation does not
        // come back to count against the runner.
        writer.apply_watcher_event(&Event::Delete(lease));
        assert_eq!(
            hub.reserve(&cands, key(2))
                .map(|c| c.runner)
                .ok()
                .as_deref(),
            Some("a")
        );
    }

    #[test]
    fn room_freed_before_a_build_waits_still_wakes_it() {
        let (store, _writer) = reflector::store::<Lease>();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = RunnerHub::new(store, tx);
        hub.connect("a", conn(1));
        hub.connect("idle", conn(1));
        let cands = [cand("a", false)];
        hub.reserve(&cands, key(1)).unwrap();
        let err = hub.reserve(&cands, key(2)).unwrap_err();
        // The lease ends, and an upkeep tick looks, before the build that
        // found no room registers as a waiter.
        hub.release(&key(1));
        hub.wake_if_room();
        let build = ObjectRef::new("app").within("ns");
        hub.wait(build.clone(), Some(err.room));
        hub.wake_if_room();
        assert_eq!(rx.try_recv().ok(), Some(build.clone()));
        // Room that stays as it was (an idle runner it cannot use) wakes
        // nobody again.
        hub.wait(build.clone(), None);
        hub.wake_if_room();
        hub.wake_if_room();
        assert!(rx.try_recv().is_err());
        // More room does.
        hub.reserve(&cands, key(3)).unwrap();
        let err = hub.reserve(&cands, key(4)).unwrap_err();
        hub.wait(build.clone(), Some(err.room.min(&Room::default())));
        hub.release(&key(3));
        assert_eq!(rx.try_recv().ok(), Some(build));
    }

    #[test]
    fn native_runners_come_before_emulating_ones_and_draining_takes_nothing() {
        let hub = hub();
        let a = hub.connect("native", conn(1));
        hub.connect("emu", conn(4));
        let cands = [cand("emu", true), cand("native", false)];
        assert_eq!(hub.reserve(&cands, key(1)).unwrap().runner, "native");
        assert_eq!(hub.reserve(&cands, key(2)).unwrap().runner, "emu");
        hub.heard("emu", 2, true);
        assert_eq!(hub.liveness("emu"), Liveness::Draining);
        assert!(hub.reserve(&cands, key(3)).is_err());
        hub.disconnect("native", a.id, false);
        // Disconnected, but heard from recently: not Offline yet.
        assert_eq!(hub.liveness("native"), Liveness::Online);
        hub.disconnect("emu", 2, true);
        assert_eq!(hub.liveness("emu"), Liveness::Offline);
        assert_eq!(hub.liveness("never-seen"), Liveness::Unknown);
    }

    #[test]
    fn a_new_session_closes_the_old_one() {
        let hub = hub();
        let first = hub.connect("a", conn(1));
        let second = hub.connect("a", conn(1));
        assert!(first.closed.is_cancelled());
        assert!(!second.closed.is_cancelled());
        // The old session ending does not unregister the new one.
        hub.disconnect("a", first.id, true);
        assert_eq!(hub.liveness("a"), Liveness::Online);
        hub.close_if_stale("a", "u", "");
        assert!(!second.closed.is_cancelled());
        hub.close_if_stale("a", "u", "2");
        assert!(second.closed.is_cancelled());
    }
}
