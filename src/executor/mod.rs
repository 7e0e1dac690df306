//! The executor service (`tripod.executor.v1.Executor`), served by the
//! controller over TLS. An agent in a build Pod authenticates with the token
//! Secret of its build Pod, receives its assignment and reports progress and
//! one outcome; a runner's agent authenticates with its runner token and
//! takes leases ([`leases`], [`runners`]). Outcomes are recorded as
//! annotations on the build Pod or the Lease object (after the registry
//! confirmed a pushed digest); the reconcile plan reads them from there, so
//! the status has one writer.

pub mod grpc;
pub mod leases;
mod runner_grpc;
pub mod runners;
pub mod tls;
pub mod token;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};

use crate::api::{
    ImageBuild, LABEL_BUILD_ID, SecretReference, is_dns1123_label, is_dns1123_subdomain,
    is_label_value,
};
use crate::outcome::{
    ANNOTATION_FAILURE, ANNOTATION_RESULT, ANNOTATION_RESULT_MAC, ANNOTATION_STEP, Failed, Pushed,
};
use crate::platform::Platform;
use crate::reference::ImageRef;
use crate::registry::{ImageFacts, RegistryClient, credentials_for};
use crate::source::split_userinfo;

/// Errors of the executor service, each mapped to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The agent's claim is malformed.
    #[error("{0}")]
    InvalidClaim(String),
    /// The token does not speak for the claimed build.
    #[error("the token does not belong to {0}")]
    Unauthenticated(String),
    /// The claimed attempt is over (superseded, finished, or its ImageBuild
    /// is gone).
    #[error("{0}")]
    Stale(String),
    /// The claimed attempt is not yet recorded in the ImageBuild's status
    /// (the controller writes it right after creating the Pod): retry.
    #[error("{0}")]
    NotYet(String),
    /// Another session of the same build Pod is live, or the service is at
    /// its session limit: retry later.
    #[error("{0}")]
    Busy(String),
    /// A Kubernetes request failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A Secret the build needs is missing, malformed or not allowed.
    #[error("{0}")]
    Secret(String),
    /// The runner's host cannot build what its BuildRunner promises, or
    /// this service does not lease builds to runners.
    #[error("{0}")]
    Mismatch(String),
    /// The outcome of this attempt was already recorded.
    #[error("{0}")]
    AlreadyReported(String),
}

/// Creates `secret` in `api`; when one of its name exists already
/// (another replica made it first), returns that one instead.
pub(crate) async fn create_or_get(
    api: &Api<Secret>,
    secret: &Secret,
) -> Result<Secret, kube::Error> {
    match api.create(&kube::api::PostParams::default(), secret).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            api.get(secret.metadata.name.as_deref().unwrap_or_default())
                .await
        }
        Err(e) => Err(e),
    }
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
    /// Name of the build Pod.
    pub pod: String,
    /// UID of the ImageBuild.
    pub image_build_uid: String,
}

/// Longest token accepted (a v1 token is 100 characters).
const MAX_TOKEN_LEN: usize = 200;

