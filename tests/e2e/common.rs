//! Shared harness of the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tripod::api::{ImageBuild, LABEL_NAME};
use tripod::testenv;

/// The control plane shared by every test of this binary.
pub struct Shared {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub dir: PathBuf,
    /// With the node runner on tripod-linux-amd64: a registry on loopback.
    pub registry: Option<String>,
    /// And one that requires `builder` / `s3cret` (htpasswd).
    pub auth_registry: Option<String>,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static BUILD_SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the control plane once, on a thread of its own that lives as long
/// as the test process (its children die with the process).
fn shared() -> &'static Shared {
    started(&SHARED, false)
}

/// A second control plane whose tripod-linux-amd64 node runs its Pods (the
/// node runner), with a registry: where builds really happen.
fn build_shared() -> &'static Shared {
    started(&BUILD_SHARED, true)
}

fn started(cell: &'static OnceLock<Result<Shared, String>>, builds: bool) -> &'static Shared {
    let res = cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match start(builds).await {
                        Ok((cp, shared)) => {
                            let _ = tx.send(Ok(shared));
                            // Keep the control plane (and the node keeper) alive.
                            let _keep = cp;
                            std::future::pending::<()>().await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| e.to_string())
            .and_then(|_| rx.recv().map_err(|e| e.to_string())?)
    });
    match res {
        Ok(s) => s,
        Err(e) => panic!("control plane failed to start: {e}"),
    }
}

async fn start(builds: bool) -> Result<(testenv::ControlPlane, Shared), String> {
    let bin_dir = testenv::ensure_binaries(&repo_root()).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!(
        "tripod-e2e{}-{}",
        if builds { "-builds" } else { "" },
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    let cp = testenv::ControlPlane::start(testenv::Options {
        dir: dir.clone(),
        bin_dir,
    })
    .await
    .map_err(|e| e.to_string())?;
    let client = cp.client().await.map_err(|e| e.to_string())?;
    tripod::dev::install_crds(&client)
        .await
        .map_err(|e| e.to_string())?;
    let mut nodes = testenv::create_nodes(&client)
        .await
        .map_err(|e| e.to_string())?;
    let mut registry = None;
    let mut auth_registry = None;
    if builds {
        nodes.retain(|n| n != testenv::LINUX_AMD64);
        let _runner = tripod::noderunner::spawn(
            client.clone(),
            tripod::noderunner::NodeRunnerConfig {
                node_name: testenv::LINUX_AMD64.to_string(),
                root: dir.join("node"),
                tripod_binary: PathBuf::from(env!("CARGO_BIN_EXE_tripod")),
                max_grace: Duration::from_secs(10),
            },
        );
        let reg = start_registry(&dir, "registry", None)?;
        push_base_image(&dir, &reg)?;
        registry = Some(reg);
        let out = Command::new("htpasswd")
            .args(["-Bbn", "builder", "s3cret"])
            .output()
            .map_err(|e| format!("htpasswd (apache2-utils): {e}"))?;
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, &out.stdout).map_err(|e| e.to_string())?;
        auth_registry = Some(start_registry(&dir, "auth-registry", Some(&htpasswd))?);
    }
    let _keeper = testenv::spawn_node_keeper(client, nodes);
    eprintln!(
        "control plane ready in {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let shared = Shared {
        kubeconfig: cp.kubeconfig().to_path_buf(),
        kubectl: cp.kubectl(),
        dir,
        registry,
        auth_registry,
    };
    Ok((cp, shared))
}

