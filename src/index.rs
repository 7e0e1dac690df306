//! The OCI image index that joins the platforms of a build: made from the
//! platform manifests the registry holds, and checked when read back. Pure:
//! no registry, no Kubernetes.
//!
//! The bytes are deterministic (fixed field order, sorted annotations,
//! entries in the order of `spec.platforms`), so pushing the same index
//! again gives the same digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::platform::Platform;

/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of a Docker image manifest (v2, schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Index annotation: the build that made the index.
pub const ANNOTATION_BUILD_ID: &str = "build.tripod.dev/build-id";
/// Standard annotation: when the image was made (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Standard annotation: where its source is.
pub const ANNOTATION_SOURCE: &str = "org.opencontainers.image.source";
/// Standard annotation: the source revision built.
pub const ANNOTATION_REVISION: &str = "org.opencontainers.image.revision";

/// Why an index cannot be made, or what is wrong with one read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A platform manifest is not one an index can reference.
    #[error("the manifest of {platform} ({digest}) is {reason}")]
    BadChild {
        /// The platform.
        platform: String,
        /// Its manifest digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// Two entries would carry the same platform: a client could pull either.
    #[error("{first} and {second} both make an image for {platform}: a client could pull either")]
    Ambiguous {
        /// The platform both entries carry.
        platform: String,
        /// The first build platform.
        first: String,
        /// The second.
        second: String,
    },
    /// The index read back is not the one pushed.
    #[error("the index read back {0}")]
    ReadBack(String),
}

/// The platform of an index entry, as OCI writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryPlatform {
    /// `architecture`.
    pub architecture: String,
    /// `os`.
    pub os: String,
    /// `os.version` (Windows: `10.0.20348.2700`).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// `os.features` (Windows: e.g. `win32k`).
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// `variant` (`v7`, `v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// One entry of an index: a platform manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The manifest's media type.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: i64,
    /// The platform it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<EntryPlatform>,
}

/// An OCI image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u8,
    /// [`OCI_INDEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The platform manifests.
    pub manifests: Vec<Entry>,
    /// Annotations, sorted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A platform manifest as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// The platform it was built for (`spec.platforms`, canonical).
    pub platform: Platform,
    /// Manifest digest.
    pub digest: String,
    /// Manifest size in bytes.
    pub size: i64,
    /// Manifest media type.
    pub media_type: String,
    /// Its config's `os`.
    pub os: String,
    /// Its config's `architecture`.
    pub architecture: String,
    /// Its config's `variant`.
    pub variant: Option<String>,
    /// Its config's `os.version`.
    pub os_version: Option<String>,
    /// Its config's `os.features`.
    pub os_features: Vec<String>,
    /// Its config's `created`.
    pub created: Option<String>,
}

/// What goes into the index besides its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexMeta {
    /// The build ID.
    pub build_id: String,
    /// The source repository URL (credentials removed), if a git source.
    pub source: Option<String>,
    /// The source revision, if known.
    pub revision: Option<String>,
}

