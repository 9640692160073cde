//! The pool service's metrics (served by `pool --metrics-listen`, see [`crate::metrics`]), and
//! what the service learns from watching the cluster between rounds ([`Watch`]).
//!
//! **Claims are observed, not told.** A warm VM is claimed by a prepare on some runner host, a
//! short-lived process that serves no metrics. The service sees it happen: a warm VM it listed
//! (its MAC verified) that carries a job's marker in a later round has left the pool with a
//! job. What the prepare itself found (a warm VM, none, a VM that failed its checks) it writes
//! as a claim report on the second line of its VM's description
//! ([`crate::marker::ClaimReport`]), sealed with the fleet key for that VM and that job's
//! marker line; the service counts each report once per prepare (its marker's nonce).
//!
//! **Observations only.** Nothing here feeds a decision of the pool: the rounds recycle, count
//! and refill from the listing exactly as before, and these counts are never read back. A
//! report counts only when its MAC verifies (written by a host of the fleet, for that very VM
//! and job) and it names a template VM of `WARM_POOL`; its fields are numbers and one word of
//! two, and the labels are the `WARM_POOL` name and node of the service's own listing, so no
//! job text can become a label value or a new series.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::{JobVm, WarmVm};
use crate::error::Error;
use crate::fleet_key::FleetKey;
use crate::marker::{ClaimOutcome, Marker};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    template: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    template: String,
    node: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    template: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    template: String,
    outcome: &'static str,
}

#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A warm-up: a clone, a boot, SSH (seconds).
const WARMUP_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
];
/// A claim, or a prepare's look for one (seconds).
const CLAIM_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// One round of the service (seconds).
const ROUND_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Why a warm VM was recycled, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycle {
    Idle,
    TemplateChanged,
    NotRunning,
    WarmupStale,
    Excess,
    /// Its SSH host key is another VM's too (a template whose keys were never regenerated).
    SharedHostKey,
}

impl Recycle {
    fn label(self) -> &'static str {
        match self {
            Recycle::Idle => "idle",
            Recycle::TemplateChanged => "template_changed",
            Recycle::NotRunning => "not_running",
            Recycle::WarmupStale => "warmup_stale",
            Recycle::Excess => "excess",
            Recycle::SharedHostKey => "shared_host_key",
        }
    }
}

/// The pool's families, registered in the process-wide registry on first use.
struct PoolMetrics {
    warm_vms: Family<StateLabels, Gauge>,
    target_vms: Family<TemplateLabels, Gauge>,
    warmups_started: Family<TemplateLabels, Counter>,
    warmups_finished: Family<TemplateLabels, Counter>,
    warmups_failed: Family<ReasonLabels, Counter>,
    warmup_duration: Family<TemplateLabels, Histogram, Buckets>,
    claims: Family<NodeLabels, Counter>,
    prepare_claims: Family<OutcomeLabels, Counter>,
    prepare_claim_duration: Family<OutcomeLabels, Histogram, Buckets>,
    recycles: Family<ReasonLabels, Counter>,
    round_duration: Histogram,
}

static POOL: LazyLock<PoolMetrics> = LazyLock::new(|| {
    let metrics = PoolMetrics {
        warm_vms: Family::default(),
        target_vms: Family::default(),
        warmups_started: Family::default(),
        warmups_finished: Family::default(),
        warmups_failed: Family::default(),
        warmup_duration: Family::new_with_constructor(Buckets(WARMUP_BUCKETS)),
        claims: Family::default(),
        prepare_claims: Family::default(),
        prepare_claim_duration: Family::new_with_constructor(Buckets(CLAIM_BUCKETS)),
        recycles: Family::default(),
        round_duration: Histogram::new(ROUND_BUCKETS.iter().copied()),
    };
    crate::metrics::register(|registry| {
        registry.register(
            "pool_warm_vms",
            "Warm VMs on the cluster as the last round listed them (every pool service's), by \
             WARM_POOL template, node and state (warming, ready)",
            metrics.warm_vms.clone(),
        );
        registry.register(
            "pool_target_vms",
            "WARM_POOL's target: warm VMs wanted per template, for the whole cluster",
            metrics.target_vms.clone(),
        );
        registry.register(
            "pool_warmups_started",
            "Warm-ups this service started",
            metrics.warmups_started.clone(),
        );
        registry.register(
            "pool_warmups_finished",
            "Warm-ups of this service that made a claimable warm VM",
            metrics.warmups_finished.clone(),
        );
        registry.register(
            "pool_warmups_failed",
            "Warm-ups of this service that failed (their VM removed), by reason",
            metrics.warmups_failed.clone(),
        );
        registry.register(
            "pool_warmup_duration_seconds",
            "How long a successful warm-up took: clone, boot, agent, SSH, runner helper",
            metrics.warmup_duration.clone(),
        );
        registry.register(
            "pool_claims",
            "Warm VMs this service saw leave the pool with a job's marker (claimed by a prepare)",
            metrics.claims.clone(),
        );
        registry.register(
            "prepare_claims",
            "What prepares that looked for a warm VM reported (claimed: a warm VM taken; \
             discarded: a taken one that failed its checks and was destroyed; none: no warm VM \
             kept, the job's VM was cloned)",
            metrics.prepare_claims.clone(),
        );
        registry.register(
            "prepare_claim_duration_seconds",
            "Reported by prepare: from the start of its claim to taking a warm VM (claimed, \
             before its checks) or to giving up (none)",
            metrics.prepare_claim_duration.clone(),
        );
        registry.register(
            "pool_recycles",
            "Warm VMs this service recycled, by reason (idle, template_changed, not_running, \
             warmup_stale, excess, shared_host_key)",
            metrics.recycles.clone(),
        );
        registry.register(
            "pool_round_duration_seconds",
            "How long one round of the service took (listing, recycling, starting warm-ups)",
            metrics.round_duration.clone(),
        );
    });
    metrics
});

