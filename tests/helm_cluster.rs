//! The chart, installed with `helm install` as the README says, running as
//! Pods on the real node (kubelet, containerd, runc) of the environment
//! `tripod-dev serve --for-tests --no-crds` runs: kube-proxy routes the
//! `kubernetes` Service and the chart's Service, CoreDNS resolves
//! `tripod.tripod-system.svc`, the controller and buildd images are the
//! Dockerfile's targets pushed to the environment's registry. Then what an
//! operator does on day 2: upgrade to a new controller image while a build
//! runs, lose the leader Pod mid-build, evict under the PodDisruptionBudget,
//! upgrade with a changed CRD, uninstall.

#[allow(dead_code)]
#[path = "e2e/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestEnv, assert_reported_once, eventually, real_node_build};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tripod::api::{ImageBuild, Phase};
use tripod_harness::chart::{ChartValues, Helm, RELEASE, RELEASE_NAMESPACE};

const WAIT: Duration = Duration::from_secs(180);
const NS: &str = RELEASE_NAMESPACE;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// crane, built once from its Go module (`testenv/crane.sh`).
fn crane() -> PathBuf {
    let out = tripod_harness::scripts::script(&repo_root(), "crane.sh", &[]).expect("crane.sh");
    PathBuf::from(out.trim())
}

fn crane_run(args: &[&str]) -> String {
    let out = Command::new(crane())
        .args(args)
        .arg("--insecure")
        .output()
        .expect("run crane");
    assert!(
        out.status.success(),
        "crane {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn install_args(
    chart: &Path,
    controller_image: &str,
    info: &tripod_harness::env::EnvInfo,
    build_namespace: &str,
) -> Vec<String> {
    tripod_harness::chart::install_args(
        chart,
        &ChartValues {
            info,
            controller_image,
            tainted: true,
            build_namespaces: &[build_namespace],
        },
    )
}

/// The controller Pods of the release.
async fn controller_pods(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=tripod"))
        .await
        .expect("list controller pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The leader: the holder of the Lease, and the address in the Service's
/// EndpointSlice, once they agree.
async fn leader(client: &Client) -> Pod {
    leader_other_than(client, None).await
}

/// [`leader`], once it is not the Pod `not`.
async fn leader_other_than(client: &Client, not: Option<&str>) -> Pod {
    eventually("a leader that published its endpoint", WAIT, || async {
        let holder = Api::<Lease>::namespaced(client.clone(), NS)
            .get("tripod-controller")
            .await
            .ok()?
            .spec?
            .holder_identity?;
        if not == Some(holder.as_str()) {
            return None;
        }
        let pod = Api::<Pod>::namespaced(client.clone(), NS)
            .get(&holder)
            .await
            .ok()?;
        let ip = pod.status.as_ref()?.pod_ip.clone()?;
        let slice = Api::<EndpointSlice>::namespaced(client.clone(), NS)
            .get("tripod-leader")
            .await
            .ok()?;
        let addresses: Vec<String> = slice
            .endpoints?
            .into_iter()
            .flat_map(|e| e.addresses)
            .collect();
        (addresses == vec![ip]).then_some(pod)
    })
    .await
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP")
}

async fn wait_phase(env: &TestEnv, name: &str, phase: Phase) -> ImageBuild {
    eventually(&format!("ImageBuild {name} {phase:?}"), WAIT, || async {
        let ib = env.builds().get(name).await.ok()?;
        let now = ib.status.as_ref()?.phase?;
        assert!(
            now == phase || !now.is_finished(),
            "{name} ended {now:?}: {:?}",
            ib.status
        );
        (now == phase).then_some(ib)
    })
    .await
}

/// The build Pod of `name` once its buildd container runs.
async fn running_build_pod(env: &TestEnv, name: &str) -> Pod {
    eventually(&format!("{name}'s build Pod running"), WAIT, || async {
        env.pods_of(name).await.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|ph| ph == "Running")
        })
    })
    .await
}

