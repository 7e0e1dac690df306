//! Build tokens: an HMAC, under the controller's token key, over everything
//! a token speaks for (namespace, ImageBuild name and UID, Pod, build ID,
//! platform, attempt) and a random nonce.
//!
//! Checking a token needs no Kubernetes request: an agent that cannot show
//! a token the controller issued for exactly the build it claims costs the
//! controller one HMAC and nothing else. The key lives in the Secret
//! [`KEY_SECRET_NAME`] of the controller's namespace (created on first
//! start, shared by replicas); replacing it invalidates every token issued
//! before (running builds then fail their attempt and are retried).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::{Api, Client};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Key of the token in a token Secret.
pub const TOKEN_KEY: &str = "token";
/// Key of the executor CA certificate in a token Secret.
pub const CA_KEY: &str = "ca.crt";
/// Name of the Secret (in the controller's namespace) holding the token key.
pub const KEY_SECRET_NAME: &str = "tripod-token-key";
/// Key of the HMAC key in [`KEY_SECRET_NAME`].
const KEY_DATA: &str = "hmac.key";
/// Version prefix of tokens.
const VERSION: &str = "v1";
/// Bytes of randomness in each token.
const NONCE_LEN: usize = 16;

/// Errors of the token key and of token issue.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The API server refused.
    #[error("token key Secret {namespace}/{KEY_SECRET_NAME}: {source}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error(
        "token key Secret {0}/{KEY_SECRET_NAME}: {KEY_DATA} is missing or shorter than 32 bytes"
    )]
    BadKey(String),
    /// The system's random source failed.
    #[error("the system random source failed")]
    Random,
}

/// What a token speaks for. Every field is part of the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject<'a> {
    /// Namespace of the ImageBuild.
    pub namespace: &'a str,
    /// Name of the ImageBuild.
    pub image_build: &'a str,
    /// UID of the ImageBuild (a recreated ImageBuild of the same name is
    /// another build).
    pub image_build_uid: &'a str,
    /// Name of the build Pod.
    pub pod: &'a str,
    /// Build ID.
    pub build_id: &'a str,
    /// Canonical platform, `os/arch[/variant]`.
    pub platform: &'a str,
    /// Attempt number.
    pub attempt: u32,
}

impl Subject<'_> {
    fn message(&self, nonce: &str) -> Vec<u8> {
        // NUL cannot occur in any of the (validated) fields: no two
        // subjects give the same message.
        let attempt = self.attempt.to_string();
        [
            VERSION,
            self.namespace,
            self.image_build,
            self.image_build_uid,
            self.pod,
            self.build_id,
            self.platform,
            &attempt,
            nonce,
        ]
        .join("\0")
        .into_bytes()
    }
}

/// What a runner token speaks for: one BuildRunner (by name and UID: a
/// BuildRunner deleted and created again needs a new token) at one rotation
/// (the value of its [`ANNOTATION_ROTATE`] annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSubject<'a> {
    /// Name of the BuildRunner.
    pub runner: &'a str,
    /// Its UID.
    pub uid: &'a str,
    /// Its rotation value (empty before the first rotation).
    pub rotation: &'a str,
}

/// Annotation on a BuildRunner: set it to a new value to rotate the
/// runner's token (the old one stops working at once).
pub const ANNOTATION_ROTATE: &str = "build.tripod.dev/rotate-token";

impl RunnerSubject<'_> {
    fn message(&self, nonce: &str) -> Vec<u8> {
        // A different first part and part count from build tokens: a build
        // token never verifies as a runner token, nor the other way round.
        ["v1-runner", self.runner, self.uid, self.rotation, nonce]
            .join("\0")
            .into_bytes()
    }
}

/// The controller's token key.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl TokenKey {
    /// A key from its bytes (at least 32).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= 32).then(|| Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// A fresh random key.
    pub fn generate() -> Result<(Self, Vec<u8>), TokenError> {
        let bytes = random(32)?;
        let key = Self::from_bytes(&bytes).ok_or(TokenError::Random)?;
        Ok((key, bytes))
    }

    /// A new token for `subject`: `v1.<nonce>.<mac>`.
    pub fn issue(&self, subject: &Subject<'_>) -> Result<String, TokenError> {
        self.issue_with(|nonce| subject.message(nonce))
    }

    /// Whether `token` was issued by this key for exactly `subject`
    /// (compared in constant time).
    pub fn verify(&self, subject: &Subject<'_>, token: &str) -> bool {
        self.verify_with(token, |nonce| subject.message(nonce))
    }

    /// A new runner token for `subject`.
    pub fn issue_runner(&self, subject: &RunnerSubject<'_>) -> Result<String, TokenError> {
        self.issue_with(|nonce| subject.message(nonce))
    }

    /// Whether `token` was issued by this key for exactly this runner at
    /// this rotation.
    pub fn verify_runner(&self, subject: &RunnerSubject<'_>, token: &str) -> bool {
        self.verify_with(token, |nonce| subject.message(nonce))
    }

    fn issue_with(&self, message: impl Fn(&str) -> Vec<u8>) -> Result<String, TokenError> {
        let nonce = hex(&random(NONCE_LEN)?);
        let tag = hmac::sign(&self.key, &message(&nonce));
        Ok(format!("{VERSION}.{nonce}.{}", hex(tag.as_ref())))
    }

    fn verify_with(&self, token: &str, message: impl Fn(&str) -> Vec<u8>) -> bool {
        let mut parts = token.trim().split('.');
        let (Some(VERSION), Some(nonce), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        if nonce.len() != NONCE_LEN * 2 || unhex(nonce).is_none() {
            return false;
        }
        let Some(tag) = unhex(tag) else {
            return false;
        };
        hmac::verify(&self.key, &message(nonce), &tag).is_ok()
    }
}