/// Makes the index of `children` (in their order): each entry's platform
/// from its image config, checked against the platform it was built for.
/// `created` is the newest child's, so the same children give the same
/// bytes.
pub fn assemble(children: &[Child], meta: &IndexMeta) -> Result<ImageIndex, IndexError> {
    let mut manifests = Vec::with_capacity(children.len());
    for c in children {
        let bad = |reason: String| IndexError::BadChild {
            platform: c.platform.to_string(),
            digest: c.digest.clone(),
            reason,
        };
        if c.media_type != OCI_MANIFEST && c.media_type != DOCKER_MANIFEST {
            return Err(bad(format!(
                "of media type {:?}, not an image manifest",
                c.media_type
            )));
        }
        let want = &c.platform;
        if c.os != want.os().as_str() || c.architecture != want.arch() {
            return Err(bad(format!("for {}/{}, not {want}", c.os, c.architecture)));
        }
        if want.variant().is_some() && c.variant.as_deref() != want.variant() {
            return Err(bad(format!(
                "of variant {:?}, not {want}",
                c.variant.as_deref().unwrap_or("")
            )));
        }
        if !want.accepts_os_version(c.os_version.as_deref()) {
            return Err(bad(format!(
                "of os.version {:?}, not of build {}",
                c.os_version.as_deref().unwrap_or(""),
                want.os_version().unwrap_or("")
            )));
        }
        manifests.push(Entry {
            media_type: c.media_type.clone(),
            digest: c.digest.clone(),
            size: c.size,
            platform: Some(EntryPlatform {
                architecture: c.architecture.clone(),
                os: c.os.clone(),
                os_version: c.os_version.clone(),
                os_features: c.os_features.clone(),
                variant: c
                    .variant
                    .clone()
                    .or_else(|| want.variant().map(str::to_string)),
            }),
        });
    }
    for (i, a) in manifests.iter().enumerate() {
        for (j, b) in manifests.iter().enumerate().skip(i + 1) {
            if a.platform == b.platform {
                let p = a.platform.as_ref();
                return Err(IndexError::Ambiguous {
                    platform: format!(
                        "{}/{}{}{}",
                        p.map(|p| p.os.as_str()).unwrap_or(""),
                        p.map(|p| p.architecture.as_str()).unwrap_or(""),
                        p.and_then(|p| p.variant.as_deref())
                            .map(|v| format!("/{v}"))
                            .unwrap_or_default(),
                        p.and_then(|p| p.os_version.as_deref())
                            .map(|v| format!(" (os.version {v})"))
                            .unwrap_or_default()
                    ),
                    first: children[i].platform.to_string(),
                    second: children[j].platform.to_string(),
                });
            }
        }
    }
    let mut annotations = BTreeMap::new();
    if !meta.build_id.is_empty() {
        annotations.insert(ANNOTATION_BUILD_ID.to_string(), meta.build_id.clone());
    }
    // The newest child's time, compared as instants (RFC 3339 text with
    // fractions or offsets does not sort as time), written in UTC.
    if let Some(created) = children
        .iter()
        .filter_map(|c| c.created.as_deref()?.parse::<jiff::Timestamp>().ok())
        .max()
    {
        annotations.insert(ANNOTATION_CREATED.to_string(), created.to_string());
    }
    if let Some(s) = &meta.source {
        annotations.insert(ANNOTATION_SOURCE.to_string(), s.clone());
    }
    if let Some(r) = &meta.revision {
        annotations.insert(ANNOTATION_REVISION.to_string(), r.clone());
    }
    Ok(ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_string()),
        manifests,
        annotations,
    })
}

