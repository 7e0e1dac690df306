//! `helm` against an environment: installs `charts/tripod` with the images
//! the environment built from the Dockerfile, as a user installs it
//! (`tripod dev up --helm` and `tests/helm_cluster.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;
use crate::env::EnvInfo;
use crate::node::{NODE_NAME, REAL_NODE_TAINT};

/// The release namespace `tripod dev up --helm` and the tests use.
pub const RELEASE_NAMESPACE: &str = "tripod-system";
/// The release name (the chart's full name is then `tripod`).
pub const RELEASE: &str = "tripod";

/// `helm` with its own home directories and the environment's kubeconfig.
#[derive(Debug, Clone)]
pub struct Helm {
    /// The helm binary (`testenv/helm.sh`).
    pub helm: PathBuf,
    /// The cluster.
    pub kubeconfig: PathBuf,
    /// HELM_CACHE_HOME, HELM_CONFIG_HOME and HELM_DATA_HOME live here.
    pub home: PathBuf,
}

impl Helm {
    /// Builds helm if needed (`testenv/helm.sh`, cached).
    pub fn ensure(source_dir: &Path, kubeconfig: &Path, home: &Path) -> Result<Helm, Error> {
        let helm = crate::scripts::script(source_dir, "helm.sh", &[])?;
        Ok(Helm {
            helm: PathBuf::from(helm.trim()),
            kubeconfig: kubeconfig.to_path_buf(),
            home: home.to_path_buf(),
        })
    }

    /// Runs helm; its stdout, or an error quoting its stderr.
    pub fn run(&self, args: &[String]) -> Result<String, Error> {
        let out = Command::new(&self.helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("run {}", self.helm.display()), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Script(format!(
                "helm {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

/// `repository` and `tag` of `host:port/path:tag`.
pub fn split_image(image: &str) -> (&str, &str) {
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_start..].rfind(':') {
        Some(i) => (&image[..name_start + i], &image[name_start + i + 1..]),
        None => (image, ""),
    }
}

/// What [`values`] sets.
#[derive(Debug, Clone)]
pub struct ChartValues<'a> {
    /// The environment.
    pub info: &'a EnvInfo,
    /// The controller image (`host:port/path:tag`).
    pub controller_image: &'a str,
    /// The real node is tainted (the tests' variant): tolerate it.
    pub tainted: bool,
    /// Namespaces where ImageBuilds will live: the chart creates the build
    /// ServiceAccount there.
    pub build_namespaces: &'a [&'a str],
}

/// The `--set` arguments that point the chart at an environment: the
/// controller image given, the buildd image (also the agent's), the
/// kubelet's root directory (the seccomp DaemonSet writes the profile
/// there), the controller Pods on the real node (kwok's simulated nodes
/// would take them otherwise), tolerating its taint in the tests' variant,
/// and the build ServiceAccount in the namespaces of the builds.
pub fn values(v: &ChartValues<'_>) -> Vec<String> {
    let ChartValues {
        info,
        controller_image,
        tainted,
        build_namespaces,
    } = v;
    let (repository, tag) = split_image(controller_image);
    let mut set = vec![
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        format!("builddImage={}", info.buildd_image),
        format!("agentImage={}", info.buildd_image),
        format!(
            "seccompProfile.kubeletRootDir={}",
            info.kubelet_root.display()
        ),
        format!("nodeSelector.kubernetes\\.io/hostname={NODE_NAME}"),
    ];
    for (i, ns) in build_namespaces.iter().enumerate() {
        set.push(format!("buildServiceAccount.namespaces[{i}]={ns}"));
    }
    if *tainted {
        set.extend([
            format!("tolerations[0].key={REAL_NODE_TAINT}"),
            "tolerations[0].operator=Exists".to_string(),
            "tolerations[0].effect=NoSchedule".to_string(),
        ]);
    }
    set.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// `helm upgrade --install --wait` of the chart in `chart` as [`RELEASE`]
/// in [`RELEASE_NAMESPACE`] (created if missing), with [`values`].
pub fn install_args(chart: &Path, v: &ChartValues<'_>) -> Vec<String> {
    let mut args: Vec<String> = [
        "upgrade",
        "--install",
        RELEASE,
        &chart.display().to_string(),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(values(v));
    args
}

/// Copies the directory `from` to `to`, recursively (a chart to change).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_after_the_registry_port() {
        assert_eq!(
            split_image("10.88.0.1:5000/tripod/controller:src-1"),
            ("10.88.0.1:5000/tripod/controller", "src-1")
        );
        assert_eq!(
            split_image("10.88.0.1:5000/tripod/controller"),
            ("10.88.0.1:5000/tripod/controller", "")
        );
    }
}
