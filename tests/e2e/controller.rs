//! The reconciler against the real API server, scheduler and garbage collector.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use tripod::api::{ImageBuild, Phase};

use crate::common::{TestEnv, eventually, http_get, manifest, metric};

const WAIT: Duration = Duration::from_secs(60);

async fn status_of(env: &TestEnv, name: &str) -> Option<tripod::api::ImageBuildStatus> {
    env.builds().get(name).await.ok()?.status
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_platform_is_scheduled_on_a_matching_node() {
    let mut env = TestEnv::new("schedule").await;
    env.start_controller("c1");
    let (ok, out) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&manifest(
            "multi",
            &[
                "linux/amd64",
                "linux/aarch64",
                "windows/amd64",
                "darwin/arm64",
            ],
            "",
        )),
    );
    assert!(ok, "{out}");
    let pods = eventually("three bound build Pods", WAIT, || async {
        let pods = env.pods_of("multi").await;
        (pods.len() == 3 && pods.iter().all(|p| node_of(p).is_some())).then_some(pods)
    })
    .await;
    // FROM scratch: no Windows build to match, either simulated Windows
    // node will do.
    let mut bound: Vec<(String, String)> = pods
        .iter()
        .map(|p| {
            let node = node_of(p).unwrap_or_default();
            let node = if node.starts_with("tripod-windows-") {
                "tripod-windows-amd64".to_string()
            } else {
                node
            };
            (p.name_any(), node)
        })
        .collect();
    bound.sort();
    assert_eq!(
        bound,
        [
            (
                "multi-1-linux-amd64-1".to_string(),
                "tripod-sim-linux-amd64".to_string()
            ),
            (
                "multi-1-linux-arm64-1".to_string(),
                "tripod-linux-arm64".to_string()
            ),
            (
                "multi-1-windows-amd64-1".to_string(),
                "tripod-windows-amd64".to_string()
            ),
        ]
    );
    // The three nodes are kwok's simulated nodes (the real node is tainted
    // in tests): the scheduler bound the Pods there, and nothing runs them.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    for (_, node) in &bound {
        let n = nodes.get(node).await.expect("node");
        assert_eq!(
            n.annotations()
                .get("kwok.x-k8s.io/node")
                .map(String::as_str),
            Some("fake"),
            "{node} is simulated"
        );
    }
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.owner_references()[0].kind, "ImageBuild");
        let all = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for c in all {
            let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
            assert_ne!(privileged, Some(true), "{} is privileged", c.name);
        }
    }
    let status = eventually("status naming the missing runner", WAIT, || async {
        let s = status_of(&env, "multi").await?;
        let darwin = s.platforms.iter().find(|p| p.platform == "darwin/arm64")?;
        let building = s
            .platforms
            .iter()
            .filter(|p| p.phase == Phase::Building)
            .count();
        (building == 3 && darwin.message.is_some()).then_some(s)
    })
    .await;
    // Three platforms build, darwin waits for a runner.
    assert_eq!(status.phase, Some(Phase::Building));
    let darwin = status
        .platforms
        .iter()
        .find(|p| p.platform == "darwin/arm64")
        .unwrap();
    assert_eq!(darwin.phase, Phase::Scheduling);
    assert!(darwin.executor.is_none());
    let msg = darwin.message.clone().unwrap();
    assert!(
        msg.contains("os=darwin, arch=arm64") && msg.contains("none is registered"),
        "{msg}"
    );
    let linux = status
        .platforms
        .iter()
        .find(|p| p.platform == "linux/arm64")
        .unwrap();
    assert_eq!(
        linux
            .executor
            .as_ref()
            .and_then(|e| e.node.clone())
            .as_deref(),
        Some("tripod-linux-arm64")
    );

    // kubectl wait on the conditions Tripod sets.
    let (ok, out) = env.wait_for("condition=Reconciling", "imagebuild/multi", "30s");
    assert!(ok, "{out}");
    let (ok, out) = env.wait_for("condition=Ready=false", "ib/multi", "30s");
    assert!(ok, "{out}");

    // A runner that registers but is not online changes the message.
    let runner = format!(
        "apiVersion: build.tripod.dev/v1alpha1\nkind: BuildRunner\nmetadata:\n  name: mac-{}\n  labels: {{tripod.dev/test-namespace: {}}}\nspec:\n  os: darwin\n  arch: arm64\n",
        env.ns, env.ns
    );
    env.apply(&runner);
    eventually("message about the offline runner", WAIT, || async {
        let s = status_of(&env, "multi").await?;
        let d = s.platforms.iter().find(|p| p.platform == "darwin/arm64")?;
        d.message
            .as_deref()?
            .contains("registered, none Online")
            .then_some(())
    })
    .await;
    let _ = env.kubectl(&["delete", "buildrunner", &format!("mac-{}", env.ns)], None);

    // Metrics: darwin waits in the queue; reconciles are counted.
    let port = env.controller(0).metrics_port;
    // The gauges are counted from the caches every few seconds.
    eventually("darwin counted in the queue", WAIT, || async {
        let (_, body) = http_get(port, "/metrics").await?;
        (metric(&body, "tripod_queue_depth{os=\"darwin\"}")? >= 1.0).then_some(())
    })
    .await;
    let (code, body) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    let before = metric(&body, "tripod_reconcile_duration_seconds_count").unwrap_or(0.0);
    assert!(before > 0.0, "{body}");
    let (ok, out) = env.kubectl(&["annotate", "ib/multi", "example.com/touch=1"], None);
    assert!(ok, "{out}");
    eventually("reconcile counter moves", WAIT, || async {
        let (_, body) = http_get(port, "/metrics").await?;
        (metric(&body, "tripod_reconcile_duration_seconds_count")? > before).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(http_get(port, "/readyz").await.map(|r| r.0), Some(200));

    // Cancelling counts the platforms as cancelled.
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "ib/multi",
            "--type=merge",
            "-p",
            r#"{"spec":{"cancel":true}}"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = env.wait_for("jsonpath={.status.phase}=Cancelled", "ib/multi", "60s");
    assert!(ok, "{out}");
    eventually("Pods of the cancelled build are gone", WAIT, || async {
        env.pods_of("multi").await.is_empty().then_some(())
    })
    .await;
    eventually("cancelled builds counted", WAIT, || async {
        let (_, body) = http_get(port, "/metrics").await?;
        (metric(
            &body,
            "tripod_builds_total{os=\"linux\",result=\"cancelled\"}",
        )? >= 2.0)
            .then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_node_selector_and_tolerations_are_merged() {
    let mut env = TestEnv::new("merge").await;
    env.start_controller("c1");
    let extra = r#"  executor:
    nodeSelector:
      node.kubernetes.io/windows-build: "10.0.20348"
      tripod.dev/pool: builders
    tolerations:
      - {key: dedicated, operator: Exists, effect: NoSchedule}
"#;
    let (ok, out) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&manifest(
            "merged",
            &["linux/amd64", "windows/amd64"],
            extra,
        )),
    );
    assert!(ok, "{out}");
    let pods = eventually("two Pods", WAIT, || async {
        let pods = env.pods_of("merged").await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let sel = spec.node_selector.clone().unwrap();
        assert_eq!(sel["tripod.dev/pool"], "builders");
        let tol = spec.tolerations.clone().unwrap_or_default();
        assert!(tol.iter().any(|t| t.key.as_deref() == Some("dedicated")));
        if pod.name_any().contains("windows") {
            assert_eq!(sel["node.kubernetes.io/windows-build"], "10.0.20348");
            assert!(
                tol.iter().any(
                    |t| t.key.as_deref() == Some("os") && t.value.as_deref() == Some("windows")
                )
            );
        } else {
            assert!(!sel.contains_key("node.kubernetes.io/windows-build"));
        }
    }
    // No node has the pool label: the scheduler leaves them, and the status says why.
    let s = eventually("unschedulable reason in status", WAIT, || async {
        let s = status_of(&env, "merged").await?;
        s.platforms
            .iter()
            .all(|p| {
                p.message
                    .as_deref()
                    .is_some_and(|m| m.contains("not scheduled yet"))
            })
            .then_some(s)
    })
    .await;
    assert_eq!(s.phase, Some(Phase::Scheduling));
    for pod in env.pods_of("merged").await {
        assert_eq!(node_of(&pod), None, "{} was bound", pod.name_any());
    }

    // Dropping the pool selector is a new generation: new Pods that bind.
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "ib/merged",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/executor/nodeSelector/tripod.dev~1pool"}]"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    let pods = eventually("generation-2 Pods bound", WAIT, || async {
        let pods = env.pods_of("merged").await;
        (pods.len() == 2
            && pods
                .iter()
                .all(|p| p.name_any().starts_with("merged-2-") && node_of(p).is_some()))
        .then_some(pods)
    })
    .await;
    assert!(
        pods.iter()
            .any(|p| node_of(p).as_deref() == Some("tripod-windows-amd64"))
    );
    let s = eventually("observedGeneration 2", WAIT, || async {
        let s = status_of(&env, "merged").await?;
        (s.observed_generation == Some(2) && s.phase == Some(Phase::Building)).then_some(s)
    })
    .await;
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_retry_and_garbage_collection() {
    let mut env = TestEnv::new("lifecycle").await;
    env.start_controller("c1");
    env.apply(&manifest("life", &["linux/amd64"], "  retries: 1\n"));
    let first = eventually("first Pod bound", WAIT, || async {
        let pods = env.pods_of("life").await;
        (pods.len() == 1 && node_of(&pods[0]).is_some()).then(|| pods[0].clone())
    })
    .await;

    // The Pod fails (as a kubelet would report): a second attempt starts.
    let status = serde_json::json!({"status": {"phase": "Failed", "reason": "Error",
        "message": "agent exited: RUN make failed"}});
    env.pods()
        .patch_status(
            &first.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("fail the pod");
    let s = eventually("attempt 2", WAIT, || async {
        let s = status_of(&env, "life").await?;
        (s.platforms.first()?.attempts == 2).then_some(s)
    })
    .await;
    assert_eq!(
        s.platforms[0].executor.as_ref().map(|e| e.name.as_str()),
        Some("life-1-linux-amd64-2")
    );
    eventually("attempt-2 Pod exists", WAIT, || async {
        env.pods_of("life")
            .await
            .iter()
            .any(|p| p.name_any() == "life-1-linux-amd64-2")
            .then_some(())
    })
    .await;

    // The rebuild annotation starts a new build of the same generation.
    let old_id = s.build_id.clone();
    let (ok, out) = env.kubectl(
        &["annotate", "ib/life", "build.tripod.dev/rebuild=now"],
        None,
    );
    assert!(ok, "{out}");
    let s = eventually("a new build", WAIT, || async {
        let s = status_of(&env, "life").await?;
        (s.build_id != old_id && s.platforms.first()?.attempts == 1).then_some(s)
    })
    .await;
    assert_eq!(s.observed_generation, Some(1));
    let pods = eventually("only the new build's Pod", WAIT, || async {
        let pods = env.pods_of("life").await;
        (pods.len() == 1).then_some(pods)
    })
    .await;
    assert_eq!(
        pods[0].labels().get("build.tripod.dev/build-id"),
        s.build_id.as_ref()
    );

    // Deleting the ImageBuild removes its Pods through the garbage collector.
    env.kill_controller(0);
    env.builds()
        .delete("life", &DeleteParams::background())
        .await
        .expect("delete");
    eventually("Pods collected", WAIT, || async {
        env.pods_of("life").await.is_empty().then_some(())
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_stalls_and_kubectl_wait_sees_it() {
    let mut env = TestEnv::new("stalled").await;
    env.start_controller("c1");
    // Distinct strings (the API server accepts them), the same platform.
    env.apply(&manifest("dup", &["linux/amd64", "linux/x86_64"], ""));
    let (ok, out) = env.wait_for("condition=Stalled", "ib/dup", "60s");
    assert!(ok, "{out}");
    let ib: ImageBuild = env.builds().get("dup").await.expect("get");
    let s = ib.status.expect("status");
    let stalled = s.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert_eq!(stalled.reason, "InvalidSpec");
    assert!(
        stalled.message.contains("spec.platforms[1]"),
        "{}",
        stalled.message
    );
    assert_eq!(s.phase, Some(Phase::Failed));
    assert!(env.pods_of("dup").await.is_empty());
    // The status is owned by one field manager, through server-side apply.
    let managers: Vec<(String, String)> = ib
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        managers,
        [("tripod-controller".to_string(), "Apply".to_string())]
    );
    // An Event says so too.
    let (ok, out) = env.kubectl(
        &[
            "get",
            "events",
            "--field-selector",
            "reason=InvalidSpec",
            "-o",
            "name",
        ],
        None,
    );
    assert!(ok && !out.trim().is_empty(), "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_build_pod_is_reported_and_retried() {
    // A namespace that enforces the `restricted` Pod Security level refuses
    // build Pods (buildah runs as root). The user reads why in the status and
    // an Event, and the build goes on once the namespace allows `baseline`.
    let mut env = TestEnv::new("podrefused").await;
    let ns = format!("namespace/{}", env.ns);
    let (ok, out) = env.kubectl(
        &[
            "label",
            &ns,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    );
    assert!(ok, "{out}");
    env.start_controller("c1");
    env.apply(&manifest("refused", &["linux/arm64"], ""));
    let message = eventually(
        "the refusal in status.platforms[].message",
        WAIT,
        || async {
            let status = status_of(&env, "refused").await?;
            let message = status.platforms.first()?.message.clone()?;
            message.contains("refused build Pod").then_some(message)
        },
    )
    .await;
    assert!(message.contains("restricted"), "{message}");
    // kstatus: Stalled=True while refused, so `kubectl wait` and Flux see it.
    let (ok, out) = env.wait_for("condition=Stalled", "imagebuild/refused", "30s");
    assert!(ok, "{out}");
    let reason = status_of(&env, "refused")
        .await
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Stalled"))
        .map(|c| c.reason);
    assert_eq!(reason.as_deref(), Some("BuildPodRejected"));
    let (ok, events) = env.kubectl(
        &[
            "get",
            "events",
            "--field-selector",
            "reason=BuildPodRejected",
            "-o",
            "name",
        ],
        None,
    );
    assert!(
        ok && !events.trim().is_empty(),
        "no BuildPodRejected event: {events}"
    );
    assert!(
        env.pods()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    let (ok, out) = env.kubectl(
        &[
            "label",
            "--overwrite",
            &ns,
            "pod-security.kubernetes.io/enforce=baseline",
        ],
        None,
    );
    assert!(ok, "{out}");
    eventually(
        "the build Pod, once the namespace allows it",
        WAIT,
        || async { env.pods().list(&Default::default()).await.ok()?.items.pop() },
    )
    .await;
    eventually("the refusal message and Stalled gone", WAIT, || async {
        let status = status_of(&env, "refused").await?;
        let message = status.platforms.first()?.message.clone();
        let stalled = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True");
        (!stalled && !message.is_some_and(|m| m.contains("refused"))).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_holding_the_build_pods_name_is_reported_not_taken_over() {
    // Someone else's Pod already has the name the build Pod would get: the
    // controller leaves it alone and says why the build waits; once it is
    // gone, the build Pod is created.
    let mut env = TestEnv::new("squat").await;
    env.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: squat-1-linux-arm64-1, namespace: {}, labels: {{app: mine}}}}\n\
         spec: {{nodeSelector: {{no-such-node: \"x\"}}, containers: [{{name: c, image: mine:1}}]}}\n",
        env.ns
    ));
    env.start_controller("c1");
    env.apply(&manifest("squat", &["linux/arm64"], ""));
    let message = eventually("the name clash in the status", WAIT, || async {
        let status = status_of(&env, "squat").await?;
        let message = status.platforms.first()?.message.clone()?;
        message.contains("squat-1-linux-arm64-1").then_some(message)
    })
    .await;
    assert!(message.contains("is not this build's"), "{message}");
    let squatter = env.pods().get("squat-1-linux-arm64-1").await.expect("get");
    assert_eq!(
        squatter.labels().get("app").map(String::as_str),
        Some("mine")
    );
    assert!(squatter.owner_references().is_empty());

    let (ok, out) = env.kubectl(
        &["delete", "pod", "squat-1-linux-arm64-1", "--wait=true"],
        None,
    );
    assert!(ok, "{out}");
    let pod = eventually("the build Pod, once the name is free", WAIT, || async {
        env.pods_of("squat").await.pop()
    })
    .await;
    assert_eq!(pod.name_any(), "squat-1-linux-arm64-1");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildd_security_context_and_user_namespace_reach_the_pod() {
    // A typo in the JSON stops the controller at once, naming flag and field.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripod"))
        .args([
            "controller",
            "--buildd-security-context",
            r#"{"capabilities":{"addd":["SYS_ADMIN"]}}"#,
        ])
        .output()
        .expect("run tripod");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--buildd-security-context") && err.contains("capabilities.addd"),
        "{err}"
    );

    // The settings for containerd nodes (CAP_SYS_ADMIN, AppArmor
    // unconfined) and for user namespaces: the API server accepts the Pod.
    let mut env = TestEnv::new("builddsc").await;
    env.start_controller_with(
        "c1",
        crate::common::free_port(),
        &[
            "--buildd-security-context",
            r#"{"runAsUser":0,"capabilities":{"add":["SYS_ADMIN"]},"appArmorProfile":{"type":"Unconfined"}}"#,
            "--build-pod-user-namespace",
        ],
    );
    env.apply(&manifest("sc", &["linux/arm64"], ""));
    let pod = eventually("the build Pod", WAIT, || async {
        env.pods().list(&Default::default()).await.ok()?.items.pop()
    })
    .await;
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.host_users, Some(false));
    let buildd = &spec.init_containers.expect("buildd")[0];
    let sc = buildd.security_context.as_ref().expect("securityContext");
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.add.clone()),
        Some(vec!["SYS_ADMIN".to_string()])
    );
    assert_eq!(
        sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
}