fn template(name: &str) -> TemplateLabels {
    TemplateLabels {
        template: name.to_string(),
    }
}

/// Registers the families (so that a scrape shows them before anything happened) and the
/// targets of `WARM_POOL`.
pub fn start<'a>(targets: impl IntoIterator<Item = (&'a String, &'a u32)>) {
    for (name, target) in targets {
        POOL.target_vms
            .get_or_create(&template(name))
            .set(i64::from(*target));
        // The counters of each template from zero, so that rate() and increase() see the first.
        POOL.warmups_started
            .get_or_create(&template(name))
            .inc_by(0);
        POOL.warmups_finished
            .get_or_create(&template(name))
            .inc_by(0);
    }
}

pub fn warmup_started(name: &str) {
    POOL.warmups_started.get_or_create(&template(name)).inc();
}

pub fn warmup_finished(name: &str, took: Duration) {
    POOL.warmups_finished.get_or_create(&template(name)).inc();
    POOL.warmup_duration
        .get_or_create(&template(name))
        .observe(took.as_secs_f64());
}

pub fn warmup_failed(name: &str, err: &Error) {
    let reason = match err {
        Error::Api { .. } => "api",
        Error::Proxmox { .. } => "proxmox",
        Error::Ssh { .. } => "ssh",
        Error::AuthRefused { .. } => "ssh_auth_refused",
        Error::HostKeyMismatch { .. } => "ssh_host_key_mismatch",
        Error::Settings(_) => "settings",
        Error::Io { .. } => "io",
        Error::Cancelled(_) => "cancelled",
        Error::Infrastructure(_) => "infrastructure",
        Error::JobRequest(_) | Error::ScriptFailed { .. } | Error::ScriptKilled { .. } => "other",
    };
    POOL.warmups_failed
        .get_or_create(&ReasonLabels {
            template: name.to_string(),
            reason,
        })
        .inc();
}

/// A warm-up task that panicked or was aborted.
pub fn warmup_lost(name: Option<&str>) {
    POOL.warmups_failed
        .get_or_create(&ReasonLabels {
            template: name.unwrap_or("-").to_string(),
            reason: "aborted",
        })
        .inc();
}

pub fn recycled(name: &str, why: Recycle) {
    POOL.recycles
        .get_or_create(&ReasonLabels {
            template: name.to_string(),
            reason: why.label(),
        })
        .inc();
}

pub fn round_took(took: Duration) {
    POOL.round_duration.observe(took.as_secs_f64());
}

/// Warm VMs by node and state for one round of one template.
#[derive(Debug, Default)]
pub struct Census {
    counts: BTreeMap<(String, &'static str), i64>,
}

impl Census {
    fn state(warm: &WarmVm) -> &'static str {
        if warm.is_complete() {
            "ready"
        } else {
            "warming"
        }
    }

    pub fn add(&mut self, warm: &WarmVm) {
        *self
            .counts
            .entry((warm.vm.node.clone(), Census::state(warm)))
            .or_default() += 1;
    }

    /// `warm` is gone (recycled this round).
    pub fn remove(&mut self, warm: &WarmVm) {
        if let Some(count) = self
            .counts
            .get_mut(&(warm.vm.node.clone(), Census::state(warm)))
        {
            *count -= 1;
        }
    }
}

