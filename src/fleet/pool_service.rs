//! `gitlab-proxmox-runner pool`: keeps `WARM_POOL = { name = N }` warm VMs per template.
//!
//! With `PROXMOX_NODES`, N is for the whole cluster: the warm VMs of every copy of the template
//! name (on the online nodes the pool may use) count, each new one is placed like a job's VM
//! (one placement at a time), and each is judged stale against the copy it was cloned from.
//!
//! Every round (and whenever a warm-up finishes) it looks at the cluster, not at its memory:
//!
//! - **recycles** warm VMs whose template changed (digest), that are past their idle deadline
//!   (`WARM_MAX_IDLE`) or are not running, and its own unfinished warm-ups from an earlier run
//!   (older than `VM_BOOT_TIMEOUT`); every recycle is a compare-and-swap first, so a VM a job
//!   is claiming is never touched;
//! - **counts** the warm VMs of every pool service (complete ones, other services' warm-ups in
//!   progress, its own warm-ups in flight) and **refills** the difference to the target, the
//!   host's clone cap (`PROXMOX_MAX_CONCURRENT_CLONES`) applying to each clone as for jobs;
//! - **trims** lasting overfill, by one rule every service applies to the same listing: order
//!   the complete warm VMs of a template by (created, VMID); those beyond the target, newest
//!   first, are the excess, and each service recycles the excess VMs that are its own. Two
//!   services that refilled at the same moment overfill by at most their shared deficit, for
//!   one round; they never both recycle the same VM, and never trim below the target.
//!
//! **Host keys**: a warm VM whose SSH host key another VM holds too (clones of a template whose
//! keys were never regenerated) is never published, and one already published is recycled;
//! either way an error names the template and the fix, and the pool warms no VM of that
//! template name for a while ([`crate::vm::host_keys`]).
//!
//! With `--gc-every`, it also runs the orphan sweep (the gc timer's) on that schedule. With
//! `--metrics-listen`, it serves Prometheus metrics at `/metrics` ([`crate::pool::metrics`]).
//!
//! SIGTERM: no new warm-up starts, warm-ups in flight are cancelled and their VMs destroyed,
//! complete warm VMs stay for jobs to claim (a restarted service counts them again; without
//! one, gc sweeps them after their idle deadline). SIGKILL leaves the same, plus at most the
//! warm-ups in flight, whose markers carry the idle deadline gc sweeps by.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::FleetContext;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::joblog;
use crate::pool::metrics::{self, Census, Recycle, Watch};
use crate::pool::warm::{self, Vetting, Warmed};
use crate::pool::{digests_of, list_warm, recycle, Scope, WarmVm};
use crate::proxmox::Client;
use crate::vm::host_keys::{self, Holder, SharedLedger};
use crate::vm::placement::Strategy;
use crate::vm::template::Template;
use crate::vm::StderrLog;

/// A recycle includes stopping the VM.
const RECYCLE_TIMEOUT: Duration = Duration::from_secs(3 * 60);

pub async fn pool(
    context: &FleetContext,
    pool_id: Option<&str>,
    interval: Duration,
    gc_every: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    // The engine's futures hold its `dyn Sink`, which is not `Send`: warm-ups run as local
    // tasks on the one runtime thread (they spend their time waiting on the API anyway).
    tokio::task::LocalSet::new()
        .run_until(serve(context, pool_id, interval, gc_every, metrics_listen))
        .await
}

