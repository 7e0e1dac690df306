//! Windows build Pods on simulated Windows nodes (kwok: a Windows Server
//! 2022 and a 2019 node): HostProcess, the Windows toleration, no
//! buildkitd inside (buildd dials the node's), and the
//! `node.kubernetes.io/windows-build` selector taken from the base image's
//! `os.version` in the registry, so the real scheduler binds each Pod only
//! to a node of its OS build. A selector that contradicts the base image is
//! refused before any Pod exists, naming the field.

use std::time::Duration;

use kube::ResourceExt;
use tripod::api::Phase;
use tripod_harness::kwok::{WINDOWS_2019_AMD64, WINDOWS_AMD64};

use crate::common::{InlineBuild, TestEnv, eventually, inline_build, windows_base};

const WAIT: Duration = Duration::from_secs(60);

fn windows_build(name: &str, registry: &str, base: &str, extra: &str) -> String {
    inline_build(InlineBuild {
        name,
        registry,
        dockerfile: &format!("FROM {base}\nCOPY hello.txt /app/hello.txt\n"),
        platforms: "windows/amd64",
        hello: "hello from Windows",
        extra,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_pods_go_to_nodes_of_their_base_images_os_build() {
    let mut env = TestEnv::new("windows").await;
    env.start_controller("c1");
    let registry = env.shared.registry.clone().expect("registry");
    let (v2022, base2022) = windows_base(&env.shared.info, "10.0.20348");
    let (v2019, base2019) = windows_base(&env.shared.info, "10.0.17763");

    env.apply(&windows_build("win22", &registry, &base2022, ""));
    env.apply(&windows_build("win19", &registry, &base2019, ""));
    for (name, node, build, version) in [
        ("win22", WINDOWS_AMD64, "10.0.20348", &v2022),
        ("win19", WINDOWS_2019_AMD64, "10.0.17763", &v2019),
    ] {
        let pod = eventually(&format!("{name}'s Pod bound"), WAIT, || async {
            let pods = env.pods_of(name).await;
            let pod = pods.into_iter().next()?;
            pod.spec.as_ref()?.node_name.is_some().then_some(pod)
        })
        .await;
        let spec = pod.spec.clone().expect("spec");
        assert!(version.starts_with(build));
        assert_eq!(
            spec.node_name.as_deref(),
            Some(node),
            "{name} (os.version {version}) was bound to another build's node"
        );
        let sel = spec.node_selector.clone().expect("selector");
        assert_eq!(sel["node.kubernetes.io/windows-build"], build);
        assert_eq!(sel["kubernetes.io/os"], "windows");
        assert!(spec.tolerations.iter().flatten().any(|t| {
            t.key.as_deref() == Some("os")
                && t.value.as_deref() == Some("windows")
                && t.effect.as_deref() == Some("NoSchedule")
        }));
        let win = spec
            .security_context
            .as_ref()
            .and_then(|s| s.windows_options.clone())
            .expect("windowsOptions");
        assert_eq!(win.host_process, Some(true));
        assert_eq!(spec.host_network, Some(true));
        // buildd and the agent, no buildkitd: buildd dials the node's.
        let mut names: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["agent", "buildd"], "{}", pod.name_any());
        let buildd = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == "buildd")
            .expect("buildd");
        let cmd = buildd.command.clone().unwrap_or_default().join(" ");
        assert!(
            cmd.contains("--backend buildkit")
                && cmd.contains("--buildkit-addr npipe:////./pipe/buildkitd"),
            "{cmd}"
        );
    }

    // The 2019 node's build asked for, the 2022 base given: refused, no Pod.
    env.apply(&windows_build(
        "win-mismatch",
        &registry,
        &base2022,
        "  executor:\n    nodeSelector:\n      node.kubernetes.io/windows-build: \"10.0.17763\"\n",
    ));
    let s = eventually("win-mismatch refused", WAIT, || async {
        let s = env.builds().get("win-mismatch").await.ok()?.status?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let stalled = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert_eq!(stalled.reason, "InvalidSpec");
    assert!(
        stalled.message.contains("spec.executor.nodeSelector")
            && stalled.message.contains(&v2022)
            && stalled.message.contains("10.0.17763"),
        "{}",
        stalled.message
    );
    assert!(env.pods_of("win-mismatch").await.is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_build_puts_each_windows_os_build_on_a_node_of_that_build() {
    let mut env = TestEnv::new("windows-builds").await;
    env.start_controller("c1");
    let registry = env.shared.registry.clone().expect("registry");
    let (_, base2019) = windows_base(&env.shared.info, "10.0.17763");
    let (_, base2022) = windows_base(&env.shared.info, "10.0.20348");
    let manifest = |name: &str, base_of_2019: &str| {
        inline_build(InlineBuild {
            name,
            registry: &registry,
            dockerfile: "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /app/hello.txt\n",
            platforms: "\"windows(10.0.17763)/amd64\", \"windows(10.0.20348)/amd64\"",
            hello: "hello from two Windows builds",
            extra: &format!(
                "  platformBuildArgs:\n  - {{platform: \"windows(10.0.17763)/amd64\", buildArgs: [{{name: BASE, value: \"{base_of_2019}\"}}]}}\n  - {{platform: \"windows(10.0.20348)/amd64\", buildArgs: [{{name: BASE, value: \"{base2022}\"}}]}}\n"
            ),
        })
    };
    env.apply(&manifest("two-builds", &base2019));
    let pods = eventually("both Pods bound", WAIT, || async {
        let pods = env.pods_of("two-builds").await;
        (pods.len() == 2
            && pods
                .iter()
                .all(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some())))
        .then_some(pods)
    })
    .await;
    for pod in &pods {
        let spec = pod.spec.clone().expect("spec");
        let sel = spec.node_selector.clone().expect("selector");
        let (build, node) = if pod.name_any().contains("10-0-17763") {
            ("10.0.17763", WINDOWS_2019_AMD64)
        } else {
            ("10.0.20348", WINDOWS_AMD64)
        };
        assert_eq!(
            sel["node.kubernetes.io/windows-build"],
            build,
            "{}",
            pod.name_any()
        );
        assert_eq!(spec.node_name.as_deref(), Some(node), "{}", pod.name_any());
    }
    let s = env
        .builds()
        .get("two-builds")
        .await
        .expect("get")
        .status
        .expect("status");
    let platforms: Vec<&str> = s.platforms.iter().map(|p| p.platform.as_str()).collect();
    assert_eq!(
        platforms,
        ["windows(10.0.17763)/amd64", "windows(10.0.20348)/amd64"]
    );

    // The 2019 platform given the 2022 base: refused, naming the field.
    env.apply(&manifest("wrong-base", &base2022));
    let s = eventually("wrong-base refused", WAIT, || async {
        let s = env.builds().get("wrong-base").await.ok()?.status?;
        (s.phase == Some(Phase::Failed)).then_some(s)
    })
    .await;
    let stalled = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert!(
        stalled.message.contains("spec.platformBuildArgs")
            && stalled.message.contains("windows(10.0.17763)/amd64"),
        "{}",
        stalled.message
    );
    assert!(env.pods_of("wrong-base").await.is_empty());
    env.cleanup().await;
}
