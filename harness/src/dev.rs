//! `tripod-dev` (and `tripod dev`, which runs it): a local Tripod on this
//! machine.
//!
//! `up` installs what is missing, builds (once) the Kubernetes binaries,
//! containerd, runc, kwok and the images, then starts `tripod-dev serve` in
//! the background: the environment of [`crate::env`] with a controller. It
//! waits until it is ready, then builds `examples/hello.yaml` and shows its
//! digest, its build Pod and the Pod's log. `down` stops it all and leaves
//! the machine as found.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};

use crate::env::{Env, EnvInfo, EnvOptions};

/// A local Tripod: control plane, a real Linux node, simulated nodes, a
/// registry and the controller.
#[derive(Parser, Debug)]
#[command(name = "tripod-dev", version, about)]
pub struct DevCli {
    #[command(subcommand)]
    pub command: DevCommand,
}

/// `tripod-dev` subcommands.
#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Start everything in the background, then build examples/hello.yaml
    /// and print its digest.
    Up {
        /// Directory for state, logs and the env file.
        #[arg(long, default_value = ".tripod/dev")]
        dir: PathBuf,
        /// Do not build the example.
        #[arg(long)]
        no_example: bool,
        /// Run the controller as a cluster runs it: `helm install` of
        /// charts/tripod (controller and buildd images built from the
        /// Dockerfile) instead of a host process; then build
        /// examples/hello.yaml through it. No BuildRunners are started.
        #[arg(long)]
        helm: bool,
        /// The `tripod` binary (default: next to this one, else built with cargo).
        #[arg(long, env = "TRIPOD_BINARY")]
        tripod: Option<PathBuf>,
    },
    /// Stop everything `up` started and leave the machine as found.
    Down {
        /// Directory given to `up`.
        #[arg(long, default_value = ".tripod/dev")]
        dir: PathBuf,
        /// Also delete the state directory.
        #[arg(long)]
        purge: bool,
    },
    /// Run the environment in the foreground until SIGTERM/SIGINT (what `up`
    /// starts in the background; the tests run it too).
    Serve {
        /// Directory for state, logs and the env files.
        #[arg(long)]
        dir: PathBuf,
        /// The `tripod` binary.
        #[arg(long)]
        tripod: PathBuf,
        /// Also run a `tripod controller` for all namespaces.
        #[arg(long)]
        controller: bool,
        /// Do not install Tripod's CRDs: the chart will (`helm install`).
        #[arg(long, conflicts_with = "controller")]
        no_crds: bool,
        /// Registry port on the node address (0: a free one).
        #[arg(long, default_value_t = 0)]
        registry_port: u16,
        /// Stop when standard input closes (the parent died or let go).
        #[arg(long)]
        stdin_guard: bool,
        /// The tests' variant: a tainted real node and a simulated
        /// linux/amd64 node beside it.
        #[arg(long)]
        for_tests: bool,
        /// After stopping, delete the bulky state (node, registries, etcd),
        /// keeping the logs.
        #[arg(long)]
        purge_on_exit: bool,
    },
}

