//! The API's certificate as the preflight saw it: the configured verifier decides, a wrapper
//! keeps the leaf it was shown, so that a refused certificate can be named for pinning.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use x509_cert::der::Decode;
use x509_cert::name::Name;
use x509_cert::Certificate;

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
        let (subject, issuer) = match Certificate::from_der(der) {
            Ok(cert) => (
                name_text(cert.tbs_certificate().subject()),
                name_text(cert.tbs_certificate().issuer()),
            ),
            Err(_) => ("(unreadable)".to_string(), "(unreadable)".to_string()),
        };
        CertificateFacts {
            fingerprint,
            subject,
            issuer,
        }
    }
}

/// `CN=pve1, O=PVE Cluster Node`: the attributes in the certificate's order, as `openssl x509
/// -subject` prints them (RFC 4514's reversed, comma-only form reads backwards to admins).
fn name_text(name: &Name) -> String {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" + ")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn certificate(subject: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["pve1.local".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn names_read_in_the_certificates_order() {
        let der = certificate(&[
            (DnType::CommonName, "pve1.local"),
            (DnType::OrganizationalUnitName, "PVE Cluster Node"),
            (DnType::OrganizationName, "Proxmox Virtual Environment"),
            (DnType::CountryName, "AT"),
        ]);
        let facts = CertificateFacts::of(&der);
        let expected = "CN=pve1.local, OU=PVE Cluster Node, O=Proxmox Virtual Environment, C=AT";
        assert_eq!(facts.subject, expected);
        assert_eq!(facts.issuer, expected);
        assert_eq!(facts.fingerprint, format_fingerprint(&Sha256::digest(&der)));
    }

    #[test]
    fn what_is_no_certificate_is_named_unreadable() {
        let facts = CertificateFacts::of(b"not a certificate");
        assert_eq!(facts.subject, "(unreadable)");
        assert_eq!(facts.issuer, "(unreadable)");
    }
}
