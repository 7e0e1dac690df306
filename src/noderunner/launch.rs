//! From a container spec to the process to start: environment, paths,
//! program, arguments.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod};

use super::refs::Refs;
use super::spec::{self, DEFAULT_TERMINATION_MESSAGE_PATH, PathMap};

/// The IP the runner reports for every Pod and host.
pub(crate) const LOOPBACK: &str = "127.0.0.1";

/// Everything needed to start one container's process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// The executable (absolute, or relative to `cwd` as given), or why
    /// there is none (the container then fails with `StartError`, as when
    /// a runtime cannot exec it).
    pub program: Result<PathBuf, String>,
    /// `command[1..]` then `args`, expanded and path-mapped.
    pub args: Vec<String>,
    /// The whole environment of the process.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Receives stdout and stderr.
    pub log: PathBuf,
    /// The host file behind `terminationMessagePath`.
    pub termination_log: PathBuf,
}

/// What the Pod directory holds for its containers.
pub(crate) struct PodDirs<'a> {
    /// `<root>/<namespace>_<name>_<uid>`.
    pub pod_dir: &'a Path,
    /// Each volume's directory by volume name.
    pub volumes: &'a HashMap<String, PathBuf>,
    /// `PATH` of the runner (the base of every container's environment).
    pub path_env: &'a str,
    /// What a `tripod` command runs.
    pub tripod_binary: &'a Path,
}

/// Resolves `container` of `pod` into a [`Launch`]; the error says what is
/// wrong with the spec (the Pod fails with `CreateContainerConfigError`).
pub(crate) async fn resolve(
    pod: &Pod,
    container: &Container,
    dirs: &PodDirs<'_>,
    refs: &mut Refs,
) -> Result<Launch, String> {
    let command = container.command.as_deref().unwrap_or_default();
    if command.is_empty() {
        return Err(
            "no command: the tripod node runner ignores images, so it cannot know the \
             image's ENTRYPOINT; set command (and args)"
                .into(),
        );
    }
    let pod_env = environment(pod, container, refs).await?;
    let lookup = |name: &str| {
        pod_env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };

    // Mounts, then the termination-message file as one more (file) mount.
    let mut paths = PathMap::default();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume_dir) = dirs.volumes.get(&mount.name) else {
            return Err(format!(
                "volumeMount {:?} refers to no volume of the Pod",
                mount.name
            ));
        };
        let sub_path = match (&mount.sub_path, &mount.sub_path_expr) {
            (Some(p), _) if !p.is_empty() => Some(p.clone()),
            (_, Some(expr)) if !expr.is_empty() => Some(spec::expand(expr, lookup)),
            _ => None,
        };
        let host = match sub_path {
            Some(sub) => {
                let sub = spec::relative_path(&sub)
                    .map_err(|e| format!("volumeMount {:?}: subPath {e}", mount.name))?;
                let host = volume_dir.join(sub);
                if fs::symlink_metadata(&host).is_err() {
                    fs::create_dir_all(&host)
                        .map_err(|e| format!("creating subPath {}: {e}", host.display()))?;
                }
                host
            }
            None => volume_dir.clone(),
        };
        paths.insert(&mount.mount_path, host);
    }
    let termination_path = container
        .termination_message_path
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH);
    let termination_log = dirs.pod_dir.join("termination").join(&container.name);
    fs::write(&termination_log, b"")
        .map_err(|e| format!("creating {}: {e}", termination_log.display()))?;
    paths.insert(termination_path, termination_log.clone());

    let cwd = match container.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(dir) => match paths.map(dir) {
            Some(mapped) => {
                fs::create_dir_all(&mapped)
                    .map_err(|e| format!("creating workingDir {mapped}: {e}"))?;
                PathBuf::from(mapped)
            }
            None if Path::new(dir).is_dir() => PathBuf::from(dir),
            None => {
                return Err(format!(
                    "workingDir {dir:?} is in no volume and does not exist on this host"
                ));
            }
        },
        None => dirs.pod_dir.to_path_buf(),
    };

    let mut words = command
        .iter()
        .chain(container.args.iter().flatten())
        .map(|word| paths.rewrite(&spec::expand(word, lookup)));
    let program = words.next().unwrap_or_default();
    let args: Vec<String> = words.collect();

    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), dirs.path_env.to_string()),
        ("HOME".into(), dirs.pod_dir.to_string_lossy().into_owned()),
        (
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ];
    for (name, value) in &pod_env {
        set(&mut env, name, paths.rewrite(value));
    }
    let path_env = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let program = spec::resolve_program(&program, dirs.tripod_binary, &path_env, &cwd);

    Ok(Launch {
        program,
        args,
        env,
        cwd,
        log: dirs
            .pod_dir
            .join("logs")
            .join(format!("{}.log", container.name)),
        termination_log,
    })
}

