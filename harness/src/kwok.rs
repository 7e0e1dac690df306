//! Simulated nodes from kwok (sigs.k8s.io/kwok, built by `testenv/node.sh`).
//!
//! kwok keeps the Nodes annotated `kwok.x-k8s.io/node=fake` alive (status,
//! leases) and plays the Pods bound to them through kwokctl's default
//! stages: they become Running, Pods owned by a Job complete, deleted Pods
//! go. **Nothing runs there**: a build Pod on a simulated node is bound by
//! the real scheduler and never executes a container. Its addresses come
//! from `10.99.0.0/16`, blackholed on the host.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::Error;
use crate::process::{spawn_supervised, supervised_command};

/// Simulated node `linux/amd64` (tests only: beside a tainted real node, so
/// that Pods which must not run have an amd64 node to be bound to).
pub const SIM_LINUX_AMD64: &str = "tripod-sim-linux-amd64";
/// Simulated node `linux/arm64`.
pub const LINUX_ARM64: &str = "tripod-linux-arm64";
/// Simulated node `windows/amd64` (Windows Server 2022), tainted
/// `os=windows:NoSchedule`.
pub const WINDOWS_AMD64: &str = "tripod-windows-amd64";
/// `node.kubernetes.io/windows-build` of [`WINDOWS_AMD64`].
pub const WINDOWS_BUILD: &str = "10.0.20348";
/// Simulated node `windows/amd64` (Windows Server 2019), tainted
/// `os=windows:NoSchedule`.
pub const WINDOWS_2019_AMD64: &str = "tripod-windows-2019-amd64";
/// `node.kubernetes.io/windows-build` of [`WINDOWS_2019_AMD64`].
pub const WINDOWS_2019_BUILD: &str = "10.0.17763";
/// The annotation kwok manages nodes by.
const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Field manager of the harness's writes.
const MANAGER: &str = "tripod-harness";

/// A simulated node.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// Node name.
    pub name: String,
    /// `kubernetes.io/os`.
    pub os: String,
    /// `kubernetes.io/arch`.
    pub arch: String,
    /// `node.kubernetes.io/windows-build` (Windows nodes).
    pub windows_build: Option<String>,
}

impl SimNode {
    /// The default simulated nodes: [`LINUX_ARM64`], [`WINDOWS_AMD64`] and
    /// [`WINDOWS_2019_AMD64`], and [`SIM_LINUX_AMD64`] `for_tests`.
    pub fn defaults(for_tests: bool) -> Vec<SimNode> {
        let mut nodes = vec![
            SimNode {
                name: LINUX_ARM64.into(),
                os: "linux".into(),
                arch: "arm64".into(),
                windows_build: None,
            },
            SimNode {
                name: WINDOWS_AMD64.into(),
                os: "windows".into(),
                arch: "amd64".into(),
                windows_build: Some(WINDOWS_BUILD.into()),
            },
            SimNode {
                name: WINDOWS_2019_AMD64.into(),
                os: "windows".into(),
                arch: "amd64".into(),
                windows_build: Some(WINDOWS_2019_BUILD.into()),
            },
        ];
        if for_tests {
            nodes.push(SimNode {
                name: SIM_LINUX_AMD64.into(),
                os: "linux".into(),
                arch: "amd64".into(),
                windows_build: None,
            });
        }
        nodes
    }
}

/// What [`Kwok::start`] needs.
#[derive(Debug, Clone)]
pub struct KwokOptions {
    /// Directory of the `kwok` binary; its stages are `../stages.yaml`.
    pub bin_dir: PathBuf,
    /// Kubeconfig kwok acts with.
    pub kubeconfig: PathBuf,
    /// Where `kwok.log` (and the stages in use) are written.
    pub log_dir: PathBuf,
    /// The nodes to register.
    pub nodes: Vec<SimNode>,
    /// More kwok `Stage` documents (YAML, `---`-separated), played beside
    /// the default ones.
    pub extra_stages: String,
}

