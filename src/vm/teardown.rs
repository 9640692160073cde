//! Destroying a job's VM safely: the one way cleanup, a failed prepare (and the orphan sweep)
//! remove a VM. It waits for a clone lock to clear (a token cannot `skiplock`), checks the
//! ownership marker before touching anything, hard-stops, then deletes with purge. A VM that
//! does not exist is done; a VM whose marker differs is left alone.

use std::time::{Duration, Instant};

use super::clone_watch::{self, CloneEnd, CloneTrace};
use super::{task, Log};
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::Marker;
use crate::poll::Poll;
use crate::proxmox::{ApiError, Client, Presence};

/// What happened to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Teardown {
    /// We stopped (if needed) and deleted it.
    Destroyed,
    /// It did not exist (never created, or already deleted).
    AlreadyGone,
    /// It exists but is not the VM this job created: left alone. The text says why.
    NotOurs(String),
}

const MAX_ROUNDS: usize = 8;
/// The pause before the second round; it doubles each round up to `MAX_RETRY_PAUSE`, so the
/// rounds ride out about a minute of a busy node.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(500);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(15);

/// Destroys the VM a clone trace names: first waits until its clone (if one was requested) can
/// no longer create it (qemu-server writes the config after answering the clone request), then
/// [`destroy_owned_vm`].
pub async fn destroy_traced_vm(
    client: &Client,
    trace: &CloneTrace,
    expected: &Marker,
    deadline: Instant,
    log: &dyn Log,
) -> Result<Teardown> {
    let settled = clone_watch::wait_clone_settled(client, trace, deadline, log).await?;
    let (node, vmid) = (trace.vm.node.as_str(), trace.vm.vmid);
    let outcome = destroy_owned_vm(client, node, vmid, expected, deadline, log).await?;
    if let (CloneEnd::Ended(Some(error)), Teardown::AlreadyGone) = (&settled, &outcome) {
        log.info(&format!(
            "the clone into VM {vmid} had failed ({error}); PVE removed what it had made"
        ));
    }
    Ok(outcome)
}

/// Destroys VM `vmid` on `node` if its marker equals `expected`, giving up at `deadline`.
pub async fn destroy_owned_vm(
    client: &Client,
    node: &str,
    vmid: u32,
    expected: &Marker,
    deadline: Instant,
    log: &dyn Log,
) -> Result<Teardown> {
    let started = Instant::now();
    // Where the VM is: the caller's node, until the VM turns out to have moved.
    let mut here = node.to_string();
    let mut looked_elsewhere = false;
    let context = || format!("destroying VM {vmid} on node {node}");
    let fail = |err: ApiError| Error::api(context(), err);
    let mut owner_checked = false;
    let mut acted = false;
    let mut stop_time = Duration::ZERO;
    let gone = |acted: bool| {
        if acted {
            Teardown::Destroyed
        } else {
            Teardown::AlreadyGone
        }
    };

    let mut waited_for_clone = false;
    let mut pause = FIRST_RETRY_PAUSE;
    for _ in 0..MAX_ROUNDS {
        let node = here.as_str();
        let status = match client.vm_presence(node, vmid).await.map_err(fail)? {
            Presence::Exists(status) => status,
            Presence::Gone if !acted && !looked_elsewhere => {
                looked_elsewhere = true;
                match moved_to(client, node, vmid).await.map_err(fail)? {
                    Some(elsewhere) => {
                        log.info(&format!(
                            "VM {vmid} is not on {node} but on {elsewhere} (migrated); removing \
                             it there"
                        ));
                        here = elsewhere;
                        continue;
                    }
                    None => return Ok(Teardown::AlreadyGone),
                }
            }
            Presence::Gone => return Ok(gone(acted)),
            // Ours is gone (or never joined the token's pool); another VM holds the id now.
            Presence::Hidden(_) if acted => return Ok(Teardown::Destroyed),
            // Foreign, or ours with a token that lacks VM.Audit on it: nothing proves which.
            Presence::Hidden(err) => {
                return Err(Error::Proxmox {
                    context: context(),
                    message: format!(
                        "a VM holds this VMID, but the API token may not see it ({err}); if it \
                         is this job's VM, the token lacks VM.Audit on it (check the ACL on \
                         PROXMOX_POOL); left for `gitlab-proxmox-runner gc`"
                    ),
                })
            }
        };
        // Ownership first, so a foreign VM is never waited on, let alone touched.
        if !owner_checked {
            let Some(config) = client.vm_config(node, vmid).await.map_err(fail)? else {
                return Ok(gone(acted));
            };
            match crate::marker::ownership(config.description().as_deref(), expected) {
                Ok(()) => owner_checked = true,
                // A VM still being cloned may not show its description yet: look again once
                // the clone lock is gone.
                Err(_) if status.lock() == Some("clone") && !waited_for_clone => {
                    waited_for_clone = true;
                    if !wait_for_lock(client, node, vmid, "clone", deadline, log).await? {
                        return Ok(gone(acted));
                    }
                    continue;
                }
                Err(reason) => return Ok(Teardown::NotOurs(reason)),
            }
        }
        if let Some(lock) = status.lock() {
            if !wait_for_lock(client, node, vmid, lock, deadline, log).await? {
                return Ok(gone(acted));
            }
            continue;
        }
        if status.is_running() {
            let stopping = Instant::now();
            let stopped = match client.stop_vm(node, vmid).await {
                Ok(upid) => task::finish(client, &upid, deadline, log).await,
                Err(err) => Err(err),
            };
            match stopped {
                Ok(()) => stop_time += stopping.elapsed(),
                Err(err) if err.is_not_found() => return Ok(gone(acted)),
                Err(err) if err.is_vm_locked() || err.is_transient() => {
                    pause_before_retry(deadline, &err, context, log, &mut pause).await?;
                    continue;
                }
                Err(err) => return Err(fail(err)),
            }
        }
        let deleting = Instant::now();
        let deleted = match client.delete_vm(node, vmid).await {
            Ok(upid) => task::finish(client, &upid, deadline, log).await,
            Err(err) => Err(err),
        };
        match deleted {
            Ok(()) => {
                log.info(&format!(
                    "destroyed VM {vmid} on {node} in {} (stop {}, delete {})",
                    joblog::secs(started.elapsed()),
                    joblog::secs(stop_time),
                    joblog::secs(deleting.elapsed())
                ));
                return Ok(Teardown::Destroyed);
            }
            Err(err) if err.is_not_found() => return Ok(Teardown::Destroyed),
            // Started again behind our back, locked meanwhile, or a transient failure: look
            // at it afresh.
            Err(err) if err.is_vm_locked() || err.is_transient() || err.is_vm_running() => {
                acted = true;
                pause_before_retry(deadline, &err, context, log, &mut pause).await?;
                continue;
            }
            Err(err) => return Err(fail(err)),
        }
    }
    Err(Error::Proxmox {
        context: context(),
        message: format!(
            "the VM is still there after {MAX_ROUNDS} attempts to stop and delete it; \
             `gitlab-proxmox-runner gc` will retry"
        ),
    })
}

