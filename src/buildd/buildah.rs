//! The buildah backend: `buildah bud` with chroot isolation, then `buildah
//! push` with a digest file. Runs without `privileged` and without
//! CAP_SYS_ADMIN (chroot isolation, vfs or overlay storage).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, BuildEvent, BuildFailure, BuildOutput, BuildSpec, parse_step};
use crate::platform::Os;
use crate::reference::ImageRef;

const LAST_LINES: usize = 20;

/// Settings of the buildah backend.
#[derive(Debug, Clone)]
pub struct Buildah {
    /// The `buildah` program.
    pub program: PathBuf,
    /// Image storage root (`--root`).
    pub root: PathBuf,
    /// Runtime state root (`--runroot`).
    pub runroot: PathBuf,
    /// Storage driver: `vfs` (works everywhere) or `overlay`.
    pub storage_driver: String,
    /// Scratch space for per-build files (credentials).
    pub work_dir: PathBuf,
}

impl Buildah {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--storage-driver")
            .arg(&self.storage_driver);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        cmd
    }

    /// The `bud` arguments of a build (after the global options).
    pub fn bud_args(spec: &BuildSpec, authfile: Option<&Path>) -> Vec<String> {
        let mut args = vec![
            "bud".to_string(),
            "--isolation".into(),
            "chroot".into(),
            "--layers".into(),
            "--platform".into(),
            spec.platform.to_string(),
            "-f".into(),
            spec.dockerfile_path().display().to_string(),
        ];
        if let Some(t) = &spec.target {
            args.push("--target".into());
            args.push(t.clone());
        }
        for (k, v) in &spec.build_args {
            args.push("--build-arg".into());
            args.push(format!("{k}={v}"));
        }
        for (k, v) in &spec.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        if let Some(cache) = &spec.cache_image {
            args.extend([
                "--cache-from".into(),
                cache.clone(),
                "--cache-to".into(),
                cache.clone(),
            ]);
        }
        if let Some(a) = authfile {
            args.push("--authfile".into());
            args.push(a.display().to_string());
        }
        for tag in &spec.tags {
            args.push("-t".into());
            args.push(tag.clone());
        }
        args.push(spec.context_dir.display().to_string());
        args
    }
}

/// Which storage driver buildah uses (`--storage-driver` of `tripod buildd`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDriver {
    /// overlay when buildd may mount it (CAP_SYS_ADMIN, as root or in a
    /// user namespace of its own), else vfs: probed once at start (root
    /// without CAP_SYS_ADMIN takes vfs without a probe).
    Auto,
    /// Full copies of each layer: works everywhere, slow for large images.
    Vfs,
    /// Kernel overlayfs: fast; needs the right to mount.
    Overlay,
}

/// How long each buildah command of the overlay probe may take (it
/// runs before buildd answers its handshake).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl StorageDriver {
    /// The driver to use: `auto` asks buildah to set up an overlay store
    /// in a scratch root under `root` (on the same file system as the real
    /// one: overlay upon overlay is refused) and takes vfs if it cannot.
    /// The second value says why, for the log.
    pub async fn resolve(self, program: &Path, root: &Path) -> (&'static str, String) {
        match self {
            Self::Vfs => ("vfs", "--storage-driver vfs".into()),
            Self::Overlay => ("overlay", "--storage-driver overlay".into()),
            Self::Auto => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                if root_without_sys_admin(&status) {
                    return (
                        "vfs",
                        "overlay is not usable here: root without CAP_SYS_ADMIN, where \
                         buildah mount is not permitted (not probed)"
                            .into(),
                    );
                }
                match probe_overlay(program, root).await {
                    Ok(()) => ("overlay", "buildah can mount overlay here".into()),
                    Err(why) => ("vfs", format!("overlay is not usable here: {why}")),
                }
            }
        }
    }
}

