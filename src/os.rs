//! The few things Tripod asks of the operating system that differ between
//! Unix and Windows: private files, stopping processes, shutdown signals.
//! Everything else uses `std` and `tokio` directly.

use std::path::Path;

/// Writes `data` to `path`, readable by its owner only (mode 0600 on Unix;
/// on Windows an ACL of SYSTEM, Administrators and the current user, see
/// [`set_mode`]).
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
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    #[cfg(windows)]
    restrict_to_owner(path).map_err(|e| format!("restrict {}: {e}", path.display()))?;
    Ok(())
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

/// The signals that ask this process to stop: SIGTERM and SIGINT on Unix;
/// Ctrl-C, Ctrl-Break, console close and system shutdown on Windows (what
/// a console process receives: as a Windows service, the agent would need
/// a service control handler, which Tripod does not have; run it under a
/// service wrapper that sends Ctrl-Break, or as a HostProcess container). Installed at creation, so a
/// signal that arrives before the first [`StopSignals::recv`] is kept.
pub struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    shutdown: tokio::signal::windows::CtrlShutdown,
}

impl StopSignals {
    /// Installs the handlers.
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows;
            Ok(Self {
                ctrl_c: windows::ctrl_c()?,
                ctrl_break: windows::ctrl_break()?,
                close: windows::ctrl_close()?,
                shutdown: windows::ctrl_shutdown()?,
            })
        }
    }

    /// Waits for the next stop request; returns its name (`SIGTERM`, …).
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(windows)]
        {
            tokio::select! {
                _ = self.ctrl_c.recv() => "Ctrl-C",
                _ = self.ctrl_break.recv() => "Ctrl-Break",
                _ = self.close.recv() => "close",
                _ = self.shutdown.recv() => "shutdown",
            }
        }
    }
}

/// Sets the permission bits of `path` (Unix). On Windows, a mode without
/// group or other bits replaces `path`'s ACL (inheritance removed) with
/// full control for SYSTEM, Administrators and the current user, through
/// `icacls`; other modes leave the inherited ACL.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(windows)]
    {
        if mode & 0o077 == 0 {
            restrict_to_owner(path)
        } else {
            Ok(())
        }
    }
}

/// Windows: `path` readable by SYSTEM, Administrators and this user only.
#[cfg(windows)]
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    let dir = path.is_dir();
    let grant = |who: &str| {
        if dir {
            format!("{who}:(OI)(CI)F")
        } else {
            format!("{who}:F")
        }
    };
    let mut cmd = std::process::Command::new("icacls");
    cmd.arg(path)
        .args(["/inheritance:r", "/grant:r"])
        .arg(grant("*S-1-5-18"))
        .arg(grant("*S-1-5-32-544"));
    if let Ok(user) = std::env::var("USERNAME")
        && !user.is_empty()
    {
        cmd.arg(grant(&user));
    }
    let out = cmd.stdin(std::process::Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "icacls {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Gives `path` to group `gid` (Unix only: Windows has no group IDs).
pub fn chown_group(path: &Path, gid: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::chown(path, None, Some(gid))
    }
    #[cfg(windows)]
    {
        let _ = (path, gid);
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "group ownership does not exist on Windows",
        ))
    }
}

/// The permission bits of `meta` (Unix); on Windows, `0o700`: Tripod's
/// private directories get their ACL from [`set_mode`] when made, and
/// Windows has no mode bits to check afterwards.
pub fn mode_of(meta: &std::fs::Metadata) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode()
    }
    #[cfg(windows)]
    {
        let _ = meta;
        0o700
    }
}

/// Opens `path` for writing, created with `mode` (Unix), truncated — or
/// only when it does not exist yet with `create_new`.
pub fn create_file(path: &Path, mode: u32, create_new: bool) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(windows)]
    let _ = mode;
    opts.open(path)
}

/// Creates directory `path` with `mode` (Unix), failing if it exists.
pub fn create_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg_attr(windows, allow(unused_mut))]
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(mode);
    }
    #[cfg(windows)]
    let _ = mode;
    b.create(path)
}
