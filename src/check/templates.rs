//! Whether a template can be cloned the way the settings ask: it is a template, its guest
//! agent option is on (the driver learns the VM's address from it), it has a `net0`, and every
//! disk sits on storage that can make linked clones (unless the clones are full).

use std::collections::BTreeMap;

use crate::proxmox::VmConfig;

/// A disk volume of a VM's config: `scsi0: local-lvm:base-9000-disk-0,size=20G`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub key: String,
    pub storage: String,
    /// `qcow2`, `raw`, `vmdk`, or `None` when neither an option nor the file name says.
    pub format: Option<String>,
}

/// The disks clones copy or link: bus disks, the EFI disk and the TPM state, not CD-ROMs
/// and not the cloud-init drive (PVE makes a fresh one for every clone).
pub fn volumes(config: &VmConfig) -> Vec<Volume> {
    let mut found = Vec::new();
    for key in config.0.keys() {
        let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
        let is_disk_key = (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus != key)
            || matches!(key.as_str(), "efidisk0" | "tpmstate0");
        if !is_disk_key {
            continue;
        }
        let Some(value) = config.get(key) else {
            continue;
        };
        let mut parts = value.split(',');
        let volume = parts.next().unwrap_or("").trim();
        let options: BTreeMap<&str, &str> = parts
            .filter_map(|part| part.trim().split_once('='))
            .collect();
        if volume == "none"
            || volume.contains("cloudinit")
            || options.get("media") == Some(&"cdrom")
        {
            continue;
        }
        // A path (`/dev/sdb`) is passed through, not on a PVE storage.
        let Some((storage, name)) = volume.split_once(':') else {
            continue;
        };
        let format = options
            .get("format")
            .map(|format| format.to_string())
            .or_else(|| {
                ["qcow2", "raw", "vmdk"]
                    .into_iter()
                    .find(|ext| name.ends_with(&format!(".{ext}")))
                    .map(String::from)
            });
        found.push(Volume {
            key: key.clone(),
            storage: storage.to_string(),
            format,
        });
    }
    found
}

/// Whether a disk on a storage of `storage_type` holding `format` can be the base of a linked
/// clone; `None` for storage types this does not know.
pub fn can_link(storage_type: &str, format: Option<&str>) -> Option<bool> {
    match storage_type {
        // Thin snapshots / clones of the base volume.
        "lvmthin" | "zfspool" | "zfs" | "rbd" | "btrfs" => Some(true),
        // File storages: a qcow2 overlay on the base file.
        "dir" | "nfs" | "cifs" | "glusterfs" | "cephfs" => Some(format == Some("qcow2")),
        // Thick volumes: every clone is a full copy.
        "lvm" | "iscsi" | "iscsidirect" => Some(false),
        _ => None,
    }
}

/// `bridge=vmbr0` of net0, when set.
pub fn net0_bridge(config: &VmConfig) -> Option<String> {
    config.get("net0")?.split(',').find_map(|part| {
        part.trim()
            .strip_prefix("bridge=")
            .map(|bridge| bridge.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(entries: &[(&str, &str)]) -> VmConfig {
        VmConfig(
            entries
                .iter()
                .map(|(key, value)| (key.to_string(), serde_json::json!(value)))
                .collect(),
        )
    }

    #[test]
    fn disks_are_found_and_cdroms_and_cloudinit_left_out() {
        let vm = config(&[
            ("scsi0", "local-lvm:base-9000-disk-0,size=20G"),
            ("scsi1", "nas:9000/base-9000-disk-1.qcow2,size=8G"),
            ("ide2", "local-lvm:vm-9000-cloudinit,media=cdrom"),
            ("ide0", "local:iso/debian.iso,media=cdrom"),
            ("sata0", "none,media=cdrom"),
            ("scsihw", "virtio-scsi-single"),
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1"),
        ]);
        let found = volumes(&vm);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].storage, "local-lvm");
        assert_eq!(found[0].format, None);
        assert_eq!(found[1].format.as_deref(), Some("qcow2"));
        assert_eq!(net0_bridge(&vm).as_deref(), Some("vmbr1"));
    }

    #[test]
    fn linked_clones_need_thin_storage_or_qcow2_files() {
        for thin in ["lvmthin", "zfspool", "rbd"] {
            assert_eq!(can_link(thin, None), Some(true), "{thin}");
        }
        assert_eq!(can_link("dir", Some("qcow2")), Some(true));
        assert_eq!(can_link("nfs", Some("qcow2")), Some(true));
        assert_eq!(can_link("dir", Some("raw")), Some(false));
        assert_eq!(can_link("lvm", None), Some(false));
        assert_eq!(can_link("someplugin", None), None);
    }
}
