//! `tripod buildd` with both Linux backends — real buildah, and a real
//! BuildKit daemon (built from its Go module, OCI worker on runc) — and a
//! real registry (Debian's docker-registry): each scenario runs once per
//! backend. Builds push, report digests the registry confirms, fail with
//! the failing step, refuse wrong credentials, cancel, and export and
//! import a registry layer cache.
#![allow(clippy::zombie_processes)] // fixture processes live as long as the test binary

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_stream::StreamExt;
use tripod::buildd::spawn;
use tripod::proto::buildd::v1 as pb;
use tripod::tls::TlsDir;

struct Fixture {
    dir: PathBuf,
    registry: String,
    auth_registry: String,
    buildah: Server,
    buildkit: Server,
    buildkitd: tripod_harness::buildkit::Buildkitd,
    base: String,
    _children: Vec<Child>,
}

/// A running buildd.
#[derive(Clone)]
struct Server {
    addr: SocketAddr,
    tls: TlsDir,
}

/// The backends every scenario runs with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Buildah,
    Buildkit,
}

/// Runs the scenario `$name(kind)` once per backend, as `$name::buildah`
/// and `$name::buildkit`.
macro_rules! each_backend {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn buildah() {
                super::$name(super::Kind::Buildah).await
            }
            #[tokio::test]
            async fn buildkit() {
                super::$name(super::Kind::Buildkit).await
            }
        }
    };
}

impl Fixture {
    fn server(&self, kind: Kind) -> &Server {
        match kind {
            Kind::Buildah => &self.buildah,
            Kind::Buildkit => &self.buildkit,
        }
    }
}

