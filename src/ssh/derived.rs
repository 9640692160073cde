//! Per-VM SSH keys: an ed25519 key pair for one VM, derived from the fleet key
//! (`PROXMOX_FLEET_KEY`), the VM's VMID and the nonce its marker carries, so that a leaked key
//! opens that one VM and nothing else, and no key is ever stored: every hook derives it again
//! in memory from the nonce in its job state.
//!
//! HKDF-SHA256 (ring) with a fixed label as the salt, the fleet key as the input key material,
//! and `vmid` and `nonce` as the context. The nonce is public (the marker is readable with
//! VM.Audit) and driver-made (no job text reaches it); the secret is the fleet key alone. The
//! 32-byte output is the ed25519 seed, wiped after use.

use std::sync::Arc;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use zeroize::Zeroizing;

use super::PrivateKey;
use crate::error::{Error, Result};
use crate::fleet_key::FleetKey;

/// Changing it changes every derived key: a new version of the scheme gets a new label.
const LABEL: &[u8] = b"gitlab-proxmox-runner per-VM SSH key v1";

/// What PVE's own `qm set --sshkeys` leaves unescaped (URI::Escape's unreserved set).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One VM's key pair: the private half for connecting, the public half for its `sshkeys`.
pub struct VmKey {
    private: Arc<PrivateKey>,
    public_line: String,
}

impl std::fmt::Debug for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmKey({})", self.public_line)
    }
}

impl VmKey {
    /// Derives VM `vmid`'s key from `fleet_key` and the nonce of the marker it was created
    /// with. The nonce must be one the driver made (hex); anything else is refused rather than
    /// derived from.
    pub fn derive(fleet_key: &FleetKey, vmid: u32, nonce: &str) -> Result<VmKey> {
        if nonce.is_empty() || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Infrastructure(format!(
                "VM {vmid}'s key nonce is not one the driver makes; cannot derive its SSH key"
            )));
        }
        let vmid_text = vmid.to_string();
        let mut seed = Zeroizing::new([0u8; 32]);
        fleet_key.derive(
            LABEL,
            &[
                b"vmid=",
                vmid_text.as_bytes(),
                b"\nnonce=",
                nonce.as_bytes(),
            ],
            &mut seed,
        )?;
        let keypair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
        drop(seed);
        let mut key = russh::keys::PrivateKey::from(keypair);
        key.set_comment(format!("gitlab-proxmox-runner-vm-{vmid}"));
        let public_line = key.public_key().to_openssh().map_err(|err| {
            Error::Infrastructure(format!("cannot encode VM {vmid}'s public key: {err}"))
        })?;
        Ok(VmKey {
            private: Arc::new(PrivateKey { key: Arc::new(key) }),
            public_line,
        })
    }

    pub fn private(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.private)
    }

    /// `ssh-ed25519 AAAA... gitlab-proxmox-runner-vm-<vmid>`.
    pub fn public_line(&self) -> &str {
        &self.public_line
    }

    /// The VM config's `sshkeys` value for this key alone: the OpenSSH line, URL-encoded as PVE
    /// stores it (the form encoding of the request comes on top).
    pub fn sshkeys_value(&self) -> String {
        encode_sshkeys(&[self.public_line.as_str()])
    }
}

/// `sshkeys` as PVE wants it: the key lines, one per line, URL-encoded.
pub fn encode_sshkeys(lines: &[&str]) -> String {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    utf8_percent_encode(&text, UNRESERVED).to_string()
}

/// The public key lines an `sshkeys` value holds (blank lines and comments left out); `None`
/// when it is not URL-encoded text.
pub fn decode_sshkeys(value: &str) -> Option<Vec<String>> {
    let text = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .ok()?;
    Some(
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_string)
            .collect(),
    )
}

/// The key-type and base64 fields of an OpenSSH public key line (the comment left out), to
/// compare keys.
pub fn key_body(line: &str) -> Option<(&str, &str)> {
    let mut fields = line.split_whitespace();
    Some((fields.next()?, fields.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64ct::Encoding;

    fn fleet_key() -> FleetKey {
        FleetKey::parse(&base64ct::Base64::encode_string(&[7u8; 32])).unwrap()
    }

    const NONCE: &str = "6a1f0c3d9b2e4f5a8c7d6e5f4a3b2c1d";

    #[test]
    fn the_same_inputs_give_the_same_key_and_any_other_input_another() {
        let key = fleet_key();
        let first = VmKey::derive(&key, 2_000_001, NONCE).unwrap();
        let again = VmKey::derive(&key, 2_000_001, NONCE).unwrap();
        assert_eq!(first.public_line(), again.public_line());
        assert_eq!(first.private().fingerprint(), again.private().fingerprint());
        assert!(first.public_line().starts_with("ssh-ed25519 AAAA"));
        assert!(first
            .public_line()
            .ends_with(" gitlab-proxmox-runner-vm-2000001"));
        let other_vm = VmKey::derive(&key, 2_000_002, NONCE).unwrap();
        let other_nonce =
            VmKey::derive(&key, 2_000_001, "6a1f0c3d9b2e4f5a8c7d6e5f4a3b2c1e").unwrap();
        let other_fleet = FleetKey::parse(&base64ct::Base64::encode_string(&[8u8; 32])).unwrap();
        let other_key = VmKey::derive(&other_fleet, 2_000_001, NONCE).unwrap();
        let body = |k: &VmKey| key_body(k.public_line()).unwrap().1.to_string();
        let bodies = [
            body(&first),
            body(&other_vm),
            body(&other_nonce),
            body(&other_key),
        ];
        for (i, a) in bodies.iter().enumerate() {
            for b in &bodies[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn a_derived_key_never_prints_its_secret_half() {
        let key = VmKey::derive(&fleet_key(), 2_000_001, NONCE).unwrap();
        let debug = format!("{key:?} {:?}", key.private());
        assert!(!debug.contains("PRIVATE"), "{debug}");
        assert!(debug.contains(key.public_line()), "{debug}");
    }

    /// Pinned: a driver upgrade that derived other keys would lock running jobs out of their VMs.
    #[test]
    fn the_derivation_is_stable_across_versions() {
        let key = VmKey::derive(&fleet_key(), 2_000_001, NONCE).unwrap();
        assert_eq!(
            key.public_line(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBR0kE836j7jBOdQ7xiWrexmR55yycgxUfaq52KvyuVt \
             gitlab-proxmox-runner-vm-2000001"
        );
    }

    #[test]
    fn nonces_the_driver_never_makes_are_refused() {
        let key = fleet_key();
        for nonce in ["", "not-hex", "6a1f 0c3d", &"a".repeat(65)] {
            assert!(VmKey::derive(&key, 1, nonce).is_err(), "{nonce:?}");
        }
    }

    #[test]
    fn sshkeys_values_are_url_encoded_and_decode_back() {
        let key = VmKey::derive(&fleet_key(), 2_000_001, NONCE).unwrap();
        let value = key.sshkeys_value();
        assert!(value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~%".contains(c)));
        assert!(value.contains("%20") && value.ends_with("%0A"), "{value}");
        assert_eq!(
            decode_sshkeys(&value).unwrap(),
            vec![key.public_line().to_string()]
        );
        let two = encode_sshkeys(&["ssh-ed25519 AAAA a", "ssh-rsa BBB+/= b"]);
        assert_eq!(
            two,
            "ssh-ed25519%20AAAA%20a%0Assh-rsa%20BBB%2B%2F%3D%20b%0A"
        );
        assert_eq!(decode_sshkeys(&two).unwrap().len(), 2);
    }
}
