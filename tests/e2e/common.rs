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
use tripod_harness::env::EnvInfo;

/// The environment shared by every test of this binary: what
/// `tripod-dev serve` runs (control plane, a real node with kubelet,
/// containerd and runc, kwok's simulated nodes, a registry with the buildd
/// image), plus a registry that requires a password.
pub struct Shared {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub dir: PathBuf,
    /// Everything the environment offers (registry, images, node address).
    pub info: EnvInfo,
    /// The registry build Pods push to, on the node address.
    pub registry: Option<String>,
    /// One that requires `builder` / `s3cret` (htpasswd), also on the node address.
    pub auth_registry: Option<String>,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
/// Extra arguments of `tripod-dev serve` (set before the first test env).
static SERVE_ARGS: OnceLock<&'static [&'static str]> = OnceLock::new();

/// Gives `tripod-dev serve` extra arguments (e.g. `--no-crds` for a
/// binary whose tests install the chart). Call it before the first
/// [`TestEnv`]; later calls are ignored.
#[allow(dead_code)]
pub fn serve_args(args: &'static [&'static str]) {
    let _ = SERVE_ARGS.set(args);
}
static COUNTER: AtomicU32 = AtomicU32::new(0);
/// `tripod-dev serve`'s standard input: it tears the environment down (and
/// puts the host back) when this closes, which happens when this process
/// ends however it ends.
static GUARD: OnceLock<std::sync::Mutex<Option<std::process::ChildStdin>>> = OnceLock::new();

/// `tripod-dev`, built beside `tripod` by `cargo build --workspace`
/// (scripts/test.sh does that first).
pub fn tripod_dev() -> PathBuf {
    let tripod = PathBuf::from(env!("CARGO_BIN_EXE_tripod"));
    let dev = tripod.with_file_name("tripod-dev");
    assert!(
        dev.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        dev.display()
    );
    dev
}

fn shared() -> &'static Shared {
    let res = SHARED.get_or_init(start);
    match res {
        Ok(s) => s,
        Err(e) => panic!("the test environment failed to start: {e}"),
    }
}

