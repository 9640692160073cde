//! The one way a VM of ours comes up, for a job (prepare), the warm pool and the smoke test:
//! [`super::provision`] (clone, configure, start), then [`super::ready`]
//! (address, host keys, SSH, runner helper) within `VM_BOOT_TIMEOUT`. What each caller does
//! before (placement, a claim) and after (pinning checks, sealing, `sudo -n true`) is its own.

use std::time::Instant;

use super::provision::{self, Order};
use super::{ready, ReadyVm, Sink};
use crate::cancel::Cancel;
use crate::config::Settings;
use crate::error::Result;

/// A VM brought up for `order`.
#[derive(Debug, Clone)]
pub struct BroughtUp {
    pub ready: ReadyVm,
    /// net0's MAC (new for the clone): which guest interface is the VM's.
    pub net0_mac: Option<String>,
}

/// Clones, configures and starts a VM for `order` and waits until it answers SSH with host
/// keys it proved. Every milestone goes to `sink` first (see [`super::Milestone`]); on failure
/// the VM named by the last `Allocated` may exist and is the caller's to remove.
pub async fn bring_up(
    client: &crate::proxmox::Client,
    settings: &Settings,
    order: &Order<'_>,
    cancel: &Cancel,
    sink: &mut dyn Sink,
) -> Result<BroughtUp> {
    let started = provision::provision(client, settings, order, sink).await?;
    let deadline = Instant::now() + settings.boot_timeout;
    let ready = ready::ready(client, settings, &started, deadline, cancel, sink).await?;
    Ok(BroughtUp {
        ready,
        net0_mac: started.net0_mac,
    })
}
