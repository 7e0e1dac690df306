//! Spawning buildd as a child process (the agent's runner mode): a 0700 TLS
//! directory, the `LISTENING host:port` handshake on stdout, an mTLS dial,
//! and SIGTERM then SIGKILL after a grace period.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::proto::buildd::v1::builder_client::BuilderClient;
use crate::tls::{TlsDir, TlsError};

/// Errors spawning or talking to a child buildd.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The TLS directory could not be prepared.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The process could not be started.
    #[error("cannot start {program}: {source}")]
    Start {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process exited or went silent before the handshake.
    #[error("buildd did not report LISTENING: {0}")]
    Handshake(String),
    /// The mTLS connection failed.
    #[error("cannot connect to buildd at {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A running child buildd.
pub struct SpawnedBuildd {
    child: Child,
    /// Held open while buildd should live.
    _stdin: Option<tokio::process::ChildStdin>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its TLS directory.
    pub tls: TlsDir,
}

/// Parses the handshake line `LISTENING host:port`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("LISTENING ")?.trim().parse().ok()
}

/// Starts `program buildd --listen 127.0.0.1:0 --tls-dir DIR ARGS…` and
/// waits up to `timeout` for its handshake.
pub async fn spawn(
    program: &Path,
    tls_dir: &Path,
    args: &[String],
    timeout: Duration,
) -> Result<SpawnedBuildd, SpawnError> {
    let tls = TlsDir::new(tls_dir);
    tls.ensure()?;
    let mut cmd = Command::new(program);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd
        .args(["buildd", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(tls_dir)
        .args(args)
        // buildd started with --exit-with-stdin ends when this pipe
        // closes: when the agent drops it, or dies however it dies.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Dropped without `shutdown`, buildd still ends: its standard
        // input closes and it cancels its builds (buildah's whole group).
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| SpawnError::Start {
            program: program.to_path_buf(),
            source,
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| SpawnError::Handshake("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let handshake = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addr) = parse_listening(&line) {
                return Some(addr);
            }
        }
        None
    };
    let addr = match tokio::time::timeout(timeout, handshake).await {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            let status = child.wait().await.ok();
            return Err(SpawnError::Handshake(format!(
                "buildd exited ({}) before listening",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown status".into())
            )));
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(SpawnError::Handshake(format!(
                "no handshake within {timeout:?}"
            )));
        }
    };
    // Keep draining stdout so buildd never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stdin = child.stdin.take();
    Ok(SpawnedBuildd {
        child,
        _stdin: stdin,
        addr,
        tls,
    })
}

/// Dials buildd at `addr` with the client identity of `tls`.
pub async fn connect(addr: SocketAddr, tls: &TlsDir) -> Result<BuilderClient<Channel>, SpawnError> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|source| SpawnError::Connect { addr, source })?
        .tls_config(tls.client_config()?)
        .map_err(|source| SpawnError::Connect { addr, source })?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| SpawnError::Connect { addr, source })?;
    Ok(BuilderClient::new(channel))
}

impl SpawnedBuildd {
    /// A client over mTLS.
    pub async fn connect(&self) -> Result<BuilderClient<Channel>, SpawnError> {
        connect(self.addr, &self.tls).await
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Closes its standard input and sends SIGTERM, then SIGKILL (to its
    /// process group) after `grace`. Returns whether it exited in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        drop(self._stdin.take());
        let Some(pid) = self.child.id() else {
            return true;
        };
        crate::os::terminate(pid);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                crate::os::kill_group(pid);
                let _ = self.child.wait().await;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_line() {
        assert_eq!(
            parse_listening("LISTENING 127.0.0.1:4567\n"),
            Some("127.0.0.1:4567".parse().unwrap())
        );
        assert_eq!(parse_listening("listening soon"), None);
        assert_eq!(parse_listening("LISTENING nowhere"), None);
    }
}
