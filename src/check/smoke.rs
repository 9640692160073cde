//! `check --smoke`: one throwaway VM through the same engine the hooks use — clone, start,
//! the guest agent's address, the host key through the agent (and that no warm VM on the
//! cluster pins the same key), SSH, `sudo -n true` — then
//! destroyed with cleanup's teardown, each phase timed. The VM is recorded before its clone is
//! requested, so that whatever stops the test (a failure, SIGTERM) it is removed; were this
//! process killed outright, its marker carries a deadline one hour out, after which `gc`
//! sweeps it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::job::JobInfo;
use crate::joblog;
use crate::marker::Marker;
use crate::proxmox::Client;
use crate::ssh::{Connection, HostKeyCheck};
use crate::vm::clone_watch::CloneTrace;
use crate::vm::host_keys::{self, Holder};
use crate::vm::provision::Order;
use crate::vm::teardown::{self, Teardown};
use crate::vm::{
    placement, template, HostKeySource, Log, Milestone, ReadyVm, Sink, StderrLog, VmRef,
};

/// The longest a smoke VM may live by its marker: `gc` removes it after this (plus gc's margin)
/// if the check never could.
const SMOKE_LIFETIME: Duration = Duration::from_secs(3600);
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const VM_NAME: &str = "gpr-check-smoke";

/// How the smoke test went.
#[derive(Debug)]
pub struct Smoke {
    /// `Ok(summary)` or the failure, with the step it happened in.
    pub result: std::result::Result<String, (String, Error)>,
    /// SIGTERM/SIGINT stopped it (the VM was still removed).
    pub interrupted: Option<&'static str>,
    pub phases: Vec<(&'static str, Duration)>,
    /// The VM that could not be removed, and why.
    pub left_behind: Option<(VmRef, String)>,
    pub host_key_source: Option<HostKeySource>,
}

#[derive(Default)]
struct SmokeSink {
    /// The template being cloned, for the clone trace.
    template: Option<u32>,
    /// The template's node when the VM goes to another one (a clone with `target`): where the
    /// clone task runs, which the teardown must ask about a clone whose answer was lost.
    template_node: Option<String>,
    /// What was created, for the teardown: the VM and its clone request.
    trace: Option<CloneTrace>,
    step: &'static str,
    phases: Vec<(&'static str, Duration)>,
    /// Why placement chose the VM's node (`PROXMOX_NODES`); `None` on `PROXMOX_NODE`.
    placed: Option<String>,
    /// Which SSH key the VM took, and whether the static one opens it too.
    key_note: String,
}

impl Log for SmokeSink {
    fn info(&self, message: &str) {
        StderrLog.info(message);
    }

    fn warn(&self, message: &str) {
        StderrLog.warn(message);
    }
}

impl Sink for SmokeSink {
    fn step(&mut self, step: &'static str) {
        self.step = step;
    }

    fn timing(&mut self, phase: &'static str, took: Duration) {
        self.phases.push((phase, took));
    }

