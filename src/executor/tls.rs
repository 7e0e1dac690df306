//! The executor service's TLS: a CA and serving certificate kept in the
//! Secret `tripod-executor-tls` in the controller's namespace, created when
//! absent. Agents trust the CA, which the controller copies into each
//! build's token Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::{Api, Client};
use rcgen::ExtendedKeyUsagePurpose;

/// Name of the Secret holding the executor CA and serving certificate.
pub const SECRET_NAME: &str = "tripod-executor-tls";

/// Errors preparing the executor TLS material.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorTlsError {
    /// The API server refused.
    #[error("executor TLS Secret {namespace}/{SECRET_NAME}: {source}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Generation failed.
    #[error("generating executor certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The Secret lacks a key.
    #[error("executor TLS Secret {0}/{SECRET_NAME} lacks {1}")]
    Missing(String, &'static str),
}

/// PEM material of the executor service.
#[derive(Debug, Clone)]
pub struct ExecutorTls {
    /// CA certificate agents trust.
    pub ca_pem: String,
    /// Serving certificate.
    pub cert_pem: String,
    /// Serving key.
    pub key_pem: String,
}

/// Reads the executor TLS Secret, creating it (with `sans` as DNS names or
/// IP addresses of the serving certificate) when it does not exist.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    sans: &[String],
) -> Result<ExecutorTls, ExecutorTlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube = |source| ExecutorTlsError::Kube {
        namespace: namespace.to_string(),
        source,
    };
    if let Some(s) = api.get_opt(SECRET_NAME).await.map_err(kube)? {
        return from_secret(namespace, &s);
    }
    let tls = generate(sans)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "tripod".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "ca.crt".to_string(),
                ByteString(tls.ca_pem.clone().into_bytes()),
            ),
            (
                "tls.crt".to_string(),
                ByteString(tls.cert_pem.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(tls.key_pem.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    // Another replica may have created it first: then theirs is used.
    let s = super::create_or_get(&api, &secret).await.map_err(kube)?;
    from_secret(namespace, &s)
}

fn from_secret(namespace: &str, s: &Secret) -> Result<ExecutorTls, ExecutorTlsError> {
    let data = s.data.clone().unwrap_or_default();
    let get = |k: &'static str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
            .ok_or_else(|| ExecutorTlsError::Missing(namespace.to_string(), k))
    };
    Ok(ExecutorTls {
        ca_pem: get("ca.crt")?,
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key")?,
    })
}

/// A fresh CA and a serving certificate for `sans`.
pub fn generate(sans: &[String]) -> Result<ExecutorTls, ExecutorTlsError> {
    let ca = crate::tls::Ca::new("tripod-executor-ca")?;
    let (cert_pem, key_pem) =
        ca.issue("tripod-executor", sans, ExtendedKeyUsagePurpose::ServerAuth)?;
    Ok(ExecutorTls {
        ca_pem: ca.pem().to_string(),
        cert_pem,
        key_pem,
    })
}
