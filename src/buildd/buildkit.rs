//! The BuildKit backend: `buildctl build` against a running `buildkitd`
//! (a Windows service beside containerd on Windows nodes, a daemon with its
//! OCI worker on Linux hosts). Dockerfile frontend; progress read from
//! `--progress rawjson`; the pushed manifest's digest read from
//! `--metadata-file`; cancel by interrupting `buildctl`, which cancels the
//! solve in the daemon.
//!
//! Why `buildctl` and not BuildKit's gRPC API from Rust: the API is a
//! session protocol (the daemon calls back into the client for the build
//! context, credentials and progress over a hijacked stream), and no
//! maintained Rust client implements it; `buildctl` is BuildKit's own
//! client, from the same module and version as the daemon.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, BuildEvent, BuildFailure, BuildOutput, BuildSpec};
use crate::platform::Os;

const LAST_LINES: usize = 20;
/// How long a cancelled buildctl has to end before it is killed.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Settings of the BuildKit backend.
#[derive(Debug, Clone)]
pub struct Buildkit {
    /// The `buildctl` program.
    pub program: PathBuf,
    /// The daemon's address (`unix:///run/buildkit/buildkitd.sock`,
    /// `npipe:////./pipe/buildkitd`, `tcp://127.0.0.1:1234`).
    pub addr: String,
    /// Scratch space for per-build files (credentials, metadata).
    pub work_dir: PathBuf,
    /// The OS the daemon runs RUN steps on: RUN steps for another OS are
    /// refused before the build starts.
    pub host_os: Os,
}

impl Buildkit {
    /// The `buildctl` arguments of a build.
    pub fn build_args(&self, spec: &BuildSpec, metadata_file: &Path) -> Vec<String> {
        let dockerfile = spec.dockerfile_path();
        let (df_dir, df_name) = (
            dockerfile
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| spec.context_dir.clone()),
            dockerfile
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "Dockerfile".into()),
        );
        let mut args = vec![
            "--addr".to_string(),
            self.addr.clone(),
            "build".into(),
            "--progress".into(),
            "rawjson".into(),
            "--frontend".into(),
            "dockerfile.v0".into(),
            "--local".into(),
            format!("context={}", spec.context_dir.display()),
            "--local".into(),
            format!("dockerfile={}", df_dir.display()),
            "--opt".into(),
            format!("filename={df_name}"),
            "--opt".into(),
            format!("platform={}", spec.platform),
        ];
        if let Some(t) = &spec.target {
            args.push("--opt".into());
            args.push(format!("target={t}"));
        }
        for (k, v) in &spec.build_args {
            args.push("--opt".into());
            args.push(format!("build-arg:{k}={v}"));
        }
        for (k, v) in &spec.labels {
            args.push("--opt".into());
            args.push(format!("label:{k}={v}"));
        }
        // `insecure` applies to the output registry only (as with buildah):
        // the cache gets it when it lives there.
        let insecure = if spec.insecure {
            ",registry.insecure=true"
        } else {
            ""
        };
        if let Some(cache) = &spec.cache_image {
            let outputs = super::buildah::output_registries(spec);
            let cache_insecure = if crate::reference::ImageRef::parse(cache)
                .is_ok_and(|r| outputs.contains(&r.registry))
            {
                insecure
            } else {
                ""
            };
            args.push("--import-cache".into());
            args.push(format!("type=registry,ref={cache}{cache_insecure}"));
            args.push("--export-cache".into());
            args.push(format!(
                "type=registry,ref={cache},mode=max,image-manifest=true,oci-mediatypes=true{cache_insecure}"
            ));
        }
        // CSV: the name list is quoted, its references separated by commas.
        // By digest: the repository only, no tag written.
        args.push("--output".into());
        if spec.push_by_digest {
            let repository = crate::reference::ImageRef::parse(&spec.tags[0])
                .map(|r| r.name().to_string())
                .unwrap_or_else(|_| spec.tags[0].clone());
            args.push(format!(
                "type=image,\"name={repository}\",push=true,push-by-digest=true,oci-mediatypes=true{insecure}"
            ));
        } else {
            args.push(format!(
                "type=image,\"name={}\",push=true,oci-mediatypes=true{insecure}",
                spec.tags.join(",")
            ));
        }
        args.push("--metadata-file".into());
        args.push(metadata_file.display().to_string());
        args
    }

    /// Refuses what this daemon cannot build, naming the step.
    fn check(&self, spec: &BuildSpec) -> Result<(), BuildFailure> {
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
        let text = std::fs::read_to_string(&dockerfile).map_err(|e| {
            BuildFailure::Invalid(format!("dockerfile: {}: {e}", dockerfile.display()))
        })?;
        if spec.platform.os() == Os::Darwin {
            return Err(BuildFailure::Invalid(format!(
                "platform {}: BuildKit does not build macOS images (the darwin backend does)",
                spec.platform
            )));
        }
        if spec.platform.os() != self.host_os {
            let needs = crate::dockerfile::target_needs(
                &text,
                &spec.build_args,
                spec.target.as_deref(),
                spec.platform.os().as_str(),
            )
            .map_err(|e| BuildFailure::Invalid(e.to_string()))?;
            if let Some(run) = needs.target_run {
                return Err(BuildFailure::Invalid(format!(
                    "{run}: RUN steps of a {} image need a {} host; this BuildKit runs on {} and builds {} images without RUN only (COPY, ADD, ENV, LABEL…; a stage FROM --platform=$BUILDPLATFORM may RUN)",
                    spec.platform,
                    spec.platform.os(),
                    self.host_os,
                    spec.platform.os()
                )));
            }
        }
        Ok(())
    }
}

