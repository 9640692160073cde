//! Which node of the cluster a job's VM goes to (`PROXMOX_NODES`), and which template VM on
//! that node the job's template name means.
//!
//! Two requests per placement: `/cluster/resources?type=node` (status and memory of every node)
//! and `?type=vm` (the templates on each node, and our own VMs). A node is a candidate when it
//! is in `PROXMOX_NODES` (or any node for `*`), online, not skipped by the caller, holds a copy
//! of the template, has fewer than `PROXMOX_NODE_MAX_VMS` of our VMs and keeps
//! `PROXMOX_NODE_MEMORY_RESERVE_MB` free after the job's VM. Of the candidates, the one with
//! the most free memory wins, counting our VMs that do not use their memory yet (clones in
//! flight, booting or stopped VMs) as if they did; near-ties (within [`TIE_MARGIN`]) are broken
//! at random, so that many runner hosts that read the same figures do not all pick one node.
//!
//! Templates per node: clusters with local storage keep a copy of each template on every node.
//! A `PROXMOX_TEMPLATES` entry lists its copies by VMID (`ubuntu-focal=60900|61900@pve2`), and
//! only those are cloned: other users of the cluster can make templates with any name, so a
//! VM name proves nothing (see `template_copies`). A node without a listed copy gets no job
//! of that name, unless `PROXMOX_TEMPLATE_COPIES=by-name` lets a template VM of the same name
//! stand in there. A node without a copy can still take the job when
//! one copy has every drive on shared storage: that copy is cloned there with `target` (PVE
//! refuses it otherwise: "can't clone VM to node 'X' (VM uses local storage)"). Finding out
//! costs two more requests (the copy's config and `?type=storage`), made only when an
//! eligible node lacks a copy.
//!
//! With `PROXMOX_NODES` unset there is no placement: the template resolves on `PROXMOX_NODE`
//! as before, with no extra request.

use std::collections::{BTreeMap, HashSet};

use super::template::{self, Template};
use crate::config::{AllowedTemplates, CopyDiscovery, NodeSet, Settings};
use crate::error::{Error, Result};
use crate::proxmox::types::{ClusterNode, ClusterStorage, ClusterVm};
use crate::proxmox::Client;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Nodes whose free memory differs by less than this count as equally good.
pub const TIE_MARGIN: u64 = GIB;
/// What a job VM is taken to need when neither `VM_MEMORY_MB` nor the template says.
const DEFAULT_VM_MEMORY: u64 = 2 * GIB;

/// Where the job's VM goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The template VM to clone (on its own node).
    pub template: Template,
    /// The node the VM goes to: the template's, or another one for a shared-storage template
    /// (the clone then carries `target`).
    pub node: String,
    /// Why this node, for the job log ("placed on pve2: 41 GiB free, 3 job VMs"); `None`
    /// without placement.
    pub reason: Option<String>,
    /// Every copy of the template name, from the same reads: where a warm VM to claim can be.
    pub copies: Copies,
}

/// One node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub online: bool,
    /// Free memory after counting our VMs that do not use theirs yet.
    pub free: u64,
    /// Our VMs on the node (in flight included).
    pub job_vms: u32,
    /// The template VM this node's VM would be cloned from: its own copy, or a copy on shared
    /// storage elsewhere; `None`: the node cannot take the job.
    pub source: Option<Source>,
}

/// A template VM of the job's template name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub node: String,
    pub vmid: u32,
    /// Its configured memory (what its clones get).
    pub memory: Option<u64>,
}

/// The limits a candidate must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_job_vms: Option<u32>,
    pub reserve: u64,
    /// `VM_MEMORY_MB` in bytes, if set.
    pub vm_memory: Option<u64>,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> Limits {
        Limits {
            max_job_vms: settings.placement.max_vms_per_node,
            reserve: settings.placement.node_memory_reserve_mb * MIB,
            vm_memory: settings.clone.memory_mb.map(|mb| u64::from(mb) * MIB),
        }
    }
}

