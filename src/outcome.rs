//! The outcome contract between the executor service and the reconcile
//! plan: what the executor service records on a build Pod or a runner's
//! Lease object (after the registry confirmed a digest) and what the plan
//! reads back. It lives
//! below both, so neither imports the other.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Annotation on a build Pod: the outcome the controller accepted from its
/// executor, after the registry confirmed the digest (`{"digest", "size"}`).
pub const ANNOTATION_RESULT: &str = "build.tripod.dev/result";
/// Annotation on a build Pod: the controller's MAC over the Pod's UID and
/// [`ANNOTATION_RESULT`]; a result without a valid one is not accepted.
pub const ANNOTATION_RESULT_MAC: &str = "build.tripod.dev/result-mac";
/// Annotation on a build Pod: the failure its executor reported (`{"reason", "message"}`).
pub const ANNOTATION_FAILURE: &str = "build.tripod.dev/failure";
/// Annotation on a build Pod: the build step its executor runs.
pub const ANNOTATION_STEP: &str = "build.tripod.dev/step";

/// Longest message kept from outside input (a registry's or an agent's
/// error) in a status field, an Event, an annotation or a log line.
pub const MAX_MESSAGE: usize = 2000;
/// Longest build step kept.
pub const MAX_STEP: usize = 256;

/// `text` cut to at most `max` characters, marked when cut.
pub fn cap(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A pushed image an executor reported and the registry confirmed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pushed {
    /// Manifest digest.
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: i64,
}

/// A failure an executor reported (or the controller found, e.g. a digest
/// the registry did not confirm).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failed {
    /// PascalCase reason, e.g. `StepFailed`, `PushFailed`, `DigestNotConfirmed`.
    pub reason: String,
    /// What happened.
    pub message: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// What the controller recorded on a build Pod from its executor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorReport {
    /// The accepted result.
    pub pushed: Option<Pushed>,
    /// The reported failure.
    pub failed: Option<Failed>,
    /// The current step.
    pub step: Option<String>,
}

impl ExecutorReport {
    /// Reads the report annotations of an executor object (a build Pod or
    /// a runner's Lease object).
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        let a = meta.annotations.as_ref();
        let get = |k: &str| a.and_then(|a| a.get(k));
        Self {
            pushed: get(ANNOTATION_RESULT).and_then(|v| serde_json::from_str(v).ok()),
            failed: get(ANNOTATION_FAILURE).and_then(|v| serde_json::from_str(v).ok()),
            step: get(ANNOTATION_STEP).cloned(),
        }
    }
}
