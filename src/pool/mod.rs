//! The warm pool: VMs cloned, booted and SSH-verified before any job asks, so that a job's
//! prepare can take one in a fraction of a second instead of waiting for a clone and a boot.
//!
//! - [`warm`]: bringing one warm VM up with the engine (and recycling one);
//! - [`claim`]: prepare's side, taking a warm VM atomically across hosts;
//! - [`metrics`]: what the pool service and prepare's claims show Prometheus.
//!
//! The service that keeps the configured number warm (`gitlab-proxmox-runner pool`) is
//! [`crate::fleet::pool_service`], above this library.
//!
//! **The one atomic step is Proxmox's own compare-and-swap**: every change of hands (a job
//! claims a warm VM, the pool or gc condemns one) is a `PUT .../config` of a new description
//! carrying the `digest` of the config that was judged. PVE checks it inside the VM's config
//! lock and refuses the write when anything changed in between ("detected modified
//! configuration"), so of any number of hosts racing for one VM exactly one wins, and the
//! others see a new marker and move on. A warm VM therefore serves at most one job, and a VM
//! a job has claimed is never recycled: its marker is the job's.

pub mod claim;
pub mod metrics;
pub mod warm;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::fleet_key::FleetKey;
use crate::marker::{self, ClaimReport, Marker};
use crate::proxmox::Client;
use crate::vm::ownership::{first_look, FirstLook};
use crate::vm::placement::{Copies, NodeCopy};
use crate::vm::teardown::{self, Teardown};
use crate::vm::{Log, VmRef};

/// A warm VM as the cluster shows it now.
#[derive(Debug, Clone)]
pub struct WarmVm {
    pub vm: VmRef,
    pub marker: Marker,
    /// The config digest it was read with: a change of hands must present it.
    pub digest: String,
    pub host_keys: Vec<String>,
    /// The net0 MAC, to find the address the agent reports on that interface.
    pub net0_mac: Option<String>,
    pub running: bool,
    pub locked: bool,
    /// Its config's `sshkeys` (URL-encoded): its own derived key when the pool gave it one.
    pub sshkeys: Option<String>,
}

impl WarmVm {
    /// Fully warmed: its address and host keys are recorded (a VM still warming has neither).
    pub fn is_complete(&self) -> bool {
        self.marker
            .warm
            .as_ref()
            .is_some_and(|warm| !warm.address.is_empty())
            && !self.host_keys.is_empty()
    }

    pub fn template(&self) -> Option<u32> {
        self.marker.warm.as_ref().map(|warm| warm.template)
    }
}

/// Which warm VMs a listing keeps: those of the template VMs of one template name, and with
/// placement (`PROXMOX_NODES`) only those on the nodes given, so that a node that is offline
/// (or not ours to use) costs no request that would only time out.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub templates: BTreeSet<u32>,
    pub nodes: Option<BTreeSet<String>>,
}

impl Scope {
    /// The online copies of a template name (all of them without placement, where the one
    /// copy on `PROXMOX_NODE` is the whole scope, as before there was placement).
    pub fn of(copies: &Copies) -> Scope {
        Scope {
            templates: copies
                .list
                .iter()
                .filter(|copy| copy.online)
                .map(|copy| copy.template.vmid)
                .collect(),
            nodes: copies.online_nodes.clone(),
        }
    }
}

/// What a listing of warm VMs found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Warm VMs whose marker's MAC verifies: made by a host of this fleet, for that very VM.
    pub warm: Vec<WarmVm>,
    /// VMs that look like warm VMs of ours (in our range, our tag, a warm marker) but whose
    /// MAC does not verify: another user's, or ours altered since. Never claimed, counted,
    /// recycled or destroyed.
    pub look_alikes: usize,
    /// The job VMs among them (a job's marker, no warm fields), for the pool's metrics only:
    /// claimed warm VMs and the claim reports prepares wrote ([`metrics`]).
    pub jobs: Vec<JobVm>,
}

/// Whether prepare should look for a warm VM of `template_name`: the runner host names the
/// templates that have a pool (its settings file's `WARM_POOL`), so a fleet without a pool
/// pays no extra API call per job.
pub fn has_pool(settings: &crate::config::Settings, template_name: &str) -> bool {
    settings
        .warm
        .pool
        .get(template_name.trim())
        .is_some_and(|count| *count > 0)
}

/// A VM of ours in a listing that carries a job's marker.
#[derive(Debug, Clone)]
pub struct JobVm {
    pub vm: VmRef,
    pub marker: Marker,
    /// The second line of its description, if it is a claim report (not yet verified).
    pub report: Option<ClaimReport>,
}

