#![allow(clippy::duplicated_attributes)] // several printcolumn(type_ = ...) in one derive
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An ImageBuild asks Tripod to build a container image for one or more
/// platforms, each on a machine of its own OS, push it, and report the
/// registry-verified digest in `status.image`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "build.tripod.dev",
    version = "v1alpha1",
    kind = "ImageBuild",
    namespaced,
    status = "ImageBuildStatus",
    shortname = "ib",
    category = "tripod",
    doc = "ImageBuild builds a container image natively on the OS of each requested platform, pushes it and reports the registry-verified digest.",
    printcolumn(
        name = "Platforms",
        type_ = "string",
        json_path = ".spec.platforms",
        description = "Platforms being built"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the build is"
    ),
    printcolumn(
        name = "Digest",
        type_ = "string",
        json_path = ".status.image.digest",
        description = "Registry-verified image digest"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.executor) || !has(self.executor.runnerPlatforms) || self.executor.runnerPlatforms.all(p, p in self.platforms && (p.startsWith('linux/') || p.startsWith('windows/') || p.startsWith('windows(')))",
        "message": "spec.executor.runnerPlatforms: each entry must be a linux or windows platform listed in spec.platforms"
    },
    {
        "rule": "!has(self.platformBuildArgs) || self.platformBuildArgs.all(a, a.platform in self.platforms)",
        "message": "spec.platformBuildArgs: each platform must be written as in spec.platforms"
    }
]))]
pub struct ImageBuildSpec {
    /// Where the build context comes from: exactly one of `git` or `inline`.
    pub source: BuildSource,

    /// Path of the Dockerfile inside the build context (git sources).
    /// Default: `Dockerfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub dockerfile: Option<String>,

    /// The stage of a multi-stage Dockerfile to build. Default: the last stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub target: Option<String>,

    /// Build arguments (`ARG` values) passed to the Dockerfile. Names must be unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub build_args: Vec<BuildArg>,

    /// Platforms to build, as `os/arch[/variant]` with os one of `linux`,
    /// `windows` or `darwin` (e.g. `linux/amd64`, `linux/arm/v7`,
    /// `windows/amd64`, `darwin/arm64`). Each platform is built natively on a
    /// machine of its OS and pushed by digest; several platforms are joined
    /// into one image index under the output tags.
    ///
    /// A Windows platform may name the Windows OS build its image is for,
    /// as `windows(10.0.17763)/amd64` (Server 2019) or
    /// `windows(10.0.20348)/amd64` (Server 2022): one index can then hold an
    /// image per build, each with its `os.version`, so every Windows node
    /// pulls the one it can run. Its build Pod runs on a node of that build
    /// (`node.kubernetes.io/windows-build`); give each build its base image
    /// with `spec.platformBuildArgs`. When one Windows platform of an
    /// architecture names a build, all of that architecture must.
    /// Default: `[linux/amd64]`.
    #[serde(default = "default_platforms")]
    #[schemars(schema_with = "platforms_schema")]
    pub platforms: Vec<String>,

    /// Build arguments for single platforms, added to (and overriding)
    /// `spec.buildArgs` for that platform only: typically the base image of
    /// each Windows OS build, e.g. for `windows(10.0.17763)/amd64` the
    /// argument `BASE=mcr.microsoft.com/windows/nanoserver:ltsc2019` used
    /// by `ARG BASE` / `FROM ${BASE}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["platform"]))]
    pub platform_build_args: Vec<PlatformBuildArgs>,

    /// What happens to the other platforms when one fails after its
    /// retries: `false` (the default) lets them finish, so their verified
    /// digests stay in the status and `build.tripod.dev/retry-failed`
    /// rebuilds only the failed ones; `true` stops them at once
    /// (they end `Cancelled`, and a retry rebuilds them too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_fast: bool,

    /// Where the image is pushed.
    pub output: Output,

    /// A registry repository used as a layer cache (read and written) across builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,

    /// How long the whole build may take, from its start to its last
    /// platform, as a duration such as `30m`, `1h` or `1h30m` (at most
    /// `168h`). When it runs out the build stops and fails with reason
    /// `Timeout`. Default: `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')",
            "message": "must be a duration such as 90s, 30m, 1h or 1h30m"
        }
    ]))]
    pub timeout: Option<String>,

    /// Extra attempts per platform after a failed attempt (0–10). Default: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub retries: Option<i32>,

    /// Set to `true` to stop the build without deleting the resource; the
    /// ImageBuild then reports `phase: Cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,

    /// Seconds after the build finished (Succeeded, Failed or Cancelled) when
    /// its build Pods and leases are removed. The ImageBuild itself stays.
    /// Default: keep them. Set it when creating the ImageBuild: changing it
    /// later is a change of the spec, and like any other it starts a new
    /// build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Where builds run: settings for build Pods (linux and windows), and
    /// which platforms go to BuildRunners (darwin always) and which runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorSpec>,
}

