//! A real, local Kubernetes control plane for tests and `tripod dev`.
//!
//! [`ControlPlane::start`] runs the genuine Kubernetes binaries (built by
//! `testenv/build.sh`, see [`ensure_binaries`]) as child processes on
//! loopback ports:
//!
//! * **etcd** (fsync disabled, fresh data directory on every start);
//! * **kube-apiserver** with TLS, client-certificate authentication, RBAC
//!   authorization and the default admission chain except `ServiceAccount`
//!   (no token controller runs, so Pods get no token volume) and
//!   `TaintNodesByCondition` (it would taint new nodes `not-ready`), and
//!   with `--endpoint-reconciler-type=none` (the reconciler refuses a
//!   loopback advertise address), so the `kubernetes` Service has no
//!   endpoints;
//! * **kube-controller-manager** with only the garbage collector, namespace
//!   and service-account controllers: ownerReference cascades, namespace
//!   deletion and each namespace's `default` ServiceAccount behave as in a
//!   real cluster. Workload controllers (Deployment, Job, ...) do not run,
//!   and neither does node lifecycle, which would evict Pods from nodes
//!   without a kubelet;
//! * **kube-scheduler**, unmodified: Pods are scheduled by the real
//!   filters and scores (node selectors, affinity, taints and tolerations,
//!   resources).
//!
//! The API server authorizes with `Node,RBAC` and admits with
//! `NodeRestriction`, so a kubelet ([`crate::node`]) gets exactly a node's
//! rights from its `system:node:<name>` certificate; it reaches kubelets at
//! their `InternalIP` with a client certificate of its own and checks their
//! serving certificates against the cluster CA. Nodes come from
//! [`crate::node`] (a real kubelet, containerd and runc) and
//! [`crate::kwok`] (simulated nodes).
//!
//! Everything lives under [`Options::dir`]: `pki/` (certificates and
//! keys), `etcd/` (data), `logs/<binary>.log` (each child's stdout and
//! stderr) and `kubeconfig` (cluster-admin, `CN=tripod-admin,
//! O=system:masters`). Children are started through [`spawn_supervised`],
//! so they are killed when the test process dies, even without
//! [`ControlPlane::stop`].

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::certs::{self, ADMIN_USER, CONTROLLER_USER, Pki};
use crate::process::{spawn_supervised, supervised_command};