/// How long a prepare's report is remembered: its claims and a clone after them happen within
/// minutes, and its VMs all carry the same nonce.
const REPORT_MEMORY: Duration = Duration::from_secs(6 * 3600);
/// No prepare discards more than a few (`claim::MAX_DISCARDS`); a larger number is not counted
/// beyond this.
const MAX_COUNTED_DISCARDS: u32 = 8;
/// Longer claim latencies are recorded as this (a day).
const MAX_CLAIM_MS: u64 = 86_400_000;

/// What one prepare's reports added up to so far.
#[derive(Debug)]
struct Reported {
    /// Warm VMs it took that were counted (`claimed`).
    taken: u32,
    discarded: u32,
    none: bool,
    seen: Instant,
}

/// What the service remembers between rounds, for the counts it observes.
#[derive(Debug)]
pub struct Watch {
    /// Reports of prepares that started before the service are not counted (a restarted
    /// service would count them again).
    since_epoch: u64,
    /// The warm VMs each template had in the last round: (node, VMID).
    warm_before: BTreeMap<String, BTreeSet<(String, u32)>>,
    /// Every (node, state) series set for a template, set to 0 when it has none.
    series: BTreeMap<String, BTreeSet<(String, &'static str)>>,
    reports: HashMap<String, Reported>,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            since_epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|now| now.as_secs())
                .unwrap_or(0),
            warm_before: BTreeMap::new(),
            series: BTreeMap::new(),
            reports: HashMap::new(),
        }
    }

    /// One round's listing of template `name` (its template VMs `templates`, its usable
    /// `nodes`): counts the claims seen since the last round and the reports not yet counted.
    pub fn listed(
        &mut self,
        name: &str,
        templates: &BTreeSet<u32>,
        warm: &[WarmVm],
        jobs: &[JobVm],
        key: &FleetKey,
    ) {
        let before = self.warm_before.remove(name).unwrap_or_default();
        for job in jobs {
            if before.contains(&(job.vm.node.clone(), job.vm.vmid))
                && !is_recycle_marker(&job.marker)
            {
                POOL.claims
                    .get_or_create(&NodeLabels {
                        template: name.to_string(),
                        node: job.vm.node.clone(),
                    })
                    .inc();
            }
            let Some(report) = &job.report else { continue };
            if job.marker.created < self.since_epoch
                || !templates.contains(&report.template)
                || !report.is_sealed_for(key, &job.vm, &job.marker)
            {
                continue;
            }
            let seen = self
                .reports
                .entry(job.marker.nonce.clone())
                .or_insert(Reported {
                    taken: 0,
                    discarded: 0,
                    none: false,
                    seen: Instant::now(),
                });
            seen.seen = Instant::now();
            count_report(name, seen, report.outcome, report.discards, report.ms);
        }
        self.warm_before.insert(
            name.to_string(),
            warm.iter()
                .map(|warm| (warm.vm.node.clone(), warm.vm.vmid))
                .collect(),
        );
        self.reports
            .retain(|_, reported| reported.seen.elapsed() < REPORT_MEMORY);
    }

    /// Sets the warm-VM gauge of template `name` to `census`, every state of every node in
    /// `nodes` (and every series set before) at 0 where it has none.
    pub fn counted(&mut self, name: &str, nodes: &[String], census: Census) {
        let series = self.series.entry(name.to_string()).or_default();
        for node in nodes {
            for state in ["warming", "ready"] {
                series.insert((node.clone(), state));
            }
        }
        series.extend(census.counts.keys().cloned());
        for (node, state) in series.iter() {
            let count = census
                .counts
                .get(&(node.clone(), *state))
                .copied()
                .unwrap_or(0)
                .max(0);
            POOL.warm_vms
                .get_or_create(&StateLabels {
                    template: name.to_string(),
                    node: node.clone(),
                    state,
                })
                .set(count);
        }
    }
}

/// The marker a recycle swaps onto a warm VM before destroying it ([`super::recycle`]): no
/// warm fields, no job, a deadline that is its creation. A job's marker always has a deadline
/// an hour or more after it was made.
fn is_recycle_marker(marker: &Marker) -> bool {
    marker.deadline == Some(marker.created)
}

