//! Loopback mTLS between `tripod agent` and `tripod buildd` (design §4).
//!
//! A TLS directory (mode 0700) holds a throw-away CA, buildd's serving
//! certificate (SANs `localhost`, `127.0.0.1`) and the agent's client
//! certificate, all generated with rcgen. Whoever finds the directory empty
//! creates it: the agent before spawning buildd, or buildd in its sidecar
//! form, where the agent reads the client files from the shared volume.
//!
//! In a build Pod buildd runs as root and the agent as 65532: buildd then
//! shares the directory with the agent's group ([`TlsDir::shared_with_group`]:
//! owner root, group 65532, modes 0750 and 0640 for keys). Nobody else may
//! read it, and the group may not write it; both sides check that.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Errors creating or reading a TLS directory.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The directory is readable by others or writable by its group.
    #[error(
        "TLS directory {0} must not be accessible to others nor writable by its group (chmod 700 or 750)"
    )]
    Permissions(PathBuf),
}

/// The files of a TLS directory.
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
    /// Group that may read the directory (the agent's, in a build Pod).
    group: Option<u32>,
}

const SERVER_NAME: &str = "localhost";

impl TlsDir {
    /// The TLS directory at `dir` (not touched until used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            group: None,
        }
    }

    /// The TLS directory at `dir`, created readable by group `gid` (and
    /// owned by it) so that a client running as another user of that group
    /// can read it.
    pub fn shared_with_group(dir: impl Into<PathBuf>, gid: u32) -> Self {
        Self {
            dir: dir.into(),
            group: Some(gid),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the directory (0700) and its certificates unless they exist.
    pub fn ensure(&self) -> Result<(), TlsError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { what, path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        // Never chmod or chown through a symlink someone put in its place.
        if !fs::symlink_metadata(&self.dir)
            .map_err(io("stat", &self.dir))?
            .is_dir()
        {
            return Err(TlsError::Permissions(self.dir.clone()));
        }
        let mode = if self.group.is_some() { 0o750 } else { 0o700 };
        crate::os::set_mode(&self.dir, mode).map_err(io("chmod", &self.dir))?;
        if let Some(gid) = self.group {
            crate::os::chown_group(&self.dir, gid).map_err(io("chown", &self.dir))?;
        }
        if self.file("ca.crt").exists() && self.file("client.key").exists() {
            return self.check();
        }
        let ca = Ca::new("tripod-buildd-ca")?;
        let (server_cert, server_key) = ca.issue(
            "tripod-buildd",
            &[SERVER_NAME.to_string(), Ipv4Addr::LOCALHOST.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) =
            ca.issue("tripod-agent", &[], ExtendedKeyUsagePurpose::ClientAuth)?;

        // Keys first, the CA last: its presence marks a complete directory.
        // server.key: buildd's alone, even in a shared directory.
        self.write("server.key", &server_key, 0o600)?;
        self.write("server.crt", &server_cert, 0o644)?;
        self.write("client.key", &client_key, 0o640)?;
        self.write("client.crt", &client_cert, 0o644)?;
        self.write("ca.crt", ca.pem(), 0o644)?;
        Ok(())
    }

    fn check(&self) -> Result<(), TlsError> {
        // Not followed: a symlink in a shared volume could point anywhere.
        let meta = fs::symlink_metadata(&self.dir).map_err(|source| TlsError::Io {
            what: "stat",
            path: self.dir.clone(),
            source,
        })?;
        if !meta.is_dir() || crate::os::mode_of(&meta) & 0o027 != 0 {
            return Err(TlsError::Permissions(self.dir.clone()));
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, TlsError> {
        let path = self.file(name);
        fs::read(&path).map_err(|source| TlsError::Io {
            what: "read",
            path,
            source,
        })
    }

    /// Server side: buildd's identity, requiring client certificates from the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        self.check()?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(
                self.read("server.crt")?,
                self.read("server.key")?,
            ))
            .client_ca_root(Certificate::from_pem(self.read("ca.crt")?)))
    }

    /// Client side: the agent's identity, trusting only the directory's CA.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        self.check()?;
        Ok(ClientTlsConfig::new()
            .domain_name(SERVER_NAME)
            .ca_certificate(Certificate::from_pem(self.read("ca.crt")?))
            .identity(Identity::from_pem(
                self.read("client.crt")?,
                self.read("client.key")?,
            )))
    }
}

/// A throw-away certificate authority (ECDSA P-256) that issues leaf
/// certificates; shared by buildd's loopback mTLS and the executor service.
pub struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Issues a certificate for `sans` (DNS names or IP addresses) with one
    /// extended key usage. Returns (certificate PEM, PKCS#8 key PEM).
    pub fn issue(
        &self,
        common_name: &str,
        sans: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for san in sans {
            params.subject_alt_names.push(match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.as_str().try_into()?),
            });
        }
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl TlsDir {
    /// Writes one file of the directory: `mode` when it is shared with a
    /// group (and owned by that group), else owner-only for keys.
    fn write(&self, name: &str, data: &str, mode: u32) -> Result<(), TlsError> {
        let path = self.file(name);
        let mode = match self.group {
            Some(_) => mode,
            None if mode & 0o044 == 0o040 => 0o600,
            None => mode,
        };
        write(&path, data, mode)?;
        if let Some(gid) = self.group {
            crate::os::chown_group(&path, gid).map_err(|source| TlsError::Io {
                what: "chown",
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let err = |what, source| TlsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut f = crate::os::create_file(path, mode, false).map_err(|e| err("create", e))?;
    crate::os::set_mode(path, mode).map_err(|e| err("chmod", e))?;
    f.write_all(data.as_bytes()).map_err(|e| err("write", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_directory_once() {
        let dir = std::env::temp_dir().join(format!("tripod-tls-{}", std::process::id()));
        let tls = TlsDir::new(&dir);
        tls.ensure().unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key_mode = fs::metadata(dir.join("client.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let ca = fs::read(dir.join("ca.crt")).unwrap();
        tls.ensure().unwrap();
        assert_eq!(
            fs::read(dir.join("ca.crt")).unwrap(),
            ca,
            "kept, not regenerated"
        );
        assert!(tls.server_config().is_ok() && tls.client_config().is_ok());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(tls.client_config(), Err(TlsError::Permissions(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shared_directory_is_readable_by_the_group_only() {
        let dir = std::env::temp_dir().join(format!("tripod-tls-group-{}", std::process::id()));
        // Our own group (that of a file we create): chown to it needs no
        // privilege.
        let probe = std::env::temp_dir().join(format!("tripod-tls-gid-{}", std::process::id()));
        fs::write(&probe, "").unwrap();
        let gid = std::os::unix::fs::MetadataExt::gid(&fs::metadata(&probe).unwrap());
        fs::remove_file(&probe).unwrap();
        let tls = TlsDir::shared_with_group(&dir, gid);
        tls.ensure().unwrap();
        let mode = |name: &str| fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(""), 0o750);
        assert_eq!(mode("client.key"), 0o640);
        assert_eq!(mode("server.key"), 0o600);
        // The reading side accepts it.
        assert!(TlsDir::new(&dir).client_config().is_ok());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(
            TlsDir::new(&dir).client_config(),
            Err(TlsError::Permissions(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
