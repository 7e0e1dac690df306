//! Confirming with a registry that a pushed tag resolves to the digest an
//! executor reported, free of Kubernetes types.
//!
//! [`credentials_for`] picks the credentials for a registry out of a
//! `.dockerconfigjson` document; [`RegistryClient::resolve`] asks the registry
//! (a `HEAD` of the manifest, falling back to `GET`) which digest a tag
//! points at, and [`RegistryClient::verify`] compares it with the digest
//! that was reported.

use std::fmt;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// How long to wait for a TCP (and TLS) connection to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a registry to answer a read.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The Docker Hub host names that all mean the same registry.
const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Errors talking to a registry or reading its credentials.
///
/// Each message names the image reference (or registry) concerned and says
/// what to check.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The `.dockerconfigjson` document is malformed.
    #[error("docker config (looking up credentials for registry {registry:?}): {reason}")]
    BadDockerConfig {
        /// The registry whose credentials were looked up.
        registry: String,
        /// What is wrong with the document.
        reason: String,
    },
    /// The registry refused access (HTTP 401/403).
    #[error(
        "registry refused access to {reference}: the credentials are missing, wrong, or lack pull permission for this repository"
    )]
    Unauthorized {
        /// The image reference asked for.
        reference: String,
    },
    /// The registry does not know the tag or repository (HTTP 404).
    #[error("{reference} not found in the registry: the tag or repository does not exist there")]
    NotFound {
        /// The image reference asked for.
        reference: String,
    },
    /// The tag resolves to another digest than the expected one.
    #[error("{reference} resolves to {actual} in the registry, not to the reported {expected}")]
    DigestMismatch {
        /// The image reference asked for.
        reference: String,
        /// The digest that was reported (and expected).
        expected: String,
        /// The digest the registry answered.
        actual: String,
    },
    /// The registry could not be reached or answered something unexpected.
    #[error("registry request for {reference} failed: {message}")]
    Transport {
        /// The image reference asked for.
        reference: String,
        /// What went wrong.
        message: String,
    },
}

/// What an image's config says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFacts {
    /// `os` of the config.
    pub os: String,
    /// `architecture` of the config.
    pub architecture: String,
    /// `variant` of the config, if any.
    pub variant: Option<String>,
    /// `os.version` of the config (Windows images: `10.0.20348.2700`).
    pub os_version: Option<String>,
    /// `os.features` of the config (Windows images: e.g. `win32k`).
    pub os_features: Vec<String>,
    /// `created` of the config (RFC 3339).
    pub created: Option<String>,
    /// `config.Labels`.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl ImageFacts {
    /// Reads an image config (JSON).
    pub fn from_config(json: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Inner {
            #[serde(rename = "Labels", default)]
            labels: Option<std::collections::BTreeMap<String, String>>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            os: String,
            #[serde(default)]
            architecture: String,
            #[serde(default)]
            variant: Option<String>,
            #[serde(default, rename = "os.version")]
            os_version: Option<String>,
            #[serde(default, rename = "os.features")]
            os_features: Option<Vec<String>>,
            #[serde(default)]
            created: Option<String>,
            #[serde(default)]
            config: Option<Inner>,
        }
        let c: Config =
            serde_json::from_str(json).map_err(|e| format!("the image config is not JSON: {e}"))?;
        Ok(Self {
            os: c.os,
            architecture: c.architecture,
            variant: c.variant.filter(|v| !v.is_empty()),
            os_version: c.os_version.filter(|v| !v.is_empty()),
            os_features: c.os_features.unwrap_or_default(),
            created: c.created.filter(|v| !v.is_empty()),
            labels: c.config.and_then(|i| i.labels).unwrap_or_default(),
        })
    }
}

/// A user name and password (or token) for a registry's HTTP Basic auth.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Finds the credentials for `registry` (`host[:port]`) in a
/// `.dockerconfigjson` document (`{"auths": {KEY: ENTRY}}`).
///
/// A key matches when it is `registry` itself or `registry` with a scheme
/// and/or a path (`https://host`, `http://host`, `https://host/v1/`); host
/// names compare case-insensitively, and `docker.io`, `index.docker.io` and
/// `registry-1.docker.io` are one registry. A key spelled exactly as
/// `registry` wins over other matching keys. An entry gives either `auth`
/// (base64 of `user:password`) or `username` and `password`.
///
/// Returns `Ok(None)` when no key matches, and
/// [`RegistryError::BadDockerConfig`] when the document is not JSON, has no
/// `auths` object, or the matching entry is unusable.
pub fn credentials_for(
    docker_config_json: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let bad = |reason: String| RegistryError::BadDockerConfig {
        registry: registry.to_string(),
        reason,
    };
    let doc: serde_json::Value = serde_json::from_slice(docker_config_json)
        .map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let auths = doc
        .get("auths")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no \"auths\" object at the top level".to_string()))?;
    let wanted = normalize_registry(registry);
    let entry = auths.get(registry).map(|e| (registry, e)).or_else(|| {
        auths
            .iter()
            .find(|(key, _)| normalize_registry(key) == wanted)
            .map(|(key, e)| (key.as_str(), e))
    });
    let Some((key, entry)) = entry else {
        return Ok(None);
    };
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(auth) = field("auth") {
        let decoded = decode_base64(auth)
            .ok_or_else(|| bad(format!("the \"auth\" of {key:?} is not valid base64")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| bad(format!("the \"auth\" of {key:?} is not UTF-8")))?;
        let (username, password) = decoded.split_once(':').ok_or_else(|| {
            bad(format!(
                "the \"auth\" of {key:?} does not decode to \"user:password\""
            ))
        })?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (field("username"), field("password")) {
        (Some(username), Some(password)) => Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        })),
        _ => Err(bad(format!(
            "the entry {key:?} has neither \"auth\" nor \"username\" and \"password\""
        ))),
    }
}

