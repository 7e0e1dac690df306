//! The whole local environment: control plane, registry, the images build
//! Pods run, a real Linux node, kwok's simulated nodes and (for `tripod dev`)
//! a controller. `tripod-dev serve` runs one; `tripod dev up` and the tests
//! talk to it through the files it writes ([`EnvInfo`] in `DIR/env.json`,
//! a shell `DIR/env`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::controlplane::{ControlPlane, Options, ensure_binaries};
use crate::kwok::{Kwok, KwokOptions, SimNode};
use crate::node::{BUILDD_SECCOMP_PROFILE, Host, NODE_IP, NODE_NAME, NodeOptions, RealNode};
use crate::process::{spawn_supervised, supervised_command};
use crate::registry::{Registry, start_registry_on};
use crate::scripts::script;

/// Namespace the local controller runs in.
pub const SYSTEM_NAMESPACE: &str = "tripod-system";
/// The chart's seccomp profile for buildd containers, relative to the source tree.
pub const SECCOMP_PROFILE_FILE: &str = "charts/tripod/files/buildd-seccomp.json";

/// What [`Env::start`] needs.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// State directory: `cluster/`, `node/`, `registry/`, `logs/`.
    pub dir: PathBuf,
    /// The Tripod source tree (`testenv/` scripts, the chart's seccomp profile).
    pub source_dir: PathBuf,
    /// The `tripod` binary (`tripod crds`, `tripod controller`).
    pub tripod: PathBuf,
    /// Start a `tripod controller` for all namespaces (`tripod dev`); the
    /// tests start their own.
    pub controller: bool,
    /// The registry's port on the node address (0: a free one).
    pub registry_port: u16,
    /// Install Tripod's CRDs (`tripod crds`). Off when the chart installs
    /// them (`helm install` refuses CRDs it does not own).
    pub install_crds: bool,
    /// The tests' variant: the real node is tainted
    /// (`tripod.dev/real-node=true:NoSchedule`, only builds that tolerate it
    /// run there) and a simulated linux/amd64 node takes the other Pods.
    pub for_tests: bool,
}

/// What a running environment offers, as written to `DIR/env.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvInfo {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The kubectl matching the control plane.
    pub kubectl: PathBuf,
    /// The API server's URL.
    pub api_url: String,
    /// The registry, `NODE_IP:port` (plain HTTP), reachable from Pods.
    pub registry: String,
    /// The node address: servers Pods must reach listen there.
    pub node_ip: String,
    /// The real node's name.
    pub node_name: String,
    /// The buildd image (the Dockerfile's `buildd` target) in the registry.
    pub buildd_image: String,
    /// The controller image (the Dockerfile's `controller` target, the
    /// chart's image) in the registry.
    #[serde(default)]
    pub controller_image: Option<String>,
    /// A busybox base image in the registry (`base/busybox:1`).
    pub busybox_image: String,
    /// The arm64 busybox base image (`base/busybox:1-arm64`), for builds
    /// through the emulating runner.
    #[serde(default)]
    pub busybox_arm64_image: Option<String>,
    /// The synthetic Windows base images (`base/windows-synthetic:ltsc2022`,
    /// `:ltsc2019`), by their config's `os.version`.
    #[serde(default)]
    pub windows_bases: std::collections::BTreeMap<String, String>,
    /// The environment's BuildKit daemon (OCI worker on the node's runc),
    /// which its runners build with.
    #[serde(default)]
    pub buildkit: Option<crate::runner::BuildkitRef>,
    /// The Debian base made by debootstrap (`base/debian:bookworm`), when
    /// the buildd image build left it in the image storage.
    pub debian_image: Option<String>,
    /// The kubelet's root directory.
    pub kubelet_root: PathBuf,
    /// Where the node's seccomp profile for buildd is, relative to the
    /// kubelet's seccomp directory (`--buildd-seccomp-profile`).
    pub buildd_seccomp_profile: String,
    /// Logs of every component.
    pub logs: PathBuf,
    /// Seconds from starting containerd to the node being Ready.
    pub node_ready_seconds: f64,
    /// The controller's metrics address (`tripod dev` only).
    pub metrics: Option<String>,
}

