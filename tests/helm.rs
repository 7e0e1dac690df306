//! The Helm chart (`charts/tripod`) against a real control plane: lint,
//! server-side dry run of the rendered manifests, install, RBAC as
//! documented in `docs/security.md`, CRD upgrade and uninstall that keeps
//! CRDs and ImageBuilds. helm comes from `testenv/helm.sh`.
//!
//! No Pods run (the control plane has no workload controllers and no
//! kubelets): the Deployment's controller is started as a local process
//! with the Deployment's arguments and the chart ServiceAccount's token, so
//! that the documented permissions are proved sufficient, not only equal to
//! the table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tripod_harness::{self as testenv, ControlPlane, Options};

const NS: &str = "tripod-system";
const CONTROLLER_SA: &str = "system:serviceaccount:tripod-system:tripod";
const BUILD_SA: &str = "system:serviceaccount:tripod-system:tripod-build";
const ANNOTATION_KEEP: (&str, &str) = ("helm.sh/resource-policy", "keep");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/tripod")
}

/// What `charts/tripod/templates/crds.yaml` must contain: `tripod crds` with
/// the keep annotation on every CRD (what `charts/tripod/update-crds.sh`
/// writes).
fn expected_chart_crds() -> String {
    let mut out = String::new();
    for mut crd in tripod::api::crds() {
        crd.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_KEEP.0.into(), ANNOTATION_KEEP.1.into());
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("render CRD"));
    }
    out
}

#[test]
fn chart_crds_match_the_rust_types() {
    let path = chart_dir().join("templates/crds.yaml");
    let on_disk = std::fs::read_to_string(&path).expect("charts/tripod/templates/crds.yaml");
    assert!(
        on_disk == expected_chart_crds(),
        "{} is stale: run charts/tripod/update-crds.sh",
        path.display()
    );
}

/// One row of the RBAC table in docs/security.md.
type Grants = BTreeMap<String, BTreeSet<String>>;

/// The fenced ```rbac block of docs/security.md: `resource verbs scope`
/// lines, verbs comma-separated, scope `cluster` or `namespace`.
fn documented_grants() -> (Grants, Grants) {
    let doc = std::fs::read_to_string(repo_root().join("docs/security.md")).expect("security.md");
    let block = doc
        .split("```rbac\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/security.md has a ```rbac block");
    let (mut cluster, mut namespaced) = (Grants::new(), Grants::new());
    for line in block.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols.len(),
            3,
            "rbac table line {line:?}: resource verbs scope"
        );
        let verbs: BTreeSet<String> = cols[1].split(',').map(str::to_string).collect();
        let target = match cols[2] {
            "cluster" => &mut cluster,
            "namespace" => &mut namespaced,
            other => panic!("rbac table line {line:?}: unknown scope {other}"),
        };
        target.entry(cols[0].into()).or_default().extend(verbs);
    }
    (cluster, namespaced)
}

/// Parses `kubectl auth can-i --list` output into resource → verbs
/// (resource rows only; non-resource URLs are ignored).
fn parse_can_i(out: &str) -> Grants {
    let mut grants = Grants::new();
    for line in out.lines().skip(1) {
        if line.starts_with(char::is_whitespace) || line.trim().is_empty() {
            continue; // a non-resource URL row
        }
        let resource = line.split_whitespace().next().unwrap().to_string();
        let (Some(open), Some(close)) = (line.rfind('['), line.rfind(']')) else {
            panic!("unparsable can-i line {line:?}");
        };
        let names = line[..open].trim_end();
        assert!(
            names.ends_with("[]"),
            "grant restricted to resource names is not expected: {line:?}"
        );
        grants
            .entry(resource)
            .or_default()
            .extend(line[open + 1..close].split_whitespace().map(str::to_string));
    }
    grants
}

/// `a` without what `b` also grants.
fn minus(a: &Grants, b: &Grants) -> Grants {
    a.iter()
        .filter_map(|(r, verbs)| {
            let rest: BTreeSet<String> = match b.get(r) {
                Some(other) => verbs.difference(other).cloned().collect(),
                None => verbs.clone(),
            };
            (!rest.is_empty()).then(|| (r.clone(), rest))
        })
        .collect()
}

