//! One image index from native builds: the platforms of an ImageBuild built
//! on their own legs (a build Pod on the real node, an emulating Linux
//! runner, a runner's BuildKit for Windows, a darwin test runner), each
//! pushed by digest, joined by the controller into an OCI image index under
//! the tags, and read back by an independent client (crane, built from its
//! Go module) as a container runtime would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use tripod::api::{ImageBuildStatus, Phase, RunnerPhase};

use crate::common::{ON_REAL_NODE, TestEnv, eventually};
use crate::runners::{Runners, http_get, status};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// crane, built once from its Go module (`testenv/crane.sh`).
fn crane() -> PathBuf {
    let out = tripod_harness::scripts::script(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        "crane.sh",
        &[],
    )
    .expect("testenv/crane.sh");
    PathBuf::from(out.trim())
}

/// Runs crane against the plain-HTTP test registry; its stdout.
fn crane_run(args: &[&str]) -> String {
    let out = std::process::Command::new(crane())
        .arg(args[0])
        .arg("--insecure")
        .args(&args[1..])
        .output()
        .expect("run crane");
    assert!(
        out.status.success(),
        "crane {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The document, media type and digest the registry serves for
/// `repo:reference` when asked for an index or a manifest.
fn fetch(registry: &str, repo: &str, reference: &str) -> (u16, serde_json::Value, String, String) {
    let (code, headers, body) = tripod_harness::http_request(
        registry,
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        &format!("{INDEX}, {MANIFEST}"),
    )
    .expect("registry request");
    let header = |name: &str| {
        headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let doc = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (
        code,
        doc,
        header("content-type"),
        header("docker-content-digest"),
    )
}

/// The config of the manifest `digest` in `repo`.
fn config_of(registry: &str, repo: &str, digest: &str) -> serde_json::Value {
    let (code, manifest, media_type, _) = fetch(registry, repo, digest);
    assert_eq!(code, 200, "{repo}@{digest}");
    assert_eq!(media_type, MANIFEST, "{repo}@{digest}");
    let config = manifest["config"]["digest"].as_str().expect("config");
    let (code, body) = http_get(registry, &format!("/v2/{repo}/blobs/{config}"), "*/*");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).expect("config JSON")
}

/// The tags of `repo`, sorted.
fn tags(registry: &str, repo: &str) -> Vec<String> {
    let (code, body) = http_get(registry, &format!("/v2/{repo}/tags/list"), "*/*");
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("tags JSON");
    let mut tags: Vec<String> = doc["tags"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    tags.sort();
    tags
}

/// `os/arch[/variant][ os.version]` of an index entry.
fn entry_platform(entry: &serde_json::Value) -> String {
    let p = &entry["platform"];
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or(""),
        p["architecture"].as_str().unwrap_or("")
    );
    if let Some(v) = p["variant"].as_str() {
        s.push_str(&format!("/{v}"));
    }
    if let Some(v) = p["os.version"].as_str() {
        s.push_str(&format!(" {v}"));
    }
    s
}

/// Waits until `name` has finished its build `not_build` is not (any
/// build when `None`), and returns its status.
async fn finished(env: &TestEnv, name: &str, not_build: Option<&str>) -> ImageBuildStatus {
    eventually(
        &format!("ImageBuild {name} finished"),
        Duration::from_secs(600),
        || async {
            let s = status(env, name).await?;
            let fresh = not_build.is_none() || s.build_id.as_deref() != not_build;
            (fresh && s.phase.is_some_and(Phase::is_finished)).then_some(s)
        },
    )
    .await
}

fn inline(name: &str, registry: &str, platforms: &str, extra: &str) -> String {
    crate::common::inline_build(crate::common::InlineBuild {
        name,
        registry,
        dockerfile: "ARG BASE=scratch\nFROM ${BASE}\nCOPY hello.txt /hello.txt\n",
        platforms,
        hello: "one index, many platforms",
        extra,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_operating_systems_join_one_index_that_an_independent_client_resolves() {
    let mut env = TestEnv::new("index-four").await;
    let registry = env.shared.registry.clone().expect("registry");
    let info = env.shared.info.clone();
    let (win_version, win_base) = crate::common::windows_base(&info, "10.0.20348");
    let arm_base = info
        .busybox_arm64_image
        .clone()
        .expect("the arm64 busybox base");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    let linux = runners.register(
        "linux",
        "os: linux, arch: amd64, capacity: 2, emulatedArchs: [arm64], windowsArchs: [amd64]",
    );
    let mut opts = runners.options(&linux, port);
    opts.buildkit = info.buildkit.clone();
    runners.start(opts).await;
    let mac = runners.register("mac", "os: darwin, arch: arm64, capacity: 1");
    let mut opts = runners.options(&mac, port);
    opts.test_darwin = Some("arm64".into());
    runners.start(opts).await;
    for r in [&linux, &mac] {
        runners
            .wait_phase(r, RunnerPhase::Online, Duration::from_secs(60))
            .await;
    }

    let name = "four-os";
    let started = Instant::now();
    env.apply(
        &inline(
            name,
            &registry,
            "linux/amd64, linux/arm64, windows/amd64, darwin/arm64",
            &format!(
                "  platformBuildArgs:\n  - {{platform: linux/amd64, buildArgs: [{{name: BASE, value: \"{}\"}}]}}\n  - {{platform: linux/arm64, buildArgs: [{{name: BASE, value: \"{arm_base}\"}}]}}\n  - {{platform: windows/amd64, buildArgs: [{{name: BASE, value: \"{win_base}\"}}]}}\n{ON_REAL_NODE}    runnerPlatforms: [linux/arm64, windows/amd64]\n",
                info.busybox_image
            ),
        )
        .replace("    image: ", "    additionalTags: [v1]\n    image: "),
    );
    let s = finished(&env, name, None).await;
    let took = started.elapsed();
    assert_eq!(
        s.phase,
        Some(Phase::Succeeded),
        "{s:#?}\n{}",
        env.controller_log(0)
    );
    eprintln!(
        "four-platform build with its index: {:.1}s",
        took.as_secs_f64()
    );
    let kinds: Vec<(String, String, bool)> = s
        .platforms
        .iter()
        .map(|p| {
            let e = p.executor.clone().expect("executor");
            (p.platform.clone(), e.kind, e.emulated)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("linux/amd64".to_string(), "Pod".to_string(), false),
            ("linux/arm64".into(), "Runner".into(), true),
            ("windows/amd64".into(), "Runner".into(), false),
            ("darwin/arm64".into(), "Runner".into(), false),
        ]
    );

    // The index the registry serves under the tag is status.image.
    let repo = format!("team/{name}");
    let (code, index, media_type, digest) = fetch(&registry, &repo, "1");
    assert_eq!(code, 200);
    assert_eq!(media_type, INDEX);
    assert_eq!(index["mediaType"], INDEX);
    let image = s.image.clone().expect("status.image");
    assert_eq!(image.digest, digest);
    assert_eq!(image.pinned, format!("{registry}/{repo}@{digest}"));
    assert_eq!(
        index["annotations"]["build.tripod.dev/build-id"],
        s.build_id.clone().unwrap_or_default()
    );
    // Every tag resolves to it; no other tag was written (the platforms
    // were pushed by digest).
    let (_, _, _, v1) = fetch(&registry, &repo, "v1");
    assert_eq!(v1, digest);
    assert_eq!(tags(&registry, &repo), ["1", "v1"]);

    // Exactly the four platforms, each entry the status's digest, each
    // child's config agreeing with its entry.
    let entries = index["manifests"].as_array().cloned().expect("manifests");
    let platforms: Vec<String> = entries.iter().map(entry_platform).collect();
    assert_eq!(
        platforms,
        [
            "linux/amd64".to_string(),
            "linux/arm64/v8".into(),
            format!("windows/amd64 {win_version}"),
            "darwin/arm64".into(),
        ]
    );
    for (entry, ps) in entries.iter().zip(&s.platforms) {
        let child = entry["digest"].as_str().expect("digest");
        assert_eq!(Some(child), ps.digest.as_deref(), "{}", ps.platform);
        assert_eq!(entry["mediaType"], MANIFEST);
        let config = config_of(&registry, &repo, child);
        let p = &entry["platform"];
        assert_eq!(config["os"], p["os"], "{}", ps.platform);
        assert_eq!(config["architecture"], p["architecture"], "{}", ps.platform);
        assert_eq!(
            config.get("os.version"),
            p.get("os.version"),
            "{}",
            ps.platform
        );
        assert_eq!(
            config["config"]["Labels"]["build.tripod.dev/build-id"],
            s.build_id.clone().unwrap_or_default()
        );
    }

    // crane resolves each platform from the index as a runtime pulling it
    // would, and the index itself from the tag.
    let reference = format!("{registry}/{repo}:1");
    assert_eq!(crane_run(&["digest", &reference]), digest);
    for ps in &s.platforms {
        assert_eq!(
            Some(crane_run(&[
                "digest",
                "--platform",
                &ps.platform,
                &reference
            ])),
            ps.digest,
            "{}",
            ps.platform
        );
    }
    // kubectl shows the index digest.
    let (ok, out) = env.kubectl(&["get", "ib", name], None);
    assert!(ok && out.contains(&digest), "{out}");
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_builds_race_to_one_index_without_overwriting_each_other() {
    let mut env = TestEnv::new("index-race").await;
    let registry = env.shared.registry.clone().expect("registry");
    let info = env.shared.info.clone();
    let (_, b2019) = crate::common::windows_base(&info, "10.0.17763");
    let (_, b2022) = crate::common::windows_base(&info, "10.0.20348");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    runners
        .start_buildkit(port, info.buildkit.clone().expect("buildkitd"))
        .await;

    // Two platforms of one build on one runner of capacity 2: they run
    // side by side and finish together, into one repository.
    let name = "win-race";
    let repo = format!("team/{name}");
    env.apply(&inline(
        name,
        &registry,
        "\"windows(10.0.17763)/amd64\", \"windows(10.0.20348)/amd64\"",
        &format!(
            "  platformBuildArgs:\n  - {{platform: \"windows(10.0.17763)/amd64\", buildArgs: [{{name: BASE, value: \"{b2019}\"}}]}}\n  - {{platform: \"windows(10.0.20348)/amd64\", buildArgs: [{{name: BASE, value: \"{b2022}\"}}]}}\n  executor:\n    runnerPlatforms: [\"windows(10.0.17763)/amd64\", \"windows(10.0.20348)/amd64\"]\n"
        ),
    ));
    let api = env.builds();
    let mut previous: Option<String> = None;
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..3 {
        if round > 0 {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"build.tripod.dev/rebuild": format!("{round}")}}
                })),
            )
            .await
            .expect("annotate");
        }
        let s = finished(&env, name, previous.as_deref()).await;
        previous = s.build_id.clone();
        assert_eq!(s.phase, Some(Phase::Succeeded), "round {round}: {s:#?}");
        let (code, index, _, digest) = fetch(&registry, &repo, "1");
        assert_eq!(code, 200);
        assert_eq!(
            s.image.as_ref().map(|i| i.digest.as_str()),
            Some(digest.as_str())
        );
        // BuildKit writes the build the platform asks for as os.version.
        let entries = index["manifests"].as_array().cloned().expect("manifests");
        assert_eq!(
            entries.iter().map(entry_platform).collect::<Vec<_>>(),
            ["windows/amd64 10.0.17763", "windows/amd64 10.0.20348"],
            "round {round}"
        );
        // Each child is its own image, of its own build, FROM its own
        // base: neither push replaced the other's.
        for (entry, base) in entries.iter().zip([&b2019, &b2022]) {
            let child = entry["digest"].as_str().expect("digest").to_string();
            let config = config_of(&registry, &repo, &child);
            assert_eq!(config["os.version"], entry["platform"]["os.version"]);
            let (base_repo, base_tag) = base
                .trim_start_matches(&format!("{registry}/"))
                .rsplit_once(':')
                .expect("base tag");
            let (_, base_manifest, _, _) = fetch(&registry, base_repo, base_tag);
            let (_, manifest, _, _) = fetch(&registry, &repo, &child);
            assert_eq!(
                manifest["layers"][0]["digest"], base_manifest["layers"][0]["digest"],
                "{child} is built FROM {base}"
            );
            assert_eq!(
                config["config"]["Labels"]["build.tripod.dev/build-id"]
                    .as_str()
                    .map(str::to_string),
                s.build_id
            );
            assert!(
                seen.insert(child),
                "round {round}: a child digest came back"
            );
        }
        // A Windows node pulls the image of its own build.
        let reference = format!("{registry}/{repo}:1");
        for (entry, build) in entries.iter().zip(["10.0.17763", "10.0.20348"]) {
            assert_eq!(
                crane_run(&[
                    "digest",
                    "--platform",
                    &format!("windows/amd64:{build}"),
                    &reference
                ]),
                entry["digest"].as_str().expect("digest")
            );
        }
        assert_eq!(tags(&registry, &repo), ["1"]);
    }
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_platform_keeps_the_index_back_and_is_retried_alone() {
    let mut env = TestEnv::new("index-retry").await;
    let registry = env.shared.registry.clone().expect("registry");
    let info = env.shared.info.clone();
    let (_, win_base) = crate::common::windows_base(&info, "10.0.20348");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    runners
        .start_buildkit(port, info.buildkit.clone().expect("buildkitd"))
        .await;

    // The Windows base is not published yet: that platform fails, the
    // Linux one (a Pod on the real node) goes on and keeps its digest.
    let late_base = format!("{registry}/team/{}-late-base:ltsc2022", env.ns);
    let name = "retry-one";
    let repo = format!("team/{name}");
    env.apply(&inline(
        name,
        &registry,
        "linux/amd64, windows/amd64",
        &format!(
            "  platformBuildArgs:\n  - {{platform: linux/amd64, buildArgs: [{{name: BASE, value: \"{}\"}}]}}\n  - {{platform: windows/amd64, buildArgs: [{{name: BASE, value: \"{late_base}\"}}]}}\n{ON_REAL_NODE}    runnerPlatforms: [windows/amd64]\n",
            info.busybox_image
        ),
    ));
    let s = finished(&env, name, None).await;
    assert_eq!(s.phase, Some(Phase::Failed), "{s:#?}");
    let (linux, windows) = (&s.platforms[0], &s.platforms[1]);
    assert_eq!(linux.phase, Phase::Succeeded, "{s:#?}");
    assert_eq!(windows.phase, Phase::Failed, "{s:#?}");
    let linux_digest = linux.digest.clone().expect("linux digest");
    assert!(s.image.is_none());
    let ready = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(
        ready.message.contains("windows/amd64: Failed"),
        "{}",
        ready.message
    );
    // No index was pushed, and no tag at all: the Linux image is there
    // by digest only.
    assert_eq!(fetch(&registry, &repo, "1").0, 404);
    assert_eq!(fetch(&registry, &repo, &linux_digest).0, 200);

    // The base is published; one annotation rebuilds only the failed
    // platform, and the index follows.
    crane_run(&["copy", &win_base, &late_base]);
    let build_id = s.build_id.clone();
    env.builds()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {"build.tripod.dev/retry-failed": "1"}}
            })),
        )
        .await
        .expect("annotate");
    let s = eventually(
        "the retried build succeeded",
        Duration::from_secs(600),
        || async {
            let s = status(&env, name).await?;
            (s.phase == Some(Phase::Succeeded)).then_some(s)
        },
    )
    .await;
    assert_eq!(s.build_id, build_id, "the same build");
    assert_eq!(s.retry_failed.as_deref(), Some("1"));
    assert_eq!(s.platforms[0].attempts, 1, "linux/amd64 was not rebuilt");
    assert_eq!(
        s.platforms[0].digest.as_deref(),
        Some(linux_digest.as_str())
    );
    assert_eq!(s.platforms[1].attempts, 2);
    assert_eq!(env.pods_of(name).await.len(), 1, "one build Pod in all");
    let (code, index, _, digest) = fetch(&registry, &repo, "1");
    assert_eq!(code, 200);
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    let children: Vec<Option<String>> = index["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| e["digest"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        children,
        [Some(linux_digest), s.platforms[1].digest.clone()]
    );
    runners.cleanup().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_always_indexes_one_platform_and_fail_fast_stops_the_others() {
    let mut env = TestEnv::new("index-always").await;
    let registry = env.shared.registry.clone().expect("registry");
    let info = env.shared.info.clone();
    let (_, win_base) = crate::common::windows_base(&info, "10.0.20348");
    let port = crate::common::free_port();
    env.start_controller_on("c1", port);
    let mut runners = Runners::new(&env);
    runners
        .start_buildkit(port, info.buildkit.clone().expect("buildkitd"))
        .await;

    // One platform, `output.index: Always`: an index of one entry.
    let name = "always-one";
    let repo = format!("team/{name}");
    env.apply(
        &inline(
            name,
            &registry,
            "windows/amd64",
            &format!(
                "  platformBuildArgs:\n  - {{platform: windows/amd64, buildArgs: [{{name: BASE, value: \"{win_base}\"}}]}}\n  executor:\n    runnerPlatforms: [windows/amd64]\n"
            ),
        )
        .replace("    insecure: true\n", "    insecure: true\n    index: Always\n"),
    );
    let s = finished(&env, name, None).await;
    assert_eq!(s.phase, Some(Phase::Succeeded), "{s:#?}");
    let (code, index, media_type, digest) = fetch(&registry, &repo, "1");
    assert_eq!((code, media_type.as_str()), (200, INDEX));
    let entries = index["manifests"].as_array().cloned().expect("manifests");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0]["digest"].as_str(),
        s.platforms[0].digest.as_deref()
    );
    assert_eq!(
        s.image.as_ref().map(|i| i.digest.as_str()),
        Some(digest.as_str())
    );
    assert_ne!(Some(digest.as_str()), s.platforms[0].digest.as_deref());

    // failFast: the Windows platform fails (its base does not exist) and
    // stops the Linux one, whose build Pod is still running.
    let name = "fail-fast";
    env.apply(&inline(
        name,
        &registry,
        "linux/amd64, windows/amd64",
        &format!(
            "  failFast: true\n  platformBuildArgs:\n  - {{platform: linux/amd64, buildArgs: [{{name: BASE, value: \"{}\"}}]}}\n  - {{platform: windows/amd64, buildArgs: [{{name: BASE, value: \"{registry}/team/{}-missing:1\"}}]}}\n{ON_REAL_NODE}    runnerPlatforms: [windows/amd64]\n",
            info.busybox_image, env.ns
        ),
    )
    .replace(
        "        COPY hello.txt /hello.txt\n",
        "        COPY hello.txt /hello.txt\n        RUN [\"sleep\", \"300\"]\n",
    ));
    let s = finished(&env, name, None).await;
    assert_eq!(s.phase, Some(Phase::Failed), "{s:#?}");
    assert_eq!(s.platforms[1].phase, Phase::Failed, "{s:#?}");
    assert_eq!(s.platforms[0].phase, Phase::Cancelled, "{s:#?}");
    assert!(
        s.platforms[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("spec.failFast"),
        "{s:#?}"
    );
    // Its build Pod is gone (deleted, not left to sleep).
    eventually(
        "the linux/amd64 build Pod deleted",
        Duration::from_secs(120),
        || async { env.pods_of(name).await.is_empty().then_some(()) },
    )
    .await;
    runners.cleanup().await;
    env.cleanup().await;
}