impl ImageBuildSpec {
    /// Whether the platforms are joined into an image index: several of
    /// them (`count`, after validation), or `spec.output.index: Always`.
    pub fn makes_index(&self, count: usize) -> bool {
        count > 1 || self.output.index == Some(IndexPolicy::Always)
    }

    /// The build arguments of `platform`: `spec.buildArgs` with its
    /// `spec.platformBuildArgs` entry (matched canonically) on top.
    pub fn build_args_for(&self, platform: &crate::platform::Platform) -> Vec<(String, String)> {
        let mut args: Vec<(String, String)> = self
            .build_args
            .iter()
            .map(|a| (a.name.clone(), a.value.clone()))
            .collect();
        let extra = self.platform_build_args.iter().find(|pa| {
            pa.platform
                .parse::<crate::platform::Platform>()
                .ok()
                .as_ref()
                == Some(platform)
        });
        for a in extra.map(|pa| pa.build_args.as_slice()).unwrap_or_default() {
            match args.iter_mut().find(|(n, _)| *n == a.name) {
                Some(slot) => slot.1 = a.value.clone(),
                None => args.push((a.name.clone(), a.value.clone())),
            }
        }
        args
    }
}

fn platforms_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "x-kubernetes-list-type": "set",
        "default": ["linux/amd64"],
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "x-kubernetes-validations": [
                {
                    "rule": "self.matches('^[^/]+/[^/]+(/[^/]+)?$')",
                    "messageExpression": "'platform \"' + self + '\" must have the form os/arch[/variant]'"
                },
                {
                    "rule": "self.lowerAscii().matches('^(linux|windows|darwin|macos|osx|mac)(\\\\([^)]*\\\\))?/')",
                    "messageExpression": "'platform \"' + self + '\" has an unknown OS: expected linux, windows or darwin'"
                },
                {
                    "rule": "!self.contains('(') || self.lowerAscii().matches('^windows\\\\([0-9]{1,3}\\\\.[0-9]{1,3}\\\\.[0-9]{1,6}\\\\)/')",
                    "messageExpression": "'platform \"' + self + '\": only windows takes an OS build, written major.minor.build as in windows(10.0.17763)/amd64'"
                },
                {
                    "rule": "self.lowerAscii().matches('^[^/]+/(amd64|x86_64|x86-64|x64|arm64|aarch64|arm|armhf|armel|386|i386|i686|x86|ppc64le|s390x|riscv64|mips64le|loong64)(/|$)')",
                    "messageExpression": "'platform \"' + self + '\" has an unknown architecture: expected amd64, arm64, arm, 386, ppc64le, s390x, riscv64, mips64le or loong64'"
                }
            ]
        }
    })
}

fn tags_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 16,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": 128,
            "x-kubernetes-validations": [
                {"rule": "self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$')", "message": "must be a tag (letters, digits, _ . -; at most 128)"}
            ]
        }
    })
}

/// Build arguments of one platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformBuildArgs {
    /// The platform, written as in `spec.platforms`.
    #[schemars(length(min = 1, max = 64))]
    pub platform: String,
    /// Its build arguments; they override `spec.buildArgs` of the same name.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub build_args: Vec<BuildArg>,
}

/// The default of `spec.platforms`.
pub fn default_platforms() -> Vec<String> {
    vec!["linux/amd64".to_string()]
}

/// Where the build context comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.git) != has(self.inline)",
        "message": "exactly one of spec.source.git or spec.source.inline must be set"
    }
]))]
pub struct BuildSource {
    /// Build from a git repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// Build from a Dockerfile and small files written in the resource itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineSource>,
}

