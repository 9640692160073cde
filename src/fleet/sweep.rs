//! gc: destroy VMs this driver created whose jobs are gone (orphans after a runner crash, an OOM
//! kill or a host reboot, when cleanup_exec never ran).
//!
//! A VM is a candidate only when every one of these holds: it is a QEMU guest, not a template,
//! its VMID is inside `PROXMOX_VMID_RANGE`, and the first line of its description is an
//! ownership marker that parses (see [`crate::marker`]). Tagged or not: a prepare that died
//! between the clone and tagging leaves an untagged VM with a marker. Everything else is
//! foreign and never touched. A candidate is an orphan once past its own recorded deadline
//! (job timeout capped by the host, plus a margin), or, with `--max-age`, once older than that
//! (v1 markers, which have no deadline: older than [`DEFAULT_MAX_AGE`]). Only host-set marker
//! fields decide; `--runner` compares the host's `PROXMOX_RUNNER_ID`. An orphan is removed with
//! the same stop+delete as cleanup, which re-reads the marker right before acting, so a VMID
//! reused meanwhile by a new job is left alone. Sweeps on many runner hosts may race on one VM:
//! the loser finds it gone and counts it as done.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use super::FleetContext;
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::Marker;
use crate::proxmox::Client;
use crate::vm::ownership::{first_look, FirstLook};
use crate::vm::teardown::{self, Teardown};
use crate::vm::StderrLog;

/// The age after which a VM without a recorded deadline (a v1 marker) is an orphan when
/// `--max-age` is not given: a 24 h job (well above GitLab's default 1 h job timeout, and the
/// longest `maximum_timeout` most runners allow) plus 1 h for prepare (clone, boot) and cleanup.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(25 * 3600);
/// Orphans stopped and deleted at the same time.
const PARALLEL_DESTROYS: usize = 4;
/// Per orphan, waits for a lock that appears while we act included.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(3 * 60);

struct Orphan {
    node: String,
    vmid: u32,
    marker: Marker,
    age: Duration,
    /// The config digest it was judged with: a warm VM is swept only if no prepare claimed it
    /// since (see [`crate::pool`]).
    digest: Option<String>,
}

impl Orphan {
    fn describe(&self) -> String {
        format!(
            "VM {} on {} (job {}, runner {}, age {})",
            self.vmid,
            self.node,
            self.marker
                .job_id
                .map_or_else(|| "-".to_string(), |id| id.to_string()),
            self.marker.runner.as_deref().unwrap_or("-"),
            joblog::age(self.age)
        )
    }
}

#[derive(Debug, Default)]
pub struct Tally {
    destroyed: usize,
    already_gone: usize,
    would_destroy: usize,
    locked: usize,
    live: usize,
    other_runners: usize,
    foreign: usize,
    /// Warm markers whose MAC does not verify (or no fleet key to verify them with).
    look_alikes: usize,
    failed: Vec<String>,
}

impl Tally {
    /// The sweep as gauges for node_exporter's textfile collector: each sweep replaces the
    /// last one's values.
    pub fn registry(
        &self,
        dry_run: bool,
        success: bool,
        took: Duration,
    ) -> prometheus_client::registry::Registry {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct Judged {
            result: &'static str,
        }
        let mut registry = crate::metrics::textfile_registry();
        let vms = Family::<Judged, Gauge>::default();
        for (result, count) in [
            ("destroyed", self.destroyed),
            ("already_gone", self.already_gone),
            ("would_destroy", self.would_destroy),
            ("failed", self.failed.len()),
            ("locked", self.locked),
            ("live", self.live),
            ("other_runners", self.other_runners),
            ("foreign", self.foreign),
            ("look_alikes", self.look_alikes),
        ] {
            vms.get_or_create(&Judged { result })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        registry.register(
            "gc_vms",
            "VMs the last gc sweep judged, by result (destroyed, already_gone, would_destroy, \
             failed, locked, live, other_runners, foreign, look_alikes)",
            vms,
        );
        let gauge = |value: f64| {
            let gauge = crate::metrics::FloatGauge::default();
            gauge.set(value);
            gauge
        };
        registry.register(
            "gc_duration_seconds",
            "How long the last gc sweep took",
            gauge(took.as_secs_f64()),
        );
        registry.register(
            "gc_last_run_timestamp_seconds",
            "When the last gc sweep ended (Unix time)",
            gauge(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |now| now.as_secs_f64()),
            ),
        );
        registry.register(
            "gc_success",
            "1 if the last gc sweep inspected and removed everything it had to, else 0",
            gauge(if success { 1.0 } else { 0.0 }),
        );
        registry.register(
            "gc_dry_run",
            "1 if the last gc sweep was a dry run (nothing destroyed)",
            gauge(if dry_run { 1.0 } else { 0.0 }),
        );
        registry
    }

