//! The API's certificate as the preflight saw it: the configured verifier decides, a wrapper
//! keeps the leaf it was shown, so that a refused certificate can be named for pinning.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::proxmox::tls::format_fingerprint;

/// Delegates every decision to `inner` and remembers the last leaf certificate it saw.
#[derive(Debug)]
pub struct Recording {
    inner: Arc<dyn ServerCertVerifier>,
    seen: Mutex<Option<Vec<u8>>>,
}

impl Recording {
    pub fn new(inner: Arc<dyn ServerCertVerifier>) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            seen: Mutex::new(None),
        })
    }

    /// The leaf certificate the API presented last (DER), if a handshake got that far.
    pub fn seen(&self) -> Option<Vec<u8>> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(end_entity.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// What an admin needs to recognise a certificate and pin it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// `AA:BB:...`, the form `PROXMOX_TLS_FINGERPRINT` takes and the PVE UI shows.
    pub fingerprint: String,
    pub subject: String,
    pub issuer: String,
}

impl CertificateFacts {
    pub fn of(der: &[u8]) -> CertificateFacts {
        let fingerprint = format_fingerprint(&Sha256::digest(der));
        let (subject, issuer) = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => (cert.subject().to_string(), cert.issuer().to_string()),
            Err(_) => ("(unreadable)".to_string(), "(unreadable)".to_string()),
        };
        CertificateFacts {
            fingerprint,
            subject,
            issuer,
        }
    }
}
