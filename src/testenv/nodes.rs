//! Fake Nodes and the kubelet stand-in that keeps them alive.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tracing::Instrument;

use super::{Error, KUBERNETES_VERSION};

/// Fake node `linux/amd64`.
pub const LINUX_AMD64: &str = "tripod-linux-amd64";
/// Fake node `linux/arm64`.
pub const LINUX_ARM64: &str = "tripod-linux-arm64";
/// Fake node `windows/amd64` (Windows Server 2022), tainted
/// `os=windows:NoSchedule`.
pub const WINDOWS_AMD64: &str = "tripod-windows-amd64";
/// `node.kubernetes.io/windows-build` of [`WINDOWS_AMD64`].
pub const WINDOWS_BUILD: &str = "10.0.20348";

/// Field manager of the testenv's writes.
const MANAGER: &str = "tripod-testenv";
/// How often the keeper renews the `Ready` heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(10);

struct FakeNode {
    name: &'static str,
    os: &'static str,
    arch: &'static str,
    windows: bool,
}

const FAKE_NODES: [FakeNode; 3] = [
    FakeNode {
        name: LINUX_AMD64,
        os: "linux",
        arch: "amd64",
        windows: false,
    },
    FakeNode {
        name: LINUX_ARM64,
        os: "linux",
        arch: "arm64",
        windows: false,
    },
    FakeNode {
        name: WINDOWS_AMD64,
        os: "windows",
        arch: "amd64",
        windows: true,
    },
];

impl FakeNode {
    fn labels(&self) -> Value {
        let mut labels = json!({
            "kubernetes.io/os": self.os,
            "kubernetes.io/arch": self.arch,
            "kubernetes.io/hostname": self.name,
        });
        if self.windows {
            labels["node.kubernetes.io/windows-build"] = json!(WINDOWS_BUILD);
        }
        labels
    }

    fn taints(&self) -> Value {
        if self.windows {
            json!([{"key": "os", "value": "windows", "effect": "NoSchedule"}])
        } else {
            json!([])
        }
    }

    fn status(&self, now: &str, ready_since: &str) -> Value {
        let resources = json!({
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
        });
        let condition = |type_: &str, status: &str, reason: &str, message: &str, since: &str| {
            json!({
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            })
        };
        let (kernel, image) = if self.windows {
            (WINDOWS_BUILD, "Windows Server 2022 (tripod fake node)")
        } else {
            ("6.1.0", "Linux (tripod fake node)")
        };
        json!({
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                    "fake node", ready_since),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure",
                    "fake node", ready_since),
                condition("PIDPressure", "False", "KubeletHasSufficientPID",
                    "fake node", ready_since),
                condition("Ready", "True", "KubeletReady",
                    "tripod testenv fake node (no container runtime)", ready_since),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": self.name,
                "kernelVersion": kernel,
                "osImage": image,
                "containerRuntimeVersion": "tripod-fake://0.0.0",
                "kubeletVersion": KUBERNETES_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": self.os,
                "architecture": self.arch,
            },
        })
    }
}

/// Current time as RFC 3339 with whole seconds, as Kubernetes writes it.
fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// Registers the fake nodes — `tripod-linux-amd64`, `tripod-linux-arm64`
/// and `tripod-windows-amd64` (tainted `os=windows:NoSchedule`, labelled
/// `node.kubernetes.io/windows-build=10.0.20348`) — with the usual
/// `kubernetes.io/{os,arch,hostname}` labels, and sets their status to
/// `Ready=True` with 16 CPUs, 64 GiB memory and 110 pods of capacity, so
/// that kube-scheduler binds Pods to them. Idempotent (server-side apply);
/// removes any `node.kubernetes.io/*` taint such as `not-ready`.
///
/// Returns the node names. Nothing runs the Pods bound to them: see
/// [`spawn_node_keeper`].
pub async fn create_nodes(client: &kube::Client) -> Result<Vec<String>, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let apply = PatchParams::apply(MANAGER).force();
    let mut names = Vec::new();
    for node in &FAKE_NODES {
        let existing = api.get_opt(node.name).await?;
        let manifest = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": node.labels()},
            "spec": {"taints": node.taints()},
        });
        let applied = api
            .patch(node.name, &apply, &Patch::Apply(&manifest))
            .await?;

        // Admission (TaintNodesByCondition) or a node controller may have
        // added e.g. node.kubernetes.io/not-ready; a kubelet would clear it.
        let foreign_taint = applied
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
        if foreign_taint {
            let fix = json!({"spec": {"taints": node.taints()}});
            api.patch(node.name, &PatchParams::default(), &Patch::Merge(&fix))
                .await?;
        }

        let now = now();
        let ready_since = existing
            .as_ref()
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| now.clone());
        let status = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name},
            "status": node.status(&now, &ready_since),
        });
        api.patch_status(node.name, &apply, &Patch::Apply(&status))
            .await?;
        names.push(node.name.to_string());
    }
    Ok(names)
}

/// Starts the kubelet stand-in for `nodes` (the names [`create_nodes`]
/// returned) as a tokio task, in tracing span `node_keeper`:
///
/// 1. every 10 s it renews the `Ready` condition's `lastHeartbeatTime`
///    (and keeps it `True`);
/// 2. it watches Pods in all namespaces and deletes, with grace period 0,
///    each Pod bound to one of `nodes` that has a `deletionTimestamp`, as a
///    kubelet does once the Pod's containers stopped. Otherwise such Pods
///    would stay `Terminating` for ever.
///
/// It does not run containers: Pods bound to the fake nodes stay `Pending`.
/// Errors are logged and retried; the task runs until aborted. Must be
/// called from within a Tokio runtime.
pub fn spawn_node_keeper(client: kube::Client, nodes: Vec<String>) -> tokio::task::JoinHandle<()> {
    let span = tracing::info_span!("node_keeper", nodes = ?nodes);
    tokio::spawn(
        async move {
            let nodes: HashSet<String> = nodes.into_iter().collect();
            tokio::join!(
                heartbeat(&client, &nodes),
                finish_deletions(&client, &nodes)
            );
        }
        .instrument(span),
    )
}

async fn heartbeat(client: &kube::Client, nodes: &HashSet<String>) {
    let api: Api<Node> = Api::all(client.clone());
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now();
        // Strategic merge: conditions merge by `type`, the others stay.
        let patch = json!({"status": {"conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "lastHeartbeatTime": now,
        }]}});
        for node in nodes {
            match api
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => tracing::trace!(node, "heartbeat"),
                Err(e) => tracing::warn!(node, error = %e, "heartbeat failed"),
            }
        }
    }
}

async fn finish_deletions(client: &kube::Client, nodes: &HashSet<String>) {
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut pods = std::pin::pin!(pods);
    while let Some(event) = pods.next().await {
        let pod = match event {
            Ok(pod) => pod,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        let bound = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some_and(|n| nodes.contains(n));
        if !bound || pod.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            continue;
        };
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        match api.delete(name, &params).await {
            Ok(_) => tracing::debug!(%namespace, %name, "deleted terminating pod"),
            // Gone already, or replaced by a Pod of the same name.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(%namespace, %name, error = %e, "deleting pod failed"),
        }
    }
}