/// The node a VM that reads as missing on `node` is on now, if it exists at all: HA or an
/// admin may have migrated it. `nextid?vmid=` (open to every token) says whether the VMID is
/// taken anywhere; only then is the cluster's VM list read.
async fn moved_to(client: &Client, node: &str, vmid: u32) -> Result<Option<String>, ApiError> {
    if client.vmid_is_free(vmid).await? {
        return Ok(None);
    }
    let vms = client.cluster_vms().await?;
    Ok(vms
        .iter()
        .find(|vm| vm.vmid == u64::from(vmid) && vm.node != node)
        .map(|vm| vm.node.clone()))
}

async fn wait_for_lock(
    client: &Client,
    node: &str,
    vmid: u32,
    lock: &str,
    deadline: Instant,
    log: &dyn Log,
) -> Result<bool> {
    log.info(&format!(
        "VM {vmid} is locked ({lock}); waiting for the lock to clear before removing it"
    ));
    wait_unlocked(client, node, vmid, deadline, log).await
}

/// Sleeps `pause` (doubling it for the next round), or fails with `err` when the deadline
/// leaves no room for another round.
async fn pause_before_retry(
    deadline: Instant,
    err: &ApiError,
    context: impl Fn() -> String,
    log: &dyn Log,
    pause: &mut Duration,
) -> Result<()> {
    if Instant::now() + *pause >= deadline {
        return Err(Error::api(context(), err.clone()));
    }
    log.info(&format!(
        "{}: {err}; trying again in {}",
        context(),
        joblog::secs(*pause)
    ));
    tokio::time::sleep(*pause).await;
    *pause = (*pause * 2).min(MAX_RETRY_PAUSE);
    Ok(())
}

/// Polls until the VM has no lock. `Ok(false)` when the VM disappeared meanwhile.
pub async fn wait_unlocked(
    client: &Client,
    node: &str,
    vmid: u32,
    deadline: Instant,
    log: &dyn Log,
) -> Result<bool> {
    let mut poll = Poll::until(deadline);
    loop {
        let presence = client
            .vm_presence(node, vmid)
            .await
            .map_err(|err| Error::api(format!("reading VM {vmid} on node {node}"), err))?;
        let Presence::Exists(status) = presence else {
            return Ok(false);
        };
        let Some(lock) = status.lock() else {
            return Ok(true);
        };
        poll.pause(|waited| {
            log.info(&format!(
                "VM {vmid} still locked ({lock}) after {}",
                joblog::secs(waited)
            ))
        })
        .await
        .map_err(|expired| Error::Proxmox {
            context: format!("waiting for VM {vmid} on node {node}"),
            message: format!(
                "still locked ({lock}) by {} after {}; an API token cannot override the lock. \
                 Left for `gitlab-proxmox-runner gc`, which removes it once the lock is gone",
                if lock == "clone" {
                    "its clone task"
                } else {
                    "another task (a backup, a migration, a snapshot)"
                },
                joblog::secs(expired.waited)
            ),
        })?;
    }
}
