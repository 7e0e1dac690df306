//! `tripod::registry` against real registries (Debian's docker-registry on
//! loopback, one anonymous, one behind htpasswd auth) holding images pushed
//! by buildah: resolves the pushed digest (OCI and Docker manifests, image
//! index), tells mismatches, unknown tags and refused credentials apart.
#![allow(clippy::zombie_processes)] // fixture processes live as long as the test binary

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use tripod::registry::{Credentials, RegistryClient, RegistryError, credentials_for};

const USER: &str = "builder";
const PASSWORD: &str = "s3cret";

struct Fixture {
    registry: String,
    auth_registry: String,
    /// Digest of `{registry}/t/a:1` (OCI manifest).
    oci: String,
    /// Digest of `{registry}/t/a:v2s2` (Docker schema 2 manifest).
    docker: String,
    /// Digest of `{registry}/t/idx:1` (an image index).
    index: String,
    /// Digest of `{auth_registry}/t/private:1`.
    private: String,
    _children: Vec<Child>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn start_registry(dir: &Path, name: &str, htpasswd: Option<&Path>) -> (String, Child) {
    let r = tripod_harness::start_registry(dir, name, 0, htpasswd).expect("start docker-registry");
    (r.address, r.child)
}

/// Runs buildah with the fixture's storage; panics with its output on failure.
fn buildah(dir: &Path, args: &[&str]) {
    let out = Command::new("buildah")
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run buildah");
    assert!(
        out.status.success(),
        "buildah {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes local image `image` to `dest`, returning the digest buildah wrote.
fn push(dir: &Path, image: &str, dest: &str, extra: &[&str]) -> String {
    let file = dir.join(format!("digest-{}", dest.replace(['/', ':'], "_")));
    let file_s = file.display().to_string();
    let target = format!("docker://{dest}");
    let mut args = vec!["push", "--tls-verify=false", "--digestfile", &file_s];
    args.extend_from_slice(extra);
    args.extend([image, target.as_str()]);
    buildah(dir, &args);
    let digest = std::fs::read_to_string(&file).expect("digest file");
    assert!(digest.starts_with("sha256:"), "{digest:?}");
    digest.trim().to_string()
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tripod-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let (registry, r1) = start_registry(&dir, "registry", None);
        let htpasswd = dir.join("htpasswd");
        let out = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("htpasswd (apache2-utils)");
        std::fs::write(&htpasswd, &out.stdout).expect("htpasswd file");
        let (auth_registry, r2) = start_registry(&dir, "auth-registry", Some(&htpasswd));

        let ctx = dir.join("ctx");
        std::fs::create_dir_all(&ctx).expect("ctx");
        std::fs::write(ctx.join("a"), "a\n").expect("a");
        std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY a /a\n").expect("file");
        let local = "localhost/tripod-registry-test/a:1";
        let ctx_s = ctx.display().to_string();
        buildah(
            &dir,
            &["bud", "--isolation", "chroot", "-t", local, ctx_s.as_str()],
        );
        let oci = push(&dir, local, &format!("{registry}/t/a:1"), &[]);
        let docker = push(
            &dir,
            local,
            &format!("{registry}/t/a:v2s2"),
            &["--format", "v2s2"],
        );
        let creds = format!("{USER}:{PASSWORD}");
        let private = push(
            &dir,
            local,
            &format!("{auth_registry}/t/private:1"),
            &["--creds", &creds],
        );

        // An image index holding the image.
        let list = "localhost/tripod-registry-test/list:1";
        buildah(&dir, &["manifest", "create", list]);
        buildah(&dir, &["manifest", "add", list, local]);
        let file = dir.join("digest-index");
        let file_s = file.display().to_string();
        let dest = format!("docker://{registry}/t/idx:1");
        buildah(
            &dir,
            &[
                "manifest",
                "push",
                "--all",
                "--tls-verify=false",
                "--digestfile",
                &file_s,
                list,
                &dest,
            ],
        );
        let index = std::fs::read_to_string(&file)
            .expect("index digest file")
            .trim()
            .to_string();

        Fixture {
            registry,
            auth_registry,
            oci,
            docker,
            index,
            private,
            _children: vec![r1, r2],
        }
    })
}

fn client(fx: &Fixture) -> RegistryClient {
    RegistryClient::new(vec![fx.registry.clone(), fx.auth_registry.clone()])
}

/// A `.dockerconfigjson` with `user:password` for `key`, in `auth` form.
fn docker_config(key: &str, user: &str, password: &str) -> Vec<u8> {
    let auth = base64(&format!("{user}:{password}"));
    serde_json::to_vec(&serde_json::json!({ "auths": { key: { "auth": auth } } }))
        .expect("docker config")
}

fn base64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn resolve_answers_the_pushed_digest() {
    let fx = fixture();
    let c = client(fx);
    let reference = format!("{}/t/a:1", fx.registry);
    assert_eq!(c.resolve(&reference, None).await.expect("resolve"), fx.oci);
    c.verify(&reference, &fx.oci, None).await.expect("verify");
}

#[tokio::test]
async fn docker_manifests_and_indexes_resolve() {
    let fx = fixture();
    let c = client(fx);
    let docker = format!("{}/t/a:v2s2", fx.registry);
    assert_eq!(c.resolve(&docker, None).await.expect("v2s2"), fx.docker);
    let index = format!("{}/t/idx:1", fx.registry);
    // The index itself, not the image it lists.
    assert_eq!(c.resolve(&index, None).await.expect("index"), fx.index);
    assert_ne!(fx.index, fx.oci);
    c.verify(&index, &fx.index, None)
        .await
        .expect("verify index");
}

#[tokio::test]
async fn another_digest_is_a_mismatch_naming_both() {
    let fx = fixture();
    let reference = format!("{}/t/a:1", fx.registry);
    let other = format!("sha256:{}", "0".repeat(64));
    let err = client(fx)
        .verify(&reference, &other, None)
        .await
        .expect_err("mismatch");
    match &err {
        RegistryError::DigestMismatch {
            reference: r,
            expected,
            actual,
        } => {
            assert_eq!(r, &reference);
            assert_eq!(expected, &other);
            assert_eq!(actual, &fx.oci);
        }
        e => panic!("expected DigestMismatch, got {e:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&reference) && text.contains(&other) && text.contains(&fx.oci),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_tag_or_repository_is_not_found() {
    let fx = fixture();
    let c = client(fx);
    for reference in [
        format!("{}/t/a:nope", fx.registry),
        format!("{}/t/never-pushed:1", fx.registry),
    ] {
        let err = c.resolve(&reference, None).await.expect_err("not found");
        assert!(
            matches!(&err, RegistryError::NotFound { reference: r } if r == &reference),
            "{err:?}"
        );
        assert!(err.to_string().contains(&reference), "{err}");
    }
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthorized() {
    let fx = fixture();
    let c = client(fx);
    let reference = format!("{}/t/private:1", fx.auth_registry);
    let wrong = Credentials {
        username: USER.into(),
        password: "wrong".into(),
    };
    for creds in [Some(&wrong), None] {
        let err = c
            .resolve(&reference, creds)
            .await
            .expect_err("unauthorized");
        assert!(
            matches!(&err, RegistryError::Unauthorized { reference: r } if r == &reference),
            "{creds:?}: {err:?}"
        );
        assert!(err.to_string().contains(&reference), "{err}");
    }
}

#[tokio::test]
async fn credentials_from_docker_config_resolve() {
    let fx = fixture();
    let c = client(fx);
    let reference = format!("{}/t/private:1", fx.auth_registry);
    for key in [
        fx.auth_registry.clone(),
        format!("http://{}", fx.auth_registry),
        format!("https://{}/v1/", fx.auth_registry),
    ] {
        let doc = docker_config(&key, USER, PASSWORD);
        let creds = credentials_for(&doc, &fx.auth_registry)
            .expect("config")
            .expect("credentials for the auth registry");
        assert_eq!(
            c.resolve(&reference, Some(&creds))
                .await
                .expect("resolve with creds"),
            fx.private
        );
        c.verify(&reference, &fx.private, Some(&creds))
            .await
            .expect("verify with creds");
    }
    // The same client refuses wrong credentials afterwards: nothing is cached.
    let doc = docker_config(&fx.auth_registry, USER, "wrong");
    let wrong = credentials_for(&doc, &fx.auth_registry)
        .expect("config")
        .expect("creds");
    assert!(matches!(
        c.resolve(&reference, Some(&wrong)).await,
        Err(RegistryError::Unauthorized { .. })
    ));
}

#[tokio::test]
async fn https_to_a_plain_http_registry_is_a_transport_error() {
    let fx = fixture();
    let reference = format!("{}/t/a:1", fx.registry);
    let err = RegistryClient::new(vec![])
        .resolve(&reference, None)
        .await
        .expect_err("TLS to a plain HTTP server");
    match &err {
        RegistryError::Transport { reference: r, .. } => assert_eq!(r, &reference),
        e => panic!("expected Transport, got {e:?}"),
    }
    assert!(err.to_string().contains("insecure registry"), "{err}");
}

#[tokio::test]
async fn unreachable_registry_is_a_transport_error() {
    let port = free_port(); // nothing listens there any more
    let reference = format!("127.0.0.1:{port}/t/a:1");
    let err = RegistryClient::new(vec![format!("127.0.0.1:{port}")])
        .resolve(&reference, None)
        .await
        .expect_err("connection refused");
    assert!(
        matches!(&err, RegistryError::Transport { reference: r, .. } if r == &reference),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_reference_is_refused() {
    let err = RegistryClient::new(vec![])
        .resolve("Not A/Reference", None)
        .await
        .expect_err("invalid");
    assert!(
        matches!(err, RegistryError::InvalidReference { .. }),
        "{err:?}"
    );
}
