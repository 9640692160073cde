//! prepare's side of the pool: before cloning, take a warm VM of the job's template.
//!
//! 1. list our warm VMs of that template whose template digest is the template's today, past
//!    their warm-up (address and host keys recorded) and inside their idle deadline. With
//!    placement (`PROXMOX_NODES`) that is every copy of the template name on the online nodes
//!    the job may use, each warm VM judged against the copy it was cloned from, and those on
//!    the node placement chose come first;
//! 2. in random order (racing prepares spread out), compare-and-swap the description to the
//!    job's marker and the name to the job's, with the digest the VM was read with: PVE lets
//!    exactly one writer through, the others try the next one;
//! 3. the winner records the job state at once (from here cleanup destroys it like any job VM),
//!    then checks it: running, the agent reports the recorded address, SSH answers with the
//!    pinned host keys, the runner helper is there. A VM that fails a check is destroyed (it is
//!    the job's now) and the next one is tried;
//! 4. none left: [`Claimed::None`], and prepare clones as it always did.
//!
//! Each swap writes, with the job's marker, a claim report for the pool service's metrics
//! (what this prepare found so far, sealed for that VM: [`crate::marker::ClaimReport`]); a
//! prepare that ends up cloning writes one on its clone.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;

use super::{digests_of, list_warm, swap_description, Listing, Scope, Swap, WarmVm};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::fleet_key::FleetKey;
use crate::joblog;
use crate::marker::{ClaimOutcome, ClaimReport, Marker};
use crate::proxmox::Client;
use crate::ssh::{self, HostKeyCheck};
use crate::vm::placement::{Placed, Strategy};
use crate::vm::template::Template;
use crate::vm::{ready, ssh_key, teardown};
use crate::vm::{HostKeySource, Milestone, ReadyVm, Sink, SinkLog};

/// A warm VM is up already: its checks get this long before it counts as broken.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// Removing a claimed VM that failed its checks.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// Claimed warm VMs one prepare may destroy for failing their checks before it clones
/// instead: whatever is wrong (with the pool, the network or this job), one job must not
/// drain the pool.
pub const MAX_DISCARDS: usize = 2;

/// What a claim came to.
#[derive(Debug)]
pub enum Claimed {
    /// A warm VM is the job's, checked.
    Ready(ReadyVm),
    /// None to keep: prepare clones. `discarded` warm VMs were taken and destroyed for failing
    /// their checks; the look took `took`.
    None { discarded: u32, took: Duration },
}

impl Claimed {
    /// The report the job's clone carries after this.
    pub fn report(&self, template: u32) -> Option<ClaimReport> {
        match self {
            Claimed::Ready(_) => None,
            Claimed::None { discarded, took } => Some(ClaimReport {
                outcome: ClaimOutcome::None,
                ms: millis(*took),
                discards: *discarded,
                template,
                mac: None,
            }),
        }
    }
}

fn millis(took: Duration) -> u64 {
    u64::try_from(took.as_millis()).unwrap_or(u64::MAX)
}