impl EnvInfo {
    /// Reads `DIR/env.json`.
    pub fn read(dir: &Path) -> Result<EnvInfo, Error> {
        let path = dir.join("env.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| Error::Script(format!("{}: {e}", path.display())))
    }

    /// The arguments a `tripod controller` needs to run build Pods on this
    /// environment's node: images, the seccomp profile, and the executor
    /// service on the node address (port `executor_port`).
    pub fn controller_args(&self, executor_port: u16) -> Vec<String> {
        vec![
            format!("--buildd-image={}", self.buildd_image),
            format!("--agent-image={}", self.buildd_image),
            format!("--buildd-seccomp-profile={}", self.buildd_seccomp_profile),
            format!("--executor-address={}:{executor_port}", self.node_ip),
            format!("--executor-listen={}:{executor_port}", self.node_ip),
            format!("--executor-tls-san={}", self.node_ip),
        ]
    }
}

/// One `tripod controller` on an environment ([`Env::start_controller`]).
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Watch ImageBuilds in this namespace only (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Its leader-election Lease in [`SYSTEM_NAMESPACE`]: controllers that
    /// watch different namespaces need different ones.
    pub lease_name: String,
    /// Its log file under the environment's `logs/`.
    pub log_name: String,
    /// Arguments after the environment's own (images, seccomp profile,
    /// executor service), e.g. `--buildd-security-context=...`.
    pub extra_args: Vec<String>,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            namespace: None,
            lease_name: "tripod-controller".into(),
            log_name: "controller.log".into(),
            extra_args: Vec::new(),
        }
    }
}

/// A controller [`Env::start_controller`] started; it stops with the
/// environment.
#[derive(Debug, Clone)]
pub struct StartedController {
    /// Its log (text lines unless `TRIPOD_LOG_FORMAT` says otherwise).
    pub log: PathBuf,
    /// Its `/metrics` URL.
    pub metrics: String,
    /// The port of its executor service on the node address.
    pub executor_port: u16,
}

