//! The executor service (`tripod.executor.v1.Executor`), served by the
//! controller over TLS. An agent authenticates with the token Secret of its
//! build Pod, receives its assignment and reports progress and one outcome.
//! Outcomes are recorded as annotations on the build Pod (after the
//! registry confirmed a pushed digest); the reconcile plan reads them from
//! there, so the status has one writer.

pub mod grpc;
pub mod tls;
pub mod token;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use crate::api::{ImageBuild, LABEL_ATTEMPT, LABEL_BUILD_ID, LABEL_PLATFORM, SecretReference};
use crate::outcome::{ANNOTATION_FAILURE, ANNOTATION_RESULT, ANNOTATION_STEP, Failed, Pushed};
use crate::platform::Platform;
use crate::reference::ImageRef;
use crate::registry::{RegistryClient, credentials_for};

/// Errors of the executor service, each mapped to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The agent's claim is malformed.
    #[error("{0}")]
    InvalidClaim(String),
    /// The token does not speak for the claimed build.
    #[error("the token does not belong to {0}")]
    Unauthenticated(String),
    /// The claimed attempt is not the current one.
    #[error("{0}")]
    Stale(String),
    /// A Kubernetes request failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A Secret the build needs is missing or malformed.
    #[error("{0}")]
    Secret(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ExecutorError {
    let what = what.into();
    move |source| ExecutorError::Kube { what, source }
}

/// Who an agent says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The token read from the mounted Secret.
    pub token: String,
    /// Namespace of the ImageBuild.
    pub namespace: String,
    /// Name of the ImageBuild.
    pub image_build: String,
    /// Build ID.
    pub build_id: String,
    /// Platform, `os/arch[/variant]`.
    pub platform: String,
    /// Attempt number.
    pub attempt: u32,
}

/// A DNS-1123 label (a namespace's name): 1–63 of `a-z0-9-`, alphanumeric
/// at both ends.
fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (an object's name): dot-separated labels, at most
/// 253 characters.
fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A label value: at most 63 of `A-Za-z0-9-_.`, alphanumeric at both ends
/// (empty is a valid label value, but never a build ID).
fn is_label_value(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

impl Claim {
    /// Checks every field that reaches an API path or a label selector,
    /// before any API call: the wire never shapes a request.
    pub fn validate(&self) -> Result<Platform, ExecutorError> {
        let invalid = |field: &str, what: &str, value: &str| {
            let shown: String = value.chars().take(80).collect();
            ExecutorError::InvalidClaim(format!("hello.{field}: {shown:?} is not {what}"))
        };
        if !is_dns1123_label(&self.namespace) {
            return Err(invalid("namespace", "a namespace name", &self.namespace));
        }
        if !is_dns1123_subdomain(&self.image_build) {
            return Err(invalid("image_build", "an object name", &self.image_build));
        }
        if !is_label_value(&self.build_id) {
            return Err(invalid("build_id", "a build ID", &self.build_id));
        }
        if self.attempt == 0 {
            return Err(invalid("attempt", "an attempt number (1 or more)", "0"));
        }
        self.platform
            .parse()
            .map_err(|e| ExecutorError::InvalidClaim(format!("hello.platform: {e}")))
    }

    fn describe(&self) -> String {
        format!(
            "{}/{} build {} platform {} attempt {}",
            self.namespace, self.image_build, self.build_id, self.platform, self.attempt
        )
    }
}

/// An authenticated session: the build Pod it speaks for.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The ImageBuild.
    pub build: ImageBuild,
    /// Namespace.
    pub namespace: String,
    /// Name of the build Pod (and of its token Secret).
    pub pod: String,
    /// The canonical platform.
    pub platform: Platform,
}

/// Source of an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignedSource {
    /// A git repository.
    Git {
        /// Clone URL.
        url: String,
        /// Revision.
        revision: Option<String>,
        /// Context directory.
        context_dir: Option<String>,
        /// `username` of the git Secret.
        username: Option<String>,
        /// `password` of the git Secret.
        password: Option<String>,
        /// `ssh-privatekey` of the git Secret.
        ssh_private_key: Option<String>,
        /// `known_hosts` of the git Secret.
        known_hosts: Option<String>,
    },
    /// Inline files.
    Inline {
        /// Dockerfile text.
        dockerfile: String,
        /// Context files.
        files: BTreeMap<String, String>,
    },
}

/// What an agent is asked to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Where the context comes from.
    pub source: AssignedSource,
    /// Dockerfile path in the context.
    pub dockerfile: Option<String>,
    /// Multi-stage target.
    pub target: Option<String>,
    /// Build arguments.
    pub build_args: Vec<(String, String)>,
    /// References to push, the first verified.
    pub tags: Vec<String>,
    /// Layer cache repository.
    pub cache_image: Option<String>,
    /// Registry credentials.
    pub docker_config_json: Option<Vec<u8>>,
    /// Plain-HTTP registry.
    pub insecure: bool,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
    /// Canonical platform.
    pub platform: String,
}

