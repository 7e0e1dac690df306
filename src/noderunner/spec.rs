//! The pure part of mapping a container onto this machine: container paths
//! to host paths, `$(VAR)` expansion, program lookup.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Kubernetes' default `terminationMessagePath`.
pub(crate) const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Container paths (mount paths, the termination-message file) and the host
/// paths they stand for. A string is rewritten when it equals a container
/// path or starts with it followed by `/`; the longest container path wins,
/// so nested mounts and a termination-message file inside a volume behave
/// as the bind mounts of a real kubelet do.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathMap {
    /// Longest container path first.
    entries: Vec<(String, PathBuf)>,
}

impl PathMap {
    /// Maps `container_path` (trailing `/` ignored) to `host`, replacing an
    /// earlier mapping of the same path. `/` itself is never mapped: that
    /// would rewrite every absolute path.
    pub(crate) fn insert(&mut self, container_path: &str, host: PathBuf) {
        let path = container_path.trim_end_matches('/');
        if path.is_empty() {
            return;
        }
        self.entries.retain(|(c, _)| c != path);
        self.entries.push((path.to_string(), host));
        self.entries
            .sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
    }

    /// The host path of `value` if it is a mapped container path or lies
    /// below one; the part after the container path is kept verbatim.
    pub(crate) fn map(&self, value: &str) -> Option<String> {
        self.entries.iter().find_map(|(container, host)| {
            let rest = value.strip_prefix(container.as_str())?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            let mut mapped = host.to_string_lossy().into_owned();
            mapped.push_str(rest);
            Some(mapped)
        })
    }

    /// [`PathMap::map`], or `value` unchanged.
    pub(crate) fn rewrite(&self, value: &str) -> String {
        self.map(value).unwrap_or_else(|| value.to_string())
    }
}

/// Kubernetes' `$(VAR_NAME)` expansion of `command`, `args` and env values:
/// a reference to a defined variable is replaced by its value, an undefined
/// one is left as written, `$$` is an escaped `$`.
pub(crate) fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = after.strip_prefix('(') {
            match after.find(')') {
                Some(end) => {
                    let name = &after[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Whether `program` names the Tripod binary: its file name (after the last
/// `/` or `\`) is `tripod` or `tripod.exe`.
pub(crate) fn is_tripod(program: &str) -> bool {
    let file_name = program.rsplit(['/', '\\']).next().unwrap_or(program);
    file_name == "tripod" || file_name == "tripod.exe"
}

/// The executable to run for a container's `command[0]` (already
/// path-mapped): the Tripod binary for [`is_tripod`] names; a path with a
/// `/` as given (relative to `cwd`); else the first executable file of
/// that name in `path_env`.
pub(crate) fn resolve_program(
    program: &str,
    tripod: &Path,
    path_env: &str,
    cwd: &Path,
) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("command[0] is empty".into());
    }
    if is_tripod(program) {
        return Ok(tripod.to_path_buf());
    }
    if program.contains('/') {
        let path = cwd.join(program);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "exec: {program:?}: no such executable file ({})",
                path.display()
            ))
        };
    }
    path_env
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|path| is_executable(path))
        .ok_or_else(|| {
            format!("exec: {program:?}: executable file not found in $PATH ({path_env})")
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A relative path that stays below its base: no root, no `..`, not empty.
/// Used for `subPath` and the `path` of secret and configMap items.
pub(crate) fn relative_path(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    let escapes = p
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if path.is_empty() || escapes {
        return Err(format!(
            "{path:?} must be a relative path without '..' components"
        ));
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_mount_paths_longest_first() {
        let mut m = PathMap::default();
        m.insert("/workspace/", "/host/ws".into());
        m.insert("/workspace/cache", "/host/cache".into());
        m.insert("/dev/termination-log", "/host/term/agent".into());
        assert_eq!(m.map("/workspace").as_deref(), Some("/host/ws"));
        assert_eq!(m.map("/workspace/").as_deref(), Some("/host/ws/"));
        assert_eq!(m.map("/workspace/a/b").as_deref(), Some("/host/ws/a/b"));
        assert_eq!(
            m.map("/workspace/cache/x").as_deref(),
            Some("/host/cache/x")
        );
        assert_eq!(m.map("/workspaces"), None);
        assert_eq!(m.map("workspace"), None);
        assert_eq!(m.map("--dir=/workspace"), None);
        assert_eq!(
            m.map("/dev/termination-log").as_deref(),
            Some("/host/term/agent")
        );
        assert_eq!(m.rewrite("/etc/passwd"), "/etc/passwd");
    }

    #[test]
    fn never_maps_the_root() {
        let mut m = PathMap::default();
        m.insert("/", "/host/root".into());
        assert_eq!(m.map("/etc"), None);
    }

    #[test]
    fn expands_like_kubernetes() {
        let env = |name: &str| match name {
            "A" => Some("1".to_string()),
            "B" => Some("$(A)".to_string()),
            _ => None,
        };
        assert_eq!(expand("x$(A)y", env), "x1y");
        assert_eq!(expand("$(B)", env), "$(A)");
        assert_eq!(expand("$(C)", env), "$(C)");
        assert_eq!(expand("$$(A)", env), "$(A)");
        assert_eq!(expand("$$$(A)", env), "$1");
        assert_eq!(expand("$(A", env), "$(A");
        assert_eq!(expand("a$b$", env), "a$b$");
        assert_eq!(expand("$()", env), "$()");
        assert_eq!(expand("ünï$(A)çødé", env), "ünï1çødé");
    }

    #[test]
    fn recognises_tripod() {
        assert!(is_tripod("tripod"));
        assert!(is_tripod("/usr/local/bin/tripod"));
        assert!(is_tripod("tripod.exe"));
        assert!(is_tripod("C:\\tripod\\tripod.exe"));
        assert!(!is_tripod("tripodx"));
        assert!(!is_tripod("/tripod/sh"));
    }

    #[test]
    fn resolves_programs() {
        let tripod = Path::new("/opt/tripod");
        let cwd = Path::new("/");
        assert_eq!(
            resolve_program("tripod", tripod, "", cwd).unwrap(),
            PathBuf::from("/opt/tripod")
        );
        let sh = resolve_program("sh", tripod, "/nonexistent:/bin:/usr/bin", cwd).unwrap();
        assert!(sh.ends_with("sh"), "{sh:?}");
        assert!(resolve_program("/bin/sh", tripod, "", cwd).is_ok());
        let err = resolve_program("no-such-program-xyz", tripod, "/bin", cwd).unwrap_err();
        assert!(err.contains("executable file not found"), "{err}");
        assert!(resolve_program("/etc/passwd", tripod, "", cwd).is_err());
        assert!(resolve_program("", tripod, "/bin", cwd).is_err());
    }

    #[test]
    fn relative_paths_stay_below() {
        assert_eq!(relative_path("a/b").unwrap(), PathBuf::from("a/b"));
        assert!(relative_path("./a").is_ok());
        assert!(relative_path("").is_err());
        assert!(relative_path("/a").is_err());
        assert!(relative_path("a/../../b").is_err());
        assert!(relative_path("..").is_err());
    }
}
