//! Abuse of the executor service and of the build Pods' records, next to a
//! legitimate build on the real node that must still succeed: a Hello that
//! would reshape an API request, 200 streams that never say hello, tokens
//! used for another build, platform or attempt, a second live session, a
//! replayed session after success, a digest the registry does not have,
//! and a result annotation written by someone with `pods/patch`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio_stream::wrappers::ReceiverStream;
use tripod::api::Phase;
use tripod::proto::executor::v1 as pb;

use crate::common::{ON_REAL_NODE, TestEnv, assert_reported_once, eventually};

const BUILD: Duration = Duration::from_secs(240);

pub(crate) type Client = pb::executor_client::ExecutorClient<tonic::transport::Channel>;

/// A client of the executor service at `host:port`, trusting `ca`.
pub(crate) async fn executor_client(host: &str, port: u16, ca: Vec<u8>) -> Client {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{host}:{port}"))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name(host)
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .expect("tls");
    let channel = endpoint.connect().await.expect("connect executor service");
    pb::executor_client::ExecutorClient::new(channel)
}

type Session = (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::ControllerMessage>,
);

/// Opens a session as an agent would and waits for the assignment.
async fn hello(client: &mut Client, hello: pb::Hello) -> Result<Session, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    })
    .await
    .expect("send hello");
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(_) => Ok((tx, inbound)),
        None => Err(tonic::Status::aborted("no assignment")),
    }
}

/// Sends an outcome and returns the controller's Ack.
async fn report(session: &mut Session, outcome: pb::outcome::Outcome) -> pb::Ack {
    session
        .0
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Outcome(pb::Outcome {
                outcome: Some(outcome),
            })),
        })
        .await
        .expect("send outcome");
    loop {
        match session.1.message().await.expect("ack") {
            Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Ack(a)),
            }) => return a,
            Some(_) => continue,
            None => panic!("no ack"),
        }
    }
}

/// What an agent of one build Pod knows: its token Secret's content, the
/// Pod's labels, the ImageBuild's UID.
#[derive(Debug, Clone)]
struct Agent {
    pod: String,
    token: String,
    ca: Vec<u8>,
    image_build: String,
    uid: String,
    build_id: String,
    platform: String,
    attempt: u32,
}

impl Agent {
    fn hello(&self, ns: &str) -> pb::Hello {
        pb::Hello {
            token: self.token.clone(),
            namespace: ns.to_string(),
            image_build: self.image_build.clone(),
            build_id: self.build_id.clone(),
            platform: self.platform.clone(),
            attempt: self.attempt,
            agent_version: "test".into(),
            pod: self.pod.clone(),
            image_build_uid: self.uid.clone(),
        }
    }
}

