//! With `PROXMOX_NODES`: the nodes placement may use, every template resolved on each of them
//! the way placement resolves it (which copy, and why it counts), the per-template checks on
//! each copy, and the risks of copies found by VM name on a shared cluster.

use std::collections::BTreeMap;

use crate::check::api::Api;
use crate::check::templates::{
    look_alike_findings, node_storage_list, read_config, template_vm_finding, TemplateNeeds,
    TemplateVm,
};
use crate::check::{nodes, Finding};
use crate::config::{AllowedTemplates, Settings};
use crate::error::Error;
use crate::proxmox::types::{ClusterNode, ClusterVm};
use crate::proxmox::ApiError;
use crate::vm::placement::{self, Found};

/// The node and template findings, from one read of the cluster's nodes and one of its VMs
/// (which the VMID-range check reuses).
pub async fn findings(
    api: &Api,
    settings: &Settings,
    cluster: Result<Vec<ClusterNode>, ApiError>,
    vms: &Result<Vec<ClusterVm>, ApiError>,
) -> (TemplateNeeds, Vec<Finding>) {
    let mut out = Vec::new();
    let cluster = match cluster {
        Ok(cluster) => cluster,
        Err(err) => {
            out.push(Finding::fail(
                "nodes",
                format!("nodes: cannot list the cluster's nodes: {err}"),
                "the message names it",
            ));
            out.push(Finding::skip(
                "templates",
                "templates: skipped (needs the node list)",
            ));
            return (TemplateNeeds::for_settings(settings), out);
        }
    };
    let survey = nodes::survey(&settings.placement.nodes, &cluster);
    out.extend(survey.findings.iter().cloned());
    let needs = match vms {
        Ok(vms) => node_template_findings(api, settings, &survey.members, vms, &mut out).await,
        Err(err) => {
            out.push(Finding::fail(
                "templates",
                format!("templates: cannot list the cluster's VMs to find each node's copy: {err}"),
                "the token's VM.Audit (see the privilege lines)",
            ));
            TemplateNeeds::for_settings(settings)
        }
    };
    (needs, out)
}

/// `61950@pve3|60900@pve1`: an entry value listing these copies, for fixes to copy from.
fn listing(copies: &BTreeMap<String, (u32, Option<u64>)>) -> String {
    copies
        .iter()
        .map(|(node, (vmid, _))| format!("{vmid}@{node}"))
        .collect::<Vec<_>>()
        .join("|")
}

/// The template names a job may get without asking: the map's, and the default when it is not
/// in the map (only possible with `PROXMOX_ALLOWED_TEMPLATES`; without it, the settings line
/// already failed).
fn template_names(settings: &Settings) -> Vec<String> {
    let mut names: Vec<String> = settings.placement.templates.keys().cloned().collect();
    let default = settings.template.trim();
    if !default.is_empty()
        && !settings.placement.templates.contains_key(default)
        && settings.placement.allowed_templates != AllowedTemplates::MapOnly
    {
        names.push(default.to_string());
    }
    names
}

/// With `PROXMOX_NODES`: the template VMs template `name` will be cloned from (node, VMID, and
/// why each counts), the listed copies left out (each a ✘: the map is wrong, or someone else's
/// VM took a listed VMID), the same-name templates it will not use, and the risk of copies
/// found by VM name on a shared cluster.
fn copies_findings(
    settings: &Settings,
    name: &str,
    resolved: &placement::Resolved,
    members: &[nodes::Member],
    vms: &[ClusterVm],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let listed = settings.placement.templates.get(name);
    let mut by_name: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
    let used: Vec<String> = resolved
        .by_node
        .iter()
        .map(|(node, &(vmid, memory))| {
            let how = match (resolved.found, listed) {
                (_, Some(listed)) if listed.lists(vmid) => "listed",
                (Found::ListedAndByName, _) => {
                    by_name.insert(node.clone(), (vmid, memory));
                    "same VM name, PROXMOX_TEMPLATE_COPIES=by-name"
                }
                (Found::ByName, _) => "by VM name, PROXMOX_ALLOWED_TEMPLATES",
                _ => "by VMID, PROXMOX_ALLOWED_TEMPLATES",
            };
            format!("{vmid} on {node} ({how})")
        })
        .collect();
    out.push(Finding::pass(
        format!("template.{name}.copies"),
        format!("template {name}: clones are made from {}", used.join(", ")),
    ));
    for why in &resolved.refused {
        out.push(Finding::fail(
            format!("template.{name}.copies"),
            format!("template {name}: {why}"),
            "fix PROXMOX_TEMPLATES: list each copy as VMID@node where it is; if nobody of yours \
             moved or made that VM, find out who did (its clone or create task names the user)",
        ));
    }
    let vm_name = resolved.vm_name.as_deref().unwrap_or(name);
    if !by_name.is_empty() {
        let which: Vec<String> = by_name
            .iter()
            .map(|(node, (vmid, _))| format!("{vmid} on {node}"))
            .collect();
        out.push(
            Finding::fail(
                format!("template.{name}.by_name"),
                format!(
                    "template {name}: {} used only because named {vm_name} \
                     (PROXMOX_TEMPLATE_COPIES=by-name): on a cluster shared with other users, \
                     anyone with VM.Allocate can make a template of that name on a node without \
                     a listed copy and get jobs cloned from it",
                    which.join(", ")
                ),
                format!(
                    "list the copies instead: PROXMOX_TEMPLATES {name}={}, and set \
                     PROXMOX_TEMPLATE_COPIES=listed",
                    listing(&resolved.by_node)
                ),
            )
            .advisory(),
        );
    }
    if resolved.found == Found::ByName {
        out.push(
            Finding::fail(
                format!("template.{name}.by_name"),
                format!(
                    "template {name} is found by VM name (PROXMOX_ALLOWED_TEMPLATES), not by \
                     VMID: every template VM named {name} counts, on a cluster shared with other \
                     users anyone's"
                ),
                format!(
                    "map it by VMID: PROXMOX_TEMPLATES {name}={}",
                    listing(&resolved.by_node)
                ),
            )
            .advisory(),
        );
    }
    // Only templates on the nodes placement may use could be taken for ours.
    let in_scope: Vec<ClusterVm> = vms
        .iter()
        .filter(|vm| members.iter().any(|member| member.name == vm.node))
        .cloned()
        .collect();
    let used: Vec<u32> = resolved.by_node.values().map(|(vmid, _)| *vmid).collect();
    out.extend(look_alike_findings(
        name,
        Some(vm_name),
        &used,
        listed,
        &in_scope,
    ));
    out
}

