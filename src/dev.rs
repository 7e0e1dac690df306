//! `tripod dev`: a local Tripod on this machine.
//!
//! `up` builds (once) and starts a real control plane from [`crate::testenv`]
//! in a background `tripod dev serve` process, creates the fake nodes, starts
//! `tripod controller`, and writes `DIR/env`. `down` stops all of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::cli::DevCommand;
use crate::testenv::{self, ControlPlane, Options};

/// Namespace the local controller runs in.
pub const SYSTEM_NAMESPACE: &str = "tripod-system";

/// Errors of `tripod dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The control plane failed.
    #[error(transparent)]
    Testenv(#[from] testenv::Error),
    /// An API request failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Packages are missing and cannot be installed.
    #[error("missing packages: {0} (install them with apt-get, or run as root)")]
    Packages(String),
    /// The example build did not succeed.
    #[error("the example build {0}")]
    Example(String),
    /// A manifest could not be parsed.
    #[error("{path}: {source}")]
    Manifest {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_yaml::Error,
    },
    /// A CRD did not become established.
    #[error("CRD {0} was not established within 60s")]
    CrdNotEstablished(String),
    /// The background process did not come up.
    #[error("the local environment did not start: {reason}\n--- {log} (last lines) ---\n{tail}")]
    NotStarted {
        /// Why.
        reason: String,
        /// Log file.
        log: String,
        /// Its last lines.
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Kube { what, source }
}

/// Runs a `tripod dev` subcommand.
pub async fn run(cmd: DevCommand) -> Result<(), DevError> {
    match cmd {
        DevCommand::Up { dir, no_example } => {
            let dir = absolute(&dir)?;
            up(&dir).await?;
            if no_example {
                Ok(())
            } else {
                example(&dir, &source_dir().join("examples/hello.yaml")).await
            }
        }
        DevCommand::Down { dir, purge } => down(&absolute(&dir)?, purge).await,
        DevCommand::Serve { dir } => serve(&absolute(&dir)?).await,
    }
}

fn absolute(dir: &Path) -> Result<PathBuf, DevError> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(io("current directory"))?
        .join(dir))
}

/// Where `testenv/build.sh` is: `TRIPOD_SOURCE_DIR`, else the source tree this
/// binary was built from, else the current directory.
pub fn source_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRIPOD_SOURCE_DIR") {
        return PathBuf::from(dir);
    }
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built_from.join("testenv/build.sh").exists() {
        return built_from;
    }
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("serve.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_usage(dir: &Path) {
    let env = dir.join("env");
    println!("Tripod dev environment is running.");
    println!();
    println!("  source {}", env.display());
    println!("  kubectl get nodes");
    println!("  kubectl apply -f examples/hello.yaml");
    println!("  kubectl get imagebuilds -w");
    println!();
    println!("Logs: {}", dir.join("logs").display());
    println!("Stop: tripod dev down --dir {}", dir.display());
}