async fn serve(
    context: &FleetContext,
    pool_id: Option<&str>,
    interval: Duration,
    gc_every: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    let settings = Arc::new(context.settings.clone());
    if settings.warm.pool.is_empty() {
        return Err(Error::Settings(
            "WARM_POOL is not set: name the templates to keep warm in the settings file, e.g. \
             WARM_POOL = { debian-12 = 2 }"
                .into(),
        ));
    }
    // With the fleet key (which the pool needs anyway) warm VMs of cloud-init templates get
    // keys of their own; a template that takes the static key fails its warm-up saying so.
    if settings.fleet_key.is_none() {
        settings.require_ssh_key()?;
    }
    let pool_id = match pool_id.map(str::trim).filter(|id| !id.is_empty()) {
        Some(id) if crate::config::parse::is_runner_id(id) => id.to_string(),
        Some(id) => {
            return Err(Error::Settings(format!(
                "--id {id:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
            )))
        }
        None => settings.runner_id.clone(),
    };
    let client = Arc::new(Client::new(&settings.api)?);
    let cancel = context.cancel.clone();
    metrics::start(&settings.warm.pool);
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
            Error::Settings(format!(
                "--metrics-listen {addr}: cannot listen there: {err}"
            ))
        })?;
        let bound = listener.local_addr().unwrap_or(addr);
        joblog::info(format!(
            "pool {pool_id}: serving metrics at http://{bound}/metrics"
        ));
        tokio::spawn(crate::metrics::serve(listener, cancel.clone()));
    }
    let watch = RefCell::new(Watch::new());
    joblog::info(format!(
        "pool {pool_id}: keeping {} warm (idle at most {} s), looking every {} s",
        settings
            .warm
            .pool
            .iter()
            .map(|(name, count)| format!("{name}={count}"))
            .collect::<Vec<_>>()
            .join(", "),
        settings.warm.max_idle.as_secs(),
        interval.as_secs_f64()
    ));
    let mut warming: JoinSet<(String, Result<Warmed>)> = JoinSet::new();
    let mut in_flight: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_sweep: Option<Instant> = None;
    // With placement, warm-ups take turns at placing their VM (see `warm::place_and_warm`).
    let turns = Arc::new(tokio::sync::Mutex::new(()));
    // Every host key this service has seen, for telling a VM whose key is not its own.
    let ledger = host_keys::Ledger::shared();
    while !cancel.is_cancelled() {
        let round_started = Instant::now();
        if let Some(every) = gc_every {
            if last_sweep.is_none_or(|at| at.elapsed() >= every) {
                last_sweep = Some(Instant::now());
                // The same sweep as the gc timer's, warm VMs past their idle deadline included.
                if let Err(err) =
                    super::sweep::sweep(context, &Default::default(), &mut Default::default()).await
                {
                    joblog::warn(format!("pool {pool_id}: orphan sweep: {err}"));
                }
            }
        }
        for (name, target) in &settings.warm.pool {
            let round = Round {
                client: &client,
                settings: &settings,
                pool_id: &pool_id,
                ledger: &ledger,
                name,
                watch: &watch,
            };
            match round
                .tend(name, *target, in_flight.get(name).copied().unwrap_or(0))
                .await
            {
                Ok((deficit, fixed)) => {
                    for _ in 0..deficit {
                        let (client, settings, cancel, turns) = (
                            Arc::clone(&client),
                            Arc::clone(&settings),
                            cancel.clone(),
                            Arc::clone(&turns),
                        );
                        let (name, fixed, pool_id) = (name.clone(), fixed.clone(), pool_id.clone());
                        let vetting = Vetting {
                            ledger: Arc::clone(&ledger),
                            name: name.clone(),
                        };
                        *in_flight.entry(name.clone()).or_default() += 1;
                        metrics::warmup_started(&name);
                        warming.spawn_local(async move {
                            let result = match fixed {
                                Some((template, digest)) => {
                                    warm::make_warm(
                                        &client, &settings, &template, &digest, &pool_id, &vetting,
                                        &cancel, &StderrLog,
                                    )
                                    .await
                                }
                                None => {
                                    warm::place_and_warm(
                                        &client, &settings, &name, turns, &pool_id, &vetting,
                                        &cancel, &StderrLog,
                                    )
                                    .await
                                }
                            };
                            (name, result)
                        });
                    }
                }
                Err(err) => joblog::warn(format!("pool {pool_id}: {name}: {err}")),
            }
        }
        metrics::round_took(round_started.elapsed());
        // The next round: after the interval, or as soon as a warm-up ends.
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = cancel.cancelled() => {}
            Some(joined) = warming.join_next(), if !warming.is_empty() => {
                finished(&pool_id, joined, &mut in_flight);
            }
        }
    }
    let stopping = warming.len();
    while let Some(joined) = warming.join_next().await {
        finished(&pool_id, joined, &mut in_flight);
    }
    joblog::info(format!(
        "pool {pool_id}: stopped ({}); {stopping} warm-ups in flight were cancelled, warm VMs \
         stay for jobs until their idle deadline",
        cancel.reason().unwrap_or("cancelled")
    ));
    Ok(())
}

