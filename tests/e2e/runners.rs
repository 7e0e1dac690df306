//! The runner leg, for real: BuildRunners, `tripod agent --runner`
//! processes on this machine (a Linux runner with buildah that emulates
//! arm64 through qemu-user, a Linux runner with a real BuildKit daemon that
//! builds Linux images and COPY-only Windows images, and darwin test
//! runners that build COPY-only darwin images), leases with fencing, the
//! registry confirming each digest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio_stream::wrappers::ReceiverStream;
use tripod::api::{BuildRunner, ImageBuildStatus, Phase, RunnerPhase};
use tripod::proto::executor::v1 as pb;
use tripod_harness::runner::{Runner, RunnerOptions};

use crate::common::{TestEnv, eventually};

const BUILD: Duration = Duration::from_secs(300);

/// BuildRunners are cluster-scoped: each test names its own after its
/// namespace and deletes them at the end.
pub(crate) struct Runners<'a> {
    env: &'a TestEnv,
    made: Vec<String>,
    pub(crate) procs: Vec<Runner>,
}

impl<'a> Runners<'a> {
    pub(crate) fn new(env: &'a TestEnv) -> Self {
        Self {
            env,
            made: Vec::new(),
            procs: Vec::new(),
        }
    }

    fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.env.ns)
    }

    /// Applies a BuildRunner `short` with `spec` (YAML flow mapping body).
    pub(crate) fn register(&mut self, short: &str, spec: &str) -> String {
        let name = self.name(short);
        self.env.apply(&format!(
            "apiVersion: build.tripod.dev/v1alpha1\nkind: BuildRunner\nmetadata:\n  name: {name}\n  labels: {{tripod.dev/test-namespace: {}}}\nspec: {{{spec}}}\n",
            self.env.ns
        ));
        self.made.push(name.clone());
        name
    }

    pub(crate) fn options(&self, name: &str, executor_port: u16) -> RunnerOptions {
        let dir = self.env.shared.dir.join("runners").join(name);
        RunnerOptions {
            tripod: PathBuf::from(env!("CARGO_BIN_EXE_tripod")),
            name: name.to_string(),
            controller: format!("{}:{executor_port}", self.env.shared.info.node_ip),
            secret_namespace: self.env.ns.clone(),
            capacity: 2,
            labels: Vec::new(),
            test_darwin: None,
            buildkit: None,
            log: dir.with_extension("log"),
            work_dir: dir,
            rust_log: "info,tripod=debug".into(),
        }
    }

    /// Starts the agent of `name`; returns its index.
    pub(crate) async fn start(&mut self, opts: RunnerOptions) -> usize {
        let r = Runner::start(&self.env.client, opts)
            .await
            .expect("start runner");
        self.procs.push(r);
        self.procs.len() - 1
    }

    /// Registers and starts `bk`, a Linux runner (capacity 2) whose
    /// BuildKit daemon `buildkit` builds Linux images and COPY-only Windows
    /// ones (`windowsArchs: [amd64]`), and waits until it is Online.
    pub(crate) async fn start_buildkit(
        &mut self,
        executor_port: u16,
        buildkit: tripod_harness::runner::BuildkitRef,
    ) -> String {
        let bk = self.register(
            "bk",
            "os: linux, arch: amd64, capacity: 2, windowsArchs: [amd64]",
        );
        let mut opts = self.options(&bk, executor_port);
        opts.buildkit = Some(buildkit);
        self.start(opts).await;
        self.wait_phase(&bk, RunnerPhase::Online, Duration::from_secs(60))
            .await;
        bk
    }

    fn api(&self) -> Api<BuildRunner> {
        Api::all(self.env.client.clone())
    }

    async fn status(&self, name: &str) -> Option<tripod::api::BuildRunnerStatus> {
        self.api().get(name).await.ok()?.status
    }

    pub(crate) async fn wait_phase(&self, name: &str, phase: RunnerPhase, within: Duration) {
        eventually(&format!("{name} {phase:?}"), within, || async {
            (self.status(name).await?.phase? == phase).then_some(())
        })
        .await;
    }

    pub(crate) async fn cleanup(mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        for name in &self.made {
            let _ = self.api().delete(name, &DeleteParams::default()).await;
        }
    }
}