/// A Kubernetes UID: 1–64 of `0-9a-z-`.
fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
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
        if !is_dns1123_subdomain(&self.pod) {
            return Err(invalid("pod", "a Pod name", &self.pod));
        }
        if !is_uid(&self.image_build_uid) {
            return Err(invalid("image_build_uid", "a UID", &self.image_build_uid));
        }
        if self.token.len() > MAX_TOKEN_LEN {
            return Err(ExecutorError::InvalidClaim(format!(
                "hello.token: longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        self.platform
            .parse()
            .map_err(|e| ExecutorError::InvalidClaim(format!("hello.platform: {e}")))
    }

    fn describe(&self) -> String {
        format!(
            "{}/{} build {} platform {} attempt {} (Pod {})",
            self.namespace, self.image_build, self.build_id, self.platform, self.attempt, self.pod
        )
    }

    fn subject<'a>(&'a self, platform: &'a str) -> token::Subject<'a> {
        token::Subject {
            namespace: &self.namespace,
            image_build: &self.image_build,
            image_build_uid: &self.image_build_uid,
            pod: &self.pod,
            build_id: &self.build_id,
            platform,
            attempt: self.attempt,
        }
    }
}

/// An authenticated session: the build Pod (or runner lease) it speaks for.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The ImageBuild.
    pub build: ImageBuild,
    /// Namespace.
    pub namespace: String,
    /// Name of the build Pod (and of its token Secret), or of the Lease
    /// object when `runner` is set.
    pub pod: String,
    /// The canonical platform.
    pub platform: Platform,
    /// The runner holding the lease `pod`, for a runner's build.
    pub runner: Option<String>,
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
    /// References to push, the first verified; with `push_by_digest`, only
    /// the repository of the first is used.
    pub tags: Vec<String>,
    /// Push the manifest by digest only, never to a tag: the controller
    /// joins the platforms into an index under the tags.
    pub push_by_digest: bool,
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
    /// The backend the ImageBuild asks for, if any.
    pub backend: Option<crate::api::BackendName>,
}

/// Whether `claim` is the current attempt of `build`: `NotYet` while the
/// status has not caught up with a Pod the controller just created, `Stale`
/// once the attempt is over.
fn currentness(build: &ImageBuild, claim: &Claim, platform: &str) -> Result<(), ExecutorError> {
    let name = format!("{}/{}", claim.namespace, claim.image_build);
    if build.metadata.uid.as_deref() != Some(claim.image_build_uid.as_str()) {
        return Err(ExecutorError::Stale(format!(
            "ImageBuild {name} was deleted and created again"
        )));
    }
    let status = build.status.clone().unwrap_or_default();
    if status.build_id.as_deref() != Some(claim.build_id.as_str()) {
        // The build the ImageBuild asks for now, not yet in the status, is
        // worth waiting for; any other is over.
        return Err(if build.build_id() == claim.build_id {
            ExecutorError::NotYet(format!(
                "build {} of {name} is not yet recorded in its status",
                claim.build_id
            ))
        } else {
            ExecutorError::Stale(format!(
                "build {} of {name} is no longer its current build",
                claim.build_id
            ))
        });
    }
    let Some(ps) = status.platforms.iter().find(|p| p.platform == platform) else {
        return Err(ExecutorError::Stale(format!(
            "{name} does not build {platform}"
        )));
    };
    let recorded = i64::from(ps.attempts);
    let claimed = i64::from(claim.attempt);
    if recorded < claimed {
        return Err(ExecutorError::NotYet(format!(
            "attempt {claimed} of {platform} is not yet recorded in {name}"
        )));
    }
    if recorded > claimed || ps.phase.is_finished() {
        return Err(ExecutorError::Stale(format!(
            "{} is not the current attempt of {name}",
            claim.describe()
        )));
    }
    Ok(())
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
    key: token::TokenKey,
    builds: Option<Store<ImageBuild>>,
    sessions: Arc<Sessions>,
    runners: Option<Store<crate::api::BuildRunner>>,
    hub: Option<Arc<runners::RunnerHub>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

/// The live sessions: at most one per build Pod, at most `max` in all.
#[derive(Debug)]
pub struct Sessions {
    live: Mutex<HashSet<String>>,
    max: usize,
}

/// A registered session; dropping it ends the registration.
#[derive(Debug)]
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    key: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.sessions.live.lock() {
            live.remove(&self.key);
        }
    }
}

impl Sessions {
    /// A registry of at most `max` sessions.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            live: Mutex::new(HashSet::new()),
            max,
        })
    }

    /// Registers the session of `namespace/pod`, refused while another one
    /// of the same Pod is live or `max` sessions are.
    pub fn register(
        self: &Arc<Self>,
        namespace: &str,
        pod: &str,
    ) -> Result<SessionGuard, ExecutorError> {
        let key = format!("{namespace}/{pod}");
        let mut live = self
            .live
            .lock()
            .map_err(|_| ExecutorError::Busy("session registry unavailable".into()))?;
        if live.contains(&key) {
            return Err(ExecutorError::Busy(format!(
                "another session of Pod {key} is live"
            )));
        }
        if live.len() >= self.max {
            return Err(ExecutorError::Busy(format!(
                "the executor service has {} live sessions, its limit",
                self.max
            )));
        }
        live.insert(key.clone());
        Ok(SessionGuard {
            sessions: self.clone(),
            key,
        })
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of [`Executors`].
pub struct ExecutorsConfig {
    /// Kubernetes client (the controller's).
    pub client: Client,
    /// The token key.
    pub key: token::TokenKey,
    /// The controller's ImageBuild cache, read before asking the API server.
    pub builds: Option<Store<ImageBuild>>,
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// The controller's BuildRunner cache (runner sessions).
    pub runners: Option<Store<crate::api::BuildRunner>>,
    /// The runner hub; without it, runner sessions are refused.
    pub hub: Option<Arc<runners::RunnerHub>>,
    /// True once the controller's caches (ImageBuilds, BuildRunners,
    /// Leases) have loaded: runner sessions wait for it.
    pub synced: Arc<std::sync::atomic::AtomicBool>,
}

impl Authenticated {
    /// Kind of the executor object: `Pod` or `Lease`.
    pub fn kind(&self) -> &'static str {
        if self.runner.is_some() {
            "Lease"
        } else {
            "Pod"
        }
    }
}

