//! The build Pod of one platform attempt: a pure function of the ImageBuild,
//! the platform and the controller's settings.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, Pod, PodSecurityContext, PodSpec,
    SeccompProfile, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
    WindowsSecurityContextOptions,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::{ImageBuild, LABEL_ATTEMPT, LABEL_BUILD_ID, LABEL_NAME, LABEL_PLATFORM};
use crate::platform::{Os, Platform};

/// The node label that carries a Windows node's OS build.
pub const WINDOWS_BUILD_LABEL: &str = "node.kubernetes.io/windows-build";
/// Annotation on build Pods with the canonical platform.
pub const ANNOTATION_PLATFORM: &str = "build.tripod.dev/platform";
/// Where the agent container finds its token Secret (`token`, `ca.crt`).
pub const TOKEN_DIR: &str = "/var/run/tripod/executor";
/// The agent container's user and group; buildd shares its TLS directory
/// with this group.
pub const AGENT_ID: i64 = 65532;
/// The default seccomp profile of buildd containers: a Localhost profile the
/// chart installs on every node (`charts/tripod/files/buildd-seccomp.json`).
pub const DEFAULT_BUILDD_SECCOMP_PROFILE: &str = "tripod/buildd.json";

/// Parses `--buildd-seccomp-profile`: `RuntimeDefault`, `Unconfined`, or a
/// relative Localhost profile path.
pub fn parse_seccomp_profile(text: &str) -> Result<SeccompProfile, String> {
    match text {
        "RuntimeDefault" | "Unconfined" => Ok(SeccompProfile {
            type_: text.into(),
            ..Default::default()
        }),
        // `localhost/…` is the old annotation syntax, and a miscased
        // RuntimeDefault is a typo: both would only fail at Pod start.
        path if !path.is_empty()
            && !path.starts_with('/')
            && !path.starts_with("localhost/")
            && !path.eq_ignore_ascii_case("runtimedefault")
            && !path.eq_ignore_ascii_case("unconfined")
            && !path.split('/').any(|c| c == ".." || c.is_empty()) =>
        {
            Ok(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(path.into()),
            })
        }
        _ => Err(format!(
            "{text:?}: expected RuntimeDefault, Unconfined, or a relative path of a Localhost profile under the kubelet's seccomp directory"
        )),
    }
}

/// Controller-wide settings for build Pods.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// Image of the `agent` container of Linux build Pods (runs
    /// `tripod agent --once`; Windows Pods use `windows_buildd_image`).
    pub agent_image: String,
    /// Image of the `buildd` sidecar on Linux (carries buildah).
    pub buildd_image: String,
    /// Image of the `buildd` sidecar on Windows (HostProcess, drives BuildKit).
    pub windows_buildd_image: String,
    /// Where Windows build Pods find the node's buildkitd (a Windows
    /// service beside containerd): `npipe:////./pipe/buildkitd` or
    /// `tcp://127.0.0.1:PORT`. HostProcess containers share the node's
    /// pipes and loopback.
    pub windows_buildkit_addr: String,
    /// Address agents dial to reach the controller's executor service.
    pub executor_address: String,
    /// ServiceAccount of build Pods (one with no API access).
    pub service_account: Option<String>,
    /// Replaces the Linux buildd container's security context (default:
    /// root without `privileged`, the runtime's default capabilities).
    pub buildd_security_context: Option<SecurityContext>,
    /// Run Linux build Pods in a user namespace (`hostUsers: false`).
    pub user_namespace: bool,
    /// Seccomp profile of the Linux buildd container (unless
    /// `buildd_security_context` sets one).
    pub buildd_seccomp_profile: SeccompProfile,
    /// Which tolerations and nodeSelector keys ImageBuilds may use.
    pub placement: super::validate::PlacementPolicy,
}

/// Identity of one build Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodKey<'a> {
    /// The platform it builds.
    pub platform: &'a Platform,
    /// The build it belongs to.
    pub build_id: &'a str,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Windows: the OS build of the nodes it may run on (the
    /// `node.kubernetes.io/windows-build` label), from the base image.
    pub windows_build: Option<&'a str>,
}

/// Short hex digest of some text, for names and IDs.
pub fn short_hash(text: &str, len: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(hex.len())].to_string()
}

