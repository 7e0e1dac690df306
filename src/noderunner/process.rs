//! Container processes: spawning in their own process group, waiting,
//! signalling the group, reading what they leave behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::sync::oneshot;

use super::launch::Launch;
use crate::testenv::{spawn_supervised, supervised_command};

/// Bytes of a termination-message file that are read (as a kubelet does).
const TERMINATION_MESSAGE_MAX: u64 = 4096;
/// `FallbackToLogsOnError` takes at most this many bytes of the log ...
const LOG_TAIL_BYTES: u64 = 2048;
/// ... and at most this many lines.
const LOG_TAIL_LINES: usize = 80;

/// A started process, leader of its own process group. Dropping it before
/// [`Proc::mark_exited`] kills the whole group (`SIGKILL`), so that an
/// aborted Pod task leaves nothing behind.
#[derive(Debug)]
pub(crate) struct Proc {
    /// Process id, which is also the process group id.
    pub pid: u32,
    exited: bool,
}

impl Proc {
    /// The leader exited and was reaped: do not signal on drop.
    pub(crate) fn mark_exited(&mut self) {
        self.exited = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.exited {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.pid)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Resolves to the exit status once the process exits.
pub(crate) type ExitReceiver = oneshot::Receiver<io::Result<ExitStatus>>;

/// Starts `launch` in a new process group (through
/// [`supervised_command`]: it dies with this process), stdout and stderr
/// appended to its log file, stdin from `/dev/null`, exactly `launch.env`
/// as its environment.
pub(crate) async fn start(launch: &Launch) -> io::Result<(Proc, ExitReceiver)> {
    let launch = launch.clone();
    tokio::task::spawn_blocking(move || start_blocking(&launch))
        .await
        .map_err(io::Error::other)?
}

fn start_blocking(launch: &Launch) -> io::Result<(Proc, ExitReceiver)> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)?;
    let log2 = log.try_clone()?;
    let program = launch
        .program
        .as_ref()
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.clone()))?;
    let mut cmd = supervised_command(program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    let mut child = spawn_supervised(cmd)?;
    let proc = Proc {
        pid: child.id(),
        exited: false,
    };
    let (tx, rx) = oneshot::channel();
    // A plain thread, not the runtime's blocking pool: it may wait for
    // hours, and must not hold up the runtime's shutdown.
    std::thread::Builder::new()
        .name(format!("noderunner-wait-{}", proc.pid))
        .spawn(move || {
            let _ = tx.send(child.wait());
        })?;
    // (If the thread cannot start, `proc` is dropped with the error: the
    // group is killed.)
    Ok((proc, rx))
}

/// Sends `signal` (`TERM`, `KILL`) to process group `pgid` with the `kill`
/// command. A group that is gone already is not an error.
pub(crate) async fn signal_group(pgid: u32, signal: &str) {
    let result = tokio::process::Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    match result {
        Ok(status) => tracing::trace!(pgid, signal, %status, "signalled process group"),
        Err(e) => tracing::warn!(pgid, signal, error = %e, "cannot run kill"),
    }
}

/// The exit code Kubernetes reports: the code, or 128 + the signal.
pub(crate) fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The first 4 KiB of the termination-message file; `None` if empty or
/// unreadable.
pub(crate) fn termination_message(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(TERMINATION_MESSAGE_MAX)
        .read_to_end(&mut bytes)
        .ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (!text.trim().is_empty()).then_some(text)
}

/// The end of a log for `FallbackToLogsOnError`: at most 2 KiB and at most
/// 80 lines; `None` if empty or unreadable.
pub(crate) fn log_tail(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    (!tail.trim().is_empty()).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_logs() {
        let dir = std::env::temp_dir().join(format!("tripod-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let tail = log_tail(&log).unwrap();
        assert_eq!(tail.lines().count(), 80);
        assert!(tail.ends_with("line 199"), "{tail}");
        std::fs::write(&log, "x".repeat(5000)).unwrap();
        assert_eq!(log_tail(&log).unwrap().len(), 2048);
        std::fs::write(&log, "").unwrap();
        assert_eq!(log_tail(&log), None);
        assert_eq!(termination_message(&log), None);
        std::fs::write(&log, "done\n").unwrap();
        assert_eq!(termination_message(&log).as_deref(), Some("done\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
