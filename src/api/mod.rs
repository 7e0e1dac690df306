//! The Kubernetes API of Tripod: group `build.tripod.dev`, version `v1alpha1`.
//!
//! These types are the contract of design §3. Their `///` docs become
//! `kubectl explain`; their schema (with the CEL rules below) is what the API
//! server uses to refuse bad input before the controller ever sees it.

mod buildrunner;
mod imagebuild;

pub use buildrunner::*;
pub use imagebuild::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Tripod resource.
pub const GROUP: &str = "build.tripod.dev";

/// Label on build Pods and token Secrets: the name of the owning ImageBuild.
pub const LABEL_NAME: &str = "build.tripod.dev/name";
/// Label on build Pods: the platform they build, in label form (`linux-amd64`).
pub const LABEL_PLATFORM: &str = "build.tripod.dev/platform";
/// Label on build Pods: the build ID of the build they belong to.
pub const LABEL_BUILD_ID: &str = "build.tripod.dev/build-id";
/// Label on build Pods: the attempt number (1-based).
pub const LABEL_ATTEMPT: &str = "build.tripod.dev/attempt";
/// Annotation on runner Lease objects: the canonical platform they lease.
pub const ANNOTATION_PLATFORM: &str = "build.tripod.dev/platform";
/// Annotation that starts a new build of the same generation when its value changes.
pub const ANNOTATION_REBUILD: &str = "build.tripod.dev/rebuild";
/// Annotation that rebuilds only the failed (and cancelled) platforms of a
/// failed build when its value changes (a value set while the build runs
/// is answered when it has finished), then pushes the index; when only the
/// index failed, it pushes the index again.
pub const ANNOTATION_RETRY_FAILED: &str = "build.tripod.dev/retry-failed";

/// A DNS-1123 label (a namespace's name): 1–63 of `a-z0-9-`, alphanumeric
/// at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (an object's name): dot-separated labels, at most
/// 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A label value: at most 63 of `A-Za-z0-9-_.`, alphanumeric at both ends
/// (empty is a valid label value, but never a build ID).
pub fn is_label_value(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

impl ImageBuild {
    /// The build ID of this generation (and rebuild request): 12 hex digits
    /// of SHA-256 over the UID, the generation and the rebuild annotation.
    /// It changes when the spec changes or a rebuild is asked for.
    pub fn build_id(&self) -> String {
        use kube::ResourceExt;
        use sha2::Digest;
        let uid = self.uid().unwrap_or_default();
        let generation = self.metadata.generation.unwrap_or(0);
        let rebuild = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REBUILD))
            .map(String::as_str)
            .unwrap_or("");
        let digest = sha2::Sha256::digest(format!("{uid}/{generation}/{rebuild}").as_bytes());
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

/// The CRDs Tripod installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ImageBuild::crd(), BuildRunner::crd()]
}

/// The CRDs as one multi-document YAML stream (what `tripod crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
