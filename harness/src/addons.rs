//! What a cluster runs beside its nodes so that Pods can use Services:
//! **kube-proxy** (built from the pinned Kubernetes module by
//! `testenv/build.sh`, iptables mode) and **CoreDNS** (built from its Go
//! module by `testenv/coredns.sh`), both as host processes of the real
//! node, as a node's system services would be.
//!
//! * kube-proxy programs the Service range (`10.0.0.0/24`, blackholed on
//!   the host, so an address it has not programmed goes nowhere): a Pod
//!   reaches the API server through the `kubernetes` Service and another
//!   Pod through its ClusterIP. Its configuration keeps it off the host's
//!   kernel settings: no NodePorts on loopback (no `route_localnet`), no
//!   conntrack limits, no OOM score. Its rules are `KUBE-*` chains, which
//!   the node's teardown removes with the rest.
//! * CoreDNS answers `cluster.local` from the API server (Services,
//!   EndpointSlices) on the node address, behind the `kube-system/kube-dns`
//!   Service (`10.0.0.10`, the kubelet's `clusterDNS`). It has no upstream:
//!   other names fail, and no query leaves the machine.
//!
//! Both read the API server with identities of their own: kube-proxy as
//! `system:kube-proxy` (the bootstrap `system:node-proxier` binding),
//! CoreDNS as `tripod-testenv:coredns` with a read-only ClusterRole.
//! Their files live under the node's data directory, so the node's
//! teardown also kills them after a crash of the harness.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use crate::Error;
use crate::certs::{COREDNS_USER, Pki};
use crate::node::{NODE_IP, NODE_NAME, POD_CIDR, http_ok, tail, write};
use crate::process::{spawn_supervised, supervised_command};

/// The cluster DNS Service's address (the kubelet's `clusterDNS`).
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The cluster domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The field manager of the harness's objects.
const MANAGER: &str = "tripod-harness";
/// How long kube-proxy and CoreDNS may take to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`Addons::start`] needs.
#[derive(Debug, Clone)]
pub struct AddonOptions {
    /// Where configurations go (under the node's data directory).
    pub dir: PathBuf,
    /// Where `kube-proxy.log` and `coredns.log` go.
    pub log_dir: PathBuf,
    /// The directory holding `kube-proxy` (from `testenv/build.sh`).
    pub kube_proxy_bin: PathBuf,
    /// The `coredns` binary (from `testenv/coredns.sh`).
    pub coredns_bin: PathBuf,
    /// The control plane's PKI.
    pub pki: Pki,
    /// The API server's URL (reachable at the node address).
    pub api_url: String,
}

/// Running kube-proxy and CoreDNS. Dropping it kills both.
#[derive(Debug)]
pub struct Addons {
    children: Vec<Child>,
    /// The address and port CoreDNS answers on (the `kube-dns` endpoint).
    pub dns: (Ipv4Addr, u16),
}

impl Drop for Addons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// JSON strings are YAML strings: quotes any path.
fn q(p: &Path) -> String {
    serde_json::Value::String(p.display().to_string()).to_string()
}

/// Writes `dir/kubeconfig` for the client certificate `cert`/`key`.
fn write_kubeconfig(dir: &Path, opts: &AddonOptions, cert: &Path, key: &Path) -> Result<(), Error> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tripod
  cluster: {{server: {api_url}, certificate-authority: {ca}}}
users:
- name: me
  user: {{client-certificate: {cert}, client-key: {key}}}
contexts:
- name: tripod
  context: {{cluster: tripod, user: me}}
current-context: tripod
",
        api_url = opts.api_url,
        ca = q(&opts.pki.ca_cert),
        cert = q(cert),
        key = q(key),
    );
    write(&dir.join("kubeconfig"), &text)
}

