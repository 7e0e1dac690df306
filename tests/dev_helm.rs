//! `tripod dev up --helm`: the local cluster with the chart installed (the
//! controller as Pods on the real node) instead of a controller process,
//! and the example built through it.

use std::process::Command;

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn tripod(args: &[&str]) -> (bool, String) {
    run(env!("CARGO_BIN_EXE_tripod"), args)
}

/// Stops the environment even when an assertion fails (it runs detached).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = tripod(&["dev", "down", "--dir", &self.0, "--purge"]);
    }
}

#[test]
fn dev_up_helm_runs_the_chart_and_builds_through_it() {
    let dir = std::env::temp_dir().join(format!("tripod-dev-helm-{}", std::process::id()));
    let dir_s = dir.display().to_string();
    let _down = Down(dir_s.clone());
    let (ok, up) = tripod(&["dev", "up", "--helm", "--dir", &dir_s]);
    assert!(ok, "{up}");
    assert!(up.contains("helm install tripod"), "{up}");
    assert!(up.contains("Installed in"), "{up}");
    let source = format!(". {dir_s}/env && ");
    // The controller runs as the chart's Deployment on the real node.
    let (ok, out) = run(
        "bash",
        &[
            "-c",
            &format!(
                "{source}kubectl -n tripod-system get deploy tripod -o jsonpath='{{.status.readyReplicas}}' && echo && \
                 kubectl -n tripod-system get pods -l app.kubernetes.io/name=tripod -o jsonpath='{{.items[*].spec.nodeName}}' && echo && \
                 kubectl -n tripod-system get pods -l app.kubernetes.io/name=tripod -o jsonpath='{{.items[*].metadata.name}}' && echo && \
                 kubectl -n tripod-system get lease tripod-controller -o jsonpath='{{.spec.holderIdentity}}'"
            ),
        ],
    );
    assert!(ok, "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "{out}");
    assert_eq!(
        lines.next(),
        Some("tripod-linux-amd64 tripod-linux-amd64"),
        "{out}"
    );
    // One of those Pods leads: no controller process of the host's.
    let pods: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
    let holder = lines.next().unwrap_or_default();
    assert!(pods.contains(&holder), "{out}");
    // The example went through it: the registry answers the status's digest.
    let digest = up
        .lines()
        .find_map(|l| l.trim().strip_prefix("digest:"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| panic!("no digest in:\n{up}"));
    let (ok, registry) = run("bash", &["-c", &format!("{source}echo $TRIPOD_REGISTRY")]);
    assert!(ok, "{registry}");
    let registry = registry.trim().to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let confirmed = rt
        .block_on(
            tripod::registry::RegistryClient::new(vec![registry.clone()])
                .resolve(&format!("{registry}/examples/hello:latest"), None),
        )
        .expect("registry answers");
    assert_eq!(digest, confirmed);
    let (ok, out) = tripod(&["dev", "down", "--dir", &dir_s, "--purge"]);
    assert!(ok, "{out}");
}