/// `host[:port]` of a docker config key or registry name: scheme and path
/// removed, lower-cased, Docker Hub aliases folded into `docker.io`.
fn normalize_registry(key: &str) -> String {
    let key = key.trim();
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        "docker.io".to_string()
    } else {
        host
    }
}

/// Decodes standard base64 (`A-Z a-z 0-9 + /`, padding optional, no
/// stray bits); `None` when the input is not base64.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(input.trim()).ok()
}

/// HTTP Basic auth with `creds`, or none.
fn auth_of(creds: Option<&Credentials>) -> RegistryAuth {
    match creds {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    }
}

/// Picks the manifest of an image index a client follows (oci-client's).
type IndexResolver =
    dyn Fn(&[oci_client::manifest::ImageIndexEntry]) -> Option<String> + Send + Sync;

/// Asks registries which manifest digest a tag resolves to.
///
/// Each call uses a fresh `oci-client` client, so credentials and tokens of
/// one call never leak into another.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    insecure_registries: Vec<String>,
}

impl RegistryClient {
    /// A client speaking HTTPS to every registry except `insecure_registries`
    /// (`host[:port]`, as written in image references), which are spoken to
    /// over plain HTTP.
    ///
    /// Installs rustls' `ring` provider as the process default when none is
    /// installed yet (the HTTP client needs one).
    pub fn new(insecure_registries: Vec<String>) -> Self {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Err only when another thread installed one meanwhile: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut hosts: Vec<String> = Vec::new();
        for host in insecure_registries {
            let host = host.trim().to_string();
            // oci-client asks for Docker Hub by its legacy name.
            if normalize_registry(&host) == "docker.io" {
                hosts.push("index.docker.io".to_string());
            }
            hosts.push(host);
        }
        RegistryClient {
            insecure_registries: hosts,
        }
    }

    /// The digest the registry answers for `reference` (a tag reference
    /// such as `host:port/team/app:1`; the tag defaults to `latest`), via a
    /// `HEAD` of the manifest (falling back to `GET`), accepting OCI and
    /// Docker manifests, image indexes and manifest lists. `creds` are sent
    /// as HTTP Basic auth (or exchanged for a bearer token when the registry
    /// asks for one); `None` asks anonymously.
    pub async fn resolve(
        &self,
        reference: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let image = parse_reference(reference)?;
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        tracing::debug!(
            reference,
            registry = image.resolve_registry(),
            authenticated = creds.is_some(),
            "resolving manifest digest"
        );
        let result = client.fetch_manifest_digest(&image, &auth).await;
        match result {
            Ok(digest) => Ok(digest),
            Err(e) => Err(self.map_error(reference, image.resolve_registry(), e)),
        }
    }

    /// The config of the image manifest `digest` in the repository of
    /// `reference` (a tag reference).
    pub async fn inspect(
        &self,
        reference: &str,
        digest: &str,
        creds: Option<&Credentials>,
    ) -> Result<ImageFacts, RegistryError> {
        let tagged = parse_reference(reference)?;
        let image = by_digest(&tagged, digest);
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        self.config_of(&client, &image, reference, &auth).await
    }

    /// The config of `reference` (a tag or digest reference) for `os/arch`:
    /// the image itself, or the entry of its index for that platform (the
    /// one whose `os.version` starts with `prefer_os_version` when several
    /// are, e.g. Windows bases for several OS builds).
    pub async fn platform_config(
        &self,
        reference: &str,
        os: &str,
        arch: &str,
        prefer_os_version: Option<&str>,
        creds: Option<&Credentials>,
    ) -> Result<ImageFacts, RegistryError> {
        // A tag or a digest (`FROM image@sha256:…` pins a base).
        let image = oci_reference(reference, true)?;
        let (os, arch) = (os.to_string(), arch.to_string());
        let prefer = prefer_os_version.map(str::to_string);
        let resolver = move |entries: &[oci_client::manifest::ImageIndexEntry]| {
            let matching: Vec<&oci_client::manifest::ImageIndexEntry> = entries
                .iter()
                .filter(|e| {
                    e.platform.as_ref().is_some_and(|p| {
                        p.os.to_string() == os && p.architecture.to_string() == arch
                    })
                })
                .collect();
            let preferred = prefer.as_ref().and_then(|want| {
                matching.iter().find(|e| {
                    e.platform
                        .as_ref()
                        .and_then(|p| p.os_version.as_deref())
                        .is_some_and(|v| v.starts_with(want.as_str()))
                })
            });
            preferred.or(matching.first()).map(|e| e.digest.clone())
        };
        let client = self.client_with(reference, Some(Box::new(resolver)))?;
        let auth = auth_of(creds);
        self.config_of(&client, &image, reference, &auth).await
    }

