//! One warm VM, made with the engine exactly as prepare makes a job's VM (clone, configure,
//! start, agent address, host keys through the agent, SSH, runner helper), but carrying a warm
//! marker: no job, the pool's identity, an idle deadline. Once SSH answered, its address and
//! pinned host keys are written into its description (compare-and-swap, like every change of
//! hands), and only then may a job claim it. Before that, its host keys must be its own
//! ([`crate::vm::host_keys`]): a VM whose key another VM holds too is destroyed, never
//! published.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{swap_description, Swap, WarmVm};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::{Marker, Warm};
use crate::proxmox::Client;
use crate::vm::host_keys::{self, Holder, SharedLedger};
use crate::vm::provision::Order;
use crate::vm::teardown;
use crate::vm::template::Template;
use crate::vm::{placement, Log, Milestone, ReadyVm, Sink, VmRef};

/// Removing a warm VM that failed to come up.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The pool's sink: progress into its log, and the VM to remove if bringing it up fails.
struct WarmSink<'a> {
    log: &'a dyn Log,
    allocated: Option<VmRef>,
    timings: Vec<(&'static str, Duration)>,
    placed: Option<Placing>,
    /// The template's own host keys, when the agent read them before first boot replaced them.
    template_keys: Vec<String>,
}

/// What a new warm VM's host keys are judged against before it is published: the pool
/// service's [`host_keys::Ledger`], and the `WARM_POOL` name to hold off on a duplicate.
pub struct Vetting {
    pub ledger: SharedLedger,
    pub name: String,
}

/// A warm VM placed on a node (`PROXMOX_NODES`): why there, and the pool's placement turn.
struct Placing {
    pool_id: String,
    reason: Option<String>,
    /// Placement sees a new VM by its clone lock, then (after configure) by its tag and, once
    /// it runs, in its node's memory; not before the clone worker wrote its first config, nor
    /// between the clone and the tags. The next warm VM is placed only once this one is
    /// started, or the pool would stack every VM of a refill onto the node that looked
    /// emptiest, past its PROXMOX_NODE_MAX_VMS.
    turn: Option<OwnedMutexGuard<()>>,
}

impl Log for WarmSink<'_> {
    fn info(&self, message: &str) {
        self.log.info(message);
    }

    fn warn(&self, message: &str) {
        self.log.warn(message);
    }
}

