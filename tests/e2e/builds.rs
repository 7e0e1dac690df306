//! Linux builds end to end: the controller creates a build Pod, the real
//! scheduler binds it to the real node (kubelet, containerd, runc), whose
//! containers run the buildd image: the agent fetches the source and drives
//! buildd (real buildah), the image is pushed to a real registry, and the
//! controller records the digest only after the registry confirmed it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tripod::api::Phase;
use tripod::registry::RegistryClient;

use crate::common::{ON_REAL_NODE, TestEnv, eventually};

const BUILD: Duration = Duration::from_secs(240);

fn inline(name: &str, registry: &str, dockerfile: &str, extra: &str) -> String {
    crate::common::real_node_build(name, registry, dockerfile, extra)
}

async fn status(env: &TestEnv, name: &str) -> Option<tripod::api::ImageBuildStatus> {
    env.builds().get(name).await.ok()?.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_build_reports_the_digest_the_registry_confirms() {
    let mut env = TestEnv::with_builds("build-ok").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let manifest = inline(
        "hello",
        &registry,
        "FROM scratch\nCOPY hello.txt /hello.txt\n",
        "",
    );
    env.apply(&manifest);
    let (ok, out) = env.wait_for("condition=Ready", "ib/hello", "240s");
    let s = status(&env, "hello").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(s.phase, Some(Phase::Succeeded));
    let image = s.image.clone().expect("status.image");
    let confirmed = RegistryClient::new(vec![registry.clone()])
        .resolve(&format!("{registry}/team/hello:1"), None)
        .await
        .expect("registry answers");
    assert_eq!(image.digest, confirmed);
    assert_eq!(image.pinned, format!("{registry}/team/hello@{confirmed}"));
    assert_eq!(s.platforms[0].digest.as_deref(), Some(confirmed.as_str()));
    assert!(s.completion_time.is_some());
    // The token Secret exists, owned by the ImageBuild, mounted into the agent only.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let tokens = secrets
        .list(&ListParams::default().labels("build.tripod.dev/name=hello"))
        .await
        .expect("secrets")
        .items;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].owner_references()[0].kind, "ImageBuild");
    let pod = env.pods_of("hello").await.remove(0);
    let spec = pod.spec.expect("spec");
    let mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts.iter().flatten().any(|m| m.name == "token")
    };
    assert!(spec.containers.iter().any(mounts));
    assert!(!spec.init_containers.iter().flatten().any(mounts));
    // The node ends the Pod by itself at spec.timeout (default 1h, plus a
    // grace), should the controller be away.
    assert_eq!(spec.active_deadline_seconds, Some(3600 + 10));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_run_fails_the_platform_naming_the_step() {
    let mut env = TestEnv::with_builds("build-fail").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let manifest = inline(
        "broken",
        &registry,
        "FROM BASE\nRUN echo compiling && exit 7\n",
        "",
    );
    env.apply(&manifest);
    let (ok, out) = env.wait_for("condition=Stalled", "ib/broken", "240s");
    let s = status(&env, "broken").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(s.phase, Some(Phase::Failed));
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("StepFailed") && msg.contains("RUN echo compiling && exit 7"),
        "{msg}"
    );
    let ready = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "False");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_build_uses_revision_and_context_dir_and_keeps_url_credentials_private() {
    let mut env = TestEnv::with_builds("build-git").await;
    let registry = env.shared.registry.clone().expect("registry");
    // A repository with the app in a subdirectory; v1 differs from main.
    let root = env.shared.dir.join(format!("git-{}", env.ns));
    let work = root.join("work");
    std::fs::create_dir_all(work.join("app")).expect("repo dir");
    crate::common::git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(
        work.join("app/Dockerfile"),
        "FROM scratch\nCOPY version.txt /version.txt\n",
    )
    .expect("write");
    std::fs::write(work.join("app/version.txt"), "v1\n").expect("write");
    crate::common::git(&work, &["add", "."]);
    crate::common::git(&work, &["commit", "-q", "-m", "v1"]);
    crate::common::git(&work, &["tag", "v1"]);
    std::fs::write(
        work.join("app/Dockerfile"),
        "FROM scratch\nRUN this-would-fail\n",
    )
    .expect("write");
    crate::common::git(&work, &["commit", "-q", "-am", "broken main"]);
    crate::common::git(&root, &["clone", "-q", "--bare", "work", "repo.git"]);
    let mut daemon = crate::common::GitDaemon::serve(&env, &root).await;
    let port = daemon.port;
    let c = env.start_controller("c1");
    let node_ip = env.shared.info.node_ip.clone();
    // Credentials written into the URL: they must reach git as credentials
    // and nothing else (git:// takes none: a URL that kept them would not
    // even resolve its host).
    let sentinel = format!("SENTINEL{}", std::process::id());
    let manifest = format!(
        r#"apiVersion: build.tripod.dev/v1alpha1
kind: ImageBuild
metadata:
  name: from-git
spec:
  source:
    git:
      url: git://tripod:{sentinel}@{node_ip}:{port}/repo.git
      revision: v1
      contextDir: app
  platforms: [linux/amd64]
  output:
    image: {registry}/team/from-git:v1
    additionalTags: [stable]
    insecure: true
{ON_REAL_NODE}"#
    );
    env.apply(&manifest);
    let (ok, out) = env.wait_for("condition=Ready", "ib/from-git", "240s");
    let s = status(&env, "from-git").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let digest = s.image.expect("image").digest;
    let client = RegistryClient::new(vec![registry.clone()]);
    for tag in ["v1", "stable"] {
        let confirmed = client
            .resolve(&format!("{registry}/team/from-git:{tag}"), None)
            .await
            .expect("registry answers");
        assert_eq!(digest, confirmed, "tag {tag}");
    }
    // Not in the image config (labels), the Pods (spec, logs), the status,
    // the Events or the controller's log.
    let (code, _, manifest) = tripod_harness::http_request(
        &registry,
        "GET",
        &format!("/v2/team/from-git/manifests/{digest}"),
        "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json",
    )
    .expect("manifest");
    assert_eq!(code, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let (code, _, config) = tripod_harness::http_request(
        &registry,
        "GET",
        &format!("/v2/team/from-git/blobs/{config_digest}"),
        "*/*",
    )
    .expect("config");
    assert_eq!(code, 200);
    let config = String::from_utf8_lossy(&config).to_string();
    assert!(
        config.contains(&format!("git://tripod@{node_ip}:{port}/repo.git"))
            || config.contains(&format!("git://{node_ip}:{port}/repo.git")),
        "the source label names the repository: {config}"
    );
    let pod = env.pods_of("from-git").await.remove(0).name_any();
    let mut seen = vec![
        ("image config", config),
        ("controller log", env.controller_log(c)),
        ("status", format!("{:?}", status(&env, "from-git").await)),
    ];
    for (what, args) in [
        ("Pods", vec!["get", "pods", "-o", "json"]),
        ("Events", vec!["get", "events", "-o", "json"]),
        ("agent log", vec!["logs", &pod, "-c", "agent"]),
        ("buildd log", vec!["logs", &pod, "-c", "buildd"]),
    ] {
        let (ok, out) = env.kubectl(&args, None);
        assert!(ok, "{what}: {out}");
        seen.push((what, out));
    }
    for (what, text) in seen {
        assert!(
            !text.contains(&sentinel),
            "the URL's password leaked into the {what}: {text}"
        );
    }
    daemon.stop();
    env.cleanup().await;
}

fn processes_mentioning(text: &str) -> Vec<String> {
    let out = std::process::Command::new("ps")
        .args(["-eo", "pid,stat,args"])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(text) && !l.contains(" Z") && !l.contains("ps -eo"))
        .map(str::to_string)
        .collect()
}

