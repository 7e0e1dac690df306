//! The runner's journal: one file per lease it holds, written before the
//! build starts and again with its outcome, removed once the controller is
//! done with it. A runner that restarts learns from it which leases it held
//! (reported as lost, "RunnerRestarted") and which outcomes it still owes
//! (reported again; the controller refuses those whose attempt is over).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::executor::v1 as pb;

/// A lease, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseId {
    /// Namespace.
    pub namespace: String,
    /// ImageBuild.
    pub image_build: String,
    /// Its UID.
    pub image_build_uid: String,
    /// Build ID.
    pub build_id: String,
    /// Platform.
    pub platform: String,
    /// Attempt (fencing token).
    pub attempt: u32,
    /// Lease object name.
    pub lease: String,
}

impl From<&pb::LeaseRef> for LeaseId {
    fn from(r: &pb::LeaseRef) -> Self {
        Self {
            namespace: r.namespace.clone(),
            image_build: r.image_build.clone(),
            image_build_uid: r.image_build_uid.clone(),
            build_id: r.build_id.clone(),
            platform: r.platform.clone(),
            attempt: r.attempt,
            lease: r.lease.clone(),
        }
    }
}

impl LeaseId {
    /// The wire form.
    pub fn to_ref(&self) -> pb::LeaseRef {
        pb::LeaseRef {
            namespace: self.namespace.clone(),
            image_build: self.image_build.clone(),
            image_build_uid: self.image_build_uid.clone(),
            build_id: self.build_id.clone(),
            platform: self.platform.clone(),
            attempt: self.attempt,
            lease: self.lease.clone(),
        }
    }

    /// `namespace/lease`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.lease)
    }
}

/// A build's outcome, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Outcome {
    /// Pushed.
    Pushed {
        /// Manifest digest.
        digest: String,
        /// Size.
        size: i64,
    },
    /// Failed.
    Failed {
        /// Reason.
        reason: String,
        /// Step.
        step: String,
        /// Message.
        message: String,
        /// Last output lines.
        last_lines: Vec<String>,
    },
}

impl Outcome {
    /// The wire form.
    pub fn to_proto(&self) -> pb::Outcome {
        pb::Outcome {
            outcome: Some(match self {
                Outcome::Pushed { digest, size } => pb::outcome::Outcome::Pushed(pb::Pushed {
                    digest: digest.clone(),
                    size: *size,
                }),
                Outcome::Failed {
                    reason,
                    step,
                    message,
                    last_lines,
                } => pb::outcome::Outcome::Failed(pb::Failed {
                    reason: reason.clone(),
                    step: step.clone(),
                    message: message.clone(),
                    last_lines: last_lines.clone(),
                }),
            }),
        }
    }
}

/// One journaled lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The lease.
    pub lease: LeaseId,
    /// Its outcome, once the build ended.
    pub outcome: Option<Outcome>,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

fn file_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        + ".json"
}

impl Journal {
    /// The journal in `dir` (created, mode 0700).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        crate::os::set_mode(dir, 0o700)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Records `entry` (atomically and durably: a crash or power loss
    /// leaves the old or the new).
    pub fn write(&self, entry: &Entry) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(file_name(&entry.lease.key()));
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Forgets lease `key`.
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.dir.join(file_name(key)));
    }

    /// The entry of lease `key`.
    pub fn get(&self, key: &str) -> Option<Entry> {
        let text = std::fs::read(self.dir.join(file_name(key))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every entry (unreadable files are skipped and logged).
    pub fn all(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice::<Entry>(&t).map_err(|e| e.to_string()))
            {
                Ok(entry) => out.push(entry),
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "unreadable journal entry")
                }
            }
        }
        out.sort_by_key(|e| e.lease.key());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_and_are_forgotten() {
        let dir = std::env::temp_dir().join(format!("tripod-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let j = Journal::open(&dir).unwrap();
        let lease = LeaseId {
            namespace: "ns".into(),
            image_build: "app".into(),
            image_build_uid: "u".into(),
            build_id: "b".into(),
            platform: "darwin/arm64".into(),
            attempt: 2,
            lease: "app-1-darwin-arm64-2".into(),
        };
        let mut e = Entry {
            lease: lease.clone(),
            outcome: None,
        };
        j.write(&e).unwrap();
        e.outcome = Some(Outcome::Pushed {
            digest: "sha256:x".into(),
            size: 1,
        });
        j.write(&e).unwrap();
        let again = Journal::open(&dir).unwrap();
        assert_eq!(again.all(), [e.clone()]);
        assert_eq!(again.get(&lease.key()), Some(e));
        again.remove(&lease.key());
        assert!(again.all().is_empty());
    }
}