fn finished(
    pool_id: &str,
    joined: std::result::Result<(String, Result<Warmed>), tokio::task::JoinError>,
    in_flight: &mut BTreeMap<String, usize>,
) {
    let Ok((name, result)) = joined else {
        joblog::warn(format!("pool {pool_id}: a warm-up task ended abnormally"));
        metrics::warmup_lost(None);
        return;
    };
    if let Some(count) = in_flight.get_mut(&name) {
        *count = count.saturating_sub(1);
    }
    match result {
        Ok(warmed) => {
            metrics::warmup_finished(&name, warmed.total);
            joblog::info(format!(
                "pool {pool_id}: warmed VM {} on {} from {name} in {} ({})",
                warmed.vm.vmid,
                warmed.vm.node,
                joblog::secs(warmed.total),
                warmed.phases
            ))
        }
        // The admin's to fix (the template, above all one whose clones share a host key):
        // retrying does not help, so it is an error, not a warning.
        Err(err) => {
            metrics::warmup_failed(&name, &err);
            let line = format!("pool {pool_id}: warming a VM from {name} failed: {err}");
            if matches!(err, Error::Settings(_)) {
                joblog::error(line)
            } else {
                joblog::warn(line)
            }
        }
    }
}

struct Round<'a> {
    client: &'a Client,
    settings: &'a Settings,
    pool_id: &'a str,
    ledger: &'a SharedLedger,
    /// The template name this round tends, and what the metrics remember between rounds.
    name: &'a str,
    watch: &'a RefCell<Watch>,
}

