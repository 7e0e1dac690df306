//! Scale on simulated nodes: throughput against bare Pods, create-to-Pod
//! latency at a fixed rate, the controller's API writes per build and in
//! steady state, and its memory with many ImageBuilds and across a forced
//! re-list.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tripod::api::{ImageBuild, LABEL_NAME, Phase};
use tripod_harness::certs::CONTROLLER_USER;

use crate::agent::Agents;
use crate::audit::{self, Requests};
use crate::env::{ScaleEnv, ScaleEnvOptions};
use crate::stats::{Summary, summary};
use crate::{Error, Machine};

/// Agent sessions at once: real agents run on their own nodes; here they
/// share the machine with everything else, so they take turns.
const AGENT_SESSIONS: usize = 16;
/// The namespace the bench's ImageBuilds live in.
const NAMESPACE: &str = "bench";
/// The namespace of the bare Pods.
const BARE_NAMESPACE: &str = "bench-bare";

/// `tripod-bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// ImageBuilds (and bare Pods) of the throughput run.
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
    /// Simulated linux/amd64 nodes.
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Creates in flight at once, for both sides of the throughput run.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// ImageBuild creates per second of the latency run.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// ImageBuilds of the latency run.
    #[arg(long, default_value_t = 400)]
    pub latency_builds: usize,
    /// Seconds of steady state, counted for writes.
    #[arg(long, default_value_t = 600)]
    pub steady_seconds: u64,
    /// ImageBuilds in the store for the memory figures.
    #[arg(long, default_value_t = 10_000)]
    pub memory_builds: usize,
    /// kube-scheduler's client QPS (burst twice that).
    #[arg(long, default_value_t = 1000)]
    pub scheduler_qps: u32,
    /// State directory of the cluster.
    #[arg(long, default_value = "/tmp/tripod-bench/scale")]
    pub dir: PathBuf,
    /// Where the results go (JSON).
    #[arg(long, default_value = "docs/bench/scale.json")]
    pub out: PathBuf,
    /// The `tripod` binary.
    #[arg(long, default_value = "target/release/tripod")]
    pub tripod: PathBuf,
    /// More arguments of `tripod controller` (repeatable).
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    pub controller_args: Vec<String>,
    /// A label for this run in the report (`before`, `after`).
    #[arg(long, default_value = "current")]
    pub label: String,
}

/// One side of the throughput run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Side {
    /// Objects created.
    pub n: usize,
    /// Seconds from the first create to the last Pod bound.
    pub seconds: f64,
    /// Pods bound per second.
    pub rate: f64,
    /// Seconds from the first create at which each Pod was seen bound,
    /// ascending.
    pub bound_at: Vec<f64>,
}

