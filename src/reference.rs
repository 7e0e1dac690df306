//! Image references (`[registry/]repository[:tag]`), free of Kubernetes types.

use std::fmt;

/// Errors parsing an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("image reference is empty")]
    Empty,
    /// The reference carries a digest where a tag is expected.
    #[error("image reference {0:?} carries a digest: give a tag, Tripod reports the digest")]
    HasDigest(String),
    /// The repository part is malformed.
    #[error(
        "image reference {input:?}: invalid repository {repository:?} (lower-case letters, digits and . _ - separated by /)"
    )]
    InvalidRepository {
        /// The reference as given.
        input: String,
        /// The offending repository part.
        repository: String,
    },
    /// The tag is malformed.
    #[error("image reference {input:?}: invalid tag {tag:?} (letters, digits, _ . -, at most 128)")]
    InvalidTag {
        /// The reference as given.
        input: String,
        /// The offending tag.
        tag: String,
    },
}

/// A tagged image reference as a user wrote it, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (with port), e.g. `registry.example.com:5000`; `docker.io` when omitted.
    pub registry: String,
    /// Repository path inside the registry, e.g. `team/app`.
    pub repository: String,
    /// The tag; `latest` when omitted.
    pub tag: String,
    /// The name part as written (registry and repository, without tag).
    name: String,
}

impl ImageRef {
    /// Parses `[registry/]repository[:tag]`.
    pub fn parse(input: &str) -> Result<ImageRef, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.contains('@') {
            return Err(ReferenceError::HasDigest(input.to_string()));
        }
        let last_slash = input.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match input[last_slash..].rfind(':') {
            Some(i) => (&input[..last_slash + i], &input[last_slash + i + 1..]),
            None => (input, "latest"),
        };
        if !valid_tag(tag) {
            return Err(ReferenceError::InvalidTag {
                input: input.to_string(),
                tag: tag.to_string(),
            });
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if !name.contains('/') => ("docker.io".to_string(), format!("library/{name}")),
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if !valid_repository(&repository) {
            return Err(ReferenceError::InvalidRepository {
                input: input.to_string(),
                repository,
            });
        }
        Ok(ImageRef {
            registry,
            repository,
            tag: tag.to_string(),
            name: name.to_string(),
        })
    }

    /// The repository as the user wrote it (registry included, no tag).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The reference pinned to a digest: `name@digest`, as the user wrote the name.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{}", self.name, digest)
    }

    /// The same repository with another tag.
    pub fn with_tag(&self, tag: &str) -> String {
        format!("{}:{}", self.name, tag)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && part
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_reference() {
        let r = ImageRef::parse("registry.example.com:5000/team/app:1.2.3").unwrap();
        assert_eq!(r.registry, "registry.example.com:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag, "1.2.3");
        assert_eq!(
            r.pinned("sha256:abc"),
            "registry.example.com:5000/team/app@sha256:abc"
        );
        assert_eq!(r.to_string(), "registry.example.com:5000/team/app:1.2.3");
    }

    #[test]
    fn defaults_registry_and_tag() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag, "latest");
        let r = ImageRef::parse("localhost/app:x").unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.with_tag("y"), "localhost/app:y");
    }

    #[test]
    fn refuses_digest_and_bad_parts() {
        assert!(matches!(
            ImageRef::parse("r.io/a@sha256:00"),
            Err(ReferenceError::HasDigest(_))
        ));
        assert!(matches!(
            ImageRef::parse("r.io/App:1"),
            Err(ReferenceError::InvalidRepository { .. })
        ));
        assert!(matches!(
            ImageRef::parse("r.io/app:"),
            Err(ReferenceError::InvalidTag { .. })
        ));
        assert_eq!(ImageRef::parse(" "), Err(ReferenceError::Empty));
    }
}