/// With `PROXMOX_NODES`: every template resolved on every online member the way placement
/// resolves it (its same-name copy there), and the per-template checks run on each copy.
async fn node_template_findings(
    api: &Api,
    settings: &Settings,
    members: &[nodes::Member],
    vms: &[ClusterVm],
    out: &mut Vec<Finding>,
) -> TemplateNeeds {
    let mut needs = TemplateNeeds::for_settings(settings);
    let mut storages: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut shared_storages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mapped: Vec<u32> = settings
        .placement
        .templates
        .values()
        .map(|listed| listed.first().vmid)
        .collect();
    for name in template_names(settings) {
        let resolved = match placement::template_copies(settings, &name, vms) {
            Ok(resolved) => resolved,
            Err(err) => {
                let why = match err {
                    Error::Settings(why) | Error::JobRequest(why) => why,
                    other => other.to_string(),
                };
                out.push(Finding::fail(
                    format!("template.{name}"),
                    format!("template {name}: {why}"),
                    "fix PROXMOX_TEMPLATES or PROXMOX_TEMPLATE, or create the template (and list \
                     the VMID of its copy on each node of PROXMOX_NODES: name=VMID@node|...)",
                ));
                continue;
            }
        };
        out.extend(copies_findings(settings, &name, &resolved, members, vms));
        let copies = &resolved.by_node;
        let served: Vec<&str> = members
            .iter()
            .filter(|member| member.online && copies.contains_key(&member.name))
            .map(|member| member.name.as_str())
            .collect();
        if served.is_empty() {
            let elsewhere = copies
                .iter()
                .map(|(node, (vmid, _))| format!("{vmid} on {node}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(Finding::fail(
                format!("template.{name}"),
                format!(
                    "template {name}: no online node of PROXMOX_NODES holds a copy of it, so its \
                     jobs cannot run (copies: {})",
                    if elsewhere.is_empty() {
                        "none"
                    } else {
                        &elsewhere
                    }
                ),
                "give an online node of PROXMOX_NODES a copy of the template and list its VMID in \
                 PROXMOX_TEMPLATES (name=VMID@node|...), or add a node that holds a listed copy \
                 to PROXMOX_NODES",
            ));
            continue;
        }
        let vm_name = resolved.vm_name.clone().unwrap_or_else(|| name.clone());
        // Offline members are skipped: their line already warns, and PVE cannot read a VM
        // config on a node that is down.
        let mut without_copy = Vec::new();
        // A copy with every drive on shared storage, which placement clones to the nodes
        // without one (with `target`).
        let mut shared_copy: Option<(u32, &str)> = None;
        for member in members.iter().filter(|member| member.online) {
            let node = member.name.as_str();
            let Some(&(vmid, _)) = copies.get(node) else {
                without_copy.push(node);
                continue;
            };
            if !mapped.contains(&vmid) && !needs.copies.iter().any(|(id, _)| *id == vmid) {
                needs
                    .copies
                    .push((vmid, format!("cloning template {name} on {node}")));
            }
            let id = format!("template.{name}.{node}");
            let label = format!("template {name} ({vmid}) on {node}");
            let config = match read_config(api, node, vmid, &id, &label).await {
                Ok(config) => config,
                Err(finding) => {
                    out.push(finding);
                    continue;
                }
            };
            if !storages.contains_key(node) {
                let list = node_storage_list(api, node).await;
                shared_storages.insert(
                    node.to_string(),
                    list.iter()
                        .filter(|storage| storage.shared)
                        .map(|storage| storage.storage.clone())
                        .collect(),
                );
                storages.insert(
                    node.to_string(),
                    list.into_iter()
                        .map(|storage| (storage.storage, storage.kind))
                        .collect(),
                );
            }
            let drives = config.drive_storages();
            let shared_here = shared_storages.get(node);
            if shared_copy.is_none()
                && !drives.is_empty()
                && drives
                    .iter()
                    .all(|drive| shared_here.is_some_and(|shared| shared.contains(drive)))
            {
                shared_copy = Some((vmid, node));
            }
            let vm = TemplateVm {
                id,
                label,
                vmid,
                node,
                // Copies are found among the cluster's templates only.
                is_template: true,
            };
            out.push(template_vm_finding(
                settings,
                vm,
                &config,
                storages.get(node).unwrap_or(&BTreeMap::new()),
                &mut needs,
            ));
        }
        for node in without_copy {
            match shared_copy {
                Some((vmid, source)) => out.push(Finding::pass(
                    format!("template.{name}.{node}"),
                    format!(
                        "{node}: no copy of {name}; its jobs get clones of {vmid} on {source} \
                         (every drive on shared storage), made with target"
                    ),
                )),
                None => out.push(nodes::missing_copy(&name, &vm_name, node, &served)),
            }
        }
    }
    needs
}