/// One line of `--progress rawjson`: a BuildKit `SolveStatus`.
#[derive(Debug, Default, serde::Deserialize)]
struct SolveStatus {
    #[serde(default)]
    vertexes: Vec<Vertex>,
    #[serde(default)]
    logs: Vec<VertexLog>,
}

#[derive(Debug, serde::Deserialize)]
struct Vertex {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    started: Option<String>,
    #[serde(default)]
    error: String,
}

#[derive(Debug, serde::Deserialize)]
struct VertexLog {
    #[serde(default)]
    vertex: String,
    /// Base64.
    #[serde(default)]
    data: String,
}

/// Reads the progress stream into events, remembering the step that failed.
#[derive(Debug, Default)]
pub struct Progress {
    names: HashMap<String, String>,
    started: std::collections::HashSet<String>,
    partial: HashMap<String, String>,
    /// The last lines of output (progress and builder messages).
    pub last_lines: VecDeque<String>,
    /// The step that failed and BuildKit's error for it.
    pub failed: Option<(String, String)>,
    /// Non-JSON lines (buildctl's own messages, e.g. `error: …`).
    pub messages: Vec<String>,
}

/// `[stage 2/5] RUN make` → (2, 5).
fn step_counts(name: &str) -> Option<(u32, u32)> {
    let inner = name.strip_prefix('[')?.split_once(']')?.0;
    let counts = inner.rsplit(' ').next()?;
    let (i, n) = counts.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

impl Progress {
    fn remember(&mut self, line: String) {
        if self.last_lines.len() == LAST_LINES {
            self.last_lines.pop_front();
        }
        self.last_lines.push_back(line);
    }

    /// The events of one line of `buildctl` output.
    pub fn line(&mut self, line: &str) -> Vec<BuildEvent> {
        let Ok(status) = serde_json::from_str::<SolveStatus>(line) else {
            let line = line.trim().to_string();
            if !line.is_empty() {
                self.messages.push(line.clone());
                self.remember(line.clone());
                return vec![BuildEvent::Log(line)];
            }
            return vec![];
        };
        let mut events = Vec::new();
        for v in status.vertexes {
            if !v.name.is_empty() {
                self.names.insert(v.digest.clone(), v.name.clone());
            }
            let name = self.names.get(&v.digest).cloned().unwrap_or_default();
            if v.started.is_some() && self.started.insert(v.digest.clone()) {
                if let Some((index, total)) = step_counts(&name) {
                    events.push(BuildEvent::Step {
                        text: name.clone(),
                        index,
                        total,
                    });
                } else if !name.is_empty() {
                    events.push(BuildEvent::Log(name.clone()));
                }
            }
            if !v.error.is_empty() && self.failed.is_none() && !v.error.contains("context canceled")
            {
                self.failed = Some((name, v.error));
            }
        }
        for log in status.logs {
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(&log.data) else {
                continue;
            };
            let text = String::from_utf8_lossy(&data);
            let buf = self.partial.entry(log.vertex).or_default();
            buf.push_str(&text);
            let mut complete = Vec::new();
            while let Some(nl) = buf.find('\n') {
                let l: String = buf.drain(..=nl).collect();
                complete.push(l.trim_end_matches(['\n', '\r']).to_string());
            }
            for l in complete {
                self.remember(l.clone());
                events.push(BuildEvent::Log(l));
            }
        }
        events
    }

    /// The failure of a build whose `buildctl` exited unsuccessfully.
    pub fn failure(&self, spec: &BuildSpec, code: Option<i32>) -> BuildFailure {
        let last_lines: Vec<String> = self.last_lines.iter().cloned().collect();
        let error_line = self
            .messages
            .iter()
            .rev()
            .find(|m| m.starts_with("error:"))
            .cloned();
        let push = |message: String| BuildFailure::PushFailed {
            reference: spec.tags.first().cloned().unwrap_or_default(),
            message,
            last_lines: last_lines.clone(),
        };
        match &self.failed {
            Some((step, error)) if step.starts_with("exporting") || step.starts_with("pushing") => {
                push(error.clone())
            }
            Some((step, error)) => BuildFailure::StepFailed {
                step: if step.is_empty() {
                    "build".into()
                } else {
                    step.clone()
                },
                message: error.clone(),
                last_lines,
            },
            None => {
                let message = error_line
                    .unwrap_or_else(|| format!("buildctl exited with code {}", code.unwrap_or(-1)));
                if message.contains("push") {
                    push(message)
                } else {
                    BuildFailure::StepFailed {
                        step: "build".into(),
                        message,
                        last_lines,
                    }
                }
            }
        }
    }
}

/// The manifest digest and size in buildctl's metadata file.
pub fn read_metadata(json: &str) -> Result<(String, i64), String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("metadata file: {e}"))?;
    let digest = v
        .get("containerimage.digest")
        .and_then(|d| d.as_str())
        .ok_or("metadata file: no containerimage.digest")?;
    if !digest.starts_with("sha256:") {
        return Err(format!("metadata file: digest {digest:?}"));
    }
    let size = v
        .pointer("/containerimage.descriptor/size")
        .and_then(|s| s.as_i64())
        .unwrap_or(0);
    Ok((digest.to_string(), size))
}