/// The value of the `build.tripod.dev/name` label for an ImageBuild name:
/// the name itself, or a shortened name with a hash when it exceeds the 63
/// characters a label value may hold.
pub fn name_label(name: &str) -> String {
    fit(name, "", 63)
}

/// Fits `base` + `suffix` into `max` characters, replacing the end of `base`
/// by a hash of the whole when too long.
pub(crate) fn fit(base: &str, suffix: &str, max: usize) -> String {
    let full = format!("{base}{suffix}");
    if full.len() <= max {
        return full;
    }
    let hash = short_hash(&full, 8);
    if suffix.len() + hash.len() + 2 > max {
        // No room for even one character of the base: a name from the
        // hash alone (a letter first, as names must start alphanumeric).
        return format!("t{}", short_hash(&full, 16));
    }
    let keep = max.saturating_sub(suffix.len() + hash.len() + 1);
    let head: String = base.chars().take(keep).collect();
    let head = head.trim_end_matches(['-', '.']);
    format!("{head}-{hash}{suffix}")
}

/// Deterministic Pod name: `<name>-<generation>[-r<rebuild>]-<platform>-<attempt>`,
/// at most 63 characters (hashed when longer).
pub fn pod_name(ib_name: &str, generation: i64, rebuild: Option<&str>, key: &PodKey<'_>) -> String {
    let rebuild = rebuild
        .map(|r| format!("-r{}", short_hash(r, 4)))
        .unwrap_or_default();
    let suffix = format!(
        "-{generation}{rebuild}-{}-{}",
        key.platform.label_value(),
        key.attempt
    );
    fit(ib_name, &suffix, 63)
}