impl TokenKey {
    /// The MAC of a recorded result: over the build Pod's UID and the
    /// annotation's value.
    pub fn sign_result(&self, pod_uid: &str, value: &str) -> String {
        let message = ["result", pod_uid, value].join("\0");
        hex(hmac::sign(&self.key, message.as_bytes()).as_ref())
    }

    /// Whether `mac` is [`sign_result`](Self::sign_result) of `pod_uid` and `value`.
    pub fn verify_result(&self, pod_uid: &str, value: &str, mac: &str) -> bool {
        let message = ["result", pod_uid, value].join("\0");
        unhex(mac).is_some_and(|tag| hmac::verify(&self.key, message.as_bytes(), &tag).is_ok())
    }
}

fn random(len: usize) -> Result<Vec<u8>, TokenError> {
    let mut buf = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| TokenError::Random)?;
    Ok(buf)
}

/// Reads the token key Secret in `namespace`, creating it when absent (a
/// replica that loses the race to create it uses the winner's).
pub async fn ensure_key(client: &Client, namespace: &str) -> Result<TokenKey, TokenError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube = |source| TokenError::Kube {
        namespace: namespace.to_string(),
        source,
    };
    let from_secret = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(KEY_DATA))
            .and_then(|b| TokenKey::from_bytes(&b.0))
            .ok_or_else(|| TokenError::BadKey(namespace.to_string()))
    };
    if let Some(s) = api.get_opt(KEY_SECRET_NAME).await.map_err(kube)? {
        return from_secret(&s);
    }
    let (_, bytes) = TokenKey::generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEY_SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "tripod".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(KEY_DATA.to_string(), ByteString(bytes))])),
        ..Default::default()
    };
    // Another replica may have created it first: then theirs is used.
    let s = super::create_or_get(&api, &secret).await.map_err(kube)?;
    from_secret(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject<'static> {
        Subject {
            namespace: "team-a",
            image_build: "app",
            image_build_uid: "5f0c",
            pod: "app-1-linux-amd64-1",
            build_id: "0a1b2c",
            platform: "linux/amd64",
            attempt: 1,
        }
    }

    #[test]
    fn a_token_speaks_only_for_its_subject() {
        let (key, _) = TokenKey::generate().unwrap();
        let token = key.issue(&subject()).unwrap();
        assert!(key.verify(&subject(), &token));
        assert!(key.verify(&subject(), &format!(" {token}\n")));
        assert_ne!(token, key.issue(&subject()).unwrap(), "nonce");
        type Change = fn(&mut Subject<'static>);
        let changes: [Change; 7] = [
            |s| s.namespace = "team-b",
            |s| s.image_build = "app2",
            |s| s.image_build_uid = "5f0d",
            |s| s.pod = "app-1-linux-amd64-2",
            |s| s.build_id = "0a1b2d",
            |s| s.platform = "linux/arm64",
            |s| s.attempt = 2,
        ];
        for change in changes {
            let mut other = subject();
            change(&mut other);
            assert!(!key.verify(&other, &token), "{other:?}");
        }
        let (other_key, _) = TokenKey::generate().unwrap();
        assert!(!other_key.verify(&subject(), &token));
        for bad in [
            "",
            "v1",
            "v1..",
            "v2.a.b",
            &token.replace("v1.", "v1.x"),
            &format!("{token}.x"),
        ] {
            assert!(!key.verify(&subject(), bad), "{bad}");
        }
        assert!(TokenKey::from_bytes(&[0; 31]).is_none());
        let mac = key.sign_result("uid-1", "{}");
        assert!(key.verify_result("uid-1", "{}", &mac));
        assert!(!key.verify_result("uid-2", "{}", &mac));
        assert!(!key.verify_result("uid-1", "{\"digest\":1}", &mac));
        assert!(!other_key.verify_result("uid-1", "{}", &mac));
        assert!(!key.verify_result("uid-1", "{}", "zz"));
    }

    #[test]
    fn a_runner_token_speaks_only_for_its_runner_and_rotation() {
        let (key, _) = TokenKey::generate().unwrap();
        let a = RunnerSubject {
            runner: "mac-1",
            uid: "u1",
            rotation: "",
        };
        let token = key.issue_runner(&a).unwrap();
        assert!(key.verify_runner(&a, &token));
        for other in [
            RunnerSubject {
                runner: "mac-2",
                ..a.clone()
            },
            RunnerSubject {
                uid: "u2",
                ..a.clone()
            },
            RunnerSubject {
                rotation: "2",
                ..a.clone()
            },
        ] {
            assert!(!key.verify_runner(&other, &token), "{other:?}");
        }
        // Build tokens and runner tokens never stand in for each other.
        let build = key.issue(&subject()).unwrap();
        assert!(!key.verify_runner(&a, &build));
        assert!(!key.verify(&subject(), &token));
    }
}
