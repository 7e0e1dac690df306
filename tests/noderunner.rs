//! The node runner against a real control plane: Pods bound to
//! `tripod-linux-amd64` run as local processes and report their status
//! through the real API server.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tripod::noderunner::{self, NodeRunnerConfig};
use tripod::testenv::{self, ControlPlane, LINUX_AMD64, Options};

const NS: &str = "tripod-noderunner";
/// Generous: Pods here take a few seconds at most.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Env {
    pods: Api<Pod>,
    root: PathBuf,
}

impl Env {
    /// Creates Pod `name` with `spec`; bound to the runner's node by
    /// `nodeName` unless the spec has a `nodeSelector`.
    async fn create(&self, name: &str, mut spec: Value) -> Pod {
        if spec.get("nodeSelector").is_none() {
            spec["nodeName"] = json!(LINUX_AMD64);
        }
        if spec.get("restartPolicy").is_none() {
            spec["restartPolicy"] = json!("Never");
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        }))
        .unwrap();
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// Waits until `check` accepts Pod `name`.
    async fn wait(&self, name: &str, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
        let started = Instant::now();
        loop {
            let pod = self.pods.get_opt(name).await.unwrap();
            if let Some(pod) = pod.as_ref()
                && check(pod)
            {
                return pod.clone();
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "{name}: timed out waiting for {what}; last seen: {:#?}",
                pod.and_then(|p| p.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_phase(&self, name: &str, phase: &str) -> Pod {
        self.wait(name, phase, |p| phase_of(p) == phase).await
    }

    async fn wait_gone(&self, name: &str) {
        let started = Instant::now();
        while self.pods.get_opt(name).await.unwrap().is_some() {
            assert!(started.elapsed() < TIMEOUT, "{name}: not deleted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.root.join(format!(
            "{NS}_{}_{}",
            pod.metadata.name.as_deref().unwrap(),
            pod.metadata.uid.as_deref().unwrap()
        ))
    }
}

fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn status_json(pod: &Pod) -> Value {
    serde_json::to_value(pod.status.as_ref().unwrap()).unwrap()
}

/// The status entry of container `name` (init or main).
fn container(pod: &Pod, name: &str) -> Value {
    let status = status_json(pod);
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .flat_map(|k| status[*k].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no status of container {name}: {status:#}"))
}

fn condition(pod: &Pod, type_: &str) -> Value {
    let status = status_json(pod);
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or_else(|| panic!("no condition {type_}: {status:#}"))
}

/// Whether process `pid` is gone (a zombie counts as gone).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_process_gone(pid: u32) {
    let started = Instant::now();
    while !process_gone(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "process {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a pid a container wrote into a file, waiting for it.
async fn read_pid(path: &Path) -> u32 {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(started.elapsed() < TIMEOUT, "no pid in {}", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Scripts below write `$$$$`: Kubernetes expands `$(VAR)` in commands and
// turns `$$` into `$`, so the shell sees `$$`, its pid.

fn data_volume() -> Value {
    json!([{"name": "data", "emptyDir": {}}])
}

fn data_mount() -> Value {
    json!([{"name": "data", "mountPath": "/data"}])
}

fn data_env() -> Value {
    json!([{"name": "DATA", "value": "/data"}])
}

/// 1. Sidecar, init container, emptyDir, secret and configMap volumes,
///    secretKeyRef and fieldRef env, path mapping of env, args and
///    workingDir, termination message; the sidecar is stopped at the end.
async fn sidecar_init_and_volumes(env: &Env) {
    let script = r#"set -e
cat "$DATA/init.txt" "$CREDS/token" > "$DATA/out.txt"
echo "password=$PASSWORD pod=$POD_NAME ns=$(POD_NAMESPACE) node=$NODE ip=$IP" >> "$DATA/out.txt"
cat "$CONF" >> "$DATA/out.txt"
test -s "$DATA/sidecar.pid"
echo "$1" > "$DATA/arg.txt"
pwd > "$DATA/pwd.txt"
env > "$DATA/env.txt"
printf 'all good' > "$MSG"
"#;
    let created = env
        .create(
            "full",
            json!({
                // Through the real scheduler rather than nodeName.
                "nodeSelector": {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux"},
                "terminationGracePeriodSeconds": 5,
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                    {"name": "settings", "configMap": {"name": "settings", "items": [
                        {"key": "app.conf", "path": "conf/app.conf", "mode": 0o600},
                    ]}},
                ],
                "initContainers": [
                    {
                        "name": "sidecar",
                        "image": "docker.io/library/busybox:1.36",
                        "restartPolicy": "Always",
                        "command": ["sh", "-c", "echo $$$$ > \"$DATA/sidecar.pid\"; exec sleep 300"],
                        "env": data_env(),
                        "volumeMounts": data_mount(),
                    },
                    {
                        "name": "init",
                        "image": "docker.io/library/busybox:1.36",
                        "command": ["sh", "-c", "echo from-init > \"$DATA/init.txt\""],
                        "env": data_env(),
                        "volumeMounts": data_mount(),
                    },
                ],
                "containers": [{
                    "name": "main",
                    "image": "docker.io/library/busybox:1.36",
                    "command": ["sh", "-c"],
                    "args": [script, "main", "/data/sub"],
                    "workingDir": "/data",
                    "env": [
                        {"name": "DATA", "value": "/data"},
                        {"name": "CREDS", "value": "/etc/creds"},
                        {"name": "CONF", "value": "/etc/settings/conf/app.conf"},
                        {"name": "MSG", "value": "/dev/termination-log"},
                        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                        {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": true}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    ],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/data"},
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": true},
                        {"name": "settings", "mountPath": "/etc/settings"},
                    ],
                }],
            }),
        )
        .await;
    let t = Instant::now();
    let pod = env.wait_phase("full", "Succeeded").await;
    eprintln!("full: Succeeded after {:?}", t.elapsed());
    assert_eq!(pod.metadata.uid, created.metadata.uid);
    let status = status_json(&pod);
    assert_eq!(status["podIP"], "127.0.0.1");
    assert_eq!(status["hostIP"], "127.0.0.1");
    assert!(status["startTime"].is_string());
    let main = container(&pod, "main");
    let terminated = &main["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 0, "{main:#}");
    assert_eq!(terminated["reason"], "Completed");
    assert_eq!(terminated["message"], "all good");
    assert!(terminated["startedAt"].is_string() && terminated["finishedAt"].is_string());
    assert_eq!(main["restartCount"], 0);
    assert_eq!(main["image"], "docker.io/library/busybox:1.36");
    assert_eq!(
        container(&pod, "init")["state"]["terminated"]["exitCode"],
        0
    );
    let sidecar = container(&pod, "sidecar");
    assert_eq!(
        sidecar["state"]["terminated"]["exitCode"], 143,
        "stopped by SIGTERM: {sidecar:#}"
    );
    assert_eq!(condition(&pod, "Initialized")["status"], "True");
    assert_eq!(condition(&pod, "PodScheduled")["status"], "True");
    assert_eq!(condition(&pod, "Ready")["status"], "False");
    assert_eq!(condition(&pod, "Ready")["reason"], "PodCompleted");

    let dir = env.pod_dir(&pod);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let data = dir.join("volumes/data");
    let out = std::fs::read_to_string(data.join("out.txt")).unwrap();
    assert_eq!(
        out,
        format!(
            "from-init\ns3cret-token\npassword=hunter2 pod=full ns={NS} node={LINUX_AMD64} ip=127.0.0.1\nlevel=debug\n"
        )
    );
    let arg = std::fs::read_to_string(data.join("arg.txt")).unwrap();
    assert_eq!(arg.trim(), format!("{}/sub", data.display()));
    let pwd = std::fs::read_to_string(data.join("pwd.txt")).unwrap();
    assert_eq!(pwd.trim(), data.display().to_string());
    let environment = std::fs::read_to_string(data.join("env.txt")).unwrap();
    assert!(
        environment.contains(&format!("HOME={}\n", dir.display())),
        "{environment}"
    );
    assert!(
        environment.contains(&format!("DATA={}\n", data.display())),
        "{environment}"
    );
    assert!(!environment.contains("OPTIONAL="), "{environment}");
    // Nothing of the test process's environment but PATH.
    assert!(!environment.contains("CARGO"), "{environment}");
    let file_mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(file_mode("volumes/creds/token"), 0o400);
    assert_eq!(file_mode("volumes/settings/conf/app.conf"), 0o600);
    assert!(dir.join("logs/main.log").exists());

    let sidecar_pid = read_pid(&data.join("sidecar.pid")).await;
    assert!(
        process_gone(sidecar_pid),
        "sidecar {sidecar_pid} still runs"
    );
}

/// 2. A failing container's termination message falls back to its log.
async fn fallback_to_logs(env: &Env) {
    env.create(
        "fails",
        json!({"containers": [{
            "name": "main",
            "image": "x",
            "command": ["sh", "-c", "echo starting; echo boom >&2; exit 3"],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }]}),
    )
    .await;
    let pod = env.wait_phase("fails", "Failed").await;
    let terminated = &container(&pod, "main")["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 3);
    assert_eq!(terminated["reason"], "Error");
    let message = terminated["message"].as_str().unwrap();
    assert!(message.contains("boom"), "{message}");
    let status = pod.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("ContainerFailed"));
    assert_eq!(
        status.message.as_deref(),
        Some("container main exited with code 3")
    );
}

/// 3. `tripod` as a container command runs the configured binary.
async fn tripod_command(env: &Env) {
    env.create(
        "crds",
        json!({"containers": [{
            "name": "main",
            "image": "ghcr.io/tripod/tripod:dev",
            "command": ["tripod", "crds"],
        }]}),
    )
    .await;
    let pod = env.wait_phase("crds", "Succeeded").await;
    let log = std::fs::read_to_string(env.pod_dir(&pod).join("logs/main.log")).unwrap();
    assert!(log.contains("CustomResourceDefinition"), "{log}");
}

/// 4. Deleting a running Pod kills its whole process group, and the runner
///    finishes the deletion.
async fn deletion_kills_the_group(env: &Env) {
    env.create(
        "deleted",
        json!({
            "volumes": data_volume(),
            "containers": [{
                "name": "main",
                "image": "x",
                "command": ["sh", "-c", "sleep 300 & echo $! > \"$DATA/child.pid\"; echo $$$$ > \"$DATA/pid\"; wait"],
                "env": data_env(),
                "volumeMounts": data_mount(),
            }],
        }),
    )
    .await;
    let pod = env.wait_phase("deleted", "Running").await;
    assert_eq!(condition(&pod, "Ready")["status"], "True");
    assert_eq!(container(&pod, "main")["ready"], true);
    let dir = env.pod_dir(&pod);
    let pid = read_pid(&dir.join("volumes/data/pid")).await;
    let child = read_pid(&dir.join("volumes/data/child.pid")).await;
    assert!(!process_gone(pid) && !process_gone(child));
    let t = Instant::now();
    env.pods
        .delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("deleted").await;
    eprintln!("deleted: gone {:?} after delete", t.elapsed());
    wait_process_gone(pid).await;
    wait_process_gone(child).await;
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// 4b. A process ignoring SIGTERM is killed after the grace period.
async fn deletion_escalates(env: &Env) {
    env.create(
        "stubborn",
        json!({
            "terminationGracePeriodSeconds": 2,
            "volumes": data_volume(),
            "containers": [{
                "name": "main",
                "image": "x",
                "command": ["sh", "-c", "trap '' TERM; echo $$$$ > \"$DATA/pid\"; sleep 300; sleep 300"],
                "env": data_env(),
                "volumeMounts": data_mount(),
            }],
        }),
    )
    .await;
    let pod = env.wait_phase("stubborn", "Running").await;
    let pid = read_pid(&env.pod_dir(&pod).join("volumes/data/pid")).await;
    let t = Instant::now();
    env.pods
        .delete("stubborn", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("stubborn").await;
    let took = t.elapsed();
    eprintln!("stubborn: gone {took:?} after delete");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    wait_process_gone(pid).await;
}

/// 5. activeDeadlineSeconds.
async fn deadline(env: &Env) {
    env.create(
        "deadline",
        json!({
            "activeDeadlineSeconds": 2,
            "containers": [{"name": "main", "image": "x", "command": ["sleep", "300"]}],
        }),
    )
    .await;
    let t = Instant::now();
    let pod = env.wait_phase("deadline", "Failed").await;
    eprintln!("deadline: Failed after {:?}", t.elapsed());
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        container(&pod, "main")["state"]["terminated"]["exitCode"],
        143
    );
}

/// 6. A missing Secret volume fails the Pod, naming the volume.
async fn missing_secret(env: &Env) {
    env.create(
        "no-secret",
        json!({
            "volumes": [{"name": "registry-auth", "secret": {"secretName": "does-not-exist"}}],
            "containers": [{
                "name": "main",
                "image": "x",
                "command": ["true"],
                "volumeMounts": [{"name": "registry-auth", "mountPath": "/auth"}],
            }],
        }),
    )
    .await;
    let pod = env.wait_phase("no-secret", "Failed").await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("FailedMount"));
    let message = status.message.as_deref().unwrap();
    assert!(
        message.contains("\"registry-auth\"") && message.contains("does-not-exist"),
        "{message}"
    );
    assert!(container(&pod, "main")["state"]["waiting"].is_object());
}

/// What the runner cannot map fails the Pod with a clear message.
async fn unsupported_specs(env: &Env) {
    env.create(
        "host-path",
        json!({
            "volumes": [{"name": "host", "hostPath": {"path": "/tmp"}}],
            "containers": [{"name": "main", "image": "x", "command": ["true"]}],
        }),
    )
    .await;
    env.create(
        "no-command",
        json!({"containers": [{"name": "main", "image": "x"}]}),
    )
    .await;
    env.create(
        "bad-program",
        json!({"containers": [{"name": "main", "image": "x", "command": ["no-such-program-xyz"]}]}),
    )
    .await;
    let pod = env.wait_phase("host-path", "Failed").await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("UnsupportedVolume"));
    let message = status.message.as_deref().unwrap();
    assert!(
        message.contains("\"host\"") && message.contains("hostPath"),
        "{message}"
    );
    let pod = env.wait_phase("no-command", "Failed").await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("CreateContainerConfigError"));
    assert!(
        status.message.as_deref().unwrap().contains("no command"),
        "{status:?}"
    );
    let pod = env.wait_phase("bad-program", "Failed").await;
    let terminated = &container(&pod, "main")["state"]["terminated"];
    assert_eq!(terminated["reason"], "StartError");
    assert_eq!(terminated["exitCode"], 128);
    assert!(
        terminated["message"]
            .as_str()
            .unwrap()
            .contains("no-such-program-xyz"),
        "{terminated:#}"
    );
}

fn sleeper(record_pid: bool) -> Value {
    let script = if record_pid {
        "echo $$$$ > \"$DATA/pid\"; exec sleep 300"
    } else {
        "exec sleep 300"
    };
    json!({
        "terminationGracePeriodSeconds": 30,
        "volumes": data_volume(),
        "containers": [{
            "name": "main",
            "image": "x",
            "command": ["sh", "-c", script],
            "env": data_env(),
            "volumeMounts": data_mount(),
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_runner_runs_pods_on_the_real_api_server() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tripod=info".into()),
        )
        .with_test_writer()
        .try_init();
    let bin_dir = testenv::ensure_binaries(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    let dir = std::env::temp_dir().join(format!("tripod-noderunner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    let mut cp = ControlPlane::start(Options {
        dir: dir.clone(),
        bin_dir,
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("control plane started in {:?}", started.elapsed());
    let client = cp.client().await.unwrap();
    let nodes = testenv::create_nodes(&client).await.unwrap();
    let others: Vec<String> = nodes.into_iter().filter(|n| n != LINUX_AMD64).collect();
    let keeper = testenv::spawn_node_keeper(client.clone(), others);
    let root = dir.join("pods");
    let cfg = NodeRunnerConfig {
        node_name: LINUX_AMD64.into(),
        root: root.clone(),
        tripod_binary: env!("CARGO_BIN_EXE_tripod").into(),
        max_grace: Duration::from_secs(10),
    };
    let runner = noderunner::spawn(client.clone(), cfg.clone());

    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
    Api::<Secret>::namespaced(client.clone(), NS)
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "creds"},
                "stringData": {"token": "s3cret-token\n", "password": "hunter2"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), NS)
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "settings"},
                "data": {"app.conf": "level=debug\n", "other": "x"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let env = Env {
        pods: Api::namespaced(client.clone(), NS),
        root: root.clone(),
    };
    let t = Instant::now();
    tokio::join!(
        sidecar_init_and_volumes(&env),
        fallback_to_logs(&env),
        tripod_command(&env),
        deletion_kills_the_group(&env),
        deletion_escalates(&env),
        deadline(&env),
        missing_secret(&env),
        unsupported_specs(&env),
    );
    eprintln!("scenarios done in {:?}", t.elapsed());

    // The runner restarts: a Pod it ran is failed (its processes died with
    // the old runner), one deleted meanwhile is finished off.
    env.create("survivor", sleeper(true)).await;
    env.create("doomed", sleeper(false)).await;
    let survivor = env.wait_phase("survivor", "Running").await;
    let doomed = env.wait_phase("doomed", "Running").await;
    let pid = read_pid(&env.pod_dir(&survivor).join("volumes/data/pid")).await;
    runner.abort();
    let _ = runner.await;
    wait_process_gone(pid).await;
    env.pods
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let terminating = env.pods.get("doomed").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // A directory of a Pod that no longer exists is cleaned up on start.
    let stray = root.join(format!("{NS}_gone_00000000-0000-0000-0000-000000000000"));
    std::fs::create_dir_all(&stray).unwrap();

    let t = Instant::now();
    let runner = noderunner::spawn(client.clone(), cfg);
    let pod = env
        .wait("survivor", "NodeRunnerRestarted", |p| {
            p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("NodeRunnerRestarted")
        })
        .await;
    assert_eq!(phase_of(&pod), "Failed");
    let terminated = &container(&pod, "main")["state"]["terminated"];
    assert_eq!(terminated["reason"], "ContainerStatusUnknown");
    env.wait_gone("doomed").await;
    eprintln!("restart handled in {:?}", t.elapsed());
    assert!(!env.pod_dir(&doomed).exists());
    assert!(env.pod_dir(&survivor).exists());
    assert!(!stray.exists());

    runner.abort();
    let _ = runner.await;
    keeper.abort();
    cp.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("total {:?}", started.elapsed());
}
