//! The warm pool as a job sees it: hooks of a runner host that claims warm VMs, and which warm
//! VMs a claim may take.

use std::path::Path;

use gitlab_proxmox_runner::marker::Marker;

use gpr_testkit::hook::Hook;
use gpr_testkit::{Lab, VmSnapshot};

/// [`Lab::job_hook`] on runner host `runner` (`PROXMOX_RUNNER_ID`), which keeps warm VMs of
/// `template`: its prepare claims one before it clones.
pub fn claiming_hook(lab: &Lab, dir: &Path, job_id: u64, template: &str, runner: &str) -> Hook {
    lab.job_hook(dir, job_id)
        .host_env("WARM_POOL", format!("{template}=1"))
        .host_env("PROXMOX_RUNNER_ID", runner)
}

/// Warm VMs with their address and host keys recorded, running: claimable.
pub fn complete_warm(lab: &Lab) -> Vec<VmSnapshot> {
    lab.fake
        .job_vms()
        .into_iter()
        .filter(|vm| {
            Marker::find_in(&vm.description)
                .and_then(|marker| marker.warm)
                .is_some_and(|warm| !warm.address.is_empty())
                && vm.description.contains("\nssh-host-key: ")
                && vm.status == "running"
        })
        .collect()
}
