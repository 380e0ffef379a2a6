//! TLS pieces both sides use: certificates are pinned by their SHA-256 fingerprint
//! (`SHA256:<base64>`, the form SSH uses for keys), and both ends use ring.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

/// `SHA256:<base64>` of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(cert)))
}

/// The crypto provider used on both ends.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
