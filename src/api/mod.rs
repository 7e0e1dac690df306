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
/// Annotation that starts a new build of the same generation when its value changes.
pub const ANNOTATION_REBUILD: &str = "build.tripod.dev/rebuild";

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