/// Picks a node of `nodes` (see the module text); `pick` chooses among near-ties (an index below
/// its argument). `Err` says why no node qualified, node by node.
pub fn choose(
    nodes: &[NodeView],
    limits: Limits,
    pick: impl FnOnce(usize) -> usize,
) -> std::result::Result<&NodeView, String> {
    let mut refusals = Vec::new();
    let mut candidates = Vec::new();
    for node in nodes {
        let need = limits
            .vm_memory
            .or(node.source.as_ref().and_then(|source| source.memory))
            .unwrap_or(DEFAULT_VM_MEMORY);
        let refusal = if !node.online {
            Some("offline".to_string())
        } else if node.source.is_none() {
            Some("has no copy of the template (and no copy is on shared storage)".to_string())
        } else if limits.max_job_vms.is_some_and(|max| node.job_vms >= max) {
            Some(format!(
                "{} job VMs already (PROXMOX_NODE_MAX_VMS)",
                node.job_vms
            ))
        } else if node.free < need.saturating_add(limits.reserve) {
            Some(format!(
                "{} free, the VM needs {} and {} stay free (PROXMOX_NODE_MEMORY_RESERVE_MB)",
                gib(node.free),
                gib(need),
                gib(limits.reserve)
            ))
        } else {
            None
        };
        match refusal {
            Some(why) => refusals.push(format!("{}: {why}", node.name)),
            None => candidates.push(node),
        }
    }
    let Some(best) = candidates.iter().map(|node| node.free).max() else {
        return Err(if refusals.is_empty() {
            "no node to choose from".to_string()
        } else {
            refusals.join("; ")
        });
    };
    let ties: Vec<&NodeView> = candidates
        .into_iter()
        .filter(|node| node.free + TIE_MARGIN > best)
        .collect();
    let index = pick(ties.len()).min(ties.len() - 1);
    Ok(ties[index])
}

fn gib(bytes: u64) -> String {
    format!("{} GiB", bytes / GIB)
}

