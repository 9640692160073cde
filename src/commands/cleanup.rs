//! cleanup_exec: destroy the job's VM, always, idempotently, in bounded time. Its output goes
//! to the runner's own log. It succeeds when no VM of this job is left: after a full prepare, a
//! half-finished one, a second cleanup, or no prepare at all.

use std::time::{Duration, Instant};

use crate::commands::Context;
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::Marker;
use crate::proxmox::Client;
use crate::state::{JobState, LeftVm};
use crate::vm::teardown::{self, Teardown};
use crate::vm::StderrLog;

pub async fn cleanup(context: &Context) -> Result<()> {
    let Some(state) = JobState::load(&context.job_dir)? else {
        joblog::info("no job state: prepare created no VM, nothing to clean up");
        return Ok(());
    };
    let (vmid, node) = (state.vmid, state.node.as_str());
    let Some(marker) = Marker::parse_line(&state.marker) else {
        return Err(Error::Infrastructure(format!(
            "the job state's ownership marker is damaged, so VM {vmid} on {node} cannot be \
             proven to be this job's; left alone (gitlab-proxmox-runner gc will judge it)"
        )));
    };
    let client = Client::new(&context.settings.api)?;
    // VM_CLEANUP_TIMEOUT (default 7 min) waits out a full clone's or a backup's lock and still
    // finishes, saying why, before a `cleanup_exec_timeout` of 10 minutes (the README's) kills
    // us. The hard stop a little later covers a request that hangs past the deadline.
    let budget = context.settings.cleanup_timeout;
    let deadline = Instant::now() + budget;
    let trace = state.clone_trace();
    let outcome = tokio::time::timeout(
        budget + budget.min(Duration::from_secs(30)),
        teardown::destroy_traced_vm(&client, &trace, &marker, deadline, &StderrLog),
    )
    .await
    .map_err(|_| {
        Error::Infrastructure(format!(
            "gave up destroying VM {vmid} on {node} after {} s (VM_CLEANUP_TIMEOUT); \
             gitlab-proxmox-runner gc will retry",
            budget.as_secs()
        ))
    })??;
    let left = remove_left_behind(&client, &state.left_behind, deadline)
        .await
        .len();
    if left > 0 {
        joblog::warn(format!(
            "{left} VM(s) of failed node attempts could not be removed yet; gitlab-proxmox-runner \
             gc removes them once their node is back (they carry this job's deadline)"
        ));
    }
    match outcome {
        Teardown::Destroyed => {}
        Teardown::AlreadyGone => joblog::info(format!(
            "VM {vmid} on {node} does not exist (never created or already removed); nothing to do"
        )),
        Teardown::NotOurs(reason) => joblog::warn(format!(
            "VM {vmid} on {node} is not the VM this job created ({reason}); left it alone"
        )),
    }
    JobState::remove(&context.job_dir)
}

/// Removes the VMs that failed node attempts of a prepare left, each after the ownership
/// check against its own marker; returns those that could not be removed by `deadline`.
pub(crate) async fn remove_left_behind(
    client: &Client,
    left: &[LeftVm],
    deadline: Instant,
) -> Vec<LeftVm> {
    let mut remaining = Vec::new();
    for vm in left {
        let Some(marker) = Marker::parse_line(&vm.marker) else {
            joblog::warn(format!(
                "VM {} on {} (left by a failed node attempt) has a damaged marker in the job \
                 state; left for gitlab-proxmox-runner gc",
                vm.vmid, vm.node
            ));
            continue;
        };
        let trace = vm.clone_trace();
        match teardown::destroy_traced_vm(client, &trace, &marker, deadline, &StderrLog).await {
            Ok(Teardown::NotOurs(reason)) => joblog::warn(format!(
                "VM {} on {} is not the VM a failed node attempt created ({reason}); left it alone",
                vm.vmid, vm.node
            )),
            Ok(_) => {}
            Err(err) => {
                joblog::warn(format!(
                    "could not remove VM {} on {}, left by a failed node attempt: {err}",
                    vm.vmid, vm.node
                ));
                remaining.push(vm.clone());
            }
        }
    }
    remaining
}
