//! The overhead a build pays for going through Tripod, on the real node.
//!
//! The `tripod dev` environment runs here (control plane, the real kubelet
//! with containerd and runc, the registry) with two controllers of its own
//! (each with the controller's identity, each for a namespace), and the
//! same contexts are built two ways, one run after the other:
//!
//! - **through Tripod**: an ImageBuild, its build Pod on the real node
//!   (buildd with buildah, vfs storage and chroot isolation, the agent),
//!   the push, the controller's check against the registry and the status;
//! - **directly**: `buildah bud` then `buildah push` on the host, from an
//!   empty image store each run (as a build Pod starts from one), once
//!   with buildah's defaults (overlay storage, OCI isolation, here with the
//!   node's runc: crun, Debian's default runtime, refuses hosts whose
//!   cgroups are in hybrid mode) and once with
//!   the flags buildd passes (`--storage-driver vfs --isolation chroot`),
//!   which splits Tripod's overhead into what the Pod costs and what the
//!   storage driver costs.
//!
//! The jq build goes through Tripod a second way, by a second controller
//! (its own namespace) that gives buildd CAP_SYS_ADMIN
//! (`--buildd-security-context`): buildd's storage probe then finds it can
//! mount overlay, which each such run checks in the buildd container's log.
//!
//! The phases of a build through Tripod come from where each one is seen:
//! the bench's watches (Pod created, status written), the controller's log
//! (agent connected, outcome received, outcome recorded) and the agent's
//! container log with the runtime's timestamps (agent started, build
//! start, push start). All of them are this machine's clock.
//!
//! Build Pods cannot reach the internet: the Debian build installs jq from
//! a flat apt repository of this machine's bookworm packages
//! (`testenv/jq-repo.sh`) served on the node address, for every way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tripod::api::{ImageBuild, LABEL_NAME, Phase};
use tripod_harness::env::{ControllerOptions, Env, EnvOptions, ensure_namespace};

use crate::{Error, Machine};

/// The namespace of the bench's ImageBuilds.
const NS: &str = "bench";
/// The namespace of the ImageBuilds whose buildd has CAP_SYS_ADMIN.
const NS_OVERLAY: &str = "bench-overlay";
/// buildd's securityContext for [`NS_OVERLAY`], the example of
/// `--buildd-security-context`'s help: root with CAP_SYS_ADMIN, the Pod's
/// `RuntimeDefault` seccomp profile (which allows mounting with it) and no
/// AppArmor profile (where AppArmor is on, its default one refuses mount).
const OVERLAY_SECURITY_CONTEXT: &str = r#"{"runAsUser":0,"capabilities":{"add":["SYS_ADMIN"]},"appArmorProfile":{"type":"Unconfined"}}"#;
/// How long one build may take.
const BUILD_DEADLINE: Duration = Duration::from_secs(600);

/// `tripod-bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct E2eArgs {
    /// Runs of each build, each way.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The `tripod` binary the controller runs (the build Pods run the
    /// buildd image the Dockerfile makes).
    #[arg(long)]
    pub tripod: PathBuf,
    /// State directory of the environment.
    #[arg(long, default_value = "/tmp/tripod-bench/e2e")]
    pub dir: PathBuf,
    /// Where the results go (JSON).
    #[arg(long, default_value = "docs/bench/e2e.json")]
    pub out: PathBuf,
    /// A label for the results.
    #[arg(long, default_value = "current")]
    pub label: String,
}

/// The phases of a build through Tripod, in order, as marks: the name, and
/// what a reader calls the time up to it from the previous mark.
pub const PHASES: [(&str, &str); 8] = [
    ("pod_created", "ImageBuild → Pod created"),
    ("agent_started", "Pod created → agent running"),
    ("agent_connected", "agent running → connected"),
    ("build_start", "connected → build start"),
    ("build_end", "build"),
    ("pushed", "push"),
    ("verified", "verified"),
    ("status", "verified → status"),
];

/// One build through Tripod: seconds from sending the create to each mark
/// of [`PHASES`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TripodRun {
    /// Seconds from the create to each mark, in the order of [`PHASES`].
    pub marks: Vec<f64>,
}

impl TripodRun {
    /// Seconds from the create to the status saying Succeeded.
    pub fn total(&self) -> f64 {
        self.marks.last().copied().unwrap_or(0.0)
    }