pub(crate) async fn status(env: &TestEnv, name: &str) -> Option<ImageBuildStatus> {
    env.builds().get(name).await.ok()?.status
}

/// An inline build of `platforms` from `dockerfile` (with `hello.txt` in
/// its context), pushed to the test registry as `team/<name>:1`.
fn build(name: &str, registry: &str, dockerfile: &str, platforms: &str, extra: &str) -> String {
    crate::common::inline_build(crate::common::InlineBuild {
        name,
        registry,
        dockerfile,
        platforms,
        hello: "hello from a runner",
        extra,
    })
}

pub(crate) fn http_get(addr: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let (code, _, body) =
        tripod_harness::http_request(addr, "GET", path, accept).expect("registry request");
    (code, body)
}

pub(crate) const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// The manifest and config the registry serves for `repo:tag`, and the
/// manifest's digest.
pub(crate) fn image(
    registry: &str,
    repo: &str,
    tag: &str,
) -> (serde_json::Value, serde_json::Value, String) {
    let (code, headers, body) = tripod_harness::http_request(
        registry,
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        MANIFEST,
    )
    .expect("registry request");
    assert_eq!(code, 200);
    let digest = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest")
                .then(|| v.trim().to_string())
        })
        .expect("Docker-Content-Digest");
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest");
    let config_digest = manifest["config"]["digest"].as_str().expect("config");
    let (code, body) = http_get(
        registry,
        &format!("/v2/{repo}/blobs/{config_digest}"),
        "*/*",
    );
    assert_eq!(code, 200);
    (
        manifest,
        serde_json::from_slice(&body).expect("config"),
        digest,
    )
}