impl Round<'_> {
    /// Recycles what must go, trims our share of lasting overfill, returns how many to warm,
    /// and (without placement) the template on `PROXMOX_NODE` and its digest to warm them from.
    async fn tend(
        &self,
        name: &str,
        target: u32,
        in_flight: usize,
    ) -> Result<(usize, Option<(Template, String)>)> {
        let settings = self.settings;
        // The target is per template name, for the whole cluster: with placement, the warm VMs
        // of every copy of the template (on every usable node) count.
        let strategy = Strategy::of(settings);
        let copies = strategy.copies(self.client, settings, name).await?;
        let fixed = match (strategy, copies.list.first()) {
            (Strategy::One { .. }, Some(copy)) => {
                let template = copy.template.clone();
                let digest = warm::template_digest(self.client, &template).await?;
                Some((template, digest))
            }
            _ => None,
        };
        let key = warm::fleet_key(settings)?;
        let scope = Scope::of(&copies);
        let listing = list_warm(self.client, settings.vmid_range, &scope, key).await?;
        self.watch
            .borrow_mut()
            .listed(name, &scope.templates, &listing.warm, &listing.jobs, key);
        let listed = listing.warm;
        let mut census = Census::default();
        listed.iter().for_each(|warm| census.add(warm));
        let digests: BTreeMap<u32, Result<String>> = match &fixed {
            Some((template, digest)) => BTreeMap::from([(template.vmid, Ok(digest.clone()))]),
            None => digests_of(self.client, &copies.list, &listed).await,
        };
        for (vmid, digest) in &digests {
            if let Err(err) = digest {
                joblog::warn(format!(
                    "pool {}: {name}: cannot tell whether template VM {vmid} changed ({err}); \
                     its warm VMs stay until it can be read",
                    self.pool_id
                ));
            }
        }
        let stale_warmup = settings.boot_timeout + Duration::from_secs(600);
        let mut complete = Vec::new();
        let mut others_warming = 0;
        for warm in listed {
            if !warm.locked && warm.is_complete() {
                if let Some(message) = self.cloned_host_keys(name, &warm) {
                    joblog::error(format!(
                        "pool {}: {name}: {message}. Recycling it; warming no VM of {name} for \
                         {} min",
                        self.pool_id,
                        host_keys::HOLD_OFF.as_secs() / 60
                    ));
                    let why = "its SSH host key is not its own";
                    if self.recycle(&warm, why, Recycle::SharedHostKey).await {
                        census.remove(&warm);
                    }
                    continue;
                }
            }
            let ours = warm
                .marker
                .warm
                .as_ref()
                .is_some_and(|w| w.pool == self.pool_id);
            // Against the template VM this one was cloned from (the copy on its node).
            let current = warm
                .template()
                .and_then(|vmid| digests.get(&vmid))
                .and_then(|digest| digest.as_ref().ok());
            let why = if warm.locked {
                None
            } else if current.is_some_and(|digest| {
                warm.marker.warm.as_ref().map(|w| &w.template_digest) != Some(digest)
            }) {
                Some(("its template changed", Recycle::TemplateChanged))
            } else if warm.marker.is_past_deadline() {
                Some(("idle too long", Recycle::Idle))
            } else if warm.is_complete() && !warm.running {
                Some(("it is not running", Recycle::NotRunning))
            } else if !warm.is_complete()
                && ours
                && in_flight == 0
                && warm.marker.age_secs() > stale_warmup.as_secs()
            {
                Some(("its warm-up never finished", Recycle::WarmupStale))
            } else {
                None
            };
            if let Some((why, reason)) = why {
                if self.recycle(&warm, why, reason).await {
                    census.remove(&warm);
                }
                continue;
            }
            if warm.is_complete() {
                complete.push(warm);
            } else if !ours {
                others_warming += 1;
            }
        }
        complete.sort_by_key(|warm| (warm.marker.created, warm.vm.vmid));
        let target = target as usize;
        if complete.len() > target {
            for warm in complete.split_off(target).iter().rev() {
                let ours = warm
                    .marker
                    .warm
                    .as_ref()
                    .is_some_and(|w| w.pool == self.pool_id);
                let why = "more warm VMs than WARM_POOL asks for";
                if ours && self.recycle(warm, why, Recycle::Excess).await {
                    census.remove(warm);
                }
            }
        }
        let nodes: Vec<String> = match &copies.online_nodes {
            Some(nodes) => nodes.iter().cloned().collect(),
            None => copies
                .list
                .iter()
                .filter(|copy| copy.online)
                .map(|copy| copy.template.node.clone())
                .collect(),
        };
        self.watch.borrow_mut().counted(name, &nodes, census);
        let counted = complete.len() + others_warming + in_flight;
        let deficit = target.saturating_sub(counted);
        if deficit > 0 && host_keys::lock(self.ledger).is_held_off(name) {
            // Said when it began: its clones share a host key.
            return Ok((0, fixed));
        }
        if deficit > 0 {
            joblog::info(format!(
                "pool {}: {name}: {} warm, {} warming; warming {deficit} more",
                self.pool_id,
                complete.len(),
                others_warming + in_flight
            ));
        }
        Ok((deficit, fixed))
    }

    /// When a published warm VM's host key is another VM's too (seen on the cluster now or
    /// before): the message for the log. Holds off warming `name`. The pinned keys are public
    /// (VM.Audit shows them), so this trusts `list_warm` to return only warm VMs of ours: a
    /// forged warm marker carrying a copy of a real warm VM's key would get that VM recycled.
    fn cloned_host_keys(&self, name: &str, warm: &WarmVm) -> Option<String> {
        let holder = Holder::vm(&warm.vm, &warm.marker.nonce, "warm VM");
        let mut ledger = host_keys::lock(self.ledger);
        let found = ledger.record(&warm.host_keys, &holder);
        if found.is_empty() {
            return None;
        }
        ledger.hold_off(name, Instant::now() + host_keys::HOLD_OFF);
        let template = match warm.template() {
            Some(vmid) => format!("{name} ({vmid})"),
            None => name.to_string(),
        };
        Some(host_keys::cloned_keys_message(&warm.vm, &template, &found))
    }

    /// Whether it was recycled (not claimed first, not failed).
    async fn recycle(&self, warm: &WarmVm, why: &str, reason: Recycle) -> bool {
        let started = Instant::now();
        let deadline = Instant::now() + RECYCLE_TIMEOUT;
        let vmid = warm.vm.vmid;
        match recycle(
            self.client,
            &self.settings.runner_id,
            warm,
            deadline,
            &StderrLog,
        )
        .await
        {
            Ok(true) => {
                metrics::recycled(self.name, reason);
                joblog::info(format!(
                    "pool {}: recycled warm VM {vmid} ({why}) in {}",
                    self.pool_id,
                    joblog::secs(started.elapsed())
                ));
                true
            }
            Ok(false) => false,
            Err(err) => {
                joblog::warn(format!(
                    "pool {}: could not recycle warm VM {vmid} ({why}): {err}",
                    self.pool_id
                ));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::host::parse_warm_pool;

    #[test]
    fn warm_pool_reads_the_files_table_and_refuses_garbage() {
        // `WARM_POOL = { debian-12 = 4, ubuntu-focal = 0 }` reaches the parser as this.
        let pool = parse_warm_pool("debian-12=4,ubuntu-focal=0").unwrap();
        assert_eq!(pool.get("debian-12"), Some(&4));
        assert_eq!(pool.get("ubuntu-focal"), Some(&0));
        assert!(parse_warm_pool("").unwrap().is_empty());
        for bad in [
            "debian-12",
            "=4",
            "debian-12=-1",
            "debian-12=many",
            "d=100000",
        ] {
            assert!(parse_warm_pool(bad).is_err(), "{bad:?}");
        }
    }
}