/// The agent of `name`'s build Pod of `attempt`, once its token Secret
/// exists and the status records the attempt.
async fn agent_of(env: &TestEnv, name: &str, attempt: u32) -> Agent {
    eventually(
        &format!("{name} attempt {attempt} recorded"),
        BUILD,
        || async {
            let s = status(env, name).await?;
            (s.platforms.first()?.attempts >= i32::try_from(attempt).ok()?).then_some(())
        },
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let uid = env
        .builds()
        .get(name)
        .await
        .expect("ImageBuild")
        .uid()
        .expect("uid");
    eventually(
        &format!("token of {name} attempt {attempt}"),
        BUILD,
        || async {
            let selector =
                format!("build.tripod.dev/name={name},build.tripod.dev/attempt={attempt}");
            let list = secrets
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items;
            let s = list.first()?.clone();
            let data = s.data.clone()?;
            let labels = s.labels();
            Some(Agent {
                pod: s.name_any(),
                token: String::from_utf8_lossy(&data.get("token")?.0).to_string(),
                ca: data.get("ca.crt")?.0.clone(),
                image_build: name.to_string(),
                uid: uid.clone(),
                build_id: labels.get("build.tripod.dev/build-id")?.clone(),
                platform: "linux/arm64".into(),
                attempt,
            })
        },
    )
    .await
}

/// One plain HTTP/1.0 request with a body: (status, headers, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    tripod_harness::http_send(addr, method, path, content_type, body).expect("registry request")
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Pushes an image made by someone else (an empty linux/arm64 image with
/// no build ID label) to `registry/repo:tag`; returns its manifest digest.
fn push_foreign_image(registry: &str, repo: &str, tag: &str) -> String {
    let config = br#"{"architecture":"arm64","os":"linux","config":{"Labels":{"made-by":"someone else"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256(config);
    let (code, head, _) = http(
        registry,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        "application/octet-stream",
        b"",
    );
    assert_eq!(code, 202, "{head}");
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("upload location")
        .trim()
        .to_string();
    let path = location
        .split_once("://")
        .map(|(_, rest)| rest[rest.find('/').unwrap_or(0)..].to_string())
        .unwrap_or(location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let (code, head, _) = http(
        registry,
        "PUT",
        &format!("{path}{sep}digest={config_digest}"),
        "application/octet-stream",
        config,
    );
    assert_eq!(code, 201, "{head}");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [],
    }))
    .expect("manifest");
    let (code, head, _) = http(
        registry,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(code, 201, "{head}");
    sha256(&manifest)
}

async fn status(env: &TestEnv, name: &str) -> Option<tripod::api::ImageBuildStatus> {
    env.builds().get(name).await.ok()?.status
}

/// An inline build on the simulated arm64 node, where nothing runs its Pod:
/// the test plays its agent.
fn simulated(name: &str, registry: &str, extra: &str) -> String {
    crate::common::real_node_build(name, registry, "FROM scratch\nCOPY hello.txt /\n", extra)
        .replace(ON_REAL_NODE, "")
        .replace("platforms: [linux/amd64]", "platforms: [linux/arm64]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_token_secret_is_not_used_and_placement_is_policed() {
    let mut env = TestEnv::with_builds("planted").await;
    let registry = env.shared.registry.clone().expect("registry");
    // A Secret under the name the build Pod's token Secret will have, made
    // by someone else before the build: its CA and token must not reach
    // the build.
    let planted = "planted-1-linux-arm64-1";
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {planted}\n  labels: {{app.kubernetes.io/managed-by: tripod}}\nstringData:\n  token: v1.x.y\n  ca.crt: not-the-executor-ca\n"
    ));
    env.start_controller("c1");
    env.apply(&simulated("planted", &registry, ""));
    let s = eventually("the Pod is refused", BUILD, || async {
        let s = status(&env, "planted").await?;
        let stalled = s.conditions.iter().find(|c| c.type_ == "Stalled")?;
        (stalled.status == "True").then_some(s)
    })
    .await;
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains(planted) && msg.contains("already exists"),
        "{msg}"
    );
    assert!(
        env.pods_of("planted").await.is_empty(),
        "no Pod mounts the planted Secret"
    );
    // Once it is gone, the build goes on with a token Secret of its own.
    let (ok, out) = env.kubectl(&["delete", "secret", planted], None);
    assert!(ok, "{out}");
    let agent = agent_of(&env, "planted", 1).await;
    assert!(agent.token.starts_with("v1.") && agent.token != "v1.x.y");
    eventually("the build Pod is made", BUILD, || async {
        (!env.pods_of("planted").await.is_empty()).then_some(())
    })
    .await;

    // A build that asks to run on control-plane nodes stalls, naming the
    // field; no Pod is made.
    env.apply(&simulated(
        "bossy",
        &registry,
        "  executor:\n    tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]\n",
    ));
    let (ok, out) = env.wait_for("condition=Stalled", "ib/bossy", "60s");
    let s = status(&env, "bossy").await.expect("status");
    assert!(ok, "{out}\n{s:#?}");
    let stalled = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert!(
        stalled
            .message
            .starts_with("spec.executor.tolerations[0].key: "),
        "{}",
        stalled.message
    );
    assert!(env.pods_of("bossy").await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_abuse_is_refused_and_legitimate_builds_succeed() {
    let mut env = TestEnv::with_builds("abuse").await;
    let registry = env.shared.registry.clone().expect("registry");
    let c = env.start_controller("c1");
    let port = env.controller(c).executor_port;
    let host = env.shared.info.node_ip.clone();
    let ns = env.ns.clone();
    env.apply(&simulated("one", &registry, "  retries: 1\n"));
    env.apply(&simulated("two", &registry, ""));
    env.apply(&simulated("forged", &registry, ""));
    let one = agent_of(&env, "one", 1).await;
    let two = agent_of(&env, "two", 1).await;
    let mut client = executor_client(&host, port, one.ca.clone()).await;

    // 200 streams that never say hello, over 50 connections, while a real
    // build runs beside them: each is ended by the service.
    let mut idle = Vec::new();
    for _ in 0..50 {
        let c = executor_client(&host, port, one.ca.clone()).await;
        for _ in 0..4 {
            let mut c = c.clone();
            idle.push(tokio::spawn(async move {
                let (_silent, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
                let answer = tokio::time::timeout(
                    Duration::from_secs(90),
                    c.session(ReceiverStream::new(rx)),
                )
                .await
                .map_err(|_| "still open after 90 s".to_string())?;
                let status = match answer {
                    Err(status) => status,
                    Ok(r) => r
                        .into_inner()
                        .message()
                        .await
                        .err()
                        .ok_or("an assignment without hello")?,
                };
                Ok::<_, String>(status.code())
            }));
        }
    }
    env.apply(&crate::common::real_node_build(
        "legit",
        &registry,
        "FROM BASE\nRUN echo built > /built.txt\n",
        "",
    ));

    // A Hello whose namespace would reshape the API request: refused by
    // field, before any API call.
    let mut bad = one.hello(&ns);
    bad.namespace = "default/secrets#".into();
    let err = hello(&mut client, bad)
        .await
        .expect_err("malformed namespace");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello.namespace"), "{err:?}");

    // One's token speaking for two, for another platform, for attempt 2.
    let mut as_two = two.hello(&ns);
    as_two.token = one.token.clone();
    let mut other_platform = one.hello(&ns);
    other_platform.platform = "linux/amd64".into();
    let mut other_attempt = one.hello(&ns);
    other_attempt.attempt = 2;
    for (what, h) in [
        ("another build", as_two),
        ("another platform", other_platform),
        ("another attempt", other_attempt),
    ] {
        let err = hello(&mut client, h).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err:?}");
    }

    // One live session per build Pod.
    let mut first = hello(&mut client, one.hello(&ns)).await.expect("own token");
    let err = hello(&mut client, one.hello(&ns))
        .await
        .expect_err("a second live session");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Attempt 1 fails; attempt 2 is created with a token of its own, and
    // attempt 1's token no longer opens a session.
    let ack = report(
        &mut first,
        pb::outcome::Outcome::Failed(pb::Failed {
            reason: "StepFailed".into(),
            step: "STEP 1/1".into(),
            message: "first attempt fails".into(),
            last_lines: vec![],
        }),
    )
    .await;
    assert!(!ack.accepted);
    drop(first);
    let one_2 = agent_of(&env, "one", 2).await;
    assert_ne!(one_2.token, one.token);
    eventually("attempt 2 recorded", BUILD, || async {
        (status(&env, "one").await?.platforms.first()?.attempts == 2).then_some(())
    })
    .await;
    let err = hello(&mut client, one.hello(&ns))
        .await
        .expect_err("an older attempt");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // A digest the registry does not have: refused, and the attempt fails.
    let mut second = hello(&mut client, one_2.hello(&ns))
        .await
        .expect("attempt 2's token");
    let ack = report(
        &mut second,
        pb::outcome::Outcome::Pushed(pb::Pushed {
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
        }),
    )
    .await;
    assert!(!ack.accepted, "{ack:?}");
    let s = eventually("build one failed", BUILD, || async {
        let s = status(&env, "one").await?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(msg.contains("DigestNotConfirmed"), "{msg}");
    assert!(s.image.is_none());

    // An image that is in the registry under the build's tag, but was not
    // made by this build (no build ID label of its own): refused.
    let foreign = push_foreign_image(&registry, "team/two", "1");
    let mut session = hello(&mut client, two.hello(&ns))
        .await
        .expect("two's token");
    let ack = report(
        &mut session,
        pb::outcome::Outcome::Pushed(pb::Pushed {
            digest: foreign.clone(),
            size: 1,
        }),
    )
    .await;
    assert!(!ack.accepted, "{ack:?}");
    assert!(ack.message.contains("not this build's"), "{ack:?}");
    let s = eventually("build two failed", BUILD, || async {
        let s = status(&env, "two").await?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("DigestNotConfirmed") && msg.contains("not this build's"),
        "{msg}"
    );

    // A result annotation written with `pods/patch`, not by the executor
    // service: not accepted.
    let forged = agent_of(&env, "forged", 1).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let fake = format!(r#"{{"digest":"sha256:{}","size":1}}"#, "1".repeat(64));
    pods.patch(
        &forged.pod,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
            "build.tripod.dev/result": fake,
            "build.tripod.dev/result-mac": "00".repeat(32),
        }}})),
    )
    .await
    .expect("patch the result annotation");
    let s = eventually("forged build failed", BUILD, || async {
        let s = status(&env, "forged").await?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let msg = s.platforms[0].message.clone().unwrap_or_default();
    assert!(msg.contains("ResultNotSigned"), "{msg}");
    assert!(
        s.image.is_none() && s.platforms[0].digest.is_none(),
        "{s:#?}"
    );

    // The idle streams were all ended by the service.
    for task in idle {
        let code = task.await.expect("idle stream task").expect("idle stream");
        assert_eq!(code, tonic::Code::DeadlineExceeded);
    }

    // The legitimate build succeeded, once; replaying its session after
    // success is refused.
    let (ok, out) = env.wait_for("condition=Ready", "ib/legit", "240s");
    assert!(ok, "{out}\n{:#?}", status(&env, "legit").await);
    assert_reported_once(&env, "legit").await;
    let mut legit = agent_of(&env, "legit", 1).await;
    legit.platform = "linux/amd64".into();
    let err = hello(&mut client, legit.hello(&ns))
        .await
        .expect_err("a replayed session");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    env.cleanup().await;
}