/// How VMs are placed: the one decision between a single node and the cluster, which every
/// caller asks here instead of reading `PROXMOX_NODES` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy<'a> {
    /// `PROXMOX_NODE` only: no placement, no extra API request; the template resolves there.
    One { node: &'a str },
    /// `PROXMOX_NODES`: the online nodes it allows, by free memory and the per-node limits.
    Cluster { nodes: &'a NodeSet },
}

impl<'a> Strategy<'a> {
    pub fn of(settings: &'a Settings) -> Strategy<'a> {
        match &settings.placement.nodes {
            NodeSet::One => Strategy::One {
                node: &settings.placement.node,
            },
            nodes => Strategy::Cluster { nodes },
        }
    }

    /// Whether a node that fails under a VM may be left for another one (and so is not waited
    /// for): only when there are others.
    pub fn may_fail_over(&self) -> bool {
        matches!(self, Strategy::Cluster { .. })
    }

    /// The template for the job and the node for its VM, skipping the nodes in `avoid` (where
    /// an earlier attempt failed).
    pub async fn place(
        &self,
        client: &Client,
        settings: &Settings,
        wanted: &str,
        avoid: &HashSet<String>,
    ) -> Result<Placed> {
        match self {
            Strategy::One { node } => {
                let template = template::resolve(client, settings, node, wanted).await?;
                Ok(Placed {
                    node: template.node.clone(),
                    copies: Copies::only(&template),
                    template,
                    reason: None,
                })
            }
            Strategy::Cluster { .. } => place_on_cluster(client, settings, wanted, avoid).await,
        }
    }

    /// Every copy of the template `wanted` names on the nodes placement may use, online or
    /// not: the warm pool counts and claims the warm VMs of one template name on all of them.
    /// On one node, the template there.
    pub async fn copies(
        &self,
        client: &Client,
        settings: &Settings,
        wanted: &str,
    ) -> Result<Copies> {
        match self {
            Strategy::One { node } => {
                let template = template::resolve(client, settings, node, wanted).await?;
                Ok(Copies::only(&template))
            }
            Strategy::Cluster { .. } => copies_on_cluster(client, settings, wanted).await,
        }
    }
}

async fn place_on_cluster(
    client: &Client,
    settings: &Settings,
    wanted: &str,
    avoid: &HashSet<String>,
) -> Result<Placed> {
    let wanted = wanted.trim();
    let nodes = client
        .cluster_nodes()
        .await
        .map_err(|err| Error::api("listing the cluster's nodes to place the VM", err))?;
    let vms = client
        .cluster_vms()
        .await
        .map_err(|err| Error::api("listing the cluster's VMs to place the VM", err))?;
    let resolved = template_copies(settings, wanted, &vms)?;
    let copies = &resolved.by_node;
    let eligible: Vec<&ClusterNode> = nodes
        .iter()
        .filter(|node| settings.placement.nodes.allows(&node.node) && !avoid.contains(&node.node))
        .filter(|node| node.is_online())
        .collect();
    // A shared-storage copy may sit on any node that answers, listed or not: the clone runs
    // there and the VM goes to the chosen node.
    let answering: Vec<&ClusterNode> = nodes
        .iter()
        .filter(|node| node.is_online() && !avoid.contains(&node.node))
        .collect();
    let shared = if eligible.iter().any(|node| !copies.contains_key(&node.node)) {
        shared_copy(client, copies, &answering).await?
    } else {
        None
    };
    let views = node_views(settings, &nodes, &vms, copies, shared.as_ref(), avoid);
    let limits = Limits::from_settings(settings);
    let chosen =
        choose(&views, limits, |ties| rand::random_range(0..ties.max(1))).map_err(|why| {
            Error::Infrastructure(format!(
                "no node can take the job's VM (template {wanted}): {why}. Check the nodes' \
                 status, PROXMOX_NODES and the per-node limits"
            ))
        })?;
    let source = chosen.source.clone().ok_or_else(|| {
        Error::Infrastructure(format!("node {} has no template to clone", chosen.name))
    })?;
    let mut reason = format!(
        "placed on {}: {} free, {} job VMs",
        chosen.name,
        gib(chosen.free),
        chosen.job_vms
    );
    if source.node != chosen.name {
        reason.push_str(&format!(
            " (template {} on {} is on shared storage: cloned there with target)",
            source.vmid, source.node
        ));
    }
    // A listed copy left out is the admin's to fix (or another user's doing): say so in every
    // job log until it is.
    for why in &resolved.refused {
        reason.push_str(&format!("; PROXMOX_TEMPLATES: {why}"));
    }
    Ok(Placed {
        template: Template {
            node: source.node.clone(),
            vmid: source.vmid,
            label: format!("{wanted} ({})", source.vmid),
            is_template: true,
        },
        node: chosen.name.clone(),
        reason: Some(reason),
        copies: copies_on_nodes(settings, wanted, &nodes, &vms, copies),
    })
}

/// A copy of the template, on one of the `answering` nodes, whose every drive sits on storage
/// PVE marks as shared, so that it can be cloned to any node.
async fn shared_copy(
    client: &Client,
    copies: &BTreeMap<String, (u32, Option<u64>)>,
    answering: &[&ClusterNode],
) -> Result<Option<Source>> {
    let online = |node: &str| answering.iter().any(|answering| answering.node == node);
    let mut storages: Option<Vec<ClusterStorage>> = None;
    for (node, &(vmid, memory)) in copies.iter().filter(|(node, _)| online(node)) {
        let config = client
            .vm_config(node, vmid)
            .await
            .map_err(|err| Error::api(format!("reading template {vmid} on node {node}"), err))?;
        let Some(config) = config else {
            continue;
        };
        let drives = config.drive_storages();
        if drives.is_empty() {
            continue;
        }
        if storages.is_none() {
            storages = Some(client.cluster_storages().await.map_err(|err| {
                Error::api("listing the cluster's storages to place the VM", err)
            })?);
        }
        let known = storages.as_deref().unwrap_or_default();
        let shared = drives.iter().all(|drive| {
            known
                .iter()
                .any(|storage| storage.node == *node && storage.storage == *drive && storage.shared)
        });
        if shared {
            return Ok(Some(Source {
                node: node.clone(),
                vmid,
                memory,
            }));
        }
    }
    Ok(None)
}

/// How a template name's copies were found: what `check` reports, and how much another user of
/// the cluster can slip in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The VMIDs its `PROXMOX_TEMPLATES` entry lists, nothing else.
    Listed,
    /// The listed VMIDs, and on nodes without one a template VM of the same name
    /// (`PROXMOX_TEMPLATE_COPIES=by-name`).
    ListedAndByName,
    /// Not in the map, allowed by `PROXMOX_ALLOWED_TEMPLATES` as a VM name: every template VM of
    /// that name, whoever made it.
    ByName,
    /// Not in the map, allowed by `PROXMOX_ALLOWED_TEMPLATES` as a VMID: that VM only.
    ByVmid,
}

/// The template VMs a job's template name means, at most one per node, from one listing of the
/// cluster's VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Node → (VMID, configured memory) of the copy there.
    pub by_node: BTreeMap<String, (u32, Option<u64>)>,
    pub found: Found,
    /// Listed copies that are not used, each with why (for the job log and `check`).
    pub refused: Vec<String>,
    /// The VM name the copies go by: the first usable listed copy's, or the name asked for.
    pub vm_name: Option<String>,
}