/// Adds what one report proves to what its prepare's earlier reports proved. A prepare writes
/// a report on every warm VM it takes (`claimed`, with the number it discarded before) and on
/// the VM it clones when it keeps none (`none`); each counts once, however many rounds see it,
/// and a report with `discards=N` proves N warm VMs taken and discarded even when the service
/// never saw them.
fn count_report(name: &str, seen: &mut Reported, outcome: ClaimOutcome, discards: u32, ms: u64) {
    let discards = discards.min(MAX_COUNTED_DISCARDS);
    let labels = |outcome: &'static str| OutcomeLabels {
        template: name.to_string(),
        outcome,
    };
    let taken = discards + u32::from(outcome == ClaimOutcome::Claimed);
    let new_claim = outcome == ClaimOutcome::Claimed && taken > seen.taken;
    if taken > seen.taken {
        POOL.prepare_claims
            .get_or_create(&labels("claimed"))
            .inc_by(u64::from(taken - seen.taken));
        seen.taken = taken;
    }
    if discards > seen.discarded {
        POOL.prepare_claims
            .get_or_create(&labels("discarded"))
            .inc_by(u64::from(discards - seen.discarded));
        seen.discarded = discards;
    }
    let new_none = outcome == ClaimOutcome::None && !seen.none;
    if new_none {
        POOL.prepare_claims.get_or_create(&labels("none")).inc();
        seen.none = true;
    }
    if new_claim || new_none {
        let seconds = ms.min(MAX_CLAIM_MS) as f64 / 1000.0;
        POOL.prepare_claim_duration
            .get_or_create(&labels(outcome.as_str()))
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(name: &str, outcome: &'static str) -> u64 {
        POOL.prepare_claims
            .get(&OutcomeLabels {
                template: name.into(),
                outcome,
            })
            .map_or(0, |counter| counter.get())
    }

    #[test]
    fn a_warm_vm_that_left_with_a_jobs_marker_is_a_claim_and_a_recycled_one_is_not() {
        let name = "claims-test";
        let key = FleetKey::parse("dGVzdCBmbGVldCBrZXkgb2YgdGhlIHRlc3Qga2l0ISE=").unwrap();
        let claims = || {
            POOL.claims
                .get(&NodeLabels {
                    template: name.into(),
                    node: "pve1".into(),
                })
                .map_or(0, |counter| counter.get())
        };
        let job = |vmid, marker: Marker| JobVm {
            vm: crate::vm::VmRef {
                node: "pve1".into(),
                vmid,
            },
            marker,
            report: None,
        };
        let mut condemned = Marker::new(&Default::default());
        condemned.deadline = Some(condemned.created);
        let claimed = Marker::for_job(&Default::default(), "h", Duration::from_secs(60));
        let mut watch = Watch::new();
        watch.warm_before.insert(
            name.into(),
            [("pve1".to_string(), 1), ("pve1".to_string(), 2)].into(),
        );
        let jobs = [job(1, condemned), job(2, claimed.clone()), job(3, claimed)];
        watch.listed(name, &BTreeSet::new(), &[], &jobs, &key);
        // VM 2 was warm and is a job's now; VM 1 is being recycled; VM 3 was never warm.
        assert_eq!(claims(), 1);
        // The next round: nothing was warm before it any more.
        watch.listed(name, &BTreeSet::new(), &[], &jobs, &key);
        assert_eq!(claims(), 1);
    }

    #[test]
    fn each_prepare_counts_once_whatever_the_rounds_saw() {
        let name = "count-test";
        let fresh = || Reported {
            taken: 0,
            discarded: 0,
            none: false,
            seen: Instant::now(),
        };
        // Claimed at once, seen in three rounds.
        let mut a = fresh();
        for _ in 0..3 {
            count_report(name, &mut a, ClaimOutcome::Claimed, 0, 120);
        }
        assert_eq!((count(name, "claimed"), count(name, "discarded")), (1, 0));
        // Two taken and discarded, unseen, then a clone: 2 claimed, 2 discarded, 1 none.
        let mut b = fresh();
        count_report(name, &mut b, ClaimOutcome::None, 2, 900);
        count_report(name, &mut b, ClaimOutcome::None, 2, 900);
        assert_eq!(count(name, "claimed"), 3);
        assert_eq!(count(name, "discarded"), 2);
        assert_eq!(count(name, "none"), 1);
        // One seen taken (later discarded), then the second kept: 2 claimed, 1 discarded.
        let mut c = fresh();
        count_report(name, &mut c, ClaimOutcome::Claimed, 0, 100);
        count_report(name, &mut c, ClaimOutcome::Claimed, 1, 300);
        assert_eq!(count(name, "claimed"), 5);
        assert_eq!(count(name, "discarded"), 3);
        assert_eq!(count(name, "none"), 1);
        // An absurd discard count is capped.
        let mut d = fresh();
        count_report(name, &mut d, ClaimOutcome::None, u32::MAX, u64::MAX);
        assert_eq!(
            count(name, "discarded"),
            3 + u64::from(MAX_COUNTED_DISCARDS)
        );
        let text = crate::metrics::encode();
        assert!(
            text.contains(
                "gitlab_proxmox_runner_prepare_claim_duration_seconds_count{template=\"count-test\",outcome=\"claimed\"} 3"
            ),
            "{text}"
        );
    }
}