/// Kubernetes version of the binaries `testenv/build.sh` builds (the
/// control plane and the kubelet).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// The Service range (nothing serves it: no kube-proxy runs). Blackholed
/// on the host while a node runs, see [`crate::node`].
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// How long kube-apiserver may take to report `/readyz` OK.
const APISERVER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long etcd, kube-controller-manager and kube-scheduler may take to
/// report healthy.
const COMPONENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`ControlPlane::stop`] waits after `SIGTERM` before `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a component's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

use crate::Error;

/// Where the control plane keeps its state and finds its binaries.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directory: `pki/`, `etcd/`, `logs/`, `kubeconfig`. Created if
    /// missing; its `etcd/` is wiped on every start. Relative paths are made
    /// absolute against the current directory.
    pub dir: PathBuf,
    /// Directory holding `etcd`, `kube-apiserver`,
    /// `kube-controller-manager`, `kube-scheduler` and `kubectl`, as
    /// returned by [`ensure_binaries`].
    pub bin_dir: PathBuf,
    /// Pods reach the API server here (the node address on the harness's
    /// bridge, which must exist): kube-apiserver listens and advertises on
    /// it, so the `kubernetes` Service gets this endpoint, ServiceAccount
    /// admission mounts tokens, and kube-controller-manager also runs the
    /// workload controllers (Deployment, ReplicaSet, DaemonSet), the
    /// EndpointSlice, disruption (PodDisruptionBudget) and root-CA
    /// publisher controllers. `None`: loopback only, no Pods expected.
    pub pod_address: Option<std::net::Ipv4Addr>,
    /// Write an audit log (`logs/audit.log`, JSON lines, stage
    /// `ResponseComplete`, level Metadata) of every request made as the
    /// controller's user ([`ControlPlane::controller_kubeconfig`]): what
    /// the benchmarks count the controller's API requests by.
    /// `apiserver_request_total` has no user label.
    pub audit: bool,
    /// kube-scheduler's client QPS and burst (`--kube-api-qps`,
    /// `--kube-api-burst`; its defaults, 50 and 100, cap how fast Pods are
    /// bound). `None`: the defaults.
    pub scheduler_qps: Option<u32>,
}

/// The audit policy of [`Options::audit`].
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted, Panic]
rules:
- level: Metadata
  users: [tripod-controller]
- level: None
";

/// Builds the control-plane binaries if needed by running
/// `bash <repo_root>/testenv/build.sh` and returns their directory (the
/// script's trimmed stdout). The script's stderr is passed through so that
/// build progress shows; a cached build returns at once.
pub fn ensure_binaries(repo_root: &Path) -> Result<PathBuf, Error> {
    let dir = crate::scripts::script(repo_root, "build.sh", &[])?;
    let dir = dir.trim();
    if dir.is_empty() {
        return Err(Error::Script(
            "testenv/build.sh printed no directory".into(),
        ));
    }
    Ok(PathBuf::from(dir))
}

/// GET `/<path>` of a component; Ok when it answers 2xx.
async fn get_ok(client: kube::Client, path: &str) -> Result<(), String> {
    let request = kube::core::Request::new("")
        .get(path, &Default::default())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// One running child process.
#[derive(Debug)]
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    args: Vec<String>,
}

/// A running etcd + kube-apiserver + kube-controller-manager +
/// kube-scheduler. See the [module docs](self).
///
/// Stop it with [`ControlPlane::stop`]; dropping it kills the children
/// (`SIGKILL`) as a fallback.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    api_host: std::net::Ipv4Addr,
    api_port: u16,
    etcd_url: String,
    pki: Pki,
    /// In start order.
    components: Vec<Component>,
}

/// Loopback ports for the control plane, all free at the time of asking.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

impl ControlPlane {
    /// Generates certificates, starts etcd, kube-apiserver,
    /// kube-controller-manager and kube-scheduler, and returns once each of
    /// them reports healthy (kube-apiserver: `/readyz`).
    ///
    /// On error every child started so far is killed, and the error names
    /// the component at fault and quotes the end of its log.
    pub async fn start(opts: Options) -> Result<ControlPlane, Error> {
        let started = Instant::now();
        let dir = std::path::absolute(&opts.dir)
            .map_err(|e| Error::io(format!("resolve {}", opts.dir.display()), e))?;
        let bin_dir = std::path::absolute(&opts.bin_dir)
            .map_err(|e| Error::io(format!("resolve {}", opts.bin_dir.display()), e))?;
        let etcd_dir = dir.join("etcd");
        match fs::remove_dir_all(&etcd_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", etcd_dir.display()), e)),
        }
        for sub in ["logs", "etcd"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        }
        fs::set_permissions(
            &etcd_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| Error::io(format!("chmod {}", etcd_dir.display()), e))?;
        let pki = certs::generate(&dir.join("pki"))?;
        let ports = free_ports()?;
        let kubeconfig = dir.join("kubeconfig");
        let api_host = opts.pod_address.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        let server = format!("https://{api_host}:{}", ports.apiserver);
        write_kubeconfig(
            &kubeconfig,
            &server,
            &pki,
            (ADMIN_USER, &pki.admin_cert, &pki.admin_key),
        )?;
        write_kubeconfig(
            &dir.join("controller.kubeconfig"),
            &server,
            &pki,
            (CONTROLLER_USER, &pki.controller_cert, &pki.controller_key),
        )?;

        let mut cp = ControlPlane {
            dir,
            bin_dir,
            kubeconfig,
            api_host,
            api_port: ports.apiserver,
            etcd_url: format!("http://127.0.0.1:{}", ports.etcd_client),
            pki: pki.clone(),
            components: Vec::new(),
        };
        // From here on an early return drops `cp`, which kills the children.

        let etcd_url = cp.etcd_url.clone();
        let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
        cp.spawn(
            "etcd",
            vec![
                format!("--data-dir={}", etcd_dir.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let etcd_port = ports.etcd_client;
        cp.wait_ready(0, COMPONENT_TIMEOUT, || etcd_health(etcd_port))
            .await?;
        tracing::debug!(elapsed = ?started.elapsed(), "etcd healthy");

        let api_url = cp.api_url();
        let p = |path: &Path| path.display().to_string();
        let mut apiserver_args = if opts.pod_address.is_some() {
            // Pods reach the `kubernetes` Service (the lease endpoint
            // reconciler writes its endpoint) and get ServiceAccount tokens.
            vec!["--disable-admission-plugins=TaintNodesByCondition".to_string()]
        } else {
            // The endpoint reconciler rejects loopback advertise addresses;
            // no Pod runs to reach the Service, nor needs a token.
            vec![
                "--endpoint-reconciler-type=none".to_string(),
                "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition".to_string(),
            ]
        };
        apiserver_args.extend([
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={api_host}"),
            format!("--advertise-address={api_host}"),
            format!("--secure-port={}", ports.apiserver),
            format!(
                "--cert-dir={}",
                cp.dir.join("pki").join("apiserver").display()
            ),
            format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
            format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            // kubectl logs/exec: dial kubelets at their node IP (no
            // /etc/hosts entry), as a client the kubelet authenticates,
            // and check their serving certificates.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!(
                "--kubelet-client-certificate={}",
                p(&pki.kubelet_client_cert)
            ),
            format!("--kubelet-client-key={}", p(&pki.kubelet_client_key)),
            format!("--kubelet-certificate-authority={}", p(&pki.ca_cert)),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            format!("--service-account-issuer={api_url}"),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        ]);
        if opts.audit {
            let policy = cp.dir.join("audit-policy.yaml");
            fs::write(&policy, AUDIT_POLICY)
                .map_err(|e| Error::io(format!("write {}", policy.display()), e))?;
            apiserver_args.extend([
                format!("--audit-policy-file={}", p(&policy)),
                format!("--audit-log-path={}", p(&cp.audit_log())),
                "--audit-log-format=json".into(),
                "--audit-log-mode=blocking".into(),
                "--audit-log-maxsize=0".into(),
            ]);
        }
        cp.spawn("kube-apiserver", apiserver_args)?;
        let client = cp.client().await?;
        cp.wait_ready(1, APISERVER_TIMEOUT, || get_ok(client.clone(), "readyz"))
            .await?;
        tracing::debug!(elapsed = ?started.elapsed(), "kube-apiserver ready");

        // What kube-controller-manager and kube-scheduler share: the admin
        // kubeconfig, no leader election, loopback secure serving.
        let kc = p(&cp.kubeconfig);
        let component_args = |name: &str, port: u16| -> Vec<String> {
            vec![
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", cp.dir.join("pki").join(name).display()),
                // Authenticate client certificates against our CA directly
                // instead of reading kube-system/extension-apiserver-
                // authentication, which lacks the request-header CA here
                // and makes the lookup log errors every few seconds.
                "--authentication-skip-lookup=true".into(),
                format!("--client-ca-file={}", p(&pki.ca_cert)),
            ]
        };
        let mut kcm_args = component_args("kube-controller-manager", ports.controller_manager);
        let controllers = if opts.pod_address.is_some() {
            "garbage-collector-controller,namespace-controller,serviceaccount-controller,\
             deployment-controller,replicaset-controller,daemonset-controller,\
             endpointslice-controller,disruption-controller,\
             root-ca-certificate-publisher-controller"
        } else {
            "garbage-collector-controller,namespace-controller,serviceaccount-controller"
        };
        kcm_args.extend([
            format!("--controllers={controllers}"),
            "--use-service-account-credentials=false".into(),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
        ]);
        let mut sched_args = component_args("kube-scheduler", ports.scheduler);
        if let Some(qps) = opts.scheduler_qps {
            sched_args.extend([
                format!("--kube-api-qps={qps}"),
                format!("--kube-api-burst={}", qps.saturating_mul(2)),
            ]);
        }
        cp.spawn("kube-controller-manager", kcm_args)?;
        cp.spawn("kube-scheduler", sched_args)?;
        for (index, port) in [(2, ports.controller_manager), (3, ports.scheduler)] {
            let probe = insecure_client(port)?;
            cp.wait_ready(index, COMPONENT_TIMEOUT, || {
                get_ok(probe.clone(), "healthz")
            })
            .await?;
        }
        tracing::info!(
            elapsed = ?started.elapsed(),
            api = %cp.api_url(),
            dir = %cp.dir.display(),
            "testenv control plane ready"
        );
        Ok(cp)
    }

    /// The admin kubeconfig (client certificate `CN=tripod-admin,
    /// O=system:masters`; server `https://127.0.0.1:<port>`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The controller's kubeconfig: client certificate
    /// `CN=tripod-controller, O=system:masters`, so that the audit log
    /// tells its requests apart.
    pub fn controller_kubeconfig(&self) -> PathBuf {
        self.dir.join("controller.kubeconfig")
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`, no TLS).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The audit log of [`Options::audit`].
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs").join("audit.log")
    }

    /// The `kubectl` binary matching the control plane. Use it with
    /// `--kubeconfig` [`ControlPlane::kubeconfig`].
    pub fn kubectl(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    /// The certificates and keys (the CA signs the node's certificates).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The directory holding the control-plane binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The state directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file of a component (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`, `kube-scheduler`).
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// The API server's URL, `https://<127.0.0.1 or the Pod address>:<port>`.
    pub fn api_url(&self) -> String {
        format!("https://{}:{}", self.api_host, self.api_port)
    }

    /// A cluster-admin client built from [`ControlPlane::kubeconfig`].
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let kubeconfig_error = |source| Error::Kubeconfig {
            path: self.kubeconfig.clone(),
            source,
        };
        let kc = Kubeconfig::read_from(&self.kubeconfig).map_err(kubeconfig_error)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(kubeconfig_error)?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Process ids of the running children, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.components.iter().map(|c| c.child.id()).collect()
    }

    /// Stops the children in reverse start order: `SIGTERM` (through the
    /// `kill` command), up to 10 s to exit, then `SIGKILL`. Idempotent.
    pub async fn stop(&mut self) {
        while let Some(mut component) = self.components.pop() {
            terminate(&mut component).await;
        }
    }

    /// Stops one component (e.g. `kube-controller-manager` before the
    /// node's Pods are deleted, so that no workload controller recreates
    /// them); [`ControlPlane::restart_exited`] no longer restarts it.
    pub async fn stop_component(&mut self, name: &str) {
        if let Some(i) = self.components.iter().position(|c| c.name == name) {
            let mut component = self.components.remove(i);
            terminate(&mut component).await;
        }
    }

    fn spawn(&mut self, name: &'static str, args: Vec<String>) -> Result<(), Error> {
        let child = self.start_process(name, &args, false)?;
        let log = self.log_file(name);
        self.components.push(Component {
            name,
            child,
            log,
            args,
        });
        Ok(())
    }

    /// Starts any component whose process has exited again, with the same
    /// arguments (as a service manager would); returns the names restarted.
    /// A fault test kills kube-apiserver or etcd and watches what follows.
    pub fn restart_exited(&mut self) -> Vec<&'static str> {
        let mut restarted = Vec::new();
        for i in 0..self.components.len() {
            let (name, args) = {
                let c = &mut self.components[i];
                if !matches!(c.child.try_wait(), Ok(Some(_))) {
                    continue;
                }
                (c.name, c.args.clone())
            };
            match self.start_process(name, &args, true) {
                Ok(child) => {
                    tracing::warn!(name, pid = child.id(), "restarted an exited component");
                    self.components[i].child = child;
                    restarted.push(name);
                }
                Err(e) => tracing::error!(name, error = %e, "could not restart"),
            }
        }
        restarted
    }

    fn start_process(
        &self,
        name: &'static str,
        args: &[String],
        append: bool,
    ) -> Result<Child, Error> {
        let binary = self.bin_dir.join(name);
        let log = self.log_file(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let file2 = file
            .try_clone()
            .map_err(|e| Error::io(format!("dup {}", log.display()), e))?;
        let mut cmd = supervised_command(&binary);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        let child = spawn_supervised(cmd).map_err(|source| Error::Spawn {
            name,
            binary: binary.clone(),
            source,
        })?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(child)
    }

    /// Polls `probe` until it succeeds, the component exits, or `timeout`.
    async fn wait_ready<F, Fut>(
        &mut self,
        index: usize,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let started = Instant::now();
        let Some(component) = self.components.get_mut(index) else {
            return Err(Error::io(
                "wait for a component",
                io::Error::other(format!("no component #{index}")),
            ));
        };
        loop {
            match component.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(Error::Exited {
                        name: component.name,
                        status,
                        log_tail: log_tail(&component.log),
                        log: component.log.clone(),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(Error::io(format!("wait for {}", component.name), e)),
            }
            let last_probe = match tokio::time::timeout(Duration::from_secs(5), probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => "probe timed out after 5s".to_string(),
            };
            if started.elapsed() >= timeout {
                return Err(Error::NotReady {
                    name: component.name,
                    waited: timeout,
                    last_probe,
                    log_tail: log_tail(&component.log),
                    log: component.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControlPlane {
    /// Best effort: `SIGKILL` every child still running and reap it.
    fn drop(&mut self) {
        while let Some(mut component) = self.components.pop() {
            if let Ok(None) = component.child.try_wait() {
                let _ = component.child.kill();
                let _ = component.child.wait();
            }
        }
    }
}

/// `SIGTERM`, wait up to [`STOP_GRACE`], then `SIGKILL`.
async fn terminate(component: &mut Component) {
    let child = &mut component.child;
    if !matches!(child.try_wait(), Ok(None)) {
        return; // Exited (and reaped) already, or cannot be waited on.
    }
    // The child is not reaped yet, so its pid cannot have been reused.
    let pid = child.id().to_string();
    let term = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if term.is_ok_and(|s| s.success()) {
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Some(_)) | Err(_) => return,
            }
        }
        tracing::warn!(name = component.name, "no exit 10s after SIGTERM; killing");
    }
    let _ = child.kill();
    for _ in 0..100 {
        match child.try_wait() {
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Some(_)) | Err(_) => return,
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("bind a free loopback port", e))
}

/// Distinct loopback ports that were free a moment ago: bind port 0 and
/// read what the kernel chose, holding all listeners until each is chosen.
fn free_ports() -> Result<Ports, Error> {
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..5 {
        let l = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| Error::io("bind a free loopback port", e))?;
        let port = l
            .local_addr()
            .map_err(|e| Error::io("read a free loopback port", e))?
            .port();
        listeners.push(l);
        ports.push(port);
    }
    Ok(Ports {
        etcd_client: ports[0],
        etcd_peer: ports[1],
        apiserver: ports[2],
        controller_manager: ports[3],
        scheduler: ports[4],
    })
}

/// Writes the admin kubeconfig, referring to the PKI files by path.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    pki: &Pki,
    (user, cert, key): (&str, &Path, &Path),
) -> Result<(), Error> {
    // JSON strings are YAML strings: this quotes any path safely.
    let q = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tripod-testenv
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: tripod-testenv
  context:
    cluster: tripod-testenv
    user: {user}
    namespace: default
current-context: tripod-testenv
",
        ca = q(&pki.ca_cert),
        cert = q(cert),
        key = q(key),
    );
    fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

/// A client for a component's own HTTPS port (self-signed, anonymous).
fn insecure_client(port: u16) -> Result<kube::Client, Error> {
    let url = format!("https://127.0.0.1:{port}");
    let uri = url.parse().map_err(|e| {
        Error::io(
            format!("parse {url}"),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    let mut config = kube::Config::new(uri);
    config.accept_invalid_certs = true;
    Ok(kube::Client::try_from(config)?)
}

/// `GET /health` on etcd's client port with a hand-written HTTP/1.0 request.
async fn etcd_health(port: u16) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let status_ok = response
        .lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    if status_ok && response.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(format!("unhealthy: {}", response.trim()))
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports().unwrap();
        let mut all = vec![
            p.etcd_client,
            p.etcd_peer,
            p.apiserver,
            p.controller_manager,
            p.scheduler,
        ];
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5);
    }

    #[tokio::test]
    async fn missing_binary_is_reported_with_its_name() {
        let dir = std::env::temp_dir().join(format!("tripod-nobin-{}", std::process::id()));
        let err = ControlPlane::start(Options {
            dir: dir.clone(),
            bin_dir: PathBuf::from("/nonexistent/tripod-bin"),
            pod_address: None,
            audit: false,
            scheduler_qps: None,
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                Error::Spawn { name: "etcd", .. } | Error::Exited { name: "etcd", .. }
            ),
            "{text}"
        );
        assert!(text.contains("etcd"), "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let path = std::env::temp_dir().join(format!("tripod-tail-{}.log", std::process::id()));
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.starts_with("line 11\n"), "{tail}");
        assert!(tail.ends_with("line 30"), "{tail}");
        fs::remove_file(&path).unwrap();
    }
}