    /// Seconds of each phase (mark minus the previous mark).
    pub fn phases(&self) -> Vec<f64> {
        let mut prev = 0.0;
        self.marks
            .iter()
            .map(|m| {
                let d = m - prev;
                prev = *m;
                d
            })
            .collect()
    }
}

/// One direct buildah build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectRun {
    /// Seconds of `buildah bud`.
    pub build: f64,
    /// Seconds of `buildah push`.
    pub push: f64,
}

impl DirectRun {
    /// Build and push.
    pub fn total(&self) -> f64 {
        self.build + self.push
    }
}

/// One context built each way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Case {
    /// Short name (`hello`, `jq`).
    pub name: String,
    /// What it builds.
    pub description: String,
    /// Through Tripod.
    pub tripod: Vec<TripodRun>,
    /// Through Tripod with CAP_SYS_ADMIN for buildd (overlay storage);
    /// measured for the jq build only.
    #[serde(default)]
    pub tripod_overlay: Vec<TripodRun>,
    /// buildah on the host with its defaults.
    pub direct: Vec<DirectRun>,
    /// buildah on the host with buildd's storage driver and isolation.
    pub direct_buildd_flags: Vec<DirectRun>,
}

/// The results of `tripod-bench e2e`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eResults {
    /// A label for the run.
    pub label: String,
    /// Where it ran.
    pub machine: Machine,
    /// Runs of each build.
    pub runs: usize,
    /// buildah's version on the host (the build Pods run the buildd
    /// image's).
    pub buildah: String,
    /// The hello and the jq build.
    pub cases: Vec<Case>,
    /// The jq build with `spec.cache`, an empty cache repository each run.
    pub cache_cold: Vec<TripodRun>,
    /// The same right after, from the cache the cold build wrote.
    pub cache_warm: Vec<TripodRun>,
    /// Runs that failed (left out of the figures), and why.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// Runs the whole measurement: starts the environment, builds, stops it.
