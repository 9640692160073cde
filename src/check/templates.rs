//! Whether a template can be cloned the way the settings ask: it is a template, its guest
//! agent option is on (the driver learns the VM's address from it), it has a `net0`, and every
//! disk sits on storage that can make linked clones (unless the clones are full); without
//! `PROXMOX_NODES`, which copy on `PROXMOX_NODE` that is ([`findings`]), and the look-alike
//! templates beside it.

use std::collections::BTreeMap;

use reqwest::Method;

use crate::check::api::Api;
use crate::check::Finding;
use crate::config::{CloneMode, Settings};
use crate::proxmox::types::ClusterVm;
use crate::proxmox::{Retry, VmConfig};
use crate::vm::ssh_key::KeyPath;

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

/// What the templates need, for the privilege check: storages, bridges, and (with
/// `PROXMOX_NODES`) the other nodes' copies of the templates.
#[derive(Default)]
pub struct TemplateNeeds {
    pub storages: Vec<String>,
    pub bridges: Vec<String>,
    /// `(VMID, what for)` of copies that are not themselves `PROXMOX_TEMPLATES` entries.
    pub copies: Vec<(u32, String)>,
    /// Some template's VMs get keys of their own: the driver sets their `sshkeys`.
    pub per_vm_keys: bool,
}

impl TemplateNeeds {
    pub fn for_settings(settings: &Settings) -> TemplateNeeds {
        let mut needs = TemplateNeeds::default();
        if let (Some(storage), Some(CloneMode::Full)) =
            (&settings.clone.storage, settings.clone.mode)
        {
            needs.storages.push(storage.clone());
        }
        needs
    }
}

/// Storage id → storage type on `node`; empty when the token may not list them (the disks'
/// lines then say so).
pub async fn node_storages(api: &Api, node: &str) -> BTreeMap<String, String> {
    node_storage_list(api, node)
        .await
        .into_iter()
        .map(|storage| (storage.storage, storage.kind))
        .collect()
}

#[derive(serde::Deserialize)]
pub struct NodeStorage {
    pub storage: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "crate::proxmox::types::flexible_bool")]
    pub shared: bool,
}

/// `GET /nodes/{node}/storage`; empty when the token may not list them.
pub async fn node_storage_list(api: &Api, node: &str) -> Vec<NodeStorage> {
    api.client
        .call::<Vec<NodeStorage>>(
            Method::GET,
            &format!("/nodes/{}/storage", crate::proxmox::client::segment(node)),
            &[],
            &[],
            Retry::Idempotent,
        )
        .await
        .unwrap_or_default()
}

/// One template VM as the driver would clone it.
pub struct TemplateVm<'a> {
    pub id: String,
    pub label: String,
    pub vmid: u32,
    pub node: &'a str,
    pub is_template: bool,
}