    fn summary(&self, dry_run: bool, took: Duration) -> String {
        let mut parts = Vec::new();
        if dry_run {
            parts.push(format!("{} orphans would be destroyed", self.would_destroy));
        } else if self.already_gone > 0 {
            parts.push(format!(
                "{} orphans destroyed ({} already gone)",
                self.destroyed + self.already_gone,
                self.already_gone
            ));
        } else {
            parts.push(format!("{} orphans destroyed", self.destroyed));
        }
        if !self.failed.is_empty() {
            parts.push(format!("{} failed", self.failed.len()));
        }
        parts.push(format!("{} skipped (locked)", self.locked));
        parts.push(format!("{} live kept", self.live));
        if self.other_runners > 0 {
            parts.push(format!("{} of other runners kept", self.other_runners));
        }
        parts.push(format!("{} foreign ignored", self.foreign));
        if self.look_alikes > 0 {
            parts.push(format!(
                "{} look-alike warm VMs ignored (bad MAC)",
                self.look_alikes
            ));
        }
        format!(
            "gc{}: {} in {}",
            if dry_run { " (dry run)" } else { "" },
            parts.join(", "),
            joblog::secs(took)
        )
    }
}

/// What a sweep destroys, beyond the rules no option changes.
#[derive(Debug, Default)]
pub struct Rules<'a> {
    /// Only VMs created by the runner with this `PROXMOX_RUNNER_ID`.
    pub runner: Option<&'a str>,
    /// Orphans once older than this, their own deadline or not.
    pub max_age: Option<Duration>,
    /// Say what would be destroyed; destroy nothing.
    pub dry_run: bool,
}

/// One sweep of the cluster by `rules`, counted into `tally` (also when it fails part-way:
/// the metrics textfile shows what it did count).
pub async fn sweep(context: &FleetContext, rules: &Rules<'_>, tally: &mut Tally) -> Result<()> {
    if let Some(max_age) = rules.max_age.filter(|age| *age < Duration::from_secs(3600)) {
        joblog::warn(format!(
            "gc: --max-age {} is shorter than most jobs: VMs of jobs still running will be \
             destroyed",
            joblog::age(max_age)
        ));
    }
    let runner = rules
        .runner
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let client = Arc::new(Client::new(&context.settings.api)?);
    tokio::select! {
        result = sweep_cluster(context, client, runner, rules.max_age, rules.dry_run, tally) => result,
        reason = context.cancel.cancelled() => Err(Error::Cancelled(format!(
            "gc was cancelled ({reason}); VMs it was removing are finished by the next sweep"
        ))),
    }
}

