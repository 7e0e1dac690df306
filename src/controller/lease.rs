//! The Lease object of a runner's build: `coordination.k8s.io/v1` Lease in
//! the ImageBuild's namespace, named like the build Pod of the same attempt,
//! owned by the ImageBuild, held (`spec.holderIdentity`) by the runner. It
//! is the durable record of which runner builds which attempt: the runner's
//! outcome is recorded on it, and deleting it (with a precondition on its
//! resourceVersion) is what expires the lease.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::ResourceExt;

use super::pod::{PodKey, name_label, owner_reference};
use crate::api::{
    ANNOTATION_PLATFORM, ImageBuild, LABEL_ATTEMPT, LABEL_BUILD_ID, LABEL_NAME, LABEL_PLATFORM,
};
use crate::executor::runners::{ANNOTATION_EMULATED, LABEL_RUNNER};

/// What a Lease object is made of.
#[derive(Debug, Clone)]
pub struct LeaseFor<'a> {
    /// The ImageBuild.
    pub build: &'a ImageBuild,
    /// Name of the Lease object.
    pub name: &'a str,
    /// Platform, build and attempt (the fencing token).
    pub key: PodKey<'a>,
    /// The runner holding it.
    pub runner: &'a str,
    /// The runner builds the platform through emulation.
    pub emulated: bool,
    /// When it was handed out.
    pub now: jiff::Timestamp,
}

/// The Lease object of one runner attempt.
pub fn build_lease(l: &LeaseFor<'_>) -> Lease {
    let mut annotations =
        BTreeMap::from([(ANNOTATION_PLATFORM.to_string(), l.key.platform.to_string())]);
    if l.emulated {
        annotations.insert(ANNOTATION_EMULATED.to_string(), "true".to_string());
    }
    Lease {
        metadata: ObjectMeta {
            name: Some(l.name.to_string()),
            namespace: l.build.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "tripod".to_string(),
                ),
                (LABEL_NAME.to_string(), name_label(&l.build.name_any())),
                (LABEL_PLATFORM.to_string(), l.key.platform.label_value()),
                (LABEL_BUILD_ID.to_string(), l.key.build_id.to_string()),
                (LABEL_ATTEMPT.to_string(), l.key.attempt.to_string()),
                (LABEL_RUNNER.to_string(), name_label(l.runner)),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner_reference(l.build)]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(l.runner.to_string()),
            acquire_time: Some(MicroTime(l.now)),
            ..Default::default()
        }),
    }
}