/// Results of `tripod-bench scale`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResults {
    /// The run's label.
    pub label: String,
    /// Where it ran.
    pub machine: Machine,
    /// Simulated nodes.
    pub nodes: usize,
    /// Creates in flight at once on both sides of the throughput run.
    #[serde(default)]
    pub concurrency: usize,
    /// Bare Pods: created by a client, bound by the scheduler.
    pub bare: Side,
    /// ImageBuilds: their build Pods bound.
    pub tripod: Side,
    /// `tripod.rate / bare.rate`.
    pub throughput_ratio: f64,
    /// CPU seconds per process during the bare side.
    #[serde(default)]
    pub bare_cpu: BTreeMap<String, f64>,
    /// CPU seconds per process from the first ImageBuild create until
    /// every build had Succeeded.
    #[serde(default)]
    pub tripod_cpu: BTreeMap<String, f64>,
    /// Builds of the throughput run that ended Succeeded.
    pub succeeded: usize,
    /// Builds of the throughput run that did not.
    pub not_succeeded: usize,
    /// Seconds from the first create until every build had Succeeded.
    pub all_succeeded_seconds: f64,
    /// The controller's requests from the first create until every build
    /// had Succeeded.
    pub requests: Requests,
    /// Writes per succeeded build, leader Lease renewals left out.
    pub writes_per_build: f64,
    /// Seconds the API server spent serving each kind of request
    /// (`apiserver_request_duration_seconds_sum`), from the first create
    /// until every build had Succeeded; the largest 12.
    #[serde(default)]
    pub apiserver_seconds: Vec<(String, f64)>,
    /// Cross-check: `apiserver_request_total` for the series only the
    /// controller writes (ImageBuild status), over the same span.
    pub metric_writes: BTreeMap<String, u64>,
    /// ImageBuild creates per second of the latency run.
    pub latency_rate: u32,
    /// Milliseconds from ImageBuild create to its build Pod seen by a
    /// watch, one per build.
    pub latency_ms: Vec<f64>,
    /// Their summary.
    pub latency: Summary,
    /// Seconds of steady state.
    pub steady_seconds: u64,
    /// Finished ImageBuilds present during it.
    pub steady_builds: usize,
    /// The controller's requests during it.
    pub steady: Requests,
    /// ImageBuilds in the store for the memory figures.
    pub memory_builds: usize,
    /// Pods in the store then.
    pub memory_pods: usize,
    /// The controller's RSS (MiB) as builds were added: (builds, MiB).
    pub rss_curve: Vec<(usize, f64)>,
    /// Steady RSS (MiB), the median of 20 samples.
    pub rss_mib: f64,
    /// Peak RSS (MiB, VmHWM reset before) across a forced re-list.
    pub relist_peak_mib: f64,
    /// Its ratio to the steady RSS.
    pub relist_ratio: f64,
    /// The controller's writes across the re-list.
    pub relist: Requests,
    /// After the finished builds' Pods were deleted (as
    /// `ttlSecondsAfterFinished` does): the same controller's RSS (MiB).
    #[serde(default)]
    pub ttl_rss_mib: Option<f64>,
    /// Then a controller started on the ImageBuilds alone: its RSS (MiB).
    #[serde(default)]
    pub ttl_fresh_rss_mib: Option<f64>,
}

impl ScaleResults {
    /// Whether the forced re-list made the controller list its
    /// ImageBuilds and Pods again (the audit log has those LISTs); if
    /// the watches resumed instead, the peak measures no re-list.
    pub fn relisted(&self) -> bool {
        self.relist.reads_of("list imagebuilds") > 0 && self.relist.reads_of("list pods") > 0
    }

    /// The re-list's peak RSS (MiB), when there was a re-list.
    pub fn relist_peak(&self) -> Option<f64> {
        self.relisted().then_some(self.relist_peak_mib)
    }
}

/// Runs the scale benchmarks.
pub async fn run(args: &ScaleArgs, source_dir: PathBuf) -> Result<ScaleResults, Error> {
    let tripod = std::path::absolute(&args.tripod).map_err(|e| Error::Io(e.to_string()))?;
    let mut env = ScaleEnv::start(&ScaleEnvOptions {
        dir: args.dir.clone(),
        source_dir,
        tripod: tripod.clone(),
        nodes: args.nodes,
        scheduler_qps: args.scheduler_qps,
        controller_args: args.controller_args.clone(),
    })
    .await?;
    let result = phases(args, &mut env, &tripod).await;
    env.stop().await;
    result
}

