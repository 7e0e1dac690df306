//! The leader's own EndpointSlice of the executor Service.
//!
//! Every healthy replica of the controller is Ready (a standby that reaches
//! the API server is ready to take over), so the Service that build Pods' agents dial cannot select
//! replicas by readiness. The chart's Service has no selector instead: the
//! leader, once its watches have synced, writes one EndpointSlice for it
//! (as kube-apiserver does for the `kubernetes` Service) holding its own
//! Pod IP, keeps it there (it watches the slice and writes it again when a
//! former leader's late write or the garbage collector changed it), and
//! empties it the moment it stops leading on purpose. The slice is owned by
//! the leader's Pod: when that Pod goes (a crash and deletion, an
//! uninstall), the garbage collector removes its address too; agents retry
//! until the next leader publishes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch::Receiver;

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
                target_ref: self.pod.as_ref().map(|(name, uid)| ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(name.clone()),
                    namespace: Some(self.namespace.clone()),
                    uid: Some(uid.clone()),
                    ..Default::default()
                }),
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

    /// Whether `slice` sends traffic to this replica alone.
    pub fn holds(&self, slice: &EndpointSlice) -> bool {
        let addresses: Vec<&str> = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect();
        addresses == [self.address.to_string().as_str()]
    }

    /// Publishes this replica's address and keeps it published until
    /// `stop`: watches the slice and writes it again when it is deleted or
    /// holds another address. Then empties it, unless the Lease was `lost`
    /// (the next leader may have published itself already).
    pub async fn keep(&self, client: &Client, mut stop: Receiver<bool>, lost: Receiver<bool>) {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.slice_name()));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut wait = Duration::from_millis(200);
        let mut needs_write = true;
        loop {
            // A former leader (paused past its Lease) must not overwrite
            // the next one's address.
            if *stop.borrow() || *lost.borrow() {
                break;
            }
            if needs_write {
                match self.publish(client, true).await {
                    Ok(()) => {
                        tracing::info!(
                            service = %self.service,
                            address = %self.address,
                            "published the executor endpoint"
                        );
                        needs_write = false;
                        wait = Duration::from_millis(200);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "could not publish the executor endpoint");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.wait_for(|s| *s) => break,
                        }
                        wait = (wait * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                        if !self.holds(&s) {
                            tracing::warn!(slice = %self.slice_name(), "the executor endpoint was changed; publishing it again");
                            needs_write = true;
                        }
                    }
                    Some(Ok(watcher::Event::Delete(_))) => {
                        tracing::warn!(slice = %self.slice_name(), "the executor endpoint was deleted; publishing it again");
                        needs_write = true;
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                    // Retried with backoff, which also bounds this log.
                    Some(Err(e)) => tracing::warn!(error = %e, "executor endpoint watch failed; retrying"),
                    None => break,
                },
            }
        }
        if *lost.borrow() {
            return;
        }
        match self.publish(client, false).await {
            Ok(()) => tracing::info!(service = %self.service, "withdrew the executor endpoint"),
            Err(e) => tracing::warn!(error = %e, "could not withdraw the executor endpoint"),
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
    fn only_a_slice_of_this_address_alone_is_held() {
        let e = endpoint();
        assert!(e.holds(&e.slice(true)));
        assert!(!e.holds(&e.slice(false)));
        let mut other = endpoint();
        other.address = "10.88.0.9".parse().unwrap();
        assert!(!e.holds(&other.slice(true)));
        let mut both = e.slice(true);
        both.endpoints
            .as_mut()
            .unwrap()
            .extend(other.slice(true).endpoints.unwrap());
        assert!(!e.holds(&both));
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
