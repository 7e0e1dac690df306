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

#[test]
fn dev_up_writes_a_usable_env_and_down_stops_everything() {
    let dir = std::env::temp_dir().join(format!("tripod-dev-test-{}", std::process::id()));
    let dir_s = dir.display().to_string();
    let (ok, out) = tripod(&["dev", "up", "--dir", &dir_s]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("source {dir_s}/env")), "{out}");

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
    // The controller runs: an ImageBuild gets a status.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello.yaml");
    let (ok, out) = sh(&format!(
        ". {dir_s}/env && kubectl apply -f {} && kubectl wait --for=condition=Reconciling --timeout=60s ib/hello",
        example.display()
    ));
    assert!(ok, "{out}");

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
    // Nothing of this environment is left running.
    let (_, ps) = sh(&format!(
        "ps -eo args | grep -F '{dir_s}' | grep -v grep || true"
    ));
    assert!(ps.trim().is_empty(), "left running:\n{ps}");
    assert!(!dir.exists());
}
