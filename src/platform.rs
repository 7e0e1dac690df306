//! Container image platforms (`os/arch[/variant]`), independent of Kubernetes
//! and protocol types.
//!
//! A [`Platform`] is always held in canonical OCI form: lower case, with
//! architecture aliases resolved (`x86_64` → `amd64`, `aarch64` → `arm64`,
//! `armhf` → `arm/v7`, ...) and redundant variants dropped (`arm64/v8` →
//! `arm64`, `amd64/v1` → `amd64`). Two spellings of the same platform
//! therefore compare equal, hash alike and display identically.
//!
//! A Windows platform may name the OS build its image is for, in
//! containerd's specifier syntax: `windows(10.0.17763)/amd64`. Windows
//! nodes run only images of their own build, so one index can hold one
//! Windows image per build.

use std::fmt;
use std::str::FromStr;

/// The expected shape of a platform string, used in error messages.
const EXPECTED_FORMAT: &str = "os/arch[/variant], or windows(BUILD)/arch";

/// Canonical names of every architecture a [`Platform`] may carry, in the
/// order they are listed in error messages.
pub const KNOWN_ARCHS: &[&str] = &[
    "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le", "loong64",
];

/// Human-readable list of [`KNOWN_ARCHS`] for error messages.
const KNOWN_ARCHS_LIST: &str = "amd64, arm64, arm, 386, ppc64le, s390x, riscv64, mips64le, loong64";

/// An operating system an image can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Os {
    /// Linux (`linux`).
    Linux,
    /// Microsoft Windows (`windows`).
    Windows,
    /// Apple macOS (`darwin`; also parsed from `macos`, `osx` and `mac`).
    Darwin,
}

impl Os {
    /// Every supported operating system, in canonical order.
    pub const ALL: [Os; 3] = [Os::Linux, Os::Windows, Os::Darwin];

    /// The canonical lower-case name, as used by OCI and `kubernetes.io/os`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Windows => "windows",
            Os::Darwin => "darwin",
        }
    }

    /// The OS this program runs on (Linux for any other Unix but macOS).
    #[must_use]
    pub fn host() -> Os {
        if cfg!(windows) {
            Os::Windows
        } else if cfg!(target_os = "macos") {
            Os::Darwin
        } else {
            Os::Linux
        }
    }

    /// Resolves an already trimmed, lower-cased OS name or alias.
    fn from_normalized(name: &str) -> Option<Os> {
        match name {
            "linux" => Some(Os::Linux),
            "windows" => Some(Os::Windows),
            "darwin" | "macos" | "osx" | "mac" => Some(Os::Darwin),
            _ => None,
        }
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Os {
    type Err = PlatformError;

    /// Parses an OS name case-insensitively, ignoring surrounding whitespace
    /// and accepting the aliases `macos`, `osx` and `mac` for [`Os::Darwin`].
    fn from_str(s: &str) -> Result<Os, PlatformError> {
        let name = s.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(PlatformError::Empty {
                input: s.to_owned(),
                part: PlatformPart::Os,
            });
        }
        Os::from_normalized(&name).ok_or(PlatformError::UnknownOs {
            input: s.to_owned(),
            os: name,
        })
    }
}

impl TryFrom<&str> for Os {
    type Error = PlatformError;

    /// Same as [`Os::from_str`].
    fn try_from(s: &str) -> Result<Os, PlatformError> {
        s.parse()
    }
}

/// Which part of a platform string an [`PlatformError::Empty`] error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlatformPart {
    /// The whole platform string (empty or only whitespace).
    Input,
    /// The operating system part.
    Os,
    /// The architecture part.
    Arch,
    /// The variant part.
    Variant,
}

impl fmt::Display for PlatformPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlatformPart::Input => "platform string",
            PlatformPart::Os => "OS",
            PlatformPart::Arch => "architecture",
            PlatformPart::Variant => "variant",
        })
    }
}