/// Claims a warm VM of the template placement chose (with `PROXMOX_NODES`, a warm VM of any
/// copy of the job's template name qualifies, those on the placed node first) for the job
/// whose marker is `marker`, reporting every milestone to `sink` as the engine would.
/// [`Claimed::None`] when there was none to claim (or none passed its check).
///
/// Only warm VMs whose marker's MAC verifies with the fleet key are candidates. A job that
/// supplied its own SSH key never gets here (prepare clones for it): warm VMs were made, and
/// checked, for the host's key.
pub async fn claim(
    client: &Client,
    settings: &Settings,
    placed: &Placed,
    marker: &Marker,
    vm_name: &str,
    cancel: &Cancel,
    sink: &mut dyn Sink,
) -> Result<Claimed> {
    let started = Instant::now();
    let node = placed.node.as_str();
    let key = super::warm::fleet_key(settings)?;
    let strategy = Strategy::of(settings);
    let found = match strategy {
        Strategy::One { .. } => on_the_node(client, settings, &placed.template, key).await?,
        Strategy::Cluster { .. } => anywhere(client, settings, placed, key, sink).await?,
    };
    if found.look_alikes > 0 {
        // No detail (which VM, why): a forger would tune to it.
        sink.warn(&format!(
            "ignored {} look-alike warm VMs (bad MAC)",
            found.look_alikes
        ));
    }
    let mut discarded: u32 = 0;
    for warm in found.warm {
        if discarded as usize >= MAX_DISCARDS {
            sink.warn(&format!(
                "{discarded} claimed warm VMs failed their check; cloning instead of trying more"
            ));
            break;
        }
        let vmid = warm.vm.vmid;
        let key_path = ssh_key::warm_vm_path(
            settings,
            &warm.vm,
            &warm.marker.nonce,
            warm.sshkeys.as_deref(),
        );
        if key_path == ssh_key::KeyPath::Static && settings.ssh.private_key.is_none() {
            // It takes the static key, which this host does not have: leave it to hosts that do.
            continue;
        }
        // Recorded before the swap: if it lands and we are killed before we hear of it, the job
        // state names the VM (cleanup checks the marker: it destroys the VM if the swap landed
        // and leaves it alone if it did not).
        sink.reached(Milestone::Claiming(&warm.vm))?;
        let mut report = ClaimReport {
            outcome: ClaimOutcome::Claimed,
            ms: millis(started.elapsed()),
            discards: discarded,
            template: warm.template().unwrap_or(placed.template.vmid),
            mac: None,
        };
        report.seal(key, &warm.vm, marker);
        let description = marker.description_with_report(&report);
        match swap_description(client, &warm, description, Some(vm_name), marker).await {
            Ok(Swap::Won) => {}
            Ok(Swap::Lost(why)) => {
                sink.reached(Milestone::Released)?;
                sink.info(&format!(
                    "warm VM {vmid} was taken first ({why}); trying the next"
                ));
                continue;
            }
            Err(err) => {
                sink.reached(Milestone::Released)?;
                sink.warn(&format!("could not claim warm VM {vmid}: {err}"));
                continue;
            }
        }
        sink.reached(Milestone::Cloned)?;
        sink.reached(Milestone::Started)?;
        match check(client, settings, &warm, cancel).await {
            Ok(ready) => {
                sink.reached(Milestone::Ready(&ready))?;
                sink.timing("claim", started.elapsed());
                let place = if matches!(strategy, Strategy::One { .. }) {
                    String::new()
                } else if warm.vm.node == node {
                    format!(" on {}", warm.vm.node)
                } else {
                    format!(" on {} ({node} had none to claim)", warm.vm.node)
                };
                sink.info(&format!(
                    "claimed warm VM {vmid}{place} (warm for {}) in {}",
                    joblog::age(Duration::from_secs(warm.marker.age_secs())),
                    joblog::secs(started.elapsed())
                ));
                return Ok(Claimed::Ready(ready));
            }
            Err(err) => {
                let refused = err.is_authentication_refused();
                sink.warn(&format!(
                    "claimed warm VM {vmid} failed its check ({err}); destroying it"
                ));
                let deadline = Instant::now() + DISCARD_TIMEOUT;
                let node = warm.vm.node.as_str();
                teardown::destroy_owned_vm(client, node, vmid, marker, deadline, &SinkLog(sink))
                    .await?;
                sink.reached(Milestone::Released)?;
                discarded += 1;
                if refused {
                    // The VM answered with its pinned host key and refused our key: the key is
                    // what is wrong, and every other warm VM would refuse it too.
                    sink.warn(
                        "the VM refused the SSH key: not claiming more warm VMs (a wrong key \
                         must not drain the pool); cloning instead",
                    );
                    break;
                }
            }
        }
    }
    Ok(Claimed::None {
        discarded,
        took: started.elapsed(),
    })
}

/// Claimable: warmed, running, not locked, inside its idle deadline.
fn claimable(warm: &WarmVm) -> bool {
    warm.is_complete() && warm.running && !warm.locked && !warm.marker.is_past_deadline()
}

fn recorded_digest(warm: &WarmVm) -> Option<&str> {
    warm.marker
        .warm
        .as_ref()
        .map(|w| w.template_digest.as_str())
}