/// The files of the last layer of `manifest`: path → content.
pub(crate) fn last_layer(
    registry: &str,
    repo: &str,
    manifest: &serde_json::Value,
) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let layer = manifest["layers"]
        .as_array()
        .and_then(|l| l.last())
        .expect("a layer");
    let digest = layer["digest"].as_str().expect("digest");
    let (code, blob) = http_get(registry, &format!("/v2/{repo}/blobs/{digest}"), "*/*");
    assert_eq!(code, 200);
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut tar)
        .expect("gzip layer");
    let mut files = BTreeMap::new();
    for e in tar::Archive::new(&tar[..]).entries().expect("tar") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").to_string_lossy().to_string();
        let mut data = Vec::new();
        let _ = e.read_to_end(&mut data);
        files.insert(path, data);
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn darwin_copy_only_builds_on_a_runner_and_run_is_refused_off_macos() {
    let mut env = TestEnv::new("runner-darwin").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let mac = runners.register(
        "mac",
        "os: darwin, arch: arm64, capacity: 1, labels: {xcode: \"16\"}",
    );
    let mut opts = runners.options(&mac, port);
    opts.test_darwin = Some("arm64".into());
    opts.labels = vec!["xcode=16".into()];
    runners.start(opts).await;
    runners
        .wait_phase(&mac, RunnerPhase::Online, Duration::from_secs(60))
        .await;

    env.apply(&build(
        "mac-app",
        &registry,
        "FROM scratch\nCOPY hello.txt /app/hello.txt\nENV GREETING=hi\nWORKDIR /app\nCMD [\"/app/hello\"]\n",
        "darwin/arm64",
        "  executor:\n    runnerSelector: {xcode: \"16\"}\n",
    ));
    let (ok, out) = env.wait_for("condition=Ready", "ib/mac-app", "180s");
    let s = status(&env, "mac-app").await.expect("status");
    assert!(ok, "{out}\n{s:#?}\n{}", runners.procs[0].log());
    let ps = &s.platforms[0];
    let exec = ps.executor.as_ref().expect("executor");
    assert_eq!(
        (exec.kind.as_str(), exec.name.as_str()),
        ("Runner", mac.as_str())
    );
    assert!(!exec.emulated);
    let (manifest, config, digest) = image(&registry, "team/mac-app", "1");
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    assert_eq!(config["os"], "darwin");
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["config"]["WorkingDir"], "/app");
    assert_eq!(
        config["config"]["Labels"]["build.tripod.dev/build-id"].as_str(),
        s.build_id.as_deref()
    );
    let files = last_layer(&registry, "team/mac-app", &manifest);
    assert_eq!(
        files.get("app/hello.txt").map(Vec::as_slice),
        Some(&b"hello from a runner"[..])
    );

    // RUN needs macOS: refused before anything runs, saying so.
    env.apply(&build(
        "mac-run",
        &registry,
        "FROM scratch\nRUN xcodebuild\n",
        "darwin/arm64",
        "",
    ));
    let (ok, out) = env.wait_for("jsonpath={.status.phase}=Failed", "ib/mac-run", "180s");
    let s = status(&env, "mac-run").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("RUN xcodebuild") && msg.contains("RUN needs a macOS host"),
        "{msg}"
    );

    // The runner's status: Online, its agent version, and (once the
    // upkeep has seen the last outcome) no active builds.
    let rs = eventually(
        "the runner holds nothing",
        Duration::from_secs(30),
        || async {
            let rs = runners.status(&mac).await?;
            rs.active_builds.is_empty().then_some(rs)
        },
    )
    .await;
    assert_eq!(rs.phase, Some(RunnerPhase::Online));
    assert_eq!(rs.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert!(rs.last_heartbeat_time.is_some());
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_arm64_builds_on_an_emulating_runner_with_run_executed() {
    let mut env = TestEnv::new("runner-arm64").await;
    let registry = env.shared.registry.clone().expect("registry");
    let base = env
        .shared
        .info
        .busybox_arm64_image
        .clone()
        .expect("the arm64 busybox base image");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let linux = runners.register(
        "linux",
        "os: linux, arch: amd64, capacity: 2, emulatedArchs: [arm64]",
    );
    let opts = runners.options(&linux, port);
    runners.start(opts).await;
    runners
        .wait_phase(&linux, RunnerPhase::Online, Duration::from_secs(60))
        .await;

    env.apply(&build(
        "arm-app",
        &registry,
        &format!("FROM {base}\nRUN uname -m > /arch && echo ran > /ran\n"),
        "linux/arm64",
        "  executor:\n    runnerPlatforms: [linux/arm64]\n",
    ));
    let (ok, out) = env.wait_for("condition=Ready", "ib/arm-app", "300s");
    let s = status(&env, "arm-app").await.expect("status");
    assert!(ok, "{out}\n{s:#?}\n{}", runners.procs[0].log());
    let exec = s.platforms[0].executor.clone().expect("executor");
    assert_eq!(
        (exec.kind.as_str(), exec.name.as_str(), exec.emulated),
        ("Runner", linux.as_str(), true)
    );
    let (manifest, config, digest) = image(&registry, "team/arm-app", "1");
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["os"], "linux");
    let files = last_layer(&registry, "team/arm-app", &manifest);
    assert_eq!(
        files
            .get("arch")
            .map(|a| String::from_utf8_lossy(a).trim().to_string())
            .as_deref(),
        Some("aarch64"),
        "{:?}",
        files.keys()
    );
    runners.cleanup().await;
    env.cleanup().await;
}

