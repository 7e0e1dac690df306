//! Restarts and leader election with real processes.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::common::{TestEnv, eventually, http_get, manifest};

const WAIT: Duration = Duration::from_secs(60);

async fn holder(env: &TestEnv) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    api.get_opt("tripod-controller")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_controller_creates_no_duplicate_pod() {
    let mut env = TestEnv::new("restart").await;
    let c = env.start_controller("first");
    env.apply(&manifest("rs", &["linux/amd64"], ""));
    let pod = eventually("one Pod", WAIT, || async {
        let pods = env.pods_of("rs").await;
        (pods.len() == 1).then(|| pods[0].clone())
    })
    .await;
    env.kill_controller(c);
    let c2 = env.start_controller("second");
    let port = env.controller(c2).metrics_port;
    eventually("the new controller leads and is ready", WAIT, || async {
        leads_and_is_ready(port).await.then_some(())
    })
    .await;
    // Let it reconcile, then look: the same single Pod.
    let (ok, out) = env.kubectl(&["annotate", "ib/rs", "example.com/poke=1"], None);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods = env.pods_of("rs").await;
    assert_eq!(
        pods.len(),
        1,
        "{:?}",
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    assert_eq!(pods[0].uid(), pod.uid());
    assert_eq!(holder(&env).await.as_deref(), Some("second"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let mut env = TestEnv::new("leader").await;
    let a = env.start_controller("replica-a");
    let port_a = env.controller(a).metrics_port;
    eventually("replica-a leads", WAIT, || async {
        leads_and_is_ready(port_a).await.then_some(())
    })
    .await;
    let b = env.start_controller("replica-b");
    let port_b = env.controller(b).metrics_port;
    eventually("replica-b serves health", WAIT, || async {
        (http_get(port_b, "/healthz").await?.0 == 200).then_some(())
    })
    .await;
    // A standby is Ready too (rolling updates need it); it does not lead.
    assert_eq!(http_get(port_b, "/readyz").await.map(|r| r.0), Some(200));
    assert!(
        http_get(port_b, "/metrics")
            .await
            .is_some_and(|r| r.1.lines().any(|l| l == "tripod_leader 0")),
        "replica-b reports itself as leader"
    );
    assert_eq!(holder(&env).await.as_deref(), Some("replica-a"));

    env.apply(&manifest("ld", &["linux/amd64"], ""));
    eventually("one Pod", WAIT, || async {
        (env.pods_of("ld").await.len() == 1).then_some(())
    })
    .await;
    // Events are written for outcomes only: a build whose spec is refused
    // gets one (InvalidSpec) at once, from whichever replica leads.
    env.apply(&manifest("bad", &["linux/amd64", "linux/x86_64"], ""));
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let evs = eventually("an InvalidSpec Event", WAIT, || async {
        let evs = events.list(&ListParams::default()).await.ok()?.items;
        evs.iter()
            .any(|e| {
                e.reporting_controller.as_deref() == Some("tripod-controller")
                    && e.reason.as_deref() == Some("InvalidSpec")
            })
            .then_some(evs)
    })
    .await;
    let ours: Vec<&Event> = evs
        .iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("tripod-controller"))
        .collect();
    assert!(!ours.is_empty(), "no Event from tripod-controller: {evs:?}");
    for ev in ours {
        assert_eq!(
            ev.reporting_instance.as_deref(),
            Some("replica-a"),
            "{ev:?}"
        );
    }
    // The standby wrote nothing: its log shows no reconcile.
    assert!(!env.controller_log(b).contains("created build Pod"));

    // The leader dies; the standby takes over and handles a change.
    env.kill_controller(a);
    eventually("replica-b leads", WAIT, || async {
        leads_and_is_ready(port_b).await.then_some(())
    })
    .await;
    assert_eq!(holder(&env).await.as_deref(), Some("replica-b"));
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "ib/ld",
            "--type=merge",
            "-p",
            r#"{"spec":{"target":"final"}}"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    eventually("generation-2 Pod from replica-b", WAIT, || async {
        let pods = env.pods_of("ld").await;
        (pods.len() == 1 && pods[0].name_any() == "ld-2-linux-amd64-1").then_some(())
    })
    .await;
    env.cleanup().await;
}

/// The replica serving metrics on `port` holds the Lease (`tripod_leader
/// 1`) and its watches have synced (`/readyz`; a standby is ready too).
async fn leads_and_is_ready(port: u16) -> bool {
    let leads = http_get(port, "/metrics")
        .await
        .is_some_and(|r| r.1.lines().any(|l| l == "tripod_leader 1"));
    leads && http_get(port, "/readyz").await.is_some_and(|r| r.0 == 200)
}