/// Why a platform string or its parts could not be turned into a [`Platform`].
///
/// Every variant carries the original `input` and names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// The input, or one of its `/`-separated parts, is empty.
    #[error("platform {input:?}: empty {part} (expected {EXPECTED_FORMAT})")]
    Empty {
        /// The input as given.
        input: String,
        /// Which part is empty.
        part: PlatformPart,
    },
    /// The input does not consist of two or three `/`-separated parts.
    #[error("platform {input:?}: expected {EXPECTED_FORMAT}")]
    Format {
        /// The input as given.
        input: String,
    },
    /// The OS part is not a known operating system or alias.
    #[error("platform {input:?}: unknown OS {os:?} (expected linux, windows or darwin)")]
    UnknownOs {
        /// The input as given.
        input: String,
        /// The offending OS part, lower-cased.
        os: String,
    },
    /// The architecture part is not a known architecture or alias.
    #[error(
        "platform {input:?}: unknown architecture {arch:?} (expected one of {KNOWN_ARCHS_LIST})"
    )]
    UnknownArch {
        /// The input as given.
        input: String,
        /// The offending architecture part, lower-cased.
        arch: String,
    },
    /// The variant is malformed or not valid for the architecture.
    #[error(
        "platform {input:?}: variant {variant:?} is not valid for {arch} (expected {expected})"
    )]
    InvalidVariant {
        /// The input as given.
        input: String,
        /// The canonical architecture the variant was checked against.
        arch: String,
        /// The offending variant part, lower-cased.
        variant: String,
        /// What would have been accepted, e.g. `v1-v4` or `no variant`.
        expected: &'static str,
    },
    /// The OS build in parentheses is malformed or given for another OS
    /// than Windows.
    #[error(
        "platform {input:?}: OS build {os_version:?} is not valid (only windows takes one, as major.minor.build such as windows(10.0.17763)/amd64)"
    )]
    InvalidOsVersion {
        /// The input as given.
        input: String,
        /// The offending OS build.
        os_version: String,
    },
}

/// A target platform in canonical OCI form: `os/arch[/variant]`.
///
/// Construct with [`Platform::new`] or by parsing (`"linux/arm64".parse()`);
/// both normalise aliases, so `"Linux/x86_64"` equals `"linux/amd64"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    os: Os,
    arch: String,
    variant: Option<String>,
    /// Windows only: the OS build (`major.minor.build`) the image is for.
    os_version: Option<String>,
}

impl Platform {
    /// Builds a platform from its parts, normalising them exactly as parsing
    /// does: surrounding whitespace is trimmed, case is ignored, architecture
    /// aliases are resolved and redundant variants are dropped.
    ///
    /// # Errors
    ///
    /// Returns [`PlatformError::Empty`] for an empty architecture or variant,
    /// [`PlatformError::UnknownArch`] for an unknown architecture and
    /// [`PlatformError::InvalidVariant`] for a variant the architecture does
    /// not accept.
    pub fn new(os: Os, arch: &str, variant: Option<&str>) -> Result<Platform, PlatformError> {
        let input = match variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        let arch = arch.trim().to_ascii_lowercase();
        let variant = variant.map(|v| v.trim().to_ascii_lowercase());
        if arch.is_empty() {
            return Err(PlatformError::Empty {
                input,
                part: PlatformPart::Arch,
            });
        }
        if variant.as_deref().is_some_and(str::is_empty) {
            return Err(PlatformError::Empty {
                input,
                part: PlatformPart::Variant,
            });
        }
        Platform::build(&input, os, &arch, variant.as_deref())
    }

    /// The operating system.
    #[must_use]
    pub fn os(&self) -> Os {
        self.os
    }

    /// The canonical architecture, e.g. `amd64` or `arm`.
    #[must_use]
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The canonical variant, e.g. `v7`, if the platform has one.
    #[must_use]
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// The Windows OS build the platform asks for (`10.0.17763`), if any:
    /// the value of a node's `node.kubernetes.io/windows-build` label, and
    /// the prefix of the image's `os.version`.
    #[must_use]
    pub fn os_version(&self) -> Option<&str> {
        self.os_version.as_deref()
    }