async fn phases(
    args: &ScaleArgs,
    env: &mut ScaleEnv,
    tripod: &std::path::Path,
) -> Result<ScaleResults, Error> {
    let client = env.client.clone();
    for ns in [NAMESPACE, BARE_NAMESPACE] {
        tripod_harness::env::ensure_namespace(&client, ns).await?;
    }
    let agents = Agents::start(client.clone(), NAMESPACE, AGENT_SESSIONS);
    let builds: Api<ImageBuild> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);

    // Warm-up: one build end to end; its Pod is the bare Pods' template.
    tracing::info!("warm-up build");
    builds
        .create(
            &PostParams::default(),
            &image_build("warmup", &env.registry),
        )
        .await?;
    wait_succeeded(&builds, &["warmup".to_string()], Duration::from_secs(120)).await?;
    let template = pods
        .list(&ListParams::default().labels(&format!("{LABEL_NAME}=warmup")))
        .await?
        .items
        .into_iter()
        .next()
        .ok_or_else(|| Error::Bench("the warm-up build left no Pod".into()))?;

    // Throughput, bare Pods.
    tracing::info!(n = args.n, "throughput: bare Pods");
    let cpu = cpu_seconds(&env.processes());
    let bare = bare_pods(&client, &template, args.n, args.concurrency).await?;
    let bare_cpu = cpu_delta(&cpu, &cpu_seconds(&env.processes()));
    tracing::info!(rate = bare.rate, "bare Pods bound");
    let ns_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns_api
        .delete(BARE_NAMESPACE, &DeleteParams::default())
        .await?;
    // Gone, Pods and all, before the other side starts.
    let until = Instant::now() + Duration::from_secs(300);
    while ns_api.get_opt(BARE_NAMESPACE).await?.is_some() {
        if Instant::now() > until {
            return Err(Error::Bench(
                "namespace bench-bare not gone after 300 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Throughput, ImageBuilds.
    tracing::info!(n = args.n, "throughput: ImageBuilds");
    let log = env.audit_log();
    let metric_before = audit::metric_writes(&client).await?;
    let seconds_before = audit::metric_sum(
        &audit::metrics(&client).await?,
        "apiserver_request_duration_seconds_sum",
        false,
    );
    let from = audit::mark(&log);
    let cpu = cpu_seconds(&env.processes());
    let names: Vec<String> = (0..args.n).map(|i| format!("b{i:05}")).collect();
    // The agents wait until every build Pod is bound, as the bare Pods'
    // side has no work after binding either; then they finish the builds.
    agents.pause();
    let (tripod_side, all_done) =
        tripod_builds(&client, &env.registry, &names, args.concurrency).await?;
    tracing::info!(rate = tripod_side.rate, "build Pods bound");
    agents.resume();
    let (succeeded, not_succeeded) =
        wait_all_finished(&builds, &names, Duration::from_secs(600 + args.n as u64)).await?;
    let all_succeeded_seconds = all_done.elapsed().as_secs_f64();
    let tripod_cpu = cpu_delta(&cpu, &cpu_seconds(&env.processes()));
    // Let the last status writes land in the log.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to = audit::mark(&log);
    let metric_after = audit::metric_writes(&client).await?;
    let seconds_after = audit::metric_sum(
        &audit::metrics(&client).await?,
        "apiserver_request_duration_seconds_sum",
        false,
    );
    let mut apiserver_seconds: Vec<(String, f64)> = seconds_after
        .iter()
        .map(|(k, v)| (k.clone(), v - seconds_before.get(k).copied().unwrap_or(0.0)))
        .filter(|(k, v)| *v > 0.0 && !k.starts_with("WATCH"))
        .collect();
    apiserver_seconds.sort_by(|a, b| b.1.total_cmp(&a.1));
    apiserver_seconds.truncate(12);
    let requests = audit::count(&log, from, to, CONTROLLER_USER)?;
    let writes_per_build = requests.writes_without_leases() as f64 / succeeded.max(1) as f64;
    let metric_writes = audit::delta(&metric_before, &metric_after)
        .into_iter()
        .filter(|(k, _)| k.contains("imagebuilds"))
        .collect();
    tracing::info!(
        succeeded,
        not_succeeded,
        writes_per_build,
        agents_failed = agents
            .stats
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        "throughput run done"
    );

    // Latency at a fixed rate.
    tracing::info!(rate = args.rate, builds = args.latency_builds, "latency");
    let latency_names: Vec<String> = (0..args.latency_builds)
        .map(|i| format!("l{i:05}"))
        .collect();
    agents.pause();
    let latency_ms = latency(&client, &env.registry, &latency_names, args.rate).await;
    agents.resume();
    let latency_ms = latency_ms?;
    wait_all_finished(&builds, &latency_names, Duration::from_secs(600)).await?;

    // Steady state.
    tracing::info!(seconds = args.steady_seconds, "steady state");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady_builds = builds.list(&ListParams::default()).await?.items.len();
    let from = audit::mark(&log);
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let steady = audit::count(&log, from, audit::mark(&log), CONTROLLER_USER)?;

    // Memory: more builds, then a forced re-list.
    let pid = env
        .controller_pid()
        .ok_or_else(|| Error::Bench("no controller".into()))?;
    let mut rss_curve = vec![(steady_builds, rss_mib(pid, "VmRSS")?)];
    let mut present = steady_builds;
    let mut batch = 0;
    while present < args.memory_builds {
        let take = (args.memory_builds - present).min(2000);
        let names: Vec<String> = (0..take).map(|i| format!("m{batch}-{i:05}")).collect();
        tracing::info!(present, adding = take, "memory: more builds");
        tripod_builds(&client, &env.registry, &names, args.concurrency).await?;
        wait_all_finished(&builds, &names, Duration::from_secs(600 + take as u64)).await?;
        present += take;
        batch += 1;
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_curve.push((present, rss_mib(pid, "VmRSS")?));
    }
    let memory_pods = Api::<Pod>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    let rss = steady_rss(pid).await?;
    let from = audit::mark(&log);
    let relist_peak_mib = forced_relist(env, pid, &log, from).await?;
    let relist = audit::count(&log, from, audit::mark(&log), CONTROLLER_USER)?;
    drop(agents);
    // Hours of results are not thrown away for this last figure.
    let ttl = after_ttl(env, &pods)
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "memory with the Pods gone: not measured"))
        .ok();
    let _ = tripod;
    Ok(ScaleResults {
        label: args.label.clone(),
        machine: Machine::read(),
        nodes: args.nodes,
        concurrency: args.concurrency,
        throughput_ratio: tripod_side.rate / bare.rate.max(f64::MIN_POSITIVE),
        bare,
        bare_cpu,
        tripod: tripod_side,
        tripod_cpu,
        succeeded,
        not_succeeded,
        all_succeeded_seconds,
        requests,
        writes_per_build,
        metric_writes,
        apiserver_seconds,
        latency_rate: args.rate,
        latency: summary(&latency_ms),
        latency_ms,
        steady_seconds: args.steady_seconds,
        steady_builds,
        steady,
        memory_builds: present,
        memory_pods,
        rss_curve,
        rss_mib: rss,
        relist_peak_mib,
        relist_ratio: relist_peak_mib / rss.max(f64::MIN_POSITIVE),
        relist,
        ttl_rss_mib: ttl.as_ref().map(|t| t.same_process),
        ttl_fresh_rss_mib: ttl.as_ref().map(|t| t.fresh),
    })
}

/// The steady RSS (MiB) of process `pid`: the median of 20 samples, 0.5 s
/// apart.
async fn steady_rss(pid: u32) -> Result<f64, Error> {
    let mut samples = Vec::new();
    for _ in 0..20 {
        samples.push(rss_mib(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(summary(&samples).p50)
}

/// The memory figures once the builds' Pods are gone.
struct AfterTtl {
    same_process: f64,
    fresh: f64,
}

/// Deletes the build Pods of the finished builds, as
/// `ttlSecondsAfterFinished` does once it has passed, waits until they are
/// gone, then takes the controller's RSS, and that of a controller started
/// again on the ImageBuilds alone. (Setting the TTL on the builds now would
/// not do: like any change of the spec, it starts a new build.)
async fn after_ttl(env: &mut ScaleEnv, pods: &Api<Pod>) -> Result<AfterTtl, Error> {
    let n = pods
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    tracing::info!(pods = n, "memory: build Pods deleted, as after their TTL");
    let until = Instant::now() + Duration::from_secs(600);
    // One DELETE of the collection; sent again when it failed (the API
    // server gives up on a long one) or the count stopped falling.
    let mut last = 0;
    loop {
        let left = pods
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len();
        if left == 0 {
            break;
        }
        if Instant::now() > until {
            return Err(Error::Bench(format!(
                "{left} build Pods still there 600 s after their deletion"
            )));
        }
        if left >= last
            && let Err(e) = pods
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
        {
            tracing::warn!(error = %e, left, "deleting the build Pods; again");
        }
        last = left;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let steady = |pid: u32| async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        steady_rss(pid).await
    };
    let pid = env
        .controller_pid()
        .ok_or_else(|| Error::Bench("no controller".into()))?;
    let same_process = steady(pid).await?;
    tracing::info!("memory: a controller started on the ImageBuilds alone");
    env.start_controller().await?;
    let pid = env
        .controller_pid()
        .ok_or_else(|| Error::Bench("no controller".into()))?;
    let fresh = steady(pid).await?;
    Ok(AfterTtl {
        same_process,
        fresh,
    })
}

/// A single-platform ImageBuild pushing to its own tag.
fn image_build(name: &str, registry: &str) -> ImageBuild {
    let value = serde_json::json!({
        "apiVersion": "build.tripod.dev/v1alpha1",
        "kind": "ImageBuild",
        "metadata": {"name": name},
        "spec": {
            "source": {"inline": {
                "dockerfile": "FROM scratch\nCOPY bench.txt /bench.txt\n",
                "files": {"bench.txt": "tripod bench\n"},
            }},
            "platforms": ["linux/amd64"],
            "output": {"image": format!("{registry}/bench/{name}:latest"), "insecure": true},
            "timeout": "30m",
        },
    });
    serde_json::from_value(value).unwrap_or_else(|e| unreachable!("a valid ImageBuild: {e}"))
}

/// Records, per key, the first instant a Pod of `namespace` matched
/// `bound` (or was seen at all, when `bound` is false).
fn pod_times(
    client: &Client,
    namespace: &str,
    key: fn(&Pod) -> Option<String>,
    bound: bool,
) -> (
    Arc<Mutex<HashMap<String, Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let times = Arc::new(Mutex::new(HashMap::new()));
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let t = times.clone();
    let task = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(pod) = event else { continue };
            let now = Instant::now();
            if bound
                && pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_none()
            {
                continue;
            }
            if let Some(k) = key(&pod)
                && let Ok(mut m) = t.lock()
            {
                m.entry(k).or_insert(now);
            }
        }
    });
    (times, task)
}

fn pod_name(p: &Pod) -> Option<String> {
    p.metadata.name.clone()
}

fn build_name(p: &Pod) -> Option<String> {
    p.labels().get(LABEL_NAME).cloned()
}

/// Waits until `times` holds `n` entries; returns them as seconds from
/// `start`, ascending.
async fn wait_count(
    times: &Mutex<HashMap<String, Instant>>,
    n: usize,
    start: Instant,
    deadline: Duration,
    what: &str,
) -> Result<Vec<f64>, Error> {
    let until = Instant::now() + deadline;
    loop {
        let seen = times.lock().map(|m| m.len()).unwrap_or(0);
        if seen >= n {
            break;
        }
        if Instant::now() > until {
            return Err(Error::Bench(format!(
                "{what}: {seen} of {n} after {deadline:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out: Vec<f64> = times
        .lock()
        .map(|m| {
            m.values()
                .map(|t| t.saturating_duration_since(start).as_secs_f64())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn side(n: usize, bound_at: Vec<f64>) -> Side {
    let seconds = bound_at.last().copied().unwrap_or(0.0);
    Side {
        n,
        seconds,
        rate: n as f64 / seconds.max(f64::MIN_POSITIVE),
        bound_at,
    }
}

/// Creates `n` copies of a build Pod (no owner, no Tripod labels) and
/// times them until the scheduler has bound every one.
async fn bare_pods(
    client: &Client,
    template: &Pod,
    n: usize,
    concurrency: usize,
) -> Result<Side, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), BARE_NAMESPACE);
    let (times, task) = pod_times(client, BARE_NAMESPACE, pod_name, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.node_name = None;
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let pod = Pod {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("p{i:05}")),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_string(),
                        "bench-bare".to_string(),
                    )])),
                    ..Default::default()
                },
                spec: Some(spec.clone()),
                status: None,
            };
            let api = api.clone();
            async move { api.create(&PostParams::default(), &pod).await.map(drop) }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let bound_at = wait_count(
        &times,
        n,
        start,
        Duration::from_secs(600),
        "bare Pods bound",
    )
    .await;
    task.abort();
    Ok(side(n, bound_at?))
}

/// Creates the ImageBuilds `names` and times them until each one's build
/// Pod is bound; returns that and the start instant.
async fn tripod_builds(
    client: &Client,
    registry: &str,
    names: &[String],
    concurrency: usize,
) -> Result<(Side, Instant), Error> {
    let api: Api<ImageBuild> = Api::namespaced(client.clone(), NAMESPACE);
    let (times, task) = pod_times(client, NAMESPACE, build_name, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = times.lock().map(|m| m.len()).unwrap_or(0);
    let start = Instant::now();
    futures::stream::iter(names.iter())
        .map(|name| {
            let ib = image_build(name, registry);
            let api = api.clone();
            async move { api.create(&PostParams::default(), &ib).await.map(drop) }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let waited = wait_count(
        &times,
        before + names.len(),
        start,
        Duration::from_secs(600 + names.len() as u64),
        "build Pods bound",
    )
    .await;
    task.abort();
    waited?;
    let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut bound_at: Vec<f64> = times
        .lock()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| wanted.contains(k.as_str()))
                .map(|(_, t)| t.saturating_duration_since(start).as_secs_f64())
                .collect()
        })
        .unwrap_or_default();
    bound_at.sort_by(f64::total_cmp);
    Ok((side(names.len(), bound_at), start))
}

/// Creates `names` at `rate` per second; returns, per build, the
/// milliseconds from its create request to its build Pod seen by a watch.
async fn latency(
    client: &Client,
    registry: &str,
    names: &[String],
    rate: u32,
) -> Result<Vec<f64>, Error> {
    let api: Api<ImageBuild> = Api::namespaced(client.clone(), NAMESPACE);
    let (times, task) = pod_times(client, NAMESPACE, build_name, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let mut creates = Vec::new();
    for name in names {
        tick.tick().await;
        let (api, ib, sent, name) = (
            api.clone(),
            image_build(name, registry),
            sent.clone(),
            name.clone(),
        );
        creates.push(tokio::spawn(async move {
            let t0 = Instant::now();
            if let Ok(mut m) = sent.lock() {
                m.insert(name, t0);
            }
            api.create(&PostParams::default(), &ib).await.map(drop)
        }));
    }
    for c in creates {
        c.await.map_err(|e| Error::Bench(e.to_string()))??;
    }
    let until = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    loop {
        let seen = times.lock().map(|m| m.clone()).unwrap_or_default();
        let sent = sent.lock().map(|m| m.clone()).unwrap_or_default();
        out.clear();
        for name in names {
            if let (Some(t0), Some(t1)) = (sent.get(name), seen.get(name)) {
                out.push(t1.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
            }
        }
        if out.len() == names.len() {
            break;
        }
        if Instant::now() > until {
            task.abort();
            return Err(Error::Bench(format!(
                "latency: {} of {} build Pods seen",
                out.len(),
                names.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    Ok(out)
}

/// Waits until every build of `names` has finished; returns (succeeded,
/// other).
async fn wait_all_finished(
    api: &Api<ImageBuild>,
    names: &[String],
    deadline: Duration,
) -> Result<(usize, usize), Error> {
    let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let until = Instant::now() + deadline;
    loop {
        let list = api.list(&ListParams::default()).await?;
        let (mut ok, mut other, mut running) = (0, 0, 0);
        for ib in list
            .items
            .iter()
            .filter(|b| wanted.contains(b.name_any().as_str()))
        {
            match ib.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Succeeded) => ok += 1,
                Some(Phase::Failed | Phase::Cancelled) => other += 1,
                _ => running += 1,
            }
        }
        if running == 0 && ok + other == names.len() {
            return Ok((ok, other));
        }
        if Instant::now() > until {
            return Err(Error::Bench(format!(
                "{ok} succeeded, {other} failed, {running} unfinished of {} after {deadline:?}",
                names.len()
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn wait_succeeded(
    api: &Api<ImageBuild>,
    names: &[String],
    deadline: Duration,
) -> Result<(), Error> {
    let (_, failed) = wait_all_finished(api, names, deadline).await?;
    if failed > 0 {
        return Err(Error::Bench(format!("{names:?}: {failed} failed")));
    }
    Ok(())
}

/// `VmRSS` or `VmHWM` of a process, in MiB.
pub fn rss_mib(pid: u32, field: &str) -> Result<f64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| Error::Io(format!("/proc/{pid}/status: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| Error::Io(format!("/proc/{pid}/status has no {field}")))
}

/// Makes the controller list everything again and returns its peak RSS
/// meanwhile: kube-apiserver is killed; while it is down, etcd's revision
/// is moved on by two writes (a key put, then deleted) and compacted there,
/// so no watch can resume from the resourceVersion it had, not even one
/// that had seen the last revision before the kill (a watch from `rv`
/// reads from `rv + 1`); then the API server is started again. Waits until
/// the audit log shows the controller listing ImageBuilds and Pods again
/// and those lists (paged) have stopped, then 30 s for the reconciles they
/// start. If they do not come within 300 s, says so and measures anyway:
/// the report marks a run without them as not measured.
async fn forced_relist(
    env: &mut ScaleEnv,
    pid: u32,
    log: &Path,
    from: audit::Mark,
) -> Result<f64, Error> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| Error::Io(format!("reset VmHWM of {pid}: {e}")))?;
    let apiserver = env.cp.pids().get(1).copied().unwrap_or(0);
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &apiserver.to_string()])
        .status();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let etcd = env.cp.etcd_url().trim_start_matches("http://").to_string();
    // The key "tripod-bench/relist", base64 as etcd's JSON gateway takes it.
    const KEY: &str = "dHJpcG9kLWJlbmNoL3JlbGlzdA==";
    etcd_call(
        &etcd,
        "/v3/kv/put",
        &format!(r#"{{"key":"{KEY}","value":"eA=="}}"#),
    )?;
    let deleted = etcd_call(
        &etcd,
        "/v3/kv/deleterange",
        &format!(r#"{{"key":"{KEY}"}}"#),
    )?;
    let revision = deleted["header"]["revision"]
        .as_str()
        .ok_or_else(|| Error::Io(format!("etcd: no revision in {deleted}")))?
        .to_string();
    etcd_call(
        &etcd,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    )?;
    env.cp.restart_exited();
    let until = Instant::now() + Duration::from_secs(300);
    // (LIST requests of ImageBuilds and Pods so far, polls since it last grew)
    let mut lists = (0, 0);
    loop {
        let seen = audit::count(log, from, audit::mark(log), CONTROLLER_USER)?;
        let (imagebuilds, pods) = (
            seen.reads_of("list imagebuilds"),
            seen.reads_of("list pods"),
        );
        if imagebuilds + pods > lists.0 {
            lists = (imagebuilds + pods, 0);
        } else {
            lists.1 += 1;
        }
        // Both listed, and no further page for 5 s.
        if imagebuilds > 0 && pods > 0 && lists.1 >= 5 {
            break;
        }
        if Instant::now() > until {
            tracing::warn!(
                reads = ?seen.reads,
                "the controller did not list its ImageBuilds and Pods again within 300 s: \
                 the re-list is not measured"
            );
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The reconciles the lists start.
    tokio::time::sleep(Duration::from_secs(30)).await;
    rss_mib(pid, "VmHWM")
}

/// One request to etcd's JSON gateway; its answer.
fn etcd_call(etcd: &str, path: &str, body: &str) -> Result<serde_json::Value, Error> {
    let (status, _, answer) =
        tripod_harness::http_send(etcd, "POST", path, "application/json", body.as_bytes())
            .map_err(|e| Error::Io(format!("etcd {path}: {e}")))?;
    if status != 200 {
        return Err(Error::Io(format!(
            "etcd {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    serde_json::from_slice(&answer).map_err(|e| Error::Io(format!("etcd {path}: {e}")))
}

/// CPU seconds (user + system) used so far by each process.
fn cpu_seconds(processes: &[(String, u32)]) -> BTreeMap<String, f64> {
    // Clock ticks per second: 100 on Linux for every architecture Tripod
    // runs its benchmarks on.
    const TICKS: f64 = 100.0;
    processes
        .iter()
        .filter_map(|(name, pid)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may hold spaces).
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((name.clone(), (utime + stime) / TICKS))
        })
        .collect()
}

fn cpu_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}
