//! Volumes as directories of the Pod directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};

use super::refs::{Data, Refs};
use super::spec::relative_path;

/// Mode of a secret or configMap file without `defaultMode` or item `mode`.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Why the Pod's volumes could not be set up; becomes the Pod's `reason`
/// and `message`.
#[derive(Debug)]
pub(crate) struct VolumeFailure {
    /// `FailedMount` or `UnsupportedVolume`.
    pub reason: &'static str,
    /// Names the volume.
    pub message: String,
}

/// Creates `<pod_dir>/volumes/<name>` for every volume of `pod` and fills
/// it; returns each volume's directory by name.
pub(crate) async fn materialise(
    pod: &Pod,
    pod_dir: &Path,
    refs: &mut Refs,
) -> Result<HashMap<String, PathBuf>, VolumeFailure> {
    let mut dirs = HashMap::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for volume in volumes.into_iter().flatten() {
        let dir = pod_dir.join("volumes").join(&volume.name);
        let failed = |reason, message: String| VolumeFailure {
            reason,
            message: format!("volume {:?}: {message}", volume.name),
        };
        let io_failed = |e: std::io::Error| failed("FailedMount", e.to_string());
        if volume.empty_dir.is_some() {
            create_dir(&dir).map_err(io_failed)?;
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.as_deref().unwrap_or_default();
            let data = refs.secret(name).await;
            let keys = Keys {
                kind: "secret",
                name,
                items: source.items.as_deref(),
                default_mode: source.default_mode,
                optional: source.optional.unwrap_or(false),
            };
            keys.project(&dir, data)
                .map_err(|m| failed("FailedMount", m))?;
        } else if let Some(source) = &volume.config_map {
            let data = refs.config_map(&source.name).await;
            let keys = Keys {
                kind: "configMap",
                name: &source.name,
                items: source.items.as_deref(),
                default_mode: source.default_mode,
                optional: source.optional.unwrap_or(false),
            };
            keys.project(&dir, data)
                .map_err(|m| failed("FailedMount", m))?;
        } else {
            return Err(failed(
                "UnsupportedVolume",
                format!(
                    "{} volumes are not supported by the tripod node runner \
                     (it supports emptyDir, secret and configMap)",
                    volume_kind(volume)
                ),
            ));
        }
        dirs.insert(volume.name.clone(), dir);
    }
    Ok(dirs)
}

/// A secret or configMap volume's source: which object, which keys.
struct Keys<'a> {
    /// `secret` or `configMap`, for messages.
    kind: &'static str,
    name: &'a str,
    items: Option<&'a [KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
}

impl Keys<'_> {
    /// Fills `dir` with the keys of the object as read from the API
    /// (`None`: it does not exist); the error names the object.
    fn project(&self, dir: &Path, data: Result<Option<Data>, kube::Error>) -> Result<(), String> {
        let (kind, name) = (self.kind, self.name);
        let data = data.map_err(|e| format!("reading {kind} {name:?}: {e}"))?;
        create_dir(dir).map_err(|e| e.to_string())?;
        match data {
            Some(data) => write_keys(dir, &data, self.items, self.default_mode, self.optional)
                .map_err(|e| format!("{kind} {name:?}: {e}")),
            None if self.optional => Ok(()),
            None => Err(format!("{kind} {name:?} not found")),
        }
    }
}

/// The volume's source field, e.g. `hostPath`.
fn volume_kind(volume: &Volume) -> String {
    match serde_json::to_value(volume) {
        Ok(serde_json::Value::Object(fields)) => fields
            .keys()
            .find(|k| *k != "name")
            .cloned()
            .unwrap_or_else(|| "unknown".into()),
        _ => "unknown".into(),
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// Writes every key of `data` (or only `items`, key → path) as a file of
/// `dir` with the item's mode, else `default_mode`, else 0644.
fn write_keys(
    dir: &Path,
    data: &Data,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
) -> Result<(), String> {
    let mode_of = |mode: Option<i32>| {
        mode.or(default_mode)
            .map_or(DEFAULT_FILE_MODE, |m| (m as u32) & 0o777)
    };
    let mut files = Vec::new();
    match items {
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(bytes) => {
                        files.push((relative_path(&item.path)?, bytes, mode_of(item.mode)))
                    }
                    None if optional => {}
                    None => return Err(format!("key {:?} not found", item.key)),
                }
            }
        }
        None => {
            for (key, bytes) in data.iter() {
                files.push((relative_path(key)?, bytes, mode_of(None)));
            }
        }
    }
    for (path, bytes, mode) in files {
        let file = dir.join(path);
        let write = || -> std::io::Result<()> {
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&file, bytes)?;
            fs::set_permissions(&file, fs::Permissions::from_mode(mode))
        };
        write().map_err(|e| format!("writing {}: {e}", file.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn names_the_volume_kind() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "name": "x", "hostPath": {"path": "/tmp"}
        }))
        .unwrap();
        assert_eq!(volume_kind(&v), "hostPath");
    }

    #[test]
    fn writes_items_with_modes() {
        let dir = std::env::temp_dir().join(format!("tripod-volumes-{}", std::process::id()));
        let data: Data = Arc::new(BTreeMap::from([
            ("a".to_string(), b"A".to_vec()),
            ("b".to_string(), b"B".to_vec()),
        ]));
        write_keys(&dir, &data, None, Some(0o600), false).unwrap();
        let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"A");
        assert_eq!(mode("b"), 0o600);
        let items = [KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o400),
            ..Default::default()
        }];
        write_keys(&dir, &data, Some(&items), None, false).unwrap();
        assert_eq!(fs::read(dir.join("sub/b.txt")).unwrap(), b"B");
        assert_eq!(mode("sub/b.txt"), 0o400);
        let missing = [KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            ..Default::default()
        }];
        assert!(write_keys(&dir, &data, Some(&missing), None, false).is_err());
        write_keys(&dir, &data, Some(&missing), None, true).unwrap();
        let escaping = [KeyToPath {
            key: "a".into(),
            path: "../a".into(),
            ..Default::default()
        }];
        assert!(write_keys(&dir, &data, Some(&escaping), None, false).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