    /// The compressed size of config and layers of the image manifest
    /// `digest` in the repository of `reference` (a tag reference).
    pub async fn image_size(
        &self,
        reference: &str,
        digest: &str,
        creds: Option<&Credentials>,
    ) -> Result<i64, RegistryError> {
        let tagged = parse_reference(reference)?;
        let image = by_digest(&tagged, digest);
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        let (manifest, _) = client
            .pull_image_manifest(&image, &auth)
            .await
            .map_err(|e| self.map_error(reference, image.resolve_registry(), e))?;
        Ok(manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<i64>())
    }

    /// Pushes an image made of `layers` (gzip-compressed OCI layer tars)
    /// and `config` (an OCI image config) to every reference in `tags`
    /// (blobs once, the manifest under each tag), and returns the manifest
    /// digest the registry answers for the first tag with the pushed size.
    pub async fn push_image(
        &self,
        tags: &[String],
        layers: Vec<Vec<u8>>,
        config: Vec<u8>,
        creds: Option<&Credentials>,
    ) -> Result<(String, i64), RegistryError> {
        use oci_client::client::{Config, ImageLayer};
        use oci_client::manifest::{OciImageManifest, OciManifest};
        let Some(first) = tags.first() else {
            return Err(RegistryError::InvalidReference {
                reference: String::new(),
                reason: "no tag to push".into(),
            });
        };
        let image = parse_reference(first)?;
        let client = self.client(first)?;
        let auth = auth_of(creds);
        let layers: Vec<ImageLayer> = layers
            .into_iter()
            .map(|l| ImageLayer::oci_v1_gzip(l, None))
            .collect();
        let config = Config::oci_v1(config, None);
        let size =
            config.data.len() as i64 + layers.iter().map(|l| l.data.len() as i64).sum::<i64>();
        let manifest = OciImageManifest::build(&layers, &config, None);
        client
            .push(&image, &layers, config, &auth, Some(manifest.clone()))
            .await
            .map_err(|e| self.map_error(first, image.resolve_registry(), e))?;
        for tag in &tags[1..] {
            let other = parse_reference(tag)?;
            client
                .push_manifest(&other, &OciManifest::Image(manifest.clone()))
                .await
                .map_err(|e| self.map_error(tag, other.resolve_registry(), e))?;
        }
        let digest = client
            .fetch_manifest_digest(&image, &auth)
            .await
            .map_err(|e| self.map_error(first, image.resolve_registry(), e))?;
        Ok((digest, size))
    }

    /// Pushes an image made of `layers` (gzip-compressed OCI layer tars)
    /// and `config` by digest only, into the repository of `reference` (a
    /// tag reference whose tag is not written), and returns the manifest
    /// digest with the pushed size.
    pub async fn push_image_by_digest(
        &self,
        reference: &str,
        layers: Vec<Vec<u8>>,
        config: Vec<u8>,
        creds: Option<&Credentials>,
    ) -> Result<(String, i64), RegistryError> {
        use oci_client::client::{Config, ImageLayer};
        use oci_client::manifest::OciImageManifest;
        let image = parse_reference(reference)?;
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        client
            .store_auth_if_needed(image.resolve_registry(), &auth)
            .await;
        let layers: Vec<ImageLayer> = layers
            .into_iter()
            .map(|l| ImageLayer::oci_v1_gzip(l, None))
            .collect();
        let config = Config::oci_v1(config, None);
        let manifest = OciImageManifest::build(&layers, &config, None);
        let err = |e| self.map_error(reference, image.resolve_registry(), e);
        for (layer, desc) in layers.iter().zip(&manifest.layers) {
            client
                .push_blob(&image, layer.data.clone(), &desc.digest)
                .await
                .map_err(err)?;
        }
        client
            .push_blob(&image, config.data.clone(), &manifest.config.digest)
            .await
            .map_err(err)?;
        let size =
            config.data.len() as i64 + layers.iter().map(|l| l.data.len() as i64).sum::<i64>();
        let bytes = serde_json::to_vec(&manifest).map_err(|e| RegistryError::Transport {
            reference: reference.to_string(),
            message: format!("cannot serialize the manifest: {e}"),
        })?;
        let digest = self
            .put_manifest_by_digest(
                &client,
                &image,
                reference,
                bytes,
                crate::index::OCI_MANIFEST,
            )
            .await?;
        Ok((digest, size))
    }