/// Every warm VM of ours on the cluster (tagged, in `PROXMOX_VMID_RANGE`, a warm marker on the
/// first line of its description whose MAC verifies with `key`) in `scope`.
pub async fn list_warm(
    client: &Client,
    range: (u32, u32),
    scope: &Scope,
    key: &FleetKey,
) -> Result<Listing> {
    let vms = client
        .cluster_vms()
        .await
        .map_err(|err| Error::api("listing the cluster's VMs (/cluster/resources)", err))?;
    let mut listing = Listing::default();
    for listed in vms {
        // Warm VMs are always tagged (the clone is configured before its warm-up is published).
        let FirstLook::Tagged { vmid, .. } = first_look(&listed, range) else {
            continue;
        };
        if scope
            .nodes
            .as_ref()
            .is_some_and(|nodes| !nodes.contains(&listed.node))
        {
            continue;
        }
        // One node that does not answer must not hide the others' warm VMs.
        let Ok(Some(config)) = client.vm_config(&listed.node, vmid).await else {
            continue;
        };
        let Some(description) = config.description() else {
            continue;
        };
        let Some(marker) = Marker::find_in(&description) else {
            continue;
        };
        if marker.warm.is_none() {
            listing.jobs.push(JobVm {
                vm: VmRef {
                    node: listed.node.clone(),
                    vmid,
                },
                report: ClaimReport::find_in(&description),
                marker,
            });
            continue;
        }
        if !marker
            .warm
            .as_ref()
            .is_some_and(|w| scope.templates.contains(&w.template))
        {
            continue;
        }
        let Some(digest) = config.get("digest") else {
            continue;
        };
        let vm = VmRef {
            node: listed.node.clone(),
            vmid,
        };
        let host_keys = marker::warm_host_keys(&description);
        if !marker.is_sealed_for(key, &vm, &host_keys) {
            listing.look_alikes += 1;
            continue;
        }
        listing.warm.push(WarmVm {
            vm,
            host_keys,
            marker,
            digest,
            net0_mac: config.net0_mac(),
            running: listed.status.as_deref() == Some("running"),
            locked: listed.lock.as_deref().is_some_and(|lock| !lock.is_empty())
                || config.lock().is_some(),
            sshkeys: config.get("sshkeys"),
        });
    }
    Ok(listing)
}

/// The config digest now of each template VM that one of `warm` was cloned from, read from
/// that copy's own node: the copies of a template name on different nodes are different VMs,
/// and each warm VM is judged against the one it came from. A copy whose digest could not be
/// read maps to the error.
pub async fn digests_of(
    client: &Client,
    copies: &[NodeCopy],
    warm: &[WarmVm],
) -> BTreeMap<u32, Result<String>> {
    let wanted: BTreeSet<u32> = warm.iter().filter_map(WarmVm::template).collect();
    let mut digests = BTreeMap::new();
    for vmid in wanted {
        let Some(copy) = copies.iter().find(|copy| copy.template.vmid == vmid) else {
            continue;
        };
        digests.insert(vmid, warm::template_digest(client, &copy.template).await);
    }
    digests
}

/// What a compare-and-swap of a VM's description came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Swap {
    /// Ours now: the description is the new one.
    Won,
    /// Someone else changed the VM first (a claim, a recycle), or it is gone or locked.
    Lost(String),
}

/// Replaces `warm`'s description (and optionally its name) if its config is still the one
/// read with `warm.digest`.
pub async fn swap_description(
    client: &Client,
    warm: &WarmVm,
    description: String,
    name: Option<&str>,
    expected: &Marker,
) -> Result<Swap> {
    let (node, vmid) = (warm.vm.node.as_str(), warm.vm.vmid);
    let mut fields = vec![
        ("description", description),
        ("digest", warm.digest.clone()),
    ];
    if let Some(name) = name {
        fields.push(("name", name.to_string()));
    }
    match client.set_config(node, vmid, &fields).await {
        Ok(()) => Ok(Swap::Won),
        Err(err) if err.is_not_found() => Ok(Swap::Lost("it is gone".into())),
        Err(err) if err.is_vm_locked() => Ok(Swap::Lost(err.message)),
        // A stale digest is someone else's write, or ours whose answer was lost and the
        // client repeated: and a transient failure may have landed too. The marker says.
        Err(err) if err.is_config_modified() || err.is_transient() => {
            let config = client
                .vm_config(node, vmid)
                .await
                .map_err(|again| Error::api(format!("reading VM {vmid} on {node}"), again))?;
            let now = config.and_then(|config| config.description());
            match marker::ownership(now.as_deref(), expected) {
                Ok(()) => Ok(Swap::Won),
                Err(_) if err.is_config_modified() => {
                    Ok(Swap::Lost("another host changed it first".into()))
                }
                Err(_) => Ok(Swap::Lost(err.to_string())),
            }
        }
        Err(err) => Err(Error::api(
            format!("changing the description of VM {vmid} on {node}"),
            err,
        )),
    }
}

/// Takes a warm VM out of the pool for destruction (compare-and-swap to a marker of its own,
/// past its deadline), then destroys it. `Ok(false)` when it changed hands first (a job claimed
/// it): then it is left alone.
pub async fn recycle(
    client: &Client,
    runner_id: &str,
    warm: &WarmVm,
    deadline: Instant,
    log: &dyn Log,
) -> Result<bool> {
    let mut condemned = Marker::for_warm(
        runner_id,
        warm.marker.warm.clone().unwrap_or_else(|| marker::Warm {
            template: 0,
            template_digest: "-".into(),
            pool: "-".into(),
            address: String::new(),
        }),
        std::time::Duration::ZERO,
    );
    // Not warm any more: no claim may take it, and gc sweeps it at once if we die now.
    condemned.warm = None;
    condemned.deadline = Some(condemned.created);
    match swap_description(client, warm, condemned.description(), None, &condemned).await? {
        Swap::Lost(_) => return Ok(false),
        Swap::Won => {}
    }
    let (node, vmid) = (warm.vm.node.as_str(), warm.vm.vmid);
    match teardown::destroy_owned_vm(client, node, vmid, &condemned, deadline, log).await? {
        Teardown::Destroyed | Teardown::AlreadyGone => Ok(true),
        Teardown::NotOurs(_) => Ok(false),
    }
}