impl Sink for WarmSink<'_> {
    fn step(&mut self, _step: &'static str) {}

    fn timing(&mut self, phase: &'static str, took: Duration) {
        self.timings.push((phase, took));
    }

    fn host_keys_replaced(&mut self, template_keys: &[String]) {
        self.template_keys.extend_from_slice(template_keys);
    }

    fn reached(&mut self, milestone: Milestone<'_>) -> Result<()> {
        match milestone {
            Milestone::Allocated(vm) => {
                if let Some(placed) = &self.placed {
                    let why = placed
                        .reason
                        .as_deref()
                        .map(|reason| format!(" ({reason})"))
                        .unwrap_or_default();
                    self.log.info(&format!(
                        "pool {}: warming VM {} on {}{why}",
                        placed.pool_id, vm.vmid, vm.node
                    ));
                }
                self.allocated = Some(vm.clone());
            }
            Milestone::Released => self.allocated = None,
            Milestone::Started => {
                if let Some(placed) = self.placed.as_mut() {
                    placed.turn = None;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The key every warm marker is sealed with (settings refuse `WARM_POOL` without it).
pub fn fleet_key(settings: &Settings) -> Result<&crate::fleet_key::FleetKey> {
    settings.fleet_key.as_ref().ok_or_else(|| {
        Error::Settings("the warm pool needs PROXMOX_FLEET_KEY in the settings file".into())
    })
}

/// What a finished warm-up took.
#[derive(Debug, Clone)]
pub struct Warmed {
    pub vm: VmRef,
    pub total: Duration,
    /// `clone 0.4 s, configure 0.0 s, start 0.0 s, agent+IP 20.1 s, ...`
    pub phases: String,
}

/// The template's config digest right now: what a warm VM records, and what makes it stale
/// when the template changes.
pub async fn template_digest(client: &Client, template: &Template) -> Result<String> {
    let config = client
        .vm_config(&template.node, template.vmid)
        .await
        .map_err(|err| Error::api(format!("reading template {}", template.label), err))?
        .ok_or_else(|| {
            Error::Settings(format!(
                "template {} vanished from node {}",
                template.label, template.node
            ))
        })?;
    config.get("digest").ok_or_else(|| {
        Error::proxmox(
            format!("reading template {}", template.label),
            "its config carries no digest",
        )
    })
}

/// Brings one warm VM of `template` up. On failure (or cancellation) what was created is
/// destroyed before returning.
#[allow(clippy::too_many_arguments)]
pub async fn make_warm(
    client: &Client,
    settings: &Settings,
    template: &Template,
    digest: &str,
    pool_id: &str,
    vetting: &Vetting,
    cancel: &Cancel,
    log: &dyn Log,
) -> Result<Warmed> {
    warm_up(
        client,
        settings,
        template,
        &template.node,
        digest,
        pool_id,
        None,
        vetting,
        cancel,
        log,
    )
    .await
}

/// With placement (`PROXMOX_NODES`): places one new warm VM of template name `name` as a
/// job's VM is placed (most free memory, the per-node limits, online nodes with a copy), on
/// `turns`, one placement at a time, then brings it up from the copy on the chosen node.
#[allow(clippy::too_many_arguments)]
pub async fn place_and_warm(
    client: &Client,
    settings: &Settings,
    name: &str,
    turns: Arc<Mutex<()>>,
    pool_id: &str,
    vetting: &Vetting,
    cancel: &Cancel,
    log: &dyn Log,
) -> Result<Warmed> {
    let placing = async {
        let turn = turns.lock_owned().await;
        let placed = placement::Strategy::of(settings)
            .place(client, settings, name, &HashSet::new())
            .await?;
        // The copy on the chosen node: its digest, not another node's copy's, is the one this
        // VM is judged against later.
        let digest = template_digest(client, &placed.template).await?;
        Ok::<_, Error>((turn, placed, digest))
    };
    let (turn, placed, digest) = tokio::select! {
        result = placing => result?,
        reason = cancel.cancelled() => {
            return Err(Error::Cancelled(format!("the pool service stopped ({reason})")))
        }
    };
    let placing = Placing {
        pool_id: pool_id.to_string(),
        reason: placed.reason,
        turn: Some(turn),
    };
    warm_up(
        client,
        settings,
        &placed.template,
        &placed.node,
        &digest,
        pool_id,
        Some(placing),
        vetting,
        cancel,
        log,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn warm_up(
    client: &Client,
    settings: &Settings,
    template: &Template,
    node: &str,
    digest: &str,
    pool_id: &str,
    placed: Option<Placing>,
    vetting: &Vetting,
    cancel: &Cancel,
    log: &dyn Log,
) -> Result<Warmed> {
    let mode = crate::vm::template::clone_mode(settings, template)?;
    let mut marker = Marker::for_warm(
        &settings.runner_id,
        Warm {
            template: template.vmid,
            template_digest: digest.to_string(),
            pool: pool_id.to_string(),
            // Unknown until the agent reports it: a VM without one is not claimable yet.
            address: String::new(),
        },
        settings.warm.max_idle,
    );
    let name = format!("warm-{}", template.vmid);
    let mut sink = WarmSink {
        log,
        allocated: None,
        timings: Vec::new(),
        placed,
        template_keys: Vec::new(),
    };
    let started = Instant::now();
    let brought_up = bring_up(
        client,
        settings,
        template,
        node,
        mode,
        &name,
        &mut marker,
        vetting,
        cancel,
        &mut sink,
    )
    .await;
    match brought_up {
        Ok(vm) => {
            let phases: Vec<String> = sink
                .timings
                .iter()
                .map(|(phase, took)| format!("{phase} {}", joblog::secs(*took)))
                .collect();
            Ok(Warmed {
                vm,
                total: started.elapsed(),
                phases: phases.join(", "),
            })
        }
        Err(err) => {
            if let Some(vm) = sink.allocated.take() {
                let deadline = Instant::now() + ROLLBACK_TIMEOUT;
                if let Err(again) =
                    teardown::destroy_owned_vm(client, &vm.node, vm.vmid, &marker, deadline, log)
                        .await
                {
                    log.warn(&format!(
                        "could not remove the failed warm {vm} ({again}); gc sweeps it after its \
                         idle deadline"
                    ));
                }
            }
            Err(err)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn bring_up(
    client: &Client,
    settings: &Settings,
    template: &Template,
    node: &str,
    mode: crate::config::CloneMode,
    name: &str,
    marker: &mut Marker,
    vetting: &Vetting,
    cancel: &Cancel,
    sink: &mut WarmSink<'_>,
) -> Result<VmRef> {
    // The warm VM's own key comes from this nonce; a claim derives it again from the marker.
    let nonce = marker.nonce.clone();
    let order = Order {
        template,
        node,
        mode,
        name,
        marker,
        claim: None,
        key_nonce: Some(&nonce),
    };
    let brought_up = tokio::select! {
        result = crate::vm::bring_up(client, settings, &order, cancel, sink) => result?,
        reason = cancel.cancelled() => {
            return Err(Error::Cancelled(format!("the pool service stopped ({reason})")))
        }
    };
    // From here on the signal is not raced: once the swap below lands the VM is published
    // (a job may claim it at once), and a complete warm VM stays for jobs when the service
    // stops. Cancelling after the write but before its answer would destroy a published VM.
    let ready = brought_up.ready;
    vet_host_keys(vetting, template, &ready, marker, &sink.template_keys)?;
    // Same nonce, now with the address and the keys SSH proved, sealed with the fleet key:
    // claimable from here on.
    if let Some(warm) = marker.warm.as_mut() {
        warm.address = ready.ip.to_string();
    }
    marker.seal(fleet_key(settings)?, &ready.vm, &ready.host_keys);
    let config = client
        .vm_config(&ready.vm.node, ready.vm.vmid)
        .await
        .map_err(|err| Error::api(format!("reading warm {}", ready.vm), err))?
        .ok_or_else(|| Error::proxmox(format!("reading warm {}", ready.vm), "it vanished"))?;
    let as_read = WarmVm {
        vm: ready.vm.clone(),
        marker: marker.clone(),
        digest: config.get("digest").unwrap_or_default(),
        host_keys: Vec::new(),
        net0_mac: brought_up.net0_mac,
        running: true,
        locked: false,
        sshkeys: config.get("sshkeys"),
    };
    let description = marker.warm_description(&ready.host_keys);
    match swap_description(client, &as_read, description, None, marker).await? {
        Swap::Won => Ok(ready.vm),
        Swap::Lost(why) => Err(Error::Infrastructure(format!(
            "warm {} changed while it booted ({why}); giving it up",
            ready.vm
        ))),
    }
}

/// Refuses a warm VM whose host keys another VM holds too (a warm VM on the cluster now or
/// before, or the template itself): the pool destroys it, and holds off warming that template
/// name for [`host_keys::HOLD_OFF`], since every clone would be refused the same way.
fn vet_host_keys(
    vetting: &Vetting,
    template: &Template,
    ready: &ReadyVm,
    marker: &Marker,
    template_keys: &[String],
) -> Result<()> {
    let mut ledger = host_keys::lock(&vetting.ledger);
    if !template_keys.is_empty() {
        // The template's key on a VM seen earlier marks that one too; this VM's own keys
        // changed since, so they are judged below.
        ledger.record(
            template_keys,
            &Holder::template(template.vmid, &template.label),
        );
    }
    let holder = Holder::vm(&ready.vm, &marker.nonce, "warm VM");
    let found = ledger.record(&ready.host_keys, &holder);
    if found.is_empty() {
        return Ok(());
    }
    ledger.hold_off(&vetting.name, Instant::now() + host_keys::HOLD_OFF);
    Err(Error::Settings(format!(
        "{}. The pool destroys it, never hands it to a job, and warms no VM of {} for {} min \
         (restart the pool service once the template is fixed)",
        host_keys::cloned_keys_message(&ready.vm, &template.label, &found),
        vetting.name,
        host_keys::HOLD_OFF.as_secs() / 60
    )))
}