/// Starts `tripod buildd` with `args`, its files under `dir/name`.
fn start_buildd(dir: &Path, name: &str, args: &[String]) -> (Server, Child) {
    let tls_dir = dir.join(name).join("tls");
    std::fs::create_dir_all(dir.join(name)).expect("buildd dir");
    let mut cmd = tripod_harness::supervised_command(env!("CARGO_BIN_EXE_tripod"));
    cmd.args(["buildd", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&tls_dir)
        .arg("--work-dir")
        .arg(dir.join(name).join("work"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"));
    let mut child = tripod_harness::spawn_supervised(cmd).expect("start buildd");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("buildd exited before LISTENING")
            .expect("read");
        if let Some(addr) = spawn::parse_listening(&line) {
            break addr;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (
        Server {
            addr,
            tls: TlsDir::new(tls_dir),
        },
        child,
    )
}

fn buildah_args(dir: &Path) -> Vec<String> {
    vec![
        "--storage-root".into(),
        dir.join("storage").display().to_string(),
        "--runroot".into(),
        dir.join("run").display().to_string(),
    ]
}

fn buildkit_args(d: &tripod_harness::buildkit::Buildkitd) -> Vec<String> {
    vec![
        "--backend".into(),
        "buildkit".into(),
        "--buildkit-addr".into(),
        d.address.clone(),
        "--buildctl".into(),
        d.buildctl.display().to_string(),
    ]
}

fn source_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn start_registry(dir: &Path, name: &str, htpasswd: Option<&Path>) -> (String, Child) {
    let r = tripod_harness::start_registry(dir, name, 0, htpasswd).expect("start docker-registry");
    (r.address, r.child)
}

/// A plain HTTP request to a registry: (status, headers, body).
fn http(addr: &str, method: &str, path: &str, accept: &str) -> (u16, String, Vec<u8>) {
    tripod_harness::http_request(addr, method, path, accept).expect("registry request")
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// The digest the registry answers for `repo:tag`.
fn registry_digest(addr: &str, repo: &str, tag: &str) -> Option<String> {
    let (code, head, _) = http(
        addr,
        "HEAD",
        &format!("/v2/{repo}/manifests/{tag}"),
        MANIFEST_TYPES,
    );
    if code != 200 {
        return None;
    }
    head.lines()
        .find_map(|l| {
            l.strip_prefix("Docker-Content-Digest: ")
                .or_else(|| l.strip_prefix("docker-content-digest: "))
        })
        .map(|d| d.trim().to_string())
}

/// The image config JSON of `repo:tag`.
fn image_config(addr: &str, repo: &str, tag: &str) -> serde_json::Value {
    let (code, _, body) = http(
        addr,
        "GET",
        &format!("/v2/{repo}/manifests/{tag}"),
        MANIFEST_TYPES,
    );
    assert_eq!(code, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest json");
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let (code, _, body) = http(addr, "GET", &format!("/v2/{repo}/blobs/{config}"), "*/*");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).expect("config json")
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        // Fixtures of earlier runs (the fixture lives as long as the
        // process, so nothing removes it at the end): gone once their
        // process is.
        if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("tripod-buildd-")
                    && pid.parse::<u32>().is_ok()
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("tripod-buildd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let (registry, r1) = start_registry(&dir, "registry", None);
        let htpasswd = dir.join("htpasswd");
        let out = Command::new("htpasswd")
            .args(["-Bbn", "builder", "s3cret"])
            .output()
            .expect("htpasswd (apache2-utils)");
        std::fs::write(&htpasswd, &out.stdout).expect("htpasswd file");
        let (auth_registry, r2) = start_registry(&dir, "auth-registry", Some(&htpasswd));

        let (buildah, b1) = start_buildd(&dir, "buildah", &buildah_args(&dir));
        let buildkitd = tripod_harness::buildkit::start_buildkitd(
            source_dir(),
            &dir.join("buildkitd"),
            &[registry.clone(), auth_registry.clone()],
        )
        .expect("start buildkitd");
        let (buildkit, b2) = start_buildd(&dir, "buildkit", &buildkit_args(&buildkitd));

        // A base image with a shell: busybox from Debian's busybox-static.
        let ctx = dir.join("base-ctx");
        std::fs::create_dir_all(ctx.join("rootfs/bin")).expect("rootfs");
        std::fs::copy("/bin/busybox", ctx.join("rootfs/bin/busybox")).expect("busybox-static");
        for applet in ["sh", "echo", "cat", "false", "true", "sleep", "test", "ls"] {
            std::os::unix::fs::symlink("busybox", ctx.join("rootfs/bin").join(applet))
                .expect("symlink");
        }
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n",
        )
        .expect("Dockerfile");
        let base = format!("{registry}/base/busybox:1");
        let fx = Fixture {
            dir,
            registry,
            auth_registry,
            buildah,
            buildkit,
            buildkitd,
            base: base.clone(),
            _children: vec![r1, r2, b1, b2],
        };
        // Built on a thread of its own: tests call this from inside their runtime.
        let req = request(&fx, "base", &ctx, vec![base]);
        let server = fx.buildah.clone();
        let outcome = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(build_at(&server, req))
        })
        .join()
        .expect("base build thread");
        assert!(outcome.result.is_some(), "base image: {outcome:?}");
        fx
    })
}

fn request(fx: &Fixture, id: &str, ctx: &Path, tags: Vec<String>) -> pb::BuildRequest {
    let _ = fx;
    pb::BuildRequest {
        build_id: format!("{id}-{}", std::process::id()),
        context_dir: ctx.display().to_string(),
        dockerfile: "Dockerfile".into(),
        platform: "linux/amd64".into(),
        tags,
        insecure: true,
        ..Default::default()
    }
}

fn context(fx: &Fixture, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let ctx = fx.dir.join(format!("ctx-{name}"));
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), dockerfile.replace("BASE", &fx.base))
        .expect("Dockerfile");
    for (n, c) in files {
        std::fs::write(ctx.join(n), c).expect("file");
    }
    ctx
}

#[derive(Debug, Default)]
struct Outcome {
    steps: Vec<String>,
    logs: Vec<String>,
    result: Option<pb::BuildResult>,
    failure: Option<pb::BuildFailure>,
}

async fn build(fx: &Fixture, kind: Kind, req: pb::BuildRequest) -> Outcome {
    build_at(fx.server(kind), req).await
}