pub async fn run(args: &E2eArgs, source_dir: PathBuf) -> Result<E2eResults, Error> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if uid != "0" {
        return Err(Error::Bench(
            "e2e runs the real node (containerd, a bridge, iptables): run it as root".into(),
        ));
    }
    if args.runs == 0 {
        return Err(Error::Bench("--runs: at least 1".into()));
    }
    // The controller inherits the bench's environment, and its log's text
    // lines are where three of the marks come from.
    if std::env::var("TRIPOD_LOG_FORMAT").is_ok_and(|f| f != "text") {
        return Err(Error::Bench(
            "TRIPOD_LOG_FORMAT: e2e reads the controller's text log; unset it".into(),
        ));
    }
    let repo =
        PathBuf::from(tripod_harness::scripts::script(&source_dir, "jq-repo.sh", &[])?.trim());
    let tripod = std::path::absolute(&args.tripod).map_err(|e| Error::Io(e.to_string()))?;
    let mut env = Env::start(&EnvOptions {
        dir: args.dir.clone(),
        source_dir: source_dir.clone(),
        tripod: tripod.clone(),
        controller: false,
        registry_port: 0,
        install_crds: true,
        for_tests: false,
    })
    .await?;
    let result = match start_controllers(&mut env, &tripod) {
        Ok(ways) => measure(&env, &ways, args, &source_dir, &repo).await,
        Err(e) => Err(e),
    };
    env.stop().await;
    // The node's and the registry's files take gigabytes; the logs stay.
    if let Ok(entries) = std::fs::read_dir(&args.dir) {
        for entry in entries.flatten() {
            if entry.file_name() != "logs" {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    result
}

/// One way through Tripod: a namespace and the controller that watches it.
struct Way {
    ns: &'static str,
    controller_log: PathBuf,
    /// The storage driver buildd must report (checked in its log).
    storage_driver: &'static str,
    /// The Pod Security level the namespace enforces (CAP_SYS_ADMIN is
    /// beyond `baseline`).
    pod_security: &'static str,
}

/// The two ways through Tripod.
struct Ways {
    default: Way,
    overlay: Way,
}

/// Starts a controller for [`NS`] with the environment's settings and one
/// for [`NS_OVERLAY`] whose buildd has CAP_SYS_ADMIN.
fn start_controllers(env: &mut Env, tripod: &Path) -> Result<Ways, Error> {
    let mut way = |ns: &'static str, storage_driver, pod_security, extra_args| {
        let c = env.start_controller(
            tripod,
            &ControllerOptions {
                namespace: Some(ns.into()),
                lease_name: format!("tripod-{ns}"),
                log_name: format!("controller-{ns}.log"),
                extra_args,
            },
        )?;
        Ok::<_, Error>(Way {
            ns,
            controller_log: c.log,
            storage_driver,
            pod_security,
        })
    };
    Ok(Ways {
        default: way(NS, "vfs", "baseline", Vec::new())?,
        overlay: way(
            NS_OVERLAY,
            "overlay",
            "privileged",
            vec![format!(
                "--buildd-security-context={OVERLAY_SECURITY_CONTEXT}"
            )],
        )?,
    })
}

/// What the measuring steps share.
struct Bench {
    client: Client,
    registry: String,
    marks: Marks,
    work: PathBuf,
    /// The runc the real node runs containers with: the direct build's
    /// OCI runtime.
    runc: PathBuf,
}

/// When the bench's watches first saw each (ImageBuild name, mark), and
/// the build Pod of each ImageBuild.
#[derive(Default, Clone)]
struct Marks {
    seen: Arc<Mutex<HashMap<(String, &'static str), Timestamp>>>,
    pods: Arc<Mutex<HashMap<String, String>>>,
    failed: Arc<Mutex<HashMap<String, String>>>,
}

impl Marks {
    fn mark(&self, build: &str, what: &'static str) {
        if let Ok(mut m) = self.seen.lock() {
            m.entry((build.to_string(), what))
                .or_insert_with(Timestamp::now);
        }
    }

    fn get(&self, build: &str, what: &'static str) -> Option<Timestamp> {
        self.seen
            .lock()
            .ok()
            .and_then(|m| m.get(&(build.to_string(), what)).copied())
    }
}

async fn client_of(kubeconfig: &Path) -> Result<Client, Error> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| Error::Bench(format!("kubeconfig: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| Error::Bench(format!("kubeconfig: {e}")))?;
    Client::try_from(config).map_err(Error::Kube)
}

/// Watches namespace `ns`'s build Pods and ImageBuilds, recording when
/// each mark is first seen.
fn start_watches(client: &Client, ns: &str, marks: &Marks) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let m = marks.clone();
    tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default().labels(LABEL_NAME))
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            let pod = match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watching build Pods");
                    continue;
                }
            };
            let Some(build) = pod.labels().get(LABEL_NAME).cloned() else {
                continue;
            };
            if let Ok(mut p) = m.pods.lock() {
                p.entry(build.clone()).or_insert_with(|| pod.name_any());
            }
            m.mark(&build, "pod_created");
        }
    });
    let builds: Api<ImageBuild> = Api::namespaced(client.clone(), ns);
    let m = marks.clone();
    tokio::spawn(async move {
        let mut stream = watcher(builds, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            let ib = match ev {
                Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) => b,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watching ImageBuilds");
                    continue;
                }
            };
            let Some(status) = ib.status.as_ref() else {
                continue;
            };
            match status.phase {
                Some(Phase::Succeeded) => m.mark(&ib.name_any(), "status"),
                Some(Phase::Failed | Phase::Cancelled) => {
                    let why = status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| c.message.clone())
                        .unwrap_or_default();
                    if let Ok(mut f) = m.failed.lock() {
                        f.insert(ib.name_any(), why);
                    }
                }
                _ => {}
            }
        }
    });
}