impl Backend for Buildkit {
    async fn build(
        &self,
        spec: BuildSpec,
        events: mpsc::Sender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        self.check(&spec)?;
        let work = super::WorkDir::create(&self.work_dir, &spec.build_id)?;
        self.build_in(&spec, work.path(), &events, &cancel).await
    }
}

impl Buildkit {
    async fn build_in(
        &self,
        spec: &BuildSpec,
        work: &Path,
        events: &mpsc::Sender<BuildEvent>,
        cancel: &CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        let metadata = work.join("metadata.json");
        let mut cmd = Command::new(&self.program);
        cmd.args(self.build_args(spec, &metadata));
        // buildctl reads credentials from $DOCKER_CONFIG/config.json: this
        // build's own, or an empty one (never the host's).
        let config_dir = work.join("docker");
        std::fs::create_dir_all(&config_dir)
            .map_err(|e| BuildFailure::Internal(format!("create {}: {e}", config_dir.display())))?;
        crate::os::write_private(
            &config_dir.join("config.json"),
            spec.docker_config_json.as_deref().unwrap_or(b"{}"),
        )
        .map_err(BuildFailure::Internal)?;
        cmd.env("DOCKER_CONFIG", &config_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let (mut child, mut line_rx) =
            super::spawn_lines(cmd, &self.program.display().to_string())?;
        let pid = child.id();
        let mut progress = Progress::default();
        let mut cancelled = false;
        // After a cancel, buildctl gets this long to end by itself.
        let kill_after = tokio::time::sleep(std::time::Duration::from_secs(3600));
        tokio::pin!(kill_after);
        loop {
            tokio::select! {
                line = line_rx.recv() => {
                    let Some(line) = line else { break };
                    for ev in progress.line(&line) {
                        let _ = events.send(ev).await;
                    }
                }
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    // buildctl cancels the solve in the daemon on SIGINT.
                    match pid {
                        Some(pid) => crate::os::interrupt(pid),
                        None => { let _ = child.start_kill(); }
                    }
                    kill_after
                        .as_mut()
                        .reset(tokio::time::Instant::now() + CANCEL_GRACE);
                }
                _ = &mut kill_after, if cancelled => {
                    tracing::warn!("buildctl did not stop {CANCEL_GRACE:?} after SIGINT: killed");
                    let _ = child.start_kill();
                    break;
                }
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| BuildFailure::Internal(format!("waiting for buildctl: {e}")))?;
        if cancelled {
            return Err(BuildFailure::Cancelled);
        }
        if !status.success() {
            return Err(progress.failure(spec, status.code()));
        }
        let text = std::fs::read_to_string(&metadata).map_err(|e| {
            BuildFailure::Internal(format!("read metadata file {}: {e}", metadata.display()))
        })?;
        let (digest, _) = read_metadata(&text).map_err(BuildFailure::Internal)?;
        let size = pushed_size(spec, &digest).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the pushed image's size is unknown");
            0
        });
        Ok(BuildOutput {
            reference: spec.pushed_reference(&digest),
            digest,
            size,
        })
    }
}