async fn build_at(server: &Server, req: pb::BuildRequest) -> Outcome {
    let mut client = spawn::connect(server.addr, &server.tls)
        .await
        .expect("mTLS connect");
    let mut stream = client.build(req).await.expect("Build").into_inner();
    let mut out = Outcome::default();
    while let Some(ev) = stream.next().await {
        match ev.expect("event").event {
            Some(pb::build_event::Event::Step(s)) => out.steps.push(s.text),
            Some(pb::build_event::Event::Log(l)) => out.logs.push(l.line),
            Some(pb::build_event::Event::Result(r)) => out.result = Some(r),
            Some(pb::build_event::Event::Failure(f)) => out.failure = Some(f),
            None => {}
        }
    }
    out
}

/// `team/NAME-BACKEND`: each backend pushes to repositories of its own.
fn repo(kind: Kind, name: &str) -> String {
    format!("team/{name}-{}", format!("{kind:?}").to_lowercase())
}

fn ctx_for(
    fx: &Fixture,
    kind: Kind,
    name: &str,
    dockerfile: &str,
    files: &[(&str, &str)],
) -> PathBuf {
    context(
        fx,
        &format!("{name}-{}", format!("{kind:?}").to_lowercase()),
        dockerfile,
        files,
    )
}

each_backend!(inline_build_digest_is_what_the_registry_answers);
async fn inline_build_digest_is_what_the_registry_answers(kind: Kind) {
    let fx = fixture();
    let ctx = ctx_for(
        fx,
        kind,
        "hello",
        "FROM scratch\nCOPY hello.txt /hello.txt\n",
        &[("hello.txt", "hi\n")],
    );
    let repo = repo(kind, "hello");
    let tag = format!("{}/{repo}:1", fx.registry);
    let mut req = request(
        fx,
        "hello",
        &ctx,
        vec![tag.clone(), format!("{}/{repo}:latest", fx.registry)],
    );
    req.labels
        .insert("org.opencontainers.image.title".into(), "hello".into());
    let out = build(fx, kind, req).await;
    let result = out
        .result
        .unwrap_or_else(|| panic!("no result: {:?} {:?}", out.failure, out.logs));
    assert!(
        out.steps.iter().any(|s| s.contains("COPY hello.txt")),
        "{:?}",
        out.steps
    );
    assert_eq!(result.reference, tag);
    assert!(result.size > 0);
    let confirmed = registry_digest(&fx.registry, &repo, "1");
    assert_eq!(confirmed.as_deref(), Some(result.digest.as_str()));
    assert_eq!(
        registry_digest(&fx.registry, &repo, "latest").as_deref(),
        Some(result.digest.as_str())
    );
    let config = image_config(&fx.registry, &repo, "1");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.title"],
        "hello"
    );
    assert_eq!(config["os"], "linux");
}

each_backend!(multi_stage_target_and_build_args_reach_the_image);
async fn multi_stage_target_and_build_args_reach_the_image(kind: Kind) {
    let fx = fixture();
    let dockerfile = "FROM BASE AS build\nARG VERSION=0\nRUN echo \"version=$VERSION\" > /version\n\
                      FROM BASE AS final\nARG VERSION=0\nLABEL app.version=$VERSION\nENV APP_VERSION=$VERSION\nCOPY --from=build /version /version\n\
                      FROM BASE AS broken\nRUN false\n";
    let ctx = ctx_for(fx, kind, "multi", dockerfile, &[]);
    let repo = repo(kind, "multi");
    let mut req = request(fx, "multi", &ctx, vec![format!("{}/{repo}:1", fx.registry)]);
    req.target = "final".into();
    req.build_args.push(pb::BuildArg {
        name: "VERSION".into(),
        value: "1.2.3".into(),
    });
    let out = build(fx, kind, req).await;
    let result = out
        .result
        .unwrap_or_else(|| panic!("no result: {:?} {:?}", out.failure, out.logs));
    assert_eq!(
        registry_digest(&fx.registry, &repo, "1").as_deref(),
        Some(result.digest.as_str())
    );
    let config = image_config(&fx.registry, &repo, "1");
    assert_eq!(
        config["config"]["Labels"]["app.version"], "1.2.3",
        "{config}"
    );
    let env = config["config"]["Env"].to_string();
    assert!(env.contains("APP_VERSION=1.2.3"), "{env}");
    assert!(
        !out.steps.iter().any(|s| s.contains("RUN false")),
        "the broken stage was built: {:?}",
        out.steps
    );
}