struct Env {
    helm: PathBuf,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Env {
    fn cmd(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .stdin(Stdio::null());
        c
    }

    /// Runs a command; returns (success, stdout, stderr).
    fn try_run(
        &self,
        program: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> (bool, String, String) {
        let mut c = self.cmd(program, args);
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn run(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.try_run(program, args, stdin);
        assert!(ok, "{} {args:?} failed:\n{out}\n{err}", program.display());
        out
    }

    fn helm(&self, args: &[&str]) -> String {
        self.run(&self.helm, args, None)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.run(&self.kubectl, args, None)
    }

    fn can_i(&self, user: &str, ns: &str) -> Grants {
        parse_can_i(&self.kubectl(&["auth", "can-i", "--list", "--as", user, "-n", ns]))
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).unwrap()
    }
}

fn ensure_helm() -> PathBuf {
    let script = repo_root().join("testenv/helm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run testenv/helm.sh");
    assert!(out.status.success(), "testenv/helm.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

const PRINTER_DESCRIPTION: &str = "description: Platforms being built\n";
const UPGRADED_DESCRIPTION: &str = "Platforms being built (description added by the upgrade)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_installs_upgrades_and_uninstalls() {
    let started = Instant::now();
    let helm = ensure_helm();
    let bin_dir = testenv::ensure_binaries(&repo_root()).unwrap();
    let dir = std::env::temp_dir().join(format!("tripod-helm-{}", std::process::id()));
    let mut cp = ControlPlane::start(Options {
        dir: dir.clone(),
        bin_dir,
        pod_address: None,
        audit: false,
        scheduler_qps: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let env = Env {
        helm,
        kubectl: cp.kubectl(),
        kubeconfig: cp.kubeconfig().to_path_buf(),
        home: dir.join("helm-home"),
    };
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();

    // Lint: clean, also in strict mode.
    let lint = env.helm(&["lint", "--strict", chart]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    // The schema refuses malformed values.
    let (ok, _, err) = env.try_run(
        &env.helm,
        &["template", "tripod", chart, "--set", "replicaCount=-1"],
        None,
    );
    assert!(
        !ok && err.contains("replicaCount"),
        "schema accepted replicaCount=-1: {err}"
    );
    let (ok, _, err) = env.try_run(
        &env.helm,
        &["template", "tripod", chart, "--set", "bogus=1"],
        None,
    );
    assert!(!ok, "schema accepted an unknown value: {err}");
    // Build Pod settings reach the controller's arguments as JSON.
    let custom = env.run(
        &env.helm,
        &[
            "template",
            "tripod",
            chart,
            "--set",
            "buildPods.builddSecurityContext.capabilities.add[0]=SYS_ADMIN",
            "--set",
            "buildPods.userNamespace=true",
        ],
        None,
    );
    assert!(
        custom.contains(r#"- "{\"capabilities\":{\"add\":[\"SYS_ADMIN\"]}}""#)
            && custom.contains("- --build-pod-user-namespace"),
        "{custom}"
    );

    // Windows: buildd dials the node's buildkitd; the service installer
    // is a HostProcess DaemonSet on Windows nodes, only on request.
    assert!(!custom.contains("windows-buildkitd"));
    let windows = env.run(
        &env.helm,
        &[
            "template",
            "tripod",
            chart,
            "--set",
            "windows.buildkitAddress=tcp://127.0.0.1:1234",
            "--set",
            "windows.buildkitdService.install=true",
        ],
        None,
    );
    assert!(
        windows.contains("- --windows-buildkit-addr\n            - \"tcp://127.0.0.1:1234\"")
            && windows.contains("name: tripod-windows-buildkitd")
            && windows.contains("hostProcess: true")
            && windows.contains("--register-service --service-name $name @bkArgs")
            && windows.contains("$name = 'buildkitd'")
            && windows.contains("@('--addr', 'tcp://127.0.0.1:1234'"),
        "{windows}"
    );
    let (ok, _, err) = env.try_run(
        &env.helm,
        &[
            "template",
            "tripod",
            chart,
            "--set",
            "windows.buildkitAddress=C:/pipe",
        ],
        None,
    );
    assert!(
        !ok && err.contains("buildkitAddress"),
        "schema accepted a buildkit address without a scheme: {err}"
    );

    // Build Pods stay off control-plane nodes by default; the policy is
    // a value.
    assert!(
        custom.contains("- --build-pod-denied-toleration-keys=node-role.kubernetes.io/control-plane,node-role.kubernetes.io/master")
            && custom.contains("- --build-pod-denied-node-selector-keys=node-role.kubernetes.io/control-plane,node-role.kubernetes.io/master")
            && !custom.contains("--build-pod-allowed-toleration-keys"),
        "{custom}"
    );
    // NetworkPolicies for build Pods, one per listed namespace, only on
    // request; the metadata address is excluded from their egress.
    assert!(!custom.contains("kind: NetworkPolicy"));
    let policies = env.run(
        &env.helm,
        &[
            "template",
            "tripod",
            chart,
            "-n",
            NS,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.namespaces={team-a,team-b}",
        ],
        None,
    );
    assert_eq!(
        policies.matches("kind: NetworkPolicy").count(),
        2,
        "{policies}"
    );
    assert!(
        policies.contains("namespace: team-a")
            && policies.contains("- 169.254.169.254/32")
            && policies.contains("- fd00:ec2::254/128"),
        "{policies}"
    );

    // PodMonitor only on request.
    let rendered = env.helm(&["template", "tripod", chart, "-n", NS]);
    // Build Pods' buildd runs under the Localhost seccomp profile that the
    // chart's DaemonSet writes into every Linux node's kubelet directory.
    assert!(
        rendered.contains("- --buildd-seccomp-profile\n            - \"tripod/buildd.json\""),
        "{rendered}"
    );
    assert!(rendered.contains("kind: DaemonSet"), "{rendered}");
    assert!(
        rendered.contains("path: /var/lib/kubelet/seccomp"),
        "{rendered}"
    );
    let profile = std::fs::read_to_string(chart_dir().join("files/buildd-seccomp.json")).unwrap();
    let first_rule = profile
        .lines()
        .find(|l| l.contains("SCMP_ACT_ERRNO"))
        .unwrap();
    assert!(
        rendered.contains(first_rule.trim()),
        "the profile is in the ConfigMap"
    );
    let (ok, _, err) = env.try_run(
        &env.helm,
        &[
            "template",
            "tripod",
            chart,
            "--set",
            "buildPods.seccompProfile=/etc/x.json",
        ],
        None,
    );
    assert!(
        !ok && err.contains("seccompProfile"),
        "schema accepted an absolute profile path: {err}"
    );
    let without = env.helm(&[
        "template",
        "tripod",
        chart,
        "--set",
        "seccompProfile.install=false",
        "--set",
        "buildPods.seccompProfile=Unconfined",
    ]);
    assert!(!without.contains("kind: DaemonSet") && without.contains("\"Unconfined\""));
    assert!(!rendered.contains("kind: PodMonitor"));
    let with_sm = env.helm(&[
        "template",
        "tripod",
        chart,
        "-n",
        NS,
        "--set",
        "podMonitor.enabled=true",
    ]);
    assert!(with_sm.contains("kind: PodMonitor"));

    // The rendered manifests pass the API server's validation and admission.
    env.kubectl(&["create", "namespace", NS]);
    let dry = env.run(
        &env.kubectl,
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&rendered),
    );
    assert!(
        dry.contains("deployment.apps/tripod serverside-applied (server dry run)"),
        "{dry}"
    );
    // The NetworkPolicies too (the test cluster's network does not enforce
    // them: they are checked as objects, not as traffic rules).
    for ns in ["team-a", "team-b"] {
        env.kubectl(&["create", "namespace", ns]);
    }
    let networkpolicies: String = policies
        .split("\n---")
        .filter(|doc| doc.contains("kind: NetworkPolicy"))
        .map(|doc| format!("---\n{}\n", doc.trim_start_matches("---")))
        .collect();
    let dry = env.run(
        &env.kubectl,
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        Some(&networkpolicies),
    );
    assert_eq!(
        dry.matches("serverside-applied (server dry run)").count(),
        2,
        "{dry}"
    );

    // Install.
    env.helm(&["install", "tripod", chart, "-n", NS, "--create-namespace"]);
    for crd in [
        "imagebuilds.build.tripod.dev",
        "buildrunners.build.tripod.dev",
    ] {
        env.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ]);
        let c = env.json(&["get", "crd", crd]);
        assert_eq!(
            c["metadata"]["annotations"][ANNOTATION_KEEP.0],
            ANNOTATION_KEEP.1
        );
    }
    for (kind, name) in [
        ("deployment", "tripod"),
        ("service", "tripod"),
        ("serviceaccount", "tripod"),
        ("serviceaccount", "tripod-build"),
        ("role", "tripod-leader-election"),
        ("rolebinding", "tripod-leader-election"),
    ] {
        env.kubectl(&["get", "-n", NS, kind, name]);
    }
    env.kubectl(&["get", "clusterrole", "tripod-controller"]);
    env.kubectl(&["get", "clusterrolebinding", "tripod-controller"]);

    // The Deployment as designed.
    let deploy = env.json(&["get", "-n", NS, "deployment", "tripod"]);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tripod");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let joined = args.join(" ");
    for want in [
        "--log-format json controller",
        "--metrics-address 0.0.0.0:8080",
        "--executor-listen 0.0.0.0:9443",
        "--executor-address tripod.tripod-system.svc:9443",
        "--executor-tls-san tripod.tripod-system.svc ",
        "--build-service-account tripod-build",
        "--agent-image ghcr.io/tripod-build/tripod-buildd:0.1.0",
        "--buildd-image ghcr.io/tripod-build/tripod-buildd:0.1.0",
        "--windows-buildd-image ghcr.io/tripod-build/tripod-buildd-windows:0.1.0",
        "--windows-buildkit-addr npipe:////./pipe/buildkitd",
    ] {
        assert!(joined.contains(want), "args lack {want:?}: {joined}");
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    let env_vars: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        env_vars,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_IP", "status.podIP"),
            ("POD_UID", "metadata.uid"),
        ]
    );
    // The Service selects nothing: the leader writes its endpoint.
    assert!(
        env.json(&["get", "-n", NS, "service", "tripod"])["spec"]["selector"].is_null(),
        "the executor Service must not select replicas (every replica is Ready)"
    );
    let pdb = env.json(&["get", "-n", NS, "pdb", "tripod"]);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{pdb}");
    let svc = env.json(&["get", "-n", NS, "service", "tripod"]);
    let ports: BTreeSet<(String, i64)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["port"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([
            ("executor".to_string(), 9443),
            ("metrics".to_string(), 8080)
        ])
    );
    let build_sa = env.json(&["get", "-n", NS, "serviceaccount", "tripod-build"]);
    assert_eq!(build_sa["automountServiceAccountToken"], false);
    let bindings = env.json(&["get", "rolebindings,clusterrolebindings", "-A"]);
    for b in bindings["items"].as_array().unwrap() {
        for s in b["subjects"].as_array().into_iter().flatten() {
            assert!(
                s["name"] != "tripod-build",
                "tripod-build must have no bindings, found {}",
                b["metadata"]["name"]
            );
        }
    }

    // RBAC: exactly what docs/security.md documents. Subtract what any
    // ServiceAccount gets (discovery, self reviews): tripod-build has no
    // bindings, so it is that baseline.
    let (doc_cluster, doc_ns) = documented_grants();
    let baseline = env.can_i(BUILD_SA, NS);
    let in_release_ns = minus(&env.can_i(CONTROLLER_SA, NS), &baseline);
    let mut doc_all = doc_cluster.clone();
    for (r, v) in &doc_ns {
        doc_all
            .entry(r.clone())
            .or_default()
            .extend(v.iter().cloned());
    }
    assert_eq!(
        in_release_ns, doc_all,
        "the controller's permissions in {NS} differ from docs/security.md's rbac table"
    );
    env.kubectl(&["create", "namespace", "builds"]);
    let elsewhere = minus(
        &env.can_i(CONTROLLER_SA, "builds"),
        &env.can_i("system:serviceaccount:builds:default", "builds"),
    );
    assert_eq!(
        elsewhere, doc_cluster,
        "the controller's permissions outside {NS} differ from docs/security.md's cluster-scoped rows"
    );
    for r in baseline.keys() {
        assert!(
            !r.starts_with("pods") && !r.starts_with("secrets") && !r.contains("tripod.dev"),
            "tripod-build can access {r}"
        );
    }
    for what in [
        "get secrets",
        "list secrets",
        "create pods",
        "get pods",
        "list imagebuilds.build.tripod.dev",
    ] {
        let mut args = vec!["auth", "can-i"];
        args.extend(what.split(' '));
        args.extend(["--as", BUILD_SA, "-n", NS]);
        let (ok, out, _) = env.try_run(&env.kubectl, &args, None);
        assert!(!ok && out.trim() == "no", "tripod-build may {what}: {out}");
    }

    // An ImageBuild that must survive the uninstall.
    let ib = std::fs::read_to_string(repo_root().join("examples/hello.yaml")).unwrap();
    env.run(
        &env.kubectl,
        &["apply", "-n", "builds", "-f", "-"],
        Some(&ib),
    );

    // The controller runs with nothing but those permissions: a `tripod
    // controller` process authenticated as the chart's ServiceAccount (a
    // token from the TokenRequest API) with the Deployment's own arguments
    // and environment leads, becomes ready and reconciles that ImageBuild:
    // build Pod, token Secret, status, Event.
    run_as_chart_service_account(&env, &dir, &deploy);

    // Upgrade with a chart whose CRD changed: the cluster's CRD follows.
    let modified = dir.join("chart-upgraded");
    tripod_harness::chart::copy_dir(&chart_dir(), &modified).unwrap();
    let crds_path = modified.join("templates/crds.yaml");
    let crds = std::fs::read_to_string(&crds_path).unwrap();
    assert!(crds.contains(PRINTER_DESCRIPTION));
    std::fs::write(
        &crds_path,
        crds.replacen(
            PRINTER_DESCRIPTION,
            &format!("description: {UPGRADED_DESCRIPTION}\n"),
            1,
        ),
    )
    .unwrap();
    env.helm(&["upgrade", "tripod", modified.to_str().unwrap(), "-n", NS]);
    let columns = || {
        env.kubectl(&[
            "get",
            "crd",
            "imagebuilds.build.tripod.dev",
            "-o",
            "jsonpath={.spec.versions[0].additionalPrinterColumns[0].description}",
        ])
    };
    assert_eq!(columns(), UPGRADED_DESCRIPTION);

    // Uninstall: everything goes but the CRDs and the ImageBuild.
    env.helm(&[
        "uninstall",
        "tripod",
        "-n",
        NS,
        "--wait",
        "--timeout",
        "60s",
    ]);
    wait_until("the Deployment is deleted", Duration::from_secs(60), || {
        !env.try_run(
            &env.kubectl,
            &["get", "-n", NS, "deployment", "tripod"],
            None,
        )
        .0
    });
    for (kind, name) in [
        ("clusterrole", "tripod-controller"),
        ("clusterrolebinding", "tripod-controller"),
    ] {
        assert!(
            !env.try_run(&env.kubectl, &["get", kind, name], None).0,
            "{kind}/{name} remains"
        );
    }
    for (kind, name) in [
        ("service", "tripod"),
        ("serviceaccount", "tripod-build"),
        ("role", "tripod-leader-election"),
    ] {
        assert!(
            !env.try_run(&env.kubectl, &["get", "-n", NS, kind, name], None)
                .0,
            "{kind}/{name} remains"
        );
    }
    assert_eq!(columns(), UPGRADED_DESCRIPTION, "the CRD was kept");
    env.kubectl(&["get", "crd", "buildrunners.build.tripod.dev"]);
    let kept = env.json(&["get", "-n", "builds", "imagebuild", "hello"]);
    assert_eq!(kept["metadata"]["name"], "hello");

    cp.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("helm chart test passed in {:?}", started.elapsed());
}

/// Runs `tripod controller` as the chart's ServiceAccount with the
/// Deployment's arguments (listen addresses moved to loopback ports) and
/// checks that it leads, becomes ready and reconciles `builds/hello`.
fn run_as_chart_service_account(env: &Env, dir: &Path, deploy: &serde_json::Value) {
    let token = env.kubectl(&["create", "token", "tripod", "-n", NS, "--duration", "1h"]);
    let admin = env.json(&["config", "view", "--raw", "--minify"]);
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "tripod", "user": {"token": token.trim()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "tripod"}}],
        "current-context": "c",
    });
    let kubeconfig_path = dir.join("controller-sa.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string()).unwrap();

    let metrics = testenv::free_port().unwrap();
    let executor = testenv::free_port().unwrap();
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a {
                "0.0.0.0:8080" => format!("127.0.0.1:{metrics}"),
                "0.0.0.0:9443" => format!("127.0.0.1:{executor}"),
                _ => a.to_string(),
            }
        })
        .collect();
    assert!(args.contains(&format!("127.0.0.1:{metrics}")), "{args:?}");
    let env_names: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        env_names,
        ["POD_NAME", "POD_NAMESPACE", "POD_IP", "POD_UID"]
    );

    let log_path = dir.join("controller-sa.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = testenv::supervised_command(env!("CARGO_BIN_EXE_tripod"));
    cmd.args(&args)
        .env("KUBECONFIG", &kubeconfig_path)
        .env("POD_NAME", "tripod-0")
        .env("POD_NAMESPACE", NS)
        // No Pod exists here: an address for the leader's EndpointSlice,
        // and no UID (an owner that does not exist would have it collected).
        .env("POD_IP", "10.88.0.77")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = testenv::spawn_supervised(cmd).unwrap();
    let log_tail = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // It leads (a standby is Ready too) and has synced.
    wait_until("the controller leads", Duration::from_secs(60), || {
        let out = Command::new("curl")
            .args(["-s"])
            .arg(format!("http://127.0.0.1:{metrics}/metrics"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "tripod_leader 1")
    });
    wait_until(
        "the controller's /readyz answers 200",
        Duration::from_secs(60),
        || {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://127.0.0.1:{metrics}/readyz"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout) == "200"
        },
    );
    let lease = env.json(&["get", "-n", NS, "lease", "tripod-controller"]);
    assert_eq!(
        lease["spec"]["holderIdentity"],
        "tripod-0",
        "{}",
        log_tail()
    );
    env.kubectl(&["get", "-n", NS, "secret", "tripod-executor-tls"]);
    // The leader publishes itself as the Service's endpoint.
    let endpoints = || {
        env.try_run(
            &env.kubectl,
            &[
                "get",
                "-n",
                NS,
                "endpointslice",
                "tripod-leader",
                "-o",
                "jsonpath={.metadata.labels.kubernetes\\.io/service-name} {.endpoints[*].addresses[*]}",
            ],
            None,
        )
        .1
    };
    wait_until(
        "the leader's EndpointSlice",
        Duration::from_secs(30),
        || endpoints() == "tripod 10.88.0.77",
    );

    wait_until(
        "the hello build Pod and its token Secret",
        Duration::from_secs(60),
        || {
            let (ok, out, _) = env.try_run(
                &env.kubectl,
                &[
                    "get",
                    "pods,secrets",
                    "-n",
                    "builds",
                    "-l",
                    "build.tripod.dev/name=hello",
                    "-o",
                    "name",
                ],
                None,
            );
            ok && out.lines().filter(|l| l.starts_with("pod/")).count() == 1
                && out.lines().filter(|l| l.starts_with("secret/")).count() == 1
        },
    );
    // The first status may wait up to 1 s for the Pod to be bound.
    wait_until("the hello build's status", Duration::from_secs(30), || {
        env.json(&["get", "-n", "builds", "imagebuild", "hello"])["status"]["observedGeneration"]
            == 1
    });
    let ib = env.json(&["get", "-n", "builds", "imagebuild", "hello"]);
    assert_eq!(ib["status"]["observedGeneration"], 1, "{ib}");
    assert!(ib["status"]["phase"].is_string(), "{ib}");
    // Events are written for outcomes: a build whose spec is refused gets
    // one at once (the chart's RBAC lets the controller write it).
    let bad = ib_text_with_duplicate_platforms();
    env.run(
        &env.kubectl,
        &["apply", "-n", "builds", "-f", "-"],
        Some(&bad),
    );
    wait_until("the InvalidSpec Event", Duration::from_secs(60), || {
        let (ok, out, _) = env.try_run(
            &env.kubectl,
            &[
                "get",
                "events",
                "-n",
                "builds",
                "--field-selector",
                "involvedObject.name=bad",
                "-o",
                "jsonpath={.items[*].reason}",
            ],
            None,
        );
        ok && out.contains("InvalidSpec")
    });
    let forbidden = log_tail();
    assert!(
        !forbidden.contains("forbidden"),
        "the controller met a forbidden request:\n{forbidden}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // Stepping down, it left no address behind.
    assert_eq!(endpoints(), "tripod ", "{}", log_tail());
}

/// An ImageBuild `bad` that names one platform twice (the API server
/// accepts it; the controller refuses it with an InvalidSpec Event).
fn ib_text_with_duplicate_platforms() -> String {
    "apiVersion: build.tripod.dev/v1alpha1
kind: ImageBuild
metadata:
  name: bad
spec:
  source:
    inline:
      dockerfile: |
        FROM scratch
  platforms: [linux/amd64, linux/x86_64]
  output:
    image: registry.local/team/bad:1
"
    .to_string()
}
