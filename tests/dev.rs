//! `tripod dev up` / `tripod dev down` as a user runs them.

use std::process::Command;

fn tripod(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tripod"))
        .args(args)
        .output()
        .expect("run tripod");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sh(script: &str) -> (bool, String) {
    let out = Command::new("bash")
        .args(["-c", script])
        .output()
        .expect("run bash");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Stops the environment even when an assertion fails (it runs detached).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = tripod(&["dev", "down", "--dir", &self.0, "--purge"]);
    }
}

#[test]
fn dev_up_writes_a_usable_env_and_down_stops_everything() {
    let dir = std::env::temp_dir().join(format!("tripod-dev-test-{}", std::process::id()));
    let dir_s = dir.display().to_string();
    let _down = Down(dir_s.clone());
    let (ok, up_out) = tripod(&["dev", "up", "--dir", &dir_s]);
    assert!(ok, "{up_out}");
    assert!(up_out.contains(&format!("source {dir_s}/env")), "{up_out}");

    let env = std::fs::read_to_string(dir.join("env")).expect("env file");
    assert!(env.contains("export KUBECONFIG="), "{env}");
    assert!(env.contains("export PATH="), "{env}");

    // The env file is all a user needs: kubectl finds the cluster, its
    // nodes and Tripod's resources.
    let (ok, out) = sh(&format!(
        ". {dir_s}/env && kubectl get nodes -o name && kubectl get crd imagebuilds.build.tripod.dev -o name"
    ));
    assert!(ok, "{out}");
    for node in [
        "tripod-linux-amd64",
        "tripod-linux-arm64",
        "tripod-windows-amd64",
    ] {
        assert!(out.contains(&format!("node/{node}")), "{out}");
    }
    // `up` showed the example's build Pod on the real node, and its log.
    assert!(
        up_out
            .lines()
            .any(|l| l.starts_with("hello-") && l.contains("tripod-linux-amd64")),
        "{up_out}"
    );
    assert!(up_out.contains("COPY hello.txt"), "{up_out}");
    // kubectl logs and exec reach the kubelet of the real node.
    let (ok, out) = sh(&format!(
        ". {dir_s}/env && kubectl get nodes tripod-linux-amd64 -o jsonpath='{{.status.nodeInfo.containerRuntimeVersion}}'"
    ));
    assert!(ok && out.starts_with("containerd://"), "{out}");
    // `up` built the example: its digest is what the registry answers.
    let digest = up_out
        .lines()
        .find_map(|l| l.trim().strip_prefix("digest:"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| panic!("no digest in:\n{up_out}"));
    let registry = env
        .lines()
        .find_map(|l| l.strip_prefix("export TRIPOD_REGISTRY="))
        .expect("TRIPOD_REGISTRY in env")
        .to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let confirmed = rt
        .block_on(
            tripod::registry::RegistryClient::new(vec![registry.clone()])
                .resolve(&format!("{registry}/examples/hello:latest"), None),
        )
        .expect("registry answers");
    assert_eq!(digest, confirmed);
    let (ok, out) = sh(&format!(
        ". {dir_s}/env && kubectl get ib hello -o jsonpath='{{.status.image.digest}}'"
    ));
    assert!(ok && out.trim() == confirmed, "{out}");

    // And the runner leg: a darwin image on the darwin test runner, a
    // linux/arm64 one on the emulating Linux runner, a windows/amd64 one
    // through its BuildKit; the registry answers the digest each status
    // holds.
    assert!(
        up_out.contains("darwin/arm64 built on runner dev-darwin"),
        "{up_out}"
    );
    assert!(
        up_out.contains("linux/arm64 built on runner dev-linux (emulated)"),
        "{up_out}"
    );
    assert!(
        up_out.contains("windows/amd64 built on runner dev-linux"),
        "{up_out}"
    );
    for name in ["hello-darwin", "hello-arm64", "hello-windows"] {
        let confirmed = rt
            .block_on(
                tripod::registry::RegistryClient::new(vec![registry.clone()])
                    .resolve(&format!("{registry}/examples/{name}:latest"), None),
            )
            .expect("registry answers");
        let (ok, out) = sh(&format!(
            ". {dir_s}/env && kubectl get ib {name} -o jsonpath='{{.status.image.digest}}'"
        ));
        assert!(ok && out.trim() == confirmed, "{name}: {out}");
    }
    let (ok, out) = sh(&format!(". {dir_s}/env && kubectl get buildrunners"));
    assert!(
        ok && out.contains("dev-linux") && out.contains("Online"),
        "{out}"
    );

    // `up` again is harmless.
    let (ok, out) = tripod(&["dev", "up", "--dir", &dir_s]);
    assert!(ok && out.contains("Already running"), "{out}");

    let pid: u32 = std::fs::read_to_string(dir.join("serve.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let (ok, out) = tripod(&["dev", "down", "--dir", &dir_s, "--purge"]);
    assert!(ok, "{out}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
    // Nothing of this environment is left running, mounted or routed.
    let (_, ps) = sh(&format!(
        "ps -eo args | grep -F -e '{dir_s}' -e /run/tripod-node | grep -v grep || true"
    ));
    assert!(ps.trim().is_empty(), "left running:\n{ps}");
    let (_, mounts) = sh(&format!(
        "grep -F -e '{dir_s}' -e /run/tripod-node /proc/self/mountinfo || true"
    ));
    assert!(mounts.trim().is_empty(), "left mounted:\n{mounts}");
    let (_, net) = sh(
        "ip link show tripod0 2>/dev/null; ip route | grep blackhole; iptables-save | grep -e tripod -e KUBE- -e CNI- || true",
    );
    assert!(net.trim().is_empty(), "left in the network:\n{net}");
    assert!(!dir.exists());
}
