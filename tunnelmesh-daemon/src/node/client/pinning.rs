//! TLS server verification by pinned fingerprint, like SSH's `known_hosts`.
//!
//! The coordinator's certificate is self-signed or operator-provided; peers trust exactly the
//! certificate whose SHA-256 matches the fingerprint they were given, and still verify the
//! handshake signature with it. A mismatch is refused loudly.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use crate::control::tls;

/// The coordinator presented a certificate other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the coordinator's certificate is {seen}, not the pinned {pinned}; refusing to connect (check the fingerprint with `tunnelmesh coordinator info`)"
)]
pub struct PinMismatch {
    pub seen: String,
    pub pinned: String,
}

impl PinMismatch {
    /// The mismatch behind a failed TLS handshake, if that is why it failed.
    pub fn in_tls_error(e: &std::io::Error) -> Option<&PinMismatch> {
        match e.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref(),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct PinnedCertificate {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCertificate {
    pub fn new(fingerprint: &str) -> Self {
        PinnedCertificate {
            fingerprint: fingerprint.to_string(),
            provider: tls::provider(),
        }
    }

    /// A client configuration that trusts only the pinned certificate.
    pub fn client_config(fingerprint: &str) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate::new(fingerprint)))
            .with_no_client_auth()
    }
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = tls::fingerprint(end_entity);
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = PinMismatch {
                seen,
                pinned: self.fingerprint.clone(),
            };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(mismatch),
            ))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