/// CAP_SYS_ADMIN's bit in the capability sets of `/proc/<pid>/status`.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether a process with this `/proc/<pid>/status` runs as root
/// (effective uid 0) without CAP_SYS_ADMIN, neither in its effective set
/// nor in its bounding set (what a program it starts as root can have),
/// as a build Pod's container does with the default capabilities. There
/// the probe's `buildah mount` fails with "operation not permitted"
/// (`tests/buildah_storage.rs` runs it through `capsh` so; every build
/// Pod logged vfs), so the answer is known without running buildah four
/// times, half a second before buildd answers on a small machine.
/// Anything else (another user, who may get a user namespace of its own,
/// or a status that does not read) is probed.
fn root_without_sys_admin(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let lacks_sys_admin = |name: &str| {
        field(name)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) == 0)
    };
    let effective_uid = field("Uid:").and_then(|v| v.split_whitespace().nth(1));
    effective_uid == Some("0") && lacks_sys_admin("CapEff:") && lacks_sys_admin("CapBnd:")
}

/// Mounts an empty working container in an overlay store in a scratch
/// root (what every build step does), then removes it all. A root without
/// the right to mount can still set up the store and the container: only
/// the mount tells.
async fn probe_overlay(program: &Path, root: &Path) -> Result<(), String> {
    // Of this process: two buildd starting on one root do not share it.
    let probe = root.join(format!(".tripod-overlay-probe-{}", std::process::id()));
    std::fs::create_dir_all(&probe).map_err(|e| format!("create {}: {e}", probe.display()))?;
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.arg("--root")
            .arg(probe.join("root"))
            .arg("--runroot")
            .arg(probe.join("run"))
            .args(["--storage-driver", "overlay"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
                Err(_) => Err(format!("buildah took more than {PROBE_TIMEOUT:?}")),
                Ok(Err(e)) => Err(format!("cannot run {}: {e}", program.display())),
                Ok(Ok(o)) if o.status.success() => {
                    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
                }
                Ok(Ok(o)) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let last = err
                        .lines()
                        .map(str::trim)
                        .find(|l| l.starts_with("Error:"))
                        .or_else(|| err.trim().lines().last())
                        .unwrap_or("no message");
                    Err(crate::outcome::cap(last, 300))
                }
            }
        }
    };
    let result = match buildah(&["from", "scratch"]).await {
        Ok(container) => buildah(&["mount", &container]).await.map(drop),
        Err(e) => Err(e),
    };
    let _ = buildah(&["umount", "--all"]).await;
    let _ = buildah(&["rm", "--all"]).await;
    if let Err(e) = std::fs::remove_dir_all(&probe) {
        tracing::debug!(error = %e, "could not remove the overlay probe's root");
    }
    result
}

/// The system's registries.conf, which a build's own extends.
const SYSTEM_REGISTRIES_CONF: &str = "/etc/containers/registries.conf";