    /// Pushes the image of an OCI layout directory (`index.json`, `blobs/`,
    /// as `buildah push … oci:DIR` writes it) by digest only, into the
    /// repository of `reference` (a tag reference whose tag is not
    /// written): blobs the repository lacks are streamed from their files,
    /// then the manifest bytes are put under their digest, unchanged.
    /// Returns the manifest digest with the size of config and layers.
    pub async fn push_oci_layout(
        &self,
        reference: &str,
        layout: &std::path::Path,
        creds: Option<&Credentials>,
    ) -> Result<(String, i64), RegistryError> {
        let image = parse_reference(reference)?;
        let local = |message: String| RegistryError::Transport {
            reference: reference.to_string(),
            message,
        };
        let read = |path: std::path::PathBuf| {
            std::fs::read(&path).map_err(|e| local(format!("read {}: {e}", path.display())))
        };
        let blob_path = |digest: &str| -> Result<std::path::PathBuf, RegistryError> {
            match digest.strip_prefix("sha256:") {
                Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Ok(layout.join("blobs").join("sha256").join(hex))
                }
                _ => Err(local(format!(
                    "the layout names an unusable digest {digest:?}"
                ))),
            }
        };
        let index: serde_json::Value = serde_json::from_slice(&read(layout.join("index.json"))?)
            .map_err(|e| local(format!("the layout's index.json is not JSON: {e}")))?;
        let desc = index
            .pointer("/manifests/0")
            .ok_or_else(|| local("the layout's index.json lists no manifest".into()))?;
        let manifest_digest = desc
            .get("digest")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let media_type = desc
            .get("mediaType")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(crate::index::OCI_MANIFEST)
            .to_string();
        let bytes = read(blob_path(&manifest_digest)?)?;
        if crate::index::digest_of(&bytes) != manifest_digest {
            return Err(local(format!(
                "the layout's manifest does not match its digest {manifest_digest}"
            )));
        }
        let manifest: oci_client::manifest::OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| {
                local(format!(
                    "the layout's manifest is not an image manifest: {e}"
                ))
            })?;
        // One PUT per blob, streamed from its file.
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure_registries.clone()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            use_monolithic_push: true,
            ..Default::default()
        })
        .map_err(|e| {
            local(format!(
                "cannot create the HTTP client: {}",
                error_chain(&e)
            ))
        })?;
        let auth = auth_of(creds);
        client
            .store_auth_if_needed(image.resolve_registry(), &auth)
            .await;
        let err = |e| self.map_error(reference, image.resolve_registry(), e);
        let mut size = 0i64;
        for desc in std::iter::once(&manifest.config).chain(&manifest.layers) {
            size += desc.size;
            let mut retry = Retry::new();
            let exists = loop {
                match client.blob_exists(&image, &desc.digest).await {
                    Err(e) if retry.again(&e).await => {}
                    r => break r.map_err(err)?,
                }
            };
            if exists {
                continue;
            }
            let path = blob_path(&desc.digest)?;
            let mut retry = Retry::new();
            loop {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| local(format!("open {}: {e}", path.display())))?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| local(format!("stat {}: {e}", path.display())))?
                    .len();
                let stream = futures::TryStreamExt::map_err(
                    tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
                    OciDistributionError::from,
                );
                match client
                    .push_blob_stream(&image, stream, &desc.digest, Some(len))
                    .await
                {
                    Err(e) if retry.again(&e).await => {}
                    r => break r.map(drop).map_err(err)?,
                }
            }
        }
        let digest = self
            .put_manifest_by_digest(&client, &image, reference, bytes, &media_type)
            .await?;
        Ok((digest, size))
    }

    /// Puts manifest `bytes` under their own digest in the repository of
    /// `image` and returns that digest, once the registry serves it.
    async fn put_manifest_by_digest(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let digest = crate::index::digest_of(&bytes);
        let target = by_digest(image, &digest);
        let content_type =
            http::HeaderValue::from_str(media_type).map_err(|e| RegistryError::Transport {
                reference: reference.to_string(),
                message: format!("media type {media_type:?}: {e}"),
            })?;
        let mut retry = Retry::new();
        loop {
            match client
                .push_manifest_raw(&target, bytes.clone(), content_type.clone())
                .await
            {
                Err(e) if retry.again(&e).await => {}
                r => {
                    r.map_err(|e| self.map_error(reference, image.resolve_registry(), e))?;
                    break;
                }
            }
        }
        Ok(digest)
    }

    /// `Ok(())` when the repository of `reference` (a tag reference) holds
    /// the manifest `digest`.
    pub async fn verify_digest(
        &self,
        reference: &str,
        digest: &str,
        creds: Option<&Credentials>,
    ) -> Result<(), RegistryError> {
        let tagged = parse_reference(reference)?;
        let image = by_digest(&tagged, digest);
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        let actual = client
            .fetch_manifest_digest(&image, &auth)
            .await
            .map_err(|e| {
                self.map_error(
                    &format!("{}@{digest}", tagged.repository()),
                    image.resolve_registry(),
                    e,
                )
            })?;
        if actual == digest {
            Ok(())
        } else {
            Err(RegistryError::DigestMismatch {
                reference: format!("{}@{digest}", tagged.repository()),
                expected: digest.to_string(),
                actual,
            })
        }
    }

    /// What an index needs of the platform manifest `digest` in the
    /// repository of `reference` (a tag reference): its size and media
    /// type (the bytes the registry serves) and its config.
    pub async fn child_manifest(
        &self,
        reference: &str,
        digest: &str,
        creds: Option<&Credentials>,
    ) -> Result<(i64, String, ImageFacts), RegistryError> {
        let tagged = parse_reference(reference)?;
        let image = by_digest(&tagged, digest);
        let client = self.client(reference)?;
        let auth = auth_of(creds);
        let (bytes, _) = client
            .pull_manifest_raw(
                &image,
                &auth,
                &[crate::index::OCI_MANIFEST, crate::index::DOCKER_MANIFEST],
            )
            .await
            .map_err(|e| self.map_error(reference, image.resolve_registry(), e))?;
        let bad = |message: String| RegistryError::Transport {
            reference: format!("{}@{digest}", tagged.repository()),
            message,
        };
        if crate::index::digest_of(&bytes) != digest {
            return Err(bad("the registry served bytes of another digest".into()));
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| crate::index::OCI_MANIFEST.to_string());
        let facts = self.config_of(&client, &image, reference, &auth).await?;
        Ok((bytes.len() as i64, media_type, facts))
    }

    /// Pushes the image index `bytes` under every reference of `tags`,
    /// checks that each tag resolves to its digest, and returns the digest
    /// with the index bytes the registry serves for it (to be checked by
    /// the caller).
    pub async fn push_index(
        &self,
        tags: &[String],
        bytes: Vec<u8>,
        creds: Option<&Credentials>,
    ) -> Result<(String, Vec<u8>), RegistryError> {
        let Some(first) = tags.first() else {
            return Err(RegistryError::InvalidReference {
                reference: String::new(),
                reason: "no tag to push".into(),
            });
        };
        let digest = crate::index::digest_of(&bytes);
        let client = self.client(first)?;
        let auth = auth_of(creds);
        let content_type = http::HeaderValue::from_static(crate::index::OCI_INDEX);
        for tag in tags {
            let image = parse_reference(tag)?;
            client
                .store_auth_if_needed(image.resolve_registry(), &auth)
                .await;
            client
                .push_manifest_raw(&image, bytes.clone(), content_type.clone())
                .await
                .map_err(|e| self.map_error(tag, image.resolve_registry(), e))?;
        }
        for tag in tags {
            self.verify(tag, &digest, creds).await?;
        }
        let tagged = parse_reference(first)?;
        let image = by_digest(&tagged, &digest);
        let (served, _) = client
            .pull_manifest_raw(&image, &auth, &[crate::index::OCI_INDEX])
            .await
            .map_err(|e| self.map_error(first, image.resolve_registry(), e))?;
        Ok((digest, served.to_vec()))
    }

    /// The config of the image `image` names (an index followed with the
    /// client's resolver).
    async fn config_of(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        auth: &RegistryAuth,
    ) -> Result<ImageFacts, RegistryError> {
        let (_, _, config) = client
            .pull_manifest_and_config(image, auth)
            .await
            .map_err(|e| self.map_error(reference, image.resolve_registry(), e))?;
        ImageFacts::from_config(&config).map_err(|message| RegistryError::Transport {
            reference: reference.to_string(),
            message,
        })
    }

    fn client(&self, reference: &str) -> Result<Client, RegistryError> {
        self.client_with(reference, ClientConfig::default().platform_resolver)
    }

    /// A client choosing index entries with `resolver`.
    fn client_with(
        &self,
        reference: &str,
        resolver: Option<Box<IndexResolver>>,
    ) -> Result<Client, RegistryError> {
        Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure_registries.clone()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: resolver,
            ..Default::default()
        })
        .map_err(|e| RegistryError::Transport {
            reference: reference.to_string(),
            message: format!("cannot create the HTTP client: {}", error_chain(&e)),
        })
    }

    /// `Ok(())` when `reference` resolves to `expected` (e.g.
    /// `sha256:…`); [`RegistryError::DigestMismatch`] naming both digests
    /// when it resolves to another one, or the error of [`Self::resolve`].
    pub async fn verify(
        &self,
        reference: &str,
        expected: &str,
        creds: Option<&Credentials>,
    ) -> Result<(), RegistryError> {
        let actual = self.resolve(reference, creds).await?;
        if actual == expected.trim() {
            Ok(())
        } else {
            Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                expected: expected.to_string(),
                actual,
            })
        }
    }

    /// Maps an `oci-client` error onto [`RegistryError`].
    fn map_error(&self, reference: &str, registry: &str, e: OciDistributionError) -> RegistryError {
        let reference_owned = reference.to_string();
        let by_status = |code: u16| match code {
            401 | 403 => Some(RegistryError::Unauthorized {
                reference: reference_owned.clone(),
            }),
            404 => Some(RegistryError::NotFound {
                reference: reference_owned.clone(),
            }),
            _ => None,
        };
        let transport = |message: String| RegistryError::Transport {
            reference: reference.to_string(),
            message: crate::outcome::cap(&message, MAX_MESSAGE),
        };
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized {
                reference: reference.to_string(),
            },
            OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
                reference: reference.to_string(),
            },
            // The body of an error response is not repeated: it could be
            // anything (a redirect may lead anywhere), and it would land in
            // the status.
            OciDistributionError::ServerError { code, message, .. } => by_status(code)
                .unwrap_or_else(|| {
                    transport(format!(
                        "HTTP {code} ({} bytes of response body, not shown)",
                        message.len()
                    ))
                }),
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope_error(reference, &envelope).unwrap_or_else(|| {
                    transport(format!(
                        "the registry answered {}",
                        envelope_text(&envelope)
                    ))
                })
            }
            OciDistributionError::RequestError(err) => {
                if let Some(err) = err.status().and_then(|s| by_status(s.as_u16())) {
                    return err;
                }
                let mut message = error_chain(&err);
                if !self.insecure_registries.iter().any(|h| h == registry)
                    && (err.is_connect() || err.is_request())
                {
                    message.push_str(&format!(
                        " (spoken to over HTTPS: if {registry} serves plain HTTP, list it as an insecure registry)"
                    ));
                }
                transport(message)
            }
            other => transport(error_chain(&other)),
        }
    }
}