/// Builds the Pod for one platform attempt.
pub fn build_pod(ib: &ImageBuild, name: &str, key: &PodKey<'_>, settings: &PodSettings) -> Pod {
    let namespace = ib.namespace().unwrap_or_default();
    let platform = key.platform;
    let windows = platform.os() == Os::Windows;

    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tripod-build".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "tripod".to_string(),
        ),
        (LABEL_NAME.to_string(), name_label(&ib.name_any())),
        (LABEL_PLATFORM.to_string(), platform.label_value()),
        (LABEL_BUILD_ID.to_string(), key.build_id.to_string()),
        (LABEL_ATTEMPT.to_string(), key.attempt.to_string()),
    ]);
    labels.retain(|_, v| !v.is_empty());

    let executor = ib.spec.executor.clone().unwrap_or_default();
    let mut node_selector = BTreeMap::from([
        (
            "kubernetes.io/os".to_string(),
            platform.os().as_str().to_string(),
        ),
        (
            "kubernetes.io/arch".to_string(),
            platform.node_arch().to_string(),
        ),
    ]);
    for (k, v) in &executor.node_selector {
        if k == WINDOWS_BUILD_LABEL && !windows {
            continue;
        }
        if k == "kubernetes.io/os" || k == "kubernetes.io/arch" {
            continue;
        }
        node_selector.insert(k.clone(), v.clone());
    }
    if windows && let Some(build) = key.windows_build {
        node_selector.insert(WINDOWS_BUILD_LABEL.to_string(), build.to_string());
    }

    let mut tolerations = Vec::new();
    if windows {
        tolerations.push(Toleration {
            key: Some("os".into()),
            operator: Some("Equal".into()),
            value: Some("windows".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    for t in executor.tolerations {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }

    let env = vec![
        env("TRIPOD_EXECUTOR_ADDRESS", &settings.executor_address),
        env("TRIPOD_NAMESPACE", &namespace),
        env("TRIPOD_IMAGEBUILD", &ib.name_any()),
        env("TRIPOD_IMAGEBUILD_UID", &ib.uid().unwrap_or_default()),
        env("TRIPOD_POD_NAME", name),
        env("TRIPOD_BUILD_ID", key.build_id),
        env("TRIPOD_PLATFORM", &platform.to_string()),
        env("TRIPOD_ATTEMPT", &key.attempt.to_string()),
        env("TRIPOD_WORKSPACE", workspace_path(windows)),
        env("TRIPOD_TOKEN_DIR", token_dir(windows)),
    ];
    let workspace_mount = VolumeMount {
        name: "workspace".into(),
        mount_path: workspace_path(windows).into(),
        ..Default::default()
    };

    let (agent_cmd, buildd_cmd) = if windows {
        (
            vec!["tripod.exe".to_string(), "agent".into(), "--once".into()],
            vec![
                "tripod.exe".to_string(),
                "buildd".into(),
                "--backend".into(),
                "buildkit".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls-dir".into(),
                "C:\\workspace\\.buildd-tls".into(),
                "--work-dir".into(),
                "C:\\workspace\\.buildd-work".into(),
                "--buildkit-addr".into(),
                settings.windows_buildkit_addr.clone(),
                "--buildctl".into(),
                "buildctl.exe".into(),
            ],
        )
    } else {
        (
            vec!["tripod".to_string(), "agent".into(), "--once".into()],
            vec![
                "tripod".to_string(),
                "buildd".into(),
                "--backend".into(),
                "buildah".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls-dir".into(),
                "/workspace/.buildd-tls".into(),
                "--tls-group".into(),
                AGENT_ID.to_string(),
                "--work-dir".into(),
                "/workspace/.buildd-work".into(),
                "--storage-root".into(),
                "/var/lib/containers/storage".into(),
                "--runroot".into(),
                "/var/lib/containers/runroot".into(),
            ],
        )
    };

    let mut volumes = vec![
        Volume {
            name: "workspace".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(name.to_string()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut buildd_mounts = vec![workspace_mount.clone()];
    if !windows {
        volumes.push(Volume {
            name: "storage".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        buildd_mounts.push(VolumeMount {
            name: "storage".into(),
            mount_path: "/var/lib/containers".into(),
            ..Default::default()
        });
    }

    let agent = Container {
        name: "agent".into(),
        // Windows build Pods run the agent from the Windows buildd image,
        // which carries tripod.exe; the agent image is a Linux image.
        image: Some(if windows {
            settings.windows_buildd_image.clone()
        } else {
            settings.agent_image.clone()
        }),
        command: Some(agent_cmd),
        env: Some(env.clone()),
        volume_mounts: Some(vec![
            workspace_mount,
            VolumeMount {
                name: "token".into(),
                mount_path: token_dir(windows).into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        security_context: (!windows).then(agent_security_context),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let buildd = Container {
        name: "buildd".into(),
        image: Some(if windows {
            settings.windows_buildd_image.clone()
        } else {
            settings.buildd_image.clone()
        }),
        command: Some(buildd_cmd),
        env: Some(env),
        // A native sidecar: started before the agent, stopped after it exits.
        restart_policy: Some("Always".into()),
        resources: executor.resources.clone(),
        volume_mounts: Some(buildd_mounts),
        security_context: (!windows).then(|| match &settings.buildd_security_context {
            Some(custom) => custom.clone(),
            None => buildd_security_context(&settings.buildd_seccomp_profile),
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let pod_security_context = if windows {
        PodSecurityContext {
            windows_options: Some(WindowsSecurityContextOptions {
                host_process: Some(true),
                run_as_user_name: Some("NT AUTHORITY\\SYSTEM".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    } else {
        PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            // The token Secret (mode 0440) and the workspace belong to the
            // agent's group: the agent runs as 65532, not as root.
            fs_group: Some(AGENT_ID),
            ..Default::default()
        }
    };

    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_PLATFORM.to_string(),
                platform.to_string(),
            )])),
            owner_references: Some(vec![owner_reference(ib)]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            node_selector: Some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            service_account_name: settings.service_account.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: windows.then_some(true),
            host_users: (!windows && settings.user_namespace).then_some(false),
            termination_grace_period_seconds: Some(30),
            security_context: Some(pod_security_context),
            init_containers: Some(vec![buildd]),
            containers: vec![agent],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

fn token_dir(windows: bool) -> &'static str {
    if windows {
        "C:\\var\\run\\tripod\\executor"
    } else {
        TOKEN_DIR
    }
}

fn workspace_path(windows: bool) -> &'static str {
    if windows {
        "C:\\workspace"
    } else {
        "/workspace"
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The agent only fetches sources and talks gRPC: no privileges at all.
fn agent_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(AGENT_ID),
        run_as_group: Some(AGENT_ID),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// buildah with chroot isolation runs as root with the runtime's default
/// capabilities; it needs neither `privileged` nor CAP_SYS_ADMIN, but a
/// seccomp profile that lets it create a user namespace (RUN steps).
fn buildd_security_context(seccomp: &SeccompProfile) -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        run_as_user: Some(0),
        allow_privilege_escalation: Some(false),
        seccomp_profile: Some(seccomp.clone()),
        ..Default::default()
    }
}

/// The token Secret of one build Pod (same name), without its data: the
/// controller fills in `token` and `ca.crt` when it creates it. Owned by the
/// ImageBuild, mounted into the agent container only.
pub fn token_secret(pod: &Pod) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: pod.metadata.labels.clone(),
            owner_references: pod.metadata.owner_references.clone(),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The controller ownerReference to an ImageBuild.
pub fn owner_reference(ib: &ImageBuild) -> OwnerReference {
    OwnerReference {
        api_version: ImageBuild::api_version(&()).into_owned(),
        kind: ImageBuild::kind(&()).into_owned(),
        name: ib.name_any(),
        uid: ib.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExecutorSpec, ImageBuildSpec};

    fn settings() -> PodSettings {
        PodSettings {
            agent_image: "tripod:test".into(),
            buildd_image: "tripod-buildd:test".into(),
            windows_buildd_image: "tripod-buildd-windows:test".into(),
            windows_buildkit_addr: "npipe:////./pipe/buildkitd".into(),
            executor_address: "tripod.tripod-system.svc:9443".into(),
            service_account: Some("tripod-build".into()),
            buildd_security_context: None,
            user_namespace: false,
            buildd_seccomp_profile: parse_seccomp_profile(DEFAULT_BUILDD_SECCOMP_PROFILE).unwrap(),
            placement: Default::default(),
        }
    }

    fn ib(name: &str) -> ImageBuild {
        let mut ib = ImageBuild::new(name, ImageBuildSpec::default());
        ib.metadata.namespace = Some("ns".into());
        ib.metadata.uid = Some("uid-1".into());
        ib.metadata.generation = Some(3);
        ib
    }

    #[test]
    fn names_are_deterministic_and_bounded() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        let key = PodKey {
            platform: &p,
            build_id: "b",
            attempt: 2,
            windows_build: None,
        };
        assert_eq!(pod_name("app", 3, None, &key), "app-3-linux-arm-v7-2");
        let long = "a".repeat(80);
        let n1 = pod_name(&long, 3, None, &key);
        assert!(n1.len() <= 63, "{n1}");
        assert!(n1.ends_with("-3-linux-arm-v7-2"));
        assert_eq!(n1, pod_name(&long, 3, None, &key));
        let other = format!("{}b", "a".repeat(79));
        assert_ne!(n1, pod_name(&other, 3, None, &key));
        let r = pod_name("app", 3, Some("x"), &key);
        assert!(
            r.starts_with("app-3-r") && r.ends_with("-linux-arm-v7-2"),
            "{r}"
        );
        assert_eq!(name_label(&long).len(), 63);
    }

    #[test]
    fn linux_pod_schedules_on_its_platform() {
        let p: Platform = "linux/arm64".parse().unwrap();
        let key = PodKey {
            platform: &p,
            build_id: "bid",
            attempt: 1,
            windows_build: None,
        };
        let mut b = ib("app");
        b.spec.executor = Some(ExecutorSpec {
            node_selector: [
                ("pool".to_string(), "builders".to_string()),
                (WINDOWS_BUILD_LABEL.to_string(), "10.0.20348".to_string()),
            ]
            .into(),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let pod = build_pod(&b, "app-3-linux-arm64-1", &key, &settings());
        let spec = pod.spec.unwrap();
        let sel = spec.node_selector.unwrap();
        assert_eq!(sel["kubernetes.io/os"], "linux");
        assert_eq!(sel["kubernetes.io/arch"], "arm64");
        assert_eq!(sel["pool"], "builders");
        assert!(!sel.contains_key(WINDOWS_BUILD_LABEL));
        let tol = spec.tolerations.unwrap();
        assert_eq!(tol.len(), 1);
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let buildd = &spec.init_containers.unwrap()[0];
        assert_eq!(buildd.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            buildd.security_context.as_ref().unwrap().privileged,
            Some(false)
        );
        let agent = &spec.containers[0];
        assert_eq!(agent.command.as_ref().unwrap()[1..], ["agent", "--once"]);
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[LABEL_BUILD_ID], "bid");
        assert_eq!(labels[LABEL_PLATFORM], "linux-arm64");
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn buildd_security_context_and_user_namespace_are_settings() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let key = PodKey {
            platform: &p,
            build_id: "bid",
            attempt: 1,
            windows_build: None,
        };
        let default = build_pod(&ib("app"), "n", &key, &settings()).spec.unwrap();
        assert_eq!(default.host_users, None);
        let buildd = &default.init_containers.unwrap()[0];
        let sc = buildd.security_context.clone().unwrap();
        assert_eq!(sc.run_as_user, Some(0));
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.capabilities, None, "the runtime's default capabilities");
        let seccomp = sc.seccomp_profile.unwrap();
        assert_eq!(seccomp.type_, "Localhost");
        assert_eq!(
            seccomp.localhost_profile.as_deref(),
            Some("tripod/buildd.json")
        );
        // buildd shares its TLS directory with the agent's group.
        let cmd = buildd.command.clone().unwrap();
        let i = cmd.iter().position(|a| a == "--tls-group").unwrap();
        assert_eq!(cmd[i + 1], "65532");
        let agent = default.containers[0].security_context.clone().unwrap();
        assert_eq!(
            (agent.run_as_user, agent.run_as_group),
            (Some(65532), Some(65532))
        );

        let custom = SecurityContext {
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_ADMIN".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = settings();
        s.buildd_security_context = Some(custom.clone());
        s.user_namespace = true;
        let spec = build_pod(&ib("app"), "n", &key, &s).spec.unwrap();
        assert_eq!(spec.host_users, Some(false));
        assert_eq!(
            spec.init_containers.unwrap()[0].security_context,
            Some(custom)
        );
        // The agent keeps its own, locked-down context.
        let agent = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(agent.read_only_root_filesystem, Some(true));

        // Windows Pods are HostProcess Pods: neither setting applies.
        let w: Platform = "windows/amd64".parse().unwrap();
        let wkey = PodKey {
            platform: &w,
            build_id: "bid",
            attempt: 1,
            windows_build: None,
        };
        let spec = build_pod(&ib("app"), "n", &wkey, &s).spec.unwrap();
        assert_eq!(spec.host_users, None);
        assert_eq!(spec.init_containers.unwrap()[0].security_context, None);
    }

    #[test]
    fn seccomp_profiles_are_parsed_and_bad_paths_refused() {
        assert_eq!(
            parse_seccomp_profile("RuntimeDefault").unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(
            parse_seccomp_profile("Unconfined").unwrap().type_,
            "Unconfined"
        );
        let p = parse_seccomp_profile("profiles/b.json").unwrap();
        assert_eq!(p.localhost_profile.as_deref(), Some("profiles/b.json"));
        for bad in [
            "",
            "/abs.json",
            "../up.json",
            "a//b.json",
            "runtimedefault/../x",
        ] {
            assert!(parse_seccomp_profile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_pod_tolerates_taint_and_runs_host_process() {
        let p: Platform = "windows/amd64".parse().unwrap();
        let key = PodKey {
            platform: &p,
            build_id: "bid",
            attempt: 1,
            windows_build: None,
        };
        let mut b = ib("app");
        b.spec.executor = Some(ExecutorSpec {
            node_selector: [(WINDOWS_BUILD_LABEL.to_string(), "10.0.20348".to_string())].into(),
            ..Default::default()
        });
        let pod = build_pod(&b, "n", &key, &settings());
        let spec = pod.spec.unwrap();
        let sel = spec.node_selector.unwrap();
        assert_eq!(sel["kubernetes.io/os"], "windows");
        assert_eq!(sel[WINDOWS_BUILD_LABEL], "10.0.20348");
        let tol = &spec.tolerations.unwrap()[0];
        assert_eq!(tol.key.as_deref(), Some("os"));
        assert_eq!(tol.value.as_deref(), Some("windows"));
        assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));
        let win = spec.security_context.unwrap().windows_options.unwrap();
        assert_eq!(win.host_process, Some(true));
        assert_eq!(spec.host_network, Some(true));
        let images: Vec<_> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .map(|c| c.image.as_deref().unwrap())
            .collect();
        assert_eq!(
            images,
            ["tripod-buildd-windows:test", "tripod-buildd-windows:test"],
            "a Windows Pod runs no Linux image"
        );
    }
}
