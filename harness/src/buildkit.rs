//! A real BuildKit daemon for the BuildKit backend: `buildkitd` built from
//! its Go module (`testenv/buildkit.sh`), with the OCI worker running RUN
//! steps through the real node's runc (`testenv/node.sh`).
//!
//! It runs in a mount namespace of its own (`unshare --mount`), so every
//! mount it makes (snapshots, RUN roots) dies with it; RUN steps share the
//! host's network, as on a build host (a runner). Plain-HTTP registries
//! are listed in its `buildkitd.toml`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::process::{spawn_supervised, supervised_command};
use crate::scripts::script;

/// A running buildkitd. Dropping it stops it (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct Buildkitd {
    /// `unix:///…/buildkitd.sock`.
    pub address: String,
    /// `tcp://127.0.0.1:PORT`, the same daemon (plain TCP on loopback: for
    /// clients that cannot use a Unix socket, such as Windows binaries run
    /// under Wine).
    pub tcp_address: String,
    /// The `buildctl` to drive it with.
    pub buildctl: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
}

/// The directory with `buildkitd` and `buildctl` (built once, cached).
pub fn buildkit_bin(source_dir: &Path) -> Result<PathBuf, Error> {
    Ok(PathBuf::from(
        script(source_dir, "buildkit.sh", &[])?.trim(),
    ))
}

/// Starts buildkitd with its state under `dir` (`dir/root`, `dir/buildkitd.sock`,
/// `dir/buildkitd.log`), treating `insecure_registries` (`host:port`) as
/// plain HTTP. Returns once it answers `buildctl debug workers`.
pub fn start_buildkitd(
    source_dir: &Path,
    dir: &Path,
    insecure_registries: &[String],
) -> Result<Buildkitd, Error> {
    let bin = buildkit_bin(source_dir)?;
    let node_bin = PathBuf::from(script(source_dir, "node.sh", &[])?.trim());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut config = String::new();
    for r in insecure_registries {
        config.push_str(&format!(
            "[registry.\"{r}\"]\n  http = true\n  insecure = true\n"
        ));
    }
    let config_path = dir.join("buildkitd.toml");
    std::fs::write(&config_path, config)
        .map_err(|e| Error::io(format!("write {}", config_path.display()), e))?;
    let socket = dir.join("buildkitd.sock");
    let _ = std::fs::remove_file(&socket);
    let address = format!("unix://{}", socket.display());
    let tcp_address = format!("tcp://127.0.0.1:{}", crate::free_port()?);
    let log_path = dir.join("buildkitd.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::io(format!("create {}", log_path.display()), e))?;
    let err = log
        .try_clone()
        .map_err(|e| Error::io("clone a log handle".to_string(), e))?;
    let mut cmd = supervised_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(bin.join("buildkitd"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--addr")
        .arg(&address)
        .arg("--addr")
        .arg(&tcp_address)
        .arg("--config")
        .arg(&config_path)
        .args([
            "--containerd-worker=false",
            "--oci-worker=true",
            "--oci-worker-net=host",
            "--oci-worker-gc=false",
        ])
        .arg(format!(
            "--oci-worker-binary={}",
            node_bin.join("runc").display()
        ))
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", node_bin.display()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    let child = spawn_supervised(cmd).map_err(|source| Error::Spawn {
        name: "buildkitd",
        binary: bin.join("buildkitd"),
        source,
    })?;
    let mut daemon = Buildkitd {
        address,
        tcp_address,
        buildctl: bin.join("buildctl"),
        child: Some(child),
        dir: dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::process::Command::new(&daemon.buildctl)
            .args(["--addr", &daemon.address, "debug", "workers"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(daemon);
        }
        if let Some(Ok(Some(status))) = daemon.child.as_mut().map(|c| c.try_wait()) {
            return Err(Error::Exited {
                name: "buildkitd",
                status,
                log: log_path.clone(),
                log_tail: tail(&log_path),
            });
        }
        if Instant::now() > deadline {
            return Err(Error::Script(format!(
                "buildkitd did not answer within 60s\n{}",
                tail(&log_path)
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Buildkitd {
    /// Stops the daemon: SIGTERM (it cancels running builds and their
    /// containers), SIGKILL after 20 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Buildkitd {
    fn drop(&mut self) {
        self.stop();
    }
}