/// Retries of a push request that could not connect or timed out: a
/// registry that is briefly unreachable (a network hiccup, a restart) is
/// tried [`Retry::ATTEMPTS`] times in all, 1 s then 2 s apart, as
/// buildah's own pushes are; an answer from the registry is not retried.
struct Retry {
    attempt: u32,
    delay: Duration,
}

impl Retry {
    const ATTEMPTS: u32 = 3;

    fn new() -> Retry {
        Retry {
            attempt: 1,
            delay: Duration::from_secs(1),
        }
    }

    /// Whether to try again after `e`; waits first when so.
    async fn again(&mut self, e: &OciDistributionError) -> bool {
        let transient =
            matches!(e, OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout());
        if !transient || self.attempt >= Self::ATTEMPTS {
            return false;
        }
        tracing::warn!(error = %error_chain(e), attempt = self.attempt, "registry unreachable; retrying");
        tokio::time::sleep(self.delay).await;
        self.attempt += 1;
        self.delay *= 2;
        true
    }
}

/// Longest registry message kept in an error (and so in a status).
pub const MAX_MESSAGE: usize = 300;

/// The manifest `digest` in the repository of `image`.
fn by_digest(image: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        image.registry().to_string(),
        image.repository().to_string(),
        digest.to_string(),
    )
}

