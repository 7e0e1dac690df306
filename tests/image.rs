//! The Dockerfile, built for real with buildah. Its base images
//! (`ARG RUST_IMAGE`, `ARG BASE_IMAGE`, both on docker.io) come from a local
//! Debian `docker-registry` configured as docker.io's mirror in a
//! registries.conf; `testenv/base-images.sh` seeds that registry once with a
//! debootstrap Debian and a Rust builder made from this machine's toolchain.
//! Nothing is pulled from Docker Hub.
//!
//! Checks what a user of the images would notice: the controller image is a
//! static binary run as a non-root user in an otherwise empty image; the
//! build Pods' image carries buildah, git and `tripod`; both push to a
//! registry.
//!
//! The build storage is kept in `~/.cache/tripod/images/build-storage` so
//! that a second run reuses the dependency layer and compiles only Tripod.
#![allow(clippy::zombie_processes)] // the registry lives as long as the test binary

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

const CONTROLLER: &str = "localhost/tripod:test";
const BUILDD: &str = "localhost/tripod-buildd:test";

struct Built {
    storage: PathBuf,
    runroot: PathBuf,
    registry: String,
    _registry: Child,
}

static BUILT: OnceLock<Built> = OnceLock::new();

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Built {
    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&self.storage)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "overlay"])
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.buildah().args(args).output().expect("run buildah");
        expect_success(&format!("buildah {args:?}"), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `command` in a new working container of `image` (chroot
    /// isolation, as `user`), returning its output.
    fn run_in(&self, image: &str, user: &str, command: &[&str]) -> Output {
        self.run_in_with(image, user, &[], command)
    }

    /// [`Built::run_in`] with extra `buildah run` options.
    fn run_in_with(&self, image: &str, user: &str, options: &[&str], command: &[&str]) -> Output {
        let ctr = self.run(&["from", "--pull=never", image]);
        let ctr = ctr.trim();
        let out = self
            .buildah()
            .args(["run", "--isolation", "chroot", "--user", user])
            .args(options)
            .args([ctr, "--"])
            .args(command)
            .output()
            .expect("run buildah run");
        self.run(&["rm", ctr]);
        out
    }

    fn config(&self, image: &str) -> serde_json::Value {
        let json = self.run(&["inspect", "--type", "image", image]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("inspect json");
        v["OCIv1"]["config"].clone()
    }

    /// The image's files: (path relative to its root, size) of every regular
    /// file, read from a mounted working container.
    fn files(&self, image: &str) -> Vec<(String, u64)> {
        let ctr = self.run(&["from", "--pull=never", image]);
        let ctr = ctr.trim();
        let root = PathBuf::from(self.run(&["mount", ctr]).trim());
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        self.run(&["umount", ctr]);
        self.run(&["rm", ctr]);
        files.sort();
        files
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    for entry in std::fs::read_dir(dir).expect("read image dir") {
        let entry = entry.expect("dir entry");
        let meta = std::fs::symlink_metadata(entry.path()).expect("stat");
        if meta.is_dir() {
            walk(root, &entry.path(), out);
        } else {
            let rel = entry.path().strip_prefix(root).expect("prefix").to_owned();
            out.push((rel.display().to_string(), meta.len()));
        }
    }
}

fn expect_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn built() -> &'static Built {
    BUILT.get_or_init(|| {
        let script = repo_root().join("testenv/base-images.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run testenv/base-images.sh");
        assert!(out.status.success(), "testenv/base-images.sh failed");
        let data = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let cache = data.parent().expect("cache dir").to_path_buf();
        let name = data
            .file_name()
            .and_then(|n| n.to_str())
            .expect("registry dir name")
            .to_string();
        let registry = tripod_harness::start_registry(&cache, &name, 0, None)
            .expect("start docker-registry");

        let tmp = std::env::temp_dir().join(format!("tripod-image-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("temp dir");
        // Every docker.io reference resolves through the local mirror first;
        // docker.io itself is not reachable from here.
        let registries_conf = tmp.join("registries.conf");
        std::fs::write(
            &registries_conf,
            format!(
                "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
                registry.address
            ),
        )
        .expect("write registries.conf");

        let built = Built {
            storage: cache.join("build-storage"),
            runroot: tmp.join("runroot"),
            registry: registry.address.clone(),
            _registry: registry.child,
        };
        // Working containers of an earlier run that was killed mid-build.
        let _ = built.buildah().args(["rm", "--all"]).output();
        // The build stage is tagged too: `rmi --prune` below then keeps its
        // layers (the compiled dependencies) for the next run.
        for (target, tag) in [
            ("build", "localhost/tripod-build-stage:cache"),
            ("buildd", BUILDD),
            ("controller", CONTROLLER),
        ] {
            let out = built
                .buildah()
                .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
                .args(["bud", "--layers", "--isolation", "chroot"])
                // Ask the registry for the base images every time (pull when
                // newer or missing): the mirror is exercised on every run.
                .arg("--pull=true")
                .args(["--target", target, "-t", tag, "-f"])
                .arg(repo_root().join("Dockerfile"))
                .arg(repo_root())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .output()
                .expect("run buildah bud");
            assert!(out.status.success(), "buildah bud --target {target} failed");
        }
        // Old builds' images and layers, no longer tagged: dropped, so that
        // the cached storage does not grow with every run.
        let _ = built.buildah().args(["rmi", "--prune"]).output();
        built
    })
}

/// Asserts that the (plain HTTP) registry serves `repo`'s manifest `digest`.
fn assert_registry_has(registry: &str, repo: &str, digest: &str) {
    let path = format!("/v2/{repo}/manifests/{digest}");
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let (code, head, _) =
        tripod_harness::http_request(registry, "HEAD", &path, accept).expect("registry request");
    assert_eq!(code, 200, "{registry}{path}: {head}");
}

/// Whether an ELF file asks for a program interpreter (PT_INTERP), i.e. is
/// dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn controller_image_is_one_static_binary_run_as_non_root() {
    let b = built();
    let config = b.config(CONTROLLER);
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tripod"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["controller"]));

    let files = b.files(CONTROLLER);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "etc/group",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/local/bin/tripod",
        ],
        "the controller image holds nothing but the binary and its few files"
    );
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    assert!(
        total < 64 << 20,
        "controller image files take {total} bytes"
    );

    // The binary runs in that otherwise empty root as the image's user: no
    // loader, no shared library, no shell.
    let ctr = b.run(&["from", "--pull=never", CONTROLLER]);
    let root = PathBuf::from(b.run(&["mount", ctr.trim()]).trim());
    let elf = std::fs::read(root.join("usr/local/bin/tripod")).expect("read binary");
    b.run(&["umount", ctr.trim()]);
    b.run(&["rm", ctr.trim()]);
    assert!(
        !has_interpreter(&elf),
        "tripod in the image is dynamically linked"
    );

    let out = b.run_in(CONTROLLER, "65532:65532", &["tripod", "crds"]);
    expect_success("tripod crds in the controller image", &out);
    let expected = std::fs::read_to_string(repo_root().join("crds/tripod.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);

    let out = b.run_in(CONTROLLER, "65532:65532", &["tripod", "--version"]);
    expect_success("tripod --version", &out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tripod {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn buildd_image_carries_buildah_git_and_tripod() {
    let b = built();
    let config = b.config(BUILDD);
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tripod"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["buildd"]));
    let env: Vec<&str> = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(env.contains(&"BUILDAH_ISOLATION=chroot"), "{env:?}");

    for (command, expect) in [
        (&["buildah", "--version"][..], "buildah version"),
        (&["git", "--version"][..], "git version"),
        (&["tripod", "buildd", "--help"][..], "--storage-driver"),
        (&["tripod", "agent", "--help"][..], "--once"),
    ] {
        let out = b.run_in(BUILDD, "0:0", command);
        expect_success(&format!("{command:?} in the buildd image"), &out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(expect), "{command:?}: {stdout}");
    }
    // The agent container runs as 65532 with a read-only root: git must work
    // for that user too.
    let out = b.run_in(BUILDD, "65532:65532", &["git", "--version"]);
    expect_success("git as 65532", &out);
}

#[test]
fn buildd_image_builds_and_pushes_a_dockerfile() {
    // buildah inside the buildd image builds a Dockerfile with a RUN step
    // (base image from the local registry) and pushes the result. The
    // image's storage.conf picks vfs (overlay on the container's overlayfs
    // root would not work). CAP_SYS_ADMIN: a process in `buildah run
    // --isolation chroot` is chrooted and so may not create the user
    // namespace buildah uses without it (docs/architecture.md).
    let b = built();
    let ctx = std::env::temp_dir().join(format!("tripod-image-ctx-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}/library/debian:bookworm-slim\nRUN echo built-by-the-buildd-image > /built.txt\n",
            b.registry
        ),
    )
    .unwrap();
    let image = format!("{}/tripod-test/nested:1", b.registry);
    let script = format!(
        "set -e; grep -q 'driver = \"vfs\"' /etc/containers/storage.conf; \
         buildah bud -q --tls-verify=false -t {image} /ctx >/dev/null; \
         buildah push -q --tls-verify=false --digestfile /root/digest {image}; \
         cat /root/digest"
    );
    let out = b.run_in_with(
        BUILDD,
        "0:0",
        &[
            "--cap-add",
            "CAP_SYS_ADMIN",
            "-v",
            &format!("{}:/ctx:ro", ctx.display()),
        ],
        &["sh", "-c", &script],
    );
    expect_success("a build inside the buildd image", &out);
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest:?}");
    assert_registry_has(&b.registry, "tripod-test/nested", &digest);
    let _ = std::fs::remove_dir_all(&ctx);
}

#[test]
fn both_images_push_to_a_registry() {
    let b = built();
    let dir = std::env::temp_dir().join(format!("tripod-image-{}", std::process::id()));
    for (image, repo) in [(CONTROLLER, "tripod"), (BUILDD, "tripod-buildd")] {
        let digest_file = dir.join(format!("{repo}.digest"));
        let dest = format!("docker://{}/tripod-build/{repo}:test", b.registry);
        b.run(&[
            "push",
            "-q",
            "--tls-verify=false",
            "--digestfile",
            &digest_file.display().to_string(),
            image,
            &dest,
        ]);
        let digest = std::fs::read_to_string(&digest_file).expect("digest file");
        assert_registry_has(&b.registry, &format!("tripod-build/{repo}"), digest.trim());
    }
}
