//! The fleet key (`PROXMOX_FLEET_KEY`): a secret only the runner hosts of one fleet hold, in
//! their settings files, and the one proof that a warm VM was made by one of them.
//!
//! Everything else about a VM (its VMID inside `PROXMOX_VMID_RANGE`, its tag, its name, its
//! whole description, ownership marker included) can be written by any other user of the
//! cluster who may create VMs, and is readable by anyone with `VM.Audit`. So a warm VM's marker
//! carries an HMAC-SHA256 keyed with this secret over every fact a claim acts on (see
//! [`crate::marker::Marker::seal`]); a VM whose MAC does not verify is foreign, whatever it
//! looks like.

use base64ct::{Base64, Encoding};
use ring::hmac;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// At least this many random bytes (256 bits, HMAC-SHA256's own strength).
pub const MIN_KEY_BYTES: usize = 32;

/// A parsed fleet key. Its bytes live only in wiped memory (ring's key schedule is derived on
/// each use, so it holds no copy); it never prints.
#[derive(Clone)]
pub struct FleetKey {
    bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKey(<redacted>)")
    }
}

impl FleetKey {
    /// Parses the setting's value: base64 of at least [`MIN_KEY_BYTES`] bytes.
    pub fn parse(text: &str) -> Result<FleetKey> {
        let text = text.trim();
        let mut buffer = Zeroizing::new(vec![0u8; text.len()]);
        let decoded = Base64::decode(text.as_bytes(), &mut buffer).map_err(|_| {
            Error::Settings(
                "PROXMOX_FLEET_KEY is not base64; make one with `gitlab-proxmox-runner \
                 fleet-key` and put the same value in the settings file of every runner host \
                 of the fleet"
                    .into(),
            )
        })?;
        if decoded.len() < MIN_KEY_BYTES {
            return Err(Error::Settings(format!(
                "PROXMOX_FLEET_KEY holds {} bytes; it needs at least {MIN_KEY_BYTES} random \
                 bytes (make one with `gitlab-proxmox-runner fleet-key`)",
                decoded.len()
            )));
        }
        Ok(FleetKey {
            bytes: Zeroizing::new(decoded.to_vec()),
        })
    }

    /// A fresh key's setting value, from the operating system's random source.
    pub fn generate() -> Result<Zeroizing<String>> {
        let mut bytes = Zeroizing::new([0u8; MIN_KEY_BYTES]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut())
            .map_err(|_| Error::Infrastructure("the system's random source failed".into()))?;
        Ok(Zeroizing::new(Base64::encode_string(bytes.as_ref())))
    }

    fn key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.bytes)
    }

    /// The MAC of `message`, as lowercase hex.
    pub fn sign(&self, message: &[u8]) -> String {
        hmac::sign(&self.key(), message)
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Fills `out` with HKDF-SHA256 output keyed with this secret: `label` is the salt (a fixed
    /// string naming what the bytes are for, so that no two uses share output) and `info` the
    /// context. `out` is the caller's wiped buffer.
    pub fn derive(&self, label: &[u8], info: &[&[u8]], out: &mut [u8; 32]) -> Result<()> {
        struct Len32;
        impl ring::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, label)
            .extract(&self.bytes)
            .expand(info, Len32)
            .and_then(|okm| okm.fill(out))
            .map_err(|_| Error::Infrastructure("deriving a key from the fleet key failed".into()))
    }

    /// A public name for this key (16 hex digits of its MAC over a fixed label): which fleet
    /// key a per-VM SSH key was derived from, so that a hook after a rotation picks the right
    /// one. Says nothing about the key itself.
    pub fn id(&self) -> String {
        let mut id = self.sign(b"gitlab-proxmox-runner fleet key id v1");
        id.truncate(16);
        id
    }

    /// Whether `mac` (hex, as [`FleetKey::sign`] writes it) is `message`'s MAC; compared in
    /// constant time.
    pub fn verify(&self, message: &[u8], mac: &str) -> bool {
        let Some(tag) = decode_hex(mac) else {
            return false;
        };
        hmac::verify(&self.key(), message, &tag).is_ok()
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_and_signs_what_only_it_verifies() {
        let text = FleetKey::generate().unwrap();
        let key = FleetKey::parse(&text).unwrap();
        let other = FleetKey::parse(&FleetKey::generate().unwrap()).unwrap();
        let mac = key.sign(b"VM 2000001 on pve1");
        assert_eq!(mac.len(), 64);
        assert!(key.verify(b"VM 2000001 on pve1", &mac));
        assert!(!key.verify(b"VM 2000002 on pve1", &mac));
        assert!(!other.verify(b"VM 2000001 on pve1", &mac));
        assert!(!key.verify(b"VM 2000001 on pve1", &mac[..62]));
        assert!(!key.verify(b"VM 2000001 on pve1", "zz"));
        assert!(!format!("{key:?}").contains(text.as_str()));
    }

    #[test]
    fn short_or_garbled_keys_are_refused_without_echoing_them() {
        let short = Base64::encode_string(&[7u8; 16]);
        let err = FleetKey::parse(&short).unwrap_err().to_string();
        assert!(err.contains("16 bytes"), "{err}");
        assert!(!err.contains(&short), "{err}");
        let err = FleetKey::parse("not base64 at all!")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        assert!(!err.contains("at all"), "{err}");
        assert!(FleetKey::parse(&format!(" {}\n", Base64::encode_string(&[1u8; 48]))).is_ok());
    }
}