/// The per-template checks on one template VM: the template flag, the guest agent, net0, and
/// storage able to make the clones the settings ask for.
pub fn template_vm_finding(
    settings: &Settings,
    vm: TemplateVm<'_>,
    config: &VmConfig,
    storages: &BTreeMap<String, String>,
    needs: &mut TemplateNeeds,
) -> Finding {
    let TemplateVm {
        id,
        label,
        vmid,
        node,
        is_template,
    } = vm;
    let mut problems: Vec<String> = Vec::new();
    let mut fixes: Vec<String> = Vec::new();
    if !is_template {
        problems.push("it is not a template".into());
        fixes.push(format!("convert it (qm template {vmid}) or fix the map"));
    }
    if config.agent_enabled() != Some(true) {
        problems.push("its QEMU guest agent option is off".into());
        fixes.push(format!(
            "qm set {vmid} --agent enabled=1 (Options → QEMU Guest Agent), with \
             qemu-guest-agent installed in the guest"
        ));
    }
    let bridge = net0_bridge(config);
    if config.get("net0").is_none() {
        problems.push("it has no net0".into());
        fixes.push(format!("qm set {vmid} --net0 virtio,bridge=vmbr0"));
    }
    if let Some(bridge) = &bridge {
        if !needs.bridges.contains(bridge) {
            needs.bridges.push(bridge.clone());
        }
    }
    let linked = match settings.clone.mode {
        Some(CloneMode::Full) => false,
        Some(CloneMode::Linked) => true,
        None => is_template,
    };
    let mut placed = Vec::new();
    for volume in volumes(config) {
        if linked && !needs.storages.contains(&volume.storage) {
            needs.storages.push(volume.storage.clone());
        }
        let kind = storages.get(&volume.storage);
        let format = volume.format.as_deref();
        let described = format!(
            "{} ({}{})",
            volume.storage,
            kind.map_or("type unknown", String::as_str),
            format.map_or_else(String::new, |f| format!(", {f}"))
        );
        if !placed.contains(&described) {
            placed.push(described.clone());
        }
        if !linked {
            continue;
        }
        match kind.map(|kind| can_link(kind, format)) {
            Some(Some(true)) => {}
            Some(Some(false)) => {
                problems.push(format!(
                    "disk {} is on storage {described}, which cannot make linked clones",
                    volume.key
                ));
                fixes.push(
                    "move the template's disks to LVM-thin, ZFS, Ceph RBD or qcow2 on \
                     directory/NFS storage, or set PROXMOX_CLONE=full (and PROXMOX_STORAGE)"
                        .into(),
                );
            }
            Some(None) | None => {
                problems.push(format!(
                    "cannot tell whether storage {described} of disk {} makes linked clones \
                     (not listed for the token on {node})",
                    volume.key
                ));
                fixes.push(format!(
                    "give the token Datastore.Audit on /storage/{}, or set PROXMOX_CLONE=full",
                    volume.storage
                ));
            }
        }
    }
    // Which SSH key its VMs take, as provisioning decides it from the clone's (inherited)
    // config; a job's own key aside.
    let nonce = settings.fleet_key.is_some().then_some("0");
    let key_path = match crate::vm::ssh_key::choose(settings, &label, config, nonce) {
        Ok((KeyPath::Derived { .. }, _)) => {
            needs.per_vm_keys = true;
            "; SSH: a per-VM key through cloud-init".to_string()
        }
        Ok((KeyPath::Static, Some(why))) => format!("; SSH: the static key ({why})"),
        // No fleet key: every template takes the static key, as before per-VM keys.
        Ok((KeyPath::Static, None)) => String::new(),
        Err(_) => {
            let why = crate::vm::ssh_key::cloud_init_accepts(config, &settings.ssh.user)
                .err()
                .unwrap_or_else(|| "no PROXMOX_FLEET_KEY".into());
            problems.push(format!(
                "its VMs would take the static SSH key ({why}), and VM_SSH_PRIVATE_KEY is not set"
            ));
            fixes.push(format!(
                "qm set {vmid} --ide2 <storage>:cloudinit --ciuser {} (with PROXMOX_FLEET_KEY \
                 set), or set VM_SSH_PRIVATE_KEY",
                settings.ssh.user
            ));
            String::new()
        }
    };
    fixes.dedup();
    if problems.is_empty() {
        Finding::pass(
            id,
            format!(
                "{label}: a template, guest agent on, net0 on {}, disks on {} for {} \
                 clones{key_path}",
                bridge.as_deref().unwrap_or("(no bridge)"),
                if placed.is_empty() {
                    "no storage".to_string()
                } else {
                    placed.join(", ")
                },
                if linked { "linked" } else { "full" }
            ),
        )
    } else {
        Finding::fail(
            id,
            format!("{label}: {}", problems.join("; ")),
            fixes.join("; "),
        )
    }
}

