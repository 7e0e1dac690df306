//! End-to-end check of the local control plane: real scheduler on fake
//! nodes, the node keeper finishing deletions, and the garbage collector.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tripod::testenv::{self, ControlPlane, LINUX_AMD64, LINUX_ARM64, Options, WINDOWS_AMD64};

const NS: &str = "tripod-testenv-e2e";

/// Polls `check` every 200 ms until it yields `Some`, or panics after
/// `timeout` with `what`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod(name: &str, node_selector: serde_json::Value, tolerations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeSelector": node_selector,
            "tolerations": tolerations,
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "x"}],
        },
    }))
    .unwrap()
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.unwrap().spec.and_then(|s| s.node_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_schedules_deletes_and_collects() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tripod=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let repo = std::env::var("TRIPOD_REPO").unwrap_or_else(|_| "/work/main".into());
    let bin_dir = testenv::ensure_binaries(Path::new(&repo)).unwrap();
    let dir = std::env::temp_dir().join(format!("tripod-testenv-{}", std::process::id()));

    let started = Instant::now();
    let mut cp = ControlPlane::start(Options {
        dir: dir.clone(),
        bin_dir,
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let start_time = started.elapsed();
    eprintln!(
        "control plane started in {start_time:?} at {}",
        cp.api_url()
    );
    assert_eq!(cp.pids().len(), 4);

    let client = cp.client().await.unwrap();
    let nodes = testenv::create_nodes(&client).await.unwrap();
    assert_eq!(nodes.len(), 3);
    // Idempotent.
    assert_eq!(testenv::create_nodes(&client).await.unwrap(), nodes);
    let heartbeat = |node: &'static str| {
        let nodes: Api<Node> = Api::all(client.clone());
        async move {
            nodes
                .get(node)
                .await
                .unwrap()
                .status
                .unwrap()
                .conditions
                .unwrap()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| {
                    assert_eq!(c.status, "True");
                    c.last_heartbeat_time.unwrap().0
                })
                .unwrap()
        }
    };
    let first_heartbeat = heartbeat(LINUX_AMD64).await;
    for node in [LINUX_AMD64, LINUX_ARM64] {
        let n = Api::<Node>::all(client.clone()).get(node).await.unwrap();
        assert_eq!(n.spec.unwrap().taints.unwrap_or_default(), vec![]);
    }
    let keeper = testenv::spawn_node_keeper(client.clone(), nodes.clone());

    // kubectl talks to it with the same kubeconfig.
    let out = std::process::Command::new(cp.kubectl())
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["get", "nodes", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for n in &nodes {
        assert!(listed.contains(&format!("node/{n}")), "{listed}");
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();

    // The real scheduler honours nodeSelector.
    let t = Instant::now();
    pods.create(
        &pp,
        &pod("arm", json!({"kubernetes.io/arch": "arm64"}), json!([])),
    )
    .await
    .unwrap();
    let node = wait_for(Duration::from_secs(30), "arm pod scheduled", || {
        node_of(&pods, "arm")
    })
    .await;
    assert_eq!(node, LINUX_ARM64);
    eprintln!("arm pod bound in {:?}", t.elapsed());

    // ... and taints: only the tolerating Pod lands on the Windows node.
    let windows = json!({"kubernetes.io/os": "windows"});
    pods.create(&pp, &pod("win-untolerated", windows.clone(), json!([])))
        .await
        .unwrap();
    pods.create(
        &pp,
        &pod(
            "win-tolerated",
            windows,
            json!([{"key": "os", "operator": "Equal", "value": "windows", "effect": "NoSchedule"}]),
        ),
    )
    .await
    .unwrap();
    let node = wait_for(Duration::from_secs(30), "windows pod scheduled", || {
        node_of(&pods, "win-tolerated")
    })
    .await;
    assert_eq!(node, WINDOWS_AMD64);
    let reason = wait_for(
        Duration::from_secs(30),
        "untolerated pod marked unschedulable",
        || async {
            let p = pods.get("win-untolerated").await.unwrap();
            assert_eq!(p.spec.as_ref().and_then(|s| s.node_name.clone()), None);
            p.status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.reason)
        },
    )
    .await;
    assert_eq!(reason, "Unschedulable");

    // Bound Pods stay Pending: nothing runs containers.
    let phase = pods.get("arm").await.unwrap().status.and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Pending"));

    // Deleting a bound Pod: the keeper plays the kubelet and finishes it.
    let t = Instant::now();
    pods.delete("arm", &DeleteParams::default()).await.unwrap();
    wait_for(Duration::from_secs(30), "bound pod deleted", || async {
        pods.get_opt("arm").await.unwrap().is_none().then_some(())
    })
    .await;
    eprintln!("bound pod gone {:?} after delete", t.elapsed());

    // The garbage collector cascades ownerReferences.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let owner = cms
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    cms.create(
        &pp,
        &serde_json::from_value(json!({"metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "owner",
                "uid": owner.metadata.uid.unwrap(),
            }],
        }}))
        .unwrap(),
    )
    .await
    .unwrap();
    let t = Instant::now();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for(Duration::from_secs(60), "dependent collected", || async {
        cms.get_opt("dependent")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eprintln!("dependent collected {:?} after owner delete", t.elapsed());

    // The namespace controller empties and removes namespaces.
    namespaces
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "namespace removed", || async {
        namespaces
            .get_opt(NS)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // The keeper renews the Ready heartbeat (every 10 s).
    wait_for(Duration::from_secs(25), "heartbeat renewed", || async {
        (heartbeat(LINUX_AMD64).await > first_heartbeat).then_some(())
    })
    .await;

    keeper.abort();
    let pids = cp.pids();
    let t = Instant::now();
    cp.stop().await;
    eprintln!("control plane stopped in {:?}", t.elapsed());
    assert!(cp.pids().is_empty());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still exists"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("start time: {start_time:?}");
}
