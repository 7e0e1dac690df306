//! Build Pods on the real node (kubelet, containerd, runc), as a user sees
//! them: the default security settings under Pod Security `baseline`,
//! `kubectl logs` and `kubectl exec`, a kubelet that dies mid-build. And the
//! simulated nodes: kwok's nodes are scheduled to, nothing runs there.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::ResourceExt;
use sha2::Digest;
use tripod::api::Phase;

use crate::common::{TestEnv, eventually};

const BUILD: Duration = Duration::from_secs(300);

fn inline(name: &str, registry: &str, dockerfile: &str) -> String {
    crate::common::real_node_build(name, registry, dockerfile, "")
}

/// A Debian package built here with dpkg-deb: `/usr/bin/tripod-greet`.
fn make_deb(dir: &Path) -> PathBuf {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: tripod-greet\nVersion: 1.0\nArchitecture: all\nMaintainer: Tripod <dev@tripod.invalid>\nDescription: says hello\n",
    )
    .unwrap();
    let bin = root.join("usr/bin/tripod-greet");
    std::fs::write(&bin, "#!/bin/sh\necho installed-by-apt\n").unwrap();
    std::process::Command::new("chmod")
        .args(["0755"])
        .arg(&bin)
        .status()
        .unwrap();
    let deb = dir.join("repo/tripod-greet_1.0_all.deb");
    std::fs::create_dir_all(deb.parent().unwrap()).unwrap();
    let out = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

/// A flat apt repository (`deb [trusted=yes] http://…/ ./`) holding `deb`.
fn make_repo(deb: &Path) -> PathBuf {
    let repo = deb.parent().unwrap().to_path_buf();
    let bytes = std::fs::read(deb).unwrap();
    let sha = |b: &[u8]| {
        sha2::Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let packages = format!(
        "Package: tripod-greet\nVersion: 1.0\nArchitecture: all\nMaintainer: Tripod <dev@tripod.invalid>\nFilename: ./{}\nSize: {}\nSHA256: {}\nDescription: says hello\n\n",
        deb.file_name().unwrap().to_string_lossy(),
        bytes.len(),
        sha(&bytes)
    );
    std::fs::write(repo.join("Packages"), &packages).unwrap();
    let release = format!(
        "Origin: tripod-tests\nLabel: tripod-tests\nDate: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {} {} Packages\n",
        sha(packages.as_bytes()),
        packages.len()
    );
    std::fs::write(repo.join("Release"), release).unwrap();
    repo
}

/// Serves the files of `root` over HTTP/1.0 on `host` (where build Pods
/// reach it); 404 for anything else.
fn file_server(host: &str, root: PathBuf) -> u16 {
    let listener = std::net::TcpListener::bind((host, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
            let name = path.trim_start_matches('/').trim_start_matches("./");
            let file = root.join(name);
            let reply = match (name.contains(".."), std::fs::read(&file)) {
                (false, Ok(body)) if file.is_file() => {
                    let mut r =
                        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .into_bytes();
                    if !req.starts_with("HEAD") {
                        r.extend(body);
                    }
                    r
                }
                _ => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            let _ = s.write_all(&reply);
        }
    });
    port
}

/// The default build Pod (buildd as root with the runtime's default
/// capabilities and the Localhost seccomp profile) builds a Dockerfile with
/// RUN steps on the debootstrap Debian base, `apt-get install` included, in
/// a namespace that enforces Pod Security `baseline`. The agent (uid 65532)
/// and buildd (uid 0) share their TLS material to get there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_build_pod_runs_apt_get_under_pod_security_baseline() {
    // with_builds: the namespace enforces Pod Security `baseline`.
    let mut env = TestEnv::with_builds("node-apt").await;
    let (ok, out) = env.kubectl(
        &[
            "get",
            "namespace",
            &env.ns,
            "-o",
            "jsonpath={.metadata.labels}",
        ],
        None,
    );
    assert!(
        ok && out.contains(r#""pod-security.kubernetes.io/enforce":"baseline""#),
        "{out}"
    );
    let registry = env.shared.registry.clone().expect("registry");
    let debian = env
        .shared
        .info
        .debian_image
        .clone()
        .expect("the Debian base image (testenv/images.sh)");
    let node_ip = env.shared.info.node_ip.clone();
    let dir = env.shared.dir.join(format!("{}-apt", env.ns));
    let deb = make_deb(&dir);
    let port = file_server(&node_ip, make_repo(&deb));
    env.start_controller("c1");
    let dockerfile = [
        format!("FROM {debian}"),
        format!(
            "RUN rm -f /etc/apt/sources.list.d/* && echo 'deb [trusted=yes] http://{node_ip}:{port}/ ./' > /etc/apt/sources.list && apt-get update && apt-get install -y --no-install-recommends tripod-greet && tripod-greet > /greeting"
        ),
        "RUN test \"$(cat /greeting)\" = installed-by-apt".to_string(),
    ]
    .join("\n");
    env.apply(&inline("apt", &registry, &dockerfile));
    let (ok, out) = env.wait_for("condition=Ready", "ib/apt", "300s");
    let ib = env.builds().get("apt").await.expect("get");
    assert!(ok, "{out}\n{:#?}", ib.status);
    let status = ib.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Succeeded));
    // The Pod ran on the real node with the default security settings.
    let pods = env.pods_of("apt").await;
    let spec = pods[0].spec.clone().expect("spec");
    assert_eq!(spec.node_name.as_deref(), Some("tripod-linux-amd64"));
    let buildd = &spec.init_containers.expect("sidecar")[0];
    let sc = buildd.security_context.clone().expect("securityContext");
    assert_eq!(sc.capabilities, None);
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(
        sc.seccomp_profile
            .and_then(|p| p.localhost_profile)
            .as_deref(),
        Some("tripod/buildd.json")
    );
    // The registry serves the digest the status names.
    let digest = status.image.expect("image").digest;
    let (code, head, _) = tripod_harness::http_request(
        &registry,
        "HEAD",
        "/v2/team/apt/manifests/1",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    )
    .expect("registry");
    assert_eq!(code, 200, "{head}");
    assert!(head.to_lowercase().contains(&digest), "{head}");
    env.cleanup().await;
}

