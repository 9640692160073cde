//! Which SSH key a VM accepts: its own, derived from the fleet key (see [`crate::ssh::derived`])
//! and put into its cloud-init `sshkeys` before its first start, or the static
//! `VM_SSH_PRIVATE_KEY` its template carries.
//!
//! The per-VM key needs three things, all host-set: the fleet key, a nonce the driver made (the
//! marker's), and a template whose cloud-init would install the key for the user the driver
//! logs in as (a cloud-init drive, `ciuser` = `VM_SSH_USER`). A job that brings its own
//! `VM_SSH_PRIVATE_KEY` gets the static path for its own clone: its key is what it trusts.

use std::sync::Arc;

use super::VmRef;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::fleet_key::FleetKey;
use crate::proxmox::types::VmConfig;
use crate::ssh::derived::VmKey;
use crate::ssh::PrivateKey;

/// The key a VM accepts, as the job state and a ready VM record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPath {
    /// `VM_SSH_PRIVATE_KEY`: what the template (image or cloud-init user data) carries.
    Static,
    /// Derived from the fleet key, the VMID and this nonce (the marker's at the VM's creation).
    /// `fleet`: the [`FleetKey::id`] of the fleet key it was derived from (`None`: the current
    /// one).
    Derived {
        nonce: String,
        fleet: Option<String>,
    },
}

/// Whether a VM (or template) config would have cloud-init install a key for `user`; `Err`
/// says why not, in words for the job log and `check`.
pub fn cloud_init_accepts(config: &VmConfig, user: &str) -> std::result::Result<(), String> {
    let drive = config.0.iter().any(|(key, value)| {
        let is_drive = ["ide", "sata", "scsi", "virtio"]
            .iter()
            .any(|bus| key.starts_with(bus) && key[bus.len()..].parse::<u8>().is_ok());
        let volume = value.as_str().unwrap_or("").split(',').next().unwrap_or("");
        is_drive && (volume.ends_with(":cloudinit") || volume.ends_with("-cloudinit"))
    });
    if !drive {
        return Err("no cloud-init drive".into());
    }
    match config.get("ciuser") {
        None => Err("no ciuser set".into()),
        Some(ciuser) if ciuser != user => Err(format!(
            "its ciuser {} is not VM_SSH_USER {user}",
            ciuser.escape_debug()
        )),
        Some(_) => Ok(()),
    }
}

/// Which key a VM of `template` (label, for messages) with this config takes: the derived one
/// when `nonce` is given and its cloud-init would install it, else the static one, which must
/// then be set. `Ok((path, why))`: `why` says why a derived key was not possible.
pub fn choose(
    settings: &Settings,
    template: &str,
    config: &VmConfig,
    nonce: Option<&str>,
) -> Result<(KeyPath, Option<String>)> {
    let why_static = match nonce {
        None => None,
        Some(nonce) => match cloud_init_accepts(config, &settings.ssh.user) {
            Ok(()) => {
                let path = KeyPath::Derived {
                    nonce: nonce.to_string(),
                    fleet: settings.fleet_key.as_ref().map(FleetKey::id),
                };
                return Ok((path, None));
            }
            Err(why) => Some(why),
        },
    };
    if settings.ssh.private_key.is_none() {
        let user = &settings.ssh.user;
        return Err(Error::Settings(format!(
            "template {template} takes the static SSH key ({}), and VM_SSH_PRIVATE_KEY is not \
             set: give the template a cloud-init drive and ciuser {user} (qm set <vmid> --ide2 \
             <storage>:cloudinit --ciuser {user}), or set VM_SSH_PRIVATE_KEY",
            why_static
                .as_deref()
                .unwrap_or("no PROXMOX_FLEET_KEY to derive per-VM keys from"),
        )));
    }
    Ok((KeyPath::Static, why_static))
}

/// VM `vm`'s key when it takes the derived path, from the fleet key named `fleet` (the current
/// `PROXMOX_FLEET_KEY` or, after a rotation, `PROXMOX_FLEET_KEY_PREVIOUS`; `None`: the current).
pub fn derive(settings: &Settings, vm: &VmRef, nonce: &str, fleet: Option<&str>) -> Result<VmKey> {
    let held = [&settings.fleet_key, &settings.fleet_key_previous];
    let fleet_key = match fleet {
        None => settings.fleet_key.as_ref(),
        Some(id) => held.into_iter().flatten().find(|key| key.id() == id),
    };
    let fleet_key = fleet_key.ok_or_else(|| {
        Error::Settings(format!(
            "VM {} takes a per-VM SSH key derived from a fleet key this runner host does not \
             hold (neither PROXMOX_FLEET_KEY nor PROXMOX_FLEET_KEY_PREVIOUS); after a \
             rotation, keep the old key as PROXMOX_FLEET_KEY_PREVIOUS until the jobs that \
             started before it are over",
            vm.vmid
        ))
    })?;
    VmKey::derive(fleet_key, vm.vmid, nonce)
}

/// The private key to connect to `vm` with, derived in memory or loaded from the settings.
pub fn private_key(settings: &Settings, vm: &VmRef, path: &KeyPath) -> Result<Arc<PrivateKey>> {
    match path {
        KeyPath::Static => crate::ssh::load_private_key(&settings.ssh),
        KeyPath::Derived { nonce, fleet } => {
            Ok(derive(settings, vm, nonce, fleet.as_deref())?.private())
        }
    }
}

