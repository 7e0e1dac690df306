//! `tripod.exe` — the Windows build of Tripod, linked by mingw-w64 — run
//! under Debian's Wine as a Windows build Pod's buildd runs it: `tripod.exe
//! buildd --backend buildkit`, driving BuildKit's own `buildctl.exe` (also
//! a Windows build), which reaches a real buildkitd (here a Linux daemon
//! over loopback TCP instead of a Windows service over a named pipe). A
//! Linux client speaks mTLS gRPC to it, as the agent does, and builds a
//! COPY-only `windows/amd64` image; the registry confirms the digest.
//!
//! What Wine cannot show: HCS (RUN steps in Windows containers), named
//! pipes to a real Windows buildkitd, HostProcess. See docs/windows.md.
#![allow(clippy::zombie_processes)] // fixture processes live as long as the test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_stream::StreamExt;
use tripod::buildd::spawn;
use tripod::proto::buildd::v1 as pb;
use tripod::tls::TlsDir;

fn script(args: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("testenv/windows-exe.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run testenv/windows-exe.sh");
    assert!(
        out.status.success(),
        "testenv/windows-exe.sh {args:?} failed"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A Wine prefix and the temporary directory its wineserver keeps its
/// socket in; dropping it stops that Wine session (every process of it).
struct WinePrefix(PathBuf, PathBuf);

impl Drop for WinePrefix {
    fn drop(&mut self) {
        let _ = Command::new("/usr/lib/wine/wineserver")
            .arg("-k")
            .env("WINEPREFIX", &self.0)
            .env("TMPDIR", &self.1)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tripod_exe_buildd_builds_a_windows_image_through_buildkit_under_wine() {
    let exe_dir = script(&[]);
    let dir = std::env::temp_dir().join(format!("tripod-windows-exe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp")).expect("dir");
    let prefix = WinePrefix(
        script(&["prefix", &dir.join("prefix").display().to_string()]),
        dir.join("tmp"),
    );

    let registry = tripod_harness::start_registry(&dir, "registry", 0, None).expect("registry");
    let buildkitd = tripod_harness::buildkit::start_buildkitd(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &dir.join("buildkitd"),
        std::slice::from_ref(&registry.address),
    )
    .expect("buildkitd");

    let tls_dir = dir.join("tls");
    let mut cmd = tripod_harness::supervised_command("/usr/lib/wine/wine64");
    cmd.arg(exe_dir.join("tripod.exe"))
        .args(["buildd", "--listen", "127.0.0.1:0", "--backend", "buildkit"])
        .arg("--tls-dir")
        .arg(&tls_dir)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--buildkit-addr")
        .arg(&buildkitd.tcp_address)
        .arg("--buildctl")
        .arg(exe_dir.join("buildctl.exe"))
        .current_dir(&dir)
        .env("WINEPREFIX", &prefix.0)
        .env("TMPDIR", &prefix.1)
        .env("WINEDEBUG", "-all")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("buildd.log")).expect("log"));
    let mut child = tripod_harness::spawn_supervised(cmd).expect("wine64 tripod.exe buildd");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = spawn::parse_listening(&line) {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!(
                "tripod.exe buildd did not report LISTENING: {}",
                std::fs::read_to_string(dir.join("buildd.log")).unwrap_or_default()
            )
        });

    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /app/hello.txt\nENV GREETING=hello\n",
    )
    .expect("Dockerfile");
    std::fs::write(ctx.join("hello.txt"), "hello from tripod.exe\n").expect("file");
    let tag = format!("{}/team/from-tripod-exe:1", registry.address);
    let req = pb::BuildRequest {
        build_id: "windows-exe".into(),
        context_dir: ctx.display().to_string(),
        dockerfile: "Dockerfile".into(),
        platform: "windows/amd64".into(),
        tags: vec![tag],
        insecure: true,
        ..Default::default()
    };
    // Windows keeps the directory private with its ACL; Wine makes it
    // with Unix mode 0755, which the Linux client refuses: made private
    // here, as the ACL would be.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut client = spawn::connect(addr, &TlsDir::new(&tls_dir))
        .await
        .expect("mTLS to tripod.exe buildd");
    let mut stream = client.build(req).await.expect("Build").into_inner();
    let (mut result, mut failure, mut logs) = (None, None, Vec::new());
    while let Some(ev) = stream.next().await {
        match ev.expect("event").event {
            Some(pb::build_event::Event::Result(r)) => result = Some(r),
            Some(pb::build_event::Event::Failure(f)) => failure = Some(f),
            Some(pb::build_event::Event::Log(l)) => logs.push(l.line),
            _ => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let result = result.unwrap_or_else(|| {
        panic!(
            "no result: {failure:?}\n{logs:?}\n{}",
            std::fs::read_to_string(dir.join("buildd.log")).unwrap_or_default()
        )
    });

    let (code, head, body) = tripod_harness::http_request(
        &registry.address,
        "GET",
        "/v2/team/from-tripod-exe/manifests/1",
        "application/vnd.oci.image.manifest.v1+json",
    )
    .expect("manifest");
    assert_eq!(code, 200);
    let served = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest: ")
                .map(|d| d.trim().to_string())
        })
        .expect("digest header");
    assert_eq!(served, result.digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest json");
    let config_digest = manifest["config"]["digest"].as_str().expect("config");
    let (_, _, config) = tripod_harness::http_request(
        &registry.address,
        "GET",
        &format!("/v2/team/from-tripod-exe/blobs/{config_digest}"),
        "*/*",
    )
    .expect("config");
    let config: serde_json::Value = serde_json::from_slice(&config).expect("config json");
    assert_eq!(config["os"], "windows", "{config}");
    assert!(
        config["config"]["Env"]
            .to_string()
            .contains("GREETING=hello")
    );
    drop(buildkitd);
    drop(prefix);
    let _ = std::fs::remove_dir_all(&dir);
}
