//! The darwin backend: builds `darwin/*` images without a container
//! runtime. Dockerfile instructions are applied natively in a per-build
//! root: COPY/ADD write files there (each a layer), ENV, WORKDIR,
//! ENTRYPOINT, CMD, LABEL, ARG, USER, EXPOSE, VOLUME, STOPSIGNAL and SHELL
//! shape the image config, and RUN executes on the host under a Seatbelt
//! profile (`sandbox-exec`) confined to the build root ([`sandbox`], macOS
//! only: elsewhere a Dockerfile with RUN is refused before anything runs).
//! The image (config `os: darwin`) is pushed with the push secret.
//!
//! Everything but RUN is plain Rust that runs and is tested on Linux.

pub mod dockerfile;
pub mod layer;
#[cfg(target_os = "macos")]
mod sandbox;

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, BuildEvent, BuildFailure, BuildOutput, BuildSpec};
use crate::platform::Os;
use crate::reference::ImageRef;
use dockerfile::Step;

/// Why RUN cannot run here.
pub const RUN_NEEDS_MACOS: &str = "RUN needs a macOS host: the darwin backend runs RUN steps under Seatbelt (sandbox-exec), which exists only on macOS; build this platform on a macOS runner, or use a Dockerfile without RUN";

/// The darwin backend.
#[derive(Debug, Clone)]
pub struct Darwin {
    /// Scratch space: one directory per build, removed afterwards.
    pub work_dir: PathBuf,
    /// Paths RUN steps may not read (the runner's work directory, token
    /// and CA files), the build's own root excepted.
    pub private: Vec<PathBuf>,
}

/// The image config being assembled.
#[derive(Debug, Default)]
struct ImageConfig {
    env: Vec<(String, String)>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    workdir: Option<String>,
    user: Option<String>,
    labels: BTreeMap<String, String>,
    exposed: Vec<String>,
    volumes: Vec<String>,
    stop_signal: Option<String>,
    diff_ids: Vec<String>,
    history: Vec<serde_json::Value>,
}

impl ImageConfig {
    fn to_json(&self, spec: &BuildSpec) -> Vec<u8> {
        let map = |v: &[String]| -> serde_json::Map<String, serde_json::Value> {
            v.iter()
                .map(|k| (k.clone(), serde_json::json!({})))
                .collect()
        };
        let mut config = serde_json::json!({
            "Env": self.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "Labels": self.labels,
        });
        let c = config.as_object_mut();
        if let Some(c) = c {
            let mut set = |k: &str, v: serde_json::Value| {
                c.insert(k.to_string(), v);
            };
            if let Some(e) = &self.entrypoint {
                set("Entrypoint", serde_json::json!(e));
            }
            if let Some(cmd) = &self.cmd {
                set("Cmd", serde_json::json!(cmd));
            }
            if let Some(w) = &self.workdir {
                set("WorkingDir", serde_json::json!(w));
            }
            if let Some(u) = &self.user {
                set("User", serde_json::json!(u));
            }
            if !self.exposed.is_empty() {
                set(
                    "ExposedPorts",
                    serde_json::Value::Object(map(&self.exposed)),
                );
            }
            if !self.volumes.is_empty() {
                set("Volumes", serde_json::Value::Object(map(&self.volumes)));
            }
            if let Some(s) = &self.stop_signal {
                set("StopSignal", serde_json::json!(s));
            }
        }
        let mut image = serde_json::json!({
            "created": jiff::Timestamp::now().to_string(),
            "architecture": spec.platform.arch(),
            "os": "darwin",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
            "history": self.history,
        });
        if let (Some(v), Some(o)) = (spec.platform.variant(), image.as_object_mut()) {
            o.insert("variant".into(), serde_json::json!(v));
        }
        serde_json::to_vec(&image).unwrap_or_default()
    }
}

fn invalid(m: impl Into<String>) -> BuildFailure {
    BuildFailure::Invalid(m.into())
}

impl Backend for Darwin {
    async fn build(
        &self,
        spec: BuildSpec,
        events: mpsc::Sender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<BuildOutput, BuildFailure> {
        spec.require_os(Os::Darwin, "darwin")?;
        let dockerfile = spec.dockerfile_path();
        let text = tokio::fs::read_to_string(&dockerfile)
            .await
            .map_err(|e| invalid(format!("cannot read {}: {e}", dockerfile.display())))?;
        let recipe =
            dockerfile::recipe(&text, &spec.build_args, spec.target.as_deref()).map_err(invalid)?;
        if let Some(step) = recipe.runs_commands()
            && !cfg!(target_os = "macos")
        {
            return Err(invalid(format!("{step}: {RUN_NEEDS_MACOS}")));
        }
        let dir = self.work_dir.join(super::safe_name(&spec.build_id, 100));
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let root = dir.join("root");
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| BuildFailure::Internal(format!("{}: {e}", root.display())))?;
        let result = self.assemble(&spec, &recipe, &root, &events, &cancel).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let (layers, config) = result?;
        if cancel.is_cancelled() {
            return Err(BuildFailure::Cancelled);
        }
        let reference = spec
            .tags
            .first()
            .cloned()
            .ok_or_else(|| invalid("no tag to push"))?;
        let push_failed = |message: String| BuildFailure::PushFailed {
            reference: reference.clone(),
            message,
            last_lines: Vec::new(),
        };
        ImageRef::parse(&reference).map_err(|e| invalid(e.to_string()))?;
        let (client, creds) = spec.output_registry(&reference).map_err(push_failed)?;
        let _ = events
            .send(BuildEvent::Log(if spec.push_by_digest {
                format!("pushing to {reference} by digest")
            } else {
                format!("pushing {}", spec.tags.join(", "))
            }))
            .await;
        let push = async {
            if spec.push_by_digest {
                client
                    .push_image_by_digest(&reference, layers, config, creds.as_ref())
                    .await
            } else {
                client
                    .push_image(&spec.tags, layers, config, creds.as_ref())
                    .await
            }
        };
        let (digest, size) = tokio::select! {
            r = push => r.map_err(|e| push_failed(e.to_string()))?,
            _ = cancel.cancelled() => return Err(BuildFailure::Cancelled),
        };
        let reference = spec.pushed_reference(&digest);
        let _ = events
            .send(BuildEvent::Log(if spec.push_by_digest {
                format!("pushed {reference}")
            } else {
                format!("pushed {reference}@{digest}")
            }))
            .await;
        Ok(BuildOutput {
            digest,
            size,
            reference,
        })
    }
}

