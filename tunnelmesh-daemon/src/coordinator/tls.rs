//! The coordinator's TLS certificate: operator-provided, or self-signed on first start and kept.
//!
//! Peers pin the certificate by its SHA-256 fingerprint (`SHA256:<base64>`, the form SSH uses for
//! keys), like `known_hosts`; no CA is involved, so names in the certificate do not matter.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::control::tls::{fingerprint, provider};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("the certificate or key is not usable: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A loaded certificate chain and key.
pub struct Certificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Certificate {
    /// Fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// Load PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read_err = |p: &Path, e: String| TlsError::Read {
            path: p.display().to_string(),
            reason: e,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| read_err(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read_err(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(read_err(cert, "no CERTIFICATE block in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, e.to_string()))?;
        Ok(Certificate { chain, key })
    }

    /// Load `cert.pem`/`key.pem` from `dir`, generating a self-signed pair on first use.
    pub fn load_or_generate(dir: &Path) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
        if !cert_path.exists() {
            let generated = rcgen::generate_simple_self_signed(vec!["tunnelmesh-coordinator".to_string()])?;
            let write = |p: &Path, text: String, mode: u32| {
                super::create_file(p, text.as_bytes(), mode).map_err(|e| TlsError::Write {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })
            };
            write(&key_path, generated.key_pair.serialize_pem(), 0o600)?;
            write(&cert_path, generated.cert.pem(), 0o644)?;
        }
        Self::load(&cert_path, &key_path)
    }

    /// A rustls server configuration serving this certificate.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}