/// The attempts (fencing tokens) of `name`'s only platform and its runner.
async fn leased(env: &TestEnv, name: &str) -> Option<(i32, String, Phase)> {
    let s = status(env, name).await?;
    let p = s.platforms.first()?;
    Some((p.attempts, p.executor.as_ref()?.name.clone(), p.phase))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runner_goes_offline_its_lease_expires_and_another_runner_builds() {
    let mut env = TestEnv::new("runner-kill").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let a = runners.register(
        "a",
        "os: linux, arch: amd64, capacity: 1, labels: {pool: kill}",
    );
    let b = runners.register(
        "b",
        "os: linux, arch: amd64, capacity: 1, labels: {pool: kill}",
    );
    let ia = runners.start(runners.options(&a, port)).await;
    runners
        .wait_phase(&a, RunnerPhase::Online, Duration::from_secs(60))
        .await;

    let base = env.shared.info.busybox_image.clone();
    env.apply(&build(
        "slow",
        &registry,
        &format!("FROM {base}\nRUN echo start && sleep 25 && echo done\n"),
        "linux/amd64",
        "  retries: 1\n  executor:\n    runnerPlatforms: [linux/amd64]\n    runnerSelector: {pool: kill}\n",
    ));
    // Running on a: its step is recorded.
    eventually("slow building on runner a", BUILD, || async {
        let s = status(&env, "slow").await?;
        let p = s.platforms.first()?;
        (p.executor.as_ref()?.name == a && p.step.as_deref()?.contains("RUN")).then_some(())
    })
    .await;
    runners.start(runners.options(&b, port)).await;
    runners
        .wait_phase(&b, RunnerPhase::Online, Duration::from_secs(60))
        .await;

    let killed = Instant::now();
    runners.procs[ia].kill();
    runners
        .wait_phase(&a, RunnerPhase::Offline, Duration::from_secs(40))
        .await;
    let offline_after = killed.elapsed();
    eventually(
        "slow leased to runner b on attempt 2",
        Duration::from_secs(60),
        || async {
            let (attempts, runner, _) = leased(&env, "slow").await?;
            (attempts == 2 && runner == b).then_some(())
        },
    )
    .await;
    let reassigned_after = killed.elapsed();
    println!(
        "FIGURES runner lost: Offline after {:.1}s, reassigned after {:.1}s",
        offline_after.as_secs_f64(),
        reassigned_after.as_secs_f64()
    );
    // The figures are printed (docs/reliability.md), not asserted: the
    // deadline of `wait_phase` above is the only timing here.
    let (ok, out) = env.wait_for("condition=Ready", "ib/slow", "240s");
    let s = status(&env, "slow").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(s.platforms[0].attempts, 2);
    let events = env.kubectl(&["get", "events", "-o", "json"], None).1;
    assert!(
        events.contains(&format!("runner {a} went Offline")),
        "{events}"
    );

    // a comes back with what its journal says it was building: attempt 1,
    // no longer current. Its report is refused; nothing changes.
    let mut opts = runners.options(&a, port);
    opts.capacity = 1;
    let ia2 = runners.start(opts).await;
    eventually(
        "a's stale report refused",
        Duration::from_secs(60),
        || async {
            runners.procs[ia2]
                .log()
                .contains("outcome not accepted")
                .then_some(())
        },
    )
    .await;
    let log = runners.procs[ia2].log();
    assert!(log.contains("refused"), "{log}");
    assert!(
        env.controller_log(0).contains("refused a runner's report"),
        "the controller logs the refusal"
    );
    let after = status(&env, "slow").await.expect("status");
    assert_eq!(
        after.platforms, s.platforms,
        "a stale report changes nothing"
    );
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_builds_on_two_runners_of_capacity_two_never_exceed_it() {
    let mut env = TestEnv::new("runner-capacity").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let names = [
        runners.register(
            "one",
            "os: darwin, arch: arm64, capacity: 2, labels: {pool: cap}",
        ),
        runners.register(
            "two",
            "os: darwin, arch: arm64, capacity: 2, labels: {pool: cap}",
        ),
    ];
    for n in &names {
        let mut opts = runners.options(n, port);
        opts.test_darwin = Some("arm64".into());
        opts.capacity = 4; // the BuildRunner's capacity (2) caps it
        runners.start(opts).await;
    }
    for n in &names {
        runners
            .wait_phase(n, RunnerPhase::Online, Duration::from_secs(60))
            .await;
    }
    for i in 0..10 {
        env.apply(&build(
            &format!("cap-{i}"),
            &registry,
            &format!("FROM scratch\nCOPY hello.txt /{i}.txt\n"),
            "darwin/arm64",
            "  executor:\n    runnerSelector: {pool: cap}\n",
        ));
    }
    // Sample the runners' status and the Lease objects until all are done.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let mut most = BTreeMap::<String, usize>::new();
    let mut served = BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    let deadline = Instant::now() + BUILD;
    loop {
        for n in &names {
            let active = runners
                .status(n)
                .await
                .map(|s| s.active_builds.len())
                .unwrap_or(0);
            let e = most.entry(n.clone()).or_default();
            *e = (*e).max(active);
        }
        let list = leases
            .list(&ListParams::default())
            .await
            .expect("leases")
            .items;
        for n in &names {
            let active = list
                .iter()
                .filter(|l| {
                    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(n.as_str())
                        && !l.annotations().contains_key("build.tripod.dev/result")
                        && !l.annotations().contains_key("build.tripod.dev/failure")
                })
                .count();
            let e = most.entry(format!("{n} leases")).or_default();
            *e = (*e).max(active);
            for l in &list {
                if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(n.as_str()) {
                    served.entry(n.clone()).or_default().insert(l.name_any());
                }
            }
        }
        let mut done = 0;
        for i in 0..10 {
            if let Some(s) = status(&env, &format!("cap-{i}")).await {
                assert_ne!(s.phase, Some(Phase::Failed), "cap-{i}: {s:#?}");
                done += usize::from(s.phase == Some(Phase::Succeeded));
            }
        }
        if done == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "not all succeeded: {most:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for (k, v) in &most {
        assert!(*v <= 2, "{k}: {v} at once ({most:?})");
    }
    for n in &names {
        assert!(
            served.get(n).is_some_and(|s| !s.is_empty()),
            "{n} got no build: {served:?}"
        );
    }
    println!(
        "FIGURES capacity: most at once {most:?}; leases per runner {:?}",
        served.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
    );
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_without_a_match_waits_naming_it_and_a_runner_online_later_takes_it() {
    let mut env = TestEnv::new("runner-selector").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let other = runners.register("other", "os: darwin, arch: arm64, labels: {xcode: \"15\"}");
    let mut opts = runners.options(&other, port);
    opts.test_darwin = Some("arm64".into());
    runners.start(opts).await;
    runners
        .wait_phase(&other, RunnerPhase::Online, Duration::from_secs(60))
        .await;
    env.apply(&build(
        "picky",
        &registry,
        "FROM scratch\nCOPY hello.txt /\n",
        "darwin/arm64",
        "  executor:\n    runnerSelector: {xcode: \"16\"}\n",
    ));
    let waiting = eventually(
        "picky waits naming the selector",
        Duration::from_secs(60),
        || async {
            let s = status(&env, "picky").await?;
            let p = s.platforms.first()?;
            (p.phase == Phase::Scheduling && p.message.as_deref()?.contains("xcode=16"))
                .then(|| p.message.clone())
        },
    )
    .await
    .unwrap_or_default();
    assert!(
        waiting.contains("os=darwin, arch=arm64, xcode=16: none is registered"),
        "{waiting}"
    );
    let s = status(&env, "picky").await.expect("status");
    assert_eq!(s.phase, Some(Phase::Scheduling));

    let xcode16 = runners.register("x16", "os: darwin, arch: arm64, labels: {xcode: \"16\"}");
    let mut opts = runners.options(&xcode16, port);
    opts.test_darwin = Some("arm64".into());
    runners.start(opts).await;
    let (ok, out) = env.wait_for("condition=Ready", "ib/picky", "120s");
    let s = status(&env, "picky").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(
        s.platforms[0].executor.as_ref().map(|e| e.name.as_str()),
        Some(xcode16.as_str())
    );
    runners.cleanup().await;
    env.cleanup().await;
}

use crate::abuse::Client;

async fn executor(env: &TestEnv, port: u16, ca: &[u8]) -> Client {
    crate::abuse::executor_client(&env.shared.info.node_ip, port, ca.to_vec()).await
}

/// Says RunnerHello as `runner` with `token`: Ok once welcomed.
async fn runner_hello(client: &mut Client, runner: &str, token: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::RunnerHello(pb::RunnerHello {
            token: token.to_string(),
            runner: runner.to_string(),
            agent_version: "test".into(),
            capacity: 1,
            host_os: "darwin".into(),
            host_arch: "arm64".into(),
            platforms: vec!["darwin/arm64".into()],
            ..Default::default()
        })),
    })
    .await
    .expect("send");
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Welcome(_)),
        }) => Ok(()),
        other => Err(tonic::Status::unknown(format!("{other:?}"))),
    }
}

