//! Spawning child processes that die with the test process.
//!
//! `setpriv --pdeathsig KILL` asks the kernel to SIGKILL the child when its
//! parent *thread* exits. Tokio test runtimes start and stop worker threads
//! all the time, so every child is forked from one dedicated thread that lives
//! as long as the process does: the children then die exactly when the process
//! does, however it ends (panic, `SIGKILL`, `abort`).

use std::ffi::OsStr;
use std::io;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawner thread's inbox; `None` when the thread could not be started.
static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();

/// Whether `setpriv --pdeathsig` works on this machine (checked once).
static SETPRIV: OnceLock<bool> = OnceLock::new();

fn setpriv_available() -> bool {
    *SETPRIV.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn spawner() -> Option<&'static mpsc::Sender<Job>> {
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            thread::Builder::new()
                .name("tripod-testenv-spawner".into())
                .spawn(move || {
                    // Lives until the process exits: the statics keep a sender.
                    for (mut cmd, reply) in rx {
                        // The requester may have gone away; then the child is
                        // simply dropped (and keeps running, as with `spawn`).
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// A [`Command`] that runs `program` under `setpriv --pdeathsig KILL --`
/// when `setpriv` (util-linux) is available, and `program` directly
/// otherwise.
///
/// `setpriv` `exec`s the program, so the spawned child's pid is the
/// program's pid. Add arguments, environment, working directory and stdio to
/// the returned command as usual, then start it with [`spawn_supervised`]:
/// the death signal is only useful when the forking thread outlives the test.
pub fn supervised_command(program: impl AsRef<OsStr>) -> Command {
    if setpriv_available() {
        // By absolute path: the child's PATH may not contain /usr/bin.
        let setpriv = if std::path::Path::new("/usr/bin/setpriv").exists() {
            "/usr/bin/setpriv"
        } else {
            "setpriv"
        };
        let mut cmd = Command::new(setpriv);
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Spawns `cmd` from a dedicated, process-lifetime thread and returns the
/// child.
///
/// Build `cmd` with [`supervised_command`] (not `Command::new`) so that the
/// child gets `SIGKILL` when this process dies: the parent-death signal
/// fires when the *thread* that forked the child exits, and this thread never
/// does while the process lives. A `Command` cannot be rewrapped after the
/// fact (its stdio is not readable back), so other commands are spawned
/// unchanged, without a death signal (logged at debug level). Blocks only
/// for the `fork`/`exec` itself.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use std::process::Stdio;
/// let log = std::fs::File::create("/tmp/controller.log")?;
/// let mut cmd = tripod::testenv::supervised_command("/path/to/tripod");
/// cmd.arg("controller").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
/// let child = tripod::testenv::spawn_supervised(cmd)?;
/// # drop(child);
/// # Ok(())
/// # }
/// ```
pub fn spawn_supervised(cmd: Command) -> io::Result<Child> {
    let Some(inbox) = spawner() else {
        return Err(io::Error::other(
            "the testenv spawner thread could not be started",
        ));
    };
    let program = std::path::Path::new(cmd.get_program());
    if setpriv_available() && program.file_name().is_none_or(|n| n != "setpriv") {
        tracing::debug!(
            program = %cmd.get_program().to_string_lossy(),
            "spawned without a parent-death signal: build it with supervised_command"
        );
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    inbox
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the testenv spawner thread has exited"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the testenv spawner thread dropped the request"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawns_from_the_spawner_thread() {
        let mut cmd = supervised_command("true");
        cmd.stdout(Stdio::null());
        let mut child = spawn_supervised(cmd).unwrap();
        assert!(child.wait().unwrap().success());
    }
}
