//! The control plane's PKI, generated with rcgen (no openssl).

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;
use crate::node::{NODE_IP, NODE_NAME};

/// Common name of the admin client certificate.
pub const ADMIN_USER: &str = "tripod-admin";
/// Organization (group) of the admin client certificate: cluster-admin.
pub const ADMIN_GROUP: &str = "system:masters";
/// Common name of the controller's client certificate (in
/// `system:masters`): its requests are told apart from everyone else's in
/// the audit log ([`Options::audit`](crate::controlplane::Options::audit)).
pub const CONTROLLER_USER: &str = "tripod-controller";
/// kube-proxy's user name (the bootstrap policy binds it).
pub const KUBE_PROXY_USER: &str = "system:kube-proxy";
/// CoreDNS's user name.
pub const COREDNS_USER: &str = "tripod-testenv:coredns";

/// Paths of the certificate and key files [`ControlPlane::start`](super::ControlPlane::start)
/// writes under `<dir>/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (PEM); the apiserver's `--client-ca-file` too.
    pub ca_cert: PathBuf,
    /// CA private key (PKCS#8 PEM).
    pub ca_key: PathBuf,
    /// kube-apiserver serving certificate (PEM).
    pub apiserver_cert: PathBuf,
    /// kube-apiserver serving key (PKCS#8 PEM).
    pub apiserver_key: PathBuf,
    /// Admin client certificate, `CN=tripod-admin, O=system:masters` (PEM).
    pub admin_cert: PathBuf,
    /// Admin client key (PKCS#8 PEM).
    pub admin_key: PathBuf,
    /// The controller's client certificate, `CN=tripod-controller,
    /// O=system:masters`.
    pub controller_cert: PathBuf,
    /// Its key.
    pub controller_key: PathBuf,
    /// The API server's client certificate for kubelets (`kubectl logs`,
    /// `exec`): `CN=kube-apiserver-kubelet-client, O=system:masters`.
    pub kubelet_client_cert: PathBuf,
    /// Its key.
    pub kubelet_client_key: PathBuf,
    /// The real node's client certificate, `CN=system:node:<name>,
    /// O=system:nodes`: what the Node authorizer expects of a kubelet.
    pub node_cert: PathBuf,
    /// Its key.
    pub node_key: PathBuf,
    /// kube-proxy's client certificate, `CN=system:kube-proxy` (bound to
    /// `system:node-proxier` by the API server's bootstrap policy).
    pub kube_proxy_cert: PathBuf,
    /// Its key.
    pub kube_proxy_key: PathBuf,
    /// CoreDNS's client certificate, `CN=tripod-testenv:coredns` (the
    /// harness binds it to a read-only ClusterRole).
    pub coredns_cert: PathBuf,
    /// Its key.
    pub coredns_key: PathBuf,
    /// The kubelet's serving certificate (SAN: the node IP), checked by the
    /// API server against the CA.
    pub kubelet_serving_cert: PathBuf,
    /// Its key.
    pub kubelet_serving_key: PathBuf,
    /// Service-account token signing key, ECDSA P-256 (PKCS#8 PEM).
    pub sa_key: PathBuf,
    /// Service-account token verification key (SPKI `PUBLIC KEY` PEM).
    pub sa_pub: PathBuf,
}

/// Generates a fresh CA, apiserver serving certificate, admin client
/// certificate and service-account key pair under `dir` (created if
/// missing). Private keys get mode 0600.
pub fn generate(dir: &Path) -> Result<Pki, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        apiserver_cert: dir.join("apiserver.crt"),
        apiserver_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        controller_cert: dir.join("controller.crt"),
        controller_key: dir.join("controller.key"),
        kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
        kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
        node_cert: dir.join("node.crt"),
        node_key: dir.join("node.key"),
        kube_proxy_cert: dir.join("kube-proxy.crt"),
        kube_proxy_key: dir.join("kube-proxy.key"),
        coredns_cert: dir.join("coredns.crt"),
        coredns_key: dir.join("coredns.key"),
        kubelet_serving_cert: dir.join("kubelet.crt"),
        kubelet_serving_key: dir.join("kubelet.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };

    // CA.
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tripod-testenv-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&pki.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write_file(&pki.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    // kube-apiserver serving certificate.
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    // First address of --service-cluster-ip-range: the `kubernetes` Service.
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    // The node address, where Pods reach it (`Options::pod_address`).
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(NODE_IP)));
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&pki.apiserver_cert, cert.pem().as_bytes(), false)?;
    write_file(&pki.apiserver_key, key.serialize_pem().as_bytes(), true)?;

    // Client certificates: the admin, the API server towards kubelets, the
    // real node's kubelet.
    for (cn, org, cert, key) in [
        (
            ADMIN_USER.to_string(),
            ADMIN_GROUP,
            &pki.admin_cert,
            &pki.admin_key,
        ),
        (
            CONTROLLER_USER.to_string(),
            ADMIN_GROUP,
            &pki.controller_cert,
            &pki.controller_key,
        ),
        (
            "kube-apiserver-kubelet-client".to_string(),
            ADMIN_GROUP,
            &pki.kubelet_client_cert,
            &pki.kubelet_client_key,
        ),
        (
            format!("system:node:{NODE_NAME}"),
            "system:nodes",
            &pki.node_cert,
            &pki.node_key,
        ),
        (
            KUBE_PROXY_USER.to_string(),
            "",
            &pki.kube_proxy_cert,
            &pki.kube_proxy_key,
        ),
        (
            COREDNS_USER.to_string(),
            "",
            &pki.coredns_cert,
            &pki.coredns_key,
        ),
    ] {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if !org.is_empty() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let c = params.signed_by(&k, &issuer)?;
        write_file(cert, c.pem().as_bytes(), false)?;
        write_file(key, k.serialize_pem().as_bytes(), true)?;
    }

    // The kubelet's serving certificate: the API server dials the node IP.
    let mut params = CertificateParams::new(vec![NODE_NAME.to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(NODE_IP)));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("system:node:{NODE_NAME}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&pki.kubelet_serving_cert, cert.pem().as_bytes(), false)?;
    write_file(
        &pki.kubelet_serving_key,
        key.serialize_pem().as_bytes(),
        true,
    )?;

    // Service-account token signing key pair.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    write_file(&pki.sa_key, key.serialize_pem().as_bytes(), true)?;
    write_file(&pki.sa_pub, key.public_key_pem().as_bytes(), false)?;

    Ok(pki)
}

/// Writes `data` to `path`, replacing it; `secret` files get mode 0600
/// (also when the file already existed with another mode).
fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), Error> {
    let ctx = || format!("write {}", path.display());
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(ctx(), e))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(ctx(), e))?;
    file.write_all(data).map_err(|e| Error::io(ctx(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_keys_private() {
        let dir = std::env::temp_dir().join(format!("tripod-certs-{}", std::process::id()));
        let pki = generate(&dir).unwrap();
        for key in [&pki.ca_key, &pki.apiserver_key, &pki.admin_key, &pki.sa_key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
            let pem = fs::read_to_string(key).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        }
        let public = fs::read_to_string(&pki.sa_pub).unwrap();
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
