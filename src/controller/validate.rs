//! Validate: turns an `ImageBuildSpec` into a [`BuildRequest`], or names the
//! field that is wrong. Catches what the CRD schema cannot (aliases that make
//! two platforms the same, durations out of range, ...).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::api::{BackendName, ImageBuildSpec, default_platforms};
use crate::duration;
use crate::platform::{Os, Platform};
use crate::reference::ImageRef;

/// The longest build Tripod accepts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The timeout when `spec.timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// A spec that cannot be built, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// JSON path of the field, e.g. `spec.platforms[1]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        message: message.into(),
    }
}

/// What a valid spec asks for, in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRequest {
    /// Platforms to build, canonical, in the order written.
    pub platforms: Vec<Platform>,
    /// The output image.
    pub image: ImageRef,
    /// How long the whole build may take.
    pub timeout: Duration,
    /// Extra attempts per platform.
    pub retries: u32,
    /// When finished builds' executors are cleaned up.
    pub ttl_after_finished: Option<Duration>,
    /// For each platform: built on a BuildRunner (else in a build Pod).
    pub on_runner: Vec<bool>,
    /// The backend the spec asks for, if any.
    pub backend: Option<BackendName>,
    /// The platforms are joined into an image index (several platforms,
    /// or `spec.output.index: Always`).
    pub index: bool,
    /// A failed platform stops the others (`spec.failFast`).
    pub fail_fast: bool,
}

