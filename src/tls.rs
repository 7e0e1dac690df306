//! Loopback mTLS between `tripod agent` and `tripod buildd` (design §4).
//!
//! A TLS directory (mode 0700) holds a throw-away CA, buildd's serving
//! certificate (SANs `localhost`, `127.0.0.1`) and the agent's client
//! certificate, all generated with rcgen. Whoever finds the directory empty
//! creates it: the agent before spawning buildd, or buildd in its sidecar
//! form, where the agent reads the client files from the shared volume.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    /// The directory is readable by others.
    #[error("TLS directory {0} must not be accessible to group or others (chmod 700)")]
    Permissions(PathBuf),
}

/// The files of a TLS directory.
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
}

const SERVER_NAME: &str = "localhost";

impl TlsDir {
    /// The TLS directory at `dir` (not touched until used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
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
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &self.dir))?;
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
        write(&self.file("server.key"), &server_key, true)?;
        write(&self.file("server.crt"), &server_cert, false)?;
        write(&self.file("client.key"), &client_key, true)?;
        write(&self.file("client.crt"), &client_cert, false)?;
        write(&self.file("ca.crt"), ca.pem(), false)?;
        Ok(())
    }

    fn check(&self) -> Result<(), TlsError> {
        let meta = fs::metadata(&self.dir).map_err(|source| TlsError::Io {
            what: "stat",
            path: self.dir.clone(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
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

fn write(path: &Path, data: &str, secret: bool) -> Result<(), TlsError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let err = |what, source| TlsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| err("create", e))?;
    f.write_all(data.as_bytes()).map_err(|e| err("write", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