/// Parses a tag reference, refusing references that carry a digest.
fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    oci_reference(reference, false)
}

/// Parses `name[:tag][@digest]` with Tripod's own reference parser (the
/// OCI client's builds a Unicode regex of several MiB on first use, kept
/// for the life of the process). A digest is refused unless
/// `digest_allowed`; with one, the tag is not looked at.
fn oci_reference(reference: &str, digest_allowed: bool) -> Result<Reference, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidReference {
        reference: reference.to_string(),
        reason,
    };
    let (name, digest) = match reference.trim().split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference.trim(), None),
    };
    if digest.is_some() && !digest_allowed {
        return Err(invalid(
            "it carries a digest: give the tag whose digest is to be resolved".to_string(),
        ));
    }
    let image = crate::reference::ImageRef::parse(name).map_err(|e| invalid(e.to_string()))?;
    // Docker Hub as the OCI client names it: `docker.io` (not
    // `index.docker.io`), official images under `library/`.
    let registry = match image.registry.as_str() {
        "index.docker.io" => "docker.io".to_string(),
        _ => image.registry,
    };
    let repository = if registry == "docker.io" && !image.repository.contains('/') {
        format!("library/{}", image.repository)
    } else {
        image.repository
    };
    if repository.len() > 255 {
        return Err(invalid(
            "the repository name is longer than 255 characters".to_string(),
        ));
    }
    Ok(match digest {
        Some(digest) => {
            let hex_len = match digest.split_once(':') {
                Some(("sha256", hex)) => (hex.len() == 64).then_some(hex),
                Some(("sha384", hex)) => (hex.len() == 96).then_some(hex),
                Some(("sha512", hex)) => (hex.len() == 128).then_some(hex),
                _ => None,
            };
            if !hex_len.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())) {
                return Err(invalid(format!(
                    "digest {digest:?} is not sha256:<64 hex digits> (or sha384, sha512)"
                )));
            }
            Reference::with_digest(registry, repository, digest.to_string())
        }
        None => Reference::with_tag(registry, repository, image.tag),
    })
}

/// The error an OCI error envelope stands for, by its error codes.
fn envelope_error(reference: &str, envelope: &OciEnvelope) -> Option<RegistryError> {
    envelope.errors.iter().find_map(|e| match e.code {
        OciErrorCode::Unauthorized | OciErrorCode::Denied => Some(RegistryError::Unauthorized {
            reference: reference.to_string(),
        }),
        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound => {
            Some(RegistryError::NotFound {
                reference: reference.to_string(),
            })
        }
        _ => None,
    })
}

/// `CODE: message; CODE: message` of an OCI error envelope.
fn envelope_text(envelope: &OciEnvelope) -> String {
    let parts: Vec<String> = envelope
        .errors
        .iter()
        .map(|e| format!("{:?}: {}", e.code, e.message))
        .collect();
    if parts.is_empty() {
        "an empty error envelope".to_string()
    } else {
        parts.join("; ")
    }
}