/// Validates a spec.
pub fn validate(spec: &ImageBuildSpec) -> Result<BuildRequest, InvalidSpec> {
    match (&spec.source.git, &spec.source.inline) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(invalid(
                "spec.source",
                "exactly one of spec.source.git or spec.source.inline must be set",
            ));
        }
        _ => {}
    }
    if let Some(df) = &spec.dockerfile
        && (df.starts_with('/') || df.split('/').any(|p| p == ".."))
    {
        return Err(invalid(
            "spec.dockerfile",
            format!("{df:?} must be a relative path inside the build context"),
        ));
    }

    let written = if spec.platforms.is_empty() {
        default_platforms()
    } else {
        spec.platforms.clone()
    };
    let mut platforms = Vec::with_capacity(written.len());
    let mut seen = BTreeSet::new();
    for (i, text) in written.iter().enumerate() {
        let field = format!("spec.platforms[{i}]");
        let p: Platform = text.parse().map_err(|e| invalid(&field, format!("{e}")))?;
        if !seen.insert(p.clone()) {
            return Err(invalid(
                field,
                format!("{text:?} is the same platform as an earlier entry ({p})"),
            ));
        }
        platforms.push(p);
    }
    // An index entry without an OS build next to one with a build of the
    // same architecture: a Windows node could pull either.
    for (i, p) in platforms.iter().enumerate() {
        if p.os() == Os::Windows
            && p.os_version().is_none()
            && let Some(other) = platforms
                .iter()
                .find(|q| q.os_version().is_some() && q.without_os_version() == *p)
        {
            return Err(invalid(
                format!("spec.platforms[{i}]"),
                format!(
                    "{p} has no OS build but {other} has one: name the build of every windows/{} platform, e.g. windows(10.0.20348)/{}",
                    p.arch(),
                    p.arch()
                ),
            ));
        }
    }
    let mut seen_args = BTreeSet::new();
    for (i, pa) in spec.platform_build_args.iter().enumerate() {
        let field = format!("spec.platformBuildArgs[{i}].platform");
        let p: Platform = pa
            .platform
            .parse()
            .map_err(|e| invalid(&field, format!("{e}")))?;
        if !platforms.contains(&p) {
            return Err(invalid(field, format!("{p} is not in spec.platforms")));
        }
        if !seen_args.insert(p.clone()) {
            return Err(invalid(field, format!("{p} is listed twice")));
        }
        let mut names = BTreeSet::new();
        for (j, a) in pa.build_args.iter().enumerate() {
            if !names.insert(a.name.as_str()) {
                return Err(invalid(
                    format!("spec.platformBuildArgs[{i}].buildArgs[{j}].name"),
                    format!("{:?} is listed twice", a.name),
                ));
            }
        }
    }

    let image = ImageRef::parse(&spec.output.image)
        .map_err(|e| invalid("spec.output.image", e.to_string()))?;

    let timeout = match &spec.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => {
            let d = duration::parse(t).map_err(|e| invalid("spec.timeout", e.to_string()))?;
            if d.is_zero() {
                return Err(invalid("spec.timeout", "must be greater than zero"));
            }
            if d > MAX_TIMEOUT {
                return Err(invalid("spec.timeout", "must be at most 168h (7 days)"));
            }
            d
        }
    };

    let retries = match spec.retries {
        None => 0,
        Some(r) if (0..=10).contains(&r) => r.unsigned_abs(),
        Some(r) => return Err(invalid("spec.retries", format!("{r} is outside 0-10"))),
    };

    let ttl_after_finished = match spec.ttl_seconds_after_finished {
        None => None,
        Some(s) if s >= 0 => Some(Duration::from_secs(s.unsigned_abs())),
        Some(s) => {
            return Err(invalid(
                "spec.ttlSecondsAfterFinished",
                format!("{s} must not be negative"),
            ));
        }
    };

    let secret_refs = [
        (
            "spec.source.git.secretRef.name",
            spec.source.git.as_ref().and_then(|g| g.secret_ref.as_ref()),
        ),
        (
            "spec.output.pushSecretRef.name",
            spec.output.push_secret_ref.as_ref(),
        ),
    ];
    for (field, r) in secret_refs {
        if let Some(r) = r
            && !crate::api::is_dns1123_subdomain(&r.name)
        {
            return Err(invalid(field, format!("{:?} is not a Secret name", r.name)));
        }
    }

    let mut on_runner: Vec<bool> = platforms.iter().map(|p| p.os() == Os::Darwin).collect();
    let mut backend = None;
    if let Some(exec) = &spec.executor {
        for key in ["kubernetes.io/os", "kubernetes.io/arch"] {
            if exec.node_selector.contains_key(key) {
                return Err(invalid(
                    "spec.executor.nodeSelector",
                    format!("must not set {key}: spec.platforms decides it"),
                ));
            }
        }
        for (i, text) in exec.runner_platforms.iter().enumerate() {
            let field = format!("spec.executor.runnerPlatforms[{i}]");
            let p: Platform = text.parse().map_err(|e| invalid(&field, format!("{e}")))?;
            if p.os() == Os::Darwin {
                return Err(invalid(
                    field,
                    format!(
                        "{p}: only linux and windows platforms are chosen for runners (darwin always builds on one)"
                    ),
                ));
            }
            let Some(at) = platforms.iter().position(|q| *q == p) else {
                return Err(invalid(field, format!("{p} is not in spec.platforms")));
            };
            on_runner[at] = true;
        }
        if let Some(b) = exec.backend {
            for (p, runner) in platforms.iter().zip(&on_runner) {
                let why = match (b, p.os(), runner) {
                    (BackendName::Buildah, Os::Linux, _)
                    | (BackendName::Darwin, Os::Darwin, _)
                    | (BackendName::Buildkit, Os::Linux, true)
                    | (BackendName::Buildkit, Os::Windows, _) => None,
                    (BackendName::Buildah, _, _) => Some("it builds linux platforms only"),
                    (BackendName::Darwin, _, _) => Some("it builds darwin platforms only"),
                    (BackendName::Buildkit, Os::Darwin, _) => {
                        Some("it builds linux and windows platforms only")
                    }
                    (BackendName::Buildkit, Os::Linux, false) => Some(
                        "linux build Pods run buildah; list the platform in spec.executor.runnerPlatforms to build it with BuildKit on a runner",
                    ),
                };
                if let Some(why) = why {
                    return Err(invalid(
                        "spec.executor.backend",
                        format!("{} cannot build {p}: {why}", b.as_str()),
                    ));
                }
            }
            backend = Some(b);
        }
    }

    Ok(BuildRequest {
        image,
        timeout,
        retries,
        ttl_after_finished,
        index: spec.makes_index(platforms.len()),
        platforms,
        on_runner,
        backend,
        fail_fast: spec.fail_fast,
    })
}

/// Node labels (and taint keys) of control-plane nodes: build Pods are kept
/// off them by default.
pub const CONTROL_PLANE_KEYS: &[&str] = &[
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// Where the controller lets ImageBuild authors place build Pods: which
/// tolerations and nodeSelector keys `spec.executor` may use.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct PlacementPolicy {
    /// Taint keys `spec.executor.tolerations` must not tolerate (a
    /// toleration without a key tolerates every taint, and is refused
    /// too). Default: the control-plane taints.
    #[arg(
        long = "build-pod-denied-toleration-keys",
        value_delimiter = ',',
        default_values_t = CONTROL_PLANE_KEYS.iter().map(|k| k.to_string()).collect::<Vec<_>>()
    )]
    pub denied_toleration_keys: Vec<String>,
    /// When set, the only taint keys `spec.executor.tolerations` may name.
    #[arg(long = "build-pod-allowed-toleration-keys", value_delimiter = ',')]
    pub allowed_toleration_keys: Option<Vec<String>>,
    /// Node label keys `spec.executor.nodeSelector` must not use. Default:
    /// the control-plane roles.
    #[arg(
        long = "build-pod-denied-node-selector-keys",
        value_delimiter = ',',
        default_values_t = CONTROL_PLANE_KEYS.iter().map(|k| k.to_string()).collect::<Vec<_>>()
    )]
    pub denied_node_selector_keys: Vec<String>,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            denied_toleration_keys: CONTROL_PLANE_KEYS.iter().map(|k| k.to_string()).collect(),
            allowed_toleration_keys: None,
            denied_node_selector_keys: CONTROL_PLANE_KEYS.iter().map(|k| k.to_string()).collect(),
        }
    }
}