impl Executors {
    /// The service logic.
    pub fn new(cfg: ExecutorsConfig) -> Self {
        Self {
            client: cfg.client,
            key: cfg.key,
            builds: cfg.builds,
            sessions: Sessions::new(cfg.max_sessions),
            runners: cfg.runners,
            hub: cfg.hub,
            synced: cfg.synced,
        }
    }

    /// The live sessions.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Checks a claim: fields first, then the token's MAC (no Kubernetes
    /// request before the token is known to be the controller's), then that
    /// the claimed attempt is the ImageBuild's current one.
    pub async fn authenticate(&self, claim: &Claim) -> Result<Authenticated, ExecutorError> {
        let platform = claim.validate()?;
        let canonical = platform.to_string();
        if !self.key.verify(&claim.subject(&canonical), &claim.token) {
            return Err(ExecutorError::Unauthenticated(claim.describe()));
        }
        let build = self.current_build(claim, &canonical).await?;
        Ok(Authenticated {
            build,
            namespace: claim.namespace.clone(),
            pod: claim.pod.clone(),
            platform,
            runner: None,
        })
    }

    /// The ImageBuild `claim` names, once its claimed attempt is checked to
    /// be the current one: from the watch cache when it already shows this
    /// attempt, else from the API server (the status may be a moment behind).
    pub(crate) async fn current_build(
        &self,
        claim: &Claim,
        canonical: &str,
    ) -> Result<ImageBuild, ExecutorError> {
        let cached = self.builds.as_ref().and_then(|store| {
            store.get(&ObjectRef::new(&claim.image_build).within(&claim.namespace))
        });
        let build = match cached {
            Some(b) if currentness(&b, claim, canonical).is_ok() => (*b).clone(),
            _ => Api::<ImageBuild>::namespaced(self.client.clone(), &claim.namespace)
                .get_opt(&claim.image_build)
                .await
                .map_err(kube_err(format!(
                    "get ImageBuild {}/{}",
                    claim.namespace, claim.image_build
                )))?
                .ok_or_else(|| {
                    ExecutorError::Stale(format!(
                        "ImageBuild {}/{} no longer exists",
                        claim.namespace, claim.image_build
                    ))
                })?,
        };
        currentness(&build, claim, canonical)?;
        Ok(build)
    }