async fn measure(
    env: &Env,
    ways: &Ways,
    args: &E2eArgs,
    source_dir: &Path,
    repo: &Path,
) -> Result<E2eResults, Error> {
    let client = client_of(&env.info.kubeconfig).await?;
    for way in [&ways.default, &ways.overlay] {
        ensure_namespace(&client, way.ns).await?;
        // Enforced as a cluster that enforces Pod Security would.
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        ns.patch(
            way.ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": way.pod_security,
            }}})),
        )
        .await?;
    }
    let debian = env.info.debian_image.clone().ok_or_else(|| {
        Error::Bench("the environment has no Debian base image (testenv/images.sh makes it)".into())
    })?;
    let work = args.dir.join("bench");
    std::fs::create_dir_all(&work).map_err(|e| Error::Io(e.to_string()))?;
    let bench = Bench {
        client: client.clone(),
        registry: env.info.registry.clone(),
        marks: Marks::default(),
        work,
        runc: PathBuf::from(tripod_harness::scripts::script(source_dir, "node.sh", &[])?.trim())
            .join("runc"),
    };
    start_watches(&client, NS, &bench.marks);
    start_watches(&client, NS_OVERLAY, &bench.marks);
    let server = AptServer::start(repo, &env.info.node_ip)?;

    let hello = hello_context(source_dir)?;
    let jq = jq_context(&debian, &server.url);
    // Builds that are not counted: the node pulls the buildd image once,
    // and the first jq build of either way reads the base and the
    // packages from disk.
    tracing::info!("warm-up builds (the node pulls the buildd image)");
    bench.tripod(&ways.default, "warmup", &hello, None).await?;
    bench.tripod(&ways.default, "warmup-jq", &jq, None).await?;
    let mut failures = Vec::new();
    // The overlay way may fail where the default works (no mount allowed):
    // that is a result, not the end of the bench.
    let r = bench
        .tripod(&ways.overlay, "warmup-jq-overlay", &jq, None)
        .await;
    keep(r, &mut Vec::new(), &mut failures);
    bench.direct("warmup-jq-direct", &jq, false)?;

    let mut cases = vec![
        Case {
            name: "hello".into(),
            description: "examples/hello.yaml: FROM scratch, COPY one file".into(),
            tripod: Vec::new(),
            tripod_overlay: Vec::new(),
            direct: Vec::new(),
            direct_buildd_flags: Vec::new(),
        },
        Case {
            name: "jq".into(),
            description: "FROM the debootstrapped Debian bookworm base, RUN apt-get update && \
                          apt-get install jq (from a local flat apt repository)"
                .into(),
            tripod: Vec::new(),
            tripod_overlay: Vec::new(),
            direct: Vec::new(),
            direct_buildd_flags: Vec::new(),
        },
    ];
    let mut cache_cold = Vec::new();
    let mut cache_warm = Vec::new();
    // A run that fails is reported and left out; the others go on.
    for i in 1..=args.runs {
        for (case, context) in cases.iter_mut().zip([&hello, &jq]) {
            let name = format!("{}-{i}", case.name);
            tracing::info!(run = i, case = %case.name, "through Tripod");
            let r = bench.tripod(&ways.default, &name, context, None).await;
            keep(r, &mut case.tripod, &mut failures);
            if case.name == "jq" {
                tracing::info!(run = i, case = %case.name, "through Tripod, buildd with CAP_SYS_ADMIN");
                let r = bench
                    .tripod(&ways.overlay, &format!("{name}-overlay"), context, None)
                    .await;
                keep(r, &mut case.tripod_overlay, &mut failures);
            }
            tracing::info!(run = i, case = %case.name, "buildah directly");
            let r = bench.direct(&format!("{name}-direct"), context, false);
            keep(r, &mut case.direct, &mut failures);
            let r = bench.direct(&format!("{name}-vfs"), context, true);
            keep(r, &mut case.direct_buildd_flags, &mut failures);
        }
        let cache = format!("{}/bench/jq-cache-{i}", bench.registry);
        tracing::info!(run = i, "jq with spec.cache: cold, then from the cache");
        let r = bench
            .tripod(&ways.default, &format!("jqcold-{i}"), &jq, Some(&cache))
            .await;
        keep(r, &mut cache_cold, &mut failures);
        let r = bench
            .tripod(&ways.default, &format!("jqwarm-{i}"), &jq, Some(&cache))
            .await;
        keep(r, &mut cache_warm, &mut failures);
    }
    let buildah = Command::new("buildah")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(E2eResults {
        label: args.label.clone(),
        machine: Machine::read(),
        runs: args.runs,
        buildah,
        cases,
        cache_cold,
        cache_warm,
        failures,
    })
}

/// Keeps the result of a run, or records why it failed.
fn keep<T>(r: Result<T, Error>, into: &mut Vec<T>, failures: &mut Vec<String>) {
    match r {
        Ok(v) => into.push(v),
        Err(e) => {
            tracing::warn!(error = %e, "a run failed; it is left out");
            failures.push(e.to_string());
        }
    }
}

/// A build context: a Dockerfile and files, as an inline source and on disk.
struct Context {
    dockerfile: String,
    files: Vec<(String, String)>,
}