async fn secret_data(env: &TestEnv, name: &str, key: &str) -> Vec<u8> {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        &format!("Secret {name}"),
        Duration::from_secs(60),
        || async { Some(secrets.get(name).await.ok()?.data?.get(key)?.0.clone()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_token_speaks_only_for_its_runner_and_rotation_revokes_it() {
    let mut env = TestEnv::new("runner-tokens").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let a = runners.register("a", "os: darwin, arch: arm64");
    let b = runners.register("b", "os: darwin, arch: arm64");
    let token_a =
        String::from_utf8(secret_data(&env, &format!("tripod-runner-{a}"), "token").await)
            .expect("utf8");
    let token_b =
        String::from_utf8(secret_data(&env, &format!("tripod-runner-{b}"), "token").await)
            .expect("utf8");
    let ca = secret_data(&env, &format!("tripod-runner-{a}"), "ca.crt").await;
    let mut client = executor(&env, port, &ca).await;
    runner_hello(&mut client, &a, &token_a)
        .await
        .expect("a's token opens a's session");
    let err = runner_hello(&mut client, &b, &token_a)
        .await
        .expect_err("a's token for b");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    runner_hello(&mut client, &b, &token_b)
        .await
        .expect("b's own token");

    // A build token is not a runner token: a Pod build on the simulated
    // arm64 node (nothing runs it) has one.
    env.apply(&build(
        "podbuild",
        &registry,
        "FROM scratch\nCOPY hello.txt /\n",
        "linux/arm64",
        "",
    ));
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let build_token = eventually("the build Pod's token", Duration::from_secs(60), || async {
        let list = secrets
            .list(&ListParams::default().labels("build.tripod.dev/name=podbuild"))
            .await
            .ok()?
            .items;
        Some(String::from_utf8_lossy(&list.first()?.data.clone()?.get("token")?.0).to_string())
    })
    .await;
    let err = runner_hello(&mut client, &a, &build_token)
        .await
        .expect_err("a build token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");

    // Rotation: a new token; the old one no longer opens a session.
    let api: Api<BuildRunner> = Api::all(env.client.clone());
    api.patch(
        &a,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"build.tripod.dev/rotate-token": "2"}}})),
    )
    .await
    .expect("annotate");
    let rotated = eventually("a's token re-issued", Duration::from_secs(60), || async {
        let t = String::from_utf8(secret_data(&env, &format!("tripod-runner-{a}"), "token").await)
            .ok()?;
        (t != token_a).then_some(t)
    })
    .await;
    let err = runner_hello(&mut client, &a, &token_a)
        .await
        .expect_err("the old token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    runner_hello(&mut client, &a, &rotated)
        .await
        .expect("the rotated token");
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_builds_finish_and_nothing_new_is_taken() {
    let mut env = TestEnv::new("runner-drain").await;
    let registry = env.shared.registry.clone().expect("registry");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let r = runners.register(
        "r",
        "os: linux, arch: amd64, capacity: 2, labels: {pool: drain}",
    );
    let i = runners.start(runners.options(&r, port)).await;
    runners
        .wait_phase(&r, RunnerPhase::Online, Duration::from_secs(60))
        .await;
    let base = env.shared.info.busybox_image.clone();
    let on_runner =
        "  executor:\n    runnerPlatforms: [linux/amd64]\n    runnerSelector: {pool: drain}\n";
    env.apply(&build(
        "long",
        &registry,
        &format!("FROM {base}\nRUN sleep 12 && echo finished > /f\n"),
        "linux/amd64",
        on_runner,
    ));
    eventually("long running on the runner", BUILD, || async {
        let p = status(&env, "long").await?.platforms.first()?.clone();
        p.step.as_deref()?.contains("RUN").then_some(())
    })
    .await;
    runners.procs[i].terminate();
    runners
        .wait_phase(&r, RunnerPhase::Draining, Duration::from_secs(30))
        .await;
    env.apply(&build(
        "later",
        &registry,
        &format!("FROM {base}\nRUN true\n"),
        "linux/amd64",
        on_runner,
    ));
    let (ok, out) = env.wait_for("condition=Ready", "ib/long", "120s");
    let s = status(&env, "long").await.expect("status");
    assert!(ok, "{out}\n{s:#?}\n{}", runners.procs[i].log());
    assert_eq!(s.platforms[0].attempts, 1);
    let exit = tokio::task::block_in_place(|| runners.procs[i].wait_exit(Duration::from_secs(60)));
    assert!(
        exit.is_some_and(|e| e.success()),
        "{exit:?}\n{}",
        runners.procs[i].log()
    );
    runners
        .wait_phase(&r, RunnerPhase::Offline, Duration::from_secs(30))
        .await;
    let later = status(&env, "later").await.expect("status");
    let p = &later.platforms[0];
    assert_eq!(p.phase, Phase::Scheduling, "{later:#?}");
    assert!(p.executor.is_none(), "nothing new was leased: {later:#?}");
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildkit_runner_builds_linux_inline_and_git_and_windows_copy_only() {
    let mut env = TestEnv::new("runner-buildkit").await;
    let registry = env.shared.registry.clone().expect("registry");
    let info = env.shared.info.clone();
    let buildkit = info.buildkit.clone().expect("the environment's buildkitd");
    let (win_version, win_base) = crate::common::windows_base(&info, "10.0.20348");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let bk = runners.start_buildkit(port, buildkit).await;

    // Linux with BuildKit, chosen per build: RUN runs (runc, OCI worker).
    env.apply(&build(
        "bk-linux",
        &registry,
        &format!(
            "FROM {} AS build\nARG FLAVOUR=plain\nRUN echo \"$FLAVOUR\" > /flavour\nFROM {}\nCOPY --from=build /flavour /flavour\nCOPY hello.txt /hello.txt\n",
            info.busybox_image, info.busybox_image
        ),
        "linux/amd64",
        "  buildArgs:\n  - {name: FLAVOUR, value: buildkit}\n  executor:\n    runnerPlatforms: [linux/amd64]\n    backend: buildkit\n",
    ));
    // Windows: COPY-only, from the synthetic Windows Server 2022 base.
    env.apply(&build(
        "bk-win",
        &registry,
        &format!("FROM {win_base}\nCOPY hello.txt /app/hello.txt\nENV APP=hello\n"),
        "windows/amd64",
        "  executor:\n    runnerPlatforms: [windows/amd64]\n",
    ));
    // A git source, fetched by the runner's agent, built by BuildKit.
    let root = env.shared.dir.join(format!("git-{}", env.ns));
    let work = root.join("work");
    std::fs::create_dir_all(work.join("app")).expect("repo dir");
    crate::common::git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(
        work.join("app/Dockerfile"),
        format!(
            "FROM {} AS b\nRUN echo from-git > /g\nFROM scratch\nCOPY --from=b /g /g\nCOPY version.txt /version.txt\n",
            info.busybox_image
        ),
    )
    .expect("write");
    std::fs::write(work.join("app/version.txt"), "v1\n").expect("write");
    crate::common::git(&work, &["add", "."]);
    crate::common::git(&work, &["commit", "-q", "-m", "v1"]);
    crate::common::git(&root, &["clone", "-q", "--bare", "work", "repo.git"]);
    let daemon = crate::common::GitDaemon::serve(&env, &root).await;
    env.apply(&format!(
        "apiVersion: build.tripod.dev/v1alpha1\nkind: ImageBuild\nmetadata:\n  name: bk-git\nspec:\n  source:\n    git: {{url: \"git://{}:{}/repo.git\", revision: main, contextDir: app}}\n  platforms: [linux/amd64]\n  output: {{image: {registry}/team/bk-git:1, insecure: true}}\n  executor: {{runnerPlatforms: [linux/amd64], backend: buildkit}}\n",
        info.node_ip, daemon.port
    ));
    for name in ["bk-linux", "bk-win", "bk-git"] {
        let (ok, out) = env.wait_for("condition=Ready", &format!("ib/{name}"), "300s");
        let s = status(&env, name).await.expect("status");
        assert!(ok, "{name}: {out}\n{s:#?}\n{}", runners.procs[0].log());
        let exec = s.platforms[0].executor.clone().expect("executor");
        assert_eq!(
            (exec.kind.as_str(), exec.name.as_str()),
            ("Runner", bk.as_str())
        );
    }
    let (manifest, config, digest) = image(&registry, "team/bk-linux", "1");
    let s = status(&env, "bk-linux").await.expect("status");
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    assert_eq!(config["os"], "linux");
    let files = last_layer(&registry, "team/bk-linux", &manifest);
    assert_eq!(
        files.get("hello.txt").map(Vec::as_slice),
        Some(&b"hello from a runner"[..])
    );
    let (manifest, _, _) = image(&registry, "team/bk-linux", "1");
    let layers = manifest["layers"].as_array().expect("layers").clone();
    let flavour_layer = serde_json::json!({"layers": [layers[layers.len() - 2].clone()]});
    let files = last_layer(&registry, "team/bk-linux", &flavour_layer);
    assert_eq!(
        files.get("flavour").map(Vec::as_slice),
        Some(&b"buildkit\n"[..]),
        "the RUN step's output, with the build arg"
    );

    let (manifest, config, digest) = image(&registry, "team/bk-git", "1");
    // The image says which commit it was built from.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&work)
        .output()
        .expect("git rev-parse");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.revision"],
        String::from_utf8_lossy(&head.stdout).trim()
    );
    let s = status(&env, "bk-git").await.expect("status");
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    let mut files = BTreeMap::new();
    for layer in manifest["layers"].as_array().expect("layers") {
        files.extend(last_layer(
            &registry,
            "team/bk-git",
            &serde_json::json!({"layers": [layer.clone()]}),
        ));
    }
    assert_eq!(files.get("g").map(Vec::as_slice), Some(&b"from-git\n"[..]));
    assert_eq!(
        files.get("version.txt").map(Vec::as_slice),
        Some(&b"v1\n"[..])
    );
    drop(daemon);

    let (manifest, config, digest) = image(&registry, "team/bk-win", "1");
    let s = status(&env, "bk-win").await.expect("status");
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    assert_eq!(config["os"], "windows", "{config}");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["os.version"].as_str(),
        Some(win_version.as_str()),
        "{config}"
    );
    assert!(
        config["config"]["Env"].to_string().contains("APP=hello"),
        "{config}"
    );
    // The new layer is in the Windows layout: the file under Files/.
    let files = last_layer(&registry, "team/bk-win", &manifest);
    assert_eq!(
        files.get("Files/app/hello.txt").map(Vec::as_slice),
        Some(&b"hello from a runner"[..]),
        "{:?}",
        files.keys().collect::<Vec<_>>()
    );

    // RUN in a Windows stage needs a Windows host: refused, naming the step.
    env.apply(&build(
        "bk-win-run",
        &registry,
        &format!("FROM {win_base}\nRUN powershell -Command Get-Date\n"),
        "windows/amd64",
        "  executor:\n    runnerPlatforms: [windows/amd64]\n",
    ));
    let (ok, out) = env.wait_for("jsonpath={.status.phase}=Failed", "ib/bk-win-run", "180s");
    let s = status(&env, "bk-win-run").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("line 2: RUN powershell") && msg.contains("need a windows host"),
        "{msg}"
    );
    runners.cleanup().await;
    env.cleanup().await;
}