    /// The same platform for the Windows OS build `os_version`
    /// (`major.minor.build`, e.g. `10.0.20348`), or without one (`None`).
    ///
    /// # Errors
    ///
    /// [`PlatformError::InvalidOsVersion`] when the platform is not a
    /// Windows one or the build is not three dot-separated numbers.
    pub fn with_os_version(mut self, os_version: Option<&str>) -> Result<Platform, PlatformError> {
        match os_version {
            None => self.os_version = None,
            Some(v) => {
                let v = v.trim();
                if self.os != Os::Windows || !is_os_build(v) {
                    return Err(PlatformError::InvalidOsVersion {
                        input: self.to_string(),
                        os_version: v.to_string(),
                    });
                }
                self.os_version = Some(v.to_string());
            }
        }
        Ok(self)
    }

    /// The platform without its OS build: what a node's `kubernetes.io/os`
    /// and `kubernetes.io/arch` labels and an index entry's `os` and
    /// `architecture` say.
    #[must_use]
    pub fn without_os_version(&self) -> Platform {
        Platform {
            os_version: None,
            ..self.clone()
        }
    }

    /// Whether an image's `os.version` (`10.0.17763.6414`) is of this
    /// platform's OS build (always true without one).
    #[must_use]
    pub fn accepts_os_version(&self, image_os_version: Option<&str>) -> bool {
        match (&self.os_version, image_os_version) {
            (None, _) => true,
            (Some(want), Some(have)) => {
                have == want
                    || have
                        .strip_prefix(want.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            }
            (Some(_), None) => false,
        }
    }

    /// The value of the Kubernetes node label `kubernetes.io/arch` for nodes
    /// that can run this platform (the canonical architecture).
    #[must_use]
    pub fn node_arch(&self) -> &str {
        &self.arch
    }

    /// A form usable as a Kubernetes label value and in object names:
    /// `os-arch[-variant][-build]`, e.g. `linux-arm-v7` or
    /// `windows-amd64-10-0-17763`.
    #[must_use]
    pub fn label_value(&self) -> String {
        let mut out = format!("{}-{}", self.os, self.arch);
        if let Some(v) = &self.variant {
            out.push('-');
            out.push_str(v);
        }
        if let Some(v) = &self.os_version {
            out.push('-');
            out.push_str(&v.replace('.', "-"));
        }
        out
    }

    /// Validates and normalises lower-cased, non-empty `arch` and `variant`.
    fn build(
        input: &str,
        os: Os,
        arch: &str,
        variant: Option<&str>,
    ) -> Result<Platform, PlatformError> {
        let (arch, implied) = resolve_arch(arch).ok_or_else(|| PlatformError::UnknownArch {
            input: input.to_owned(),
            arch: arch.to_owned(),
        })?;
        let invalid = |variant: &str, expected: &'static str| PlatformError::InvalidVariant {
            input: input.to_owned(),
            arch: arch.to_owned(),
            variant: variant.to_owned(),
            expected,
        };

        let variant = match (variant, implied) {
            (None, None) => None,
            (None, Some(implied)) => Some(implied.version),
            (Some(v), Some(implied)) => match variant_number(v) {
                Some(n) if n == implied.version => Some(n),
                _ => return Err(invalid(v, implied.expected)),
            },
            (Some(v), None) => {
                let expected = expected_variants(arch);
                let n = variant_number(v).ok_or_else(|| invalid(v, expected))?;
                // Redundant variants (the baseline of their arch) are dropped.
                match arch {
                    "amd64" if n == 1 => None,
                    "amd64" if (2..=4).contains(&n) => Some(n),
                    "arm" if (5..=8).contains(&n) => Some(n),
                    "arm64" if n == 8 => None,
                    "arm64" if n == 9 => Some(n),
                    _ => return Err(invalid(v, expected)),
                }
            }
        };

        Ok(Platform {
            os,
            arch: arch.to_owned(),
            variant: variant.map(|n| format!("v{n}")),
            os_version: None,
        })
    }
}

/// A variant implied by an architecture alias such as `armhf`.
#[derive(Clone, Copy)]
struct ImpliedVariant {
    /// The implied variant number.
    version: u64,
    /// What an explicit variant must be to agree with the alias.
    expected: &'static str,
}

