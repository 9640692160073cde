//! When a requested clone can no longer create its VM. qemu-server's clone API forks its worker
//! first and answers the UPID; the worker takes its locks and only then writes the new VM's
//! config (`lock: clone`), and joins the pool as its last step. So a VMID that reads as missing
//! right after the request may still become a VM: it counts as gone only once the clone task
//! has ended, or when the request never left.

use std::time::{Duration, Instant};

use super::{task, Log, VmRef};
use crate::error::{Error, Result};
use crate::joblog;
use crate::proxmox::{Client, TaskOutcome, Upid};

/// How long after a clone request whose answer never came its worker may still appear in the
/// node's task list (the API forks the worker before it answers; the request may have been
/// in flight when we stopped listening).
pub const CLONE_START_GRACE: Duration = Duration::from_secs(5);
/// Clock difference between the runner host and the node tolerated when matching tasks by
/// start time.
const CLOCK_SLACK_SECS: u64 = 60;

/// What is known about the clone that may create a VM: the caller records it (prepare in the
/// job state) as the clone goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneTrace {
    pub vm: VmRef,
    /// The template it is cloned from (the task list names the source).
    pub template: Option<u32>,
    /// The template's node, where the clone task runs: another node than the VM's for a clone
    /// with `target`. `None`: the VM's node (job states written before clones had a target).
    pub template_node: Option<String>,
    /// When the clone request left (Unix seconds); `None`: never sent.
    pub sent_at: Option<u64>,
    /// The clone task, once the API answered.
    pub upid: Option<String>,
}

/// What became of the clone a [`CloneTrace`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneEnd {
    /// The request never left: nothing can appear.
    NeverSent,
    /// The task ended (`Some(error)` when it failed: PVE removed what it had made).
    Ended(Option<String>),
    /// The answer never came, and no clone task that could be ours runs any more.
    NoneRunning,
}

/// Waits (until `deadline`) until the clone named by `trace` cannot create a VM any more.
pub async fn wait_clone_settled(
    client: &Client,
    trace: &CloneTrace,
    deadline: Instant,
    log: &dyn Log,
) -> Result<CloneEnd> {
    let Some(sent_at) = trace.sent_at else {
        return Ok(CloneEnd::NeverSent);
    };
    let vmid = trace.vm.vmid;
    let node = trace.vm.node.as_str();
    let context = || format!("waiting for the clone into VM {vmid} on node {node}");
    if let Some(upid) = trace.upid.as_deref().and_then(Upid::parse) {
        let status = client
            .task_status(&upid)
            .await
            .map_err(|err| Error::api(context(), err))?;
        // Nearly always over by now (cleanup comes after the stages): no second look.
        let outcome = match status.outcome() {
            Some(outcome) => outcome,
            None => {
                log.info(&format!(
                    "the clone into VM {vmid} still runs; waiting for its task to end first"
                ));
                task::wait_running(client, &upid, deadline, log)
                    .await
                    .map_err(|err| Error::api(context(), err))?
            }
        };
        return Ok(CloneEnd::Ended(match outcome {
            TaskOutcome::Ok | TaskOutcome::Warnings(_) => None,
            TaskOutcome::Failed(message) => Some(message),
        }));
    }
    // The answer was lost (or we were stopped before it came): any clone of the template that
    // started around our request may be ours. Wait until none runs.
    let Some(template) = trace.template else {
        return Ok(CloneEnd::NoneRunning);
    };
    let started = Instant::now();
    let mut announced = false;
    let task_node = trace.template_node.as_deref().unwrap_or(node);
    loop {
        let candidates = client
            .running_clone_tasks(task_node, template)
            .await
            .map_err(|err| Error::api(context(), err))?
            .into_iter()
            .filter(|task| task.start_epoch() + CLOCK_SLACK_SECS >= sent_at)
            .count();
        let settled = crate::joblog::now_epoch() >= sent_at + CLONE_START_GRACE.as_secs();
        if candidates == 0 && settled {
            return Ok(CloneEnd::NoneRunning);
        }
        if Instant::now() >= deadline {
            return Err(Error::Proxmox {
                context: context(),
                message: format!(
                    "the clone request's answer never came and {candidates} clone task(s) of \
                     template {template} still run after {}; the job state keeps VM {vmid} for \
                     cleanup",
                    joblog::secs(started.elapsed())
                ),
            });
        }
        if !announced {
            log.info(&format!(
                "the answer to the clone into VM {vmid} never came; waiting for the clone tasks \
                 of template {template} to end before judging VM {vmid}"
            ));
            announced = true;
        }
        let pause = Duration::from_millis(200).min(deadline - Instant::now());
        tokio::time::sleep(pause).await;
    }
}
