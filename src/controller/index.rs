//! The image index step: when every platform of a build pushed its
//! manifest by digest, the controller joins them into one OCI image index
//! (with the push Secret's credentials), pushes it under the output tags,
//! and reads it back. The pure parts (entries, annotations, checks) are in
//! [`crate::index`]; here the registry and the Secret are read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::plan::IndexOutcome;
use super::validate::BuildRequest;
use crate::api::ImageBuild;
use crate::index::{Child, ImageIndex, IndexMeta, assemble};
use crate::registry::{Credentials, RegistryClient, RegistryError, credentials_for};

/// Label the executor writes into every platform image: its git source.
const LABEL_SOURCE: &str = "org.opencontainers.image.source";
/// Label a Dockerfile may set: the source revision.
const LABEL_REVISION: &str = "org.opencontainers.image.revision";

/// Pushes the index of `children` (the platforms' digests, in the order of
/// `req.platforms`) under the output image and its additional tags.
pub async fn push(
    client: &kube::Client,
    ib: &ImageBuild,
    req: &BuildRequest,
    children: &[String],
) -> IndexOutcome {
    let ns = ib.metadata.namespace.clone().unwrap_or_default();
    let creds = match credentials(client, ib, &ns, req).await {
        Ok(c) => c,
        Err(outcome) => return outcome,
    };
    let reference = req.image.to_string();
    let insecure = if ib.spec.output.insecure {
        vec![req.image.registry.clone()]
    } else {
        Vec::new()
    };
    let registry = RegistryClient::new(insecure);
    let mut entries = Vec::with_capacity(children.len());
    let mut labels = Vec::with_capacity(children.len());
    for (platform, digest) in req.platforms.iter().zip(children) {
        let (size, media_type, facts) = match registry
            .child_manifest(&reference, digest, creds.as_ref())
            .await
        {
            Ok(read) => read,
            Err(e) => return outcome_of(format!("reading the {platform} manifest"), e),
        };
        labels.push(facts.labels);
        entries.push(Child {
            platform: platform.clone(),
            digest: digest.clone(),
            size,
            media_type,
            os: facts.os,
            architecture: facts.architecture,
            variant: facts.variant,
            os_version: facts.os_version,
            os_features: facts.os_features,
            created: facts.created,
        });
    }
    let meta = IndexMeta {
        build_id: ib.build_id(),
        source: agreed(&labels, LABEL_SOURCE),
        revision: agreed(&labels, LABEL_REVISION).or_else(|| {
            ib.spec
                .source
                .git
                .as_ref()
                .and_then(|g| g.revision.clone())
                .filter(|r| r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()))
        }),
    };
    let index = match assemble(&entries, &meta) {
        Ok(i) => i,
        Err(e) => return IndexOutcome::Invalid(e.to_string()),
    };
    let mut tags = vec![reference.clone()];
    tags.extend(
        ib.spec
            .output
            .additional_tags
            .iter()
            .map(|t| req.image.with_tag(t)),
    );
    let (digest, served) = match registry
        .push_index(&tags, index.to_bytes(), creds.as_ref())
        .await
    {
        Ok(r) => r,
        Err(e) => return outcome_of("pushing the index".to_string(), e),
    };
    let checked = ImageIndex::from_bytes(&served).and_then(|back| back.check_read_back(&index));
    if let Err(e) = checked {
        return transient(e.to_string());
    }
    tracing::info!(%digest, platforms = children.len(), tags = tags.len(), "pushed the image index");
    IndexOutcome::Pushed {
        digest,
        children: children.to_vec(),
    }
}

/// A registry error as an outcome: refused access or a missing manifest
/// will not pass by waiting (fix the Secret or the registry, then ask for
/// `build.tripod.dev/retry-failed`); anything else is tried again.
fn outcome_of(what: String, e: RegistryError) -> IndexOutcome {
    match e {
        RegistryError::Unauthorized { .. } => IndexOutcome::Invalid(crate::outcome::cap(
            &format!("{what}: {e} (check spec.output.pushSecretRef)"),
            crate::outcome::MAX_MESSAGE,
        )),
        RegistryError::NotFound { .. } | RegistryError::InvalidReference { .. } => {
            IndexOutcome::Invalid(crate::outcome::cap(
                &format!("{what}: {e} (spec.output.image)"),
                crate::outcome::MAX_MESSAGE,
            ))
        }
        _ => transient(format!("{what}: {e}")),
    }
}

fn transient(message: String) -> IndexOutcome {
    IndexOutcome::Retry(crate::outcome::cap(&message, crate::outcome::MAX_MESSAGE))
}

/// A label every platform image carries with the same value.
fn agreed(labels: &[BTreeMap<String, String>], label: &str) -> Option<String> {
    let mut values = labels.iter().map(|l| l.get(label));
    let first = values.next()??;
    values.all(|v| v == Some(first)).then(|| first.clone())
}

/// The push credentials for the output registry, from the Secret the
/// spec names (only if it may be used, as for the build itself).
async fn credentials(
    client: &kube::Client,
    ib: &ImageBuild,
    ns: &str,
    req: &BuildRequest,
) -> Result<Option<Credentials>, IndexOutcome> {
    let Some(r) = &ib.spec.output.push_secret_ref else {
        return Ok(None);
    };
    let field = "spec.output.pushSecretRef";
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get_opt(&r.name)
        .await
        .map_err(|e| transient(format!("get Secret {ns}/{}: {e}", r.name)))?;
    crate::secret_policy::check(
        field,
        ns,
        &r.name,
        secret.as_ref(),
        crate::secret_policy::PUSH_TYPES,
    )
    .map_err(transient)?;
    let json = secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(".dockerconfigjson").map(|v| v.0.clone()))
        .ok_or_else(|| {
            IndexOutcome::Invalid(format!(
                "{field}: Secret {ns}/{} has no .dockerconfigjson key",
                r.name
            ))
        })?;
    credentials_for(&json, &req.image.registry)
        .map_err(|e: RegistryError| IndexOutcome::Invalid(format!("{field}: {e}")))
}