/// An error and its sources, joined with `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn config(key: &str, entry: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "auths": { key: entry } })).unwrap()
    }

    fn creds(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials {
            username: u.into(),
            password: p.into(),
        })
    }

    fn auth_entry(user_pass: &str) -> serde_json::Value {
        serde_json::json!({ "auth": b64(user_pass) })
    }

    #[test]
    fn references_parse_as_the_oci_client_parses_them() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for r in [
            "127.0.0.1:5000/team/app:1".to_string(),
            "registry.example.com/app".to_string(),
            "localhost/tripod-buildd:test".to_string(),
            "debian:bookworm".to_string(),
            "team/app:v1.2_3".to_string(),
            "docker.io/alpine:3".to_string(),
            "index.docker.io/alpine".to_string(),
            "docker.io/library/alpine".to_string(),
            "index.docker.io/team/app:1".to_string(),
            format!("app@sha384:{}", "cd".repeat(48)),
            format!("registry.example.com:443/a/b/c@{digest}"),
            format!("debian:bookworm@{digest}"),
        ] {
            let ours = oci_reference(&r, true).unwrap();
            let theirs: Reference = r.parse().unwrap();
            assert_eq!(
                (ours.registry(), ours.repository(), ours.digest()),
                (theirs.registry(), theirs.repository(), theirs.digest()),
                "{r}"
            );
            if ours.digest().is_none() {
                assert_eq!(ours.tag(), theirs.tag(), "{r}");
            }
        }
        for bad in [
            "Not A Reference",
            "",
            "app@sha256:abc",
            "app@md5:0123456789abcdef0123456789abcdef",
            &format!("r.example.com/{}", "a".repeat(256)),
        ] {
            assert!(oci_reference(bad, true).is_err(), "{bad}");
        }
        let err = parse_reference(&format!("app@{digest}")).unwrap_err();
        assert!(err.to_string().contains("carries a digest"), "{err}");
    }

    #[tokio::test]
    async fn a_registry_that_does_not_answer_is_tried_again_an_answer_is_not() {
        // Nothing listens on port 1: the connection is refused.
        let reference = "127.0.0.1:1/team/app:1";
        let client = RegistryClient::new(vec!["127.0.0.1:1".into()])
            .client(reference)
            .unwrap();
        let image: Reference = reference.parse().unwrap();
        let refused = client.blob_exists(&image, "sha256:0000").await.unwrap_err();
        tokio::time::pause();
        let mut retry = Retry::new();
        assert!(retry.again(&refused).await);
        assert!(retry.again(&refused).await);
        assert!(!retry.again(&refused).await, "three attempts in all");
        let answered = OciDistributionError::ServerError {
            code: 500,
            url: String::new(),
            message: String::new(),
        };
        assert!(!Retry::new().again(&answered).await);
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "user:p@ss:w0rd", "ünïcode:ß"] {
            assert_eq!(decode_base64(&b64(s)).unwrap(), s.as_bytes(), "{s:?}");
            let unpadded = b64(s).trim_end_matches('=').to_string();
            assert_eq!(decode_base64(&unpadded).unwrap(), s.as_bytes(), "{s:?}");
        }
        assert_eq!(decode_base64("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert!(decode_base64("not base64!").is_none());
        assert!(decode_base64("A").is_none());
        assert!(decode_base64("AB").is_none()); // leftover bits not zero
    }

    #[test]
    fn matches_plain_host_and_scheme_forms() {
        for key in [
            "reg.example.com:5000",
            "https://reg.example.com:5000",
            "http://reg.example.com:5000",
            "https://reg.example.com:5000/v1/",
            "REG.example.com:5000",
        ] {
            let doc = config(key, auth_entry("u:p"));
            assert_eq!(
                credentials_for(&doc, "reg.example.com:5000").unwrap(),
                creds("u", "p"),
                "{key}"
            );
        }
    }

    #[test]
    fn matches_docker_hub_aliases() {
        for key in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
            "https://registry-1.docker.io",
        ] {
            let doc = config(key, auth_entry("hub:tok"));
            for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
                assert_eq!(
                    credentials_for(&doc, registry).unwrap(),
                    creds("hub", "tok"),
                    "{key} for {registry}"
                );
            }
        }
    }

    #[test]
    fn port_and_host_must_match() {
        let doc = config("reg.example.com:5000", auth_entry("u:p"));
        assert_eq!(credentials_for(&doc, "reg.example.com").unwrap(), None);
        assert_eq!(credentials_for(&doc, "reg.example.com:5001").unwrap(), None);
        assert_eq!(
            credentials_for(&doc, "other.example.com:5000").unwrap(),
            None
        );
        assert_eq!(credentials_for(&doc, "docker.io").unwrap(), None);
    }

    #[test]
    fn exact_key_wins() {
        let doc = serde_json::to_vec(&serde_json::json!({ "auths": {
            "https://reg.example.com/v1/": { "auth": b64("old:x") },
            "reg.example.com": { "auth": b64("new:y") },
        }}))
        .unwrap();
        assert_eq!(
            credentials_for(&doc, "reg.example.com").unwrap(),
            creds("new", "y")
        );
    }

    #[test]
    fn username_password_form() {
        let doc = config(
            "reg.example.com",
            serde_json::json!({ "username": "bob", "password": "pa:ss", "email": "b@x" }),
        );
        assert_eq!(
            credentials_for(&doc, "reg.example.com").unwrap(),
            creds("bob", "pa:ss")
        );
        // An empty "auth" falls back to username/password.
        let doc = config(
            "reg.example.com",
            serde_json::json!({ "auth": "", "username": "bob", "password": "pw" }),
        );
        assert_eq!(
            credentials_for(&doc, "reg.example.com").unwrap(),
            creds("bob", "pw")
        );
    }

    #[test]
    fn password_may_contain_colons() {
        let doc = config("reg.example.com", auth_entry("u:a:b:c"));
        assert_eq!(
            credentials_for(&doc, "reg.example.com").unwrap(),
            creds("u", "a:b:c")
        );
    }

    #[test]
    fn missing_registry_is_none() {
        let doc = config("reg.example.com", auth_entry("u:p"));
        assert_eq!(
            credentials_for(&doc, "elsewhere.example.com").unwrap(),
            None
        );
        assert_eq!(
            credentials_for(br#"{"auths":{}}"#, "reg.example.com").unwrap(),
            None
        );
    }

    fn bad_reason(doc: &[u8]) -> String {
        match credentials_for(doc, "reg.example.com") {
            Err(RegistryError::BadDockerConfig { registry, reason }) => {
                assert_eq!(registry, "reg.example.com");
                reason
            }
            other => panic!("expected BadDockerConfig, got {other:?}"),
        }
    }

    #[test]
    fn malformed_json_is_bad_config() {
        assert!(bad_reason(b"{not json").contains("not valid JSON"));
        assert!(bad_reason(b"").contains("not valid JSON"));
        assert!(bad_reason(br#"{"reg.example.com":{"auth":"x"}}"#).contains("auths"));
        assert!(bad_reason(br#"{"auths":[]}"#).contains("auths"));
    }

    #[test]
    fn bad_base64_is_bad_config() {
        let doc = config("reg.example.com", serde_json::json!({ "auth": "***" }));
        assert!(bad_reason(&doc).contains("not valid base64"));
        let doc = config(
            "reg.example.com",
            serde_json::json!({ "auth": b64("nocolon") }),
        );
        assert!(bad_reason(&doc).contains("user:password"));
    }

    #[test]
    fn entry_without_credentials_is_bad_config() {
        let doc = config(
            "reg.example.com",
            serde_json::json!({ "identitytoken": "abc" }),
        );
        assert!(bad_reason(&doc).contains("neither"));
        let doc = config("reg.example.com", serde_json::json!({ "username": "u" }));
        assert!(bad_reason(&doc).contains("neither"));
    }

    #[test]
    fn credentials_debug_redacts_password() {
        let text = format!("{:?}", creds("u", "hunter2").unwrap());
        assert!(text.contains('u') && !text.contains("hunter2"), "{text}");
    }

    #[test]
    fn references_are_parsed() {
        assert!(parse_reference("127.0.0.1:5000/t/a:1").is_ok());
        assert!(matches!(
            parse_reference("Not A Reference"),
            Err(RegistryError::InvalidReference { .. })
        ));
        let digest = format!("127.0.0.1:5000/t/a@sha256:{}", "a".repeat(64));
        let err = parse_reference(&digest).unwrap_err();
        assert!(err.to_string().contains("carries a digest"), "{err}");
    }

    #[test]
    fn error_messages_name_the_reference() {
        let e = RegistryError::DigestMismatch {
            reference: "r/t/a:1".into(),
            expected: "sha256:aaa".into(),
            actual: "sha256:bbb".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("r/t/a:1") && text.contains("sha256:aaa") && text.contains("sha256:bbb"),
            "{text}"
        );
    }

    #[test]
    fn insecure_docker_hub_covers_its_legacy_name() {
        let c = RegistryClient::new(vec!["docker.io".into(), " 127.0.0.1:5000 ".into()]);
        assert!(
            c.insecure_registries
                .contains(&"index.docker.io".to_string())
        );
        assert!(
            c.insecure_registries
                .contains(&"127.0.0.1:5000".to_string())
        );
    }

    #[test]
    fn error_bodies_are_not_repeated_and_messages_are_capped() {
        let c = RegistryClient::new(vec![]);
        let secret = "AKIA-not-to-be-shown";
        let e = c.map_error(
            "r.example/t/a:1",
            "r.example",
            OciDistributionError::ServerError {
                code: 502,
                url: "http://169.254.169.254/latest".into(),
                message: format!("{secret}{}", "x".repeat(100_000)),
            },
        );
        let text = e.to_string();
        assert!(
            !text.contains(secret) && text.contains("HTTP 502"),
            "{text}"
        );
        let e = c.map_error(
            "r.example/t/a:1",
            "r.example",
            OciDistributionError::GenericError(Some("y".repeat(100_000))),
        );
        assert!(
            e.to_string().len() < MAX_MESSAGE + 200,
            "{}",
            e.to_string().len()
        );
    }
}
