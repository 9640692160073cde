//! Which template VM a requested name means on a node, checked against what the admin allows,
//! and how it may be cloned.

use crate::config::{AllowedTemplates, CloneMode, Settings};
use crate::error::{Error, Result};
use crate::proxmox::Client;

/// A template (or, with a full clone, any VM the admin mapped) on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub node: String,
    pub vmid: u32,
    /// `ubuntu-focal (60900)`.
    pub label: String,
    pub is_template: bool,
}

/// The template `wanted` names on `node`: a `PROXMOX_TEMPLATES` entry, or (when
/// `PROXMOX_ALLOWED_TEMPLATES` permits it) a template VM by VMID or name.
pub async fn resolve(
    client: &Client,
    settings: &Settings,
    node: &str,
    wanted: &str,
) -> Result<Template> {
    let wanted = wanted.trim();
    let not_allowed = |why: String| {
        Error::JobRequest(format!(
            "{why}; allowed templates: {}. Set PROXMOX_TEMPLATE to one of them",
            allowed_templates_text(settings, node)
        ))
    };
    let found = |vmid: u32, is_template: bool| Template {
        node: node.to_string(),
        vmid,
        label: format!("{wanted} ({vmid})"),
        is_template,
    };
    if let Some(listed) = settings.placement.templates.get(wanted) {
        // On one node, the copy listed for it: pinned there, or not pinned to any node (then
        // it is the one if it is there), in the order listed.
        let candidates = listed.candidates_on(node);
        if candidates.is_empty() {
            return Err(Error::Settings(format!(
                "PROXMOX_TEMPLATES lists {wanted}={listed}, no copy of it for node {node} \
                 (PROXMOX_NODE); list the template VM on {node}, or set PROXMOX_NODE to a node \
                 with a copy"
            )));
        }
        let mut problems = Vec::new();
        for vmid in candidates {
            let status = client.vm_status(node, vmid).await.map_err(|err| {
                Error::api(format!("reading template {wanted} (VMID {vmid})"), err)
            })?;
            match status {
                // Only real templates, as for any other path: a map entry that names a running
                // VM (another job's included) would hand a job a full clone of that VM's disks.
                Some(status) if status.template => return Ok(found(vmid, true)),
                Some(_) => problems.push((vmid, "is not a template")),
                None => problems.push((vmid, "does not exist")),
            }
        }
        return Err(Error::Settings(match problems.as_slice() {
            [(vmid, "is not a template")] if listed.list().len() == 1 => format!(
                "PROXMOX_TEMPLATES maps {wanted} to VMID {vmid}, which is not a template on \
                 node {node}; convert it (qm template {vmid}) or fix the map"
            ),
            [(vmid, _)] if listed.list().len() == 1 => format!(
                "PROXMOX_TEMPLATES maps {wanted} to VMID {vmid}, which does not exist on \
                 node {node}; fix the map or create the template"
            ),
            _ => format!(
                "PROXMOX_TEMPLATES lists {wanted}={listed}, and no copy of it is a template on \
                 node {node} ({}); fix the map or create the template",
                problems
                    .iter()
                    .map(|(vmid, why)| format!("{vmid} {why}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }));
    }
    let permitted = match &settings.placement.allowed_templates {
        AllowedTemplates::MapOnly => false,
        AllowedTemplates::AnyOnNode => true,
        AllowedTemplates::Listed(list) => list.iter().any(|item| item == wanted),
    };
    if !permitted || wanted.is_empty() {
        return Err(not_allowed(format!("template {wanted:?} is not allowed")));
    }
    let vmid = match wanted.parse::<u32>() {
        Ok(vmid) => vmid,
        Err(_) => {
            let vms = client
                .cluster_vms()
                .await
                .map_err(|err| Error::api("listing the cluster's VMs to find the template", err))?;
            // Container templates are listed too; only QEMU templates can be cloned here.
            let found = vms.iter().find(|vm| {
                vm.template
                    && vm.node == node
                    && vm.name.as_deref() == Some(wanted)
                    && vm.kind.as_deref().is_none_or(|kind| kind == "qemu")
            });
            match found.and_then(|vm| u32::try_from(vm.vmid).ok()) {
                Some(vmid) => vmid,
                None => {
                    return Err(not_allowed(format!(
                        "there is no template VM named {wanted:?} on node {node}"
                    )))
                }
            }
        }
    };
    let status = client
        .vm_status(node, vmid)
        .await
        .map_err(|err| Error::api(format!("reading template {wanted} (VMID {vmid})"), err))?;
    // Only real templates: a job must not clone an arbitrary VM (another job's included).
    match status {
        Some(status) if status.template => Ok(found(vmid, true)),
        _ => Err(not_allowed(format!(
            "VM {wanted} is not a template on node {node}"
        ))),
    }
}

/// `PROXMOX_CLONE`, or linked for a template and full for a plain VM.
pub fn clone_mode(settings: &Settings, template: &Template) -> Result<CloneMode> {
    match settings.clone.mode {
        Some(CloneMode::Linked) if !template.is_template => Err(Error::Settings(format!(
            "PROXMOX_CLONE=linked needs a template, and VM {} is not one; convert it to a \
             template or use PROXMOX_CLONE=full",
            template.label
        ))),
        Some(mode) => Ok(mode),
        None if template.is_template => Ok(CloneMode::Linked),
        None => Ok(CloneMode::Full),
    }
}

/// The names a job may ask for, for error messages.
fn allowed_templates_text(settings: &Settings, node: &str) -> String {
    let mut names: Vec<String> = settings.placement.templates.keys().cloned().collect();
    match &settings.placement.allowed_templates {
        AllowedTemplates::MapOnly => {}
        AllowedTemplates::Listed(list) => names.extend(list.iter().cloned()),
        AllowedTemplates::AnyOnNode => {
            names.push(format!("or any template VM on node {node} by VMID or name"))
        }
    }
    names.join(", ")
}
