//! Faults, in an environment of their own (a test binary of its own, its
//! tests one at a time): the controller SIGKILLed ten times under twenty
//! builds, kube-apiserver killed and etcd compacted mid-build, the registry
//! down for a minute during a push, and a build Pod deleted mid-build.
//! Each test prints its figures (`FIGURES ...` lines), which
//! docs/reliability.md reports.

#[allow(dead_code)]
#[path = "e2e/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use tripod::api::Phase;
use tripod::registry::RegistryClient;

use crate::common::{TestEnv, eventually};

const BUILD: Duration = Duration::from_secs(600);

/// The tests of this binary share one environment and disturb it: one at
/// a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn figures(test: &str, text: &str) {
    println!("FIGURES {test}: {text}");
}

/// A small pseudo-random sequence (no crate needed for test timing).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        Self(seed | 1)
    }

    /// A duration in [lo, hi) milliseconds.
    fn between(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

fn pgrep(pattern: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill9(pids: &[u32]) {
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Every build Pod of `name` is a distinct (platform, attempt) and none of
/// its containers restarted: each attempt ran (and pushed) once.
async fn one_run_per_attempt(env: &TestEnv, name: &str) {
    let pods = env.pods_of(name).await;
    let mut seen = BTreeSet::new();
    for pod in &pods {
        let labels = pod.labels();
        let key = (
            labels.get("build.tripod.dev/platform").cloned(),
            labels.get("build.tripod.dev/attempt").cloned(),
        );
        assert!(seen.insert(key.clone()), "{name}: two Pods of {key:?}");
        for c in pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
        {
            assert_eq!(c.restart_count, 0, "{name}: {} restarted", c.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_builds_survive_ten_controller_kills() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::with_builds("fault-kill").await;
    let registry = env.shared.registry.clone().expect("registry");
    let mut current = env.start_controller("c1");
    let executor_port = env.controller(current).executor_port;
    let names: Vec<String> = (0..20).map(|i| format!("b{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        env.apply(&common::real_node_build(
            name,
            &registry,
            &format!("FROM BASE\nRUN echo {i} > /n.txt\nCOPY hello.txt /hello-{i}.txt\n"),
            "  retries: 1\n",
        ));
    }
    // Ten SIGKILLs at random points while the builds run; a new process
    // (same identity and address, as a restarted container) each time.
    let mut jitter = Jitter::new();
    let started = Instant::now();
    let mut kills = 0;
    let mut finished_at_kill = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(jitter.between(300, 1800)).await;
        env.kill_controller(current);
        kills += 1;
        let mut done = 0;
        for name in &names {
            if let Ok(ib) = env.builds().get(name).await
                && ib.status.and_then(|s| s.phase) == Some(Phase::Succeeded)
            {
                done += 1;
            }
        }
        finished_at_kill.push(done);
        current = env.start_controller_on("c1", executor_port);
    }
    let last_restart = Instant::now();
    let client = RegistryClient::new(vec![registry.clone()]);
    for name in &names {
        let s = eventually(&format!("{name} succeeded"), BUILD, || async {
            let s = env.builds().get(name).await.ok()?.status?;
            s.phase.is_some_and(Phase::is_finished).then_some(s)
        })
        .await;
        assert_eq!(s.phase, Some(Phase::Succeeded), "{name}: {s:#?}");
        let digest = s.image.clone().expect("image").digest;
        let served = client
            .resolve(&format!("{registry}/team/{name}:1"), None)
            .await
            .expect("registry answers");
        assert_eq!(digest, served, "{name}: the digest the registry serves");
    }
    let converged = last_restart.elapsed();
    let mut attempts = 0;
    for name in &names {
        common::assert_reported_once(&env, name).await;
        one_run_per_attempt(&env, name).await;
        let s = env
            .builds()
            .get(name)
            .await
            .expect("get")
            .status
            .expect("status");
        attempts += s.platforms[0].attempts;
    }
    figures(
        "controller-kill",
        &format!(
            "builds=20 kills={kills} restarts={kills} succeeded=20 lost=0 duplicated=0 \
             attempts={attempts} succeeded_before_each_kill={finished_at_kill:?} \
             total_s={:.1} converge_after_last_restart_s={:.1}",
            started.elapsed().as_secs_f64(),
            converged.as_secs_f64()
        ),
    );
    env.cleanup().await;
}

/// `--etcd-servers` of this environment's kube-apiserver.
fn etcd_url(apiserver_pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{apiserver_pid}/cmdline")).expect("cmdline");
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .find_map(|a| a.strip_prefix("--etcd-servers=").map(str::to_string))
        .expect("--etcd-servers")
}

/// POST a JSON body to etcd's HTTP gateway; the answer as JSON.
fn etcd_post(url: &str, path: &str, body: &str) -> serde_json::Value {
    let addr = url.trim_start_matches("http://");
    let (_, head, answer) =
        tripod_harness::http_send(addr, "POST", path, "application/json", body.as_bytes())
            .expect("etcd request");
    serde_json::from_slice(&answer).unwrap_or_else(|e| {
        panic!(
            "etcd {path}: {e}: {head}\n{}",
            String::from_utf8_lossy(&answer)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_apiserver_stops_the_leader_and_a_restart_with_compaction_is_survived() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::with_builds("fault-api").await;
    let registry = env.shared.registry.clone().expect("registry");
    let c = env.start_controller("c1");
    let executor_port = env.controller(c).executor_port;
    let names = ["api-a", "api-b", "api-c"];
    for name in names {
        env.apply(&common::real_node_build(
            name,
            &registry,
            &format!("FROM BASE\nRUN echo {name}-marker && sleep 12\n"),
            "",
        ));
    }
    eventually("the RUN steps run", BUILD, || async {
        (names
            .iter()
            .all(|n| !pgrep(&format!("echo {n}-marker")).is_empty()))
        .then_some(())
    })
    .await;
    let cert_dir = env.shared.dir.join("cluster").join("pki").join("apiserver");
    let pattern = format!("kube-apiserver .*--cert-dir={}", cert_dir.display());
    let apiserver = pgrep(&pattern);
    assert_eq!(apiserver.len(), 1, "{pattern}: {apiserver:?}");
    let etcd = etcd_url(apiserver[0]);

    // 1. kube-apiserver frozen (SIGSTOP): requests hang instead of failing.
    // The leader's renewals time out, and at its renew deadline (3 s here)
    // it stops reconciling and serving the executor, and exits.
    let frozen = Instant::now();
    let signal = |sig: &str| {
        let _ = Command::new("kill")
            .args([sig, &apiserver[0].to_string()])
            .status();
    };
    signal("-STOP");
    let until = Instant::now() + Duration::from_secs(60);
    let stopped = loop {
        if let Ok(Some(status)) = env.controller(c).child.try_wait() {
            break status;
        }
        if Instant::now() >= until {
            signal("-CONT");
            panic!(
                "the leader did not stop at its renew deadline:\n{}",
                env.controller_log(c)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stopped_after = frozen.elapsed();
    signal("-CONT");
    assert!(!stopped.success(), "{stopped}");
    let log = env.controller_log(c);
    assert!(
        log.contains("no renewal within the renew deadline"),
        "{log}"
    );
    // As its Deployment would, a new process (same identity and address).
    let c = env.start_controller_on("c1", executor_port);

    // 2. kube-apiserver killed, and etcd compacted while it is down: when
    // it is back (its service manager restarts it within seconds, inside
    // the renew deadline), the controller's watches cannot resume where
    // they were (410 Gone) and list again.
    eventually("the new leader leads", BUILD, || async {
        env.controller_log(c)
            .contains("watches synced")
            .then_some(())
    })
    .await;
    let down = Instant::now();
    kill9(&apiserver);
    let range = etcd_post(&etcd, "/v3/kv/range", r#"{"key":"AA=="}"#);
    let revision: u64 = range["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("revision");
    etcd_post(
        &etcd,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    );
    eventually(
        "kube-apiserver is back",
        Duration::from_secs(120),
        || async {
            env.builds()
                .list(&Default::default())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let outage = down.elapsed();
    let back = Instant::now();
    for name in names {
        let (ok, out) = env.wait_for("condition=Ready", &format!("ib/{name}"), "300s");
        assert!(
            ok,
            "{name}: {out}\n{:#?}",
            env.builds().get(name).await.ok().and_then(|b| b.status)
        );
        common::assert_reported_once(&env, name).await;
        one_run_per_attempt(&env, name).await;
    }
    let log = env.controller_log(c);
    let expired = log.matches("too old resource version").count();
    assert!(
        !log.contains("no renewal within the renew deadline"),
        "the new leader kept its Lease across the restart:\n{log}"
    );
    figures(
        "apiserver",
        &format!(
            "builds=3 apiserver_frozen=1 leader_stopped_after_s={:.1} apiserver_kills=1 \
             compacted_revision={revision} outage_s={:.1} watches_expired_410={expired} \
             succeeded=3 lost=0 duplicated=0 converge_after_apiserver_back_s={:.1}",
            stopped_after.as_secs_f64(),
            outage.as_secs_f64(),
            back.elapsed().as_secs_f64()
        ),
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_during_a_push_fails_clearly_and_records_nothing() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::with_builds("fault-registry").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    env.apply(&common::real_node_build(
        "unlucky",
        &registry,
        "FROM BASE\nRUN echo unlucky-marker && sleep 6\n",
        "  retries: 1\n",
    ));
    eventually("the RUN step runs", BUILD, || async {
        (!pgrep("echo unlucky-marker").is_empty()).then_some(())
    })
    .await;
    // The registry goes away for a minute, from the middle of the build.
    let config = env.shared.dir.join("registry.yml");
    let pattern = format!("docker-registry serve {}", config.display());
    let pids = pgrep(&pattern);
    assert_eq!(pids.len(), 1, "{pattern}: {pids:?}");
    kill9(&pids);
    let down = Instant::now();
    let s = eventually("the build gave up", BUILD, || async {
        let s = env.builds().get("unlucky").await.ok()?.status?;
        s.phase.is_some_and(Phase::is_finished).then_some(s)
    })
    .await;
    let failed_after = down.elapsed();
    assert_eq!(s.phase, Some(Phase::Failed), "{s:#?}");
    assert!(
        s.image.is_none() && s.platforms[0].digest.is_none(),
        "{s:#?}"
    );
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("attempt 2 of 2") && msg.contains(&registry),
        "the failure names the registry: {msg}"
    );
    // Back after 60 s, on the same address and data.
    let rest = Duration::from_secs(60).saturating_sub(down.elapsed());
    tokio::time::sleep(rest).await;
    let (host, port) = registry.rsplit_once(':').expect("host:port");
    let mut restarted = tripod_harness::registry::start_registry_on(
        host,
        &env.shared.dir,
        "registry",
        port.parse().expect("port"),
        None,
    )
    .expect("registry back");
    let downtime = down.elapsed();
    // Nothing was recorded as pushed: the tag was never written.
    let client = RegistryClient::new(vec![registry.clone()]);
    let err = client
        .resolve(&format!("{registry}/team/unlucky:1"), None)
        .await
        .expect_err("nothing was pushed");
    assert!(err.to_string().contains("not found"), "{err}");
    // A rebuild, with the registry back, succeeds once.
    env.kubectl(
        &[
            "annotate",
            "ib/unlucky",
            "build.tripod.dev/rebuild=after-outage",
        ],
        None,
    );
    let (ok, out) = env.wait_for("condition=Ready", "ib/unlucky", "300s");
    assert!(ok, "{out}");
    common::assert_reported_once(&env, "unlucky").await;
    figures(
        "registry-down",
        &format!(
            "builds=1 registry_down_s={:.0} failed_clearly_after_s={:.1} attempts=2 \
             recorded_as_pushed=0 rebuild_after_outage=succeeded",
            downtime.as_secs_f64(),
            failed_after.as_secs_f64()
        ),
    );
    env.cleanup().await;
    // The registry keeps serving the other tests of this binary (the
    // environment's own process is gone); it ends with this process.
    let _ = restarted.child.try_wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_pod_deleted_mid_build_costs_one_attempt_and_reports_once() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::with_builds("fault-pod").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    env.apply(&common::real_node_build(
        "lost",
        &registry,
        "FROM BASE\nRUN echo lost-pod-marker && sleep 8\n",
        "  retries: 1\n",
    ));
    eventually("the RUN step runs", BUILD, || async {
        (!pgrep("echo lost-pod-marker").is_empty()).then_some(())
    })
    .await;
    let pod = env.pods_of("lost").await.remove(0).name_any();
    let (ok, out) = env.kubectl(&["delete", "pod", &pod, "--wait=false"], None);
    assert!(ok, "{out}");
    let (ok, out) = env.wait_for("condition=Ready", "ib/lost", "300s");
    let s = env
        .builds()
        .get("lost")
        .await
        .expect("get")
        .status
        .expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(
        s.platforms[0].attempts, 2,
        "the lost Pod counts as an attempt: {s:#?}"
    );
    common::assert_reported_once(&env, "lost").await;
    one_run_per_attempt(&env, "lost").await;
    figures(
        "pod-deleted",
        "builds=1 pods_deleted=1 attempts=2 succeeded=1 lost=0 duplicated=0",
    );
    env.cleanup().await;
}