async fn sweep_cluster(
    context: &FleetContext,
    client: Arc<Client>,
    runner: Option<&str>,
    max_age: Option<Duration>,
    dry_run: bool,
    tally: &mut Tally,
) -> Result<()> {
    let started = Instant::now();
    let range = context.settings.vmid_range;
    let vms = client
        .cluster_vms()
        .await
        .map_err(|err| Error::api("gc: listing the cluster's VMs (/cluster/resources)", err))?;
    joblog::info(format!(
        "gc: {} guests on the cluster; looking for VMs with this driver's marker in {}-{} {}{}",
        vms.len(),
        range.0,
        range.1,
        max_age.map_or_else(
            || format!(
                "past their own deadline (older than {} without one)",
                joblog::age(DEFAULT_MAX_AGE)
            ),
            |age| format!("older than {}", joblog::age(age))
        ),
        runner.map_or_else(String::new, |token| format!(" created by runner {token}"))
    ));

    let now = joblog::now_epoch();
    let mut orphans = Vec::new();
    for vm in &vms {
        let (node, vmid, tagged) = match first_look(vm, range) {
            FirstLook::Tagged { node, vmid } => (node, vmid, true),
            // A prepare that died between the clone and tagging leaves exactly this: its
            // marker decides, as for a tagged VM.
            FirstLook::Untagged { node, vmid } => (node, vmid, false),
            FirstLook::Foreign => {
                tally.foreign += 1;
                continue;
            }
        };
        let config = match client.vm_config(&node, vmid).await {
            Ok(Some(config)) => config,
            // Removed since the listing: nothing to judge.
            Ok(None) => continue,
            // One unreachable node must not stop the sweep of the others.
            Err(err) if !tagged => {
                joblog::warn(format!(
                    "gc: cannot read the config of untagged VM {vmid} on {node} ({err}); skipped"
                ));
                tally.foreign += 1;
                continue;
            }
            Err(err) => {
                joblog::warn(format!(
                    "gc: cannot read the config of VM {vmid} on {node} ({err}); skipped"
                ));
                tally.failed.push(format!("VM {vmid} on {node}: {err}"));
                continue;
            }
        };
        let description = config.description();
        let Some(marker) = description.as_deref().and_then(Marker::find_in) else {
            if tagged {
                joblog::warn(format!(
                    "gc: VM {vmid} on {node} carries the {} tag but no valid ownership marker \
                     on the first line of its description; left alone (remove it by hand if it \
                     is a leftover)",
                    crate::VM_TAG
                ));
            }
            tally.foreign += 1;
            continue;
        };
        if marker.warm.is_some() {
            // A warm marker is only a claim until its MAC verifies: anyone may write one on a
            // VM of their own. Never destroy what we cannot prove ours.
            let vm = crate::vm::VmRef {
                node: node.clone(),
                vmid,
            };
            let host_keys = crate::marker::warm_host_keys(description.as_deref().unwrap_or(""));
            let sealed = context
                .settings
                .fleet_key
                .as_ref()
                .is_some_and(|key| marker.is_sealed_for(key, &vm, &host_keys));
            if !sealed {
                tally.look_alikes += 1;
                continue;
            }
        }
        if runner.is_some_and(|runner| !marker.made_by_runner(runner)) {
            tally.other_runners += 1;
            continue;
        }
        let age = Duration::from_secs(now.saturating_sub(marker.created));
        if now < marker.sweepable_from(max_age, DEFAULT_MAX_AGE) {
            tally.live += 1;
            continue;
        }
        if !tagged {
            joblog::info(format!(
                "gc: VM {vmid} on {node} has this driver's ownership marker but not the {} tag: \
                 its prepare died between the clone and configuring it; sweeping it as an orphan",
                crate::VM_TAG
            ));
        }
        let lock = vm
            .lock
            .clone()
            .filter(|lock| !lock.is_empty())
            .or_else(|| config.lock());
        let orphan = Orphan {
            node,
            vmid,
            marker,
            age,
            digest: config.get("digest"),
        };
        if let Some(lock) = lock {
            joblog::info(format!(
                "gc: skipping {} this round: it is locked ({lock})",
                orphan.describe()
            ));
            tally.locked += 1;
            continue;
        }
        orphans.push(orphan);
    }

    if tally.look_alikes > 0 && context.settings.fleet_key.is_none() {
        joblog::warn(format!(
            "gc: {} VMs carry a warm marker that cannot be verified without PROXMOX_FLEET_KEY; \
             left alone (set the fleet's key in this host's settings file so gc can sweep the \
             pool's warm VMs)",
            tally.look_alikes
        ));
    }
    if dry_run {
        for orphan in &orphans {
            joblog::info(format!("gc: would destroy {}", orphan.describe()));
        }
        tally.would_destroy = orphans.len();
    } else {
        destroy_all(&client, orphans, tally).await;
    }

    println!("{}", tally.summary(dry_run, started.elapsed()));
    if tally.failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Infrastructure(format!(
            "gc: {} VMs could not be inspected or destroyed ({}); the next sweep tries again",
            tally.failed.len(),
            tally.failed.join("; ")
        )))
    }
}