/// What an agent reports at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The image was pushed.
    Pushed(Pushed),
    /// The build failed.
    Failed(Failed),
}

/// The logic behind the gRPC handlers.
#[derive(Clone)]
pub struct Executors {
    client: Client,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Executors {
    /// The service logic over a Kubernetes client.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Checks a claim against the token Secret and the ImageBuild's status.
    pub async fn authenticate(&self, claim: &Claim) -> Result<Authenticated, ExecutorError> {
        let platform = claim.validate()?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &claim.namespace);
        let selector = format!(
            "{LABEL_BUILD_ID}={},{LABEL_PLATFORM}={},{LABEL_ATTEMPT}={}",
            claim.build_id,
            platform.label_value(),
            claim.attempt
        );
        let found = secrets
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err(format!(
                "list token Secrets in {}",
                claim.namespace
            )))?
            .items;
        let owned: Vec<&Secret> = found
            .iter()
            .filter(|s| {
                s.owner_references()
                    .iter()
                    .any(|o| o.kind == "ImageBuild" && o.name == claim.image_build)
            })
            .collect();
        let [secret] = owned.as_slice() else {
            return Err(ExecutorError::Unauthenticated(claim.describe()));
        };
        let expected = secret
            .data
            .as_ref()
            .and_then(|d| d.get(token::TOKEN_KEY))
            .map(|b| b.0.clone())
            .unwrap_or_default();
        if expected.is_empty() || !constant_time_eq(&expected, claim.token.trim().as_bytes()) {
            return Err(ExecutorError::Unauthenticated(claim.describe()));
        }
        let builds: Api<ImageBuild> = Api::namespaced(self.client.clone(), &claim.namespace);
        let build = builds
            .get(&claim.image_build)
            .await
            .map_err(kube_err(format!(
                "get ImageBuild {}/{}",
                claim.namespace, claim.image_build
            )))?;
        let status = build.status.clone().unwrap_or_default();
        let current = status.build_id.as_deref() == Some(claim.build_id.as_str())
            && status.platforms.iter().any(|p| {
                p.platform == platform.to_string()
                    && i64::from(p.attempts) == i64::from(claim.attempt)
                    && !p.phase.is_finished()
            });
        if !current {
            return Err(ExecutorError::Stale(format!(
                "{} is not the current attempt of {}/{}",
                claim.describe(),
                claim.namespace,
                claim.image_build
            )));
        }
        Ok(Authenticated {
            build,
            namespace: claim.namespace.clone(),
            pod: secret.name_any(),
            platform,
        })
    }

    async fn secret_data(
        &self,
        namespace: &str,
        r: &SecretReference,
        field: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, ExecutorError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api
            .get_opt(&r.name)
            .await
            .map_err(kube_err(format!("get Secret {namespace}/{}", r.name)))?
            .ok_or_else(|| {
                ExecutorError::Secret(format!("{field}: Secret {namespace}/{} not found", r.name))
            })?;
        Ok(secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }

    /// What the authenticated agent is to build.
    pub async fn assignment(&self, auth: &Authenticated) -> Result<Assignment, ExecutorError> {
        let spec = &auth.build.spec;
        let ns = &auth.namespace;
        let source = match (&spec.source.git, &spec.source.inline) {
            (Some(git), _) => {
                let data = match &git.secret_ref {
                    Some(r) => self.secret_data(ns, r, "spec.source.git.secretRef").await?,
                    None => BTreeMap::new(),
                };
                let text = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(v).to_string());
                AssignedSource::Git {
                    url: git.url.clone(),
                    revision: git.revision.clone(),
                    context_dir: git.context_dir.clone(),
                    username: text("username"),
                    password: text("password"),
                    ssh_private_key: text("ssh-privatekey"),
                    known_hosts: text("known_hosts"),
                }
            }
            (None, Some(inline)) => AssignedSource::Inline {
                dockerfile: inline.dockerfile.clone(),
                files: inline.files.clone(),
            },
            (None, None) => {
                return Err(ExecutorError::InvalidClaim("spec.source: no source".into()));
            }
        };
        let image = ImageRef::parse(&spec.output.image)
            .map_err(|e| ExecutorError::InvalidClaim(format!("spec.output.image: {e}")))?;
        let mut tags = vec![image.to_string()];
        tags.extend(
            spec.output
                .additional_tags
                .iter()
                .map(|t| image.with_tag(t)),
        );
        let docker_config_json = match &spec.output.push_secret_ref {
            Some(r) => {
                let data = self.secret_data(ns, r, "spec.output.pushSecretRef").await?;
                Some(data.get(".dockerconfigjson").cloned().ok_or_else(|| {
                    ExecutorError::Secret(format!(
                        "spec.output.pushSecretRef: Secret {ns}/{} has no .dockerconfigjson key",
                        r.name
                    ))
                })?)
            }
            None => None,
        };
        let mut labels = BTreeMap::new();
        labels.insert(
            "build.tripod.dev/build-id".to_string(),
            auth.build
                .status
                .as_ref()
                .and_then(|s| s.build_id.clone())
                .unwrap_or_default(),
        );
        if let Some(git) = &spec.source.git {
            labels.insert(
                "org.opencontainers.image.source".to_string(),
                git.url.clone(),
            );
        }
        Ok(Assignment {
            source,
            dockerfile: spec.dockerfile.clone(),
            target: spec.target.clone().filter(|t| !t.is_empty()),
            build_args: spec
                .build_args
                .iter()
                .map(|a| (a.name.clone(), a.value.clone()))
                .collect(),
            tags,
            cache_image: spec.cache.as_ref().map(|c| c.image.clone()),
            docker_config_json,
            insecure: spec.output.insecure,
            labels,
            platform: auth.platform.to_string(),
        })
    }

    async fn annotate(
        &self,
        auth: &Authenticated,
        key: &str,
        value: &str,
    ) -> Result<(), ExecutorError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &auth.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        pods.patch(&auth.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_err(format!(
                "annotate Pod {}/{}",
                auth.namespace, auth.pod
            )))?;
        Ok(())
    }

    /// Records the current step.
    pub async fn progress(&self, auth: &Authenticated, step: &str) -> Result<(), ExecutorError> {
        let step: String = step.chars().take(256).collect();
        self.annotate(auth, ANNOTATION_STEP, &step).await
    }

    /// Records the outcome. A pushed digest is recorded only once the
    /// registry confirms it; otherwise the platform fails with reason
    /// `DigestNotConfirmed`. Returns whether a push was accepted, and why not.
    pub async fn outcome(
        &self,
        auth: &Authenticated,
        outcome: Outcome,
        assignment: &Assignment,
    ) -> Result<(bool, String), ExecutorError> {
        match outcome {
            Outcome::Failed(f) => {
                let json = serde_json::to_string(&f).unwrap_or_default();
                self.annotate(auth, ANNOTATION_FAILURE, &json).await?;
                Ok((false, format!("recorded failure {}", f.reason)))
            }
            Outcome::Pushed(p) => {
                let reference = assignment.tags.first().cloned().unwrap_or_default();
                match self.verify(&reference, &p.digest, assignment).await {
                    Ok(()) => {
                        let json = serde_json::to_string(&p).unwrap_or_default();
                        self.annotate(auth, ANNOTATION_RESULT, &json).await?;
                        Ok((true, format!("{reference} is {}", p.digest)))
                    }
                    Err(message) => {
                        let f = Failed {
                            reason: "DigestNotConfirmed".into(),
                            message: message.clone(),
                        };
                        let json = serde_json::to_string(&f).unwrap_or_default();
                        self.annotate(auth, ANNOTATION_FAILURE, &json).await?;
                        Ok((false, message))
                    }
                }
            }
        }
    }

    async fn verify(
        &self,
        reference: &str,
        digest: &str,
        assignment: &Assignment,
    ) -> Result<(), String> {
        let image = ImageRef::parse(reference).map_err(|e| e.to_string())?;
        let creds = match &assignment.docker_config_json {
            Some(json) => credentials_for(json, &image.registry).map_err(|e| e.to_string())?,
            None => None,
        };
        let insecure = if assignment.insecure {
            vec![image.registry.clone()]
        } else {
            Vec::new()
        };
        RegistryClient::new(insecure)
            .verify(reference, digest, creds.as_ref())
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim {
        Claim {
            token: "t".into(),
            namespace: "team-a".into(),
            image_build: "app.v2".into(),
            build_id: "0a1b2c3d4e5f".into(),
            platform: "linux/amd64".into(),
            attempt: 1,
        }
    }

    #[test]
    fn claims_that_would_shape_a_request_are_refused_by_field() {
        assert!(claim().validate().is_ok());
        type Case = (&'static str, fn(&mut Claim));
        let cases: [Case; 9] = [
            ("hello.namespace", |c| {
                c.namespace = "default/secrets#".into()
            }),
            ("hello.namespace", |c| c.namespace = String::new()),
            ("hello.namespace", |c| c.namespace = "Default".into()),
            ("hello.image_build", |c| c.image_build = "a/b".into()),
            ("hello.image_build", |c| c.image_build = "x?watch=1".into()),
            ("hello.build_id", |c| c.build_id = "id,tripod.dev/x".into()),
            ("hello.build_id", |c| c.build_id = "a!=b".into()),
            ("hello.attempt", |c| c.attempt = 0),
            ("hello.platform", |c| c.platform = "linux/amd64,x".into()),
        ];
        for (field, change) in cases {
            let mut c = claim();
            change(&mut c);
            let err = c.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
