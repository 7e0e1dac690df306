//! The few things Tripod asks of the operating system that differ between
//! Unix and Windows: private files, stopping processes, shutdown signals.
//! Everything else uses `std` and `tokio` directly.

use std::path::Path;

/// Writes `data` to `path`, readable by its owner only (mode 0600 on Unix;
/// on Windows the file inherits its directory's ACL, which Tripod's
/// directories restrict to the service account).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    f.write_all(data)
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// Asks process `pid` to stop as on Ctrl-C (SIGINT on Unix; on Windows,
/// where a console signal cannot be sent to one process, it is killed).
pub fn interrupt(pid: u32) {
    signal(pid, "-INT", false);
}

/// Asks process `pid` to terminate (SIGTERM on Unix, killed on Windows).
pub fn terminate(pid: u32) {
    signal(pid, "-TERM", false);
}

/// Kills process `pid` and, on Unix, its whole process group (SIGKILL).
pub fn kill_group(pid: u32) {
    signal(pid, "-KILL", true);
}

/// Sends a signal with kill(1) (Unix) or taskkill (Windows).
fn signal(pid: u32, sig: &str, group: bool) {
    #[cfg(unix)]
    {
        let target = if group {
            format!("-{pid}")
        } else {
            pid.to_string()
        };
        let _ = std::process::Command::new("kill")
            .args([sig, "--", &target])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    #[cfg(windows)]
    {
        let _ = (sig, group);
        let _ = std::process::Command::new("taskkill")
            .args(["/F", "/T", "/PID", &pid.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether process `pid` is still running (not a zombie).
pub fn alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat.contains(") Z "),
            Err(_) => false,
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
    #[cfg(windows)]
    {
        std::process::Command::new("tasklist")
            .args(["/FI", &format!("PID eq {pid}"), "/NH"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&pid.to_string()))
    }
}

/// Resolves when the process is asked to stop: SIGTERM or SIGINT on Unix,
/// Ctrl-C / Ctrl-Break / service stop on Windows. Err when the handlers
/// cannot be installed.
pub async fn stop_requested() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(windows)]
    {
        let mut brk = tokio::signal::windows::ctrl_break()?;
        let mut close = tokio::signal::windows::ctrl_close()?;
        let mut shutdown = tokio::signal::windows::ctrl_shutdown()?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|_| "Ctrl-C"),
            _ = brk.recv() => Ok("Ctrl-Break"),
            _ = close.recv() => Ok("close"),
            _ = shutdown.recv() => Ok("shutdown"),
        }
    }
}