each_backend!(failing_run_names_the_step);
async fn failing_run_names_the_step(kind: Kind) {
    let fx = fixture();
    let ctx = ctx_for(
        fx,
        kind,
        "fail",
        "FROM BASE\nRUN echo about to fail && false\nRUN echo never\n",
        &[],
    );
    let repo = repo(kind, "fail");
    let out = build(
        fx,
        kind,
        request(fx, "fail", &ctx, vec![format!("{}/{repo}:1", fx.registry)]),
    )
    .await;
    assert!(out.result.is_none());
    let f = out.failure.expect("failure");
    assert_eq!(f.reason(), pb::FailureReason::StepFailed);
    assert!(f.step.contains("RUN echo about to fail && false"), "{f:?}");
    assert!(
        f.last_lines.iter().any(|l| l.contains("about to fail")),
        "{f:?}"
    );
    assert!(registry_digest(&fx.registry, &repo, "1").is_none());
}

each_backend!(push_by_digest_writes_no_tag);
async fn push_by_digest_writes_no_tag(kind: Kind) {
    let fx = fixture();
    // FROM a base: its layers are uploaded too (a blob the repository
    // lacks), with the build's own layer.
    let ctx = ctx_for(
        fx,
        kind,
        "bydigest",
        "FROM BASE\nCOPY hello.txt /hello.txt\n",
        &[("hello.txt", "by digest\n")],
    );
    let repo = repo(kind, "bydigest");
    let tag = format!("{}/{repo}:1", fx.registry);
    let mut req = request(fx, "bydigest", &ctx, vec![tag.clone()]);
    req.push_by_digest = true;
    req.labels
        .insert("build.tripod.dev/build-id".into(), "0a1b2c3d4e5f".into());
    let out = build(fx, kind, req).await;
    let result = out
        .result
        .unwrap_or_else(|| panic!("no result: {:?} {:?}", out.failure, out.logs));
    assert_eq!(
        result.reference,
        format!("{}/{repo}@{}", fx.registry, result.digest)
    );
    // The repository holds the manifest under its digest, and no tag.
    assert_eq!(
        registry_digest(&fx.registry, &repo, &result.digest).as_deref(),
        Some(result.digest.as_str())
    );
    assert_eq!(registry_digest(&fx.registry, &repo, "1"), None);
    let (code, _, body) = http(&fx.registry, "GET", &format!("/v2/{repo}/tags/list"), "*/*");
    let tags: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert!(
        code == 404 || tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "{code} {tags}"
    );
    let config = image_config(&fx.registry, &repo, &result.digest);
    assert_eq!(
        config["config"]["Labels"]["build.tripod.dev/build-id"],
        "0a1b2c3d4e5f"
    );
    assert!(result.size > 1000, "base layers counted: {}", result.size);

    // With credentials, to a registry that requires them.
    let ctx = ctx_for(
        fx,
        kind,
        "bydigest-auth",
        "FROM scratch\nCOPY a /a\n",
        &[("a", "a")],
    );
    let private = format!(
        "team/bydigest-private-{}",
        format!("{kind:?}").to_lowercase()
    );
    let mut req = request(
        fx,
        "bydigest-auth",
        &ctx,
        vec![format!("{}/{private}:1", fx.auth_registry)],
    );
    req.push_by_digest = true;
    req.docker_config_json = format!(
        r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
        fx.auth_registry,
        base64("builder:s3cret")
    )
    .into_bytes();
    let out = build(fx, kind, req).await;
    let result = out.result.unwrap_or_else(|| panic!("{:?}", out.failure));
    assert!(result.reference.ends_with(&result.digest));
}

