//! Which Windows nodes a Windows build Pod may run on. A Windows container
//! runs only on a host of its OS build (process isolation), so the Pod's
//! `node.kubernetes.io/windows-build` selector follows the base image's
//! `os.version`: read from the registry when the Dockerfile is in the spec
//! (inline sources), or taken from `spec.executor.nodeSelector` otherwise.
//! A platform that names its OS build (`windows(10.0.17763)/amd64`)
//! decides it itself. A selector or base image that contradicts another
//! is refused before any Pod exists, naming the field.

use std::collections::BTreeMap;

use super::pod::WINDOWS_BUILD_LABEL;
use super::validate::{BuildRequest, InvalidSpec};
use crate::api::ImageBuild;
use crate::platform::{Os, Platform};
use crate::registry::{RegistryClient, RegistryError};

/// What is known of a Windows platform's base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseBuild {
    /// Read from the registry.
    Known {
        /// The base image reference (the Dockerfile's FROM).
        image: String,
        /// Its config's `os.version`, e.g. `10.0.20348.2700`.
        os_version: String,
    },
    /// Not known (a git source, FROM scratch, an image the controller may
    /// not read): `spec.executor.nodeSelector` decides; why, for the log.
    Unknown(String),
}

/// `10.0.20348.2700` → `10.0.20348`: the value of the node label
/// `node.kubernetes.io/windows-build`.
pub fn os_build(os_version: &str) -> Option<String> {
    let parts: Vec<&str> = os_version.split('.').collect();
    if parts.len() < 3 || parts[..3].iter().any(|p| p.parse::<u32>().is_err()) {
        return None;
    }
    Some(parts[..3].join("."))
}

/// The windows-build selector for a platform's Pods: the platform's own
/// OS build, else the base image's, else the spec's when the base is
/// unknown. Refuses a spec selector or a base image that contradicts the
/// platform's build, and a spec selector that contradicts the base image.
pub fn selector(
    spec_value: Option<&str>,
    platform: &Platform,
    base: &BaseBuild,
) -> Result<Option<String>, InvalidSpec> {
    if let Some(want) = platform.os_version() {
        if let Some(v) = spec_value.filter(|v| *v != want) {
            return Err(InvalidSpec {
                field: "spec.executor.nodeSelector".into(),
                message: format!(
                    "{WINDOWS_BUILD_LABEL}={v} contradicts {platform}: leave the label out, the platform's OS build decides it"
                ),
            });
        }
        if let BaseBuild::Known { image, os_version } = base
            && os_build(os_version).as_deref() != Some(want)
        {
            return Err(InvalidSpec {
                field: "spec.platformBuildArgs".into(),
                message: format!(
                    "{platform} builds FROM {image}, whose os.version is {os_version}: give this platform a base image of build {want} (a build argument in spec.platformBuildArgs)"
                ),
            });
        }
        return Ok(Some(want.to_string()));
    }
    match base {
        BaseBuild::Unknown(_) => Ok(spec_value.map(str::to_string)),
        BaseBuild::Known { image, os_version } => {
            let Some(build) = os_build(os_version) else {
                return Err(InvalidSpec {
                    field: "spec.source.inline.dockerfile".into(),
                    message: format!(
                        "{platform}: the base image {image} has os.version {os_version:?}, not a Windows build such as 10.0.20348.2700"
                    ),
                });
            };
            match spec_value {
                Some(v) if v != build => Err(InvalidSpec {
                    field: "spec.executor.nodeSelector".into(),
                    message: format!(
                        "{WINDOWS_BUILD_LABEL}={v}, but {platform} builds FROM {image}, whose os.version is {os_version} (build {build}): a Windows container runs only on a node of its own OS build"
                    ),
                }),
                _ => Ok(Some(build)),
            }
        }
    }
}

/// The Windows platforms of a build that are built in Pods.
pub fn pod_platforms(req: &BuildRequest) -> Vec<Platform> {
    req.platforms
        .iter()
        .zip(&req.on_runner)
        .filter(|(p, runner)| p.os() == Os::Windows && !**runner)
        .map(|(p, _)| p.clone())
        .collect()
}