fn is_qemu_template(vm: &ClusterVm) -> bool {
    vm.template && vm.kind.as_deref().is_none_or(|kind| kind == "qemu")
}

/// The template VMs the job's template name means (see [`Resolved`]):
/// - a `PROXMOX_TEMPLATES` name: exactly the copies its entry lists (a copy pinned with
///   `VMID@node` only on that node), plus, with `PROXMOX_TEMPLATE_COPIES=by-name`, on each node
///   without a listed copy the template VM named like the first listed copy (lowest VMID first);
/// - a name `PROXMOX_ALLOWED_TEMPLATES` allows: that VMID, or every template VM of that name.
pub(crate) fn template_copies(
    settings: &Settings,
    wanted: &str,
    vms: &[ClusterVm],
) -> Result<Resolved> {
    let mut templates: Vec<&ClusterVm> = vms.iter().filter(|vm| is_qemu_template(vm)).collect();
    templates.sort_by_key(|vm| vm.vmid);
    let entry = |vm: &ClusterVm| {
        u32::try_from(vm.vmid)
            .ok()
            .map(|vmid| (vm.node.clone(), (vmid, vm.maxmem)))
    };
    if let Some(listed) = settings.placement.templates.get(wanted) {
        let mut by_node: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
        let mut refused = Vec::new();
        let mut vm_name: Option<String> = None;
        for copy in listed.list() {
            let vmid = copy.vmid;
            let Some(vm) = vms.iter().find(|vm| vm.vmid == u64::from(vmid)) else {
                refused.push(format!("VMID {vmid} does not exist"));
                continue;
            };
            let named = vm.name.as_deref().unwrap_or("unnamed");
            if !is_qemu_template(vm) {
                refused.push(format!(
                    "VM {vmid} ({named} on {}) is not a template",
                    vm.node
                ));
            } else if let Some(pinned) = copy.node.as_deref().filter(|node| *node != vm.node) {
                // VMIDs are not reserved: this may be our template moved, or another user's
                // VM made with the VMID of one we deleted.
                refused.push(format!(
                    "template VM {vmid} ({named}) is on {}, not on {pinned} as {wanted}={listed} \
                     says: not used (migrated, or another user's VM with that VMID?)",
                    vm.node
                ));
            } else if let Some((first, _)) = by_node.get(&vm.node) {
                refused.push(format!(
                    "template VM {vmid} is on {} like {first}, listed before it: {first} is used there",
                    vm.node
                ));
            } else {
                by_node.extend(entry(vm));
                if vm_name.is_none() {
                    vm_name = vm.name.clone();
                }
            }
        }
        if by_node.is_empty() {
            return Err(Error::Settings(match listed.list() {
                [only] if only.node.is_none() => format!(
                    "PROXMOX_TEMPLATES maps {wanted} to VMID {}, which is not a template \
                     anywhere in the cluster; fix the map or create the template",
                    only.vmid
                ),
                _ => format!(
                    "PROXMOX_TEMPLATES lists {wanted}={listed}, and none of it is a template the \
                     driver may use: {}; fix the map or create the templates",
                    refused.join("; ")
                ),
            }));
        }
        let found = if settings.placement.template_copies == CopyDiscovery::ByName {
            // The nodes without a listed copy take a template VM of the same name.
            if let Some(name) = vm_name.as_deref() {
                for vm in templates
                    .iter()
                    .filter(|vm| vm.name.as_deref() == Some(name))
                {
                    if !by_node.contains_key(&vm.node) {
                        by_node.extend(entry(vm));
                    }
                }
            }
            Found::ListedAndByName
        } else {
            Found::Listed
        };
        return Ok(Resolved {
            by_node,
            found,
            refused,
            vm_name,
        });
    }
    let permitted = match &settings.placement.allowed_templates {
        AllowedTemplates::MapOnly => false,
        AllowedTemplates::AnyOnNode => true,
        AllowedTemplates::Listed(list) => list.iter().any(|item| item == wanted),
    };
    if !permitted || wanted.is_empty() {
        let names: Vec<&str> = settings
            .placement
            .templates
            .keys()
            .map(String::as_str)
            .collect();
        return Err(Error::JobRequest(format!(
            "template {wanted:?} is not allowed; allowed templates: {}. Set PROXMOX_TEMPLATE to \
             one of them",
            names.join(", ")
        )));
    }
    let by_vmid = wanted.parse::<u64>().ok();
    let mut by_node: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
    for vm in templates.iter().filter(|vm| match by_vmid {
        Some(vmid) => vm.vmid == vmid,
        None => vm.name.as_deref() == Some(wanted),
    }) {
        if let Some((node, copy)) = entry(vm) {
            by_node.entry(node).or_insert(copy);
        }
    }
    if by_node.is_empty() {
        return Err(Error::JobRequest(format!(
            "there is no template VM {wanted:?} on any node of the cluster"
        )));
    }
    Ok(Resolved {
        by_node,
        found: if by_vmid.is_some() {
            Found::ByVmid
        } else {
            Found::ByName
        },
        refused: Vec::new(),
        vm_name: by_vmid.is_none().then(|| wanted.to_string()),
    })
}

