//! How the driver trusts the API's TLS certificate (see [`TlsTrust`]). PVE nodes use
//! self-signed certificates, so users pin the leaf's SHA-256 fingerprint or give the cluster's
//! CA; a distroless runner host has no system CA store at all.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::TlsTrust;
use crate::error::{Error, Result};

const TRUST_SETTINGS: &str = "PROXMOX_TLS_CA_FILE (e.g. a copy of the cluster's \
    /etc/pve/pve-root-ca.pem), PROXMOX_TLS_FINGERPRINT (the certificate's SHA-256 fingerprint \
    as the PVE UI shows it) or, at your own risk, PROXMOX_TLS_INSECURE=true";

/// How a pin mismatch begins, so that [`super::ApiError::tls_reason`] finds it in the HTTP
/// client's error chain.
pub const PIN_MISMATCH: &str = "the API's certificate has SHA-256 fingerprint";

/// The rustls configuration for `trust`, on the ring provider.
pub fn client_config(trust: &TlsTrust) -> Result<ClientConfig> {
    config_with_verifier(verifier(trust)?)
}

/// The certificate verifier `trust` means (the preflight wraps it to see the certificate).
pub fn verifier(trust: &TlsTrust) -> Result<Arc<dyn ServerCertVerifier>> {
    let provider = provider();
    let webpki = |roots: RootCertStore| -> Result<Arc<dyn ServerCertVerifier>> {
        let verifier: Arc<dyn ServerCertVerifier> =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|err| Error::Infrastructure(format!("TLS setup failed: {err}")))?;
        Ok(verifier)
    };
    match trust {
        TlsTrust::SystemRoots => webpki(system_roots()?),
        TlsTrust::CaFile(path) => webpki(roots_from_file(path)?),
        TlsTrust::Fingerprint(expected) => Ok(Arc::new(PinnedLeaf {
            expected: Some(*expected),
            provider,
        })),
        TlsTrust::Insecure => Ok(Arc::new(PinnedLeaf {
            expected: None,
            provider,
        })),
    }
}

/// A client configuration (ring, safe protocol versions) that trusts what `verifier` accepts.
pub fn config_with_verifier(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Infrastructure(format!("TLS setup failed: {err}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(Error::Settings(format!(
            "this runner host has no system CA certificates (usual for a minimal or distroless \
             image), so the Proxmox API's certificate cannot be verified; set {TRUST_SETTINGS}"
        )));
    }
    Ok(roots)
}

fn roots_from_file(path: &Path) -> Result<RootCertStore> {
    let bytes = std::fs::read(path).map_err(|err| {
        Error::Settings(format!(
            "cannot read PROXMOX_TLS_CA_FILE {}: {err}",
            path.display()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|err| {
            Error::Settings(format!(
                "PROXMOX_TLS_CA_FILE {} is not a PEM certificate file: {err}",
                path.display()
            ))
        })?;
        roots.add(cert).map_err(|err| {
            Error::Settings(format!(
                "PROXMOX_TLS_CA_FILE {} holds a certificate rustls cannot use as a CA: {err}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Settings(format!(
            "PROXMOX_TLS_CA_FILE {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(roots)
}

/// `AA:BB:...`, as the PVE UI shows fingerprints.
pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly the leaf certificate with the pinned SHA-256 fingerprint (or, with no
/// fingerprint, any certificate: PROXMOX_TLS_INSECURE). Names and chains do not matter for a
/// pin; the handshake signatures are still checked, so the server must hold the key.
#[derive(Debug)]
struct PinnedLeaf {
    expected: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        let actual: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if actual == expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "{PIN_MISMATCH} {}, not the pinned PROXMOX_TLS_FINGERPRINT {}",
                format_fingerprint(&actual),
                format_fingerprint(&expected)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_like_the_pve_ui() {
        assert_eq!(format_fingerprint(&[0xab, 0x01, 0xff]), "AB:01:FF");
    }

    #[test]
    fn a_pin_accepts_only_its_certificate() {
        let cert = CertificateDer::from(b"not really DER, but hashed all the same".to_vec());
        let fingerprint: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        let verifier = |expected| PinnedLeaf {
            expected: Some(expected),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let name = ServerName::try_from("pve.example.test").unwrap();
        let now = UnixTime::now();
        assert!(verifier(fingerprint)
            .verify_server_cert(&cert, &[], &name, &[], now)
            .is_ok());
        let mut wrong = fingerprint;
        wrong[0] ^= 1;
        let err = verifier(wrong)
            .verify_server_cert(&cert, &[], &name, &[], now)
            .unwrap_err();
        assert!(err.to_string().contains(&format_fingerprint(&fingerprint)));
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_settings_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        let err = client_config(&TlsTrust::CaFile(path)).unwrap_err();
        assert!(err.to_string().contains("PROXMOX_TLS_CA_FILE"), "{err}");
        let err = client_config(&TlsTrust::CaFile(dir.path().join("missing.pem"))).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