/// A running environment. Stop it with [`Env::stop`].
/// Dropping it (an error, a panic) stops everything too, less gracefully:
/// the fields drop in this order, the host's teardown last.
#[derive(Debug)]
pub struct Env {
    runners: Vec<crate::runner::Runner>,
    buildkitd: Option<crate::buildkit::Buildkitd>,
    controllers: Vec<Child>,
    kwok: Option<Kwok>,
    addons: Option<crate::addons::Addons>,
    node: Option<RealNode>,
    registry: Option<Registry>,
    cp: ControlPlane,
    host: Host,
    /// What it offers.
    pub info: EnvInfo,
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in self
            .controllers
            .iter_mut()
            .chain(self.registry.as_mut().map(|r| &mut r.child))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The runners `tripod dev` starts next to the node.
pub const DEV_RUNNERS: [(&str, &str); 2] = [
    (
        "dev-linux",
        "{os: linux, arch: amd64, capacity: 2, emulatedArchs: [arm64], windowsArchs: [amd64]}",
    ),
    ("dev-darwin", "{os: darwin, arch: arm64, capacity: 2}"),
];

/// Registers the BuildRunners of [`DEV_RUNNERS`] and starts their agents:
/// a Linux runner (buildah, arm64 through qemu-user) and a darwin test
/// runner (COPY-only darwin images on this Linux host). Waits until both
/// are Online.
async fn start_dev_runners(
    client: &Client,
    opts: &EnvOptions,
    dir: &Path,
    logs: &Path,
    executor_port: u16,
    buildkit: Option<&crate::runner::BuildkitRef>,
) -> Result<Vec<crate::runner::Runner>, Error> {
    use crate::runner::{Runner, RunnerOptions};
    let gvk = kube::api::GroupVersionKind::gvk("build.tripod.dev", "v1alpha1", "BuildRunner");
    let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, "buildrunners");
    let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut started = Vec::new();
    for (name, spec) in DEV_RUNNERS {
        let manifest = format!(
            "apiVersion: build.tripod.dev/v1alpha1\nkind: BuildRunner\nmetadata:\n  name: {name}\nspec: {spec}\n"
        );
        let obj: kube::api::DynamicObject =
            serde_yaml::from_str(&manifest).map_err(|e| Error::Script(e.to_string()))?;
        api.patch(
            name,
            &PatchParams::apply("tripod-dev").force(),
            &Patch::Apply(&obj),
        )
        .await?;
        let runner = Runner::start(
            client,
            RunnerOptions {
                tripod: opts.tripod.clone(),
                name: name.to_string(),
                controller: format!("{NODE_IP}:{executor_port}"),
                secret_namespace: SYSTEM_NAMESPACE.to_string(),
                capacity: 2,
                labels: Vec::new(),
                test_darwin: (name == "dev-darwin").then(|| "arm64".to_string()),
                buildkit: if name == "dev-linux" {
                    buildkit.cloned()
                } else {
                    None
                },
                work_dir: dir.join("runners").join(name),
                log: logs.join(format!("runner-{name}.log")),
                rust_log: "info".into(),
            },
        )
        .await?;
        started.push(runner);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, _) in DEV_RUNNERS {
        loop {
            let phase = api
                .get(name)
                .await
                .ok()
                .and_then(|o| o.data["status"]["phase"].as_str().map(str::to_string));
            if phase.as_deref() == Some("Online") {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Script(format!(
                    "BuildRunner {name} is not Online after 60 s ({phase:?}); see {}",
                    logs.join(format!("runner-{name}.log")).display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(started)
}

/// Builds (once, then cached under `~/.cache/tripod`) everything an
/// environment runs: the Kubernetes binaries, containerd, runc, kwok and
/// CoreDNS, and the images. Returns (Kubernetes bin dir, node bin dir).
pub fn build_all(source_dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let k8s = ensure_binaries(source_dir)?;
    let node = PathBuf::from(script(source_dir, "node.sh", &[])?.trim());
    script(source_dir, "coredns.sh", &[])?;
    script(source_dir, "images.sh", &["build"])?;
    Ok((k8s, node))
}

fn step(started: Instant, what: &str) {
    tracing::info!("{what} (+{:.1}s)", started.elapsed().as_secs_f64());
}

impl Env {
    /// Starts everything, in order: control plane, host network, registry,
    /// images, real node, simulated nodes, CRDs, controller.
    pub async fn start(opts: &EnvOptions) -> Result<Env, Error> {
        let started = Instant::now();
        let dir = std::path::absolute(&opts.dir)
            .map_err(|e| Error::io(format!("resolve {}", opts.dir.display()), e))?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|e| Error::io(format!("create {}", logs.display()), e))?;
        let (k8s_bin, node_bin) = build_all(&opts.source_dir)?;
        step(started, "binaries and images ready");

        let host = Host::prepare(&dir.join("node"))?;
        step(started, "host network ready");
        // The bridge exists: the API server listens on the node address too.
        let mut cp = ControlPlane::start(Options {
            dir: dir.join("cluster"),
            bin_dir: k8s_bin.clone(),
            pod_address: Some(NODE_IP),
            audit: false,
            scheduler_qps: None,
        })
        .await?;
        step(started, "control plane ready");
        let client = cp.client().await?;
        let registry = start_registry_on(
            &NODE_IP.to_string(),
            &dir,
            "registry",
            opts.registry_port,
            None,
        )?;
        let pushed = script(&opts.source_dir, "images.sh", &["push", &registry.address])?;
        let image = |name: &str| {
            pushed
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
                .ok_or_else(|| Error::Script(format!("images.sh push printed no {name}=")))
        };
        let (buildd_image, pause_image, busybox_image) =
            (image("buildd")?, image("pause")?, image("busybox")?);
        step(started, "images pushed");

        let seccomp_path = opts.source_dir.join(SECCOMP_PROFILE_FILE);
        let seccomp = std::fs::read_to_string(&seccomp_path)
            .map_err(|e| Error::io(format!("read {}", seccomp_path.display()), e))?;
        let node_opts = NodeOptions {
            dir: dir.join("node"),
            log_dir: logs.clone(),
            kubelet_bin_dir: k8s_bin.clone(),
            node_bin_dir: node_bin.clone(),
            pki: cp.pki().clone(),
            api_url: cp.api_url(),
            insecure_registries: vec![registry.address.clone()],
            pause_image,
            seccomp_profiles: vec![(BUILDD_SECCOMP_PROFILE.to_string(), seccomp)],
            tainted: opts.for_tests,
        };
        let node = match RealNode::start(&node_opts, &host, &client).await {
            Ok(n) => n,
            Err(e) => {
                cp.stop().await;
                return Err(e);
            }
        };
        step(started, "real node Ready");
        let coredns = PathBuf::from(script(&opts.source_dir, "coredns.sh", &[])?.trim());
        let addons = crate::addons::Addons::start(
            &crate::addons::AddonOptions {
                dir: dir.join("node").join("addons"),
                log_dir: logs.clone(),
                kube_proxy_bin: k8s_bin.clone(),
                coredns_bin: coredns,
                pki: cp.pki().clone(),
                api_url: cp.api_url(),
            },
            &client,
        )
        .await?;
        step(started, "kube-proxy and CoreDNS ready");
        let kwok = Kwok::start(
            &KwokOptions {
                bin_dir: node_bin.clone(),
                kubeconfig: cp.kubeconfig().to_path_buf(),
                log_dir: logs.clone(),
                nodes: SimNode::defaults(opts.for_tests),
                extra_stages: String::new(),
            },
            &client,
        )
        .await?;
        step(started, "simulated nodes Ready");
        if opts.install_crds {
            install_crds(&client, &opts.tripod).await?;
        }
        ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
        let buildkitd = crate::buildkit::start_buildkitd(
            &opts.source_dir,
            &dir.join("buildkitd"),
            std::slice::from_ref(&registry.address),
        )?;
        step(started, "buildkitd ready");
        let windows_bases = pushed
            .lines()
            .filter_map(|l| l.strip_prefix("windows_"))
            .filter_map(|l| l.split_once('='))
            .map(|(v, r)| (v.to_string(), r.to_string()))
            .collect();

        let info = EnvInfo {
            kubeconfig: cp.kubeconfig().to_path_buf(),
            kubectl: cp.kubectl(),
            api_url: cp.api_url(),
            registry: registry.address.clone(),
            node_ip: NODE_IP.to_string(),
            node_name: NODE_NAME.to_string(),
            buildd_image,
            controller_image: image("controller").ok(),
            busybox_image,
            busybox_arm64_image: image("busybox_arm64").ok(),
            windows_bases,
            buildkit: Some(crate::runner::BuildkitRef {
                address: buildkitd.address.clone(),
                buildctl: buildkitd.buildctl.clone(),
            }),
            debian_image: image("debian").ok(),
            kubelet_root: node.kubelet_root.clone(),
            buildd_seccomp_profile: BUILDD_SECCOMP_PROFILE.to_string(),
            logs: logs.clone(),
            node_ready_seconds: node.ready_after.as_secs_f64(),
            metrics: None,
        };
        let mut env = Env {
            runners: Vec::new(),
            buildkitd: Some(buildkitd),
            controllers: Vec::new(),
            kwok: Some(kwok),
            addons: Some(addons),
            node: Some(node),
            registry: Some(registry),
            cp,
            host,
            info,
        };
        if opts.controller {
            let c = env.start_controller(&opts.tripod, &ControllerOptions::default())?;
            env.info.metrics = Some(c.metrics);
            let buildkit = env.info.buildkit.clone();
            env.runners = start_dev_runners(
                &client,
                opts,
                &dir,
                &logs,
                c.executor_port,
                buildkit.as_ref(),
            )
            .await?;
            step(started, "runners Online");
        }
        step(started, "environment ready");
        Ok(env)
    }

    /// Starts a `tripod controller` (binary `tripod`) on this environment,
    /// as the controller's user, with its Lease in [`SYSTEM_NAMESPACE`]
    /// and its metrics and executor service on ports of its own. It runs
    /// until the environment stops.
    pub fn start_controller(
        &mut self,
        tripod: &Path,
        opts: &ControllerOptions,
    ) -> Result<StartedController, Error> {
        let metrics_port = crate::free_port()?;
        let executor_port = crate::free_port()?;
        let log = self.info.logs.join(&opts.log_name);
        let out = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("dup log", e))?;
        let mut cmd = supervised_command(tripod);
        cmd.args(["controller", "--lease-namespace", SYSTEM_NAMESPACE])
            .arg(format!("--lease-name={}", opts.lease_name))
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .args(opts.namespace.iter().map(|ns| format!("--namespace={ns}")))
            .args(self.info.controller_args(executor_port))
            .args(&opts.extra_args)
            .env("KUBECONFIG", self.cp.controller_kubeconfig())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_supervised(cmd).map_err(|e| Error::io("start tripod controller", e))?;
        self.controllers.push(child);
        Ok(StartedController {
            log,
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            executor_port,
        })
    }

    /// Writes `DIR/env.json` and the shell `DIR/env` (KUBECONFIG, PATH with
    /// kubectl, TRIPOD_REGISTRY).
    pub fn write_files(&self, dir: &Path) -> Result<(), Error> {
        let json =
            serde_json::to_string_pretty(&self.info).map_err(|e| Error::Script(e.to_string()))?;
        let w = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(format!("write {}", path.display()), e))
        };
        w("env.json", json)?;
        let bin = self.info.kubectl.parent().unwrap_or(Path::new("/"));
        let mut env = format!(
            "# Written by `tripod dev up`. Source it: . {}\nexport KUBECONFIG={}\nexport PATH={}:$PATH\nexport TRIPOD_REGISTRY={}\nexport TRIPOD_BUILDD_IMAGE={}\n",
            dir.join("env").display(),
            self.info.kubeconfig.display(),
            bin.display(),
            self.info.registry,
            self.info.buildd_image,
        );
        if let Some(m) = &self.info.metrics {
            env.push_str(&format!("export TRIPOD_METRICS={m}\n"));
        }
        w("env", env)
    }

    /// Restarts a control-plane component or the kubelet that exited, as a
    /// service manager would. Call it periodically. It also puts back the
    /// sysctls a (re)started kubelet changed.
    pub fn keep_alive(&mut self) {
        self.cp.restart_exited();
        if let Some(node) = self.node.as_mut() {
            node.restart_kubelet_if_exited();
        }
        self.host.restore_sysctls();
    }

    /// Stops everything in reverse order and leaves the host as found.
    pub async fn stop(mut self) {
        // Runners first: they drain (nothing runs on them by now) and leave.
        for r in &self.runners {
            r.terminate();
        }
        let until = Instant::now() + Duration::from_secs(15);
        for r in &mut self.runners {
            while r.wait_exit(Duration::ZERO).is_none() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r.kill();
        }
        self.runners.clear();
        if let Some(mut b) = self.buildkitd.take() {
            b.stop();
        }
        for c in &self.controllers {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let until = Instant::now() + Duration::from_secs(10);
        for mut c in std::mem::take(&mut self.controllers) {
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // No workload controller may recreate the Pods the node deletes.
        self.cp.stop_component("kube-controller-manager").await;
        if let Ok(client) = self.cp.client().await
            && let Some(node) = self.node.as_mut()
        {
            node.stop(&client).await;
        }
        if let Some(a) = self.addons.take() {
            a.stop().await;
        }
        self.node = None;
        self.kwok = None;
        if let Some(mut r) = self.registry.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.cp.stop().await;
        self.host.teardown();
    }
}

/// Creates namespace `name` unless it exists.
pub async fn ensure_namespace(client: &Client, name: &str) -> Result<(), Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the CRDs `tripod crds` prints (server-side apply) and waits until
/// they are established.
pub async fn install_crds(client: &Client, tripod: &Path) -> Result<(), Error> {
    let out = Command::new(tripod)
        .arg("crds")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {} crds", tripod.display()), e))?;
    if !out.status.success() {
        return Err(Error::Script(format!(
            "{} crds: {}",
            tripod.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut crds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd = CustomResourceDefinition::deserialize(doc)
            .map_err(|e| Error::Script(format!("tripod crds: {e}")))?;
        crds.push(crd);
    }
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply("tripod-dev").force();
    for crd in &crds {
        api.patch(&crd.name_any(), &ssa, &Patch::Apply(crd)).await?;
    }
    for crd in &crds {
        let name = crd.name_any();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let established = api
                .get(&name)
                .await?
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if Instant::now() > until {
                return Err(Error::Script(format!(
                    "CRD {name} was not established within 60s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