/// A running kwok.
#[derive(Debug)]
pub struct Kwok {
    child: Child,
    /// kwok's log file.
    pub log: PathBuf,
}

impl Kwok {
    /// Starts kwok (`bin_dir/kwok`, stages from `bin_dir/../stages.yaml` and
    /// `extra_stages`) against the cluster of `kubeconfig`, then registers
    /// `nodes` and waits until kwok reports them Ready.
    pub async fn start(opts: &KwokOptions, client: &kube::Client) -> Result<Kwok, Error> {
        let KwokOptions {
            bin_dir,
            kubeconfig,
            log_dir,
            nodes,
            extra_stages,
        } = opts;
        let mut stages = bin_dir
            .parent()
            .map(|p| p.join("stages.yaml"))
            .unwrap_or_default();
        if !extra_stages.is_empty() {
            let defaults = std::fs::read_to_string(&stages)
                .map_err(|e| Error::io(format!("read {}", stages.display()), e))?;
            stages = log_dir.join("kwok-stages.yaml");
            std::fs::write(&stages, format!("{defaults}\n---\n{extra_stages}"))
                .map_err(|e| Error::io(format!("write {}", stages.display()), e))?;
        }
        let log = log_dir.join("kwok.log");
        let out = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("dup log", e))?;
        let mut cmd = supervised_command(bin_dir.join("kwok"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--config={}", stages.display()))
            .args([
                "--manage-all-nodes=false",
                &format!("--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake"),
                "--node-lease-duration-seconds=40",
                "--cidr=10.99.0.0/24",
                "--node-ip=10.99.1.1",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_supervised(cmd).map_err(|e| Error::io("start kwok", e))?;
        let mut kwok = Kwok { child, log };
        let api: Api<Node> = Api::all(client.clone());
        for n in nodes {
            kwok.register(&api, n).await?;
        }
        let until = Instant::now() + Duration::from_secs(60);
        for n in nodes {
            loop {
                if let Ok(Some(status)) = kwok.child.try_wait() {
                    return Err(Error::Node(format!(
                        "kwok exited ({status}); see {}",
                        kwok.log.display()
                    )));
                }
                if crate::node::is_ready(&api, &n.name).await {
                    break;
                }
                if Instant::now() > until {
                    return Err(Error::Node(format!(
                        "kwok did not make {} Ready within 60s; see {}",
                        n.name,
                        kwok.log.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(kwok)
    }

    /// Creates (or updates) one simulated Node and reports its os/arch in
    /// `status.nodeInfo` (kwok would report amd64/linux).
    async fn register(&mut self, api: &Api<Node>, n: &SimNode) -> Result<(), Error> {
        let windows = n.os == "windows";
        let mut labels = json!({
            "kubernetes.io/os": n.os,
            "kubernetes.io/arch": n.arch,
            "kubernetes.io/hostname": n.name,
            "type": "kwok",
        });
        if let Some(build) = &n.windows_build {
            labels["node.kubernetes.io/windows-build"] = json!(build);
        }
        let taints = if windows {
            json!([{"key": "os", "value": "windows", "effect": "NoSchedule"}])
        } else {
            json!([])
        };
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": n.name,
                "annotations": {KWOK_ANNOTATION: "fake"},
                "labels": labels,
            },
            "spec": {"taints": taints},
        });
        let ssa = PatchParams::apply(MANAGER).force();
        api.patch(&n.name, &ssa, &Patch::Apply(&node)).await?;
        let status = json!({
            "status": {"nodeInfo": {
                "operatingSystem": n.os,
                "architecture": n.arch,
                "kubeletVersion": crate::controlplane::KUBERNETES_VERSION,
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                "osImage": "", "containerRuntimeVersion": "kwok", "kubeProxyVersion": "",
            }},
        });
        api.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    /// kwok's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops kwok (SIGKILL: it holds no state).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kwok {
    fn drop(&mut self) {
        self.stop();
    }
}