/// Resolves a lower-cased architecture name or alias to its canonical name
/// and any variant the alias implies.
fn resolve_arch(arch: &str) -> Option<(&'static str, Option<ImpliedVariant>)> {
    let canonical = match arch {
        "x86_64" | "x86-64" | "x64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" | "x86" => "386",
        "armhf" => {
            let implied = ImpliedVariant {
                version: 7,
                expected: "v7, implied by armhf",
            };
            return Some(("arm", Some(implied)));
        }
        "armel" => {
            let implied = ImpliedVariant {
                version: 6,
                expected: "v6, implied by armel",
            };
            return Some(("arm", Some(implied)));
        }
        other => KNOWN_ARCHS.iter().copied().find(|known| *known == other)?,
    };
    Some((canonical, None))
}

/// The variants a canonical architecture accepts, for error messages.
fn expected_variants(arch: &str) -> &'static str {
    match arch {
        "amd64" => "v1-v4",
        "arm" => "v5-v8",
        "arm64" => "v8 or v9",
        _ => "no variant",
    }
}

/// The number of a variant of the form `v[0-9]+`, or `None` if it is
/// malformed (or too large to matter).
fn variant_number(variant: &str) -> Option<u64> {
    let digits = variant.strip_prefix('v')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The default platform images are built for: `linux/amd64`.
#[must_use]
pub fn default_platform() -> Platform {
    Platform {
        os: Os::Linux,
        arch: "amd64".to_owned(),
        variant: None,
        os_version: None,
    }
}

/// `major.minor.build`: three dot-separated numbers of at most 3, 3 and
/// 6 digits (`10.0.17763`), as the CRD schema checks.
fn is_os_build(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts.iter().zip([3, 3, 6]).all(|(p, max)| {
            !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
        })
}

impl fmt::Display for Platform {
    /// Writes the canonical form `os[(build)]/arch[/variant]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.os_version {
            Some(v) => write!(f, "{}({v})/{}", self.os, self.arch)?,
            None => write!(f, "{}/{}", self.os, self.arch)?,
        }
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    /// Parses `os/arch[/variant]`: surrounding whitespace is trimmed, case is
    /// ignored, and aliases are normalised to the canonical OCI form.
    fn from_str(s: &str) -> Result<Platform, PlatformError> {
        let normalized = s.trim().to_ascii_lowercase();
        if normalized.is_empty() {
            return Err(PlatformError::Empty {
                input: s.to_owned(),
                part: PlatformPart::Input,
            });
        }
        let parts: Vec<&str> = normalized.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => {
                return Err(PlatformError::Format {
                    input: s.to_owned(),
                });
            }
        };
        let empty = |part| PlatformError::Empty {
            input: s.to_owned(),
            part,
        };
        // `windows(10.0.17763)`: the OS build in parentheses.
        let (os, os_version) = match os.split_once('(') {
            Some((name, rest)) => match rest.strip_suffix(')') {
                Some(v) => (name, Some(v)),
                None => {
                    return Err(PlatformError::Format {
                        input: s.to_owned(),
                    });
                }
            },
            None => (os, None),
        };
        if os.is_empty() {
            return Err(empty(PlatformPart::Os));
        }
        if arch.is_empty() {
            return Err(empty(PlatformPart::Arch));
        }
        if variant.is_some_and(str::is_empty) {
            return Err(empty(PlatformPart::Variant));
        }
        let os = Os::from_normalized(os).ok_or_else(|| PlatformError::UnknownOs {
            input: s.to_owned(),
            os: os.to_owned(),
        })?;
        let platform = Platform::build(s, os, arch, variant)?;
        match os_version {
            None => Ok(platform),
            Some(v) if os == Os::Windows && is_os_build(v) => Ok(Platform {
                os_version: Some(v.to_string()),
                ..platform
            }),
            Some(v) => Err(PlatformError::InvalidOsVersion {
                input: s.to_owned(),
                os_version: v.to_string(),
            }),
        }
    }
}

impl TryFrom<&str> for Platform {
    type Error = PlatformError;