each_backend!(wrong_credentials_fail_the_push_and_right_ones_succeed);
async fn wrong_credentials_fail_the_push_and_right_ones_succeed(kind: Kind) {
    let fx = fixture();
    let ctx = ctx_for(fx, kind, "auth", "FROM scratch\nCOPY a /a\n", &[("a", "a")]);
    let creds = |user: &str, pass: &str| {
        use std::fmt::Write as _;
        let token = base64(&format!("{user}:{pass}"));
        let mut s = String::new();
        let _ = write!(
            s,
            r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#,
            fx.auth_registry
        );
        s.into_bytes()
    };
    let tag = format!("{}/{}:1", fx.auth_registry, repo(kind, "private"));
    let mut req = request(fx, "auth-bad", &ctx, vec![tag.clone()]);
    req.docker_config_json = creds("builder", "wrong");
    let out = build(fx, kind, req).await;
    let f = out.failure.expect("push must fail");
    assert_eq!(f.reason(), pb::FailureReason::PushFailed, "{f:?}");
    let text = format!("{} {}", f.message, f.last_lines.join(" ")).to_lowercase();
    assert!(
        text.contains("unauthorized") || text.contains("authentication required"),
        "{f:?}"
    );

    let mut req = request(fx, "auth-good", &ctx, vec![tag]);
    req.docker_config_json = creds("builder", "s3cret");
    let out = build(fx, kind, req).await;
    assert!(out.result.is_some(), "{:?}", out.failure);
}

fn base64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

each_backend!(cancel_stops_the_build);
async fn cancel_stops_the_build(kind: Kind) {
    let fx = fixture();
    let marker = format!("sleep 12{}", kind as u8);
    let ctx = ctx_for(
        fx,
        kind,
        "slow",
        &format!("FROM BASE\nRUN echo started-slow && {marker}\n"),
        &[],
    );
    let req = request(
        fx,
        "slow",
        &ctx,
        vec![format!("{}/{}:1", fx.registry, repo(kind, "slow"))],
    );
    let id = req.build_id.clone();
    let server = fx.server(kind);
    let mut client = spawn::connect(server.addr, &server.tls)
        .await
        .expect("connect");
    let mut stream = client.build(req).await.expect("Build").into_inner();
    let started = std::time::Instant::now();
    let mut failure = None;
    let mut cancelled = false;
    while let Some(ev) = stream.next().await {
        match ev.expect("event").event {
            Some(pb::build_event::Event::Log(l))
                if l.line.contains("started-slow") && !cancelled =>
            {
                let r = client
                    .cancel(pb::CancelRequest {
                        build_id: id.clone(),
                    })
                    .await
                    .expect("Cancel");
                assert!(r.into_inner().cancelled);
                cancelled = true;
            }
            Some(pb::build_event::Event::Failure(f)) => failure = Some(f),
            Some(pb::build_event::Event::Result(r)) => panic!("cancelled build succeeded: {r:?}"),
            _ => {}
        }
    }
    assert!(cancelled, "the RUN step never started");
    assert_eq!(
        failure.expect("failure").reason(),
        pb::FailureReason::Cancelled
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // No sleep of that build is left (BuildKit's daemon stops it as it
    // cancels the solve: polled, with a deadline).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        if !String::from_utf8_lossy(&ps.stdout).contains(&marker) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{marker} still runs 30 s after the build was cancelled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = client
        .cancel(pb::CancelRequest { build_id: id })
        .await
        .expect("Cancel");
    assert!(!again.into_inner().cancelled);
}

each_backend!(a_registry_cache_is_exported_and_a_fresh_builder_reuses_it);
/// A build with a cache repository exports its layers there; the same
/// Dockerfile on a builder with empty storage (a new buildd, or a new
/// buildkitd) imports them: its RUN layer is the first build's, although
/// that RUN writes the time.
async fn a_registry_cache_is_exported_and_a_fresh_builder_reuses_it(kind: Kind) {
    let fx = fixture();
    let ctx = ctx_for(
        fx,
        kind,
        "cache",
        "FROM BASE\nRUN echo $$-$RANDOM > /stamp\nCOPY a /a\n",
        &[("a", "a")],
    );
    let repo = repo(kind, "cached");
    let cache_repo = repo.replace("team/", "cache/");
    let cache = format!("{}/{cache_repo}", fx.registry);
    let layers = |tag: &str| -> Vec<String> {
        let (code, _, body) = http(
            &fx.registry,
            "GET",
            &format!("/v2/{repo}/manifests/{tag}"),
            MANIFEST_TYPES,
        );
        assert_eq!(code, 200);
        let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest");
        m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let mut req = request(
        fx,
        "cache-1",
        &ctx,
        vec![format!("{}/{repo}:1", fx.registry)],
    );
    req.cache_image = cache.clone();
    let out = build(fx, kind, req).await;
    assert!(out.result.is_some(), "{:?} {:?}", out.failure, out.logs);
    let (code, _, body) = http(
        &fx.registry,
        "GET",
        &format!("/v2/{cache_repo}/tags/list"),
        "*/*",
    );
    assert_eq!(code, 200, "no cache was exported to {cache}");
    assert!(String::from_utf8_lossy(&body).contains("\"tags\""));

    // A builder that has never seen this Dockerfile.
    let fresh_dir = fx.dir.join(format!("fresh-{kind:?}"));
    let (server, mut child, _daemon) = match kind {
        Kind::Buildah => {
            let (s, c) = start_buildd(&fresh_dir, "buildd", &buildah_args(&fresh_dir));
            (s, c, None)
        }
        Kind::Buildkit => {
            let d = tripod_harness::buildkit::start_buildkitd(
                source_dir(),
                &fresh_dir.join("buildkitd"),
                std::slice::from_ref(&fx.registry),
            )
            .expect("a second buildkitd");
            let (s, c) = start_buildd(&fresh_dir, "buildd", &buildkit_args(&d));
            (s, c, Some(d))
        }
    };
    let mut req = request(
        fx,
        "cache-2",
        &ctx,
        vec![format!("{}/{repo}:2", fx.registry)],
    );
    req.cache_image = cache;
    let out = build_at(&server, req).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.result.is_some(), "{:?} {:?}", out.failure, out.logs);
    let (first, second) = (layers("1"), layers("2"));
    assert_eq!(
        first[first.len() - 2],
        second[second.len() - 2],
        "the RUN layer was built again instead of taken from the cache"
    );
    let _ = fx.buildkitd.dir();
}

each_backend!(invalid_requests_name_the_field);
async fn invalid_requests_name_the_field(kind: Kind) {
    let fx = fixture();
    let server = fx.server(kind);
    let mut client = spawn::connect(server.addr, &server.tls)
        .await
        .expect("connect");
    let mut req = request(fx, "bad", &fx.dir, vec![format!("{}/a:1", fx.registry)]);
    req.platform = "linux/sparc".into();
    let err = client.build(req).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("platform:"), "{}", err.message());
}

