//! What the controller keeps of a build Pod it watches: a typed subset of a
//! Pod, decoded straight from the API server's JSON. The containers,
//! volumes, images, addresses and the rest of a Pod are Tripod's own or the
//! kubelet's and never read back, so they are never allocated: the cache of
//! 10,000 build Pods holds these, not 10,000 full `Pod`s.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

/// A build Pod as the plan sees it: its metadata (without managedFields),
/// the node it is bound to, its phase, the `PodScheduled` condition, and
/// the containers that exited with an error.
#[derive(Resource, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[resource(inherit = "k8s_openapi::api::core::v1::Pod")]
pub struct CachedPod {
    /// The Pod's metadata.
    pub metadata: ObjectMeta,
    /// What is kept of `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedPodSpec>,
    /// What is kept of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedPodStatus>,
}

/// `spec.nodeName`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodSpec {
    /// The node the Pod is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// The phase, reason and message, the `PodScheduled` condition and the
/// containers (init or not) that exited with a non-zero code.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why the Pod is in this phase (`Evicted`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details of `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Conditions (after [`CachedPod::slim`], only `PodScheduled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<CachedPodCondition>>,
    /// The app containers (after [`CachedPod::slim`], those that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
    /// The init containers (after [`CachedPod::slim`], those that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// A Pod condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedPodCondition {
    /// The condition's type (`PodScheduled`, …).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[serde(default)]
    pub status: String,
    /// Why, in one word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why, for people (the scheduler's "0/3 nodes are available: …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A container's name and, once it has exited, how.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedContainerStatus {
    /// The container's name.
    #[serde(default)]
    pub name: String,
    /// Its state (only a terminated one is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CachedContainerState>,
}

/// A container's state, when terminated.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedContainerState {
    /// Set once the container has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<CachedTermination>,
}

/// How a container exited.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedTermination {
    /// Its exit code.
    #[serde(default)]
    pub exit_code: i32,
    /// Why, in one word (`Error`, `OOMKilled`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its termination message (the agent writes its last error there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl CachedPod {
    /// Drops what the plan never reads that decoding kept: managedFields,
    /// conditions other than `PodScheduled`, and containers that did not
    /// exit with an error.
    pub fn slim(&mut self) {
        self.metadata.managed_fields = None;
        if let Some(status) = self.status.as_mut() {
            if let Some(c) = status.conditions.as_mut() {
                c.retain(|c| c.type_ == "PodScheduled");
            }
            for list in [
                &mut status.container_statuses,
                &mut status.init_container_statuses,
            ] {
                if let Some(l) = list.as_mut() {
                    l.retain(CachedContainerStatus::failed);
                }
                if list.as_ref().is_some_and(Vec::is_empty) {
                    *list = None;
                }
            }
            if status.conditions.as_ref().is_some_and(Vec::is_empty) {
                status.conditions = None;
            }
        }
    }

    /// The cache's view of a whole Pod (one a plan creates), decoded from
    /// its JSON as the watch decodes it: for the planner's tests.
    #[cfg(test)]
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Self, serde_json::Error> {
        let mut p: Self = serde_json::from_value(serde_json::to_value(pod)?)?;
        p.slim();
        Ok(p)
    }
}

impl CachedContainerStatus {
    /// It exited with a non-zero code.
    fn failed(&self) -> bool {
        self.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_full_pod_into_what_the_plan_reads() {
        let mut pod: CachedPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "b-1", "namespace": "team",
                "annotations": {"build.tripod.dev/platform": "linux/amd64"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "agent", "image": "tripod"}]},
            "status": {
                "phase": "Failed", "reason": "Evicted", "message": "low on disk",
                "hostIP": "10.0.0.1", "podIP": "10.1.0.5", "qosClass": "BestEffort",
                "conditions": [
                    {"type": "Ready", "status": "False", "message": "containers not ready"},
                    {"type": "PodScheduled", "status": "False", "message": "0/3 nodes fit"}
                ],
                "initContainerStatuses": [{"name": "fetch", "image": "i", "imageID": "x",
                    "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
                "containerStatuses": [
                    {"name": "agent", "image": "i", "imageID": "x", "ready": false, "restartCount": 0,
                     "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "a\nno space"}}},
                    {"name": "buildd", "image": "i", "imageID": "x", "ready": true, "restartCount": 0,
                     "state": {"running": {"startedAt": "2026-12-01T10:00:00Z"}}}
                ]
            }
        }))
        .unwrap();
        pod.slim();
        assert_eq!(pod.metadata.name.as_deref(), Some("b-1"));
        assert_eq!(pod.metadata.managed_fields, None);
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["build.tripod.dev/platform"],
            "linux/amd64"
        );
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(status.reason.as_deref(), Some("Evicted"));
        let conditions = status.conditions.unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].message.as_deref(), Some("0/3 nodes fit"));
        let failed = status.container_statuses.unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].name, "agent");
        let t = failed[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!(
            (t.exit_code, t.message.as_deref()),
            (2, Some("a\nno space"))
        );
        assert_eq!(status.init_container_statuses, None);
    }

    #[test]
    fn is_a_pod_to_the_api() {
        assert_eq!(CachedPod::kind(&()), "Pod");
        assert_eq!(CachedPod::api_version(&()), "v1");
        assert_eq!(CachedPod::plural(&()), "pods");
    }

    #[test]
    fn a_pod_this_process_made_reads_the_same_as_from_the_watch() {
        let mut pod = k8s_openapi::api::core::v1::Pod::default();
        pod.metadata.name = Some("b-1".into());
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        });
        let cached = CachedPod::of(&pod).unwrap();
        assert_eq!(cached.metadata.name.as_deref(), Some("b-1"));
        assert_eq!(cached.spec.unwrap().node_name.as_deref(), Some("n1"));
        assert_eq!(cached.status, None);
    }
}