async fn up(dir: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(dir.join("logs")).map_err(io(format!("create {}", dir.display())))?;
    if let Some(pid) = read_pid(dir)
        && pid_alive(pid)
        && dir.join("ready").exists()
    {
        println!("Already running (pid {pid}).");
        print_usage(dir);
        return Ok(());
    }
    let _ = std::fs::remove_file(dir.join("ready"));
    ensure_packages()?;
    // Build the control plane in the foreground, so its progress shows.
    let bin_dir = testenv::ensure_binaries(&source_dir())?;
    let exe = std::env::current_exe().map_err(io("locate the tripod binary"))?;
    let log_path = dir.join("logs/serve.log");
    let log =
        std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io("clone log handle"))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(&exe)
        .args(["dev", "serve", "--dir"])
        .arg(dir)
        .env("TRIPOD_TESTENV_BIN", &bin_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(io("start tripod dev serve"))?;
    let pid = child.id();
    std::fs::write(dir.join("serve.pid"), format!("{pid}\n")).map_err(io("write serve.pid"))?;
    let started = Instant::now();
    loop {
        if dir.join("ready").exists() {
            break;
        }
        if !pid_alive(pid) {
            return Err(DevError::NotStarted {
                reason: "tripod dev serve exited".into(),
                log: log_path.display().to_string(),
                tail: tail(&log_path, 30),
            });
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err(DevError::NotStarted {
                reason: "not ready after 300s".into(),
                log: log_path.display().to_string(),
                tail: tail(&log_path, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("Started in {:.1}s.", started.elapsed().as_secs_f64());
    print_usage(dir);
    Ok(())
}

async fn down(dir: &Path, purge: bool) -> Result<(), DevError> {
    match read_pid(dir) {
        Some(pid) if pid_alive(pid) => {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let started = Instant::now();
            while pid_alive(pid) && started.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if pid_alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &format!("-{pid}")])
                    .status();
            }
            println!("Stopped the Tripod dev environment (pid {pid}).");
        }
        _ => println!("Nothing running in {}.", dir.display()),
    }
    let _ = std::fs::remove_file(dir.join("serve.pid"));
    let _ = std::fs::remove_file(dir.join("ready"));
    if purge {
        std::fs::remove_dir_all(dir).map_err(io(format!("remove {}", dir.display())))?;
        println!("Removed {}.", dir.display());
    }
    Ok(())
}

async fn serve(dir: &Path) -> Result<(), DevError> {
    let bin_dir = match std::env::var_os("TRIPOD_TESTENV_BIN") {
        Some(b) => PathBuf::from(b),
        None => testenv::ensure_binaries(&source_dir())?,
    };
    let mut cp = ControlPlane::start(Options {
        dir: dir.join("cluster"),
        bin_dir: bin_dir.clone(),
    })
    .await?;
    let result = serve_on(dir, &cp).await;
    cp.stop().await;
    let _ = std::fs::remove_file(dir.join("ready"));
    result
}

async fn serve_on(dir: &Path, cp: &ControlPlane) -> Result<(), DevError> {
    let client = cp.client().await?;
    install_crds(&client).await?;
    let mut nodes = testenv::create_nodes(&client).await?;
    // This machine's Linux node runs its Pods as local processes.
    nodes.retain(|n| n != testenv::LINUX_AMD64);
    let keeper = testenv::spawn_node_keeper(client.clone(), nodes);
    let exe = std::env::current_exe().map_err(io("locate the tripod binary"))?;
    let runner = crate::noderunner::spawn(
        client.clone(),
        crate::noderunner::NodeRunnerConfig {
            node_name: testenv::LINUX_AMD64.to_string(),
            root: dir.join("node"),
            tripod_binary: exe.clone(),
            max_grace: Duration::from_secs(10),
        },
    );
    ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
    let (registry, mut registry_proc) = start_registry(dir)?;

    let port = free_port()?;
    let executor_port = free_port()?;
    let log_path = dir.join("logs/controller.log");
    let log =
        std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io("clone log handle"))?;
    let mut cmd = testenv::supervised_command(&exe);
    cmd.args([
        "controller",
        "--lease-namespace",
        SYSTEM_NAMESPACE,
        "--metrics-address",
    ])
    .arg(format!("127.0.0.1:{port}"))
    .arg("--executor-address")
    .arg(format!("127.0.0.1:{executor_port}"))
    .arg("--executor-listen")
    .arg(format!("127.0.0.1:{executor_port}"))
    .env("KUBECONFIG", cp.kubeconfig())
    .stdin(Stdio::null())
    .stdout(log)
    .stderr(log2);
    let mut controller = testenv::spawn_supervised(cmd).map_err(io("start tripod controller"))?;

    let env_file = format!(
        "# Written by `tripod dev up`. Source it: . {}\nexport KUBECONFIG={}\nexport PATH={}:$PATH\nexport TRIPOD_METRICS=http://127.0.0.1:{port}/metrics\nexport TRIPOD_REGISTRY={registry}\n",
        dir.join("env").display(),
        cp.kubeconfig().display(),
        cp.bin_dir().display(),
    );
    std::fs::write(dir.join("env"), env_file).map_err(io("write env file"))?;
    std::fs::write(dir.join("ready"), "").map_err(io("write ready marker"))?;
    tracing::info!(api = %cp.api_url(), "Tripod dev environment ready");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(io("install SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("install SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("install SIGHUP handler"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    tracing::info!("stopping");
    let _ = Command::new("kill")
        .args(["-TERM", &controller.id().to_string()])
        .status();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = controller.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = controller.kill();
    let _ = controller.wait();
    runner.abort();
    keeper.abort();
    let _ = registry_proc.kill();
    let _ = registry_proc.wait();
    Ok(())
}

/// Installs the Debian packages the local environment runs (as root).
fn ensure_packages() -> Result<(), DevError> {
    let wanted = [
        ("buildah", "buildah"),
        ("docker-registry", "docker-registry"),
        ("git", "git"),
        ("setpriv", "util-linux"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err(DevError::Packages(missing.join(" ")));
    }
    println!("Installing {} …", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(DevError::Packages(missing.join(" ")))
    }
}

fn env_value(dir: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("env")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("export {key}=")))
        .map(str::to_string)
}

/// Applies the example ImageBuild (its registry replaced by the local one),
/// waits for it to finish and prints its digest and how to check it.
async fn example(dir: &Path, path: &Path) -> Result<(), DevError> {
    use kube::api::{DynamicObject, GroupVersionKind};
    use kube::discovery::ApiResource;
    let registry = env_value(dir, "TRIPOD_REGISTRY")
        .ok_or_else(|| DevError::Example("has no registry (env file)".into()))?;
    let text = std::fs::read_to_string(path)
        .map_err(io(format!("read {}", path.display())))?
        .replace("127.0.0.1:5000", &registry);
    let obj: DynamicObject = serde_yaml::from_str(&text).map_err(|source| DevError::Manifest {
        path: path.display().to_string(),
        source,
    })?;
    let name = obj.name_any();
    let kubeconfig = dir.join("cluster/kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
        .map_err(|e| DevError::Example(format!("cannot read {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| DevError::Example(format!("kubeconfig: {e}")))?;
    let client = Client::try_from(config).map_err(kube("client"))?;
    let gvk = GroupVersionKind::gvk(crate::api::GROUP, "v1alpha1", "ImageBuild");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "imagebuilds");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    api.patch(
        &name,
        &PatchParams::apply("tripod-dev").force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(kube(format!("apply {}", path.display())))?;
    println!();
    println!("Building {} (ImageBuild default/{name}) …", path.display());
    let builds: Api<crate::api::ImageBuild> = Api::namespaced(client, "default");
    let started = Instant::now();
    let mut last = None;
    let status = loop {
        let ib = builds
            .get(&name)
            .await
            .map_err(kube(format!("get ImageBuild {name}")))?;
        let status = ib.status.unwrap_or_default();
        if status.phase != last {
            if let Some(p) = status.phase {
                println!("  {:>5.1}s  {p}", started.elapsed().as_secs_f64());
            }
            last = status.phase;
        }
        if status.phase.is_some_and(crate::api::Phase::is_finished) {
            break status;
        }
        if started.elapsed() > Duration::from_secs(900) {
            return Err(DevError::Example("did not finish within 15 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let Some(image) = status.image.clone() else {
        let why: Vec<String> = status
            .platforms
            .iter()
            .map(|p| format!("{}: {}", p.platform, p.message.clone().unwrap_or_default()))
            .collect();
        return Err(DevError::Example(format!(
            "ended {}: {}",
            status.phase.unwrap_or_default(),
            why.join("; ")
        )));
    };
    println!();
    println!("status.image:");
    println!("  reference: {}", image.reference);
    println!("  digest:    {}", image.digest);
    println!("  pinned:    {}", image.pinned);
    let repo_tag = image
        .reference
        .trim_start_matches(&format!("{registry}/"))
        .to_string();
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap_or((&repo_tag, "latest"));
    println!();
    println!("Check it against the registry:");
    println!(
        "  curl -sI -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://{registry}/v2/{repo}/manifests/{tag} | grep -i docker-content-digest"
    );
    Ok(())
}

fn free_port() -> Result<u16, DevError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("pick a free port"))
}

/// Debian's docker-registry on loopback, its data in `DIR/registry` (kept
/// across restarts). Port 5000 when free.
fn start_registry(dir: &Path) -> Result<(String, std::process::Child), DevError> {
    let port = if std::net::TcpListener::bind("127.0.0.1:5000").is_ok() {
        5000
    } else {
        0
    };
    let r = testenv::start_registry(dir, "registry", port, None)?;
    Ok((r.address, r.child))
}

async fn ensure_namespace(client: &Client, name: &str) -> Result<(), DevError> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api
        .get_opt(name)
        .await
        .map_err(kube("get namespace"))?
        .is_some()
    {
        return Ok(());
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(kube(format!("create namespace {name}"))(e)),
    }
}

/// Applies Tripod's CRDs (server-side apply) and waits until they are established.
pub async fn install_crds(client: &Client) -> Result<(), DevError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply("tripod-dev").force();
    for crd in crate::api::crds() {
        let name = crd.name_any();
        api.patch(&name, &ssa, &Patch::Apply(&crd))
            .await
            .map_err(kube(format!("apply CRD {name}")))?;
    }
    for crd in crate::api::crds() {
        let name = crd.name_any();
        let started = Instant::now();
        loop {
            let current = api
                .get(&name)
                .await
                .map_err(kube(format!("get CRD {name}")))?;
            let established = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(DevError::CrdNotEstablished(name));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
