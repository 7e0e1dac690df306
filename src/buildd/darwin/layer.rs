//! Files of a darwin image: copying from the build context into the
//! per-build root, snapshots of the root (to find what a RUN changed), and
//! OCI layers (gzip-compressed tars, reproducible: mtime 0, sorted, owner
//! from `--chown` or root).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::dockerfile::CopySource;

/// One layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The gzip-compressed tar (the blob pushed).
    pub gz: Vec<u8>,
    /// `sha256:` of the uncompressed tar (the config's diff ID).
    pub diff_id: String,
}

/// Ownership recorded for image paths (`--chown`); others belong to root.
pub type Owners = BTreeMap<String, (u64, u64)>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` under `base` with every directory on the way checked: none may
/// be a symlink (one could point anywhere on the host). The last component
/// may be anything, or not exist yet; missing directories are fine.
pub fn safe_join(base: &Path, path: &str) -> Result<PathBuf, String> {
    let joined = in_root(base, path)?;
    let rel = joined.strip_prefix(base).unwrap_or(&joined).to_path_buf();
    let mut cur = base.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, c) in parts.iter().enumerate() {
        cur.push(c);
        if i + 1 == parts.len() {
            break;
        }
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{path}: goes through a symbolic link ({})",
                    image_path(base, &cur)
                ));
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!(
                    "{path}: {} is not a directory",
                    image_path(base, &cur)
                ));
            }
            _ => {}
        }
    }
    Ok(cur)
}

/// Creates the directory `path` under `base` (and its parents), refusing
/// to go through symbolic links.
pub fn safe_create_dirs(base: &Path, path: &str) -> Result<PathBuf, String> {
    let target = safe_join(base, path)?;
    let rel = target.strip_prefix(base).unwrap_or(&target).to_path_buf();
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() && !m.file_type().is_symlink() => {}
            Ok(_) => {
                return Err(format!(
                    "{path}: {} exists and is not a directory",
                    image_path(base, &cur)
                ));
            }
            Err(_) => std::fs::create_dir(&cur).map_err(|e| format!("{}: {e}", cur.display()))?,
        }
    }
    Ok(target)
}

/// `path` (absolute, in the image) as a path under `root`, or an error if
/// it would leave it (by its text: use [`safe_join`] before touching it).
pub fn in_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::ParentDir => {
                if depth == 0 {
                    return Err(format!("{path}: leaves the image root"));
                }
                out.pop();
                depth -= 1;
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The image path (`/a/b`) of a path under `root`.
fn image_path(root: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(root).unwrap_or(p);
    format!("/{}", rel.to_string_lossy())
}

fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The context paths a COPY source names (a wildcard in its last part
/// matches entries of its directory).
fn resolve_source(context: &Path, src: &str) -> Result<Vec<PathBuf>, String> {
    in_root(context, src).map_err(|_| format!("{src}: outside the build context"))?;
    let path = safe_join(context, src)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.contains(['*', '?']) {
        let dir = path.parent().unwrap_or(context);
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{src}: {e}"))?
            .filter_map(Result::ok)
            .filter(|e| wildcard(&name, &e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(format!("{src}: no file in the build context matches"));
        }
        return Ok(found);
    }
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(format!("{src}: not found in the build context"));
    }
    Ok(vec![path])
}

/// Copies `from` (not following a symlink there) to `to`, whose parent
/// directories exist and are not symlinks; an existing `to` that is not a
/// directory is replaced, never written through.
fn copy_entry(from: &Path, to: &Path, written: &mut BTreeSet<PathBuf>) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if let Ok(existing) = std::fs::symlink_metadata(to)
        && (existing.file_type().is_symlink() || (!existing.is_dir() && meta.is_dir()))
    {
        std::fs::remove_file(to).map_err(|e| format!("{}: {e}", to.display()))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| format!("{}: {e}", from.display()))?;
        let _ = std::fs::remove_file(to);
        std::os::unix::fs::symlink(&target, to).map_err(|e| format!("{}: {e}", to.display()))?;
        written.insert(to.to_path_buf());
    } else if meta.is_dir() {
        if std::fs::symlink_metadata(to).is_err() {
            std::fs::create_dir(to).map_err(|e| format!("{}: {e}", to.display()))?;
        }
        written.insert(to.to_path_buf());
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .map_err(|e| format!("{}: {e}", from.display()))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            copy_entry(&e.path(), &to.join(e.file_name()), written)?;
        }
    } else {
        // A fresh file: never through whatever was there.
        let _ = std::fs::remove_file(to);
        let mut src = std::fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(|e| format!("{}: {e}", to.display()))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| format!("{}: {e}", from.display()))?;
        dst.set_permissions(meta.permissions())
            .map_err(|e| format!("{}: {e}", to.display()))?;
        written.insert(to.to_path_buf());
    }
    Ok(())
}

/// Copies `sources` from `context` into `root` at `dest` (Docker's rules:
/// a directory's contents go into `dest`; a file goes to `dest`, or into it
/// when it ends in `/`, exists as a directory, or several sources are
/// copied). Returns the image paths written.
pub fn copy_into(
    root: &Path,
    context: &Path,
    sources: &[CopySource],
    dest: &str,
    chmod: Option<u32>,
) -> Result<Vec<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let target = safe_join(root, dest)?;
    let target_is_dir =
        std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir() && !m.file_type().is_symlink());
    let many = sources.len() > 1
        || sources
            .iter()
            .any(|s| matches!(s, CopySource::Path(p) if p.contains(['*', '?'])));
    let into_dir = dest.ends_with('/') || dest.ends_with("/.") || target_is_dir || many;
    // The directory files go into (or the file's parent) exists, made
    // without following symlinks.
    let dir_part = if into_dir {
        dest.to_string()
    } else {
        Path::new(dest)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_else(|| "/".into())
    };
    safe_create_dirs(root, &dir_part)?;
    let mut written = BTreeSet::new();
    for source in sources {
        match source {
            CopySource::Inline(text) => {
                if into_dir {
                    return Err(format!(
                        "{dest}: a here-document needs a file name as destination"
                    ));
                }
                if std::fs::symlink_metadata(&target).is_ok() {
                    std::fs::remove_file(&target).map_err(|e| format!("{dest}: {e}"))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| format!("{dest}: {e}"))?;
                std::io::Write::write_all(&mut f, text.as_bytes())
                    .map_err(|e| format!("{dest}: {e}"))?;
                written.insert(target.clone());
            }
            CopySource::Path(src) => {
                for from in resolve_source(context, src)? {
                    let is_dir = std::fs::symlink_metadata(&from).is_ok_and(|m| m.is_dir());
                    if is_dir {
                        safe_create_dirs(root, dest)?;
                        let mut entries: Vec<_> = std::fs::read_dir(&from)
                            .map_err(|e| format!("{src}: {e}"))?
                            .filter_map(Result::ok)
                            .collect();
                        entries.sort_by_key(|e| e.file_name());
                        for e in entries {
                            copy_entry(&e.path(), &target.join(e.file_name()), &mut written)?;
                        }
                    } else {
                        let to = if into_dir {
                            target.join(from.file_name().unwrap_or_default())
                        } else {
                            target.clone()
                        };
                        copy_entry(&from, &to, &mut written)?;
                    }
                }
            }
        }
    }
    if let Some(mode) = chmod {
        for p in &written {
            if !std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
    }
    Ok(written.iter().map(|p| image_path(root, p)).collect())
}

/// What a snapshot knows of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    kind: u8,
    len: u64,
    mtime_ns: i128,
    mode: u32,
    link: Option<PathBuf>,
}

/// Every path under a root, by image path.
pub type Snapshot = BTreeMap<String, Entry>;

/// Walks `root`.
pub fn snapshot(root: &Path) -> Result<Snapshot, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let kind = if m.file_type().is_symlink() {
                2
            } else if m.is_dir() {
                1
            } else {
                0
            };
            if kind == 1 {
                stack.push(p.clone());
            }
            out.insert(
                image_path(root, &p),
                Entry {
                    kind,
                    len: m.len(),
                    mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    mode: m.mode(),
                    link: (kind == 2).then(|| std::fs::read_link(&p).ok()).flatten(),
                },
            );
        }
    }
    Ok(out)
}

/// What changed from `before` to `after`: paths added or modified, and
/// paths removed (only the topmost of a removed tree).
pub fn diff(before: &Snapshot, after: &Snapshot) -> (Vec<String>, Vec<String>) {
    let changed: Vec<String> = after
        .iter()
        .filter(|(p, e)| {
            before
                .get(*p)
                // A directory whose entries changed shows up through them.
                .is_none_or(|b| b != *e && !(b.kind == 1 && e.kind == 1 && b.mode == e.mode))
        })
        .map(|(p, _)| p.clone())
        .collect();
    let mut deleted: Vec<String> = Vec::new();
    for p in before.keys().filter(|p| !after.contains_key(*p)) {
        if !deleted.iter().any(|d| p.starts_with(&format!("{d}/"))) {
            deleted.push(p.clone());
        }
    }
    (changed, deleted)
}

/// A layer holding `paths` (image paths, read from `root`) with their
/// parent directories, and a whiteout for each of `deleted`.
pub fn layer(
    root: &Path,
    paths: &[String],
    deleted: &[String],
    owners: &Owners,
) -> Result<Layer, String> {
    use std::os::unix::fs::MetadataExt;
    let mut all: BTreeSet<String> = BTreeSet::new();
    for p in paths.iter().chain(deleted.iter()) {
        let mut cur = Path::new(p).parent();
        while let Some(parent) = cur {
            let s = parent.to_string_lossy().to_string();
            if s == "/" || s.is_empty() {
                break;
            }
            all.insert(s);
            cur = parent.parent();
        }
    }
    all.extend(paths.iter().cloned());
    let whiteouts: BTreeSet<String> = deleted
        .iter()
        .map(|d| {
            let path = Path::new(d);
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let parent = path
                .parent()
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default();
            format!("{}/.wh.{name}", parent.trim_end_matches('/'))
        })
        .collect();
    let mut builder = tar::Builder::new(Vec::new());
    let mut names: Vec<&String> = all.iter().chain(whiteouts.iter()).collect();
    names.sort();
    for name in names {
        let rel = name.trim_start_matches('/');
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        let (uid, gid) = owners.get(name).copied().unwrap_or((0, 0));
        header.set_uid(uid);
        header.set_gid(gid);
        if whiteouts.contains(name) {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, std::io::empty())
                .map_err(|e| format!("layer: {e}"))?;
            continue;
        }
        let disk = in_root(root, name)?;
        let m = std::fs::symlink_metadata(&disk).map_err(|e| format!("{name}: {e}"))?;
        header.set_mode(m.mode() & 0o7777);
        if m.file_type().is_symlink() {
            let target = std::fs::read_link(&disk).map_err(|e| format!("{name}: {e}"))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(|e| format!("layer: {e}"))?;
        } else if m.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{rel}/"), std::io::empty())
                .map_err(|e| format!("layer: {e}"))?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(m.len());
            let file = std::fs::File::open(&disk).map_err(|e| format!("{name}: {e}"))?;
            builder
                .append_data(&mut header, rel, file)
                .map_err(|e| format!("layer: {e}"))?;
        }
    }
    let tar = builder.into_inner().map_err(|e| format!("layer: {e}"))?;
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).map_err(|e| format!("layer: {e}"))?;
    let gz = gz.finish().map_err(|e| format!("layer: {e}"))?;
    Ok(Layer { gz, diff_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tripod-layer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(layer: &Layer) -> Vec<(String, u64, u32)> {
        let tar = {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&layer.gz[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        assert_eq!(
            layer.diff_id,
            format!("sha256:{}", hex(&Sha256::digest(&tar)))
        );
        let mut a = tar::Archive::new(&tar[..]);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().to_string(),
                    h.uid().unwrap(),
                    h.mode().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn copies_follow_dockers_rules_and_layers_are_reproducible() {
        let ctx = tmp("ctx");
        let root = tmp("root");
        std::fs::create_dir_all(ctx.join("dir/sub")).unwrap();
        std::fs::write(ctx.join("a.txt"), "a").unwrap();
        std::fs::write(ctx.join("b.txt"), "b").unwrap();
        std::fs::write(ctx.join("dir/sub/c"), "c").unwrap();
        let p = |s: &str| CopySource::Path(s.into());
        let w = copy_into(&root, &ctx, &[p("a.txt")], "/app/a", None).unwrap();
        assert_eq!(w, ["/app/a"]);
        let w = copy_into(&root, &ctx, &[p("*.txt")], "/txt", Some(0o600)).unwrap();
        assert_eq!(w, ["/txt/a.txt", "/txt/b.txt"]);
        let w = copy_into(&root, &ctx, &[p("dir")], "/d", None).unwrap();
        assert_eq!(w, ["/d/sub", "/d/sub/c"]);
        // Symbolic links: copied as links, never followed, never written
        // through (in the context or in the image).
        std::os::unix::fs::symlink("/", ctx.join("host")).unwrap();
        let err = copy_into(&root, &ctx, &[p("host/etc/passwd")], "/x", None).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let w = copy_into(&root, &ctx, &[p("host")], "/escape", None).unwrap();
        assert_eq!(w, ["/escape"]);
        assert_eq!(
            std::fs::read_link(root.join("escape")).unwrap(),
            Path::new("/")
        );
        let err = copy_into(&root, &ctx, &[p("a.txt")], "/escape/tmp/", None).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // A file copied onto the link replaces the link itself.
        copy_into(&root, &ctx, &[p("a.txt")], "/escape", None).unwrap();
        let m = std::fs::symlink_metadata(root.join("escape")).unwrap();
        assert!(m.is_file(), "the link was replaced, not followed");
        let err = copy_into(&root, &ctx, &[p("../etc/passwd")], "/x", None).unwrap_err();
        assert!(err.contains("outside the build context"), "{err}");
        assert!(copy_into(&root, &ctx, &[p("a.txt")], "/../../x", None).is_err());
        let owners = Owners::from([("/txt/a.txt".to_string(), (501, 20))]);
        let l = layer(
            &root,
            &["/txt/a.txt".into(), "/txt/b.txt".into()],
            &[],
            &owners,
        )
        .unwrap();
        assert_eq!(
            entries(&l),
            [
                ("txt/".to_string(), 0, 0o755),
                ("txt/a.txt".to_string(), 501, 0o600),
                ("txt/b.txt".to_string(), 0, 0o600)
            ]
        );
        let again = layer(
            &root,
            &["/txt/a.txt".into(), "/txt/b.txt".into()],
            &[],
            &owners,
        )
        .unwrap();
        assert_eq!(l, again, "same files, same layer");
    }

    #[test]
    fn a_snapshot_diff_finds_changes_and_deletions() {
        let root = tmp("snap");
        std::fs::create_dir_all(root.join("keep")).unwrap();
        std::fs::create_dir_all(root.join("gone/deep")).unwrap();
        std::fs::write(root.join("keep/same"), "1").unwrap();
        std::fs::write(root.join("keep/edit"), "1").unwrap();
        std::fs::write(root.join("gone/deep/f"), "1").unwrap();
        let before = snapshot(&root).unwrap();
        std::fs::write(root.join("keep/edit"), "22").unwrap();
        std::fs::write(root.join("keep/new"), "3").unwrap();
        std::fs::remove_dir_all(root.join("gone")).unwrap();
        let after = snapshot(&root).unwrap();
        let (changed, deleted) = diff(&before, &after);
        assert_eq!(changed, ["/keep/edit", "/keep/new"]);
        assert_eq!(deleted, ["/gone"]);
        let l = layer(&root, &changed, &deleted, &Owners::new()).unwrap();
        let names: Vec<String> = entries(&l).into_iter().map(|e| e.0).collect();
        assert_eq!(names, [".wh.gone", "keep/", "keep/edit", "keep/new"]);
    }
}