/// Config and layer sizes of the pushed manifest, read from the registry.
async fn pushed_size(spec: &BuildSpec, digest: &str) -> Result<i64, String> {
    let reference = &spec.tags[0];
    let (client, creds) = spec.output_registry(reference)?;
    client
        .image_size(reference, digest, creds.as_ref())
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> BuildSpec {
        BuildSpec {
            build_id: "b".into(),
            context_dir: "/ctx".into(),
            dockerfile: "sub/Dockerfile.win".into(),
            target: Some("final".into()),
            build_args: vec![("VERSION".into(), "1.2".into())],
            labels: BTreeMap::from([("org.opencontainers.image.source".into(), "x".into())]),
            platform: "windows/amd64".parse().unwrap(),
            tags: vec!["r/a:1".into(), "r/a:latest".into()],
            push_by_digest: false,
            cache_image: Some("r/cache".into()),
            docker_config_json: None,
            insecure: true,
        }
    }

    #[test]
    fn arguments_carry_the_request() {
        let bk = Buildkit {
            program: "buildctl".into(),
            addr: "unix:///run/buildkit/buildkitd.sock".into(),
            work_dir: "/w".into(),
            host_os: Os::Linux,
        };
        let joined = bk.build_args(&spec(), Path::new("/w/m.json")).join(" ");
        for want in [
            "--addr unix:///run/buildkit/buildkitd.sock build --progress rawjson --frontend dockerfile.v0",
            "--local context=/ctx --local dockerfile=/ctx/sub --opt filename=Dockerfile.win",
            "--opt platform=windows/amd64 --opt target=final",
            "--opt build-arg:VERSION=1.2",
            "--opt label:org.opencontainers.image.source=x",
            "--import-cache type=registry,ref=r/cache,registry.insecure=true",
            "--export-cache type=registry,ref=r/cache,mode=max",
            "--output type=image,\"name=r/a:1,r/a:latest\",push=true,oci-mediatypes=true,registry.insecure=true",
            "--metadata-file /w/m.json",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        // A cache in another registry than the output's is not insecure.
        let mut other = spec();
        other.cache_image = Some("cache.example:5000/c".into());
        let joined = bk.build_args(&other, Path::new("/w/m.json")).join(" ");
        assert!(
            joined.contains("--import-cache type=registry,ref=cache.example:5000/c --export-cache"),
            "{joined}"
        );
        assert!(joined.contains("oci-mediatypes=true --output"), "{joined}");
    }

    #[test]
    fn progress_becomes_steps_logs_and_the_failed_step() {
        let mut p = Progress::default();
        let ev = p.line(r#"{"vertexes":[{"digest":"sha256:a","name":"[build 2/3] RUN echo hi && false","started":"2026-11-30T00:00:00Z"}]}"#);
        assert_eq!(
            ev,
            vec![BuildEvent::Step {
                text: "[build 2/3] RUN echo hi && false".into(),
                index: 2,
                total: 3
            }]
        );
        // "hi\npart" then "ial\n": lines are joined across messages.
        let ev = p.line(r#"{"logs":[{"vertex":"sha256:a","stream":1,"data":"aGkKcGFydA=="}]}"#);
        assert_eq!(ev, vec![BuildEvent::Log("hi".into())]);
        let ev = p.line(r#"{"logs":[{"vertex":"sha256:a","stream":1,"data":"aWFsCg=="}]}"#);
        assert_eq!(ev, vec![BuildEvent::Log("partial".into())]);
        p.line(r#"{"vertexes":[{"digest":"sha256:a","started":"2026-11-30T00:00:00Z","error":"process \"/bin/sh -c echo hi && false\" did not complete successfully: exit code: 1"}]}"#);
        p.line("error: failed to solve: process did not complete");
        match p.failure(&spec(), Some(1)) {
            BuildFailure::StepFailed {
                step,
                message,
                last_lines,
            } => {
                assert_eq!(step, "[build 2/3] RUN echo hi && false");
                assert!(message.contains("exit code: 1"), "{message}");
                assert!(last_lines.contains(&"hi".to_string()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_export_error_is_a_push_failure() {
        let mut p = Progress::default();
        p.line(r#"{"vertexes":[{"digest":"sha256:e","name":"exporting to image","started":"2026-11-30T00:00:00Z","error":"failed to push r/a:1: 401 Unauthorized"}]}"#);
        assert!(matches!(
            p.failure(&spec(), Some(1)),
            BuildFailure::PushFailed { reference, .. } if reference == "r/a:1"
        ));
    }

    #[test]
    fn metadata_gives_the_digest() {
        let m = r#"{"containerimage.digest":"sha256:abc","containerimage.descriptor":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:abc","size":481},"image.name":"r/a:1"}"#;
        assert_eq!(read_metadata(m).unwrap(), ("sha256:abc".into(), 481));
        assert!(read_metadata("{}").is_err());
    }
}