    async fn secret_data(
        &self,
        namespace: &str,
        r: &SecretReference,
        field: &str,
        types: &[&str],
    ) -> Result<BTreeMap<String, Vec<u8>>, ExecutorError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api
            .get_opt(&r.name)
            .await
            .map_err(kube_err(format!("get Secret {namespace}/{}", r.name)))?;
        crate::secret_policy::check(field, namespace, &r.name, secret.as_ref(), types)
            .map_err(ExecutorError::Secret)?;
        Ok(secret
            .and_then(|s| s.data)
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
                    Some(r) => {
                        self.secret_data(
                            ns,
                            r,
                            "spec.source.git.secretRef",
                            crate::secret_policy::GIT_TYPES,
                        )
                        .await?
                    }
                    None => BTreeMap::new(),
                };
                let text = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(v).to_string());
                // Credentials written into the URL travel as credentials
                // (never in a URL the agent logs, a label or an argv); a
                // Secret's, when given, win.
                let (url, from_url) = split_userinfo(&git.url);
                let (url_user, url_password) = from_url.unzip();
                let secret_has_basic =
                    data.contains_key("username") || data.contains_key("password");
                let (username, password) = if secret_has_basic {
                    (text("username"), text("password"))
                } else {
                    (url_user, url_password)
                };
                AssignedSource::Git {
                    url,
                    revision: git.revision.clone(),
                    context_dir: git.context_dir.clone(),
                    username,
                    password,
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
                let data = self
                    .secret_data(
                        ns,
                        r,
                        "spec.output.pushSecretRef",
                        crate::secret_policy::PUSH_TYPES,
                    )
                    .await?;
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
            LABEL_BUILD_ID.to_string(),
            auth.build
                .status
                .as_ref()
                .and_then(|s| s.build_id.clone())
                .unwrap_or_default(),
        );
        if let Some(git) = &spec.source.git {
            labels.insert(
                "org.opencontainers.image.source".to_string(),
                split_userinfo(&git.url).0,
            );
        }
        Ok(Assignment {
            source,
            dockerfile: spec.dockerfile.clone(),
            target: spec.target.clone().filter(|t| !t.is_empty()),
            build_args: spec.build_args_for(&auth.platform),
            tags,
            push_by_digest: spec.makes_index(spec.platforms.len()),
            cache_image: spec.cache.as_ref().map(|c| c.image.clone()),
            docker_config_json,
            insecure: spec.output.insecure,
            labels,
            platform: auth.platform.to_string(),
            backend: spec.executor.as_ref().and_then(|e| e.backend),
        })
    }

    async fn annotate(
        &self,
        auth: &Authenticated,
        key: &str,
        value: &str,
    ) -> Result<(), ExecutorError> {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        let what = format!("annotate {} {}/{}", auth.kind(), auth.namespace, auth.pod);
        let params = PatchParams::default();
        match auth.runner {
            None => Api::<Pod>::namespaced(self.client.clone(), &auth.namespace)
                .patch(&auth.pod, &params, &Patch::Merge(&patch))
                .await
                .map(drop),
            Some(_) => Api::<Lease>::namespaced(self.client.clone(), &auth.namespace)
                .patch(&auth.pod, &params, &Patch::Merge(&patch))
                .await
                .map(drop),
        }
        .map_err(kube_err(what))
    }

    /// Records the current step.
    pub async fn progress(&self, auth: &Authenticated, step: &str) -> Result<(), ExecutorError> {
        let step = crate::outcome::cap(step, crate::outcome::MAX_STEP);
        self.annotate(auth, ANNOTATION_STEP, &step).await
    }

    /// Records an outcome on the build Pod, once: the first outcome of an
    /// attempt stands (a repeat of the same outcome is acknowledged again,
    /// a different one refused). The write is conditional on the Pod's
    /// resourceVersion, so two writers cannot both win.
    async fn record(
        &self,
        auth: &Authenticated,
        key: &str,
        value: String,
    ) -> Result<(), ExecutorError> {
        match &auth.runner {
            None => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &auth.namespace);
                self.record_on(api, auth, key, value, |_| true).await
            }
            Some(runner) => {
                let api: Api<Lease> = Api::namespaced(self.client.clone(), &auth.namespace);
                // Still held by this runner, as read now (not from a cache).
                let held = |l: &Lease| runners::lease_holder(l) == Some(runner.as_str());
                self.record_on(api, auth, key, value, held).await
            }
        }
    }

    /// [`record`](Self::record) on the executor object (a build Pod or a
    /// runner's Lease object) in `api`. A Lease object is deleted when its
    /// lease expires: a write conditional on its resourceVersion cannot
    /// land on a lease that expired meanwhile (the fencing).
    async fn record_on<K>(
        &self,
        api: Api<K>,
        auth: &Authenticated,
        key: &str,
        value: String,
        still_ours: impl Fn(&K) -> bool,
    ) -> Result<(), ExecutorError>
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let what = format!("{} {}/{}", auth.kind(), auth.namespace, auth.pod);
        let object = api
            .get_opt(&auth.pod)
            .await
            .map_err(kube_err(format!("get {what}")))?
            .ok_or_else(|| ExecutorError::Stale(format!("{what} no longer exists")))?;
        if !still_ours(&object) {
            return Err(ExecutorError::Stale(format!(
                "{what} is no longer held by this executor"
            )));
        }
        let pod = object.meta();
        let build_uid = auth.build.metadata.uid.as_deref().unwrap_or_default();
        if pod.deletion_timestamp.is_some() {
            return Err(ExecutorError::Stale(format!("{what} is being deleted")));
        }
        if !pod
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == build_uid)
        {
            return Err(ExecutorError::Stale(format!(
                "{what} does not belong to this ImageBuild"
            )));
        }
        let existing = pod.annotations.clone().unwrap_or_default();
        if existing.contains_key(ANNOTATION_RESULT) || existing.contains_key(ANNOTATION_FAILURE) {
            return if existing.get(key) == Some(&value) {
                Ok(())
            } else {
                Err(ExecutorError::AlreadyReported(format!(
                    "the outcome of this attempt is already recorded on {what}"
                )))
            };
        }
        let mut annotations = BTreeMap::from([(key.to_string(), value.clone())]);
        if key == ANNOTATION_RESULT {
            // The reconciler accepts a result only with this MAC: a result
            // written by anyone else with `pods/patch` does not count.
            let pod_uid = pod.uid.as_deref().unwrap_or_default();
            annotations.insert(
                ANNOTATION_RESULT_MAC.to_string(),
                self.key.sign_result(pod_uid, &value),
            );
        }
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": pod.resource_version,
            "annotations": annotations,
        }});
        api.patch(&auth.pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 409 => ExecutorError::Busy(format!(
                    "{what} changed while recording the outcome; retry"
                )),
                kube::Error::Api(s) if s.code == 404 => {
                    ExecutorError::Stale(format!("{what} no longer exists"))
                }
                e => kube_err(format!("annotate {what}"))(e),
            })?;
        Ok(())
    }

    async fn record_failure(&self, auth: &Authenticated, f: &Failed) -> Result<(), ExecutorError> {
        let json = serde_json::to_string(f).unwrap_or_default();
        self.record(auth, ANNOTATION_FAILURE, json).await
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
                self.record_failure(auth, &f).await?;
                Ok((false, format!("recorded failure {}", f.reason)))
            }
            Outcome::Pushed(p) => {
                let reference = assignment.tags.first().cloned().unwrap_or_default();
                match self.verify(&reference, &p.digest, assignment).await {
                    Ok(()) => {
                        let json = serde_json::to_string(&p).unwrap_or_default();
                        self.record(auth, ANNOTATION_RESULT, json).await?;
                        let what = if assignment.push_by_digest {
                            ImageRef::parse(&reference)
                                .map(|r| r.pinned(&p.digest))
                                .unwrap_or_else(|_| p.digest.clone())
                        } else {
                            format!("{reference} is {}", p.digest)
                        };
                        Ok((true, what))
                    }
                    Err(message) => {
                        let f = Failed {
                            reason: "DigestNotConfirmed".into(),
                            message: crate::outcome::cap(&message, crate::outcome::MAX_MESSAGE),
                        };
                        self.record_failure(auth, &f).await?;
                        Ok((false, f.message))
                    }
                }
            }
        }
    }

    /// The tag resolves to `digest` (pushed by digest: the repository holds
    /// it), and the image there is one only this build could have made: its
    /// config carries this build's ID label and this platform.
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
        let client = RegistryClient::new(insecure);
        if assignment.push_by_digest {
            client
                .verify_digest(reference, digest, creds.as_ref())
                .await
        } else {
            client.verify(reference, digest, creds.as_ref()).await
        }
        .map_err(|e| e.to_string())?;
        let facts = client
            .inspect(reference, digest, creds.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        check_facts(&facts, assignment)
    }
}

