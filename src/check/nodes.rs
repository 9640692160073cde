//! Which nodes prepare may place jobs on, as the preflight reports them: `PROXMOX_NODE`'s
//! status ([`node_finding`]), or with `PROXMOX_NODES` each node's ([`survey`]). The latter's
//! statuses come from the one `GET /cluster/resources?type=node` the check makes; a
//! node counts as online the way placement counts it (status `online` and a memory figure), so
//! that the check and prepare never disagree about a node.

use reqwest::Method;

use crate::check::api::Api;
use crate::check::Finding;
use crate::config::{NodeSet, Settings};
use crate::proxmox::types::ClusterNode;
use crate::proxmox::Retry;

const GIB: u64 = 1 << 30;

/// A configured node that is a member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub online: bool,
}

/// What [`survey`] found: the members, in the order `PROXMOX_NODES` lists them (the cluster's
/// order for `*`), and one finding per configured node plus, when none is online, one more.
#[derive(Debug)]
pub struct Survey {
    pub members: Vec<Member>,
    pub findings: Vec<Finding>,
}

impl Survey {
    pub fn online(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|member| member.online)
    }
}

/// `node pve1`, `nodes pve1, pve2, pve3`, or `every online node` for `*`: how the settings line
/// names where jobs go.
pub fn describe(set: &NodeSet, node: &str) -> String {
    match set {
        NodeSet::One => format!("node {node}"),
        NodeSet::Listed(listed) => format!("nodes {}", listed.join(", ")),
        NodeSet::Every => "every online node".to_string(),
    }
}

/// One finding per configured node: online (with its free memory), offline (advisory: jobs
/// avoid it), or not a member of the cluster (a typo in `PROXMOX_NODES`); and an error when
/// no configured node is online.
pub fn survey(set: &NodeSet, cluster: &[ClusterNode]) -> Survey {
    let configured: Vec<String> = match set {
        NodeSet::Listed(listed) => listed.clone(),
        NodeSet::Every | NodeSet::One => cluster.iter().map(|node| node.node.clone()).collect(),
    };
    let mut findings = Vec::new();
    let mut members = Vec::new();
    for name in configured {
        let id = format!("node.{name}");
        let Some(node) = cluster.iter().find(|node| node.node == name) else {
            findings.push(Finding::fail(
                id,
                format!(
                    "node {name} (PROXMOX_NODES) is not a member of this cluster (members: {})",
                    cluster
                        .iter()
                        .map(|node| node.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "PROXMOX_NODES must name nodes as `pvecm nodes` lists them",
            ));
            continue;
        };
        let online = node.is_online() && node.mem.is_some();
        if online {
            let max = node.maxmem.unwrap_or(0);
            let free = max.saturating_sub(node.mem.unwrap_or(max));
            findings.push(Finding::pass(
                id,
                format!(
                    "node {name} is online, {} GiB of {} GiB memory free",
                    free / GIB,
                    max / GIB
                ),
            ));
        } else {
            findings.push(
                Finding::fail(
                    id,
                    format!(
                        "node {name} is offline (status {}): jobs avoid it until it is back",
                        node.status.as_deref().unwrap_or("unknown")
                    ),
                    "bring the node back (pvecm status on a cluster member), or drop it from \
                     PROXMOX_NODES",
                )
                .advisory(),
            );
        }
        members.push(Member { name, online });
    }
    if !members.iter().any(|member| member.online) {
        let which = match set {
            NodeSet::Listed(listed) => format!("none of PROXMOX_NODES ({})", listed.join(", ")),
            NodeSet::Every | NodeSet::One => "no node of the cluster".to_string(),
        };
        findings.push(Finding::fail(
            "nodes",
            format!("nodes: {which} is online, so no job can get a VM"),
            "bring a node back (pvecm status on a cluster member), or list online nodes in \
             PROXMOX_NODES",
        ));
    }
    Survey { members, findings }
}

/// Without `PROXMOX_NODES`: whether `PROXMOX_NODE` is a member of the cluster and online.
pub async fn node_finding(api: &Api, settings: &Settings) -> Finding {
    #[derive(serde::Deserialize)]
    struct Node {
        node: String,
        #[serde(default)]
        status: Option<String>,
    }
    let node = &settings.placement.node;
    let nodes = api
        .client
        .call::<Vec<Node>>(Method::GET, "/nodes", &[], &[], Retry::Idempotent)
        .await;
    match nodes {
        Err(err) => Finding::fail(
            "node",
            format!("node {node}: cannot list the cluster's nodes: {err}"),
            "the message names it",
        ),
        Ok(nodes) => match nodes.iter().find(|n| &n.node == node) {
            None => Finding::fail(
                "node",
                format!(
                    "node {node} is not a member of this cluster (members: {})",
                    nodes
                        .iter()
                        .map(|n| n.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "PROXMOX_NODE must name a node as `pvecm nodes` lists it",
            ),
            Some(found) if found.status.as_deref() == Some("online") => {
                Finding::pass("node", format!("node {node} is online"))
            }
            Some(found) => Finding::fail(
                "node",
                format!(
                    "node {node} is offline (status {})",
                    found.status.as_deref().unwrap_or("unknown")
                ),
                "bring the node back (pvecm status on a cluster member) or set PROXMOX_NODE to \
                 an online node",
            ),
        },
    }
}

/// The line for a member that holds no copy of `template`: advisory while others do.
pub fn missing_copy(template: &str, vm_name: &str, node: &str, served_by: &[&str]) -> Finding {
    Finding::fail(
        format!("template.{template}.{node}"),
        format!(
            "{node}: no copy of {template}; jobs for it go to {}",
            served_by.join(", ")
        ),
        format!(
            "nothing, if {node} is not meant to run them; otherwise give it a copy of {vm_name} \
             (the template VM on {}) and list its VMID in PROXMOX_TEMPLATES \
             ({template}=...|VMID@{node})",
            served_by.first().copied().unwrap_or("another node")
        ),
    )
    .advisory()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;

    fn node(name: &str, online: bool, free_gib: u64) -> ClusterNode {
        ClusterNode {
            node: name.into(),
            status: Some(if online { "online" } else { "offline" }.into()),
            mem: online.then_some((64 - free_gib) * GIB),
            maxmem: Some(64 * GIB),
        }
    }

    #[test]
    fn listed_nodes_are_reported_one_by_one() {
        let cluster = [node("pve1", true, 20), node("pve2", false, 0)];
        let set = NodeSet::Listed(vec!["pve1".into(), "pve2".into(), "pve9".into()]);
        let survey = survey(&set, &cluster);
        assert_eq!(survey.members.len(), 2);
        assert_eq!(survey.online().count(), 1);
        let [online, offline, typo] = &survey.findings[..] else {
            panic!("{:?}", survey.findings);
        };
        assert_eq!(online.status, Status::Pass);
        assert!(online.message.contains("20 GiB of 64 GiB"), "{online:?}");
        assert!(offline.status == Status::Fail && !offline.required);
        assert!(typo.is_required_failure());
        assert!(typo.message.contains("members: pve1, pve2"), "{typo:?}");
    }

    #[test]
    fn no_online_node_is_an_error() {
        let survey = survey(&NodeSet::Every, &[node("pve1", false, 0)]);
        let last = survey.findings.last().unwrap();
        assert_eq!(last.id, "nodes");
        assert!(last.is_required_failure());
    }
}
