//! Runners for the runner leg: `tripod agent --runner NAME` processes on
//! this machine, started the way an administrator starts one on a build
//! host: the token and CA read from the Secret the controller made for the
//! BuildRunner, written to files, handed to the agent.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::Error;
use crate::process::{spawn_supervised, supervised_command};

/// How to start a runner.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// The `tripod` binary.
    pub tripod: PathBuf,
    /// Name of its BuildRunner.
    pub name: String,
    /// The executor service, `HOST:PORT`.
    pub controller: String,
    /// Namespace of the controller (where the token Secret is).
    pub secret_namespace: String,
    /// `--capacity`.
    pub capacity: u32,
    /// `--label KEY=VALUE` arguments.
    pub labels: Vec<String>,
    /// `--test-darwin ARCH`: build darwin/ARCH without RUN on this Linux host.
    pub test_darwin: Option<String>,
    /// `--buildkit-addr` and `--buildctl`: a BuildKit daemon the runner's
    /// builds may use (it then builds windows/<arch> too).
    pub buildkit: Option<BuildkitRef>,
    /// Working directory (journal, builds, image storage, the token files).
    pub work_dir: PathBuf,
    /// Log file (appended to across restarts).
    pub log: PathBuf,
    /// `RUST_LOG`.
    pub rust_log: String,
}

/// A BuildKit daemon and its client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BuildkitRef {
    /// The daemon's address (`unix:///…`).
    pub address: String,
    /// The `buildctl` program.
    pub buildctl: PathBuf,
}

/// A running `tripod agent --runner`.
#[derive(Debug)]
pub struct Runner {
    child: Child,
    /// How it was started.
    pub opts: RunnerOptions,
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Name of the token Secret of runner `name` (as the controller names it).
pub fn secret_name(name: &str) -> String {
    format!("tripod-runner-{name}")
}

/// Waits up to `timeout` for the runner's token Secret and writes its
/// `token` and `ca.crt` into `dir` (mode 0600). Returns the token.
pub async fn fetch_credentials(
    client: &Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    timeout: Duration,
) -> Result<String, Error> {
    use std::os::unix::fs::PermissionsExt;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let start = Instant::now();
    let secret = loop {
        if let Some(s) = api.get_opt(&secret_name(name)).await? {
            break s;
        }
        if start.elapsed() > timeout {
            return Err(Error::Script(format!(
                "the controller made no Secret {namespace}/{} for BuildRunner {name} within {timeout:?}",
                secret_name(name)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let data = secret.data.unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut token = String::new();
    for key in ["token", "ca.crt"] {
        let value = data
            .get(key)
            .ok_or_else(|| Error::Script(format!("Secret {} has no {key}", secret_name(name))))?;
        let path = dir.join(key);
        std::fs::write(&path, &value.0)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        if key == "token" {
            token = String::from_utf8_lossy(&value.0).to_string();
        }
    }
    Ok(token)
}

impl Runner {
    /// Fetches the runner's credentials and starts it.
    pub async fn start(client: &Client, opts: RunnerOptions) -> Result<Runner, Error> {
        fetch_credentials(
            client,
            &opts.secret_namespace,
            &opts.name,
            &opts.work_dir.join("creds"),
            Duration::from_secs(60),
        )
        .await?;
        Self::spawn(opts)
    }

    /// Starts it with the credentials already in its work directory.
    pub fn spawn(opts: RunnerOptions) -> Result<Runner, Error> {
        let creds = opts.work_dir.join("creds");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log)
            .map_err(|e| Error::io(format!("open {}", opts.log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("clone log file", e))?;
        let mut cmd = supervised_command(&opts.tripod);
        cmd.arg("agent")
            .arg("--runner")
            .arg(&opts.name)
            .arg("--controller")
            .arg(&opts.controller)
            .arg("--token-file")
            .arg(creds.join("token"))
            .arg("--ca-file")
            .arg(creds.join("ca.crt"))
            .arg("--capacity")
            .arg(opts.capacity.to_string())
            .arg("--work-dir")
            .arg(&opts.work_dir)
            // Short, so the drain tests end quickly.
            .arg("--drain-timeout")
            .arg("600");
        for l in &opts.labels {
            cmd.arg("--label").arg(l);
        }
        if let Some(arch) = &opts.test_darwin {
            cmd.arg("--test-darwin").arg(arch);
        }
        if let Some(bk) = &opts.buildkit {
            cmd.arg("--buildkit-addr")
                .arg(&bk.address)
                .arg("--buildctl")
                .arg(&bk.buildctl);
        }
        cmd.env("RUST_LOG", &opts.rust_log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_supervised(cmd)
            .map_err(|e| Error::io(format!("start runner {}", opts.name), e))?;
        Ok(Runner { child, opts })
    }

    /// The process ID (of the agent, under `setpriv` when available).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (the agent drains).
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.opts.log).unwrap_or_default()
    }
}
