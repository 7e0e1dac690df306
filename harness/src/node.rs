//! A real Linux node on this machine: the kubelet (built from the same
//! Kubernetes modules as the control plane), containerd v2 and its runc shim,
//! runc, and Debian's CNI plugins on a bridge of the harness's own.
//!
//! # Network
//!
//! The node's address is the gateway of its Pod bridge, [`NODE_IP`] on
//! [`BRIDGE`]: Pods reach the host there (the registry, git servers and the
//! executor service listen on it), and the API server reaches the kubelet
//! there. No packet of a Pod leaves the bridge except to the host: an
//! iptables rule drops forwarded Pod traffic, the bridge does no
//! masquerading, Pods get no DNS servers, and every range the harness uses
//! ([`BLACKHOLES`]) is a `blackhole` route on the host while the node runs,
//! so a packet to an address nothing has programmed is dropped here.
//!
//! # Leaving the machine as found
//!
//! One node runs per machine (an exclusive lock in [`RUN_DIR`]). Before it
//! changes anything, [`Host::prepare`] records the host's state in
//! `RUN_DIR/host.json`: the sysctls the kubelet changes, and `iptables-save`
//! / `ip6tables-save` snapshots. [`Host::teardown`] kills what the node
//! started (kubelet, containerd, shims, container processes), removes its
//! cgroups, mounts, network namespaces, bridge and routes, restores the
//! iptables snapshots and the sysctls, and removes the directories the
//! kubelet creates outside its root. A start that finds `host.json` (a run
//! that was killed) runs that teardown first.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::certs::Pki;
use crate::process::{spawn_supervised, supervised_command};

/// The real node's name.
pub const NODE_NAME: &str = "tripod-linux-amd64";

/// The MAC address of [`BRIDGE`] (locally administered, fixed).
const BRIDGE_MAC: &str = "02:74:72:69:70:01";
/// The node's address: the gateway of the Pod bridge.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The Pod network of the real node.
pub const POD_CIDR: &str = "10.88.0.0/24";
/// The Linux bridge of the Pod network.
pub const BRIDGE: &str = "tripod0";
/// Ranges dropped on the host while the node runs: the Pod networks, the
/// Service range, kwok's simulated Pod and node addresses.
pub const BLACKHOLES: [&str; 3] = [
    "10.88.0.0/16",
    crate::controlplane::SERVICE_CIDR,
    "10.99.0.0/16",
];
/// Runtime state of the node: sockets, runc's state, shim sockets, network
/// namespaces, the lock and the record of the host's state.
pub const RUN_DIR: &str = "/run/tripod-node";
/// The Localhost seccomp profile of buildd containers, relative to the
/// kubelet's seccomp directory (`<root-dir>/seccomp`).
pub const BUILDD_SECCOMP_PROFILE: &str = "tripod/buildd.json";

/// Comment on the harness's own iptables rule.
const EGRESS_RULE_COMMENT: &str = "tripod-no-pod-egress";
/// sysctls the kubelet sets at start (with `protectKernelDefaults: false`)
/// and the Pod bridge turns on; restored once the kubelet is up and at
/// teardown.
const SYSCTLS: [&str; 9] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/ip_forward",
    // kube-proxy's: Pod → ClusterIP → Pod on one bridge, NodePorts on
    // loopback (configured off).
    "net/bridge/bridge-nf-call-iptables",
    "net/ipv4/conf/all/route_localnet",
];
/// sysctls the node needs while it runs, as a Kubernetes node has them:
/// Service traffic from a Pod is routed by the host (DNAT to another Pod
/// on the same bridge), and bridged packets pass iptables (kube-proxy).
/// Set at start, restored only at teardown.
const NODE_SYSCTLS: [&str; 2] = ["net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"];
/// Directories the kubelet and libcni write outside their roots.
const OUTSIDE_DIRS: [&str; 4] = [
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/lib/cni",
];
/// How long a start waits for another node on this machine to stop.
const LOCK_WAIT: Duration = Duration::from_secs(300);
/// How long the node may take to report Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long Pods may take to go away when the node stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`Host::prepare`] recorded about the host.
#[derive(Debug, Serialize, Deserialize)]
struct HostRecord {
    /// The node's data directory (mounts under it are removed).
    data_dir: PathBuf,
    /// Values of [`SYSCTLS`] before the node started.
    sysctls: BTreeMap<String, String>,
    /// Whether each of [`OUTSIDE_DIRS`] existed before.
    outside_dirs: BTreeMap<String, bool>,
    /// Whether bridge netfilter (`br_netfilter`) was loaded before; the
    /// teardown unloads it otherwise.
    #[serde(default = "loaded")]
    bridge_netfilter: bool,
}