#[tokio::test]
async fn spawned_buildd_handshakes_requires_client_certs_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("tripod-buildd-spawn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls_dir = dir.join("tls");
    let child = spawn::spawn(
        Path::new(env!("CARGO_BIN_EXE_tripod")),
        &tls_dir,
        &[
            "--storage-root".into(),
            dir.join("storage").display().to_string(),
            "--runroot".into(),
            dir.join("run").display().to_string(),
        ],
        Duration::from_secs(30),
    )
    .await
    .expect("spawn buildd");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&tls_dir)
        .expect("tls dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert!(child.addr.ip().is_loopback());
    let mut client = child.connect().await.expect("mTLS");
    let r = client
        .cancel(pb::CancelRequest {
            build_id: "none".into(),
        })
        .await
        .expect("Cancel");
    assert!(!r.into_inner().cancelled);

    // Without a client certificate the server refuses the connection.
    let ca = std::fs::read(tls_dir.join("ca.crt")).expect("ca");
    let no_cert = tonic::transport::ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let refused = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", child.addr))
            .ok()?
            .tls_config(no_cert)
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut c = pb::builder_client::BuilderClient::new(ch);
        c.cancel(pb::CancelRequest {
            build_id: "x".into(),
        })
        .await
        .ok()
    }
    .await;
    assert!(
        refused.is_none(),
        "a client without a certificate was served"
    );

    let pid = child.pid().expect("pid");
    assert!(
        child.shutdown(Duration::from_secs(10)).await,
        "buildd ignored SIGTERM"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}