/// Whether an image's config is what this assignment builds.
fn check_facts(facts: &ImageFacts, assignment: &Assignment) -> Result<(), String> {
    let want_id = assignment.labels.get(LABEL_BUILD_ID).map(String::as_str);
    let got_id = facts.labels.get(LABEL_BUILD_ID).map(String::as_str);
    if want_id.is_none() || got_id != want_id {
        return Err(format!(
            "the image is not this build's: its label {LABEL_BUILD_ID} is {:?}, not {:?}",
            got_id.unwrap_or(""),
            want_id.unwrap_or("")
        ));
    }
    let platform: Platform = assignment.platform.parse().map_err(|e| format!("{e}"))?;
    let os_ok = facts.os == platform.os().as_str();
    let arch_ok = facts.architecture == platform.arch();
    let variant_ok = platform.variant().is_none() || facts.variant.as_deref() == platform.variant();
    if !(os_ok && arch_ok && variant_ok) {
        return Err(format!(
            "the image is for {}/{}{}, not {platform}",
            facts.os,
            facts.architecture,
            facts
                .variant
                .as_deref()
                .map(|v| format!("/{v}"))
                .unwrap_or_default()
        ));
    }
    if !platform.accepts_os_version(facts.os_version.as_deref()) {
        return Err(format!(
            "the image's os.version is {:?}, not of the OS build {platform} names: build it FROM a base of that build",
            facts.os_version.as_deref().unwrap_or("")
        ));
    }
    Ok(())
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
            pod: "app.v2-1-linux-amd64-1".into(),
            image_build_uid: "6b1f0b6e-2f7a-4c1e-9a4e-0c1d2e3f4a5b".into(),
        }
    }

    #[test]
    fn claims_that_would_shape_a_request_are_refused_by_field() {
        assert!(claim().validate().is_ok());
        type Case = (&'static str, fn(&mut Claim));
        let cases: [Case; 12] = [
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
            ("hello.pod", |c| c.pod = "../secrets".into()),
            ("hello.image_build_uid", |c| {
                c.image_build_uid = "a/b".into()
            }),
            ("hello.token", |c| c.token = "x".repeat(201)),
        ];
        for (field, change) in cases {
            let mut c = claim();
            change(&mut c);
            let err = c.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn one_live_session_per_pod_and_a_cap_on_all() {
        let sessions = Sessions::new(2);
        let a = sessions.register("ns", "a").unwrap();
        assert!(matches!(
            sessions.register("ns", "a"),
            Err(ExecutorError::Busy(_))
        ));
        let b = sessions.register("other", "a").unwrap();
        let err = sessions.register("ns", "c").unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
        drop(a);
        assert!(sessions.register("ns", "a").is_ok());
        drop(b);
        assert!(sessions.is_empty());
    }

    #[test]
    fn currentness_tells_not_yet_from_over() {
        use crate::api::{ImageBuildStatus, Phase, PlatformStatus};
        let c = claim();
        let mut ib = ImageBuild::new("app.v2", Default::default());
        ib.metadata.uid = Some(c.image_build_uid.clone());
        let with = |build_id: Option<&str>, attempts: i32, phase: Phase| {
            let mut ib = ib.clone();
            ib.status = Some(ImageBuildStatus {
                build_id: build_id.map(str::to_string),
                platforms: vec![PlatformStatus {
                    platform: "linux/amd64".into(),
                    attempts,
                    phase,
                    ..Default::default()
                }],
                ..Default::default()
            });
            ib
        };
        let id = Some(c.build_id.as_str());
        let check = |ib: &ImageBuild| currentness(ib, &c, "linux/amd64");
        assert!(check(&with(id, 1, Phase::Building)).is_ok());
        // Not yet in the status: worth waiting for when it is the build the
        // ImageBuild asks for now, over otherwise.
        assert!(matches!(check(&ib), Err(ExecutorError::Stale(_))));
        let mut current = ib.clone();
        current.metadata.generation = Some(1);
        let mut c2 = c.clone();
        c2.build_id = current.build_id();
        assert!(matches!(
            currentness(&current, &c2, "linux/amd64"),
            Err(ExecutorError::NotYet(_))
        ));
        assert!(matches!(
            check(&with(id, 0, Phase::Pending)),
            Err(ExecutorError::NotYet(_))
        ));
        assert!(matches!(
            check(&with(id, 2, Phase::Building)),
            Err(ExecutorError::Stale(_))
        ));
        assert!(matches!(
            check(&with(id, 1, Phase::Succeeded)),
            Err(ExecutorError::Stale(_))
        ));
        let mut recreated = with(id, 1, Phase::Building);
        recreated.metadata.uid = Some("other".into());
        assert!(matches!(check(&recreated), Err(ExecutorError::Stale(_))));
    }

    #[test]
    fn only_an_image_with_this_builds_label_and_platform_is_accepted() {
        let assignment = Assignment {
            source: AssignedSource::Inline {
                dockerfile: "FROM scratch".into(),
                files: BTreeMap::new(),
            },
            dockerfile: None,
            target: None,
            build_args: vec![],
            tags: vec!["r.example/t/a:1".into()],
            push_by_digest: false,
            cache_image: None,
            docker_config_json: None,
            insecure: false,
            labels: BTreeMap::from([(LABEL_BUILD_ID.to_string(), "0a1b".to_string())]),
            platform: "linux/arm64".into(),
            backend: None,
        };
        let facts = |id: Option<&str>, os: &str, arch: &str| ImageFacts {
            os_version: None,
            os_features: Vec::new(),
            created: None,
            os: os.into(),
            architecture: arch.into(),
            variant: Some("v8".into()),
            labels: id
                .map(|v| BTreeMap::from([(LABEL_BUILD_ID.to_string(), v.to_string())]))
                .unwrap_or_default(),
        };
        assert!(check_facts(&facts(Some("0a1b"), "linux", "arm64"), &assignment).is_ok());
        for (f, want) in [
            (facts(None, "linux", "arm64"), "not this build's"),
            (facts(Some("ffff"), "linux", "arm64"), "not this build's"),
            (
                facts(Some("0a1b"), "linux", "amd64"),
                "for linux/amd64/v8, not linux/arm64",
            ),
            (facts(Some("0a1b"), "windows", "arm64"), "not linux/arm64"),
        ] {
            let err = check_facts(&f, &assignment).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