impl Addons {
    /// Starts kube-proxy and CoreDNS, publishes the `kube-dns` Service and
    /// waits until both report healthy (CoreDNS: its Kubernetes caches
    /// synced).
    pub async fn start(opts: &AddonOptions, client: &kube::Client) -> Result<Addons, Error> {
        let started = Instant::now();
        let mut addons = Addons {
            children: Vec::new(),
            dns: (NODE_IP, crate::free_port()?),
        };

        // kube-proxy.
        let dir = opts.dir.join("kube-proxy");
        write_kubeconfig(
            &dir,
            opts,
            &opts.pki.kube_proxy_cert,
            &opts.pki.kube_proxy_key,
        )?;
        let healthz = crate::free_port()?;
        let metrics = crate::free_port()?;
        write(
            &dir.join("config.yaml"),
            &format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: 10.88.0.0/16
clientConnection:
  kubeconfig: {kubeconfig}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
# NodePorts only on the node address: no route_localnet sysctl.
nodePortAddresses: [\"{NODE_IP}/32\"]
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  syncPeriod: 30s
  minSyncPeriod: 0s
# Leave the host's conntrack table sizes and timeouts alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
oomScoreAdj: 0
",
                kubeconfig = q(&dir.join("kubeconfig")),
            ),
        )?;
        let log = opts.log_dir.join("kube-proxy.log");
        addons.spawn(
            &opts.kube_proxy_bin.join("kube-proxy"),
            &[
                format!("--config={}", dir.join("config.yaml").display()),
                "--v=1".to_string(),
            ],
            &log,
        )?;

        // CoreDNS: read access for its user, its Service and endpoint.
        grant_coredns(client).await?;
        let dir = opts.dir.join("coredns");
        write_kubeconfig(&dir, opts, &opts.pki.coredns_cert, &opts.pki.coredns_key)?;
        let ready = crate::free_port()?;
        let health = crate::free_port()?;
        let (dns_ip, dns_port) = addons.dns;
        write(
            &dir.join("Corefile"),
            &format!(
                "{CLUSTER_DOMAIN}:{dns_port} in-addr.arpa:{dns_port} ip6.arpa:{dns_port} {{
    bind {dns_ip}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} tripod
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
.:{dns_port} {{
    bind {dns_ip}
    errors
    # No upstream: names outside the cluster do not resolve.
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
",
                kubeconfig = dir.join("kubeconfig").display(),
            ),
        )?;
        let log_dns = opts.log_dir.join("coredns.log");
        addons.spawn(
            &opts.coredns_bin,
            &[
                "-conf".to_string(),
                dir.join("Corefile").display().to_string(),
            ],
            &log_dns,
        )?;
        publish_dns(client, dns_ip, dns_port).await?;

        let until = Instant::now() + READY_TIMEOUT;
        loop {
            for (c, log) in addons.children.iter_mut().zip([&log, &log_dns]) {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(Error::Node(format!(
                        "{} exited ({status}):\n{}",
                        log.display(),
                        tail(log)
                    )));
                }
            }
            if http_ok(healthz, "/healthz").await && http_ok(ready, "/ready").await {
                break;
            }
            if Instant::now() > until {
                return Err(Error::Node(format!(
                    "kube-proxy or CoreDNS not healthy within {}s:\n{}\n{}",
                    READY_TIMEOUT.as_secs(),
                    tail(&log),
                    tail(&log_dns)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::info!(elapsed = ?started.elapsed(), pod_cidr = POD_CIDR, "kube-proxy and CoreDNS ready");
        Ok(addons)
    }

    fn spawn(&mut self, program: &Path, args: &[String], log: &Path) -> Result<(), Error> {
        let out = std::fs::File::create(log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("dup log", e))?;
        let mut cmd = supervised_command(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = spawn_supervised(cmd)
            .map_err(|e| Error::io(format!("start {}", program.display()), e))?;
        self.children.push(child);
        Ok(())
    }

    /// Stops both (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(mut self) {
        for c in &self.children {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let until = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Drop kills what is left.
    }
}

/// A ClusterRole reading what the `kubernetes` plugin watches, bound to
/// CoreDNS's user.
async fn grant_coredns(client: &kube::Client) -> Result<(), Error> {
    let name = "tripod-testenv:coredns";
    let ssa = PatchParams::apply(MANAGER).force();
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["services".into(), "pods".into(), "namespaces".into()]),
                verbs: vec!["list".into(), "watch".into()],
                ..Default::default()
            },
            PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".into()]),
                resources: Some(vec!["endpointslices".into()]),
                verbs: vec!["list".into(), "watch".into()],
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .patch(name, &ssa, &Patch::Apply(&role))
        .await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: COREDNS_USER.into(),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(name, &ssa, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

/// The selector-less Service `kube-system/kube-dns` on
/// [`CLUSTER_DNS_IP`] and its EndpointSlice naming CoreDNS.
async fn publish_dns(client: &kube::Client, ip: Ipv4Addr, port: u16) -> Result<(), Error> {
    let ssa = PatchParams::apply(MANAGER).force();
    let labels = BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]);
    let service = Service {
        metadata: ObjectMeta {
            name: Some("kube-dns".into()),
            namespace: Some("kube-system".into()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(CLUSTER_DNS_IP.to_string()),
            ports: Some(
                [("dns", "UDP"), ("dns-tcp", "TCP")]
                    .into_iter()
                    .map(|(name, protocol)| ServicePort {
                        name: Some(name.into()),
                        port: 53,
                        protocol: Some(protocol.into()),
                        target_port: Some(
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                                i32::from(port),
                            ),
                        ),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns", &ssa, &Patch::Apply(&service))
        .await?;
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("kube-dns-coredns".into()),
            namespace: Some("kube-system".into()),
            labels: Some(BTreeMap::from([
                (
                    "kubernetes.io/service-name".to_string(),
                    "kube-dns".to_string(),
                ),
                (
                    "endpointslice.kubernetes.io/managed-by".to_string(),
                    "tripod-harness".to_string(),
                ),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![ip.to_string()],
            node_name: Some(NODE_NAME.into()),
            ..Default::default()
        }]),
        ports: Some(
            [("dns", "UDP"), ("dns-tcp", "TCP")]
                .into_iter()
                .map(|(name, protocol)| EndpointPort {
                    name: Some(name.into()),
                    port: Some(i32::from(port)),
                    protocol: Some(protocol.into()),
                    ..Default::default()
                })
                .collect(),
        ),
    };
    Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns-coredns", &ssa, &Patch::Apply(&slice))
        .await?;
    Ok(())
}
