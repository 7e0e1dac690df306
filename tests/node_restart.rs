//! The real node's kubelet is killed while a build runs, in an environment
//! of its own (a test binary of its own), so that no other build sees it.

#[allow(dead_code)]
#[path = "e2e/common.rs"]
mod common;

use std::time::Duration;

use tripod::api::Phase;

use crate::common::{TestEnv, eventually};

const BUILD: Duration = Duration::from_secs(300);

fn inline(name: &str, registry: &str, dockerfile: &str) -> String {
    common::real_node_build(name, registry, dockerfile, "  retries: 1\n")
}

/// The kubelet is killed while a build runs, and its service manager (here
/// `tripod-dev serve`) starts it again: the build finishes (or is retried:
/// `retries: 1`), and its result is reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_killed_mid_build_the_build_finishes_once() {
    let mut env = TestEnv::with_builds("node-kubelet").await;
    let registry = env.shared.registry.clone().expect("registry");
    let busybox = env.shared.info.busybox_image.clone();
    env.start_controller("c1");
    let dockerfile = format!("FROM {busybox}\nRUN echo kubelet-marker && sleep 15\n");
    env.apply(&inline("survive", &registry, &dockerfile));
    eventually("the RUN step runs", BUILD, || async {
        std::process::Command::new("pgrep")
            .args(["-f", "kubelet-marker"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    })
    .await;
    let kubelets = std::process::Command::new("pgrep")
        .args([
            "-f",
            "kubelet --config=.*--hostname-override=tripod-linux-amd64",
        ])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&kubelets.stdout).to_string();
    assert!(!pids.trim().is_empty(), "no kubelet found");
    for pid in pids.split_whitespace() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status();
    }
    let (ok, out) = env.wait_for("condition=Ready", "ib/survive", "300s");
    let ib = env.builds().get("survive").await.expect("get");
    assert!(ok, "{out}\n{:#?}", ib.status);
    let status = ib.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Succeeded));
    // Reported once: one Succeeded Event, not repeated.
    common::assert_reported_once(&env, "survive").await;
    // The kubelet runs again (a new process).
    let again = std::process::Command::new("pgrep")
        .args([
            "-f",
            "kubelet --config=.*--hostname-override=tripod-linux-amd64",
        ])
        .output()
        .expect("pgrep");
    let again = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(!again.trim().is_empty() && again != pids, "{again}");
    env.cleanup().await;
}
