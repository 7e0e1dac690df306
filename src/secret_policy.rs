//! Which Secrets an ImageBuild may hand to its build: a Secret named by
//! `spec.source.git.secretRef` or `spec.output.pushSecretRef` is used only
//! when its type fits the field and it opts in with the annotation
//! [`ANNOTATION_ALLOW`]` = "true"`. The controller reads Secrets with its
//! own rights; without this rule, anyone who may create an ImageBuild could
//! have any Secret of the namespace pushed to a registry or git server of
//! their choosing.

use k8s_openapi::api::core::v1::Secret;

/// The annotation a Secret carries to be usable by ImageBuilds of its
/// namespace.
pub const ANNOTATION_ALLOW: &str = "build.tripod.dev/allow";

/// Secret types `spec.source.git.secretRef` accepts.
pub const GIT_TYPES: &[&str] = &["kubernetes.io/basic-auth", "kubernetes.io/ssh-auth"];
/// Secret types `spec.output.pushSecretRef` accepts.
pub const PUSH_TYPES: &[&str] = &["kubernetes.io/dockerconfigjson"];

/// Whether `secret` (the one `field` names, `None` when it does not exist)
/// may be used; the error names the field and says what to do.
pub fn check(
    field: &str,
    namespace: &str,
    name: &str,
    secret: Option<&Secret>,
    types: &[&str],
) -> Result<(), String> {
    let Some(secret) = secret else {
        return Err(format!("{field}: Secret {namespace}/{name} not found"));
    };
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    if !types.contains(&type_) {
        return Err(format!(
            "{field}: Secret {namespace}/{name} is of type {type_}; it must be {}",
            types.join(" or ")
        ));
    }
    let allowed = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ALLOW))
        .is_some_and(|v| v == "true");
    if !allowed {
        return Err(format!(
            "{field}: Secret {namespace}/{name} does not allow builds to use it; \
             annotate it with {ANNOTATION_ALLOW}=\"true\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(type_: &str, allow: Option<&str>) -> Secret {
        let mut s = Secret {
            type_: Some(type_.into()),
            ..Default::default()
        };
        if let Some(v) = allow {
            s.metadata.annotations = Some([(ANNOTATION_ALLOW.to_string(), v.to_string())].into());
        }
        s
    }

    #[test]
    fn only_fitting_types_that_opt_in_are_used() {
        let f = "spec.output.pushSecretRef";
        let ok = secret("kubernetes.io/dockerconfigjson", Some("true"));
        assert!(check(f, "ns", "s", Some(&ok), PUSH_TYPES).is_ok());
        let cases = [
            (None, "not found"),
            (Some(secret("Opaque", Some("true"))), "is of type Opaque"),
            (
                Some(secret("kubernetes.io/basic-auth", Some("true"))),
                "must be kubernetes.io/dockerconfigjson",
            ),
            (
                Some(secret("kubernetes.io/dockerconfigjson", None)),
                "annotate it",
            ),
            (
                Some(secret("kubernetes.io/dockerconfigjson", Some("yes"))),
                "annotate it",
            ),
        ];
        for (s, want) in cases {
            let err = check(f, "ns", "s", s.as_ref(), PUSH_TYPES).unwrap_err();
            assert!(err.starts_with(f) && err.contains(want), "{err}");
        }
        let ssh = secret("kubernetes.io/ssh-auth", Some("true"));
        assert!(
            check(
                "spec.source.git.secretRef",
                "ns",
                "s",
                Some(&ssh),
                GIT_TYPES
            )
            .is_ok()
        );
    }
}
