//! The fleet key (`PROXMOX_FLEET_KEY`): whether warm VMs can be proven ours on this host.
//! A short or garbled key already fails the settings; what is left to say is whether it is set
//! where it is needed.

use super::Finding;
use crate::config::Settings;

pub fn fleet_key_finding(settings: &Settings) -> Finding {
    let pool = settings.warm.pool.values().any(|count| *count > 0);
    match (&settings.fleet_key, pool) {
        (Some(_), true) => Finding::pass(
            "fleet_key",
            "fleet key: PROXMOX_FLEET_KEY is set: warm VMs are sealed with it, and only those \
             whose MAC verifies are claimed, counted or recycled",
        ),
        (Some(_), false) => Finding::pass(
            "fleet_key",
            "fleet key: PROXMOX_FLEET_KEY is set (gc verifies warm VMs with it before it sweeps \
             them)",
        ),
        // Settings refuse WARM_POOL without a key; kept for completeness.
        (None, true) => Finding::fail(
            "fleet_key",
            "fleet key: WARM_POOL is set but PROXMOX_FLEET_KEY is not",
            "`gitlab-proxmox-runner fleet-key`, then the same value in every host's settings file",
        ),
        (None, false) => Finding::pass(
            "fleet_key",
            "fleet key: PROXMOX_FLEET_KEY is not set (needed only with a warm pool; gc leaves \
             warm VMs alone, since without it they cannot be told from another user's \
             look-alikes)",
        ),
    }
}
