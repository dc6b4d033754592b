//! TLS for the control channel: a local CA and server certificate (`gateway certs init`), and
//! the rustls server configuration (TLS 1.3 only, ring provider).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Errors of certificate generation and TLS setup.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Generating a key or certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files `certs init` writes.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate, given to devices (`device-sim --ca`).
    pub ca_cert: PathBuf,
    /// CA private key (mode 0600), needed only to issue new server certificates.
    pub ca_key: PathBuf,
    /// Server certificate chain.
    pub server_cert: PathBuf,
    /// Server private key (mode 0600).
    pub server_key: PathBuf,
}

impl CertFiles {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

fn write_file(path: &Path, data: &str, private: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Creates a local CA and a server certificate for `hosts` (DNS names or IP addresses) in `dir`.
///
/// # Errors
/// [`TlsError`] when generation or writing fails.
pub fn init_certs(dir: &Path, hosts: &[String]) -> Result<CertFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let files = CertFiles::in_dir(dir);
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sensor gateway local CA");
    ca_params.distinguished_name = dn;
    let ca_pem_key = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sensor gateway");
    params.distinguished_name = dn;
    let server = params.signed_by(&server_key, &ca)?;

    write_file(&files.ca_cert, &ca.pem(), false)?;
    write_file(&files.ca_key, &ca_pem_key, true)?;
    write_file(&files.server_cert, &server.pem(), false)?;
    write_file(&files.server_key, &server_key.serialize_pem(), true)?;
    Ok(files)
}

/// Default host names of a server certificate: loopback and this host's name.
pub fn default_hosts() -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
        let name = name.trim();
        if !name.is_empty() && !hosts.iter().any(|h| h == name) {
            hosts.push(name.to_owned());
        }
    }
    hosts
}

/// The crypto provider used on both sides.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 server configuration from PEM files.
///
/// # Errors
/// Unreadable or empty PEM files, or a key that does not match.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_with_private_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = init_certs(dir.path(), &default_hosts()).expect("init");
        server_config(&files.server_cert, &files.server_key).expect("server config");
        use std::os::unix::fs::PermissionsExt;
        for key in [&files.ca_key, &files.server_key] {
            let mode = std::fs::metadata(key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(server_config(&files.ca_cert, &files.ca_cert).is_err());
    }
}