/// How many processes live in the network namespace `netns` (`net:[N]`).
fn processes_in_netns(netns: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path().join("ns/net"))
                        .is_ok_and(|l| l.display().to_string() == netns)
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_deletion_stop_the_build_and_leave_nothing() {
    let mut env = TestEnv::with_builds("build-stop").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    // A build that outlives its timeout.
    let slow = inline(
        "slow",
        &registry,
        "FROM BASE\nRUN echo slow-timeout-marker && sleep 300\n",
        "  timeout: 8s\n",
    );
    env.apply(&slow);
    let s = eventually("timed out", BUILD, || async {
        let s = status(&env, "slow").await?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let stalled = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert_eq!(stalled.reason, "Timeout");
    assert!(
        s.platforms[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("spec.timeout")
    );
    eventually(
        "the timed-out build's processes are gone",
        Duration::from_secs(60),
        || async {
            processes_mentioning("slow-timeout-marker")
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // A build deleted while it runs: no process, Pod or Secret remains.
    let doomed = inline(
        "doomed",
        &registry,
        "FROM BASE\nRUN echo doomed-marker && sleep 300\n",
        "",
    );
    env.apply(&doomed);
    let running = eventually("the doomed build runs its RUN step", BUILD, || async {
        processes_mentioning("doomed-marker").first().cloned()
    })
    .await;
    // Its Pod's network namespace (that of the RUN process) and UID, to
    // look for afterwards.
    let pid = running.split_whitespace().next().expect("pid").to_string();
    let netns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .expect("netns of the RUN step")
        .display()
        .to_string();
    let uid = env.pods_of("doomed").await[0]
        .metadata
        .uid
        .clone()
        .expect("pod uid");
    let (ok, out) = env.kubectl(&["delete", "ib", "doomed", "--wait=true"], None);
    assert!(ok, "{out}");
    // Within the Pod's grace period (30 s) and a little more.
    eventually(
        "no Pod, Secret, process, mount or network namespace of the doomed build left",
        Duration::from_secs(45),
        || async {
            let pods = env.pods_of("doomed").await;
            let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
            let left = secrets
                .list(&ListParams::default().labels("build.tripod.dev/name=doomed"))
                .await
                .ok()?
                .items;
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            (pods.is_empty()
                && left.is_empty()
                && processes_mentioning("doomed-marker").is_empty()
                && !mounts.contains(&uid)
                && !mounts.contains(&netns)
                && processes_in_netns(&netns) == 0)
                .then_some(())
        },
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_build_still_reports_exactly_once() {
    let mut env = TestEnv::with_builds("build-restart").await;
    let registry = env.shared.registry.clone().expect("registry");
    let first = env.start_controller("first");
    let executor_port = env.controller(first).executor_port;
    let manifest = inline(
        "survivor",
        &registry,
        "FROM BASE\nRUN echo survivor-marker && sleep 6\nRUN echo done > /done\n",
        "",
    );
    env.apply(&manifest);
    eventually("the RUN step is building", BUILD, || async {
        (!processes_mentioning("survivor-marker").is_empty()).then_some(())
    })
    .await;
    // SIGKILL mid-build; a new replica comes up on the same address.
    env.kill_controller(first);
    env.start_controller_on("second", executor_port);
    let (ok, out) = env.wait_for("condition=Ready", "ib/survivor", "240s");
    let s = status(&env, "survivor").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(s.platforms[0].attempts, 1, "no second attempt: {s:#?}");
    let confirmed = RegistryClient::new(vec![registry.clone()])
        .resolve(&format!("{registry}/team/survivor:1"), None)
        .await
        .expect("registry answers");
    assert_eq!(s.image.expect("image").digest, confirmed);
    // Reported once: one Succeeded Event.
    crate::common::assert_reported_once(&env, "survivor").await;
    env.cleanup().await;
}

/// GET over plain HTTP: (status, body).
fn http_get(addr: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let (code, _, body) =
        tripod_harness::http_request(addr, "GET", path, accept).expect("registry request");
    (code, body)
}

fn image_config(registry: &str, repo: &str, tag: &str) -> serde_json::Value {
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let (code, body) = http_get(registry, &format!("/v2/{repo}/manifests/{tag}"), accept);
    assert_eq!(code, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest");
    let digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let (code, body) = http_get(registry, &format!("/v2/{repo}/blobs/{digest}"), "*/*");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stage_target_and_build_args_reach_the_image_config() {
    let mut env = TestEnv::with_builds("build-args").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let dockerfile = "FROM BASE AS build\nARG VERSION=0\nRUN echo \"$VERSION\" > /version\n\
                      FROM BASE AS final\nARG VERSION=0\nENV APP_VERSION=$VERSION\nCOPY --from=build /version /version\n\
                      FROM BASE AS broken\nRUN exit 1\n";
    let extra = "  target: final\n  buildArgs:\n    - {name: VERSION, value: \"1.2.3\"}\n";
    env.apply(&inline("staged", &registry, dockerfile, extra));
    let (ok, out) = env.wait_for("condition=Ready", "ib/staged", "240s");
    let s = status(&env, "staged").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let config = image_config(&registry, "team/staged", "1");
    let env_vars = config["config"]["Env"].to_string();
    assert!(env_vars.contains("APP_VERSION=1.2.3"), "{env_vars}");
    assert_eq!(
        config["config"]["Labels"]["build.tripod.dev/build-id"].as_str(),
        s.build_id.as_deref()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_build() {
    let mut env = TestEnv::with_builds("build-cancel").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let manifest = inline(
        "stopme",
        &registry,
        "FROM BASE\nRUN echo cancel-marker && sleep 300\n",
        "",
    );
    env.apply(&manifest);
    eventually("the RUN step runs", BUILD, || async {
        (!processes_mentioning("cancel-marker").is_empty()).then_some(())
    })
    .await;
    let (ok, out) = env.kubectl(
        &[
            "patch",
            "ib/stopme",
            "--type=merge",
            "-p",
            r#"{"spec":{"cancel":true}}"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = env.wait_for("jsonpath={.status.phase}=Cancelled", "ib/stopme", "60s");
    assert!(ok, "{out}");
    eventually(
        "its processes and Pod are gone",
        Duration::from_secs(60),
        || async {
            (processes_mentioning("cancel-marker").is_empty()
                && env.pods_of("stopme").await.is_empty())
            .then_some(())
        },
    )
    .await;
    assert!(
        status(&env, "stopme")
            .await
            .expect("status")
            .image
            .is_none()
    );
    env.cleanup().await;
}

/// Serves `content` on `host` (where build Pods reach it), answering 500 to
/// the first `failures` requests.
fn flaky_server(host: &str, failures: usize, content: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((host, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut served = 0usize;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let reply = if served < failures {
                "HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string()
            } else {
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{content}",
                    content.len()
                )
            };
            served += 1;
            let _ = s.write_all(reply.as_bytes());
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_and_the_second_succeeds() {
    let mut env = TestEnv::with_builds("build-retry").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let node_ip = env.shared.info.node_ip.clone();
    let port = flaky_server(&node_ip, 1, "fetched\n");
    let dockerfile = format!("FROM scratch\nADD http://{node_ip}:{port}/file /file\n");
    env.apply(&inline("flaky", &registry, &dockerfile, "  retries: 2\n"));
    let (ok, out) = env.wait_for("condition=Ready", "ib/flaky", "240s");
    let s = status(&env, "flaky").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    assert_eq!(s.platforms[0].attempts, 2, "{s:#?}");
    assert_eq!(
        s.platforms[0].executor.as_ref().map(|e| e.name.as_str()),
        Some("flaky-1-linux-amd64-2")
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_secrets_wrong_ones_fail_clearly_right_ones_push_others_are_not_used() {
    let mut env = TestEnv::with_builds("build-auth").await;
    let registry = env.shared.auth_registry.clone().expect("auth registry");
    let c = env.start_controller("c1");
    // (name, password, Secret type, opted in)
    let cases = [
        ("wrong", "nope", "kubernetes.io/dockerconfigjson", true),
        ("right", "s3cret", "kubernetes.io/dockerconfigjson", true),
        ("unasked", "s3cret", "kubernetes.io/dockerconfigjson", false),
        ("opaque", "s3cret", "Opaque", true),
        ("late", "s3cret", "kubernetes.io/dockerconfigjson", true),
    ];
    let mut late_secret = String::new();
    for (name, pass, type_, allowed) in cases {
        let auth = {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let b = format!("builder:{pass}").into_bytes();
            let mut out = String::new();
            for c in b.chunks(3) {
                let n = (u32::from(c[0]) << 16)
                    | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*c.get(2).unwrap_or(&0));
                for i in 0..4 {
                    out.push(if i <= c.len() {
                        T[((n >> (18 - 6 * i)) & 63) as usize] as char
                    } else {
                        '='
                    });
                }
            }
            out
        };
        let annotations = if allowed {
            "  annotations: {build.tripod.dev/allow: \"true\"}\n"
        } else {
            ""
        };
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-creds\n{annotations}type: {type_}\nstringData:\n  .dockerconfigjson: '{{\"auths\":{{\"{registry}\":{{\"auth\":\"{auth}\"}}}}}}'\n"
        );
        if name == "late" {
            late_secret = secret;
        } else {
            env.apply(&secret);
        }
        let manifest = inline(name, &registry, "FROM scratch\nCOPY hello.txt /\n", "").replace(
            "    insecure: true\n",
            &format!("    insecure: true\n    pushSecretRef: {{name: {name}-creds}}\n"),
        );
        env.apply(&manifest);
    }
    let (ok, out) = env.wait_for("condition=Ready", "ib/right", "240s");
    assert!(ok, "{out}");
    let (ok, out) = env.wait_for("condition=Stalled", "ib/wrong", "240s");
    let s = status(&env, "wrong").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let msg = s.platforms[0]
        .message
        .clone()
        .unwrap_or_default()
        .to_lowercase();
    assert!(msg.contains("pushfailed"), "{msg}");
    assert!(
        msg.contains("unauthorized") || msg.contains("authentication required"),
        "{msg}"
    );
    // A Secret that did not opt in, or of another type, is not used: the
    // build stalls naming the field, and no build Pod is made.
    for (name, want) in [
        (
            "unasked",
            "annotate it with build.tripod.dev/allow=\"true\"",
        ),
        ("opaque", "is of type Opaque"),
    ] {
        let (ok, out) = env.wait_for("condition=Stalled", &format!("ib/{name}"), "60s");
        let s = status(&env, name).await.expect("status");
        assert!(ok, "{out}\n{s:#?}");
        let stalled = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .expect("Stalled");
        assert!(
            stalled.message.starts_with("spec.output.pushSecretRef: ")
                && stalled.message.contains(want),
            "{name}: {:#?}\n{}",
            s,
            env.controller_log(c)
        );
        assert!(
            env.pods_of(name).await.is_empty(),
            "{name}: a build Pod was made"
        );
    }
    // A Secret that does not exist yet is waited for (it may be applied
    // after the ImageBuild): the build says so, then goes on once it exists.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = status(&env, "late").await;
        if let Some(s) = s.as_ref()
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.reason == "SecretNotFound")
        {
            break s.clone();
        }
        assert!(
            std::time::Instant::now() < until,
            "not waiting for the Secret: {s:#?}\n{}",
            env.controller_log(c)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(s.phase, Some(Phase::Failed), "{s:#?}");
    assert!(env.pods_of("late").await.is_empty());
    env.apply(&late_secret);
    let (ok, out) = env.wait_for("condition=Ready", "ib/late", "240s");
    assert!(ok, "{out}\n{:#?}", status(&env, "late").await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_after_finished_removes_pods_and_tokens_but_keeps_the_imagebuild() {
    let mut env = TestEnv::with_builds("build-ttl").await;
    let registry = env.shared.registry.clone().expect("registry");
    env.start_controller("c1");
    let manifest = inline(
        "brief",
        &registry,
        "FROM scratch\nCOPY hello.txt /\n",
        "  ttlSecondsAfterFinished: 2\n",
    );
    env.apply(&manifest);
    let (ok, out) = env.wait_for("condition=Ready", "ib/brief", "240s");
    assert!(ok, "{out}");
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(
        "Pods and token Secrets removed after the TTL",
        Duration::from_secs(60),
        || async {
            let left = secrets
                .list(&ListParams::default().labels("build.tripod.dev/name=brief"))
                .await
                .ok()?
                .items;
            (env.pods_of("brief").await.is_empty() && left.is_empty()).then_some(())
        },
    )
    .await;
    let s = status(&env, "brief").await.expect("the ImageBuild stays");
    assert_eq!(s.phase, Some(Phase::Succeeded));
    assert!(s.image.is_some());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_applies_to_the_output_registry_only() {
    let mut env = TestEnv::with_builds("build-insecure").await;
    let registry = env.shared.registry.clone().expect("registry");
    // The same images, served over plain HTTP on another port: another
    // registry as far as any client can tell.
    let dir = env.shared.dir.join(format!("mirror-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("mirror dir");
    std::os::unix::fs::symlink(env.shared.dir.join("registry"), dir.join("registry"))
        .expect("share the registry's data");
    let mut mirror = tripod_harness::registry::start_registry_on(
        &env.shared.info.node_ip,
        &dir,
        "registry",
        0,
        None,
    )
    .expect("second registry");
    env.start_controller("c1");
    // `insecure` is for the output registry: a base image from the other
    // plain-HTTP registry is not pulled without TLS.
    let dockerfile = format!("FROM {}/base/busybox:1\nRUN true\n", mirror.address);
    env.apply(&inline("elsewhere", &registry, &dockerfile, ""));
    let (ok, out) = env.wait_for("condition=Stalled", "ib/elsewhere", "240s");
    let s = status(&env, "elsewhere").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains(&mirror.address) && msg.to_lowercase().contains("https"),
        "the pull from {} must fail for want of TLS: {msg}",
        mirror.address
    );
    // The same base image from the output registry itself builds.
    env.apply(&inline("here", &registry, "FROM BASE\nRUN true\n", ""));
    let (ok, out) = env.wait_for("condition=Ready", "ib/here", "240s");
    assert!(ok, "{out}\n{:#?}", status(&env, "here").await);
    let _ = mirror.child.kill();
    let _ = mirror.child.wait();
    env.cleanup().await;
}
