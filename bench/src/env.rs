//! The scale benchmarks' cluster: the real control plane (with an audit log
//! of the controller's requests and kube-scheduler's client limits raised),
//! a registry on loopback, kwok's simulated linux/amd64 nodes and one
//! `tripod controller` process with its own client certificate. No root,
//! no real node: only the control plane and Tripod are measured.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kube::Client;
use tripod_harness::controlplane::{ControlPlane, Options};
use tripod_harness::env::{ensure_namespace, install_crds};
use tripod_harness::kwok::{Kwok, KwokOptions, SimNode};
use tripod_harness::registry::{Registry, start_registry};
use tripod_harness::{spawn_supervised, supervised_command};

use crate::Error;
use crate::agent::RESULT_STAGE;

/// The namespace of the controller's Lease.
pub const SYSTEM_NAMESPACE: &str = "tripod-system";

/// What [`ScaleEnv::start`] needs.
#[derive(Debug, Clone)]
pub struct ScaleEnvOptions {
    /// State directory (wiped of etcd data on start).
    pub dir: PathBuf,
    /// The Tripod source tree (`testenv/`).
    pub source_dir: PathBuf,
    /// The `tripod` binary.
    pub tripod: PathBuf,
    /// How many simulated nodes.
    pub nodes: usize,
    /// More arguments of `tripod controller`.
    pub controller_args: Vec<String>,
    /// kube-scheduler's client QPS.
    pub scheduler_qps: u32,
}

/// A running scale cluster; [`ScaleEnv::stop`] stops it.
pub struct ScaleEnv {
    /// The control plane.
    pub cp: ControlPlane,
    /// An admin client (the bench's own requests).
    pub client: Client,
    /// The registry, `127.0.0.1:port`.
    pub registry: String,
    registry_process: Registry,
    kwok: Kwok,
    controller: Option<Child>,
    /// The controller's metrics address.
    pub metrics: String,
    /// The controller's log.
    pub controller_log: PathBuf,
    tripod: PathBuf,
    controller_args: Vec<String>,
    executor_port: u16,
}

impl ScaleEnv {
    /// Starts the control plane, registry, kwok with its nodes, the CRDs
    /// and the controller; returns once the controller reports ready.
    pub async fn start(opts: &ScaleEnvOptions) -> Result<ScaleEnv, Error> {
        let started = Instant::now();
        let dir = std::path::absolute(&opts.dir).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| Error::Io(e.to_string()))?;
        // A fresh controller log per run (restarts within a run append).
        let _ = std::fs::remove_file(dir.join("logs").join("controller.log"));
        let k8s_bin = tripod_harness::ensure_binaries(&opts.source_dir)?;
        let node_bin = PathBuf::from(
            tripod_harness::scripts::script(&opts.source_dir, "node.sh", &[])?.trim(),
        );
        let cp = ControlPlane::start(Options {
            dir: dir.join("cluster"),
            bin_dir: k8s_bin,
            pod_address: None,
            audit: true,
            scheduler_qps: Some(opts.scheduler_qps),
        })
        .await?;
        let client = cp.client().await?;
        let registry_process = start_registry(&dir, "registry", 0, None)?;
        let registry = registry_process.address.clone();
        let nodes = (0..opts.nodes)
            .map(|i| SimNode {
                name: format!("bench-{i:02}"),
                os: "linux".into(),
                arch: "amd64".into(),
                windows_build: None,
            })
            .collect();
        let kwok = Kwok::start(
            &KwokOptions {
                bin_dir: node_bin,
                kubeconfig: cp.kubeconfig().to_path_buf(),
                log_dir: dir.join("logs"),
                nodes,
                extra_stages: RESULT_STAGE.to_string(),
            },
            &client,
        )
        .await?;
        install_crds(&client, &opts.tripod).await?;
        ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
        let mut env = ScaleEnv {
            cp,
            client,
            registry,
            registry_process,
            kwok,
            controller: None,
            metrics: String::new(),
            controller_log: dir.join("logs").join("controller.log"),
            tripod: opts.tripod.clone(),
            controller_args: opts.controller_args.clone(),
            executor_port: tripod_harness::free_port()?,
        };
        env.start_controller().await?;
        tracing::info!(
            elapsed = ?started.elapsed(),
            nodes = opts.nodes,
            "scale cluster ready"
        );
        Ok(env)
    }

    /// Starts (or restarts) the controller and waits until `/readyz` says
    /// it leads (after a restart it may stand by until the old Lease ends).
    pub async fn start_controller(&mut self) -> Result<(), Error> {
        self.stop_controller();
        let metrics_port = tripod_harness::free_port()?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.controller_log)
            .map_err(|e| Error::Io(e.to_string()))?;
        let err = out.try_clone().map_err(|e| Error::Io(e.to_string()))?;
        let port = self.executor_port;
        let mut cmd = supervised_command(&self.tripod);
        cmd.args(["controller", "--lease-namespace", SYSTEM_NAMESPACE])
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .arg(format!("--executor-listen=127.0.0.1:{port}"))
            .arg(format!("--executor-address=127.0.0.1:{port}"))
            .arg("--executor-tls-san=127.0.0.1")
            .args(&self.controller_args)
            .env("KUBECONFIG", self.cp.controller_kubeconfig())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child =
            spawn_supervised(cmd).map_err(|e| Error::Io(format!("start controller: {e}")))?;
        self.controller = Some(child);
        self.metrics = format!("127.0.0.1:{metrics_port}");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _, body)) =
                tripod_harness::http_request(&self.metrics, "GET", "/readyz", "*/*")
                && body.starts_with(b"ok: leading")
            {
                return Ok(());
            }
            if let Some(c) = self.controller.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(Error::Io(format!(
                    "the controller exited ({status}); see {}",
                    self.controller_log.display()
                )));
            }
            if Instant::now() > until {
                return Err(Error::Io(format!(
                    "the controller is not ready after 60 s; see {}",
                    self.controller_log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The controller's process id.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            // Longer than the controller's own shutdown grace (20 s).
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The processes measured for CPU time: (name, pid).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ]
        .iter()
        .map(|n| n.to_string())
        .zip(self.cp.pids())
        .collect();
        out.push(("kwok".into(), self.kwok.pid()));
        out.push(("registry".into(), self.registry_process.child.id()));
        if let Some(pid) = self.controller_pid() {
            out.push(("tripod controller".into(), pid));
        }
        out.push(("bench (clients, agents)".into(), std::process::id()));
        out
    }

    /// The audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.cp.audit_log()
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.stop_controller();
        self.kwok.stop();
        let _ = self.registry_process.child.kill();
        let _ = self.registry_process.child.wait();
        self.cp.stop().await;
    }
}