async fn destroy_all(client: &Arc<Client>, orphans: Vec<Orphan>, tally: &mut Tally) {
    let mut queue = orphans.into_iter();
    let mut running = JoinSet::new();
    loop {
        while running.len() < PARALLEL_DESTROYS {
            let Some(orphan) = queue.next() else { break };
            let client = Arc::clone(client);
            running.spawn(async move {
                let deadline = Instant::now() + DESTROY_TIMEOUT;
                let outcome = destroy_unless_locked(&client, &orphan, deadline).await;
                (orphan, outcome)
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (orphan, outcome) = match joined {
            Ok(done) => done,
            Err(err) => {
                tally
                    .failed
                    .push(format!("a destroy task ended abnormally: {err}"));
                continue;
            }
        };
        match outcome {
            Ok(Some(Teardown::Destroyed)) => {
                joblog::info(format!("gc: destroyed {}", orphan.describe()));
                tally.destroyed += 1;
            }
            Ok(Some(Teardown::AlreadyGone)) => {
                joblog::info(format!(
                    "gc: {} does not exist any more (removed by its cleanup or another sweep); \
                     done",
                    orphan.describe()
                ));
                tally.already_gone += 1;
            }
            Ok(Some(Teardown::NotOurs(reason))) => {
                joblog::info(format!(
                    "gc: VM {} on {} changed hands since the listing ({reason}); left alone",
                    orphan.vmid, orphan.node
                ));
                tally.live += 1;
            }
            Ok(None) => tally.locked += 1,
            Err(err) => {
                joblog::warn(format!(
                    "gc: could not destroy {}: {err}",
                    orphan.describe()
                ));
                tally.failed.push(format!("VM {}: {err}", orphan.vmid));
            }
        }
    }
}

/// `Ok(None)`: locked right now (a backup, a migration, a clone in flight): skipped this round
/// rather than waited for, so one stuck VM does not hold up the sweep.
async fn destroy_unless_locked(
    client: &Client,
    orphan: &Orphan,
    deadline: Instant,
) -> Result<Option<Teardown>> {
    let (node, vmid) = (orphan.node.as_str(), orphan.vmid);
    let status = client
        .vm_status(node, vmid)
        .await
        .map_err(|err| Error::api(format!("gc: reading VM {vmid} on {node}"), err))?;
    let Some(status) = status else {
        return Ok(Some(Teardown::AlreadyGone));
    };
    if let Some(lock) = status.lock() {
        joblog::info(format!(
            "gc: skipping {} this round: it is locked ({lock})",
            orphan.describe()
        ));
        return Ok(None);
    }
    if orphan.marker.warm.is_some() {
        // A prepare may be claiming it right now: take it with a compare-and-swap first.
        let warm = crate::pool::WarmVm {
            vm: crate::vm::VmRef {
                node: node.to_string(),
                vmid,
            },
            marker: orphan.marker.clone(),
            digest: orphan.digest.clone().unwrap_or_default(),
            host_keys: Vec::new(),
            net0_mac: None,
            running: status.is_running(),
            locked: false,
            sshkeys: None,
        };
        let runner = orphan.marker.runner.as_deref().unwrap_or("gc");
        return match crate::pool::recycle(client, runner, &warm, deadline, &StderrLog).await? {
            true => Ok(Some(Teardown::Destroyed)),
            false => Ok(Some(Teardown::NotOurs(
                "a job claimed it since the listing".into(),
            ))),
        };
    }
    teardown::destroy_owned_vm(client, node, vmid, &orphan.marker, deadline, &StderrLog)
        .await
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_covers_a_day_long_job_plus_prepare_and_cleanup() {
        assert!(DEFAULT_MAX_AGE > Duration::from_secs(24 * 3600));
    }

    #[test]
    fn the_summary_reads_as_one_line() {
        let tally = Tally {
            destroyed: 3,
            locked: 1,
            live: 12,
            foreign: 40,
            ..Default::default()
        };
        assert_eq!(
            tally.summary(false, Duration::from_millis(2100)),
            "gc: 3 orphans destroyed, 1 skipped (locked), 12 live kept, 40 foreign ignored in 2.1 s"
        );
    }
}