/// Without placement: the warm VMs of `template` whose template digest is its digest today,
/// in random order (racing prepares spread out).
async fn on_the_node(
    client: &Client,
    settings: &Settings,
    template: &Template,
    key: &FleetKey,
) -> Result<Listing> {
    let digest = super::warm::template_digest(client, template).await?;
    let scope = Scope {
        templates: [template.vmid].into(),
        nodes: None,
    };
    let mut listing = list_warm(client, settings.vmid_range, &scope, key).await?;
    listing
        .warm
        .retain(|warm| claimable(warm) && recorded_digest(warm) == Some(digest.as_str()));
    listing.warm.shuffle(&mut rand::rng());
    Ok(listing)
}

/// With placement: the warm VMs of every copy of the job's template name on the online nodes
/// the job may use, each current with the copy it was cloned from; those on the node placement
/// chose for a clone (`placed.node`) first, then the others (a warm VM elsewhere is still far
/// faster than a clone), each group in random order.
async fn anywhere(
    client: &Client,
    settings: &Settings,
    placed: &Placed,
    key: &FleetKey,
    sink: &mut dyn Sink,
) -> Result<Listing> {
    // The copies placement found with its own reads of the cluster, moments ago.
    let copies = &placed.copies;
    let mut listing = list_warm(client, settings.vmid_range, &Scope::of(copies), key).await?;
    listing.warm.retain(claimable);
    let digests = digests_of(client, &copies.list, &listing.warm).await;
    for (vmid, digest) in &digests {
        if let Err(err) = digest {
            sink.warn(&format!(
                "not claiming warm VMs of template VM {vmid}: cannot tell whether it changed \
                 ({err})"
            ));
        }
    }
    listing.warm.retain(|warm| {
        let current = warm
            .template()
            .and_then(|vmid| digests.get(&vmid))
            .and_then(|digest| digest.as_ref().ok());
        current.is_some_and(|digest| recorded_digest(warm) == Some(digest.as_str()))
    });
    listing.warm.shuffle(&mut rand::rng());
    // Stable: the shuffle stays within each group.
    listing.warm.sort_by_key(|warm| warm.vm.node != placed.node);
    Ok(listing)
}

/// Running, the same address, SSH with the pinned keys, the runner helper: ready's own steps,
/// each bounded by [`CHECK_TIMEOUT`] (the VM is up already), none waited for.
async fn check(
    client: &Client,
    settings: &Settings,
    warm: &WarmVm,
    cancel: &Cancel,
) -> Result<ReadyVm> {
    let (node, vmid) = (warm.vm.node.as_str(), warm.vm.vmid);
    let recorded = warm
        .marker
        .warm
        .as_ref()
        .map(|w| w.address.clone())
        .unwrap_or_default();
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = client
        .vm_status(node, vmid)
        .await
        .map_err(|err| Error::api(format!("reading claimed VM {vmid} on {node}"), err))?;
    if !status.is_some_and(|status| status.is_running()) {
        return Err(Error::Infrastructure(format!(
            "warm VM {vmid} on {node} is not running"
        )));
    }
    let address = ready::current_address(
        client,
        settings,
        &warm.vm,
        warm.net0_mac.as_deref(),
        deadline,
    )
    .await?;
    let ip = address
        .filter(|ip| ip.to_string() == recorded)
        .ok_or_else(|| {
            Error::Infrastructure(format!(
                "warm VM {vmid}'s address is no longer {recorded} (a new DHCP lease?)"
            ))
        })?;
    // The warm marker's nonce (sealed, so the pool's): the job state keeps it for every hook.
    let key_path = ssh_key::warm_vm_path(
        settings,
        &warm.vm,
        &warm.marker.nonce,
        warm.sshkeys.as_deref(),
    );
    let key = ssh_key::private_key(settings, &warm.vm, &key_path)?;
    let target = ready::ssh_target(settings, &warm.vm, ip);
    let check = HostKeyCheck::Pinned(warm.host_keys.clone());
    let connection = ssh::connect_to_running(&target, key, &check, deadline, cancel).await?;
    ready::install_runner_helper(&connection, settings, &warm.vm, deadline).await?;
    Ok(ReadyVm {
        vm: warm.vm.clone(),
        ip,
        ssh_port: target.port,
        ssh_user: target.user,
        host_keys: warm.host_keys.clone(),
        host_key_source: HostKeySource::GuestAgent,
        key: key_path,
    })
}
