//! RUN steps on macOS: the command runs on the host under a Seatbelt
//! profile (`sandbox-exec`) that lets it write only inside the build root
//! and a private temporary directory, with no network. Compiled on macOS
//! only; not run by Tripod's tests (they run on Linux).

use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buildd::BuildEvent;

/// The Seatbelt profile: read anything but `PRIVATE` (the runner's own
/// files; the build's `ROOT` and `TMP` excepted), write only under `ROOT`
/// and `TMP`, no network. RUN still runs as the agent's user: run the agent
/// as a user of its own (docs/runners.md).
const PROFILE: &str = r#"(version 1)
(deny default)
(allow process-fork)
(allow process-exec)
(allow signal (target same-sandbox))
(allow sysctl-read)
(allow mach-lookup)
(allow ipc-posix-shm)
(allow file-read*)
PRIVATE
(allow file-read* (subpath (param "ROOT")) (subpath (param "TMP")))
(allow file-write*
  (subpath (param "ROOT"))
  (subpath (param "TMP"))
  (literal "/dev/null")
  (literal "/dev/zero")
  (literal "/dev/tty"))
(allow file-ioctl (literal "/dev/null") (literal "/dev/tty"))
(deny network*)
"#;

/// Lines of output kept for a failure message.
const LAST_LINES: usize = 20;

/// One RUN.
pub struct RunIn<'a> {
    /// The build root (the image's `/`).
    pub root: &'a Path,
    /// The command.
    pub argv: &'a [String],
    /// ENV so far.
    pub env: &'a [(String, String)],
    /// WORKDIR (an image path).
    pub workdir: &'a str,
    /// Paths RUN may not read (the runner's work directory, with its
    /// journal and other builds; its token and CA files), except the
    /// build's own root.
    pub private: &'a [std::path::PathBuf],
    /// Where output lines go.
    pub events: &'a mpsc::Sender<BuildEvent>,
    /// Stops the command.
    pub cancel: &'a CancellationToken,
}

/// Runs the command; on failure, the message and the last output lines.
pub async fn run(r: RunIn<'_>) -> Result<(), (String, Vec<String>)> {
    let fail = |m: String| (m, Vec::new());
    let tmp = r.root.with_file_name("tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| fail(format!("{}: {e}", tmp.display())))?;
    let cwd = super::layer::safe_create_dirs(r.root, r.workdir).map_err(fail)?;
    let denied: String = r
        .private
        .iter()
        .map(|p| {
            let quoted = p
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            format!("(deny file-read* (subpath \"{quoted}\"))\n")
        })
        .collect();
    let profile = PROFILE.replace("PRIVATE\n", &denied);
    let mut cmd = Command::new("/usr/bin/sandbox-exec");
    cmd.arg("-p")
        .arg(profile)
        .arg("-D")
        .arg(format!("ROOT={}", r.root.display()))
        .arg("-D")
        .arg(format!("TMP={}", tmp.display()))
        .args(r.argv)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", r.root)
        .env("TMPDIR", &tmp)
        .env("TRIPOD_ROOT", r.root)
        .envs(r.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start sandbox-exec: {e}")))?;
    let (tx, mut rx) = mpsc::channel::<String>(256);
    for out in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l).await;
            }
        });
    }
    drop(tx);
    let mut last: Vec<String> = Vec::new();
    let status = loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(l) => {
                    let _ = r.events.send(BuildEvent::Log(l.clone())).await;
                    last.push(l);
                    if last.len() > LAST_LINES {
                        last.remove(0);
                    }
                }
                None => break child.wait().await,
            },
            _ = r.cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(("cancelled".into(), last));
            }
        }
    };
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err((format!("exit status {}", s.code().unwrap_or(-1)), last)),
        Err(e) => Err((format!("wait: {e}"), last)),
    }
}