/// One Pod, attempt 1, and one Succeeded Event: the build ended exactly once.
async fn ended_once(env: &TestEnv, name: &str) -> String {
    let ib = wait_phase(env, name, Phase::Succeeded).await;
    assert_reported_once(env, name).await;
    let pods = env.pods_of(name).await;
    assert_eq!(
        pods.len(),
        1,
        "{name}: {:?}",
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    let status = ib.status.expect("status");
    assert!(
        status.platforms.iter().all(|p| p.attempts == 1),
        "{name} was retried: {:?}",
        status.platforms
    );
    status.image.expect("image").digest
}

/// A build that runs until the test opens its gate: its RUN step polls
/// `http://<node address>:<port>/<name>` (the test's gate server).
fn gated(name: &str, gate: &std::net::SocketAddr) -> String {
    format!(
        "FROM BASE\nCOPY hello.txt /\nRUN until wget -q -O /dev/null http://{gate}/{name}; do sleep 1; done; cp /hello.txt /gated.txt\n"
    )
}

/// Answers 200 on `/<name>` once `name` is in `open`, 404 before.
async fn gate_server(
    ip: &str,
    open: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let open = open.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                let is_open = open
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|name| path == format!("/{name}"));
                let status = if is_open { "200 OK" } else { "404 Not Found" };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_an_operator_that_builds_upgrades_and_uninstalls() {
    common::serve_args(&["--no-crds"]);
    let env = TestEnv::with_builds("helm").await;
    let info = env.shared.info.clone();
    let client = env.client.clone();
    let registry = info.registry.clone();
    let controller_image = info
        .controller_image
        .clone()
        .expect("images.sh pushed a controller image");
    let helm =
        Helm::ensure(&repo_root(), &info.kubeconfig, &env.shared.dir.join("helm")).expect("helm");
    let chart = repo_root().join("charts/tripod");

    // --- helm install, as the README says ---------------------------------
    let installed_at = Instant::now();
    helm.run(&install_args(&chart, &controller_image, &info, &env.ns))
        .unwrap_or_else(|e| panic!("{e}"));
    let install_seconds = installed_at.elapsed().as_secs_f64();
    let pods = controller_pods(&client).await;
    assert_eq!(pods.len(), 2, "two replicas");
    for p in &pods {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(info.node_name.as_str()));
        assert_eq!(spec.service_account_name.as_deref(), Some("tripod"));
        let status = p.status.as_ref().unwrap();
        let c = &status.container_statuses.as_ref().unwrap()[0];
        assert!(c.ready, "{} not ready: {c:?}", p.name_any());
        assert_eq!(c.restart_count, 0, "{} restarted", p.name_any());
        assert_eq!(c.image, controller_image);
    }
    // The Deployment meets `restricted` (the seccomp DaemonSet, a hostPath,
    // is why the namespace itself is not).
    let (_, warnings) = env.kubectl(
        &[
            "label",
            "--dry-run=server",
            "--overwrite",
            &format!("namespace/{NS}"),
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    );
    for p in &pods {
        assert!(
            !warnings.contains(&p.name_any()),
            "{} violates restricted: {warnings}",
            p.name_any()
        );
    }
    // One leader, published as the Service's endpoint; the standby is Ready
    // too and says it does not lead.
    let lead = leader(&client).await;
    for p in &pods {
        let ip = pod_ip(p);
        let (code, _) = common::http_get_at(&ip, 8080, "/readyz")
            .await
            .expect("readyz");
        assert_eq!(code, 200, "{} not ready", p.name_any());
        let (_, metrics) = common::http_get_at(&ip, 8080, "/metrics")
            .await
            .expect("metrics");
        let leads = p.name_any() == lead.name_any();
        let want = if leads {
            "tripod_leader 1"
        } else {
            "tripod_leader 0"
        };
        assert!(
            metrics.lines().any(|l| l == want),
            "{}: {metrics}",
            p.name_any()
        );
    }

    // --- the first build, through the in-cluster controller --------------
    env.apply(&real_node_build(
        "first",
        &registry,
        "FROM BASE\nCOPY hello.txt /\n",
        "",
    ));
    let digest = ended_once(&env, "first").await;
    let first_digest_seconds = installed_at.elapsed().as_secs_f64();
    assert_eq!(
        crane_run(&["digest", &format!("{registry}/team/first:1")]),
        digest,
        "the registry serves the status's digest"
    );
    // The agent dialled the chart's Service by its DNS name.
    let pod = &env.pods_of("first").await[0];
    let agent = &pod.spec.as_ref().unwrap().containers[0];
    let args = format!("{:?} {:?}", agent.args, agent.env);
    assert!(args.contains("tripod.tripod-system.svc:9443"), "{args}");
    eprintln!(
        "helm install → controller available: {install_seconds:.1}s; → first verified digest: {first_digest_seconds:.1}s"
    );

    // --- Flux applies an ImageBuild and reports its health -----------------
    flux_reads_imagebuild_health(&env, &registry).await;

    // --- helm upgrade to a new controller image while a build runs ---------
    let (repo, _) = tripod_harness::chart::split_image(&controller_image);
    let upgraded_image = format!("{repo}:upgraded");
    crane_run(&[
        "mutate",
        &controller_image,
        "--label",
        "dev.tripod.test/upgrade=1",
        "-t",
        &upgraded_image,
    ]);
    let gates = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let gate = gate_server(&info.node_ip, gates.clone()).await;
    env.apply(&real_node_build(
        "during-upgrade",
        &registry,
        &gated("during-upgrade", &gate),
        "",
    ));
    running_build_pod(&env, "during-upgrade").await;
    helm.run(&install_args(&chart, &upgraded_image, &info, &env.ns))
        .unwrap_or_else(|e| panic!("{e}"));
    // Every replica was replaced while the build waited at its gate.
    let phase = env
        .builds()
        .get("during-upgrade")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase, Some(Phase::Building));
    gates.lock().unwrap().push("during-upgrade".to_string());
    ended_once(&env, "during-upgrade").await;
    let pods = eventually("only upgraded replicas", WAIT, || async {
        let pods = controller_pods(&client).await;
        (pods.len() == 2
            && pods.iter().all(|p| {
                p.spec.as_ref().unwrap().containers[0].image.as_deref()
                    == Some(upgraded_image.as_str())
            }))
        .then_some(pods)
    })
    .await;
    let lead = leader(&client).await;
    assert!(pods.iter().any(|p| p.name_any() == lead.name_any()));

    // --- the leader Pod deleted mid-build ----------------------------------
    env.apply(&real_node_build(
        "leader-lost",
        &registry,
        &gated("leader-lost", &gate),
        "",
    ));
    running_build_pod(&env, "leader-lost").await;
    let (ok, out) = env.kubectl(
        &["-n", NS, "delete", "pod", &lead.name_any(), "--wait=false"],
        None,
    );
    assert!(ok, "{out}");
    // Another replica leads and publishes itself while the build waits.
    leader_other_than(&client, Some(&lead.name_any())).await;
    gates.lock().unwrap().push("leader-lost".to_string());
    ended_once(&env, "leader-lost").await;

    // --- evictions under the PodDisruptionBudget ---------------------------
    eventually("two Ready replicas again", WAIT, || async {
        let d = Api::<Deployment>::namespaced(client.clone(), NS)
            .get("tripod")
            .await
            .ok()?;
        (d.status?.ready_replicas == Some(2)).then_some(())
    })
    .await;
    eventually("the PDB allows one disruption", WAIT, || async {
        let (_, out) = env.kubectl(
            &[
                "-n",
                NS,
                "get",
                "pdb",
                "tripod",
                "-o",
                "jsonpath={.status.disruptionsAllowed}",
            ],
            None,
        );
        (out.trim() == "1").then_some(())
    })
    .await;
    // The node is cordoned: an evicted replica's replacement cannot start,
    // so the second eviction meets the budget whatever the timing.
    let (ok, out) = env.kubectl(&["cordon", &info.node_name], None);
    assert!(ok, "{out}");
    let pods = controller_pods(&client).await;
    let evict = |pod: &str| {
        let body = format!(
            r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{pod}","namespace":"{NS}"}}}}"#
        );
        env.kubectl(
            &[
                "create",
                "--raw",
                &format!("/api/v1/namespaces/{NS}/pods/{pod}/eviction"),
                "-f",
                "-",
            ],
            Some(&body),
        )
    };
    let first = evict(&pods[0].name_any());
    assert!(first.0, "the first eviction is allowed: {first:?}");
    let second = evict(&pods[1].name_any());
    assert!(
        !second.0 && second.1.contains("disruption budget"),
        "the second eviction must wait for a Ready replacement: {second:?}"
    );
    let (ok, out) = env.kubectl(&["uncordon", &info.node_name], None);
    assert!(ok, "{out}");
    leader(&client).await;

    // --- helm upgrade that changes a CRD ----------------------------------
    let changed = env.shared.dir.join("chart-crd-changed");
    tripod_harness::chart::copy_dir(&chart, &changed).unwrap();
    let crds = changed.join("templates/crds.yaml");
    let text = std::fs::read_to_string(&crds).unwrap();
    const PRINTER: &str = "description: Platforms being built\n";
    assert!(
        text.contains(PRINTER),
        "the printer column to change is gone"
    );
    std::fs::write(
        &crds,
        text.replacen(
            PRINTER,
            "description: Platforms being built (changed by an upgrade)\n",
            1,
        ),
    )
    .unwrap();
    helm.run(&install_args(&changed, &upgraded_image, &info, &env.ns))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, crd) = env.kubectl(
        &["get", "crd", "imagebuilds.build.tripod.dev", "-o", "yaml"],
        None,
    );
    assert!(crd.contains("changed by an upgrade"), "{crd}");
    // Existing ImageBuilds keep working: a new generation of `first` builds.
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "ib/first",
            "--type=merge",
            "-p",
            r#"{"spec":{"buildArgs":[{"name":"AFTER","value":"crd-upgrade"}]}}"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    eventually("first rebuilt after the CRD upgrade", WAIT, || async {
        let ib = env.builds().get("first").await.ok()?;
        let s = ib.status?;
        (s.phase == Some(Phase::Succeeded) && s.observed_generation == ib.metadata.generation)
            .then_some(())
    })
    .await;

    // --- the chart's probes and resources, after all that ------------------
    // No replica was restarted by its liveness probe, and each stays within
    // the memory the chart requests for it (128Mi; the limit is 512Mi), as
    // the kubelet measures it.
    for p in controller_pods(&client).await {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.clone());
        let c = &statuses.expect("container statuses")[0];
        assert_eq!(c.restart_count, 0, "{} restarted: {c:?}", p.name_any());
    }
    let (ok, summary) = env.kubectl(
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{}/proxy/stats/summary", info.node_name),
        ],
        None,
    );
    assert!(ok, "{summary}");
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let mut measured = 0;
    for pod in summary["pods"].as_array().unwrap() {
        let name = pod["podRef"]["name"].as_str().unwrap_or_default();
        if pod["podRef"]["namespace"] != NS || name.starts_with("tripod-seccomp") {
            continue;
        }
        for c in pod["containers"].as_array().into_iter().flatten() {
            let bytes = c["memory"]["workingSetBytes"].as_u64().unwrap_or(0);
            eprintln!("{name}/{}: working set {} MiB", c["name"], bytes >> 20);
            assert!(bytes > 0 && bytes < 128 << 20, "{name}: {bytes} bytes");
            measured += 1;
        }
    }
    assert!(
        measured >= 2,
        "no controller container in the kubelet's summary"
    );

    // --- helm uninstall ---------------------------------------------------
    helm.run(&[
        "uninstall".into(),
        RELEASE.into(),
        "--namespace".into(),
        NS.into(),
        "--wait".into(),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    eventually("no Pods left in the release namespace", WAIT, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .ok()?;
        pods.items.is_empty().then_some(())
    })
    .await;
    eventually(
        "the leader's EndpointSlice went with its Pod",
        WAIT,
        || async {
            Api::<EndpointSlice>::namespaced(client.clone(), NS)
                .get_opt("tripod-leader")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    // What docs/security.md says stays: the controller's own Secrets.
    let mut secrets: Vec<String> = Api::<Secret>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    secrets.sort();
    assert_eq!(secrets, ["tripod-executor-tls", "tripod-token-key"]);
    // ImageBuilds and their images stay.
    let builds = env.builds().list(&ListParams::default()).await.unwrap();
    assert_eq!(builds.items.len(), 3);
    for ib in &builds.items {
        let d = ib
            .status
            .as_ref()
            .and_then(|s| s.image.as_ref())
            .expect("image");
        assert_eq!(
            crane_run(&["digest", &format!("{registry}/team/{}:1", ib.name_any())]),
            d.digest
        );
    }
    env.cleanup().await;
}

/// `charts/tripod/health/flux-healthcheckexprs.yaml`, indented under
/// `spec.healthCheckExprs`.
fn health_check_exprs() -> String {
    let text = std::fs::read_to_string(
        repo_root().join("charts/tripod/health/flux-healthcheckexprs.yaml"),
    )
    .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("    {l}\n"))
        .collect()
}

/// A process killed when the test ends (however it ends).
struct Killed(std::process::Child);

impl Killed {
    /// Panics, quoting the log's end, when the process has exited.
    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.0.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            panic!("{} exited ({status}): {tail:#?}", log.display());
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `body()` to every GET on loopback (an artifact server, as
/// source-controller would be); returns the port.
async fn serve_artifact(body: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    port
}

/// A gzipped tarball holding `files`, and its sha256 digest.
fn tarball(dir: &Path, files: &[(&str, &str)]) -> (Vec<u8>, String) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let out = Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "-czf",
            "-",
            "-C",
        ])
        .arg(dir)
        .arg(".")
        .output()
        .expect("tar");
    assert!(out.status.success());
    let digest = tripod::index::digest_of(&out.stdout);
    (out.stdout, digest)
}