fn start() -> Result<Shared, String> {
    let dir = std::env::temp_dir().join(format!("tripod-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let log = dir.join("serve.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(tripod_dev())
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .arg("--tripod")
        .arg(env!("CARGO_BIN_EXE_tripod"))
        .arg("--stdin-guard")
        .arg("--for-tests")
        .arg("--purge-on-exit")
        .args(SERVE_ARGS.get().copied().unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start tripod-dev serve: {e}"))?;
    let _ = GUARD.set(std::sync::Mutex::new(child.stdin.take()));
    // Building the images can take minutes the first time.
    while !dir.join("ready").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "tripod-dev serve exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("not ready after 30 minutes; see {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::mem::forget(child);
    let info = EnvInfo::read(&dir).map_err(|e| e.to_string())?;
    let out = Command::new("htpasswd")
        .args(["-Bbn", "builder", "s3cret"])
        .output()
        .map_err(|e| format!("htpasswd (apache2-utils): {e}"))?;
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).map_err(|e| e.to_string())?;
    let auth = tripod_harness::registry::start_registry_on(
        &info.node_ip,
        &dir,
        "auth-registry",
        0,
        Some(&htpasswd),
    )
    .map_err(|e| e.to_string())?;
    // Supervised: it lives as long as the test process.
    let auth_address = auth.address.clone();
    std::mem::forget(auth.child);
    eprintln!(
        "test environment ready in {:.1}s ({}; real node Ready after {:.1}s)",
        started.elapsed().as_secs_f64(),
        dir.display(),
        info.node_ready_seconds
    );
    Ok(Shared {
        kubeconfig: info.kubeconfig.clone(),
        kubectl: info.kubectl.clone(),
        dir,
        registry: Some(info.registry.clone()),
        auth_registry: Some(auth_address),
        info,
    })
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
        Self::in_env(shared, test, None).await
    }

    /// A fresh namespace for builds on the real node, enforcing the Pod
    /// Security level build Pods claim: `baseline`.
    pub async fn with_builds(test: &str) -> TestEnv {
        let shared = tokio::task::spawn_blocking(shared).await.expect("join");
        Self::in_env(shared, test, Some("baseline")).await
    }

    async fn in_env(shared: &'static Shared, test: &str, pod_security: Option<&str>) -> TestEnv {
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
                    labels: pod_security.map(|level| {
                        [(
                            "pod-security.kubernetes.io/enforce".to_string(),
                            level.to_string(),
                        )]
                        .into()
                    }),
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
        let mut cmd = tripod_harness::supervised_command(env!("CARGO_BIN_EXE_tripod"));
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
            // Short enough that a takeover after a kill is quick, long
            // enough that an API server stalled for seconds by the tests
            // running beside it does not end a leader (3 s did, once).
            "--lease-duration-seconds",
            "10",
            "--lease-renew-seconds",
            "1",
            "--lease-renew-deadline-seconds",
            "8",
            // BuildRunners are cluster-scoped: each test's controller
            // manages only its own.
            &format!(
                "--buildrunner-selector=tripod.dev/test-namespace={}",
                self.ns
            ),
        ])
        // Build Pods on the real node: the buildd image, its seccomp
        // profile, the executor service on the node address.
        .args(self.shared.info.controller_args(executor_port))
        .args(extra)
        .env("KUBECONFIG", &self.shared.kubeconfig)
        .env("RUST_LOG", "info,tripod=debug,tripod::leader=trace")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let child = tripod_harness::spawn_supervised(cmd).expect("spawn controller");
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
        // The namespace first: arguments after `--` belong to the command
        // `kubectl exec` runs.
        cmd.arg("-n")
            .arg(&self.ns)
            .args(args)
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

/// Asserts that `name`'s success was reported once: its `Succeeded` Event
/// appears (it is published after the status) and it is one Event that was
/// not repeated (an Event recorder merges repeats into a series).
pub async fn assert_reported_once(env: &TestEnv, name: &str) {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let succeeded = eventually("the Succeeded Event", Duration::from_secs(30), || async {
        let found: Vec<_> = events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("Succeeded")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(succeeded.len(), 1, "{succeeded:#?}");
    let e = &succeeded[0];
    assert!(
        e.series.as_ref().is_none_or(|s| s.count <= 1) && e.deprecated_count.unwrap_or(1) <= 1,
        "reported more than once: {e:#?}"
    );
}

/// A plain HTTP GET on loopback: (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at("127.0.0.1", port, path).await
}

/// A plain HTTP GET of `http://{host}:{port}{path}`: (status code, body).
pub async fn http_get_at(host: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
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

/// `spec.executor` of builds that run on the real node: in the tests'
/// environment it is tainted, and the other linux/amd64 node is simulated.
pub const ON_REAL_NODE: &str = "  executor:\n    nodeSelector: {kubernetes.io/hostname: tripod-linux-amd64}\n    tolerations: [{key: tripod.dev/real-node, operator: Exists, effect: NoSchedule}]\n";

/// An inline linux/amd64 ImageBuild that runs on the real node and pushes
/// to `registry` (plain HTTP) as `team/<name>:1`; `BASE` in the Dockerfile
/// stands for the busybox base image there; the context holds `hello.txt`.
/// `extra` is appended to the spec.
pub fn real_node_build(name: &str, registry: &str, dockerfile: &str, extra: &str) -> String {
    let dockerfile = dockerfile.replace("BASE", &format!("{registry}/base/busybox:1"));
    inline_build(InlineBuild {
        name,
        registry,
        dockerfile: &dockerfile,
        platforms: "linux/amd64",
        hello: "hello from tripod",
        extra: &format!("{ON_REAL_NODE}{extra}"),
    })
}

/// What [`inline_build`] makes.
pub struct InlineBuild<'a> {
    pub name: &'a str,
    /// The registry (plain HTTP) the image goes to, as `team/<name>:1`.
    pub registry: &'a str,
    pub dockerfile: &'a str,
    /// `spec.platforms`, as a YAML flow list's content.
    pub platforms: &'a str,
    /// The content of `hello.txt` in the context.
    pub hello: &'a str,
    /// Appended to the spec.
    pub extra: &'a str,
}

/// An inline ImageBuild manifest.
pub fn inline_build(b: InlineBuild<'_>) -> String {
    let InlineBuild {
        name,
        registry,
        dockerfile,
        platforms,
        hello,
        extra,
    } = b;
    let indented: String = dockerfile
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect();
    format!(
        r#"apiVersion: build.tripod.dev/v1alpha1
kind: ImageBuild
metadata:
  name: {name}
spec:
  source:
    inline:
      dockerfile: |
{indented}      files:
        hello.txt: "{hello}"
  platforms: [{platforms}]
  output:
    image: {registry}/team/{name}:1
    insecure: true
{extra}"#
    )
}

/// The synthetic Windows base image of OS build `build` (`10.0.20348`):
/// its full `os.version` and its reference in the test registry.
pub fn windows_base(info: &EnvInfo, build: &str) -> (String, String) {
    info.windows_bases
        .iter()
        .find(|(v, _)| v.starts_with(&format!("{build}.")))
        .map(|(v, r)| (v.clone(), r.clone()))
        .unwrap_or_else(|| panic!("no synthetic Windows base of build {build}"))
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

/// Runs `git ARGS` in `dir` (author and committer set), asserting success.
pub fn git(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `git daemon` on the node address serving the repositories under a
/// directory (`git://NODE_IP:PORT/<name>`), for git sources.
pub struct GitDaemon {
    pub port: u16,
    child: std::process::Child,
}

impl GitDaemon {
    pub async fn serve(env: &TestEnv, root: &std::path::Path) -> GitDaemon {
        let port = free_port();
        // The daemon binary itself, not the `git daemon` wrapper, whose child
        // would outlive a kill of the wrapper.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git --exec-path");
        let daemon_bin = std::path::Path::new(String::from_utf8_lossy(&exec_path.stdout).trim())
            .join("git-daemon");
        let mut cmd = tripod_harness::supervised_command(&daemon_bin);
        // Its per-connection children are not killed with it: they end by
        // themselves when a client (a Pod whose network is gone) stops talking.
        cmd.args([
            "--reuseaddr",
            "--export-all",
            "--init-timeout=10",
            "--timeout=60",
            &format!("--listen={}", env.shared.info.node_ip),
            &format!("--port={port}"),
            &format!("--base-path={}", root.display()),
        ])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let child = tripod_harness::spawn_supervised(cmd).expect("git daemon");
        eventually("git daemon listens", Duration::from_secs(20), || async {
            std::net::TcpStream::connect((env.shared.info.node_ip.as_str(), port))
                .ok()
                .map(|_| ())
        })
        .await;
        GitDaemon { port, child }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