fn node_views(
    settings: &Settings,
    nodes: &[ClusterNode],
    vms: &[ClusterVm],
    copies: &BTreeMap<String, (u32, Option<u64>)>,
    shared: Option<&Source>,
    avoid: &HashSet<String>,
) -> Vec<NodeView> {
    // A clone in flight does not carry our tag yet, only its lock.
    let ours: Vec<&ClusterVm> = vms
        .iter()
        .filter(|vm| super::ownership::occupies_our_range(vm, settings.vmid_range))
        .collect();
    let vm_memory = settings.clone.memory_mb.map(|mb| u64::from(mb) * MIB);
    nodes
        .iter()
        .filter(|node| settings.placement.nodes.allows(&node.node))
        .filter(|node| !avoid.contains(&node.node))
        .map(|node| {
            let here: Vec<&&ClusterVm> = ours.iter().filter(|vm| vm.node == node.node).collect();
            // A running VM's use is in the node's `mem`; the others will use theirs soon.
            let pending: u64 = here
                .iter()
                .filter(|vm| vm.status.as_deref() != Some("running"))
                .map(|vm| vm.maxmem.or(vm_memory).unwrap_or(DEFAULT_VM_MEMORY))
                .sum();
            let max = node.maxmem.unwrap_or(0);
            let used = node.mem.unwrap_or(max);
            let source = match copies.get(&node.node) {
                Some(&(vmid, memory)) => Some(Source {
                    node: node.node.clone(),
                    vmid,
                    memory,
                }),
                None => shared.cloned(),
            };
            NodeView {
                name: node.node.clone(),
                online: node.is_online() && node.mem.is_some(),
                free: max.saturating_sub(used).saturating_sub(pending),
                job_vms: here.len() as u32,
                source,
            }
        })
        .collect()
}

/// A copy of a template name's template, on one of the nodes placement may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCopy {
    pub template: Template,
    pub online: bool,
}

/// The copies of a template name, and the nodes their clones may be on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copies {
    pub list: Vec<NodeCopy>,
    /// The online nodes placement may use (`None` without `PROXMOX_NODES`): where VMs cloned
    /// from these copies can be, clones of a shared-storage copy on nodes without one included.
    pub online_nodes: Option<std::collections::BTreeSet<String>>,
}

async fn copies_on_cluster(client: &Client, settings: &Settings, wanted: &str) -> Result<Copies> {
    let wanted = wanted.trim();
    let nodes = client
        .cluster_nodes()
        .await
        .map_err(|err| Error::api("listing the cluster's nodes", err))?;
    let vms = client.cluster_vms().await.map_err(|err| {
        Error::api(
            "listing the cluster's VMs to find the template's copies",
            err,
        )
    })?;
    let resolved = template_copies(settings, wanted, &vms)?;
    Ok(copies_on_nodes(
        settings,
        wanted,
        &nodes,
        &vms,
        &resolved.by_node,
    ))
}

impl Copies {
    /// The one template without placement (`PROXMOX_NODE` alone).
    fn only(template: &Template) -> Copies {
        Copies {
            list: vec![NodeCopy {
                template: template.clone(),
                online: true,
            }],
            online_nodes: None,
        }
    }
}

