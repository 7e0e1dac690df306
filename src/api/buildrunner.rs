#![allow(clippy::duplicated_attributes)] // several printcolumn(type_ = ...) in one derive
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A BuildRunner is a build machine outside the cluster (a macOS host, or
/// any Linux host) whose `tripod agent --runner` takes builds of its os/arch
/// from the controller. The controller keeps its token in the Secret
/// `tripod-runner-<name>` of its own namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "build.tripod.dev",
    version = "v1alpha1",
    kind = "BuildRunner",
    status = "BuildRunnerStatus",
    shortname = "br",
    category = "tripod",
    doc = "BuildRunner registers a build machine outside the cluster (a macOS host, or any Linux host) whose `tripod agent --runner` takes builds of its os/arch.",
    printcolumn(name = "OS", type_ = "string", json_path = ".spec.os"),
    printcolumn(name = "Arch", type_ = "string", json_path = ".spec.arch"),
    printcolumn(name = "Capacity", type_ = "integer", json_path = ".spec.capacity"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Emulates", type_ = "string", json_path = ".spec.emulatedArchs"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.os == 'linux' || !has(self.emulatedArchs) || size(self.emulatedArchs) == 0",
        "message": "spec.emulatedArchs: only Linux runners emulate other architectures"
    },
    {
        "rule": "self.os == 'linux' || !has(self.windowsArchs) || size(self.windowsArchs) == 0",
        "message": "spec.windowsArchs: only Linux runners build Windows images this way (a Windows runner builds its own os/arch)"
    }
]))]
pub struct BuildRunnerSpec {
    /// Operating system of the runner: `darwin` (the macOS leg), or `linux`/`windows`.
    pub os: RunnerOs,
    /// CPU architecture of the runner, e.g. `arm64` or `amd64`.
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self in ['amd64', 'arm64', 'arm', '386', 'ppc64le', 's390x', 'riscv64', 'mips64le', 'loong64']",
            "message": "must be one of amd64, arm64, arm, 386, ppc64le, s390x, riscv64, mips64le, loong64"
        }
    ]))]
    pub arch: String,
    /// How many builds the runner takes at once. Default: 1.
    #[serde(default = "default_capacity")]
    #[schemars(range(min = 1, max = 64))]
    pub capacity: i32,
    /// Labels an ImageBuild's `spec.executor.runnerSelector` can match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Further architectures a Linux runner builds through user-mode
    /// emulation (qemu-user with binfmt_misc on the host), e.g. `[arm64]` on
    /// an amd64 host. Such platforms are marked `emulated` in the ImageBuild's
    /// status. The agent checks at connection that the host really runs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(a, a in ['amd64', 'arm64', 'arm', '386', 'ppc64le', 's390x', 'riscv64', 'mips64le', 'loong64'])",
            "message": "each must be one of amd64, arm64, arm, 386, ppc64le, s390x, riscv64, mips64le, loong64"
        }
    ]))]
    pub emulated_archs: Vec<String>,
    /// Windows architectures a Linux runner also builds, through BuildKit
    /// (the agent runs with `--buildkit-addr`), e.g. `[amd64]`: `windows/amd64`
    /// images from Dockerfiles whose Windows stages have no RUN step (COPY,
    /// ADD, ENV, LABEL…: RUN needs a Windows host and is refused, naming the
    /// step). The controller refuses the session of an agent started
    /// without `--buildkit-addr`, which does not build them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(a, a in ['amd64', 'arm64'])",
            "message": "each must be amd64 or arm64"
        }
    ]))]
    pub windows_archs: Vec<String>,
}

fn default_capacity() -> i32 {
    1
}

/// Operating system of a BuildRunner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunnerOs {
    /// macOS.
    #[default]
    Darwin,
    /// Linux.
    Linux,
    /// Windows.
    Windows,
}

impl RunnerOs {
    /// The OS as written in platforms.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerOs::Darwin => "darwin",
            RunnerOs::Linux => "linux",
            RunnerOs::Windows => "windows",
        }
    }
}

/// Where a BuildRunner is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunnerPhase {
    /// The agent is connected and heartbeating.
    Online,
    /// The agent missed its heartbeats; its leases expire.
    Offline,
    /// The agent finishes its builds and takes no new ones.
    Draining,
}

impl RunnerPhase {
    /// The phase as written in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerPhase::Online => "Online",
            RunnerPhase::Offline => "Offline",
            RunnerPhase::Draining => "Draining",
        }
    }
}

/// What Tripod observed of a BuildRunner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildRunnerStatus {
    /// Online, Offline or Draining. Absent until the runner's agent first connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunnerPhase>,
    /// When the agent last reported in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Builds the runner holds a lease for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_builds: Vec<ActiveBuild>,
    /// Version of the runner's `tripod agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// kstatus conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A build a runner holds a lease for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveBuild {
    /// Namespace of the ImageBuild.
    pub namespace: String,
    /// Name of the ImageBuild.
    pub name: String,
    /// The platform being built.
    pub platform: String,
}