/// The registries (`host[:port]`) a build pushes to: its tags' (and its
/// cache's when that is in the same registry).
pub fn output_registries(spec: &BuildSpec) -> Vec<String> {
    let mut hosts: Vec<String> = spec
        .tags
        .iter()
        .filter_map(|t| ImageRef::parse(t).ok())
        .map(|r| r.registry)
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// A registries.conf: the system's, plus an `insecure` entry for each of
/// `hosts` the system's does not mention already.
pub fn registries_conf(system: Option<&str>, hosts: &[String]) -> String {
    let mut text = system.unwrap_or_default().to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for host in hosts {
        let quoted = format!("\"{host}\"");
        // Configured already: a `[[registry]]` table (not a mirror's) with
        // this location or prefix.
        let mut table = String::new();
        let configured = text.lines().any(|l| {
            let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            if l.starts_with('[') {
                table = l;
                return false;
            }
            table == "[[registry]]"
                && (l == format!("location={quoted}") || l == format!("prefix={quoted}"))
        });
        if configured {
            continue;
        }
        text.push_str(&format!(
            "\n[[registry]]\nlocation = {quoted}\ninsecure = true\n"
        ));
    }
    text
}

/// Output of one buildah run.
struct Run {
    ok: bool,
    cancelled: bool,
    code: Option<i32>,
    last_lines: Vec<String>,
    last_step: Option<String>,
}

async fn run(
    cmd: Command,
    events: &mpsc::Sender<BuildEvent>,
    cancel: &CancellationToken,
) -> Result<Run, BuildFailure> {
    let (mut child, mut line_rx) = super::spawn_lines(cmd, "buildah")?;
    let pid = child.id();
    let mut last: VecDeque<String> = VecDeque::with_capacity(LAST_LINES);
    let mut last_step = None;
    let mut cancelled = false;
    loop {
        tokio::select! {
            line = line_rx.recv() => {
                let Some(line) = line else { break };
                if let Some(step @ BuildEvent::Step { .. }) = parse_step(&line) {
                    if let BuildEvent::Step { text, .. } = &step {
                        last_step = Some(text.clone());
                    }
                    let _ = events.send(step).await;
                }
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(line.clone());
                let _ = events.send(BuildEvent::Log(line)).await;
            }
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                if let Some(pid) = pid {
                    terminate_group(pid).await;
                }
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| BuildFailure::Internal(format!("waiting for buildah: {e}")))?;
    Ok(Run {
        ok: status.success(),
        cancelled,
        code: status.code(),
        last_lines: last.into_iter().collect(),
        last_step,
    })
}

/// SIGTERM to the process group, SIGKILL after 10 s.
async fn terminate_group(pid: u32) {
    #[cfg(unix)]
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{pid}")])
        .status()
        .await;
    for _ in 0..100 {
        if !crate::os::alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::os::kill_group(pid);
}

fn failure_message(run: &Run) -> String {
    run.last_lines
        .iter()
        .rev()
        .find(|l| l.to_lowercase().contains("error"))
        .cloned()
        .unwrap_or_else(|| format!("buildah exited with code {}", run.code.unwrap_or(-1)))
}

impl Backend for Buildah {
    async fn build(
        &self,
        spec: BuildSpec,
        events: mpsc::Sender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        spec.require_os(Os::Linux, "buildah")?;
        if spec.tags.is_empty() {
            return Err(BuildFailure::Invalid(
                "tags: at least one reference to push".into(),
            ));
        }
        if !spec.context_dir.is_dir() {
            return Err(BuildFailure::Invalid(format!(
                "context_dir: {} is not a directory",
                spec.context_dir.display()
            )));
        }
        let dockerfile = spec.dockerfile_path();
        if !dockerfile.is_file() {
            return Err(BuildFailure::Invalid(format!(
                "dockerfile: {} does not exist",
                dockerfile.display()
            )));
        }
        let work = super::WorkDir::create(&self.work_dir, &spec.build_id)?;
        self.build_in(&spec, work.path(), &events, &cancel).await
    }
}

impl Buildah {
    async fn build_in(
        &self,
        spec: &BuildSpec,
        work: &Path,
        events: &mpsc::Sender<BuildEvent>,
        cancel: &CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        let authfile = match &spec.docker_config_json {
            Some(json) => {
                let path = work.join("auth.json");
                write_private(&path, json)?;
                Some(path)
            }
            None => None,
        };
        // `insecure` (plain HTTP, no TLS verification) applies to the
        // output registry only, through a registries.conf of this build:
        // base images from anywhere else are pulled with TLS verified.
        let registries = if spec.insecure {
            let system = std::fs::read_to_string(SYSTEM_REGISTRIES_CONF).ok();
            let path = work.join("registries.conf");
            write_private(
                &path,
                registries_conf(system.as_deref(), &output_registries(spec)).as_bytes(),
            )?;
            Some(path)
        } else {
            None
        };
        let mut bud = self.command();
        bud.args(Self::bud_args(spec, authfile.as_deref()));
        if let Some(conf) = &registries {
            bud.env("CONTAINERS_REGISTRIES_CONF", conf);
        }
        let run_bud = run(bud, events, cancel).await?;
        if run_bud.cancelled {
            return Err(BuildFailure::Cancelled);
        }
        if !run_bud.ok {
            return Err(BuildFailure::StepFailed {
                step: run_bud.last_step.clone().unwrap_or_else(|| "build".into()),
                message: failure_message(&run_bud),
                last_lines: run_bud.last_lines,
            });
        }

        if spec.push_by_digest {
            return self.push_by_digest(spec, work, events, cancel).await;
        }
        let mut first_digest = None;
        for (i, tag) in spec.tags.iter().enumerate() {
            let digest_file = work.join(format!("digest-{i}"));
            let mut push = self.command();
            push.arg("push").arg("--digestfile").arg(&digest_file);
            if let Some(conf) = &registries {
                push.env("CONTAINERS_REGISTRIES_CONF", conf);
            }
            if let Some(a) = &authfile {
                push.arg("--authfile").arg(a);
            }
            push.arg(tag).arg(format!("docker://{tag}"));
            let _ = events.send(BuildEvent::Log(format!("pushing {tag}"))).await;
            let r = run(push, events, cancel).await?;
            if r.cancelled {
                return Err(BuildFailure::Cancelled);
            }
            if !r.ok {
                return Err(BuildFailure::PushFailed {
                    reference: tag.clone(),
                    message: failure_message(&r),
                    last_lines: r.last_lines,
                });
            }
            if first_digest.is_none() {
                let d = std::fs::read_to_string(&digest_file).map_err(|e| {
                    BuildFailure::Internal(format!(
                        "read digest file {}: {e}",
                        digest_file.display()
                    ))
                })?;
                first_digest = Some(d.trim().to_string());
            }
        }
        let digest = first_digest.unwrap_or_default();
        if !digest.starts_with("sha256:") {
            return Err(BuildFailure::Internal(format!(
                "buildah reported no digest ({digest:?})"
            )));
        }
        let size = self.image_size(&spec.tags[0]).await.unwrap_or(0);
        Ok(BuildOutput {
            digest,
            size,
            reference: spec.tags[0].clone(),
        })
    }

    /// Pushes the built image by digest only: buildah writes it (layers
    /// compressed, manifest final) to an OCI layout in the work directory,
    /// from which its blobs and manifest are uploaded unchanged, so the
    /// manifest digest is known before anything reaches the registry and
    /// no tag is written.
    async fn push_by_digest(
        &self,
        spec: &BuildSpec,
        work: &Path,
        events: &mpsc::Sender<BuildEvent>,
        cancel: &CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        let reference = spec.tags[0].clone();
        let layout = work.join("layout");
        let mut save = self.command();
        save.arg("push")
            .arg(&reference)
            .arg(format!("oci:{}:image", layout.display()));
        let r = run(save, events, cancel).await?;
        if r.cancelled {
            return Err(BuildFailure::Cancelled);
        }
        if !r.ok {
            return Err(BuildFailure::Internal(format!(
                "writing the image to an OCI layout: {}",
                failure_message(&r)
            )));
        }
        let push_failed = |message: String| BuildFailure::PushFailed {
            reference: reference.clone(),
            message,
            last_lines: Vec::new(),
        };
        let (client, creds) = spec.output_registry(&reference).map_err(push_failed)?;
        let _ = events
            .send(BuildEvent::Log(format!("pushing to {reference} by digest")))
            .await;
        let (digest, size) = tokio::select! {
            r = client.push_oci_layout(&reference, &layout, creds.as_ref()) => r.map_err(|e| push_failed(e.to_string()))?,
            _ = cancel.cancelled() => return Err(BuildFailure::Cancelled),
        };
        let reference = spec.pushed_reference(&digest);
        let _ = events
            .send(BuildEvent::Log(format!("pushed {reference}")))
            .await;
        Ok(BuildOutput {
            digest,
            size,
            reference,
        })
    }

    /// Sum of config and layer sizes in the local manifest of `image`.
    async fn image_size(&self, image: &str) -> Option<i64> {
        let mut cmd = self.command();
        cmd.args(["inspect", "--type", "image", image]);
        let out = cmd.output().await.ok()?;
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let manifest: serde_json::Value =
            serde_json::from_str(info.get("Manifest")?.as_str()?).ok()?;
        let config = manifest.pointer("/config/size")?.as_i64()?;
        let layers: i64 = manifest
            .get("layers")?
            .as_array()?
            .iter()
            .filter_map(|l| l.get("size")?.as_i64())
            .sum();
        Some(config + layers)
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), BuildFailure> {
    crate::os::write_private(path, data).map_err(BuildFailure::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// `/proc/self/status` of a container as root: `caps` its effective set.
    fn status(uid: &str, caps: &str) -> String {
        format!(
            "Name:\ttripod\nUmask:\t0022\nState:\tS (sleeping)\n\
             Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n\
             CapInh:\t0000000000000000\nCapPrm:\t{caps}\nCapEff:\t{caps}\n\
             CapBnd:\t{caps}\nNoNewPrivs:\t0\n"
        )
    }

    #[test]
    fn overlay_is_not_probed_for_root_without_sys_admin() {
        // containerd's default capabilities (no CAP_SYS_ADMIN): a build
        // Pod's buildd.
        assert!(root_without_sys_admin(&status("0", "00000000a80425fb")));
        // The same with CAP_SYS_ADMIN added (a user's buildd security
        // context): probed.
        assert!(!root_without_sys_admin(&status("0", "00000000a82425fb")));
        // Not root: buildah may make a user namespace of its own; probed.
        assert!(!root_without_sys_admin(&status("1000", "0000000000000000")));
        // CAP_SYS_ADMIN dropped from the effective set only: what
        // buildah, started as root, gets is the bounding set; probed.
        let dropped = status("0", "00000000a80425fb")
            .replace("CapBnd:\t00000000a80425fb", "CapBnd:\t00000000a82425fb");
        assert!(!root_without_sys_admin(&dropped));
        // A status without the fields: probed.
        assert!(!root_without_sys_admin("Name:\ttripod\n"));
    }

    #[test]
    fn bud_arguments_carry_the_request() {
        let spec = BuildSpec {
            build_id: "b".into(),
            context_dir: "/ctx".into(),
            dockerfile: "sub/Dockerfile".into(),
            target: Some("final".into()),
            build_args: vec![("VERSION".into(), "1.2".into())],
            labels: BTreeMap::from([("org.opencontainers.image.source".into(), "x".into())]),
            platform: "linux/arm64".parse().unwrap(),
            tags: vec!["r/a:1".into(), "r/a:latest".into()],
            push_by_digest: false,
            cache_image: Some("r/cache".into()),
            docker_config_json: None,
            insecure: true,
        };
        let args = Buildah::bud_args(&spec, Some(Path::new("/w/auth.json")));
        let joined = args.join(" ");
        for want in [
            "bud --isolation chroot --layers --platform linux/arm64 -f /ctx/sub/Dockerfile",
            "--target final",
            "--build-arg VERSION=1.2",
            "--label org.opencontainers.image.source=x",
            "--cache-from r/cache --cache-to r/cache",
            "--authfile /w/auth.json",
            "-t r/a:1 -t r/a:latest /ctx",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        // `insecure` never turns TLS verification off for every registry.
        assert!(!joined.contains("tls-verify"), "{joined}");
    }

    #[test]
    fn insecure_is_scoped_to_the_output_registry() {
        let spec = BuildSpec {
            build_id: "b".into(),
            context_dir: "/ctx".into(),
            dockerfile: "Dockerfile".into(),
            target: None,
            build_args: vec![],
            labels: BTreeMap::new(),
            platform: "linux/amd64".parse().unwrap(),
            tags: vec![
                "10.88.0.1:5000/team/a:1".into(),
                "10.88.0.1:5000/team/a:2".into(),
            ],
            push_by_digest: false,
            cache_image: None,
            docker_config_json: None,
            insecure: true,
        };
        let hosts = output_registries(&spec);
        assert_eq!(hosts, vec!["10.88.0.1:5000".to_string()]);
        let conf = registries_conf(Some("unqualified-search-registries = []"), &hosts);
        assert_eq!(
            conf,
            "unqualified-search-registries = []\n\n[[registry]]\nlocation = \"10.88.0.1:5000\"\ninsecure = true\n"
        );
        // A registry the system's file configures already is left to it;
        // one it only mentions (as a mirror) is not.
        let system = "[[registry]]\nlocation = \"10.88.0.1:5000\"\n";
        assert_eq!(registries_conf(Some(system), &hosts), system);
        let mirror = "[[registry]]\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"10.88.0.1:5000\"\n";
        assert!(
            registries_conf(Some(mirror), &hosts)
                .ends_with("location = \"10.88.0.1:5000\"\ninsecure = true\n")
        );
        assert!(registries_conf(None, &hosts).starts_with("\n[[registry]]"));
    }
}
