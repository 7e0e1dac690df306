//! Running the harness's shell scripts (`testenv/*.sh`): their progress on
//! stderr passes through, their answer comes on stdout.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::Error;

/// Runs `bash <source>/testenv/<script> args…`, its stderr passed through
/// (build progress), and returns its stdout.
pub fn script(source_dir: &Path, name: &str, args: &[&str]) -> Result<String, Error> {
    let path = source_dir.join("testenv").join(name);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io(format!("run bash {}", path.display()), e))?;
    if !out.status.success() {
        return Err(Error::Script(format!(
            "{} {} failed ({}); its output is above",
            path.display(),
            args.join(" "),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