/// Without `PROXMOX_NODES`: each template's copy on `PROXMOX_NODE` (the first listed copy
/// there that exists, as prepare resolves it), the look-alikes beside it, and the per-template
/// checks on it.
pub async fn findings(
    api: &Api,
    settings: &Settings,
    vms: Option<&[ClusterVm]>,
) -> (TemplateNeeds, Vec<Finding>) {
    let mut out = Vec::new();
    let node = &settings.placement.node;
    let mut needs = TemplateNeeds::for_settings(settings);
    let storages = node_storages(api, node).await;
    for (name, listed) in &settings.placement.templates {
        let id = format!("template.{name}");
        // The copy listed for this node: pinned to it, or not pinned, in the order listed (as
        // prepare resolves it).
        let candidates = listed.candidates_on(node);
        if candidates.is_empty() {
            out.push(Finding::fail(
                id,
                format!(
                    "template {name}: PROXMOX_TEMPLATES lists {name}={listed}, no copy of it for \
                     node {node}"
                ),
                format!(
                    "list the template VM on {node} in PROXMOX_TEMPLATES ({name}=VMID@{node}|...), \
                     or set PROXMOX_NODE to a node with a copy"
                ),
            ));
            continue;
        }
        let mut chosen = None;
        let mut missing = Vec::new();
        for &vmid in &candidates {
            match api.client.vm_status(node, vmid).await {
                Ok(Some(status)) => {
                    chosen = Some((vmid, status));
                    break;
                }
                Ok(None) => missing.push(vmid),
                Err(err) => {
                    out.push(Finding::fail(
                        id.clone(),
                        format!("template {name} ({vmid}) on {node}: cannot read it: {err}"),
                        "the token's privileges on /vms/<vmid> (VM.Audit); see the privilege lines",
                    ));
                    missing.clear();
                    break;
                }
            }
        }
        let Some((vmid, status)) = chosen else {
            if let [vmid] = missing.as_slice() {
                let label = format!("template {name} ({vmid}) on {node}");
                out.push(Finding::fail(
                    id,
                    format!("{label}: PROXMOX_TEMPLATES maps {name} to VMID {vmid}, which does not exist on node {node}"),
                    "fix the map or PROXMOX_NODE, or create the template",
                ));
            } else if !missing.is_empty() {
                out.push(Finding::fail(
                    id,
                    format!(
                        "template {name}: PROXMOX_TEMPLATES lists {name}={listed}, and none of \
                         {} exists on node {node}",
                        missing
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "fix the map or PROXMOX_NODE, or create the template",
                ));
            }
            continue;
        };
        if vmid != listed.first().vmid {
            needs
                .copies
                .push((vmid, format!("cloning template {name} on {node}")));
        }
        let label = format!("template {name} ({vmid}) on {node}");
        if let Some(vms) = vms {
            // Without placement only this node's templates could be mistaken for ours.
            let here: Vec<ClusterVm> = vms.iter().filter(|vm| vm.node == *node).cloned().collect();
            let vm_name = here
                .iter()
                .find(|vm| vm.vmid == u64::from(vmid))
                .and_then(|vm| vm.name.clone());
            out.extend(look_alike_findings(
                name,
                vm_name.as_deref(),
                &[vmid],
                Some(listed),
                &here,
            ));
        }
        let config = match read_config(api, node, vmid, &id, &label).await {
            Ok(config) => config,
            Err(finding) => {
                out.push(finding);
                continue;
            }
        };
        let vm = TemplateVm {
            id,
            label,
            vmid,
            node,
            is_template: status.template,
        };
        out.push(template_vm_finding(
            settings, vm, &config, &storages, &mut needs,
        ));
    }
    (needs, out)
}

/// Advisory lines for the template VMs among `vms` named like template `name`'s copies
/// (`vm_name`, or `name` itself) that are not used for it (not in `used`) and not listed: another
/// user's template made to look like ours, or a copy of ours the admin forgot to list.
pub fn look_alike_findings(
    name: &str,
    vm_name: Option<&str>,
    used: &[u32],
    listed: Option<&crate::config::TemplateCopies>,
    vms: &[ClusterVm],
) -> Vec<Finding> {
    let names = [Some(name), vm_name];
    let mut findings = Vec::new();
    for vm in vms {
        let Ok(vmid) = u32::try_from(vm.vmid) else {
            continue;
        };
        let is_qemu_template = vm.template && vm.kind.as_deref().is_none_or(|kind| kind == "qemu");
        let Some(vm_name) = vm.name.as_deref() else {
            continue;
        };
        if !is_qemu_template
            || !names.contains(&Some(vm_name))
            || used.contains(&vmid)
            || listed.is_some_and(|listed| listed.lists(vmid))
        {
            continue;
        }
        findings.push(
            Finding::fail(
                format!("template.{name}.look_alike.{vmid}"),
                format!(
                    "template VM {vmid} on {} is named {vm_name} but is not a listed copy of \
                     {name}: not used (another user's?)",
                    vm.node
                ),
                match listed {
                    Some(listed) => format!(
                        "nothing, if it is not one of yours (anyone with VM.Allocate can make a \
                         template of any name); if it is a copy of {name}, list it: \
                         PROXMOX_TEMPLATES {name}={listed}|{vmid}@{}",
                        vm.node
                    ),
                    None => format!(
                        "nothing, if it is not one of yours; map {name} in PROXMOX_TEMPLATES by \
                         VMID to say which template VMs are its copies"
                    ),
                },
            )
            .advisory(),
        );
    }
    findings
}

/// A template VM's config, or the failed line saying why it could not be read.
pub async fn read_config(
    api: &Api,
    node: &str,
    vmid: u32,
    id: &str,
    label: &str,
) -> std::result::Result<VmConfig, Finding> {
    match api.client.vm_config(node, vmid).await {
        Ok(Some(config)) => Ok(config),
        Ok(None) => Err(Finding::fail(
            id,
            format!("{label}: it vanished while being checked"),
            "run check again",
        )),
        Err(err) => Err(Finding::fail(
            id,
            format!("{label}: cannot read its config: {err}"),
            "the token's privileges on /vms/<vmid> (VM.Audit); see the privilege lines",
        )),
    }
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