impl ImageIndex {
    /// The JSON bytes pushed (deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain structs, strings and a BTreeMap: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses an index read from a registry.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        serde_json::from_slice(bytes)
            .map_err(|e| IndexError::ReadBack(format!("is not an image index: {e}")))
    }

    /// Checks that an index read back lists exactly the entries of
    /// `pushed` (digests and platforms, in order).
    pub fn check_read_back(&self, pushed: &ImageIndex) -> Result<(), IndexError> {
        if self.media_type.as_deref().is_some_and(|m| m != OCI_INDEX) {
            return Err(IndexError::ReadBack(format!(
                "has media type {:?}",
                self.media_type.as_deref().unwrap_or("")
            )));
        }
        let digests = |i: &ImageIndex| -> Vec<(String, Option<EntryPlatform>)> {
            i.manifests
                .iter()
                .map(|e| (e.digest.clone(), e.platform.clone()))
                .collect()
        };
        if digests(self) != digests(pushed) {
            return Err(IndexError::ReadBack(format!(
                "lists {} entries ({}), not the {} pushed",
                self.manifests.len(),
                self.manifests
                    .iter()
                    .map(|e| e.digest.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                pushed.manifests.len()
            )));
        }
        Ok(())
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let d = sha2::Sha256::digest(bytes);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(platform: &str, digest: &str, os_version: Option<&str>, created: &str) -> Child {
        let p: Platform = platform.parse().unwrap();
        Child {
            digest: digest.into(),
            size: 500,
            media_type: OCI_MANIFEST.into(),
            os: p.os().as_str().into(),
            architecture: p.arch().into(),
            variant: p.variant().map(str::to_string),
            os_version: os_version.map(str::to_string),
            os_features: Vec::new(),
            created: Some(created.into()),
            platform: p,
        }
    }

    #[test]
    fn entries_follow_the_children_and_bytes_are_stable() {
        let children = vec![
            child("linux/amd64", "sha256:aa", None, "2026-11-30T10:00:00Z"),
            child(
                "linux/arm/v7",
                "sha256:bb",
                None,
                "2026-11-30T11:02:00.5+01:00",
            ),
            child(
                "windows(10.0.17763)/amd64",
                "sha256:cc",
                Some("10.0.17763.6414"),
                "2026-11-30T10:01:00Z",
            ),
            child(
                "windows(10.0.20348)/amd64",
                "sha256:dd",
                Some("10.0.20348.2700"),
                "2026-11-30T10:01:00Z",
            ),
            child("darwin/arm64", "sha256:ee", None, "2026-11-30T09:00:00Z"),
        ];
        let meta = IndexMeta {
            build_id: "0a1b2c3d4e5f".into(),
            source: Some("https://git.example/app.git".into()),
            revision: None,
        };
        let index = assemble(&children, &meta).unwrap();
        assert_eq!(index.manifests.len(), 5);
        let w = index.manifests[2].platform.as_ref().unwrap();
        assert_eq!(
            (w.os.as_str(), w.os_version.as_deref()),
            ("windows", Some("10.0.17763.6414"))
        );
        assert_eq!(
            index.manifests[1]
                .platform
                .as_ref()
                .unwrap()
                .variant
                .as_deref(),
            Some("v7")
        );
        // 10:02:00.5Z is the newest (as time, not as text).
        assert_eq!(
            index.annotations[ANNOTATION_CREATED],
            "2026-11-30T10:02:00.5Z"
        );
        assert_eq!(index.annotations[ANNOTATION_BUILD_ID], "0a1b2c3d4e5f");
        let bytes = index.to_bytes();
        assert_eq!(bytes, assemble(&children, &meta).unwrap().to_bytes());
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains("\"os.version\":\"10.0.20348.2700\""),
            "{text}"
        );
        assert!(!text.contains("os.features"), "{text}");
        let back = ImageIndex::from_bytes(&bytes).unwrap();
        back.check_read_back(&index).unwrap();
        let mut other = index.clone();
        other.manifests.pop();
        assert!(other.check_read_back(&index).is_err());
        assert_eq!(digest_of(b"").len(), 71);
    }

    #[test]
    fn a_child_that_is_not_its_platform_is_refused() {
        let meta = IndexMeta::default();
        let mut wrong_arch = child("linux/arm64", "sha256:aa", None, "t");
        wrong_arch.architecture = "amd64".into();
        let err = assemble(&[wrong_arch], &meta).unwrap_err();
        assert!(
            err.to_string().contains("linux/amd64, not linux/arm64"),
            "{err}"
        );
        let wrong_build = child(
            "windows(10.0.17763)/amd64",
            "sha256:cc",
            Some("10.0.20348.2700"),
            "t",
        );
        let err = assemble(&[wrong_build], &meta).unwrap_err();
        assert!(err.to_string().contains("not of build 10.0.17763"), "{err}");
        let mut list = child("linux/amd64", "sha256:aa", None, "t");
        list.media_type = OCI_INDEX.into();
        assert!(assemble(&[list], &meta).is_err());
    }

    #[test]
    fn two_entries_of_one_platform_are_refused() {
        let a = child("windows/amd64", "sha256:aa", Some("10.0.20348.1"), "t");
        let b = child(
            "windows(10.0.20348)/amd64",
            "sha256:bb",
            Some("10.0.20348.1"),
            "t",
        );
        let err = assemble(&[a, b], &IndexMeta::default()).unwrap_err();
        assert!(matches!(err, IndexError::Ambiguous { .. }), "{err}");
    }
}