fn hello_context(source_dir: &Path) -> Result<Context, Error> {
    let path = source_dir.join("examples").join("hello.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let ib: ImageBuild = serde_yaml::from_str(&text)
        .map_err(|e| Error::Bench(format!("{}: {e}", path.display())))?;
    let inline = ib
        .spec
        .source
        .inline
        .ok_or_else(|| Error::Bench(format!("{}: no inline source", path.display())))?;
    Ok(Context {
        dockerfile: inline.dockerfile,
        files: inline.files.into_iter().collect(),
    })
}

fn jq_context(debian: &str, repo_url: &str) -> Context {
    Context {
        dockerfile: format!(
            "FROM {debian}\n\
             RUN echo 'deb [trusted=yes] {repo_url} ./' > /etc/apt/sources.list \\\n \
             && rm -rf /etc/apt/sources.list.d/* \\\n \
             && apt-get -o APT::Sandbox::User=root update \\\n \
             && apt-get -o APT::Sandbox::User=root install -y --no-install-recommends jq \\\n \
             && rm -rf /var/lib/apt/lists/* \\\n \
             && jq --version\n"
        ),
        files: Vec::new(),
    }
}

impl Bench {
    /// Builds `context` through Tripod `way` as ImageBuild `name`; returns
    /// its marks once it succeeded (and buildd used the way's storage
    /// driver), then deletes it and waits for its Pod to go.
    async fn tripod(
        &self,
        way: &Way,
        name: &str,
        context: &Context,
        cache: Option<&str>,
    ) -> Result<TripodRun, Error> {
        let files: serde_json::Map<String, serde_json::Value> = context
            .files
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let mut spec = serde_json::json!({
            "source": {"inline": {"dockerfile": context.dockerfile, "files": files}},
            "platforms": ["linux/amd64"],
            "output": {"image": format!("{}/bench/{name}:1", self.registry), "insecure": true},
            "timeout": "30m",
            "ttlSecondsAfterFinished": 3600,
        });
        if let Some(c) = cache {
            spec["cache"] = serde_json::json!({ "image": c });
        }
        let ib: ImageBuild = serde_json::from_value(serde_json::json!({
            "apiVersion": "build.tripod.dev/v1alpha1",
            "kind": "ImageBuild",
            "metadata": {"name": name, "namespace": way.ns},
            "spec": spec,
        }))
        .map_err(|e| Error::Bench(format!("ImageBuild {name}: {e}")))?;
        let api: Api<ImageBuild> = Api::namespaced(self.client.clone(), way.ns);
        let start = Timestamp::now();
        api.create(&PostParams::default(), &ib).await?;
        let deadline = Instant::now() + BUILD_DEADLINE;
        loop {
            if self.marks.get(name, "status").is_some() {
                break;
            }
            if let Some(why) = self
                .marks
                .failed
                .lock()
                .ok()
                .and_then(|f| f.get(name).cloned())
            {
                return Err(Error::Bench(format!(
                    "ImageBuild {}/{name} failed: {why}",
                    way.ns
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Bench(format!(
                    "ImageBuild {}/{name} did not succeed within {BUILD_DEADLINE:?}",
                    way.ns
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pod = self
            .marks
            .pods
            .lock()
            .ok()
            .and_then(|p| p.get(name).cloned())
            .ok_or_else(|| Error::Bench(format!("no build Pod seen for {name}")))?;
        let log = Api::<Pod>::namespaced(self.client.clone(), way.ns)
            .logs(
                &pod,
                &LogParams {
                    container: Some("agent".into()),
                    timestamps: true,
                    ..Default::default()
                },
            )
            .await?;
        let buildd_log = Api::<Pod>::namespaced(self.client.clone(), way.ns)
            .logs(
                &pod,
                &LogParams {
                    container: Some("buildd".into()),
                    ..Default::default()
                },
            )
            .await?;
        let driver = storage_driver(&buildd_log);
        let controller_log = std::fs::read_to_string(&way.controller_log)
            .map_err(|e| Error::Io(format!("{}: {e}", way.controller_log.display())))?;
        let at = |what: &'static str| -> Result<Timestamp, Error> {
            let found = match what {
                "pod_created" | "status" => self.marks.get(name, what),
                "agent_started" => agent_mark(&log, |t| t.contains("agent started")),
                "agent_connected" => controller_mark(&controller_log, name, "agent connected"),
                "build_start" => agent_mark(&log, |t| t.starts_with("STEP 1/")),
                "build_end" => agent_mark(&log, |t| t.starts_with("pushing ")),
                "pushed" => controller_mark(&controller_log, name, "outcome received"),
                "verified" => controller_mark(&controller_log, name, "outcome recorded"),
                _ => None,
            };
            found.ok_or_else(|| Error::Bench(format!("{name}: no {what} mark found")))
        };
        let mut marks = Vec::new();
        for (what, _) in PHASES {
            let t = at(what)?;
            marks.push(t.duration_since(start).as_secs_f64());
        }
        if let Some(w) = marks.windows(2).position(|w| w[1] < w[0]) {
            return Err(Error::Bench(format!(
                "{name}: mark {} came before {} ({marks:?})",
                PHASES[w + 1].0,
                PHASES[w].0
            )));
        }
        api.delete(name, &DeleteParams::background()).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), way.ns);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !pods
            .list(&ListParams::default().labels(&format!("{LABEL_NAME}={name}")))
            .await?
            .items
            .is_empty()
        {
            if Instant::now() > deadline {
                return Err(Error::Bench(format!(
                    "the build Pod of {name} is still there after 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match driver {
            Some(d) if d == way.storage_driver => Ok(TripodRun { marks }),
            Some(d) => Err(Error::Bench(format!(
                "{name}: buildd used {d} storage, not {}",
                way.storage_driver
            ))),
            None => Err(Error::Bench(format!(
                "{name}: buildd's log names no storage driver"
            ))),
        }
    }

    /// Builds `context` with buildah on the host from an empty image store,
    /// then pushes it; with `buildd_flags`, the storage driver and
    /// isolation buildd uses.
    fn direct(
        &self,
        name: &str,
        context: &Context,
        buildd_flags: bool,
    ) -> Result<DirectRun, Error> {
        let dir = self.work.join(name);
        let ctx = dir.join("context");
        std::fs::create_dir_all(&ctx).map_err(|e| Error::Io(e.to_string()))?;
        std::fs::write(ctx.join("Dockerfile"), &context.dockerfile)
            .map_err(|e| Error::Io(e.to_string()))?;
        for (file, text) in &context.files {
            std::fs::write(ctx.join(file), text).map_err(|e| Error::Io(e.to_string()))?;
        }
        let tag = format!("{}/bench/{name}:1", self.registry);
        let buildah = |args: &[&str]| {
            let mut cmd = Command::new("buildah");
            cmd.arg("--root")
                .arg(dir.join("root"))
                .arg("--runroot")
                .arg(dir.join("runroot"));
            if buildd_flags {
                cmd.args(["--storage-driver", "vfs"]);
            }
            cmd.args(args).stdin(Stdio::null());
            cmd
        };
        let ctx_s = ctx.display().to_string();
        let runc = self.runc.display().to_string();
        // The host's network, as a build Pod's RUN steps have the Pod's:
        // buildah's own default network would be 10.88.0.0/16, the node's.
        let mut bud = vec![
            "bud",
            "--layers",
            "--network",
            "host",
            "--tls-verify=false",
            "-t",
            &tag,
        ];
        if buildd_flags {
            bud.extend(["--isolation", "chroot"]);
        } else {
            bud.extend(["--runtime", &runc]);
        }
        bud.push(&ctx_s);
        let build = timed(buildah(&bud), "buildah bud")?;
        let push = timed(
            buildah(&[
                "push",
                "--tls-verify=false",
                &tag,
                &format!("docker://{tag}"),
            ]),
            "buildah push",
        )?;
        let _ = buildah(&["rmi", "--all", "--force"]).output();
        let _ = std::fs::remove_dir_all(&dir);
        Ok(DirectRun { build, push })
    }
}

/// Runs `cmd`, failing with its output when it fails; its seconds.
fn timed(mut cmd: Command, what: &str) -> Result<f64, Error> {
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| Error::Io(format!("{what}: {e}")))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        let tail: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Error::Bench(format!("{what} failed: {tail}")));
    }
    Ok(secs)
}

/// The time of the first line of the controller's text log about the
/// executor session of ImageBuild `name` that says `message`.
fn controller_mark(log: &str, name: &str, message: &str) -> Option<Timestamp> {
    let session = format!(" name={name} ");
    log.lines()
        .find(|l| l.contains(&session) && l.contains(message))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

/// The storage driver buildd's log says it chose (text or JSON lines).
fn storage_driver(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("buildah storage driver"))?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let field = v
            .pointer("/fields/storage_driver")
            .or(v.get("storage_driver"))?;
        return field.as_str().map(str::to_string);
    }
    let value = line.split("storage_driver=").nth(1)?;
    let value = value.split_whitespace().next()?.trim_matches('"');
    Some(value.to_string())
}

/// The runtime's timestamp of the first line of a container log (from
/// `kubectl logs --timestamps`) whose text is `wanted`.
fn agent_mark(log: &str, wanted: impl Fn(&str) -> bool) -> Option<Timestamp> {
    log.lines().find_map(|l| {
        let (t, text) = l.split_once(' ')?;
        wanted(text).then(|| t.parse().ok()).flatten()
    })
}

/// `python3 -m http.server` serving the flat apt repository on the node
/// address, where build Pods reach the host.
struct AptServer {
    child: Child,
    url: String,
}

impl AptServer {
    fn start(repo: &Path, node_ip: &str) -> Result<AptServer, Error> {
        let port = tripod_harness::free_port()?;
        let child = tripod_harness::supervised_command("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", node_ip])
            .arg("--directory")
            .arg(repo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Io(format!("python3 -m http.server: {e}")))?;
        let url = format!("http://{node_ip}:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((node_ip, port)).is_err() {
            if Instant::now() > deadline {
                return Err(Error::Bench(format!(
                    "the apt repository server on {url} did not start"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(AptServer { child, url })
    }
}

impl Drop for AptServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_storage_driver_is_read_from_text_and_json_lines() {
        let text = "2026-12-01T05:00:00.1Z  INFO tripod::buildd: listening\n\
                    2026-12-01T05:00:00.2Z  INFO tripod::buildd: buildah storage driver \
                    storage_driver=\"vfs\" reason=overlay mount: operation not permitted\n";
        assert_eq!(storage_driver(text).as_deref(), Some("vfs"));
        let json = r#"{"timestamp":"t","level":"INFO","message":"buildah storage driver","storage_driver":"overlay","reason":"mounted"}"#;
        assert_eq!(storage_driver(json).as_deref(), Some("overlay"));
        let nested = r#"{"fields":{"message":"buildah storage driver","storage_driver":"vfs"}}"#;
        assert_eq!(storage_driver(nested).as_deref(), Some("vfs"));
        assert_eq!(storage_driver("nothing here"), None);
    }

    #[test]
    fn marks_come_from_the_session_of_that_build_and_the_first_matching_line() {
        let log = "\
2026-12-01T05:00:00.100Z  INFO executor_session{namespace=bench name=jq-10 build_id=b platform=linux/amd64 attempt=1}: tripod::executor::grpc: agent connected
2026-12-01T05:00:01.250Z  INFO executor_session{namespace=bench name=jq-1 build_id=a platform=linux/amd64 attempt=1}: tripod::executor::grpc: agent connected
2026-12-01T05:00:02.000Z  INFO executor_session{namespace=bench name=jq-1 build_id=a platform=linux/amd64 attempt=1}: tripod::executor::grpc: outcome recorded accepted=true
";
        let t = controller_mark(log, "jq-1", "agent connected").unwrap();
        assert_eq!(t.to_string(), "2026-12-01T05:00:01.25Z");
        assert!(controller_mark(log, "jq-2", "agent connected").is_none());
        let agent = "\
2026-12-01T05:00:01.500000000Z 2026-12-01T05:00:01.4Z INFO tripod::agent: assignment received
2026-12-01T05:00:01.700000000Z STEP 1/2: FROM scratch
2026-12-01T05:00:01.900000000Z STEP 2/2: COPY hello.txt /hello.txt
2026-12-01T05:00:02.100000000Z pushing 10.88.0.1:5000/bench/x:1
";
        let start = agent_mark(agent, |t| t.starts_with("STEP 1/")).unwrap();
        let end = agent_mark(agent, |t| t.starts_with("pushing ")).unwrap();
        assert!(agent_mark(agent, |t| t.contains("agent started")).is_none());
        assert_eq!(end.duration_since(start).as_millis(), 400);
    }

    #[test]
    fn phases_are_the_differences_between_marks() {
        let r = TripodRun {
            marks: vec![0.1, 0.5, 1.0, 1.5],
        };
        let p = r.phases();
        assert!((p[0] - 0.1).abs() < 1e-9 && (p[3] - 0.5).abs() < 1e-9);
        assert!((r.total() - 1.5).abs() < 1e-9);
    }
}
