//! The leader's own EndpointSlice of the executor Service.
//!
//! Every replica of the controller is Ready once it runs (a standby is ready
//! to take over), so the Service that build Pods' agents dial cannot select
//! replicas by readiness. The chart's Service has no selector instead: the
//! leader, once its watches have synced, writes one EndpointSlice for it
//! (as kube-apiserver does for the `kubernetes` Service) holding its own
//! Pod IP, and empties it when it stops leading on purpose. The slice is
//! owned by the leader's Pod: when that Pod goes (a crash and deletion, an
//! uninstall), the garbage collector removes its address too; agents retry
//! until the next leader publishes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::FIELD_MANAGER;

/// Label naming the Service an EndpointSlice belongs to.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label naming who manages an EndpointSlice (the EndpointSlice controller
/// leaves slices of other managers alone).
const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value of [`LABEL_MANAGED_BY`].
const MANAGED_BY: &str = "controller.tripod.dev";

/// Errors of publishing the leader's endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The API server refused or failed the write.
    #[error("writing EndpointSlice {namespace}/{name}: {source}")]
    Write {
        /// Namespace of the slice.
        namespace: String,
        /// Name of the slice.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Where the leader is reached: the Service it publishes for and its own
/// address and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderEndpoint {
    /// Namespace of the Service (the release namespace).
    pub namespace: String,
    /// Name of the selector-less Service.
    pub service: String,
    /// This replica's Pod IP.
    pub address: IpAddr,
    /// Named ports, as the Service names them (`executor`, `metrics`).
    pub ports: Vec<(String, u16)>,
    /// This replica's Pod (name, UID), the slice's owner.
    pub pod: Option<(String, String)>,
}

impl LeaderEndpoint {
    /// Name of the EndpointSlice.
    pub fn slice_name(&self) -> String {
        format!("{}-leader", self.service)
    }

    /// The slice: this replica's address when `leading`, none otherwise.
    pub fn slice(&self, leading: bool) -> EndpointSlice {
        let endpoints = if leading {
            vec![Endpoint {
                addresses: vec![self.address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                ..Default::default()
            }]
        } else {
            Vec::new()
        };
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.slice_name()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL_SERVICE_NAME.to_string(), self.service.clone()),
                    (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                ])),
                owner_references: self.pod.as_ref().map(|(name, uid)| {
                    vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Pod".into(),
                        name: name.clone(),
                        uid: uid.clone(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            address_type: match self.address {
                IpAddr::V4(_) => "IPv4".into(),
                IpAddr::V6(_) => "IPv6".into(),
            },
            endpoints: Some(endpoints),
            ports: Some(
                self.ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.clone()),
                        port: Some(i32::from(*port)),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    /// Writes the slice (server-side apply, forced: the previous leader's
    /// address is replaced).
    pub async fn publish(&self, client: &Client, leading: bool) -> Result<(), EndpointError> {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let name = self.slice_name();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(self.slice(leading)),
        )
        .await
        .map(drop)
        .map_err(|source| EndpointError::Write {
            namespace: self.namespace.clone(),
            name,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> LeaderEndpoint {
        LeaderEndpoint {
            namespace: "tripod-system".into(),
            service: "tripod".into(),
            address: "10.88.0.7".parse().unwrap(),
            ports: vec![("executor".into(), 9443), ("metrics".into(), 8080)],
            pod: Some(("tripod-abc".into(), "uid-1".into())),
        }
    }

    #[test]
    fn the_slice_belongs_to_the_service_and_holds_the_leader_alone() {
        let s = endpoint().slice(true);
        assert_eq!(s.metadata.name.as_deref(), Some("tripod-leader"));
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels[LABEL_SERVICE_NAME], "tripod");
        assert_eq!(labels[LABEL_MANAGED_BY], MANAGED_BY);
        assert_eq!(s.address_type, "IPv4");
        let endpoints = s.endpoints.unwrap();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].addresses, vec!["10.88.0.7".to_string()]);
        let ports = s.ports.unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("executor"));
        assert_eq!(ports[0].port, Some(9443));
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Pod", "tripod-abc")
        );
        assert_eq!(owner.uid, "uid-1");
    }

    #[test]
    fn a_former_leader_leaves_no_address() {
        let s = endpoint().slice(false);
        assert_eq!(s.endpoints, Some(Vec::new()));
        assert_eq!(s.ports.unwrap().len(), 2);
    }

    #[test]
    fn ipv6_pods_get_an_ipv6_slice() {
        let mut e = endpoint();
        e.address = "fd00::7".parse().unwrap();
        assert_eq!(e.slice(true).address_type, "IPv6");
    }
}