/// The copies on the nodes placement may use, and which of those nodes are online.
fn copies_on_nodes(
    settings: &Settings,
    wanted: &str,
    nodes: &[ClusterNode],
    vms: &[ClusterVm],
    copies: &BTreeMap<String, (u32, Option<u64>)>,
) -> Copies {
    // Only the copies themselves: a shared-storage copy's clones on other nodes are counted
    // by the template VMID their warm marker names.
    let views = node_views(settings, nodes, vms, copies, None, &HashSet::new());
    let online_nodes = views
        .iter()
        .filter(|view| view.online)
        .map(|view| view.name.clone())
        .collect();
    let list = views
        .into_iter()
        .filter_map(|view| {
            let vmid = view.source?.vmid;
            Some(NodeCopy {
                template: Template {
                    node: view.name,
                    vmid,
                    label: format!("{wanted} ({vmid})"),
                    is_template: true,
                },
                online: view.online,
            })
        })
        .collect();
    Copies {
        list,
        online_nodes: Some(online_nodes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Settings with placement on every node and `extra` on top.
    fn settings(extra: &[(&str, &str)]) -> Settings {
        let mut all = vec![("PROXMOX_NODE", ""), ("PROXMOX_NODES", "*")];
        all.extend_from_slice(extra);
        crate::config::test_settings(&all)
    }

    fn template_vm(vmid: u64, node: &str, name: &str) -> ClusterVm {
        ClusterVm {
            vmid,
            node: node.into(),
            name: Some(name.into()),
            status: Some("stopped".into()),
            template: true,
            tags: None,
            lock: None,
            kind: Some("qemu".into()),
            maxmem: Some(2 * GIB),
        }
    }

    fn nodes_of(resolved: &Resolved) -> Vec<(&str, u32)> {
        resolved
            .by_node
            .iter()
            .map(|(node, (vmid, _))| (node.as_str(), *vmid))
            .collect()
    }

    /// Ours on pve1 and pve2; another user's look-alike on pve3, where we have no copy.
    fn cluster_with_a_look_alike() -> Vec<ClusterVm> {
        vec![
            template_vm(60900, "pve1", "ubuntu-focal"),
            template_vm(61900, "pve2", "ubuntu-focal"),
            template_vm(61950, "pve3", "ubuntu-focal"),
        ]
    }

    #[test]
    fn only_the_listed_vmids_are_copies_unless_by_name_is_chosen() {
        let vms = cluster_with_a_look_alike();
        let single = settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=60900")]);
        let resolved = template_copies(&single, "ubuntu-focal", &vms).unwrap();
        assert_eq!(nodes_of(&resolved), [("pve1", 60900)]);
        assert_eq!(resolved.found, Found::Listed);

        let listed = settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=60900|61900@pve2")]);
        let resolved = template_copies(&listed, "ubuntu-focal", &vms).unwrap();
        assert_eq!(nodes_of(&resolved), [("pve1", 60900), ("pve2", 61900)]);
        assert!(resolved.refused.is_empty(), "{:?}", resolved.refused);

        let by_name = settings(&[
            ("PROXMOX_TEMPLATES", "ubuntu-focal=60900"),
            ("PROXMOX_TEMPLATE_COPIES", "by-name"),
        ]);
        let resolved = template_copies(&by_name, "ubuntu-focal", &vms).unwrap();
        assert_eq!(
            nodes_of(&resolved),
            [("pve1", 60900), ("pve2", 61900), ("pve3", 61950)]
        );
        assert_eq!(resolved.found, Found::ListedAndByName);
    }

    #[test]
    fn a_listed_copy_on_another_node_than_stated_is_not_used() {
        // 61900 was ours on pve2; now a VM with that VMID is a template on pve3.
        let vms = vec![
            template_vm(60900, "pve1", "ubuntu-focal"),
            template_vm(61900, "pve3", "ubuntu-focal"),
        ];
        let listed = settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=60900|61900@pve2")]);
        let resolved = template_copies(&listed, "ubuntu-focal", &vms).unwrap();
        assert_eq!(nodes_of(&resolved), [("pve1", 60900)]);
        let [why] = resolved.refused.as_slice() else {
            panic!("{:?}", resolved.refused);
        };
        assert!(
            why.contains("template VM 61900 (ubuntu-focal) is on pve3, not on pve2"),
            "{why}"
        );

        // Nothing usable at all: a settings error that names every copy's problem.
        let only = settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=61900@pve2|62000")]);
        let err = template_copies(&only, "ubuntu-focal", &vms).unwrap_err();
        assert!(matches!(err, Error::Settings(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("is on pve3, not on pve2"), "{text}");
        assert!(text.contains("VMID 62000 does not exist"), "{text}");
    }

    #[test]
    fn listed_copies_must_be_templates_and_the_first_listed_wins_a_node() {
        let mut plain = template_vm(61000, "pve2", "ubuntu-focal");
        plain.template = false;
        let vms = vec![
            template_vm(60900, "pve1", "ubuntu-focal"),
            template_vm(60901, "pve1", "ubuntu-focal"),
            plain,
        ];
        let listed = settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=60900|60901|61000")]);
        let resolved = template_copies(&listed, "ubuntu-focal", &vms).unwrap();
        assert_eq!(nodes_of(&resolved), [("pve1", 60900)]);
        assert_eq!(resolved.refused.len(), 2, "{:?}", resolved.refused);
        assert!(resolved.refused[0].contains("60901 is on pve1 like 60900"));
        assert!(resolved.refused[1].contains("VM 61000 (ubuntu-focal on pve2) is not a template"));
    }

    #[test]
    fn allowed_names_find_every_template_of_that_name() {
        let vms = cluster_with_a_look_alike();
        let allowed = settings(&[("PROXMOX_ALLOWED_TEMPLATES", "ubuntu-focal,61900")]);
        // Not in the map (the default map has no such name here): found by name.
        let mut allowed = allowed;
        allowed.placement.templates = BTreeMap::new();
        let resolved = template_copies(&allowed, "ubuntu-focal", &vms).unwrap();
        assert_eq!(resolved.found, Found::ByName);
        assert_eq!(resolved.by_node.len(), 3);
        let resolved = template_copies(&allowed, "61900", &vms).unwrap();
        assert_eq!(resolved.found, Found::ByVmid);
        assert_eq!(nodes_of(&resolved), [("pve2", 61900)]);
    }

    fn view(name: &str, free_gib: u64, job_vms: u32) -> NodeView {
        NodeView {
            name: name.into(),
            online: true,
            free: free_gib * GIB,
            job_vms,
            source: Some(Source {
                node: name.into(),
                vmid: 9000,
                memory: Some(2 * GIB),
            }),
        }
    }

    const NO_LIMITS: Limits = Limits {
        max_job_vms: None,
        reserve: 0,
        vm_memory: None,
    };

    #[test]
    fn the_node_with_most_free_memory_wins() {
        let nodes = [
            view("pve1", 10, 0),
            view("pve2", 41, 3),
            view("pve3", 20, 1),
        ];
        assert_eq!(choose(&nodes, NO_LIMITS, |_| 0).unwrap().name, "pve2");
    }

    #[test]
    fn near_ties_are_broken_by_the_pick() {
        let nodes = [
            view("pve1", 40, 0),
            view("pve2", 40, 3),
            view("pve3", 20, 1),
        ];
        assert_eq!(
            choose(&nodes, NO_LIMITS, |ties| {
                assert_eq!(ties, 2);
                1
            })
            .unwrap()
            .name,
            "pve2"
        );
    }

    #[test]
    fn offline_nodes_nodes_without_the_template_and_full_nodes_are_never_chosen() {
        let mut offline = view("pve1", 60, 0);
        offline.online = false;
        let mut no_template = view("pve2", 50, 0);
        no_template.source = None;
        let capped = view("pve3", 40, 4);
        let tight = view("pve4", 3, 0);
        let fine = view("pve5", 10, 0);
        let nodes = [offline, no_template, capped, tight, fine];
        let limits = Limits {
            max_job_vms: Some(4),
            reserve: 2 * GIB,
            vm_memory: None,
        };
        assert_eq!(choose(&nodes, limits, |_| 0).unwrap().name, "pve5");
        let why = choose(&nodes[..4], limits, |_| 0).unwrap_err();
        assert!(why.contains("pve1: offline"), "{why}");
        assert!(why.contains("pve2: has no copy of the template"), "{why}");
        assert!(why.contains("pve3: 4 job VMs already"), "{why}");
        assert!(why.contains("pve4: 3 GiB free"), "{why}");
    }
}