/// Points the ExternalArtifact at the tarball now served.
fn publish_artifact(env: &TestEnv, port: u16, digest: &str, size: usize) {
    let revision = format!("latest@{digest}");
    let patch = serde_json::json!({"status": {"artifact": {
        "path": "tripod/examples.tar.gz",
        "url": format!("http://127.0.0.1:{port}/examples.tar.gz"),
        "revision": revision,
        "digest": digest,
        "size": size,
        "lastUpdateTime": jiff::Timestamp::now().to_string(),
    }}});
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "externalartifact/tripod-examples",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        None,
    );
    assert!(ok, "{out}");
}

/// The Kustomization's Ready condition: (status, reason, message).
fn kustomization_ready(env: &TestEnv) -> Option<(String, String, String)> {
    let (ok, out) = env.kubectl(
        &["get", "kustomization/tripod-examples", "-o", "json"],
        None,
    );
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let c = v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

/// Flux's kustomize-controller (built from its Go module, `testenv/flux.sh`)
/// applies an ImageBuild from an artifact and waits for it with its own
/// health checks (kstatus on Tripod's conditions): Ready once the build
/// succeeded; not Ready, naming the ImageBuild, when a new revision's build
/// fails.
async fn flux_reads_imagebuild_health(env: &TestEnv, registry: &str) {
    let flux = PathBuf::from(
        tripod_harness::scripts::script(&repo_root(), "flux.sh", &[])
            .expect("flux.sh")
            .trim(),
    );
    let (ok, out) = env.kubectl(
        &[
            "apply",
            "--server-side",
            "-f",
            &flux.join("crds").display().to_string(),
        ],
        None,
    );
    assert!(ok, "{out}");
    for crd in [
        "kustomizations.kustomize.toolkit.fluxcd.io",
        "externalartifacts.source.toolkit.fluxcd.io",
    ] {
        let (ok, out) = env.wait_for("condition=Established", &format!("crd/{crd}"), "60s");
        assert!(ok, "{out}");
    }
    let log = env.shared.dir.join("kustomize-controller.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = tripod_harness::process::supervised_command(flux.join("kustomize-controller"));
    cmd.args([
        "--feature-gates=ExternalArtifact=true",
        "--watch-all-namespaces=true",
        "--enable-leader-election=false",
        "--no-remote-bases=true",
        &format!("--metrics-addr=127.0.0.1:{}", common::free_port()),
        &format!("--health-addr=127.0.0.1:{}", common::free_port()),
        "--log-level=info",
    ])
    .env("KUBECONFIG", &env.shared.kubeconfig)
    .stdout(out.try_clone().unwrap())
    .stderr(out)
    .stdin(std::process::Stdio::null());
    let mut controller =
        Killed(tripod_harness::process::spawn_supervised(cmd).expect("start kustomize-controller"));

    let body = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = serve_artifact(body.clone()).await;
    let dir = env.shared.dir.join("flux-artifact");
    let manifest = real_node_build("flux", registry, "FROM BASE\nCOPY hello.txt /\n", "");
    let (tgz, digest) = tarball(&dir, &[("imagebuild.yaml", &manifest)]);
    let size = tgz.len();
    *body.lock().unwrap() = tgz;
    env.apply(
        "apiVersion: source.toolkit.fluxcd.io/v1\nkind: ExternalArtifact\nmetadata:\n  name: tripod-examples\nspec: {}\n",
    );
    publish_artifact(env, port, &digest, size);
    env.apply(&format!(
        "apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: tripod-examples
spec:
  interval: 10s
  retryInterval: 5s
  path: ./
  prune: true
  wait: true
  timeout: 2m
  targetNamespace: {ns}
  sourceRef:
    kind: ExternalArtifact
    name: tripod-examples
  healthCheckExprs:
{exprs}",
        ns = env.ns,
        exprs = health_check_exprs(),
    ));
    let ready = eventually("Flux reports the Kustomization Ready", WAIT, || {
        controller.assert_running(&log);
        async { kustomization_ready(env).filter(|(status, _, _)| status == "True") }
    })
    .await;
    // Flux waited for the build: by the time it says Ready, the digest is in.
    let ib = env.builds().get("flux").await.unwrap();
    let status = ib.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Succeeded), "{ready:?}");
    let pinned = status.image.expect("image");
    assert_eq!(
        crane_run(&["digest", &format!("{registry}/team/flux:1")]),
        pinned.digest
    );
    assert!(ready.2.contains(&digest), "{ready:?}");

    // A new revision whose build fails: Flux says so, naming the ImageBuild.
    let failing = real_node_build(
        "flux",
        registry,
        "FROM BASE\nRUN exit 3\n",
        "  retries: 0\n",
    );
    let (tgz, digest2) = tarball(&dir, &[("imagebuild.yaml", &failing)]);
    let size = tgz.len();
    *body.lock().unwrap() = tgz;
    publish_artifact(env, port, &digest2, size);
    let (_, reason, message) = eventually("Flux reports the failed build", WAIT, || {
        controller.assert_running(&log);
        async {
            kustomization_ready(env)
                .filter(|(status, _, message)| status == "False" && message.contains("ImageBuild"))
        }
    })
    .await;
    assert!(
        message.contains("flux") && reason == "HealthCheckFailed",
        "{reason}: {message}"
    );
    // Deleting the Kustomization (`prune: true`) deletes what it applied.
    let (ok, out) = env.kubectl(
        &["delete", "kustomization/tripod-examples", "--wait=true"],
        None,
    );
    assert!(ok, "{out}");
    eventually("Flux pruned its ImageBuild", WAIT, || async {
        env.builds()
            .get_opt("flux")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}
