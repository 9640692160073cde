//! prepare's sink for the engine: progress into the job log, every milestone into the job
//! state, saved before the engine goes on so that cleanup can always find the VM.

use std::time::Duration;

use crate::commands::Context;
use crate::error::Result;
use crate::joblog;
use crate::marker::Marker;
use crate::state::{JobState, LeftVm, Phase};
use crate::vm::{Log, Milestone, Sink};

/// The engine's sink for a job: progress into the job log, every milestone into the job state
/// (saved before the engine goes on, so cleanup can always find the VM).
pub(super) struct JobRecord<'a> {
    context: &'a Context,
    pub vm_name: String,
    marker: String,
    /// Recorded in the state; known once the template is resolved.
    pub template_vmid: Option<u32>,
    /// The node placement chose for the current attempt.
    pub node: Option<String>,
    /// The template's node when the VM goes elsewhere (a clone with `target`).
    pub template_node: Option<String>,
    /// VMs of failed node attempts that could not be removed: kept in every state saved, so
    /// that cleanup removes them too.
    pub left_behind: Vec<LeftVm>,
    /// Set (and saved) before a clone request; `None` until then.
    pub state: Option<JobState>,
    /// What prepare is doing, for the message when it fails or is cancelled.
    pub step: &'static str,
    pub timings: Vec<(&'static str, Duration)>,
}

impl<'a> JobRecord<'a> {
    pub fn new(context: &'a Context, marker: &Marker) -> JobRecord<'a> {
        JobRecord {
            context,
            vm_name: super::name::vm_name(&context.job),
            marker: marker.render(),
            template_vmid: None,
            template_node: None,
            node: None,
            left_behind: Vec::new(),
            state: None,
            step: "starting",
            timings: Vec::new(),
        }
    }

    fn save(&mut self, change: impl FnOnce(&mut JobState)) -> Result<()> {
        match &mut self.state {
            Some(state) => {
                change(state);
                state.save(&self.context.job_dir)
            }
            None => Ok(()),
        }
    }

    /// The job's VM from here on: `vm`, cloned (`cloned`: the clone request comes next, so a
    /// VM may appear there while the clone task runs) or a warm VM being claimed (there
    /// already; nothing to wait for).
    fn record(&mut self, vm: &crate::vm::VmRef, cloned: bool) -> Result<()> {
        let state = JobState {
            node: vm.node.clone(),
            vmid: vm.vmid,
            phase: Phase::Allocated,
            vm_name: self.vm_name.clone(),
            marker: self.marker.clone(),
            template_vmid: self.template_vmid,
            template_node: self.template_node.clone(),
            left_behind: self.left_behind.clone(),
            ip: None,
            ssh_port: None,
            ssh_user: None,
            host_keys: Vec::new(),
            host_key_source: None,
            ssh_key_nonce: None,
            ssh_key_fleet: None,
            lost: None,
            // Saved as sent before it is: from here on, a VM may appear at this VMID.
            clone_sent_at: cloned.then(crate::joblog::now_epoch),
            clone_upid: None,
        };
        state.save(&self.context.job_dir)?;
        self.state = Some(state);
        Ok(())
    }
}

impl Log for JobRecord<'_> {
    fn info(&self, message: &str) {
        joblog::info(message);
    }

    fn warn(&self, message: &str) {
        joblog::warn(message);
    }
}

impl Sink for JobRecord<'_> {
    fn step(&mut self, step: &'static str) {
        self.step = step;
    }

    fn timing(&mut self, phase: &'static str, took: Duration) {
        self.timings.push((phase, took));
    }

    fn reached(&mut self, milestone: Milestone<'_>) -> Result<()> {
        match milestone {
            Milestone::Allocated(vm) => self.record(vm, true),
            Milestone::Claiming(vm) => self.record(vm, false),
            Milestone::Released => {
                self.state = None;
                // The file stays while it names VMs of failed node attempts; the released
                // VMID it still names is harmless (cleanup checks the ownership marker).
                if self.left_behind.is_empty() {
                    JobState::remove(&self.context.job_dir)
                } else {
                    Ok(())
                }
            }
            Milestone::CloneStarted(upid) => {
                self.save(|state| state.clone_upid = Some(upid.raw.clone()))
            }
            Milestone::Cloned => self.save(|state| state.phase = Phase::Cloned),
            Milestone::Started => self.save(|state| state.phase = Phase::Started),
            Milestone::Ready(ready) => self.save(|state| {
                state.ip = Some(ready.ip.to_string());
                state.ssh_port = Some(ready.ssh_port);
                state.ssh_user = Some(ready.ssh_user.clone());
                state.host_keys = ready.host_keys.clone();
                state.host_key_source = Some(ready.host_key_source.as_str().to_string());
                (state.ssh_key_nonce, state.ssh_key_fleet) = match &ready.key {
                    crate::vm::ssh_key::KeyPath::Derived { nonce, fleet } => {
                        (Some(nonce.clone()), fleet.clone())
                    }
                    crate::vm::ssh_key::KeyPath::Static => (None, None),
                };
                state.phase = Phase::Ready;
            }),
        }
    }
}
