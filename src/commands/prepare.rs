//! prepare_exec, in the order of the protocol: remove what an earlier attempt of this job left,
//! resolve the template, provision a VM (clone, configure, start), wait until it is ready
//! (agent address, host keys, SSH, runner helper). The engine ([`crate::vm`]) does the work;
//! this hook names the VM after the job, keeps the job state in step with every milestone, and
//! on any failure (or SIGTERM) destroys what was created, exactly as cleanup would.

mod name;
mod record;

use std::collections::HashSet;
use std::time::{Duration, Instant};

pub use name::vm_name;
use record::JobRecord;

use crate::commands::Context;
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::Marker;
use crate::pool::claim::Claimed;
use crate::proxmox::Client;
use crate::state::{JobState, LeftVm};
use crate::vm::failover::{self, NodeAttempts};
use crate::vm::placement::Strategy;
use crate::vm::provision::Order;
use crate::vm::teardown::{self, Teardown};
use crate::vm::{self, template, Sink, StderrLog};

/// Removing what a failed prepare created (waits for a clone lock included).
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The same after SIGTERM: gitlab-runner sends SIGKILL `graceful_kill_timeout` later (the
/// README recommends 30 s). What rollback cannot finish in time stays in the job state for
/// cleanup, which the runner runs next.
const CANCELLED_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(20);
/// Removing the VM of a node that just failed: if the node does not answer within this, the
/// VM stays in the job state for cleanup and prepare goes on elsewhere.
const FAILED_NODE_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn prepare(context: &Context) -> Result<()> {
    for warning in &context.settings.trust_warnings {
        joblog::warn(warning);
    }
    // Without a fleet key every VM takes the static key; with one, a template without
    // cloud-init still does, which is checked once placement has chosen the template.
    if context.settings.fleet_key.is_none() {
        context.settings.require_ssh_key()?;
    }
    // Parsed and decrypted before anything is claimed or cloned: a key (or passphrase) the job
    // supplied that does not parse fails the job here (a build failure), with nothing to undo
    // and no warm VM spent on it.
    if context.settings.ssh.private_key.is_some() {
        drop(crate::ssh::load_private_key(&context.settings.ssh)?);
    }
    let client = Client::new(&context.settings.api)?;
    let left_behind = remove_earlier_attempt(&client, context).await?;

    let settings = &context.settings;
    let marker = Marker::for_job(&context.job, &settings.runner_id, settings.max_job_timeout);
    let mut job = JobRecord::new(context, &marker);
    job.left_behind = left_behind;
    let finished = tokio::select! {
        result = bring_up(&client, context, &marker, &mut job) => Some(result),
        _ = context.cancel.cancelled() => None,
    };
    let result = finished.unwrap_or_else(|| {
        Err(Error::Cancelled(format!(
            "prepare was cancelled ({}) while {}",
            context.cancel.reason().unwrap_or("cancelled"),
            job.step
        )))
    });
    if let Err(err) = result {
        if let Some(state) = job.state.take() {
            joblog::info(format!(
                "prepare failed while {}; removing VM {} on {}",
                job.step, state.vmid, state.node
            ));
            rollback(&client, context, &state, &marker).await;
        }
        return Err(err);
    }
    Ok(())
}

async fn bring_up(
    client: &Client,
    context: &Context,
    marker: &Marker,
    job: &mut JobRecord<'_>,
) -> Result<()> {
    let strategy = Strategy::of(&context.settings);
    let mut attempts = JobAttempts {
        client,
        context,
        marker,
        job,
    };
    failover::fail_over(strategy, &mut attempts).await
}

/// prepare's tries at a VM: each keeps the job state in step, and a failed node's VM is
/// removed or left to cleanup.
struct JobAttempts<'a, 'j> {
    client: &'a Client,
    context: &'a Context,
    marker: &'a Marker,
    job: &'a mut JobRecord<'j>,
}

impl NodeAttempts for JobAttempts<'_, '_> {
    async fn attempt(&mut self, avoid: &HashSet<String>) -> Result<()> {
        bring_up_on_a_node(self.client, self.context, self.marker, self.job, avoid).await
    }

    fn failed_nodes(&mut self) -> (Option<String>, Option<String>) {
        (self.job.node.take(), self.job.template_node.take())
    }

    fn step(&self) -> String {
        self.job.step.to_string()
    }

    async fn give_up(&mut self) -> Result<()> {
        give_up_vm(self.client, self.context, self.marker, self.job).await
    }

    fn warn(&self, message: &str) {
        joblog::warn(message);
    }
}

/// Removes the VM of a failed node attempt in a short time, or keeps it in the job state for
/// cleanup (its node may be back by then; if not, gc removes it past its deadline).
async fn give_up_vm(
    client: &Client,
    context: &Context,
    marker: &Marker,
    job: &mut JobRecord<'_>,
) -> Result<()> {
    let Some(state) = job.state.take() else {
        return Ok(());
    };
    let deadline = Instant::now() + FAILED_NODE_ROLLBACK_TIMEOUT;
    let left = state.as_left_vm();
    let removed =
        teardown::destroy_traced_vm(client, &left.clone_trace(), marker, deadline, &StderrLog)
            .await;
    match removed {
        Ok(_) if job.left_behind.is_empty() => JobState::remove(&context.job_dir)?,
        Ok(_) => {}
        Err(err) => {
            joblog::warn(format!(
                "could not remove VM {} on {} yet ({err}); cleanup will try again",
                left.vmid, left.node
            ));
            // The state file names it already (as its VM); the next attempt's state lists it
            // with the others.
            job.left_behind.push(left);
        }
    }
    Ok(())
}

async fn bring_up_on_a_node(
    client: &Client,
    context: &Context,
    marker: &Marker,
    job: &mut JobRecord<'_>,
    avoid: &HashSet<String>,
) -> Result<()> {
    let settings = &context.settings;
    let total = Instant::now();
    job.timings.clear();

    job.step("resolving the template");
    let placed = Strategy::of(settings)
        .place(client, settings, &settings.template, avoid)
        .await?;
    if let Some(reason) = &placed.reason {
        joblog::info(reason);
    }
    let template = &placed.template;
    let mode = template::clone_mode(settings, template)?;
    job.template_vmid = Some(template.vmid);
    job.template_node = (template.node != placed.node).then(|| template.node.clone());
    job.node = Some(placed.node.clone());
    job.timing("template", total.elapsed());

    let name = job.vm_name.clone();
    let own_key = settings
        .ssh
        .private_key
        .as_ref()
        .is_some_and(|key| key.from_job);
    if settings.ssh.private_key.is_none() {
        // No static key to fall back on: a template that would need it fails the job now,
        // before a warm VM is claimed or a clone made for nothing (one read, only then).
        let config = client
            .vm_config(&template.node, template.vmid)
            .await
            .map_err(|err| Error::api(format!("reading template {}", template.label), err))?
            .unwrap_or_default();
        crate::vm::ssh_key::choose(settings, &template.label, &config, Some(&marker.nonce))?;
    }
    if own_key && settings.fleet_key.is_some() {
        joblog::info(
            "the job supplies its own VM_SSH_PRIVATE_KEY: its clone keeps the template's SSH \
             keys (no per-VM key)",
        );
    }
    let has_pool = crate::pool::has_pool(settings, &settings.template);
    if has_pool && own_key {
        joblog::info(
            "the job supplies its own VM_SSH_PRIVATE_KEY, which warm VMs do not accept; cloning \
             a VM for it",
        );
    }
    let mut report = None;
    if has_pool && !own_key {
        let claimed = crate::pool::claim::claim(
            client,
            settings,
            &placed,
            marker,
            &name,
            &context.cancel,
            job,
        )
        .await?;
        if let Claimed::Ready(_) = claimed {
            return Ok(());
        }
        // The clone tells the pool service (its metrics) that this job found none.
        report = claimed.report(template.vmid);
        joblog::info("no warm VM to claim; cloning one");
    }
    let order = Order {
        template,
        node: &placed.node,
        mode,
        name: &name,
        marker,
        claim: report.as_ref(),
        // A job's own key is for its own clone: nothing of the fleet's is derived for it.
        key_nonce: (!own_key && settings.fleet_key.is_some()).then_some(marker.nonce.as_str()),
    };
    let ready = vm::bring_up(client, settings, &order, &context.cancel, job)
        .await?
        .ready;

    let phases: Vec<String> = job
        .timings
        .iter()
        .map(|(name, took)| format!("{name} {}", joblog::secs(*took)))
        .collect();
    joblog::info(format!(
        "VM {} ({name}) ready at {}:{} in {}: {}",
        ready.vm.vmid,
        ready.ip,
        ready.ssh_port,
        joblog::secs(total.elapsed()),
        phases.join(", ")
    ));
    Ok(())
}

/// gitlab-runner retries a failed prepare in the same job directory, running cleanup in
/// between; if that cleanup could not finish, the earlier attempt's VM is still named by the
/// state. Remove it before the state is overwritten, or nothing would ever find it again.
/// Returns the VMs of failed node attempts it could not remove yet: the new attempt's job
/// state keeps them.
async fn remove_earlier_attempt(client: &Client, context: &Context) -> Result<Vec<LeftVm>> {
    let Some(earlier) = JobState::load(&context.job_dir)? else {
        return Ok(Vec::new());
    };
    let mut left_behind = Vec::new();
    let (vmid, node) = (earlier.vmid, earlier.node.as_str());
    joblog::info(format!(
        "an earlier prepare attempt of this job left VM {vmid} on {node}; removing it first"
    ));
    match Marker::parse_line(&earlier.marker) {
        Some(marker) => {
            let deadline = Instant::now() + ROLLBACK_TIMEOUT;
            let trace = earlier.clone_trace();
            let outcome =
                teardown::destroy_traced_vm(client, &trace, &marker, deadline, &StderrLog).await?;
            if let Teardown::NotOurs(reason) = outcome {
                joblog::warn(format!(
                    "VM {vmid} on {node} is not the one the earlier attempt created ({reason}); \
                     left it alone"
                ));
            }
            left_behind =
                super::cleanup::remove_left_behind(client, &earlier.left_behind, deadline).await;
        }
        None => joblog::warn(format!(
            "the earlier attempt's job state has a damaged ownership marker, so VM {vmid} on \
             {node} cannot be proven to be this job's; left for gitlab-proxmox-runner gc"
        )),
    }
    JobState::remove(&context.job_dir)?;
    Ok(left_behind)
}

/// Destroys what prepare created, with cleanup's logic. Never fails: if it cannot finish, the
/// job state stays for cleanup (which the runner runs after every failed prepare).
async fn rollback(client: &Client, context: &Context, state: &JobState, marker: &Marker) {
    let (vmid, node) = (state.vmid, state.node.as_str());
    let budget = if context.cancel.is_cancelled() {
        CANCELLED_ROLLBACK_TIMEOUT
    } else {
        ROLLBACK_TIMEOUT
    };
    let deadline = Instant::now() + budget;
    let trace = state.clone_trace();
    match teardown::destroy_traced_vm(client, &trace, marker, deadline, &StderrLog).await {
        Ok(outcome) => {
            if let Teardown::NotOurs(reason) = outcome {
                joblog::warn(format!(
                    "VM {vmid} on {node} is not the VM this job created ({reason}); left it alone"
                ));
            }
            let left =
                super::cleanup::remove_left_behind(client, &state.left_behind, deadline).await;
            // What could not be removed stays in the state for cleanup.
            if left.is_empty() {
                if let Err(err) = JobState::remove(&context.job_dir) {
                    joblog::warn(err.to_string());
                }
            }
        }
        Err(err) => joblog::warn(format!(
            "could not remove VM {vmid} on {node} after the failure ({err}); cleanup will try \
             again"
        )),
    }
}