impl Darwin {
    /// Applies the recipe in `root`: the layers (gzip blobs) and the config.
    async fn assemble(
        &self,
        spec: &BuildSpec,
        recipe: &dockerfile::Recipe,
        root: &std::path::Path,
        events: &mpsc::Sender<BuildEvent>,
        cancel: &CancellationToken,
    ) -> Result<(Vec<Vec<u8>>, Vec<u8>), BuildFailure> {
        let mut cfg = ImageConfig::default();
        let mut layers = Vec::new();
        let mut owners = layer::Owners::new();
        let total = recipe.steps.len() as u32;
        for (i, (text, step)) in recipe.steps.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(BuildFailure::Cancelled);
            }
            let _ = events
                .send(BuildEvent::Step {
                    text: text.clone(),
                    index: i as u32 + 1,
                    total,
                })
                .await;
            let fail = |message: String| BuildFailure::StepFailed {
                step: text.clone(),
                message,
                last_lines: Vec::new(),
            };
            let mut made = None;
            match step {
                Step::Copy {
                    sources,
                    dest,
                    chmod,
                    chown,
                } => {
                    let written = layer::copy_into(root, &spec.context_dir, sources, dest, *chmod)
                        .map_err(fail)?;
                    if let Some(owner) = chown {
                        for p in &written {
                            owners.insert(p.clone(), *owner);
                        }
                    }
                    made = Some(layer::layer(root, &written, &[], &owners).map_err(fail)?);
                }
                Step::Run(argv) => {
                    #[cfg(target_os = "macos")]
                    {
                        let before = layer::snapshot(root).map_err(&fail)?;
                        sandbox::run(sandbox::RunIn {
                            root,
                            argv,
                            env: &cfg.env,
                            workdir: cfg.workdir.as_deref().unwrap_or("/"),
                            private: &self.private,
                            events,
                            cancel,
                        })
                        .await
                        .map_err(|(message, last_lines)| BuildFailure::StepFailed {
                            step: text.clone(),
                            message,
                            last_lines,
                        })?;
                        let after = layer::snapshot(root).map_err(&fail)?;
                        let (changed, deleted) = layer::diff(&before, &after);
                        made = Some(layer::layer(root, &changed, &deleted, &owners).map_err(fail)?);
                    }
                    #[cfg(not(target_os = "macos"))]
                    {
                        let _ = argv;
                        return Err(fail(RUN_NEEDS_MACOS.to_string()));
                    }
                }
                Step::Env(set) => {
                    for (k, v) in set {
                        cfg.env.retain(|(ek, _)| ek != k);
                        cfg.env.push((k.clone(), v.clone()));
                    }
                }
                Step::Workdir(w) => {
                    layer::safe_create_dirs(root, w).map_err(fail)?;
                    cfg.workdir = Some(w.clone());
                }
                Step::Entrypoint(e) => {
                    cfg.entrypoint = Some(e.clone());
                    cfg.cmd = None;
                }
                Step::Cmd(c) => cfg.cmd = Some(c.clone()),
                Step::Label(set) => cfg.labels.extend(set.iter().cloned()),
                Step::User(u) => cfg.user = Some(u.clone()),
                Step::Expose(p) => cfg.exposed.extend(p.iter().map(|p| {
                    if p.contains('/') {
                        p.clone()
                    } else {
                        format!("{p}/tcp")
                    }
                })),
                Step::Volume(v) => cfg.volumes.extend(v.iter().cloned()),
                Step::StopSignal(s) => cfg.stop_signal = Some(s.clone()),
                Step::Shell(_) | Step::Nothing => {}
            }
            let created_by = text.split_once(": ").map(|(_, t)| t).unwrap_or(text);
            match made {
                Some(l) => {
                    cfg.diff_ids.push(l.diff_id.clone());
                    cfg.history
                        .push(serde_json::json!({"created_by": created_by}));
                    layers.push(l.gz);
                }
                None => cfg
                    .history
                    .push(serde_json::json!({"created_by": created_by, "empty_layer": true})),
            }
        }
        // The build's labels (build ID, source) win over the Dockerfile's.
        cfg.labels
            .extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok((layers, cfg.to_json(spec)))
    }
}