    /// Same as [`Platform::from_str`].
    fn try_from(s: &str) -> Result<Platform, PlatformError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Platform {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> PlatformError {
        match s.parse::<Platform>() {
            Ok(platform) => panic!("{s:?} should not parse, got {platform}"),
            Err(e) => e,
        }
    }

    #[test]
    fn windows_os_builds() {
        let w = p("Windows(10.0.17763)/x86_64");
        assert_eq!(w.to_string(), "windows(10.0.17763)/amd64");
        assert_eq!(w.os_version(), Some("10.0.17763"));
        assert_eq!(w.label_value(), "windows-amd64-10-0-17763");
        assert_eq!(w.without_os_version(), p("windows/amd64"));
        assert_ne!(w, p("windows(10.0.20348)/amd64"));
        assert_eq!(p(&w.to_string()), w);
        assert!(w.accepts_os_version(Some("10.0.17763.6414")));
        assert!(w.accepts_os_version(Some("10.0.17763")));
        assert!(!w.accepts_os_version(Some("10.0.177630")));
        assert!(!w.accepts_os_version(Some("10.0.20348.2700")));
        assert!(!w.accepts_os_version(None));
        assert!(p("windows/amd64").accepts_os_version(Some("10.0.20348.1")));
        for bad in [
            "linux(10.0.17763)/amd64",
            "windows(10.0)/amd64",
            "windows(ltsc2019)/amd64",
            "windows()/amd64",
            "windows(10.0.17763.1)/amd64",
            "windows(10.0.1234567)/amd64",
            "windows(1000.0.1)/amd64",
        ] {
            assert!(
                matches!(err(bad), PlatformError::InvalidOsVersion { .. }),
                "{bad}"
            );
        }
        assert!(matches!(
            err("windows(10.0.17763/amd64"),
            PlatformError::Format { .. }
        ));
        assert_eq!(
            p("windows/arm64")
                .with_os_version(Some("10.0.26100"))
                .map(|p| p.to_string()),
            Ok("windows(10.0.26100)/arm64".to_string())
        );
        assert!(p("darwin/arm64").with_os_version(Some("10.0.1")).is_err());
    }

    #[test]
    fn os_names_and_aliases() {
        assert_eq!("linux".parse::<Os>(), Ok(Os::Linux));
        assert_eq!("Windows".parse::<Os>(), Ok(Os::Windows));
        assert_eq!("darwin".parse::<Os>(), Ok(Os::Darwin));
        for alias in ["macos", "MacOS", "osx", "OSX", "mac", " Mac "] {
            assert_eq!(alias.parse::<Os>(), Ok(Os::Darwin), "{alias}");
        }
        assert_eq!(Os::try_from("LINUX"), Ok(Os::Linux));
        for os in Os::ALL {
            assert_eq!(os.to_string(), os.as_str());
            assert_eq!(os.as_str().parse::<Os>(), Ok(os));
        }
        assert!(matches!(
            "plan9".parse::<Os>(),
            Err(PlatformError::UnknownOs { os, .. }) if os == "plan9"
        ));
        assert!(matches!(
            " ".parse::<Os>(),
            Err(PlatformError::Empty {
                part: PlatformPart::Os,
                ..
            })
        ));
    }

    #[test]
    fn os_aliases_in_platforms() {
        for s in ["macos/arm64", "osx/arm64", "mac/arm64", "MacOS/AArch64"] {
            assert_eq!(p(s), p("darwin/arm64"), "{s}");
            assert_eq!(p(s).to_string(), "darwin/arm64");
        }
    }

    #[test]
    fn arch_aliases() {
        let cases = [
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("linux/x64", "linux/amd64"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/i386", "linux/386"),
            ("linux/i686", "linux/386"),
            ("linux/x86", "linux/386"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/armhf/v7", "linux/arm/v7"),
            ("linux/armel/V6", "linux/arm/v6"),
        ];
        for (alias, canonical) in cases {
            assert_eq!(p(alias), p(canonical), "{alias}");
            assert_eq!(p(alias).to_string(), canonical, "{alias}");
        }
    }

    #[test]
    fn variant_normalisation() {
        assert_eq!(p("linux/arm64/v8").to_string(), "linux/arm64");
        assert_eq!(p("linux/arm64/v8").variant(), None);
        assert_eq!(p("linux/aarch64/v8"), p("linux/arm64"));
        assert_eq!(p("linux/amd64/v1").to_string(), "linux/amd64");
        assert_eq!(p("linux/x86_64/v1"), p("linux/amd64"));
        assert_eq!(p("linux/arm64/v9").variant(), Some("v9"));
        assert_eq!(p("linux/amd64/v3").variant(), Some("v3"));
        for v in 5..=8 {
            assert_eq!(
                p(&format!("linux/arm/v{v}")).to_string(),
                format!("linux/arm/v{v}")
            );
        }
        assert_eq!(p("linux/arm").variant(), None);
        assert_eq!(p("linux/arm/v07").variant(), Some("v7"));
    }

    #[test]
    fn every_known_arch_parses() {
        for arch in KNOWN_ARCHS {
            let platform = p(&format!("linux/{arch}"));
            assert_eq!(platform.arch(), *arch);
            assert_eq!(platform.node_arch(), *arch);
            assert_eq!(platform.variant(), None);
        }
    }

    #[test]
    fn whitespace_and_case() {
        assert_eq!(p("  LINUX/AMD64\n"), p("linux/amd64"));
        assert_eq!(p("\tWindows/X86_64 "), p("windows/amd64"));
        assert_eq!(Platform::try_from("Linux/ARM/V7"), Ok(p("linux/arm/v7")));
    }

    #[test]
    fn canonical_display() {
        assert_eq!(p("linux/amd64").to_string(), "linux/amd64");
        assert_eq!(p("Linux/ARMHF").to_string(), "linux/arm/v7");
        assert_eq!(p("windows/amd64").to_string(), "windows/amd64");
        assert_eq!(p("darwin/arm64").to_string(), "darwin/arm64");
        assert_eq!(default_platform().to_string(), "linux/amd64");
        assert_eq!(default_platform(), p("linux/amd64"));
    }

    #[test]
    fn accessors() {
        let platform = p("linux/armhf");
        assert_eq!(platform.os(), Os::Linux);
        assert_eq!(platform.arch(), "arm");
        assert_eq!(platform.node_arch(), "arm");
        assert_eq!(platform.variant(), Some("v7"));
    }

    #[test]
    fn constructor_normalises_like_parse() {
        assert_eq!(
            Platform::new(Os::Linux, "x86_64", None),
            Ok(p("linux/amd64"))
        );
        assert_eq!(
            Platform::new(Os::Linux, " ARMHF ", None),
            Ok(p("linux/arm/v7"))
        );
        assert_eq!(
            Platform::new(Os::Linux, "arm64", Some("V8")),
            Ok(p("linux/arm64"))
        );
        assert_eq!(
            Platform::new(Os::Darwin, "aarch64", None),
            Ok(p("macos/arm64"))
        );
        assert!(matches!(
            Platform::new(Os::Linux, "", None),
            Err(PlatformError::Empty {
                part: PlatformPart::Arch,
                ..
            })
        ));
        assert!(matches!(
            Platform::new(Os::Linux, "arm", Some(" ")),
            Err(PlatformError::Empty {
                part: PlatformPart::Variant,
                ..
            })
        ));
        let e = Platform::new(Os::Linux, "sparc", None).unwrap_err();
        assert!(e.to_string().contains("\"sparc\""), "{e}");
        assert!(e.to_string().contains("\"linux/sparc\""), "{e}");
    }

    #[test]
    fn alias_equality_ordering_and_hashing() {
        use std::collections::HashSet;
        assert_eq!(p("linux/x86_64"), p("linux/amd64"));
        assert_eq!(
            p("linux/x86_64").cmp(&p("linux/amd64")),
            std::cmp::Ordering::Equal
        );
        let set: HashSet<Platform> = ["linux/amd64", "linux/x86_64", "LINUX/x64", "linux/amd64/v1"]
            .into_iter()
            .map(p)
            .collect();
        assert_eq!(set.len(), 1);
        // Ordered by OS first (linux < windows < darwin), then arch, then variant.
        assert!(p("linux/amd64") < p("windows/amd64"));
        assert!(p("windows/amd64") < p("darwin/amd64"));
        assert!(p("linux/386") < p("linux/amd64"));
        assert!(p("linux/arm") < p("linux/arm/v6"));
        assert!(p("linux/armel") < p("linux/armhf"));
        assert!(Os::Linux < Os::Windows && Os::Windows < Os::Darwin);
    }

    #[test]
    fn label_value() {
        assert_eq!(p("linux/armhf").label_value(), "linux-arm-v7");
        assert_eq!(p("linux/amd64").label_value(), "linux-amd64");
        assert_eq!(p("linux/i686").label_value(), "linux-386");
        assert_eq!(p("windows/amd64/v3").label_value(), "windows-amd64-v3");
        assert_eq!(p("osx/aarch64/v8").label_value(), "darwin-arm64");
    }

    #[test]
    fn error_empty() {
        let cases = [
            ("", PlatformPart::Input, "empty platform string"),
            ("   ", PlatformPart::Input, "empty platform string"),
            ("/amd64", PlatformPart::Os, "empty OS"),
            ("linux/", PlatformPart::Arch, "empty architecture"),
            ("linux//v7", PlatformPart::Arch, "empty architecture"),
            ("linux/arm/", PlatformPart::Variant, "empty variant"),
        ];
        for (input, part, text) in cases {
            let e = err(input);
            assert_eq!(
                e,
                PlatformError::Empty {
                    input: input.to_owned(),
                    part
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(text), "{msg}");
            assert!(msg.contains(&format!("{input:?}")), "{msg}");
        }
    }

    #[test]
    fn error_format() {
        for input in ["linux", "linux/amd64/v1/extra", "a/b/c/d/", "amd64"] {
            let e = err(input);
            assert_eq!(
                e,
                PlatformError::Format {
                    input: input.to_owned()
                }
            );
        }
        assert_eq!(
            err("linux").to_string(),
            r#"platform "linux": expected os/arch[/variant], or windows(BUILD)/arch"#
        );
    }

    #[test]
    fn error_unknown_os() {
        let e = err("plan9/amd64");
        assert_eq!(
            e,
            PlatformError::UnknownOs {
                input: "plan9/amd64".to_owned(),
                os: "plan9".to_owned()
            }
        );
        assert_eq!(
            e.to_string(),
            r#"platform "plan9/amd64": unknown OS "plan9" (expected linux, windows or darwin)"#
        );
        // The offending part is reported lower-cased, the input as given.
        let msg = err(" FreeBSD/amd64").to_string();
        assert!(msg.contains(r#"unknown OS "freebsd""#), "{msg}");
        assert!(msg.contains(r#"platform " FreeBSD/amd64""#), "{msg}");
    }

    #[test]
    fn error_unknown_arch() {
        let e = err("linux/sparc");
        assert_eq!(
            e,
            PlatformError::UnknownArch {
                input: "linux/sparc".to_owned(),
                arch: "sparc".to_owned()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                r#"platform "linux/sparc": unknown architecture "sparc" (expected one of amd64, arm64, "#
            ),
            "{msg}"
        );
        for arch in KNOWN_ARCHS {
            assert!(msg.contains(arch), "{msg} should list {arch}");
        }
    }

    #[test]
    fn known_archs_list_matches() {
        assert_eq!(KNOWN_ARCHS.join(", "), KNOWN_ARCHS_LIST);
    }

    #[test]
    fn error_invalid_variant() {
        let e = err("linux/amd64/v9");
        assert_eq!(
            e,
            PlatformError::InvalidVariant {
                input: "linux/amd64/v9".to_owned(),
                arch: "amd64".to_owned(),
                variant: "v9".to_owned(),
                expected: "v1-v4",
            }
        );
        assert_eq!(
            e.to_string(),
            r#"platform "linux/amd64/v9": variant "v9" is not valid for amd64 (expected v1-v4)"#
        );
        let cases = [
            ("linux/amd64/v0", "v0", "v1-v4"),
            ("linux/amd64/v5", "v5", "v1-v4"),
            ("linux/arm/v4", "v4", "v5-v8"),
            ("linux/arm/v9", "v9", "v5-v8"),
            ("linux/arm64/v7", "v7", "v8 or v9"),
            ("linux/arm64/v10", "v10", "v8 or v9"),
            ("linux/ppc64le/v1", "v1", "no variant"),
            ("linux/386/v2", "v2", "no variant"),
            ("linux/arm/7", "7", "v5-v8"),
            ("linux/arm/v", "v", "v5-v8"),
            ("linux/arm/v7a", "v7a", "v5-v8"),
            ("linux/arm/v-7", "v-7", "v5-v8"),
            (
                "linux/arm/v99999999999999999999999",
                "v99999999999999999999999",
                "v5-v8",
            ),
            ("linux/armhf/v6", "v6", "v7, implied by armhf"),
            ("linux/armel/v7", "v7", "v6, implied by armel"),
        ];
        for (input, variant, expected) in cases {
            let e = err(input);
            assert!(
                matches!(
                    &e,
                    PlatformError::InvalidVariant { input: i, variant: v, expected: x, .. }
                        if i == input && v == variant && *x == expected
                ),
                "{input}: {e:?}"
            );
            assert!(
                e.to_string().contains(&format!("variant {variant:?}")),
                "{e}"
            );
        }
    }

    /// Canonical valid `(arch, variant)` pairs.
    fn arch_variant() -> impl Strategy<Value = (&'static str, Option<String>)> {
        let no_variant = prop::sample::select(vec![
            "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le", "loong64",
        ])
        .prop_map(|arch| (arch, None));
        prop_oneof![
            no_variant,
            (2u32..=4).prop_map(|n| ("amd64", Some(format!("v{n}")))),
            (5u32..=8).prop_map(|n| ("arm", Some(format!("v{n}")))),
            Just(("arm64", Some("v9".to_owned()))),
        ]
    }

    /// Any valid platform, built from the known OS, arch and variant sets.
    fn platform() -> impl Strategy<Value = Platform> {
        (prop::sample::select(Os::ALL.to_vec()), arch_variant()).prop_map(
            |(os, (arch, variant))| {
                Platform::new(os, arch, variant.as_deref())
                    .unwrap_or_else(|e| panic!("generated platform is valid: {e}"))
            },
        )
    }

    /// Spellings (canonical and aliases) of OS names and architectures.
    fn spelling() -> impl Strategy<Value = String> {
        let os = prop::sample::select(vec![
            "linux", "windows", "darwin", "macos", "osx", "mac", "plan9", "",
        ]);
        let arch = prop::sample::select(vec![
            "amd64", "x86_64", "x86-64", "x64", "arm64", "aarch64", "arm", "armhf", "armel", "386",
            "i386", "i686", "x86", "ppc64le", "s390x", "riscv64", "mips64le", "loong64", "sparc",
            "",
        ]);
        let variant = prop::option::of((0u32..12).prop_map(|n| format!("v{n}")));
        (os, arch, variant, any::<bool>()).prop_map(|(os, arch, variant, upper)| {
            let s = match variant {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            };
            if upper { s.to_uppercase() } else { s }
        })
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(platform in platform()) {
            let shown = platform.to_string();
            prop_assert_eq!(shown.parse::<Platform>(), Ok(platform.clone()));
            prop_assert_eq!(Platform::new(platform.os(), platform.arch(), platform.variant()), Ok(platform.clone()));
            let label = platform.label_value();
            prop_assert!(label.len() <= 63);
            prop_assert!(label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = s.parse::<Platform>();
            let _ = s.parse::<Os>();
        }

        #[test]
        fn parse_never_panics_on_platform_like_input(s in "[ a-zA-Z0-9_/.-]{0,24}") {
            if let Ok(platform) = s.parse::<Platform>() {
                prop_assert_eq!(platform.to_string().parse::<Platform>(), Ok(platform));
            }
        }

        #[test]
        fn parsed_spellings_are_canonical(s in spelling()) {
            match s.parse::<Platform>() {
                Ok(platform) => {
                    let shown = platform.to_string();
                    prop_assert_eq!(shown.parse::<Platform>(), Ok(platform.clone()));
                    prop_assert_eq!(shown.to_ascii_lowercase(), shown.clone());
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.starts_with(&format!("platform {s:?}: ")), "{}", msg);
                }
            }
        }
    }
}