/// Checks `spec.executor` against the controller's placement policy.
pub fn check_placement(spec: &ImageBuildSpec, policy: &PlacementPolicy) -> Result<(), InvalidSpec> {
    let Some(exec) = &spec.executor else {
        return Ok(());
    };
    for (i, t) in exec.tolerations.iter().enumerate() {
        let field = format!("spec.executor.tolerations[{i}]");
        let key = t.key.as_deref().unwrap_or_default();
        if key.is_empty() {
            if !policy.denied_toleration_keys.is_empty() || policy.allowed_toleration_keys.is_some()
            {
                return Err(invalid(
                    field,
                    "a toleration without a key tolerates every taint; the controller's policy \
                     does not allow it",
                ));
            }
            continue;
        }
        if policy.denied_toleration_keys.iter().any(|d| d == key) {
            return Err(invalid(
                format!("{field}.key"),
                format!("{key:?} may not be tolerated by build Pods (the controller's policy)"),
            ));
        }
        if let Some(allowed) = &policy.allowed_toleration_keys
            && !allowed.iter().any(|a| a == key)
        {
            return Err(invalid(
                format!("{field}.key"),
                format!(
                    "{key:?} is not among the taints build Pods may tolerate ({})",
                    allowed.join(", ")
                ),
            ));
        }
    }
    for key in exec.node_selector.keys() {
        if policy.denied_node_selector_keys.iter().any(|d| d == key) {
            return Err(invalid(
                format!("spec.executor.nodeSelector[{key}]"),
                "build Pods may not select nodes by this label (the controller's policy)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_checked_before_they_reach_an_api_path() {
        use crate::api::SecretReference;
        let mut s = spec();
        s.output.push_secret_ref = Some(SecretReference {
            name: "../x".into(),
        });
        assert_eq!(
            validate(&s).unwrap_err().field,
            "spec.output.pushSecretRef.name"
        );
        s.output.push_secret_ref = Some(SecretReference {
            name: "regcred".into(),
        });
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn placement_policy_keeps_build_pods_off_control_plane_nodes() {
        use k8s_openapi::api::core::v1::Toleration;
        let with = |tolerations: Vec<Toleration>, selector: &[(&str, &str)]| {
            let mut s = spec();
            s.executor = Some(ExecutorSpec {
                tolerations,
                node_selector: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            });
            s
        };
        let tol = |key: Option<&str>| Toleration {
            key: key.map(str::to_string),
            operator: Some("Exists".into()),
            ..Default::default()
        };
        let policy = PlacementPolicy::default();
        let ok = with(
            vec![tol(Some("tripod.dev/real-node"))],
            &[("kubernetes.io/hostname", "n1")],
        );
        assert!(check_placement(&ok, &policy).is_ok());
        let cases = [
            (
                with(
                    vec![tol(Some("node-role.kubernetes.io/control-plane"))],
                    &[],
                ),
                "spec.executor.tolerations[0].key",
            ),
            (
                with(vec![tol(Some("a")), tol(None)], &[]),
                "spec.executor.tolerations[1]",
            ),
            (
                with(vec![], &[("node-role.kubernetes.io/master", "")]),
                "spec.executor.nodeSelector[node-role.kubernetes.io/master]",
            ),
        ];
        for (s, field) in cases {
            assert_eq!(check_placement(&s, &policy).unwrap_err().field, field);
        }
        let strict = PlacementPolicy {
            allowed_toleration_keys: Some(vec!["gpu".into()]),
            ..Default::default()
        };
        let err = check_placement(&ok, &strict).unwrap_err();
        assert!(err.message.contains("not among"), "{err}");
        let open = PlacementPolicy {
            denied_toleration_keys: vec![],
            allowed_toleration_keys: None,
            denied_node_selector_keys: vec![],
        };
        assert!(check_placement(&with(vec![tol(None)], &[]), &open).is_ok());
    }
    use crate::api::{BuildSource, ExecutorSpec, InlineSource, Output};

    fn spec() -> ImageBuildSpec {
        ImageBuildSpec {
            source: BuildSource {
                inline: Some(InlineSource {
                    dockerfile: "FROM scratch".into(),
                    ..Default::default()
                }),
                git: None,
            },
            platforms: vec!["linux/amd64".into()],
            output: Output {
                image: "r.io/a:1".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_valid_spec_with_defaults() {
        let req = validate(&spec()).unwrap();
        assert_eq!(req.platforms.len(), 1);
        assert_eq!(req.timeout, DEFAULT_TIMEOUT);
        assert_eq!(req.retries, 0);
        assert_eq!(req.image.tag, "1");
    }

    #[test]
    fn windows_os_builds_and_platform_build_args() {
        use crate::api::{BuildArg, PlatformBuildArgs};
        let mut s = spec();
        s.platforms = vec![
            "linux/amd64".into(),
            "windows(10.0.17763)/amd64".into(),
            "windows(10.0.20348)/amd64".into(),
        ];
        let arg = |n: &str, v: &str| BuildArg {
            name: n.into(),
            value: v.into(),
        };
        s.build_args = vec![arg("BASE", "r/win:ltsc2022"), arg("X", "1")];
        s.platform_build_args = vec![PlatformBuildArgs {
            platform: "windows(10.0.17763)/amd64".into(),
            build_args: vec![arg("BASE", "r/win:ltsc2019")],
        }];
        let req = validate(&s).unwrap();
        assert!(req.index);
        assert_eq!(req.platforms[1].os_version(), Some("10.0.17763"));
        assert_eq!(
            s.build_args_for(&req.platforms[1]),
            [
                ("BASE".to_string(), "r/win:ltsc2019".to_string()),
                ("X".into(), "1".into())
            ]
        );
        assert_eq!(s.build_args_for(&req.platforms[2])[0].1, "r/win:ltsc2022");

        let mut mixed = s.clone();
        mixed.platforms[2] = "windows/amd64".into();
        let e = validate(&mixed).unwrap_err();
        assert_eq!(e.field, "spec.platforms[2]");
        assert!(e.message.contains("windows(10.0.17763)/amd64"), "{e}");

        let mut stray = s.clone();
        stray.platform_build_args[0].platform = "windows(10.0.26100)/amd64".into();
        let e = validate(&stray).unwrap_err();
        assert_eq!(e.field, "spec.platformBuildArgs[0].platform");

        let mut twice = s.clone();
        twice.platform_build_args[0]
            .build_args
            .push(arg("BASE", "y"));
        assert_eq!(
            validate(&twice).unwrap_err().field,
            "spec.platformBuildArgs[0].buildArgs[1].name"
        );
        let single = spec();
        assert!(!validate(&single).unwrap().index);
    }

    #[test]
    fn alias_duplicates_name_the_entry() {
        let mut s = spec();
        s.platforms = vec!["linux/amd64".into(), "Linux/x86_64".into()];
        let e = validate(&s).unwrap_err();
        assert_eq!(e.field, "spec.platforms[1]");
        assert!(e.message.contains("linux/amd64"), "{e}");
    }

    #[test]
    fn bad_platform_names_index_and_part() {
        let mut s = spec();
        s.platforms = vec!["linux/amd64".into(), "linux/sparc".into()];
        let e = validate(&s).unwrap_err();
        assert_eq!(e.field, "spec.platforms[1]");
        assert!(e.message.contains("sparc"), "{e}");
    }

    #[test]
    fn empty_platforms_default_to_linux_amd64() {
        let mut s = spec();
        s.platforms.clear();
        let req = validate(&s).unwrap();
        assert_eq!(req.platforms[0].to_string(), "linux/amd64");
    }

    #[test]
    fn timeouts_are_bounded() {
        let mut s = spec();
        s.timeout = Some("0s".into());
        assert_eq!(validate(&s).unwrap_err().field, "spec.timeout");
        s.timeout = Some("200h".into());
        assert_eq!(validate(&s).unwrap_err().field, "spec.timeout");
        s.timeout = Some("soon".into());
        assert_eq!(validate(&s).unwrap_err().field, "spec.timeout");
        s.timeout = Some("1h30m".into());
        assert_eq!(validate(&s).unwrap().timeout, Duration::from_secs(5400));
    }

    #[test]
    fn source_must_be_exactly_one() {
        let mut s = spec();
        s.source.inline = None;
        assert_eq!(validate(&s).unwrap_err().field, "spec.source");
    }

    #[test]
    fn image_with_digest_is_refused() {
        let mut s = spec();
        s.output.image = "r.io/a@sha256:00".into();
        assert_eq!(validate(&s).unwrap_err().field, "spec.output.image");
    }

    #[test]
    fn node_selector_cannot_override_platform() {
        let mut s = spec();
        s.executor = Some(ExecutorSpec {
            node_selector: [("kubernetes.io/arch".to_string(), "arm64".to_string())].into(),
            ..Default::default()
        });
        assert_eq!(
            validate(&s).unwrap_err().field,
            "spec.executor.nodeSelector"
        );
    }

    #[test]
    fn dockerfile_must_stay_in_context() {
        let mut s = spec();
        s.dockerfile = Some("../Dockerfile".into());
        assert_eq!(validate(&s).unwrap_err().field, "spec.dockerfile");
    }
}