/// Sets `name` in an ordered environment, replacing an earlier value.
fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == name) {
        Some(entry) => entry.1 = value,
        None => env.push((name.to_string(), value)),
    }
}

/// The container's own environment as the Pod spec defines it (container
/// paths, not yet mapped): `envFrom`, then `env` in order with `$(VAR)`
/// references to the variables before.
async fn environment(
    pod: &Pod,
    container: &Container,
    refs: &mut Refs,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(s) = &from.secret_ref {
            let data = refs
                .secret(&s.name)
                .await
                .map_err(|e| format!("envFrom: reading secret {:?}: {e}", s.name))?;
            ("secret", &s.name, s.optional, data)
        } else if let Some(c) = &from.config_map_ref {
            let data = refs
                .config_map(&c.name)
                .await
                .map_err(|e| format!("envFrom: reading configMap {:?}: {e}", c.name))?;
            ("configMap", &c.name, c.optional, data)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (key, value) in data.iter() {
                    let value = String::from_utf8_lossy(value).into_owned();
                    set(&mut env, &format!("{prefix}{key}"), value);
                }
            }
            None if optional.unwrap_or(false) => {}
            None => return Err(format!("envFrom: {kind} {name:?} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => spec::expand(value, |name| {
                env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }),
            (None, Some(source)) => match value_from(pod, source, refs).await {
                Ok(Some(value)) => value,
                Ok(None) => continue,
                Err(e) => return Err(format!("env {}: {e}", var.name)),
            },
            (None, None) => String::new(),
        };
        set(&mut env, &var.name, value);
    }
    Ok(env)
}

/// The value of `valueFrom`; `None` for a missing optional key.
async fn value_from(
    pod: &Pod,
    source: &EnvVarSource,
    refs: &mut Refs,
) -> Result<Option<String>, String> {
    if let Some(field) = &source.field_ref {
        return field_ref(pod, &field.field_path).map(Some);
    }
    let (kind, name, key, optional, data) = if let Some(s) = &source.secret_key_ref {
        let data = refs
            .secret(&s.name)
            .await
            .map_err(|e| format!("reading secret {:?}: {e}", s.name))?;
        ("secret", &s.name, &s.key, s.optional, data)
    } else if let Some(c) = &source.config_map_key_ref {
        let data = refs
            .config_map(&c.name)
            .await
            .map_err(|e| format!("reading configMap {:?}: {e}", c.name))?;
        ("configMap", &c.name, &c.key, c.optional, data)
    } else if source.resource_field_ref.is_some() {
        return Err("valueFrom.resourceFieldRef is not supported by the tripod node runner".into());
    } else if source.file_key_ref.is_some() {
        return Err("valueFrom.fileKeyRef is not supported by the tripod node runner".into());
    } else {
        return Err("valueFrom names no source".into());
    };
    let optional = optional.unwrap_or(false);
    match data {
        None if optional => Ok(None),
        None => Err(format!("{kind} {name:?} not found")),
        Some(data) => match data.get(key) {
            Some(value) => Ok(Some(String::from_utf8_lossy(value).into_owned())),
            None if optional => Ok(None),
            None => Err(format!("key {key:?} not found in {kind} {name:?}")),
        },
    }
}

/// The downward-API fields a Pod's env may refer to.
fn field_ref(pod: &Pod, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let quoted_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => LOOPBACK.into(),
        _ => {
            if let Some(key) = quoted_key("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = quoted_key("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!(
                    "fieldRef {path:?} is not supported by the tripod node runner"
                ));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_field_refs() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u",
                "labels": {"a": "1"}, "annotations": {"b/c": "2"}},
            "spec": {"nodeName": "n", "containers": []},
        }))
        .unwrap();
        let f = |p: &str| field_ref(&pod, p);
        assert_eq!(f("metadata.name").unwrap(), "p");
        assert_eq!(f("metadata.namespace").unwrap(), "ns");
        assert_eq!(f("metadata.uid").unwrap(), "u");
        assert_eq!(f("spec.nodeName").unwrap(), "n");
        assert_eq!(f("spec.serviceAccountName").unwrap(), "default");
        assert_eq!(f("status.podIP").unwrap(), "127.0.0.1");
        assert_eq!(f("status.hostIP").unwrap(), "127.0.0.1");
        assert_eq!(f("metadata.labels['a']").unwrap(), "1");
        assert_eq!(f("metadata.annotations['b/c']").unwrap(), "2");
        assert!(f("status.phase").is_err());
    }
}
