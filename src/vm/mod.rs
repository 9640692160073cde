//! The VM engine: everything it takes to turn a template into a VM that answers SSH, and to
//! remove it again, with no knowledge of hooks or jobs. prepare drives it today; a warm-pool
//! service, a preflight check or multi-node placement drive the same calls.
//!
//! - [`mod@bring_up`]: provision then ready, the one bring-up every caller uses;
//! - [`template`]: which template VM a requested name means, and the clone mode it allows;
//! - [`provision`]: a free VMID, the clone (with its clash and retry logic), configure, start;
//! - [`ready`]: the guest agent's address, the host keys read through the agent, SSH, the
//!   runner helper;
//! - [`ssh_key`]: which SSH key a VM accepts (its own, derived, or the static one);
//! - [`teardown`]: the one safe way to destroy a VM of ours;
//! - [`clone_slots`]: the per-host cap on clones in flight;
//! - [`host_keys`]: whether a VM's SSH host keys are its own (clones of an uncleaned template
//!   share them);
//! - [`failover`]: another node when the one under a VM fails;
//! - [`placement`]: which node of `PROXMOX_NODES` a VM goes to, and its template there;
//! - [`task`]: waiting for a Proxmox task.
//!
//! Waiting for the API to report a state (a task's end, the agent's address, a free clone
//! slot, a VM gone) goes through [`crate::poll`] (deadline, pause schedule, progress lines).
//! The pauses between retries are plain sleeps, each bounded by its caller's deadline: the
//! first look before such a poll starts ([`task`], [`ready`]), a transient clone failure retried
//! ([`provision`]), the clone tasks watched after a lost clone answer ([`clone_watch`]), host
//! keys read again until cloud-init writes them ([`ready`]), and teardown's retries
//! ([`teardown`]).
//!
//! The node is always a parameter: nothing here reads where a VM should go from the settings.
//! The engine reports through the caller's [`Log`] and, while provisioning, its [`Sink`]:
//! prepare writes the job log and the job state; another caller logs elsewhere.

pub mod bring_up;
pub mod clone_slots;
pub mod clone_watch;
pub mod failover;
pub mod host_keys;
pub mod ownership;
pub mod placement;
pub mod provision;
pub mod ready;
pub mod ssh_key;
pub mod task;
pub mod teardown;
pub mod template;

pub use bring_up::{bring_up, BroughtUp};

use std::net::IpAddr;
use std::time::Duration;

use crate::error::Result;

pub use crate::proxmox::VmRef;

/// Where the engine's progress lines go.
pub trait Log: Sync {
    fn info(&self, message: &str);
    fn warn(&self, message: &str);
}

/// The hooks' and gc's log: stderr, in [`crate::joblog`]'s format.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrLog;

impl Log for StderrLog {
    fn info(&self, message: &str) {
        crate::joblog::info(message);
    }

    fn warn(&self, message: &str) {
        crate::joblog::warn(message);
    }
}

/// How far a VM got while the engine brings it up.
#[derive(Debug)]
pub enum Milestone<'a> {
    /// A VMID was chosen and the clone request comes next: record it now, so that whatever
    /// happens later the VM can be found and removed.
    Allocated(&'a VmRef),
    /// The clone request for the VMID of the last `Allocated` was answered with this task:
    /// until it ends, a missing VM there is not a gone one.
    CloneStarted(&'a crate::proxmox::Upid),
    /// A warm VM is about to be claimed (compare-and-swap of its description to the job's
    /// marker): record it now, before the swap, so that a kill at any instant of the claim
    /// leaves a VM that cleanup finds. No clone is involved: nothing to wait for.
    Claiming(&'a VmRef),
    /// The VMID chosen last was given up: nothing of ours is left there.
    Released,
    /// The clone task finished: the VM exists.
    Cloned,
    Started,
    /// The VM answered over SSH with the host keys in `ReadyVm`.
    Ready(&'a ReadyVm),
}

/// A sink seen as its log (trait upcasting needs a newer Rust than the crate's MSRV).
pub(crate) struct SinkLog<'a>(pub &'a dyn Sink);

impl Log for SinkLog<'_> {
    fn info(&self, message: &str) {
        self.0.info(message);
    }

    fn warn(&self, message: &str) {
        self.0.warn(message);
    }
}

/// What the caller of [`provision`] and [`ready`] learns while they run.
pub trait Sink: Log {
    /// The step the engine is in now, in words for a message ("cloning the template").
    fn step(&mut self, step: &'static str);
    /// How long a phase took ("clone", "agent+IP", ...), for a summary.
    fn timing(&mut self, phase: &'static str, took: Duration);
    /// A milestone; an error stops the engine (e.g. the job state could not be written).
    fn reached(&mut self, milestone: Milestone<'_>) -> Result<()>;
    /// The host keys the agent read first were replaced at first boot: those were the
    /// template's own (cloned with its disk), which no VM may end up with.
    fn host_keys_replaced(&mut self, _template_keys: &[String]) {}
}

/// Where a ready VM's SSH server is and which host keys it proved to have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyVm {
    pub vm: VmRef,
    pub ip: IpAddr,
    pub ssh_port: u16,
    pub ssh_user: String,
    /// OpenSSH public key lines (`ssh-ed25519 AAAA...`), to pin for every later connection.
    pub host_keys: Vec<String>,
    pub host_key_source: HostKeySource,
    /// The SSH key it accepts.
    pub key: ssh_key::KeyPath,
}

impl ReadyVm {
    /// Where its SSH server answered, for a new connection.
    pub fn ssh_target(&self) -> crate::ssh::Target {
        crate::ssh::Target {
            host: self.ip.to_string(),
            port: self.ssh_port,
            user: self.ssh_user.clone(),
            vm_label: self.vm.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeySource {
    /// Read through the guest agent before the first connection.
    GuestAgent,
    /// Accepted on first connection (VM_SSH_HOST_KEY_POLICY allows it).
    FirstUse,
}

impl HostKeySource {
    /// The job state's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            HostKeySource::GuestAgent => "guest-agent",
            HostKeySource::FirstUse => "first-use",
        }
    }
}
