//! Reading the Secrets and ConfigMaps a Pod refers to, once per Pod, and
//! retrying transient API errors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

/// The keys of a Secret or ConfigMap and their bytes.
pub(crate) type Data = Arc<BTreeMap<String, Vec<u8>>>;

/// A per-Pod cache of the Secrets and ConfigMaps of its namespace; `None`
/// records "not found".
pub(crate) struct Refs {
    secrets_api: Api<Secret>,
    config_maps_api: Api<ConfigMap>,
    secrets: HashMap<String, Option<Data>>,
    config_maps: HashMap<String, Option<Data>>,
}

impl Refs {
    pub(crate) fn new(client: &kube::Client, namespace: &str) -> Self {
        Refs {
            secrets_api: Api::namespaced(client.clone(), namespace),
            config_maps_api: Api::namespaced(client.clone(), namespace),
            secrets: HashMap::new(),
            config_maps: HashMap::new(),
        }
    }

    /// The data of Secret `name`, `None` if it does not exist.
    pub(crate) async fn secret(&mut self, name: &str) -> Result<Option<Data>, kube::Error> {
        if let Some(cached) = self.secrets.get(name) {
            return Ok(cached.clone());
        }
        let api = &self.secrets_api;
        let secret = retry("get secret", || api.get_opt(name)).await?;
        let data = secret.map(|s| {
            Arc::new(
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
            )
        });
        self.secrets.insert(name.to_string(), data.clone());
        Ok(data)
    }

    /// The data and binaryData of ConfigMap `name`, `None` if it does not
    /// exist.
    pub(crate) async fn config_map(&mut self, name: &str) -> Result<Option<Data>, kube::Error> {
        if let Some(cached) = self.config_maps.get(name) {
            return Ok(cached.clone());
        }
        let api = &self.config_maps_api;
        let cm = retry("get configmap", || api.get_opt(name)).await?;
        let data = cm.map(|cm| {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, v.0);
            }
            Arc::new(data)
        });
        self.config_maps.insert(name.to_string(), data.clone());
        Ok(data)
    }
}

/// Runs `call` up to 5 times, 200 ms apart and doubling, while it fails with
/// something other than a client error (4xx except 429).
pub(crate) async fn retry<T, F, Fut>(what: &str, mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    const ATTEMPTS: u32 = 5;
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                tracing::debug!(what, attempt, error = %e, "API call failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        _ => true,
    }
}