/// Whether the warm VM `vm`'s config holds exactly its derived key in `sshkeys` (set by the
/// pool before its first start, from the nonce of its sealed marker): then it takes the
/// derived path, else the static one.
pub fn warm_vm_path(
    settings: &Settings,
    vm: &VmRef,
    nonce: &str,
    sshkeys: Option<&str>,
) -> KeyPath {
    let Some(fleet_key) = settings.fleet_key.as_ref() else {
        return KeyPath::Static;
    };
    let Some(value) = sshkeys else {
        return KeyPath::Static;
    };
    let Ok(key) = VmKey::derive(fleet_key, vm.vmid, nonce) else {
        return KeyPath::Static;
    };
    let body = crate::ssh::derived::key_body;
    let lines = crate::ssh::derived::decode_sshkeys(value).unwrap_or_default();
    match lines.as_slice() {
        [only] if body(only).is_some() && body(only) == body(key.public_line()) => {
            KeyPath::Derived {
                nonce: nonce.to_string(),
                fleet: Some(fleet_key.id()),
            }
        }
        _ => KeyPath::Static,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> VmConfig {
        VmConfig(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                .collect(),
        )
    }

    fn fleet(byte: u8) -> FleetKey {
        use base64ct::Encoding;
        FleetKey::parse(&base64ct::Base64::encode_string(&[byte; 32])).unwrap()
    }

    const NONCE: &str = "6a1f0c3d9b2e4f5a8c7d6e5f4a3b2c1d";

    fn vm() -> VmRef {
        VmRef {
            node: "pve1".into(),
            vmid: 2_000_001,
        }
    }

    #[test]
    fn a_warm_vm_takes_its_derived_key_only_when_sshkeys_holds_exactly_that_key() {
        let mut settings = crate::config::test_settings(&[]);
        assert_eq!(warm_vm_path(&settings, &vm(), NONCE, None), KeyPath::Static);
        settings.fleet_key = Some(fleet(1));
        let own = VmKey::derive(&fleet(1), vm().vmid, NONCE).unwrap();
        let other = VmKey::derive(&fleet(1), vm().vmid + 1, NONCE).unwrap();
        assert_eq!(
            warm_vm_path(&settings, &vm(), NONCE, Some(&own.sshkeys_value())),
            KeyPath::Derived {
                nonce: NONCE.into(),
                fleet: Some(fleet(1).id())
            }
        );
        let both = crate::ssh::derived::encode_sshkeys(&[own.public_line(), other.public_line()]);
        for sshkeys in [None, Some(other.sshkeys_value()), Some(both)] {
            assert_eq!(
                warm_vm_path(&settings, &vm(), NONCE, sshkeys.as_deref()),
                KeyPath::Static,
                "{sshkeys:?}"
            );
        }
    }

    #[test]
    fn after_a_rotation_the_key_comes_from_the_fleet_key_it_was_made_with() {
        let mut settings = crate::config::test_settings(&[]);
        settings.fleet_key = Some(fleet(2));
        settings.fleet_key_previous = Some(fleet(1));
        let made = VmKey::derive(&fleet(1), vm().vmid, NONCE).unwrap();
        let old = Some(fleet(1).id());
        let again = derive(&settings, &vm(), NONCE, old.as_deref()).unwrap();
        assert_eq!(again.public_line(), made.public_line());
        let current = derive(&settings, &vm(), NONCE, None).unwrap();
        assert_ne!(current.public_line(), made.public_line());
        settings.fleet_key_previous = None;
        let err = derive(&settings, &vm(), NONCE, old.as_deref()).unwrap_err();
        assert!(
            err.to_string().contains("PROXMOX_FLEET_KEY_PREVIOUS"),
            "{err}"
        );
        assert_ne!(fleet(1).id(), fleet(2).id());
    }

    #[test]
    fn cloud_init_needs_a_drive_and_the_login_user_as_ciuser() {
        let drive = ("ide2", "local-lvm:vm-2000001-cloudinit,media=cdrom");
        assert_eq!(
            cloud_init_accepts(&config(&[drive, ("ciuser", "ci")]), "ci"),
            Ok(())
        );
        assert_eq!(
            cloud_init_accepts(
                &config(&[("scsi1", "ceph-vm:cloudinit"), ("ciuser", "ci")]),
                "ci"
            ),
            Ok(())
        );
        assert_eq!(
            cloud_init_accepts(&config(&[drive]), "ci"),
            Err("no ciuser set".into())
        );
        assert!(
            cloud_init_accepts(&config(&[drive, ("ciuser", "root")]), "ci")
                .unwrap_err()
                .contains("not VM_SSH_USER ci")
        );
        assert_eq!(
            cloud_init_accepts(
                &config(&[
                    ("ide2", "local:iso/ubuntu.iso,media=cdrom"),
                    ("ciuser", "ci"),
                    ("description", "local-lvm:cloudinit")
                ]),
                "ci"
            ),
            Err("no cloud-init drive".into())
        );
    }
}