    fn reached(&mut self, milestone: Milestone<'_>) -> Result<()> {
        match milestone {
            Milestone::Allocated(vm) => {
                self.trace = Some(CloneTrace {
                    vm: vm.clone(),
                    template: self.template,
                    template_node: self.template_node.clone(),
                    // Counted as sent before it is: from here on, a VM may appear there.
                    sent_at: Some(crate::joblog::now_epoch()),
                    upid: None,
                })
            }
            Milestone::CloneStarted(upid) => {
                if let Some(trace) = &mut self.trace {
                    trace.upid = Some(upid.raw.clone());
                }
            }
            Milestone::Released => self.trace = None,
            Milestone::Claiming(_)
            | Milestone::Cloned
            | Milestone::Started
            | Milestone::Ready(_) => {}
        }
        Ok(())
    }
}

pub async fn run(client: &Client, settings: &Settings, cancel: &Cancel) -> Smoke {
    let marker = Marker::for_job(&JobInfo::default(), &settings.runner_id, SMOKE_LIFETIME);
    let mut sink = SmokeSink {
        step: "resolving the template",
        ..SmokeSink::default()
    };
    let finished = tokio::select! {
        result = bring_up(client, settings, &marker, cancel, &mut sink) => Some(result),
        _ = cancel.cancelled() => None,
    };
    let interrupted = finished
        .is_none()
        .then(|| cancel.reason().unwrap_or("cancelled"));
    let step = sink.step.to_string();
    let outcome = match finished {
        Some(Ok((ready, took))) => Ok((ready, took)),
        Some(Err(err)) => Err((step.clone(), err)),
        None => Err((
            step.clone(),
            Error::Cancelled(format!(
                "the smoke test was interrupted ({}) while {step}",
                interrupted.unwrap_or("cancelled")
            )),
        )),
    };
    // Removal is not raced against the signal: a second SIGTERM must not leave the VM.
    let mut left_behind = None;
    let mut destroyed = false;
    if let Some(trace) = sink.trace.take() {
        let started = Instant::now();
        let vm = trace.vm.clone();
        joblog::info(format!("smoke test: removing {vm}"));
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        match teardown::destroy_traced_vm(client, &trace, &marker, deadline, &StderrLog).await {
            Ok(Teardown::Destroyed | Teardown::AlreadyGone) => destroyed = true,
            Ok(Teardown::NotOurs(reason)) => {
                left_behind = Some((vm, format!("it changed hands ({reason}); left alone")))
            }
            Err(err) => left_behind = Some((vm, err.to_string())),
        }
        sink.phases.push(("destroy", started.elapsed()));
    }
    let host_key_source = outcome
        .as_ref()
        .ok()
        .map(|(ready, _)| ready.host_key_source);
    // "placed on pve2: 41 GiB free, 0 job VMs" → " (placed there by PROXMOX_NODES: 41 GiB ...)"
    let placed = sink.placed.as_deref().map_or_else(String::new, |reason| {
        let why = reason.split_once(": ").map_or(reason, |(_, why)| why);
        format!(" (placed there by PROXMOX_NODES: {why})")
    });
    let result = outcome.map(|(ready, took)| {
        format!(
            "smoke test: VM {} on {}{placed} cloned, started, reachable at {}:{}, host key {}, \
             `sudo -n true` as {} works, {}, {} ({} in all)",
            ready.vm.vmid,
            ready.vm.node,
            ready.ip,
            ready.ssh_port,
            match ready.host_key_source {
                HostKeySource::GuestAgent => "read through the guest agent",
                HostKeySource::FirstUse =>
                    "NOT readable through the guest agent (trusted on first use)",
            },
            ready.ssh_user,
            sink.key_note,
            if destroyed {
                "destroyed"
            } else {
                "NOT destroyed"
            },
            joblog::secs(took)
        )
    });
    Smoke {
        result,
        interrupted,
        phases: sink.phases,
        left_behind,
        host_key_source,
    }
}

async fn bring_up(
    client: &Client,
    settings: &Settings,
    marker: &Marker,
    cancel: &Cancel,
    sink: &mut SmokeSink,
) -> Result<(ReadyVm, Duration)> {
    let total = Instant::now();
    // The node the way prepare chooses it, so that with PROXMOX_NODES the test shows where a
    // job would go now.
    let placed = placement::Strategy::of(settings)
        .place(client, settings, &settings.template, &HashSet::new())
        .await?;
    sink.placed = placed.reason;
    let template = placed.template;
    let mode = template::clone_mode(settings, &template)?;
    sink.template = Some(template.vmid);
    sink.template_node = (template.node != placed.node).then(|| template.node.clone());
    sink.timing("template", total.elapsed());
    // On the node placement chose, as prepare does: for a template on shared storage elsewhere
    // that is a clone with `target`, not a VM on the template's node.
    let order = Order {
        template: &template,
        node: &placed.node,
        mode,
        name: VM_NAME,
        marker,
        claim: None,
        key_nonce: settings
            .fleet_key
            .is_some()
            .then_some(marker.nonce.as_str()),
    };
    let ready = crate::vm::bring_up(client, settings, &order, cancel, sink)
        .await?
        .ready;
    sink.step("comparing the VM's SSH host keys with the warm VMs'");
    own_host_keys(client, settings, &template, &ready, marker, sink).await?;

    sink.step("running `sudo -n true` over SSH");
    let sudo = Instant::now();
    let key = crate::vm::ssh_key::private_key(settings, &ready.vm, &ready.key)?;
    let target = ready.ssh_target();
    let connection = Connection::connect(
        &target,
        Arc::clone(&key),
        &HostKeyCheck::Pinned(ready.host_keys.clone()),
    )
    .await?;
    let output = connection.exec_capture("sudo -n true").await;
    connection.close().await;
    let output = output?;
    if output.status != Some(0) {
        return Err(Error::ssh(
            format!(
                "running `sudo -n true` as {:?} on {}",
                ready.ssh_user, ready.vm
            ),
            format!(
                "sudo wants a password for {:?} (exit {:?}: {}); the SSH user needs \
                 passwordless sudo (NOPASSWD in /etc/sudoers.d/ of the template)",
                ready.ssh_user,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    sink.timing("sudo", sudo.elapsed());
    sink.key_note = key_note(settings, &ready, cancel).await;
    Ok((ready, total.elapsed()))
}

/// With a per-VM key (which just logged in): whether the static key is refused, as it is when
/// the template carries none (nothing baked into its image). A template that still accepts it
/// works, but one leak of that key opens every VM of it: the note says so.
async fn key_note(settings: &Settings, ready: &ReadyVm, cancel: &Cancel) -> String {
    if ready.key == crate::vm::ssh_key::KeyPath::Static {
        return "the static key VM_SSH_PRIVATE_KEY logs in".into();
    }
    let derived = "a per-VM key (cloud-init) logs in";
    if settings.ssh.private_key.is_none() {
        return derived.into();
    }
    let Ok(key) = crate::ssh::load_private_key(&settings.ssh) else {
        return derived.into();
    };
    let check = HostKeyCheck::Pinned(ready.host_keys.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    match crate::ssh::connect_to_running(&ready.ssh_target(), key, &check, deadline, cancel).await {
        Ok(connection) => {
            connection.close().await;
            format!(
                "{derived}, but VM_SSH_PRIVATE_KEY is accepted too (baked into the template's \
                 image: remove it there, see the README's key migration)"
            )
        }
        Err(err) if err.is_authentication_refused() => {
            format!("{derived}, VM_SSH_PRIVATE_KEY is refused")
        }
        Err(err) => format!("{derived}; whether VM_SSH_PRIVATE_KEY is refused is unknown ({err})"),
    }
}

/// Fails when a warm VM of the template on the cluster pins one of the new VM's host keys:
/// the template's clones share one host private key, so pinning proves nothing
/// ([`crate::vm::host_keys`]). The template's own keys cannot be read (a template does not
/// run), and the keys this VM showed before first boot replaced them differ from its own by
/// definition: with no warm VM to compare with, one VM cannot tell, and the pool service
/// compares every VM it warms. A listing that fails is a warning, not a verdict.
async fn own_host_keys(
    client: &Client,
    settings: &Settings,
    template: &template::Template,
    ready: &ReadyVm,
    marker: &Marker,
    log: &dyn Log,
) -> Result<()> {
    // Only warm VMs proven ours count: anyone can write our VM's public host key into a
    // look-alike's description.
    let Some(key) = settings.fleet_key.as_ref() else {
        return Ok(());
    };
    let listed = async {
        let copies = placement::Strategy::of(settings)
            .copies(client, settings, &settings.template)
            .await?;
        crate::pool::list_warm(
            client,
            settings.vmid_range,
            &crate::pool::Scope::of(&copies),
            key,
        )
        .await
    };
    let warm = match listed.await {
        Ok(listing) => listing.warm,
        Err(err) => {
            log.warn(&format!(
                "smoke test: could not list the warm VMs to compare {}'s SSH host keys with \
                 theirs: {err}",
                ready.vm
            ));
            return Ok(());
        }
    };
    let holders: Vec<(Holder, &[String])> = warm
        .iter()
        .map(|warm| {
            let holder = Holder::vm(&warm.vm, &warm.marker.nonce, "warm VM");
            (holder, warm.host_keys.as_slice())
        })
        .collect();
    let found = host_keys::duplicates(
        &ready.host_keys,
        &marker.nonce,
        holders.iter().map(|(holder, keys)| (holder, *keys)),
    );
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Settings(host_keys::cloned_keys_message(
        &ready.vm,
        &template.label,
        &found,
    )))
}