fn loaded() -> bool {
    true
}

/// The host side of a real node: the lock, the recorded host state, the
/// bridge, routes and egress rule. Teardown undoes all of it.
#[derive(Debug)]
pub struct Host {
    /// Held for the node's lifetime (released by the kernel if we die).
    _lock: fs::File,
    record: HostRecord,
    torn_down: bool,
}

fn run_dir() -> PathBuf {
    PathBuf::from(RUN_DIR)
}

fn record_path() -> PathBuf {
    run_dir().join("host.json")
}

/// Runs a host command; Err names it with its stderr.
fn sh(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {program} (is it installed?)"), e))?;
    if !out.status.success() {
        return Err(Error::Node(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a host command whose failure is fine (cleanup of what may be gone).
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name)
}

impl Host {
    /// Takes the machine's node lock, cleans up after a killed earlier run,
    /// records the host's state and sets up the bridge (with [`NODE_IP`]),
    /// the blackhole routes and the Pod egress rule.
    pub fn prepare(data_dir: &Path) -> Result<Host, Error> {
        if !sh("id", &["-u"])?.trim().eq("0") {
            return Err(Error::Node(
                "a real node needs root (containerd, the kubelet, a bridge and iptables)".into(),
            ));
        }
        for tool in ["ip", "iptables-save", "iptables-restore", "umount"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                return Err(Error::Node(format!(
                    "{tool} is missing (apt-get install iproute2 iptables mount)"
                )));
            }
        }
        if !Path::new("/usr/lib/cni/bridge").exists() {
            return Err(Error::Node(
                "the CNI plugins are missing (apt-get install containernetworking-plugins)".into(),
            ));
        }
        fs::create_dir_all(run_dir()).map_err(|e| Error::io(format!("create {RUN_DIR}"), e))?;
        let lock_path = run_dir().join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
        // One that is stopping (a test binary that just ended) gets time to
        // put the host back.
        let until = Instant::now() + LOCK_WAIT;
        let mut told = false;
        while lock.try_lock().is_err() {
            let owner = fs::read_to_string(run_dir().join("owner")).unwrap_or_default();
            if Instant::now() > until {
                return Err(Error::Node(format!(
                    "another Tripod node runs on this machine ({}); stop it first (tripod dev down)",
                    owner.trim()
                )));
            }
            if !told {
                tracing::info!(
                    "waiting up to {}s for another Tripod node to stop ({})",
                    LOCK_WAIT.as_secs(),
                    owner.trim()
                );
                told = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // A run that was killed left its record: undo what it did.
        if let Ok(text) = fs::read_to_string(record_path()) {
            match serde_json::from_str::<HostRecord>(&text) {
                Ok(old) => {
                    tracing::warn!(dir = %old.data_dir.display(), "cleaning up after a node that was not stopped");
                    teardown(&old);
                }
                Err(e) => {
                    return Err(Error::Node(format!(
                        "{} is unreadable ({e}): the host may still hold an earlier node's changes; undo them by hand, then delete it",
                        record_path().display()
                    )));
                }
            }
        }
        // Another kubelet on this machine (its Pods live in the same
        // `kubepods` cgroups, which the teardown empties): refuse.
        if let Some(why) = other_kubelet() {
            return Err(Error::Node(format!(
                "this machine runs another kubelet ({why}); a Tripod node needs a machine without one"
            )));
        }
        // Leftovers of a run that died before it recorded anything.
        sh_quiet("ip", &["link", "del", BRIDGE]);

        let mut sysctls = BTreeMap::new();
        for name in SYSCTLS {
            if let Ok(v) = fs::read_to_string(sysctl_path(name)) {
                sysctls.insert(name.to_string(), v.trim().to_string());
            }
        }
        let outside_dirs = OUTSIDE_DIRS
            .iter()
            .map(|d| (d.to_string(), Path::new(d).exists()))
            .collect();
        let record = HostRecord {
            data_dir: data_dir.to_path_buf(),
            sysctls,
            outside_dirs,
            bridge_netfilter: Path::new("/proc/sys/net/bridge").exists(),
        };
        for (cmd, file) in [
            ("iptables-save", "iptables"),
            ("ip6tables-save", "ip6tables"),
        ] {
            if let Ok(out) = sh(cmd, &[]) {
                let path = run_dir().join(file);
                fs::write(&path, out)
                    .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
            }
        }
        let json = serde_json::to_string_pretty(&record).map_err(|e| Error::Node(e.to_string()))?;
        // Written whole or not at all: a torn record would make the next
        // start take the half-changed host for the original.
        let tmp = run_dir().join("host.json.tmp");
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, record_path()))
            .map_err(|e| Error::io(format!("write {}", record_path().display()), e))?;
        let _ = fs::write(
            run_dir().join("owner"),
            format!("pid {}, {}", std::process::id(), data_dir.display()),
        );
        let host = Host {
            _lock: lock,
            record,
            torn_down: false,
        };
        // From here on an error drops `host`, which tears down.
        for range in BLACKHOLES {
            sh_quiet("ip", &["route", "del", "blackhole", range]);
            sh("ip", &["route", "add", "blackhole", range])?;
        }
        let gateway = format!("{NODE_IP}/24");
        // A fixed MAC: a bridge without one takes the lowest of its ports'
        // and changes it as Pods come and go, without a gratuitous ARP, so
        // Pods that resolved the node address before reach nobody until
        // their ARP entry expires (the CNI plugin fixes the MAC only when it
        // adds the address itself, and here the address comes first).
        sh(
            "ip",
            &[
                "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
            ],
        )?;
        sh("ip", &["addr", "add", &gateway, "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        // br_netfilter provides the bridge sysctl (the CNI bridge plugin
        // would load it later); the egress rule below keeps forwarding
        // inside the Pod network.
        sh_quiet("modprobe", &["br_netfilter"]);
        for name in NODE_SYSCTLS {
            if let Err(e) = fs::write(sysctl_path(name), "1") {
                tracing::warn!("set {name}: {e} (Services between Pods may not route)");
            }
        }
        sh(
            "iptables",
            &[
                "-I",
                "FORWARD",
                "-s",
                "10.88.0.0/16",
                "!",
                "-d",
                "10.88.0.0/16",
                "-m",
                "comment",
                "--comment",
                EGRESS_RULE_COMMENT,
                "-j",
                "DROP",
            ],
        )?;
        Ok(host)
    }

    /// Restores the sysctls recorded before the node started (the kubelet
    /// changes some at start), except those the node needs while it runs
    /// ([`NODE_SYSCTLS`]), which the teardown restores.
    pub fn restore_sysctls(&self) {
        restore_sysctls(&self.record, &NODE_SYSCTLS);
    }

    /// Undoes everything the node did to the host. Idempotent.
    pub fn teardown(&mut self) {
        if !self.torn_down {
            teardown(&self.record);
            self.torn_down = true;
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Cleans up after a node whose harness was killed: returns whether there
/// was anything to clean. Waits (bounded) for a node that is stopping; errs
/// when one still runs.
pub fn cleanup_stale() -> Result<bool, Error> {
    if !record_path().exists() {
        return Ok(false);
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir().join("lock"))
        .map_err(|e| Error::io(format!("open {RUN_DIR}/lock"), e))?;
    let until = Instant::now() + Duration::from_secs(60);
    while lock.try_lock().is_err() {
        if Instant::now() > until {
            let owner = fs::read_to_string(run_dir().join("owner")).unwrap_or_default();
            return Err(Error::Node(format!(
                "a Tripod node still runs on this machine ({})",
                owner.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Under the lock: the stopping node may have cleaned up meanwhile.
    let Ok(text) = fs::read_to_string(record_path()) else {
        return Ok(false);
    };
    let record: HostRecord = serde_json::from_str(&text)
        .map_err(|e| Error::Node(format!("{}: {e}", record_path().display())))?;
    teardown(&record);
    Ok(true)
}

/// Signs of a kubelet that is not ours: its ports in use, or `kubepods`
/// cgroups while no node of ours runs (checked under the lock, after our
/// own leftovers were cleaned).
fn other_kubelet() -> Option<String> {
    for port in [10248u16, 10250] {
        if std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(300),
        )
        .is_ok()
        {
            return Some(format!("something listens on 127.0.0.1:{port}"));
        }
    }
    kubepods_cgroups()
        .first()
        .map(|cg| format!("{} exists", cg.display()))
}

/// Removes what the kubelet and the CNI plugins added to one iptables
/// family since `snapshot` (an `iptables-save` of before): new rules that
/// are the harness's own (its comment) or belong to or jump to `KUBE-*` /
/// `CNI-*` chains, then those chains. Rules others added meanwhile stay.
fn restore_iptables(save: &str, restore: &str, snapshot: &str) -> Result<(), String> {
    let current = Command::new(save)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{save}: {e}"))?;
    let current = String::from_utf8_lossy(&current.stdout).into_owned();
    let tables = |text: &str| -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if !table.is_empty() && (line.starts_with("-A ") || line.starts_with(':')) {
                out.entry(table.clone()).or_default().push(line.to_string());
            }
        }
        out
    };
    let before = tables(snapshot);
    let ours = |line: &str| {
        line.contains("KUBE-") || line.contains("CNI-") || line.contains(EGRESS_RULE_COMMENT)
    };
    let mut script = String::new();
    for (table, lines) in tables(&current) {
        let old = before.get(&table).cloned().unwrap_or_default();
        let mut body = String::new();
        for line in lines.iter().filter(|l| l.starts_with("-A ") && ours(l)) {
            if !old.contains(line) {
                body.push_str(&format!("-D {}\n", &line[3..]));
            }
        }
        // Every new chain is flushed before any is deleted: kube-proxy's
        // chains jump to each other, and a chain still referenced cannot
        // go (which would fail the whole table's COMMIT).
        let new_chains: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with(':'))
            .map(|l| l[1..].split_whitespace().next().unwrap_or_default())
            .filter(|chain| {
                let existed = old.iter().any(|o| o.starts_with(&format!(":{chain} ")));
                !existed && (chain.starts_with("KUBE-") || chain.starts_with("CNI-"))
            })
            .collect();
        for chain in &new_chains {
            body.push_str(&format!("-F {chain}\n"));
        }
        for chain in &new_chains {
            body.push_str(&format!("-X {chain}\n"));
        }
        if !body.is_empty() {
            script.push_str(&format!("*{table}\n{body}COMMIT\n"));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{restore}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("{restore}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{restore}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{restore} --noflush: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn restore_sysctls(record: &HostRecord, keep: &[&str]) {
    for (name, value) in &record.sysctls {
        if keep.contains(&name.as_str()) {
            continue;
        }
        let path = sysctl_path(name);
        if fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = fs::write(&path, value)
        {
            tracing::warn!("restore {}: {e}", path.display());
        }
    }
}

/// Whether one command-line argument names `dir` or a path under it
/// (`/dir`, `/dir/x`, `--flag=/dir/x`), not merely contains its text.
fn arg_names(arg: &str, dir: &str) -> bool {
    let value = arg.split_once('=').map_or(arg, |(_, v)| v);
    [arg, value]
        .iter()
        .any(|a| *a == dir || a.starts_with(&format!("{dir}/")))
}

/// Pids of processes with an argument naming `dir` (see [`arg_names`]),
/// this process and its ancestors excepted.
fn pids_naming(dir: &str) -> Vec<u32> {
    let mut spared = vec![std::process::id()];
    let mut pid = std::process::id();
    while let Some(parent) = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            after.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        .filter(|p| *p > 1)
    {
        spared.push(parent);
        pid = parent;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !spared.contains(pid))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .any(|arg| arg_names(arg, dir))
            })
        })
        .collect()
}

/// Every cgroup directory under `kubepods` in each mounted hierarchy,
/// deepest first.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    let mut roots: Vec<PathBuf> = hierarchies
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("kubepods"))
        .collect();
    roots.push(PathBuf::from("/sys/fs/cgroup/kubepods"));
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
            out.push(dir.to_path_buf());
        }
    }
    for root in roots {
        if root.is_dir() {
            walk(&root, &mut out);
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn kill(pids: &[u32]) {
    for pid in pids {
        sh_quiet("kill", &["-KILL", &pid.to_string()]);
    }
}

/// Mount points under `prefix`, deepest first.
fn mounts_under(prefix: &Path) -> Vec<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = prefix.display().to_string();
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points.dedup();
    points
}

/// Undoes what a node did to the host (see the module docs).
fn teardown(record: &HostRecord) {
    let data = record.data_dir.display().to_string();
    // Processes: everything started with our paths (kubelet, containerd,
    // shims, kwok), then whatever runs in the Pods' cgroups.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pids = pids_naming(RUN_DIR);
        pids.extend(pids_naming(&data));
        for cg in kubepods_cgroups() {
            if let Ok(procs) = fs::read_to_string(cg.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                tracing::warn!(?pids, "processes of the node survived SIGKILL");
            }
            break;
        }
        kill(&pids);
        std::thread::sleep(Duration::from_millis(200));
    }
    for cg in kubepods_cgroups() {
        let _ = fs::remove_dir(&cg);
    }
    // Mounts: overlay snapshots, Pod volumes, the kubelet's root bind mount,
    // network namespaces (kept under containerd's state dir).
    for root in [record.data_dir.clone(), run_dir()] {
        for point in mounts_under(&root) {
            sh_quiet("umount", &["-l", &point]);
        }
    }
    // Network: Pod veths go with their namespaces; the bridge, routes and
    // the iptables state are ours to put back.
    sh_quiet("ip", &["link", "del", BRIDGE]);
    for range in BLACKHOLES {
        sh_quiet("ip", &["route", "del", "blackhole", range]);
    }
    for (file, save, restore) in [
        ("iptables", "iptables-save", "iptables-restore"),
        ("ip6tables", "ip6tables-save", "ip6tables-restore"),
    ] {
        let path = run_dir().join(file);
        if let Ok(snapshot) = fs::read_to_string(&path)
            && let Err(e) = restore_iptables(save, restore, &snapshot)
        {
            tracing::warn!("iptables not fully restored: {e}");
        }
    }
    restore_sysctls(record, &[]);
    if !record.bridge_netfilter {
        sh_quiet("modprobe", &["-r", "br_netfilter"]);
    }
    // Deepest first; a directory that existed before stays.
    for dir in OUTSIDE_DIRS {
        if record.outside_dirs.get(dir) == Some(&false) {
            let _ = fs::remove_dir_all(dir);
        }
    }
    for name in ["iptables", "ip6tables", "owner", "host.json"] {
        let _ = fs::remove_file(run_dir().join(name));
    }
    for sub in ["containerd", "runc", "s", "netns"] {
        let _ = fs::remove_dir_all(run_dir().join(sub));
    }
}

/// What [`RealNode::start`] needs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Data directory: containerd's root, the kubelet's root, configs, Pod logs.
    pub dir: PathBuf,
    /// Where `containerd.log` and `kubelet.log` go.
    pub log_dir: PathBuf,
    /// The directory holding `kubelet` (from `testenv/build.sh`).
    pub kubelet_bin_dir: PathBuf,
    /// The directory holding `containerd`, `containerd-shim-runc-v2` and
    /// `runc` (from `testenv/node.sh`).
    pub node_bin_dir: PathBuf,
    /// The control plane's PKI (CA, node and kubelet certificates).
    pub pki: Pki,
    /// The API server's URL.
    pub api_url: String,
    /// Registries containerd pulls from over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// The sandbox (pause) image.
    pub pause_image: String,
    /// Seccomp profiles to install: (path under the kubelet's seccomp
    /// directory, JSON).
    pub seccomp_profiles: Vec<(String, String)>,
    /// Register the node with the taint [`REAL_NODE_TAINT`]`=true:NoSchedule`
    /// (tests: only Pods that tolerate it run here).
    pub tainted: bool,
}

/// The taint key of a tainted real node (see [`NodeOptions::tainted`]).
pub const REAL_NODE_TAINT: &str = "tripod.dev/real-node";

/// How to (re)start the kubelet.
#[derive(Debug, Clone)]
struct KubeletStart {
    program: PathBuf,
    args: Vec<String>,
    path_env: String,
    log: PathBuf,
}

/// A running kubelet + containerd. Stop it with [`RealNode::stop`].
#[derive(Debug)]
pub struct RealNode {
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kubelet_start: Option<KubeletStart>,
    /// The kubelet's root directory.
    pub kubelet_root: PathBuf,
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    /// Log files of containerd and the kubelet.
    pub logs: Vec<PathBuf>,
    /// When the node started and became Ready.
    pub ready_after: Duration,
}

pub(crate) fn write(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn log_file(path: &Path) -> Result<(fs::File, fs::File), Error> {
    let f =
        fs::File::create(path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    let g = f.try_clone().map_err(|e| Error::io("dup log", e))?;
    Ok((f, g))
}

/// The last lines of a log file, for errors.
pub(crate) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl RealNode {
    /// Writes the configurations, starts containerd and the kubelet, and
    /// returns once the Node reports Ready. `host` must be prepared.
    pub async fn start(
        opts: &NodeOptions,
        _host: &Host,
        client: &kube::Client,
    ) -> Result<RealNode, Error> {
        let started = Instant::now();
        let dir = &opts.dir;
        let run = run_dir();
        let d = |p: &str| dir.join(p);
        let r = |p: &str| run.join(p);
        let s = |p: &Path| p.display().to_string();
        for p in [
            d("logs"),
            d("kubelet"),
            d("containerd"),
            d("cni/ipam"),
            r("containerd"),
        ] {
            fs::create_dir_all(&p).map_err(|e| Error::io(format!("create {}", p.display()), e))?;
        }

        // CNI: a bridge with our gateway, no masquerading, no DNS.
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "tripod",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP.to_string()}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": s(&d("cni/ipam")),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        write(&d("cni/net.d/10-tripod.conflist"), &cni.to_string())?;

        // containerd: everything under our directories; plain-HTTP registries.
        let q = |p: &Path| serde_json::Value::String(s(p)).to_string();
        let runc = opts.node_bin_dir.join("runc");
        let config = format!(
            r#"version = 3
root = {root}
state = {state}
imports = []

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  level = "info"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = {certs}

  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    # Root here lacks CAP_SYS_RESOURCE: oom_score_adj cannot go below 0.
    restrict_oom_score_adj = true
    enable_unprivileged_ports = true
    enable_unprivileged_icmp = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = {runc}
          Root = {runc_root}
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = {cni_conf}
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

  [plugins.'io.containerd.internal.v1.opt']
    path = {opt}

  [plugins.'io.containerd.nri.v1.nri']
    disable = true

  [plugins.'io.containerd.transfer.v1.local']
    config_path = {certs}

  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = {shims}
"#,
            root = q(&d("containerd/root")),
            state = q(&r("containerd/state")),
            sock = q(&r("containerd/containerd.sock")),
            ttrpc = q(&r("containerd/containerd.sock.ttrpc")),
            pause = opts.pause_image,
            certs = q(&d("containerd/certs.d")),
            runc = q(&runc),
            runc_root = q(&r("runc")),
            cni_conf = q(&d("cni/net.d")),
            opt = q(&d("containerd/opt")),
            shims = q(&r("s")),
        );
        write(&d("containerd/config.toml"), &config)?;
        for registry in &opts.insecure_registries {
            write(
                &d(&format!("containerd/certs.d/{registry}/hosts.toml")),
                &format!(
                    "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
                ),
            )?;
        }
        let socket = r("containerd/containerd.sock");
        let path_env = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            s(&opts.node_bin_dir)
        );
        let containerd_log = opts.log_dir.join("containerd.log");
        let (o, e) = log_file(&containerd_log)?;
        let mut cmd = supervised_command(opts.node_bin_dir.join("containerd"));
        cmd.arg("--config")
            .arg(d("containerd/config.toml"))
            .env("PATH", &path_env)
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e);
        let containerd = spawn_supervised(cmd).map_err(|e| Error::io("start containerd", e))?;
        let mut node = RealNode {
            containerd: Some(containerd),
            kubelet: None,
            kubelet_start: None,
            kubelet_root: d("kubelet/root"),
            containerd_socket: socket.clone(),
            logs: vec![containerd_log.clone()],
            ready_after: Duration::ZERO,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(c) = node.containerd.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(Error::Node(format!(
                    "containerd exited ({status}):\n{}",
                    tail(&containerd_log)
                )));
            }
            if Instant::now() > until {
                return Err(Error::Node(format!(
                    "containerd did not create {} within 30s:\n{}",
                    socket.display(),
                    tail(&containerd_log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The kubelet: a node identity from the cluster CA, x509 + webhook
        // authentication and authorization of the API server's requests.
        for (path, json) in &opts.seccomp_profiles {
            write(&node.kubelet_root.join("seccomp").join(path), json)?;
        }
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: tripod
  cluster:
    server: {api}
    certificate-authority: {ca}
users:
- name: {NODE_NAME}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: tripod
  context: {{cluster: tripod, user: {NODE_NAME}}}
current-context: tripod
",
            api = opts.api_url,
            ca = q(&opts.pki.ca_cert),
            cert = q(&opts.pki.node_cert),
            key = q(&opts.pki.node_key),
        );
        write(&d("kubelet/kubeconfig"), &kubeconfig)?;
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{sock}
imageServiceEndpoint: unix://{sock}
cgroupDriver: cgroupfs
# These machines run cgroup v1 (hybrid); kubelet >= 1.35 refuses it unless told.
failCgroupV1: false
failSwapOn: false
podLogsDir: {logs}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {tls_cert}
tlsPrivateKeyFile: {tls_key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: Webhook
registerNode: true
{taints}maxPods: 60
# Pods get no upstream DNS: no traffic leaves this machine.
resolvConf: \"\"
clusterDomain: cluster.local
# CoreDNS behind the kube-dns Service (crate::addons).
clusterDNS: [\"{dns}\"]
serializeImagePulls: false
nodeStatusUpdateFrequency: 10s
nodeStatusReportFrequency: 1m
syncFrequency: 10s
fileCheckFrequency: 20s
# The disk is shared: no evictions or image GC because of others' files.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%, imagefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
# The kubelet then sets some kernel sysctls at start; the harness restores them.
protectKernelDefaults: false
oomScoreAdj: 0
",
            sock = s(&socket),
            dns = crate::addons::CLUSTER_DNS_IP,
            logs = q(&d("logs/pods")),
            tls_cert = q(&opts.pki.kubelet_serving_cert),
            tls_key = q(&opts.pki.kubelet_serving_key),
            ca = q(&opts.pki.ca_cert),
            taints = if opts.tainted {
                format!("registerWithTaints: [{{key: {REAL_NODE_TAINT}, value: \"true\", effect: NoSchedule}}]\n")
            } else {
                String::new()
            },
        );
        write(&d("kubelet/config.yaml"), &config)?;
        let kubelet_log = opts.log_dir.join("kubelet.log");
        node.logs.push(kubelet_log.clone());
        node.kubelet_start = Some(KubeletStart {
            program: opts.kubelet_bin_dir.join("kubelet"),
            args: vec![
                format!("--config={}", s(&d("kubelet/config.yaml"))),
                format!("--kubeconfig={}", s(&d("kubelet/kubeconfig"))),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                format!("--root-dir={}", s(&node.kubelet_root)),
                format!("--cert-dir={}", s(&d("kubelet/pki"))),
                "--v=1".into(),
            ],
            path_env: path_env.clone(),
            log: kubelet_log.clone(),
        });
        node.kubelet = Some(node.spawn_kubelet(false)?);

        let nodes: Api<Node> = Api::all(client.clone());
        let until = Instant::now() + READY_TIMEOUT;
        let mut kubelet_healthy = false;
        loop {
            if let Some(k) = node.kubelet.as_mut()
                && let Ok(Some(status)) = k.try_wait()
            {
                return Err(Error::Node(format!(
                    "the kubelet exited ({status}):\n{}",
                    tail(&kubelet_log)
                )));
            }
            // The kubelet sets its sysctls once its runtime is up, before
            // the node turns Ready; they are put back then (and whenever a
            // restarted kubelet sets them again: `Env::keep_alive`).
            if !kubelet_healthy && http_ok(10248, "/healthz").await {
                kubelet_healthy = true;
            }
            let ready = is_ready(&nodes, NODE_NAME).await;
            if ready && kubelet_healthy {
                _host.restore_sysctls();
                break;
            }
            if Instant::now() > until {
                return Err(Error::Node(format!(
                    "node {NODE_NAME} not Ready within {}s\n--- kubelet ---\n{}\n--- containerd ---\n{}",
                    READY_TIMEOUT.as_secs(),
                    tail(&kubelet_log),
                    tail(&containerd_log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        node.ready_after = started.elapsed();
        tracing::info!(elapsed = ?node.ready_after, "real node {NODE_NAME} Ready");
        Ok(node)
    }

    fn spawn_kubelet(&self, append: bool) -> Result<Child, Error> {
        let Some(start) = &self.kubelet_start else {
            return Err(Error::Node("the kubelet was never configured".into()));
        };
        let out = fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&start.log)
            .map_err(|e| Error::io(format!("open {}", start.log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("dup log", e))?;
        let mut cmd = supervised_command(&start.program);
        cmd.args(&start.args)
            .env("PATH", &start.path_env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        spawn_supervised(cmd).map_err(|e| Error::io("start kubelet", e))
    }

    /// What a service manager does for a node's kubelet: start it again when
    /// it exited (or was killed). Returns whether it did.
    pub fn restart_kubelet_if_exited(&mut self) -> bool {
        let exited = self
            .kubelet
            .as_mut()
            .is_some_and(|k| !matches!(k.try_wait(), Ok(None)));
        if !exited {
            return false;
        }
        match self.spawn_kubelet(true) {
            Ok(child) => {
                tracing::warn!("the kubelet exited; started it again");
                self.kubelet = Some(child);
                true
            }
            Err(e) => {
                tracing::error!("the kubelet exited and could not be started again: {e}");
                false
            }
        }
    }

    /// Deletes the Pods on the node and waits (bounded) until the kubelet
    /// has stopped them, then stops the kubelet and containerd. The host
    /// teardown ([`Host::teardown`]) removes whatever is left.
    pub async fn stop(&mut self, client: &kube::Client) {
        let kubelet_runs = self
            .kubelet
            .as_mut()
            .is_some_and(|k| matches!(k.try_wait(), Ok(None)));
        if !kubelet_runs {
            // Nobody would confirm the deletions: the teardown kills what is left.
            for child in [self.kubelet.take(), self.containerd.take()]
                .into_iter()
                .flatten()
            {
                terminate(child).await;
            }
            return;
        }
        let pods: Api<Pod> = Api::all(client.clone());
        let on_node = ListParams::default().fields(&format!("spec.nodeName={NODE_NAME}"));
        if let Ok(list) = pods.list(&on_node).await {
            for pod in list.items {
                let (Some(ns), Some(name)) = (pod.metadata.namespace, pod.metadata.name) else {
                    continue;
                };
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
            let until = Instant::now() + DRAIN_TIMEOUT;
            while Instant::now() < until {
                match pods.list(&on_node).await {
                    Ok(l) if l.items.is_empty() => break,
                    Err(_) => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
        for child in [self.kubelet.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            terminate(child).await;
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        for mut child in [self.kubelet.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the Node `name` exists and reports `Ready=True`.
pub(crate) async fn is_ready(nodes: &Api<Node>, name: &str) -> bool {
    nodes.get_opt(name).await.ok().flatten().is_some_and(|n| {
        n.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// SIGTERM, up to 10 s, then SIGKILL.
async fn terminate(mut child: Child) {
    sh_quiet("kill", &["-TERM", &child.id().to_string()]);
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The kubelet's healthz on 127.0.0.1:10248.
/// GET `http://127.0.0.1:{port}{path}`: whether it answers 200.
pub(crate) async fn http_ok(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).contains(" 200 ")
}