/// A git repository as build context.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Clone URL (`https://`, `http://`, `ssh://`, `git://` or `git@host:path`).
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.matches('^(https?|ssh|git)://.+$') || self.matches('^[A-Za-z0-9._-]+@[^:]+:.+$')",
            "message": "must be a git URL (https://, http://, ssh://, git:// or user@host:path)"
        }
    ]))]
    pub url: String,
    /// Branch, tag or commit to build. Default: the remote's HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub revision: Option<String>,
    /// Directory inside the repository used as build context. Default: `.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "!self.startsWith('/') && !self.matches('(^|/)\\\\.\\\\.(/|$)')",
            "message": "must be a relative path inside the repository"
        }
    ]))]
    pub context_dir: Option<String>,
    /// A Secret in the same namespace with git credentials: of type
    /// `kubernetes.io/basic-auth` (`username`, `password`) or
    /// `kubernetes.io/ssh-auth` (`ssh-privatekey`, optional `known_hosts`),
    /// annotated `build.tripod.dev/allow: "true"` to be usable by builds.
    /// Any other Secret stalls the build naming this field. Credentials
    /// written in the URL are used as `username`/`password` and never shown
    /// (not in labels, logs, status or Events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
}

/// A Dockerfile and small context files written in the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineSource {
    /// The Dockerfile text.
    #[schemars(length(min = 1, max = 65536))]
    pub dockerfile: String,
    /// Extra files of the build context: relative path → text content.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(k, k.size() <= 256 && !k.startsWith('/') && !k.matches('(^|/)\\\\.\\\\.(/|$)'))",
            "message": "file names must be relative paths inside the build context"
        }
    ]))]
    pub files: BTreeMap<String, String>,
}

/// A reference to a Secret in the ImageBuild's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A build argument.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildArg {
    /// Name of the `ARG`.
    #[schemars(length(min = 1, max = 256))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[A-Za-z_][A-Za-z0-9_]*$')", "message": "must be a valid ARG name (letters, digits, _)"}
    ]))]
    pub name: String,
    /// Value of the `ARG`.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Where the image is pushed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// The image reference to push, with a tag and without a digest, e.g.
    /// `registry.example.com/team/app:1.2.3` (tag default: `latest`). Tripod
    /// writes the resulting digest to `status.image`.
    #[schemars(length(min = 1, max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "!self.contains('@')",
            "message": "must be a tag reference without a digest: Tripod writes the digest to status.image"
        },
        {
            "rule": "self.contains('@') || self.matches('^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$')",
            "message": "must be an image reference such as registry.example.com/team/app:1.2.3"
        }
    ]))]
    pub image: String,
    /// More tags pushed for the same image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tags_schema")]
    pub additional_tags: Vec<String>,
    /// A Secret in the same namespace with credentials for the registry: of
    /// type `kubernetes.io/dockerconfigjson` and annotated
    /// `build.tripod.dev/allow: "true"` to be usable by builds. Any other
    /// Secret stalls the build naming this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_secret_ref: Option<SecretReference>,
    /// When to push an image index: `Auto` (the default) pushes one when
    /// `spec.platforms` has several entries and the image manifest itself
    /// for a single platform; `Always` pushes an index for a single
    /// platform too (a deployment that expects an index, or a platform
    /// with a Windows OS build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexPolicy>,
    /// Talk plain HTTP (or HTTPS without verifying its certificate) to the
    /// output registry: the registry of `image`, and only that one. Base
    /// images from other registries are still pulled over verified HTTPS;
    /// push credentials for this registry travel unencrypted. For local
    /// development only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// When to push an image index.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum IndexPolicy {
    /// An index for several platforms, the manifest itself for one.
    #[default]
    Auto,
    /// An index whatever the number of platforms.
    Always,
}

/// A registry layer cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    /// Repository that holds cached layers, e.g. `registry.example.com/team/app-cache`.
    #[schemars(length(min = 1, max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!self.contains('@')", "message": "must be a repository without a digest"}
    ]))]
    pub image: String,
}