/// Pushes `REGISTRY/base/busybox:1`, a base image with a shell (Debian's
/// busybox-static), so Dockerfiles with RUN steps build offline.
fn push_base_image(dir: &Path, registry: &str) -> Result<(), String> {
    let ctx = dir.join("base-ctx");
    std::fs::create_dir_all(ctx.join("rootfs/bin")).map_err(|e| e.to_string())?;
    std::fs::copy("/bin/busybox", ctx.join("rootfs/bin/busybox"))
        .map_err(|e| format!("/bin/busybox (busybox-static): {e}"))?;
    for applet in ["sh", "echo", "cat", "false", "true", "sleep", "ls"] {
        std::os::unix::fs::symlink("busybox", ctx.join("rootfs/bin").join(applet))
            .map_err(|e| e.to_string())?;
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n",
    )
    .map_err(|e| e.to_string())?;
    let tag = format!("{registry}/base/busybox:1");
    let storage = |cmd: &mut Command| {
        cmd.arg("--root")
            .arg(dir.join("base-storage"))
            .arg("--runroot")
            .arg(dir.join("base-run"))
            .args(["--storage-driver", "vfs"]);
    };
    let mut bud = Command::new("buildah");
    storage(&mut bud);
    bud.args(["bud", "--isolation", "chroot", "-t", &tag])
        .arg(&ctx);
    let mut push = Command::new("buildah");
    storage(&mut push);
    push.args([
        "push",
        "--tls-verify=false",
        &tag,
        &format!("docker://{tag}"),
    ]);
    for mut cmd in [bud, push] {
        let out = cmd.output().map_err(|e| format!("buildah: {e}"))?;
        if !out.status.success() {
            return Err(format!("buildah: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    Ok(())
}

/// Debian's docker-registry on a free loopback port; returns host:port.
fn start_registry(dir: &Path, name: &str, htpasswd: Option<&Path>) -> Result<String, String> {
    let r = testenv::start_registry(dir, name, 0, htpasswd).map_err(|e| e.to_string())?;
    // Supervised: it lives as long as the test process.
    std::mem::forget(r.child);
    Ok(r.address)
}

/// One test's view: a client and a namespace of its own.
pub struct TestEnv {
    pub client: Client,
    pub ns: String,
    pub shared: &'static Shared,
    controllers: Vec<ControllerProc>,
}

/// A `tripod controller` process.
pub struct ControllerProc {
    pub child: Child,
    pub metrics_port: u16,
    pub executor_port: u16,
    pub log: PathBuf,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(cfg).expect("client")
}

impl TestEnv {
    /// A fresh namespace named after the test.
    pub async fn new(test: &str) -> TestEnv {
        let shared = tokio::task::spawn_blocking(shared).await.expect("join");
        Self::in_env(shared, test).await
    }

    /// A fresh namespace in the control plane whose amd64 node runs Pods.
    pub async fn with_builds(test: &str) -> TestEnv {
        let shared = tokio::task::spawn_blocking(build_shared)
            .await
            .expect("join");
        Self::in_env(shared, test).await
    }

    async fn in_env(shared: &'static Shared, test: &str) -> TestEnv {
        let client = client_for(&shared.kubeconfig).await;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{}-{}-{}", test.replace('_', "-"), std::process::id(), n);
        let ns: String = ns.chars().take(63).collect();
        let api: Api<Namespace> = Api::all(client.clone());
        api.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
        TestEnv {
            client,
            ns,
            shared,
            controllers: Vec::new(),
        }
    }

    pub fn builds(&self) -> Api<ImageBuild> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Starts a controller watching this namespace; returns its index.
    pub fn start_controller(&mut self, identity: &str) -> usize {
        self.start_controller_on(identity, free_port())
    }

    /// Starts a controller whose executor service listens on `executor_port`
    /// (a restarted controller keeps its address, like behind a Service).
    pub fn start_controller_on(&mut self, identity: &str, executor_port: u16) -> usize {
        self.start_controller_with(identity, executor_port, &[])
    }

    /// Starts a controller with `extra` arguments after the usual ones.
    pub fn start_controller_with(
        &mut self,
        identity: &str,
        executor_port: u16,
        extra: &[&str],
    ) -> usize {
        let port = free_port();
        let log = self.shared.dir.join(format!("{}-{identity}.log", self.ns));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = testenv::supervised_command(env!("CARGO_BIN_EXE_tripod"));
        cmd.args([
            "controller",
            "--namespace",
            &self.ns,
            "--lease-namespace",
            &self.ns,
            "--identity",
            identity,
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
            "--lease-duration-seconds",
            "4",
            "--lease-renew-seconds",
            "1",
            "--executor-address",
            &format!("127.0.0.1:{executor_port}"),
            "--executor-listen",
            &format!("127.0.0.1:{executor_port}"),
        ])
        .args(extra)
        .env("KUBECONFIG", &self.shared.kubeconfig)
        .env("RUST_LOG", "info,tripod=debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let child = testenv::spawn_supervised(cmd).expect("spawn controller");
        self.controllers.push(ControllerProc {
            child,
            metrics_port: port,
            executor_port,
            log,
        });
        self.controllers.len() - 1
    }

    pub fn controller(&mut self, i: usize) -> &mut ControllerProc {
        &mut self.controllers[i]
    }

    /// Kills a controller with SIGKILL (no lease release).
    pub fn kill_controller(&mut self, i: usize) {
        let c = &mut self.controllers[i];
        let _ = c.child.kill();
        let _ = c.child.wait();
    }

    pub fn controller_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.controllers[i].log).unwrap_or_default()
    }

    /// `kubectl apply -f -` of `manifest` into this namespace; panics with
    /// kubectl's answer when it is refused.
    pub fn apply(&self, manifest: &str) {
        let (ok, out) = self.kubectl(&["apply", "-f", "-"], Some(manifest));
        assert!(ok, "kubectl apply: {out}");
    }

    /// `kubectl wait --for=<condition> --timeout=<timeout> <object>`.
    pub fn wait_for(&self, condition: &str, object: &str, timeout: &str) -> (bool, String) {
        self.kubectl(
            &[
                "wait",
                &format!("--for={condition}"),
                &format!("--timeout={timeout}"),
                object,
            ],
            None,
        )
    }

    /// Runs the real kubectl in this namespace, `stdin` piped to it.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut cmd = Command::new(&self.shared.kubectl);
        cmd.args(args)
            .arg("-n")
            .arg(&self.ns)
            .env("KUBECONFIG", &self.shared.kubeconfig)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The ImageBuild's Pods (all builds).
    pub async fn pods_of(&self, name: &str) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(&format!("{LABEL_NAME}={name}")))
            .await
            .expect("list pods")
            .items
    }

    pub async fn cleanup(mut self) {
        for i in 0..self.controllers.len() {
            self.kill_controller(i);
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.ns, &DeleteParams::default()).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A plain HTTP GET on loopback: (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The value of a metric line (exact name with labels) in a Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A minimal inline ImageBuild manifest.
pub fn manifest(name: &str, platforms: &[&str], extra: &str) -> String {
    format!(
        r#"apiVersion: build.tripod.dev/v1alpha1
kind: ImageBuild
metadata:
  name: {name}
spec:
  source:
    inline:
      dockerfile: |
        FROM scratch
        COPY hello /hello
      files:
        hello: "hi"
  platforms: [{}]
  output:
    image: registry.local/team/{name}:1
{extra}"#,
        platforms.join(", ")
    )
}