/// `kubectl logs` shows buildah's output and `kubectl exec` reaches buildd,
/// while a build runs; its result is reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_and_exec_reach_a_running_build_pod() {
    let mut env = TestEnv::with_builds("node-logs").await;
    let registry = env.shared.registry.clone().expect("registry");
    let busybox = env.shared.info.busybox_image.clone();
    env.start_controller("c1");
    let dockerfile =
        format!("FROM {busybox}\nRUN echo logs-marker-start && sleep 20 && echo logs-marker-end\n");
    env.apply(&inline("logs", &registry, &dockerfile));
    let pod = eventually("the build Pod runs its RUN step", BUILD, || async {
        let pods = env.pods_of("logs").await;
        let name = pods.first()?.name_any();
        let (ok, out) = env.kubectl(&["logs", &name, "-c", "agent"], None);
        // The RUN step's own output, not just the step's title.
        (ok && out.lines().any(|l| l.trim() == "logs-marker-start")).then_some(name)
    })
    .await;
    let (ok, out) = env.kubectl(&["logs", &pod, "-c", "agent"], None);
    assert!(ok && out.contains(": RUN echo logs-marker-start"), "{out}");
    let (ok, out) = env.kubectl(
        &["exec", &pod, "-c", "buildd", "--", "buildah", "--version"],
        None,
    );
    assert!(ok && out.contains("buildah version"), "{out}");
    let (ok, out) = env.kubectl(&["exec", &pod, "-c", "buildd", "--", "id", "-u"], None);
    assert!(ok && out.trim() == "0", "{out}");
    // The rest of the RUN step's output follows as it comes.
    eventually("the end of the RUN step in the log", BUILD, || async {
        let (ok, out) = env.kubectl(&["logs", &pod, "-c", "agent"], None);
        (ok && out.lines().any(|l| l.trim() == "logs-marker-end")).then_some(())
    })
    .await;
    let (ok, out) = env.wait_for("condition=Ready", "ib/logs", "240s");
    assert!(ok, "{out}");
    crate::common::assert_reported_once(&env, "logs").await;
    env.cleanup().await;
}

/// The alternative to the seccomp profile, for nodes without it: a user
/// namespace for the Pod (`hostUsers: false`, runc ≥ 1.2) and CAP_SYS_ADMIN
/// for buildd, which then holds only inside that namespace. Root in the
/// build is an unprivileged user on the node: the RUN step sees a uid map
/// that does not start at the node's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespaced_build_pod_with_sys_admin_builds_too() {
    // SYS_ADMIN needs Pod Security `privileged`: an unlabelled namespace.
    let mut env = TestEnv::new("node-userns").await;
    let registry = env.shared.registry.clone().expect("registry");
    let busybox = env.shared.info.busybox_image.clone();
    let port = crate::common::free_port();
    env.start_controller_with(
        "c1",
        port,
        &[
            "--build-pod-user-namespace",
            "--buildd-security-context",
            r#"{"runAsUser":0,"capabilities":{"add":["SYS_ADMIN"]}}"#,
        ],
    );
    let dockerfile = format!("FROM {busybox}\nRUN echo uidmap: $(cat /proc/self/uid_map)\n");
    env.apply(&inline("userns", &registry, &dockerfile));
    let (ok, out) = env.wait_for("condition=Ready", "ib/userns", "300s");
    let ib = env.builds().get("userns").await.expect("get");
    assert!(ok, "{out}\n{:#?}", ib.status);
    let pods = env.pods_of("userns").await;
    let pod = &pods[0];
    assert_eq!(pod.spec.as_ref().and_then(|s| s.host_users), Some(false));
    let (ok, log) = env.kubectl(&["logs", &pod.name_any(), "-c", "agent"], None);
    assert!(ok, "{log}");
    let map = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("uidmap: "))
        .unwrap_or_else(|| panic!("no uid map in the log:\n{log}"));
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"0"), "{map}");
    assert_ne!(
        fields.get(1),
        Some(&"0"),
        "root in the Pod is root on the node: {map}"
    );
    env.cleanup().await;
}