/// Reads the base image of each of `platforms` (the Dockerfile's target
/// stage, build args applied) from the registry. `Err` for a transient
/// failure (the registry unreachable): retried.
pub async fn read_bases(
    ib: &ImageBuild,
    platforms: &[Platform],
) -> Result<BTreeMap<String, BaseBuild>, String> {
    let mut out = BTreeMap::new();
    let spec = &ib.spec;
    let unknown = |why: &str| BaseBuild::Unknown(why.to_string());
    let Some(inline) = &spec.source.inline else {
        for p in platforms {
            out.insert(
                p.to_string(),
                unknown("the Dockerfile is in a git repository the controller does not fetch"),
            );
        }
        return Ok(out);
    };
    let spec_build = spec
        .executor
        .as_ref()
        .and_then(|e| e.node_selector.get(WINDOWS_BUILD_LABEL))
        .map(String::as_str);
    for p in platforms {
        // Each platform's own build arguments may name another base.
        let needs = match crate::dockerfile::target_needs(
            &inline.dockerfile,
            &spec.build_args_for(p),
            spec.target.as_deref(),
            "windows",
        ) {
            Ok(n) => n,
            Err(e) => {
                out.insert(p.to_string(), unknown(&e.to_string()));
                continue;
            }
        };
        let Some(image) = needs.base_image else {
            out.insert(p.to_string(), unknown("FROM scratch"));
            continue;
        };
        let insecure = match (
            crate::reference::ImageRef::parse(&image),
            crate::reference::ImageRef::parse(&spec.output.image),
        ) {
            (Ok(base), Ok(output)) if spec.output.insecure && base.registry == output.registry => {
                vec![base.registry.clone()]
            }
            _ => Vec::new(),
        };
        let client = RegistryClient::new(insecure);
        let prefer = p.os_version().or(spec_build);
        let facts = client
            .platform_config(&image, "windows", p.arch(), prefer, None)
            .await;
        let base = match facts {
            Ok(f) if f.os == "windows" => match f.os_version {
                Some(v) => BaseBuild::Known {
                    image: image.clone(),
                    os_version: v,
                },
                None => unknown(&format!("{image} has no os.version")),
            },
            // Not a Windows image: `selector` refuses it, naming the FROM.
            Ok(f) => BaseBuild::Known {
                image: image.clone(),
                os_version: format!("{} (os {})", f.os_version.unwrap_or_default(), f.os),
            },
            Err(RegistryError::Unauthorized { .. }) => unknown(&format!(
                "{image} cannot be read anonymously: set {WINDOWS_BUILD_LABEL} in spec.executor.nodeSelector"
            )),
            Err(RegistryError::NotFound { .. }) => unknown(&format!("{image} was not found")),
            // Not a reference the registry can be asked about (an ARG that
            // expanded to nothing, …): the build itself will say more.
            Err(RegistryError::InvalidReference { reason, .. }) => {
                unknown(&format!("{image:?} is not an image reference: {reason}"))
            }
            Err(e) => return Err(format!("reading the base image {image}: {e}")),
        };
        out.insert(p.to_string(), base);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_come_from_os_versions() {
        assert_eq!(os_build("10.0.20348.2700").as_deref(), Some("10.0.20348"));
        assert_eq!(os_build("10.0.17763").as_deref(), Some("10.0.17763"));
        assert_eq!(os_build("ltsc2022"), None);
        assert_eq!(os_build(""), None);
    }

    #[test]
    fn a_platform_build_decides_and_contradictions_are_refused() {
        let p: Platform = "windows(10.0.17763)/amd64".parse().unwrap();
        let unknown = BaseBuild::Unknown("git".into());
        assert_eq!(
            selector(None, &p, &unknown).unwrap().as_deref(),
            Some("10.0.17763")
        );
        assert_eq!(
            selector(Some("10.0.20348"), &p, &unknown)
                .unwrap_err()
                .field,
            "spec.executor.nodeSelector"
        );
        let ltsc2022 = BaseBuild::Known {
            image: "r/win:ltsc2022".into(),
            os_version: "10.0.20348.2700".into(),
        };
        let err = selector(None, &p, &ltsc2022).unwrap_err();
        assert_eq!(err.field, "spec.platformBuildArgs");
        assert!(err.message.contains("r/win:ltsc2022"), "{}", err.message);
        let ltsc2019 = BaseBuild::Known {
            image: "r/win:ltsc2019".into(),
            os_version: "10.0.17763.6414".into(),
        };
        assert_eq!(
            selector(None, &p, &ltsc2019).unwrap().as_deref(),
            Some("10.0.17763")
        );
    }

    #[test]
    fn the_base_image_decides_and_a_contradiction_is_refused() {
        let p: Platform = "windows/amd64".parse().unwrap();
        let known = BaseBuild::Known {
            image: "r/win:ltsc2022".into(),
            os_version: "10.0.20348.2700".into(),
        };
        assert_eq!(
            selector(None, &p, &known).unwrap().as_deref(),
            Some("10.0.20348")
        );
        assert_eq!(
            selector(Some("10.0.20348"), &p, &known).unwrap().as_deref(),
            Some("10.0.20348")
        );
        let err = selector(Some("10.0.17763"), &p, &known).unwrap_err();
        assert_eq!(err.field, "spec.executor.nodeSelector");
        assert!(err.message.contains("10.0.20348.2700"), "{}", err.message);
        let unknown = BaseBuild::Unknown("git".into());
        assert_eq!(
            selector(Some("10.0.17763"), &p, &unknown)
                .unwrap()
                .as_deref(),
            Some("10.0.17763")
        );
        assert_eq!(selector(None, &p, &unknown).unwrap(), None);
        let linux = BaseBuild::Known {
            image: "r/busybox:1".into(),
            os_version: " (os linux)".into(),
        };
        assert_eq!(
            selector(None, &p, &linux).unwrap_err().field,
            "spec.source.inline.dockerfile"
        );
    }
}