/// Where builds run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorSpec {
    /// Extra node labels build Pods require, merged on top of the platform's
    /// `kubernetes.io/os` and `kubernetes.io/arch`. The key
    /// `node.kubernetes.io/windows-build` applies to Windows Pods only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "!('kubernetes.io/os' in self) && !('kubernetes.io/arch' in self)",
            "message": "must not set kubernetes.io/os or kubernetes.io/arch: spec.platforms decides them"
        }
    ]))]
    pub node_selector: BTreeMap<String, String>,
    /// Extra tolerations for build Pods, added to the ones Tripod sets (the
    /// `os=windows:NoSchedule` toleration for Windows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Compute resources for the builder container of build Pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Labels a BuildRunner must carry (in its `spec.labels`) to take a
    /// platform of this build that runs on runners.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runner_selector: BTreeMap<String, String>,
    /// Linux or Windows platforms (entries of `spec.platforms`) to build on
    /// BuildRunners instead of in build Pods, e.g. `linux/arm64` on a Linux
    /// runner that emulates arm64, or `windows/amd64` on a runner whose
    /// BuildKit builds Windows images (without RUN steps on a Linux host).
    /// darwin platforms always build on runners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub runner_platforms: Vec<String>,
    /// The builder, instead of the one the executor's host picks: `buildah`
    /// (linux platforms, in build Pods or on Linux runners), `buildkit`
    /// (linux and windows platforms: on runners started with a BuildKit
    /// daemon, and in Windows build Pods, which always use it) or `darwin`
    /// (darwin platforms on macOS runners). A backend that cannot build one
    /// of `spec.platforms` where it would run is refused before anything
    /// runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendName>,
}

/// A build backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// buildah: Linux images, on Linux (natively or through qemu-user emulation).
    Buildah,
    /// The darwin backend: macOS images on a macOS runner (RUN under Seatbelt).
    Darwin,
    /// BuildKit: Linux and Windows images through a buildkitd (RUN steps
    /// only on a host of the image's OS).
    Buildkit,
}

impl BackendName {
    /// The name as written in the resource and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendName::Buildah => "buildah",
            BackendName::Darwin => "darwin",
            BackendName::Buildkit => "buildkit",
        }
    }

    /// The backend of a name, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "buildah" => Some(BackendName::Buildah),
            "darwin" => Some(BackendName::Darwin),
            "buildkit" => Some(BackendName::Buildkit),
            _ => None,
        }
    }
}

/// Where an ImageBuild is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing started yet.
    #[default]
    Pending,
    /// Waiting for an executor (a build Pod to be bound, or a BuildRunner).
    Scheduling,
    /// At least one platform is building.
    Building,
    /// Every platform built and verified.
    Succeeded,
    /// A platform failed after its last attempt, or the spec is invalid.
    Failed,
    /// Stopped by `spec.cancel`.
    Cancelled,
}

impl Phase {
    /// The phase as written in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduling => "Scheduling",
            Phase::Building => "Building",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
        }
    }

    /// Whether nothing more happens in this phase until the spec changes.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What Tripod observed of an ImageBuild.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the build is: Pending, Scheduling, Building, Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Unique ID of the current build (a new one per generation and per rebuild request).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "buildID")]
    pub build_id: Option<String>,
    /// The `build.tripod.dev/rebuild` annotation value this build answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<String>,
    /// The `build.tripod.dev/retry-failed` annotation value last answered
    /// (its failed platforms were rebuilt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_failed: Option<String>,
    /// When the current build started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the current build finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The pushed image, once every platform succeeded (and their index
    /// was pushed and read back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStatus>,
    /// One entry per requested platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformStatus>,
    /// kstatus conditions: Ready, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The pushed image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The tag reference that was pushed.
    pub reference: String,
    /// The registry-verified digest: of the image index when several
    /// platforms were built (or `spec.output.index: Always`), else of the
    /// image manifest.
    pub digest: String,
    /// `repository@digest`: the reference to deploy.
    pub pinned: String,
}

/// The state of one platform of the build.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformStatus {
    /// The platform, in canonical `os/arch[/variant]` form.
    pub platform: String,
    /// Where this platform is: Pending, Scheduling, Building, Succeeded, Failed or Cancelled.
    pub phase: Phase,
    /// What builds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorRef>,
    /// Attempts started so far (1 for the first).
    #[serde(default)]
    pub attempts: i32,
    /// The last attempt this platform may make before it fails: `1 +
    /// spec.retries`, raised by as much by each
    /// `build.tripod.dev/retry-failed` request that rebuilds it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt_limit: i32,
    /// When the current attempt started (its executor was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// The build step being run, e.g. `STEP 3/7: RUN make`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The pushed manifest digest of this platform (pushed by digest, not
    /// under the output tags, when an index joins the platforms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why the platform is where it is, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The executor of a platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorRef {
    /// `Pod` (a build Pod) or `Runner` (a BuildRunner holding a lease).
    pub kind: String,
    /// Name of the Pod or BuildRunner.
    pub name: String,
    /// The node the Pod was bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// True when a runner builds this platform through user-mode emulation
    /// (qemu-user) instead of on a CPU of its architecture.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emulated: bool,
}