/// Errors of `tripod-dev`.
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
    /// The environment failed.
    #[error(transparent)]
    Harness(#[from] crate::Error),
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

/// The Tripod source tree: `TRIPOD_SOURCE_DIR`, else the tree this binary
/// was built from, else the current directory.
pub fn source_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRIPOD_SOURCE_DIR") {
        return PathBuf::from(dir);
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if built_from.join("testenv/build.sh").exists() {
        return std::fs::canonicalize(&built_from).unwrap_or(built_from);
    }
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

/// Runs a `tripod-dev` command.
pub async fn run(cmd: DevCommand) -> Result<(), DevError> {
    match cmd {
        DevCommand::Up {
            dir,
            no_example,
            helm,
            tripod,
        } => {
            let dir = absolute(&dir)?;
            let tripod = match tripod {
                Some(t) => t,
                None => locate_tripod()?,
            };
            up(&dir, &tripod, helm).await?;
            if helm {
                install_chart(&dir).await?;
                if !no_example {
                    example(&dir, &source_dir().join("examples").join("hello.yaml")).await?;
                }
                return Ok(());
            }
            if no_example {
                return Ok(());
            }
            // A build Pod on the real node, then the runner leg: a darwin
            // image on the darwin test runner, a linux/arm64 image on the
            // emulating Linux runner, and a windows/amd64 image through
            // that runner's BuildKit; then all four joined into one index.
            for example_file in [
                "hello.yaml",
                "hello-darwin.yaml",
                "hello-arm64.yaml",
                "hello-windows.yaml",
                "multi-os.yaml",
            ] {
                example(&dir, &source_dir().join("examples").join(example_file)).await?;
            }
            Ok(())
        }
        DevCommand::Down { dir, purge } => down(&absolute(&dir)?, purge).await,
        DevCommand::Serve {
            dir,
            tripod,
            controller,
            registry_port,
            stdin_guard,
            for_tests,
            purge_on_exit,
            no_crds,
        } => {
            let opts = EnvOptions {
                dir: absolute(&dir)?,
                source_dir: source_dir(),
                tripod: absolute(&tripod)?,
                controller,
                registry_port,
                install_crds: !no_crds,
                for_tests,
            };
            let result = serve(&opts, stdin_guard).await;
            if purge_on_exit {
                for sub in ["node", "registry", "auth-registry", "cluster/etcd"] {
                    let _ = std::fs::remove_dir_all(opts.dir.join(sub));
                }
            }
            result
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, DevError> {
    std::path::absolute(path).map_err(io(format!("resolve {}", path.display())))
}

/// `tripod` next to this binary (same cargo target directory), else built
/// with `cargo build --bin tripod` in the source tree.
fn locate_tripod() -> Result<PathBuf, DevError> {
    let me = std::env::current_exe().map_err(io("locate tripod-dev"))?;
    if let Some(sibling) = me.parent().map(|d| d.join("tripod"))
        && sibling.exists()
    {
        return Ok(sibling);
    }
    println!("Building tripod (cargo build --bin tripod) …");
    let status = Command::new("cargo")
        .args(["build", "--locked", "--bin", "tripod"])
        .current_dir(source_dir())
        .status()
        .map_err(io("run cargo build --bin tripod"))?;
    let sibling = me.parent().map(|d| d.join("tripod")).unwrap_or_default();
    if status.success() && sibling.exists() {
        Ok(sibling)
    } else {
        Err(DevError::Example(
            "cannot find the tripod binary: pass --tripod or run `cargo build --workspace`".into(),
        ))
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The pid in `DIR/serve.pid`, if that process is still this directory's
/// `tripod-dev serve` (a stale file may name an unrelated process).
fn read_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("serve.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .map(str::to_string)
        .collect();
    let ours = args.iter().any(|a| a == "serve")
        && args.iter().any(|a| Path::new(a) == dir)
        && args.first().is_some_and(|a| a.ends_with("tripod-dev"));
    ours.then_some(pid)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_usage(dir: &Path) {
    println!("Tripod dev environment is running.");
    println!();
    println!("  source {}", dir.join("env").display());
    println!("  kubectl get nodes -o wide");
    println!("  kubectl apply -f examples/hello.yaml");
    println!("  kubectl get imagebuilds -w");
    println!();
    println!("Logs: {}", dir.join("logs").display());
    println!("Stop: tripod dev down --dir {}", dir.display());
}

/// The Debian packages the environment runs or builds with.
const PACKAGES: [(&str, &str); 12] = [
    ("buildah", "buildah"),
    ("docker-registry", "docker-registry"),
    ("git", "git"),
    ("setpriv", "util-linux"),
    ("iptables", "iptables"),
    ("ip", "iproute2"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/include/seccomp.h", "libseccomp-dev"),
    ("pkg-config", "pkg-config"),
    ("/bin/busybox", "busybox-static"),
    ("debootstrap", "debootstrap"),
    ("gcc", "gcc"),
];

/// Installs the Debian packages the local environment needs (as root).
fn ensure_packages() -> Result<(), DevError> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(what, _)| {
            if what.starts_with('/') {
                !Path::new(what).exists()
            } else {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {what}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            }
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

async fn up(dir: &Path, tripod: &Path, helm: bool) -> Result<(), DevError> {
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
    // The long builds in the foreground, so their progress shows.
    println!(
        "Building what the environment runs (cached in ~/.cache/tripod after the first time) …"
    );
    crate::env::build_all(&source_dir())?;
    let me = std::env::current_exe().map_err(io("locate tripod-dev"))?;
    let log_path = dir.join("logs/serve.log");
    let log =
        std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(io("clone log handle"))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(&me)
        .arg("serve")
        .arg(if helm { "--no-crds" } else { "--controller" })
        .args(["--registry-port=5000", "--dir"])
        .arg(dir)
        .arg("--tripod")
        .arg(tripod)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(io("start tripod-dev serve"))?;
    let pid = child.id();
    std::fs::write(dir.join("serve.pid"), format!("{pid}\n")).map_err(io("write serve.pid"))?;
    let started = Instant::now();
    // Show the environment's progress lines while it starts.
    let mut reader = std::fs::File::open(&log_path)
        .map(std::io::BufReader::new)
        .ok();
    let mut shown = 0u64;
    loop {
        if let Some(r) = reader.as_mut() {
            let _ = r.seek(std::io::SeekFrom::Start(shown));
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if !line.ends_with('\n') {
                    break;
                }
                shown += line.len() as u64;
                if line.contains(" INFO ") {
                    print!("  {}", line.split(" INFO ").last().unwrap_or(&line));
                }
                line.clear();
            }
        }
        if dir.join("ready").exists() {
            break;
        }
        if !pid_alive(pid) {
            return Err(DevError::NotStarted {
                reason: "tripod-dev serve exited".into(),
                log: log_path.display().to_string(),
                tail: tail(&log_path, 30),
            });
        }
        if started.elapsed() > Duration::from_secs(900) {
            return Err(DevError::NotStarted {
                reason: "not ready after 900s".into(),
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

/// `helm upgrade --install` of charts/tripod into the running environment
/// with the images it built, waiting until the controller Deployment is
/// available; prints the release and where the leader publishes itself.
async fn install_chart(dir: &Path) -> Result<(), DevError> {
    let info = EnvInfo::read(dir)?;
    let Some(controller_image) = info.controller_image.clone() else {
        return Err(DevError::Example(
            "the environment has no controller image (testenv/images.sh push printed none)".into(),
        ));
    };
    let helm = crate::chart::Helm::ensure(&source_dir(), &info.kubeconfig, &dir.join("helm"))?;
    println!(
        "helm install {} (image {controller_image}) …",
        crate::chart::RELEASE
    );
    let started = Instant::now();
    let args = crate::chart::install_args(
        &source_dir().join("charts/tripod"),
        &crate::chart::ChartValues {
            info: &info,
            controller_image: &controller_image,
            tainted: false,
            build_namespaces: &["default"],
        },
    );
    helm.run(&args)?;
    println!(
        "Installed in {:.1}s: `kubectl -n {ns} get deploy,pods,endpointslices` shows the controller replicas and the leader's endpoint.",
        started.elapsed().as_secs_f64(),
        ns = crate::chart::RELEASE_NAMESPACE
    );
    Ok(())
}

async fn down(dir: &Path, purge: bool) -> Result<(), DevError> {
    match read_pid(dir) {
        Some(pid) if pid_alive(pid) => {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let started = Instant::now();
            // Pods get their grace period; the host is then put back.
            while pid_alive(pid) && started.elapsed() < Duration::from_secs(300) {
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
    // Whatever a killed environment left on the host.
    if crate::node::cleanup_stale()? {
        println!("Removed what an environment that was killed left on this machine.");
    }
    let _ = std::fs::remove_file(dir.join("serve.pid"));
    let _ = std::fs::remove_file(dir.join("ready"));
    if purge && dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(format!("remove {}", dir.display())))?;
        println!("Removed {}.", dir.display());
    }
    Ok(())
}

async fn serve(opts: &EnvOptions, stdin_guard: bool) -> Result<(), DevError> {
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let _ = std::fs::remove_file(dir.join("ready"));
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(io("install SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("install SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("install SIGHUP handler"))?;
    let stdin_closed = async {
        if !stdin_guard {
            return std::future::pending::<()>().await;
        }
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    };
    tokio::pin!(stdin_closed);
    // A stop while it starts: dropping the half-started environment tears
    // down what it had set up.
    let mut env = tokio::select! {
        env = Env::start(opts) => env?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
        _ = hup.recv() => return Ok(()),
        _ = &mut stdin_closed => return Ok(()),
    };
    env.write_files(dir)?;
    std::fs::write(dir.join("ready"), "").map_err(io("write ready marker"))?;
    tracing::info!(api = %env.info.api_url, "Tripod dev environment ready");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => break,
            _ = &mut stdin_closed => break,
            _ = tick.tick() => env.keep_alive(),
        }
    }
    tracing::info!("stopping");
    let _ = std::fs::remove_file(dir.join("ready"));
    env.stop().await;
    tracing::info!("stopped; the host is as it was");
    Ok(())
}

/// Applies the example ImageBuild (its registry replaced by the local one),
/// waits for it to finish and prints its digest, its Pod and the Pod's log.
async fn example(dir: &Path, path: &Path) -> Result<(), DevError> {
    let info = EnvInfo::read(dir)?;
    let registry = info.registry.clone();
    let text = std::fs::read_to_string(path)
        .map_err(io(format!("read {}", path.display())))?
        .replace("127.0.0.1:5000", &registry);
    let obj: DynamicObject = serde_yaml::from_str(&text)
        .map_err(|e| DevError::Example(format!("{}: {e}", path.display())))?;
    let name = obj.name_any();
    let kc = kube::config::Kubeconfig::read_from(&info.kubeconfig)
        .map_err(|e| DevError::Example(format!("kubeconfig: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| DevError::Example(format!("kubeconfig: {e}")))?;
    let client = Client::try_from(config).map_err(kube("client"))?;
    let gvk = GroupVersionKind::gvk("build.tripod.dev", "v1alpha1", "ImageBuild");
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
    let started = Instant::now();
    let mut last = String::new();
    let status = loop {
        let ib = api
            .get(&name)
            .await
            .map_err(kube(format!("get ImageBuild {name}")))?;
        let status = ib.data.get("status").cloned().unwrap_or_default();
        let phase = status["phase"].as_str().unwrap_or_default().to_string();
        if phase != last && !phase.is_empty() {
            println!("  {:>5.1}s  {phase}", started.elapsed().as_secs_f64());
            last = phase.clone();
        }
        if matches!(phase.as_str(), "Succeeded" | "Failed" | "Cancelled") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(900) {
            return Err(DevError::Example("did not finish within 15 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let kubectl = |args: &[&str]| -> String {
        Command::new(&info.kubectl)
            .args(args)
            .env("KUBECONFIG", &info.kubeconfig)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    };
    let selector = format!("build.tripod.dev/name={name}");
    let platforms = status["platforms"].as_array().cloned().unwrap_or_default();
    let on_pods = platforms
        .iter()
        .any(|p| p["executor"]["kind"].as_str() == Some("Pod"));
    if on_pods {
        println!();
        println!("$ kubectl get pods -l {selector} -o wide");
        print!(
            "{}",
            kubectl(&["get", "pods", "-l", &selector, "-o", "wide"])
        );
        println!();
        println!("$ kubectl logs -l {selector} -c agent");
        print!(
            "{}",
            kubectl(&["logs", "-l", &selector, "-c", "agent", "--tail=-1"])
        );
    }
    for p in platforms
        .iter()
        .filter(|p| p["executor"]["kind"].as_str() == Some("Runner"))
    {
        println!(
            "  {} built on runner {}{}",
            p["platform"].as_str().unwrap_or_default(),
            p["executor"]["name"].as_str().unwrap_or_default(),
            if p["executor"]["emulated"].as_bool() == Some(true) {
                " (emulated)"
            } else {
                ""
            }
        );
    }
    if !platforms.is_empty() && !on_pods {
        println!();
        println!("$ kubectl get buildrunners");
        print!("{}", kubectl(&["get", "buildrunners"]));
    }
    let image = &status["image"];
    let (Some(reference), Some(digest), Some(pinned)) = (
        image["reference"].as_str(),
        image["digest"].as_str(),
        image["pinned"].as_str(),
    ) else {
        let why: Vec<String> = status["platforms"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                format!(
                    "{}: {}",
                    p["platform"].as_str().unwrap_or_default(),
                    p["message"].as_str().unwrap_or_default()
                )
            })
            .collect();
        return Err(DevError::Example(format!(
            "ended {last}: {}",
            why.join("; ")
        )));
    };
    println!();
    println!("status.image:");
    println!("  reference: {reference}");
    println!("  digest:    {digest}");
    println!("  pinned:    {pinned}");
    let repo_tag = reference
        .trim_start_matches(&format!("{registry}/"))
        .to_string();
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap_or((&repo_tag, "latest"));
    if platforms.len() > 1 {
        return show_index(reference, &platforms);
    }
    println!();
    println!("Check it against the registry:");
    println!(
        "  curl -sI -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://{registry}/v2/{repo}/manifests/{tag} | grep -i docker-content-digest"
    );
    Ok(())
}

/// A Tripod platform (`windows(10.0.17763)/amd64`) as crane writes it
/// (`windows/amd64:10.0.17763`).
pub fn crane_platform(platform: &str) -> String {
    match platform.split_once('(').zip(platform.split_once(")/")) {
        Some(((os, _), (with_version, rest))) => {
            let version = with_version
                .split_once('(')
                .map(|x| x.1)
                .unwrap_or_default();
            format!("{os}/{rest}:{version}")
        }
        None => platform.to_string(),
    }
}

/// Prints the image index under `reference` and the manifest each
/// platform resolves to, as crane (an independent client, built from its
/// Go module by `testenv/crane.sh`) reads them.
fn show_index(reference: &str, platforms: &[serde_json::Value]) -> Result<(), DevError> {
    let crane = crate::scripts::script(&source_dir(), "crane.sh", &[])
        .map_err(|e| DevError::Example(e.to_string()))?
        .trim()
        .to_string();
    let run = |args: &[&str]| -> Result<String, DevError> {
        let out = Command::new(&crane)
            .args(args)
            .output()
            .map_err(io(format!("run {crane}")))?;
        if !out.status.success() {
            return Err(DevError::Example(format!(
                "crane {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let index = run(&["manifest", "--insecure", reference])?;
    let doc: serde_json::Value = serde_json::from_str(&index)
        .map_err(|e| DevError::Example(format!("the index is not JSON: {e}")))?;
    println!();
    println!("$ crane manifest --insecure {reference}    (the image index)");
    for entry in doc["manifests"].as_array().cloned().unwrap_or_default() {
        let p = &entry["platform"];
        let mut platform = format!(
            "{}/{}",
            p["os"].as_str().unwrap_or_default(),
            p["architecture"].as_str().unwrap_or_default()
        );
        if let Some(v) = p["variant"].as_str() {
            platform.push_str(&format!("/{v}"));
        }
        if let Some(v) = p["os.version"].as_str() {
            platform.push_str(&format!(" os.version {v}"));
        }
        println!(
            "  {:<40} {}",
            platform,
            entry["digest"].as_str().unwrap_or_default()
        );
    }
    println!();
    println!("Each platform as a client pulling it resolves it (crane digest --platform):");
    for p in platforms {
        let want = p["platform"].as_str().unwrap_or_default();
        let resolved = run(&[
            "digest",
            "--insecure",
            "--platform",
            &crane_platform(want),
            reference,
        ])?;
        let built = p["digest"].as_str().unwrap_or_default();
        println!(
            "  {want:<16} {resolved}{}",
            if resolved == built {
                "  (= status.platforms[].digest)"
            } else {
                "  (differs from the status!)"
            }
        );
        if resolved != built {
            return Err(DevError::Example(format!(
                "crane resolves {want} to {resolved}, the status says {built}"
            )));
        }
    }
    Ok(())
}
