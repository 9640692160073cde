//! The ownership marker: the FIRST line of the description of every VM this driver creates,
//! and the one place that decides whether a VM is ours and when it may be swept, e.g.
//!
//! ```text
//! gitlab-proxmox-runner: v=2 nonce=6a1f0c3d9b2e4f5a8c7d6e5f4a3b2c1d runner=ci-host-1 created=1764293000 deadline=1764300200 driver=0.1.0 job=8123456 pipeline=991 project=group/project
//! ```
//!
//! - **Ownership is the nonce**: 128 random bits prepare draws for every VM and keeps in the job
//!   state. cleanup destroys the VM at the state's VMID only when the marker line carries that
//!   nonce; two prepares of the same job (the runner retries prepare) are different owners.
//! - **Fixed position, no job text that can reach it**: only the first line counts, whatever the
//!   description holds after it. Job-supplied text (project path; ids are numbers) is
//!   percent-encoded on that line, and in the sentence for people after it, so it can neither
//!   add a line nor a `key=value` pair.
//! - **Host-set facts only decide**: `runner` is the host's `PROXMOX_RUNNER_ID`; `created` and
//!   `deadline` are the driver's clock. `deadline` is the job timeout (`CI_JOB_TIMEOUT`, which a
//!   job can override, so capped by the host's `PROXMOX_MAX_JOB_TIMEOUT`) plus
//!   [`DEADLINE_MARGIN`] for prepare and cleanup. `job`, `pipeline` and `project` are labels.
//! - **v=1** markers (older driver versions, still on running VMs) are read too: their `runner`
//!   was the job-overridable `CI_RUNNER_SHORT_TOKEN`, so it is ignored, and they have no
//!   deadline: gc sweeps them by age alone.
//! - **Warm VMs** (made by `gitlab-proxmox-runner pool`, never yet given to a job) carry a v2
//!   marker with four more fields at the end: `warm=<template VMID> tdigest=<template config
//!   digest> pool=<pool service id> addr=<SSH address>`; `runner` is the pool host's
//!   `PROXMOX_RUNNER_ID` and `deadline` its idle deadline. The lines after it name the pinned
//!   SSH host keys (`ssh-host-key: ssh-ed25519 AAAA...`): public keys, readable by anyone with
//!   VM.Audit, and nothing of a job's has ever touched that description. A claim replaces the
//!   whole description with the job's marker, so a claimed VM is a job VM like any other. An
//!   older driver reads a warm marker as a job VM with that deadline, which is also right.
//! - **Claim reports** (for the pool service's metrics): a prepare that looked for a warm VM
//!   writes, on the SECOND line of its VM's description, what it found ([`ClaimReport`]):
//!   `gitlab-proxmox-runner-claim: outcome=claimed ms=412 discards=0 template=60900 mac=...`,
//!   sealed with the fleet key for that VM and that marker line. Only host-set numbers and one
//!   word; the pool service only counts them (nothing it decides reads them), and an older
//!   driver ignores the line (only the first counts).

use std::fmt::Write as _;
use std::time::Duration;

use percent_encoding::{
    percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS, NON_ALPHANUMERIC,
};

use crate::fleet_key::FleetKey;
use crate::job::JobInfo;
use crate::proxmox::VmRef;

pub const MARKER_PREFIX: &str = "gitlab-proxmox-runner:";
pub const CURRENT_VERSION: u8 = 2;
/// What a VM may live beyond its job's timeout: prepare (a full clone, the boot), after_script
/// and uploads, and cleanup's own bound.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(3600);
const NONE: &str = "-";

/// Everything but what reads well in a project path or token is percent-encoded, so a value
/// can never contain a space, `=` or a newline.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// In the sentence for people: control characters (newlines included) and `%` itself.
const SENTENCE: &AsciiSet = &CONTROLS.add(b'%');

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub version: u8,
    /// v2: the creating runner host's `PROXMOX_RUNNER_ID`. v1: `CI_RUNNER_SHORT_TOKEN`, which a
    /// job can override, so never used to decide anything.
    pub runner: Option<String>,
    /// Labels from the job (its predefined variables, which it can override).
    pub job_id: Option<u64>,
    pub project: Option<String>,
    pub pipeline_id: Option<u64>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// v2: when the VM's job must be over, seconds since the Unix epoch.
    pub deadline: Option<u64>,
    pub driver_version: String,
    /// 128 random bits as hex, new for every prepare.
    pub nonce: String,
    /// Set on a warm VM that no job has claimed yet.
    pub warm: Option<Warm>,
    /// A warm marker's HMAC (hex) with the fleet key over everything a claim acts on (see
    /// [`Marker::seal`]); the last field of the line.
    pub mac: Option<String>,
}

/// What a warm VM's marker says about it, all host-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warm {
    /// The template it was cloned from.
    pub template: u32,
    /// The template's config digest at clone time: a different digest now means the template
    /// changed, and the warm VM is stale.
    pub template_digest: String,
    /// The pool service that made it.
    pub pool: String,
    /// The address its SSH answered on; empty while it is still warming.
    pub address: String,
}

/// Prefix of the host key lines after a warm marker.
pub const HOST_KEY_LINE: &str = "ssh-host-key: ";

/// Prefix of a job VM's claim report, the second line of its description.
pub const CLAIM_REPORT_PREFIX: &str = "gitlab-proxmox-runner-claim:";

/// What one prepare's look for a warm VM came to, as the VM it ends up with (or each warm VM
/// it takes) records it for the pool service to count. Host-set facts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimReport {
    pub outcome: ClaimOutcome,
    /// Milliseconds from the start of the claim to taking this VM (`claimed`: the swap that
    /// won, before its checks) or to giving up (`none`).
    pub ms: u64,
    /// Warm VMs this prepare took before this one and destroyed for failing their checks.
    pub discards: u32,
    /// The template VM the claimed warm VM was cloned from, or the job's template (`none`).
    pub template: u32,
    /// HMAC (hex) with the fleet key over the VM, its marker line and the fields above.
    pub mac: Option<String>,
}

/// The two words a claim report may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClaimOutcome {
    /// This warm VM was taken (its compare-and-swap won); its checks come next.
    Claimed,
    /// No warm VM to keep: the VM carrying this report is a clone.
    None,
}

impl ClaimOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimOutcome::Claimed => "claimed",
            ClaimOutcome::None => "none",
        }
    }
}

impl ClaimReport {
    /// The report line (no newline), MAC included when sealed.
    pub fn render(&self) -> String {
        let mut line = format!(
            "{CLAIM_REPORT_PREFIX} outcome={} ms={} discards={} template={}",
            self.outcome.as_str(),
            self.ms,
            self.discards,
            self.template
        );
        if let Some(mac) = &self.mac {
            let _ = write!(line, " mac={}", utf8_percent_encode(mac, VALUE));
        }
        line
    }

    /// Parses a report line: `None` unless every field is there and well-formed.
    pub fn parse_line(line: &str) -> Option<ClaimReport> {
        let rest = line.trim().strip_prefix(CLAIM_REPORT_PREFIX)?;
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for pair in rest.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            if fields.iter().any(|(seen, _)| *seen == key) {
                return None;
            }
            fields.push((key, value));
        }
        let field = |name: &str| fields.iter().find(|(key, _)| *key == name).map(|f| f.1);
        let outcome = match field("outcome")? {
            "claimed" => ClaimOutcome::Claimed,
            "none" => ClaimOutcome::None,
            _ => return None,
        };
        Some(ClaimReport {
            outcome,
            ms: field("ms")?.parse().ok()?,
            discards: field("discards")?.parse().ok()?,
            template: field("template")?.parse().ok()?,
            mac: field("mac")
                .filter(|mac| mac.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_string),
        })
    }

    /// The report on the second line of `description` (the line right after the marker).
    pub fn find_in(description: &str) -> Option<ClaimReport> {
        ClaimReport::parse_line(description.trim_start().lines().nth(1)?)
    }

    fn sealed_message(&self, vm: &VmRef, marker: &Marker) -> Vec<u8> {
        let unsealed = ClaimReport {
            mac: None,
            ..self.clone()
        };
        format!(
            "gitlab-proxmox-runner claim report v1\nvmid={}\nnode={}\n{}\n{}\n",
            vm.vmid,
            vm.node,
            marker.render(),
            unsealed.render()
        )
        .into_bytes()
    }

    /// Sets the MAC for this report on `vm`, whose description's marker is `marker`.
    pub fn seal(&mut self, key: &FleetKey, vm: &VmRef, marker: &Marker) {
        self.mac = Some(key.sign(&self.sealed_message(vm, marker)));
    }

    /// Whether the report carries a valid MAC for `vm` and `marker`: written by a host of the
    /// fleet for this very VM and job, unchanged since.
    pub fn is_sealed_for(&self, key: &FleetKey, vm: &VmRef, marker: &Marker) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|mac| key.verify(&self.sealed_message(vm, marker), mac))
    }
}

/// `created` + the job's timeout (capped at `max_job_timeout`, which it is when unknown) +
/// [`DEADLINE_MARGIN`].
pub fn deadline_for(created: u64, job_timeout_secs: Option<u64>, max_job_timeout: Duration) -> u64 {
    let cap = max_job_timeout.as_secs();
    let timeout = job_timeout_secs.unwrap_or(cap).min(cap);
    created
        .saturating_add(timeout)
        .saturating_add(DEADLINE_MARGIN.as_secs())
}

impl Marker {
    /// A marker for this job on the runner host `runner_id`, stamped now, with a fresh nonce.
    pub fn for_job(job: &JobInfo, runner_id: &str, max_job_timeout: Duration) -> Marker {
        let created = crate::joblog::now_epoch();
        Marker {
            version: CURRENT_VERSION,
            runner: Some(runner_id.to_string()),
            job_id: job.job_id,
            project: job.project_path.clone(),
            pipeline_id: job.pipeline_id,
            created,
            deadline: Some(deadline_for(created, job.timeout_secs, max_job_timeout)),
            driver_version: crate::DRIVER_VERSION.to_string(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            warm: None,
            mac: None,
        }
    }

    /// A warm VM's marker: made by `runner_id`'s pool service `warm.pool` now, recycled after
    /// `max_idle`.
    pub fn for_warm(runner_id: &str, warm: Warm, max_idle: Duration) -> Marker {
        let created = crate::joblog::now_epoch();
        Marker {
            version: CURRENT_VERSION,
            runner: Some(runner_id.to_string()),
            job_id: None,
            project: None,
            pipeline_id: None,
            created,
            deadline: Some(created.saturating_add(max_idle.as_secs())),
            driver_version: crate::DRIVER_VERSION.to_string(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            warm: Some(warm),
            mac: None,
        }
    }

    /// What a warm marker's MAC covers: the VM it sits on (VMID and node, so that a copy on
    /// another VM proves nothing), every field of its line (nonce, runner, pool, created,
    /// deadline, template and digest, address) and the pinned host keys, in order.
    fn sealed_message(&self, vm: &VmRef, host_keys: &[String]) -> Vec<u8> {
        let unsealed = Marker {
            mac: None,
            ..self.clone()
        };
        let mut message = format!(
            "gitlab-proxmox-runner warm VM v1\nvmid={}\nnode={}\n{}\n",
            vm.vmid,
            vm.node,
            unsealed.render()
        );
        for key in host_keys {
            let _ = writeln!(message, "{HOST_KEY_LINE}{key}");
        }
        message.into_bytes()
    }

    /// Sets the MAC for this marker on `vm` with `host_keys` pinned.
    pub fn seal(&mut self, key: &FleetKey, vm: &VmRef, host_keys: &[String]) {
        self.mac = Some(key.sign(&self.sealed_message(vm, host_keys)));
    }

    /// Whether the marker carries a valid MAC for `vm` and `host_keys`: made by a host that
    /// holds the fleet key, for this very VM, unchanged since.
    pub fn is_sealed_for(&self, key: &FleetKey, vm: &VmRef, host_keys: &[String]) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|mac| key.verify(&self.sealed_message(vm, host_keys), mac))
    }

    /// The description of a warm VM: its marker, the pinned host keys, a sentence.
    pub fn warm_description(&self, host_keys: &[String]) -> String {
        let mut text = self.render();
        text.push('\n');
        for key in host_keys {
            // Key lines were checked when read (type and base64 only), so no newline.
            let _ = write!(text, "\n{HOST_KEY_LINE}{key}");
        }
        text.push_str(
            "\n\nA warm VM of gitlab-proxmox-runner pool, never yet given to a job; a job \
             claims it, or the pool or `gitlab-proxmox-runner gc` recycles it.\n",
        );
        text
    }

    /// Seconds since it was created.
    pub fn age_secs(&self) -> u64 {
        crate::joblog::now_epoch().saturating_sub(self.created)
    }

    /// Whether its deadline has passed.
    pub fn is_past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| crate::joblog::now_epoch() >= deadline)
    }

    /// [`Marker::for_job`] with no runner identity and the default job timeout cap.
    pub fn new(job: &JobInfo) -> Marker {
        let mut marker = Marker::for_job(job, NONE, crate::config::DEFAULT_MAX_JOB_TIMEOUT);
        marker.runner = None;
        marker
    }

    /// The marker line (no newline).
    pub fn render(&self) -> String {
        fn text(value: Option<&str>) -> String {
            match value {
                Some(value) if !value.is_empty() => utf8_percent_encode(value, VALUE).to_string(),
                _ => NONE.to_string(),
            }
        }
        fn number(value: Option<u64>) -> String {
            value.map_or_else(|| NONE.to_string(), |n| n.to_string())
        }
        let mut line = String::from(MARKER_PREFIX);
        if self.version == 1 {
            let _ = write!(
                line,
                " v=1 runner={} job={} project={} pipeline={} created={} driver={} nonce={}",
                text(self.runner.as_deref()),
                number(self.job_id),
                text(self.project.as_deref()),
                number(self.pipeline_id),
                self.created,
                text(Some(&self.driver_version)),
                text(Some(&self.nonce)),
            );
            return line;
        }
        let _ = write!(
            line,
            " v={} nonce={} runner={} created={} deadline={} driver={} job={} pipeline={} project={}",
            self.version,
            text(Some(&self.nonce)),
            text(self.runner.as_deref()),
            self.created,
            number(self.deadline),
            text(Some(&self.driver_version)),
            number(self.job_id),
            number(self.pipeline_id),
            text(self.project.as_deref()),
        );
        if let Some(warm) = &self.warm {
            let _ = write!(
                line,
                " warm={} tdigest={} pool={} addr={}",
                warm.template,
                text(Some(&warm.template_digest)),
                text(Some(&warm.pool)),
                text(Some(&warm.address)),
            );
            if let Some(mac) = &self.mac {
                let _ = write!(line, " mac={}", text(Some(mac)));
            }
        }
        line
    }

    /// The whole VM description: the marker line, then a sentence for people in which job text
    /// cannot start a line either.
    pub fn description(&self) -> String {
        let job = self
            .job_id
            .map_or_else(|| "a CI job".to_string(), |id| format!("CI job {id}"));
        let project = self.project.as_deref().map_or_else(String::new, |path| {
            format!(" of {}", utf8_percent_encode(path, SENTENCE))
        });
        format!(
            "{}\n\nCreated by gitlab-proxmox-runner for {job}{project}; destroyed by the job's \
             cleanup, or by `gitlab-proxmox-runner gc` if the runner died.\n",
            self.render()
        )
    }

    /// [`Marker::description`] with `report` on the second line (the job text stays in the
    /// sentence, where it cannot start a line).
    pub fn description_with_report(&self, report: &ClaimReport) -> String {
        let description = self.description();
        let (line, rest) = description.split_once('\n').unwrap_or((&description, ""));
        format!("{line}\n{}\n{rest}", report.render())
    }

    /// Parses one marker line. `None` unless it is a complete marker of a known version.
    pub fn parse_line(line: &str) -> Option<Marker> {
        let rest = line.trim().strip_prefix(MARKER_PREFIX)?;
        let mut fields: Vec<(&str, Option<String>)> = Vec::new();
        for pair in rest.split_whitespace() {
            let (key, raw) = pair.split_once('=')?;
            // A key twice: not a line this driver wrote.
            if fields.iter().any(|(seen, _)| *seen == key) {
                return None;
            }
            let value = if raw == NONE {
                None
            } else {
                Some(percent_decode_str(raw).decode_utf8().ok()?.into_owned())
            };
            fields.push((key, value));
        }
        let field = |name: &str| -> Option<String> {
            fields
                .iter()
                .find(|(key, _)| *key == name)
                .and_then(|(_, value)| value.clone())
        };
        // `Some(None)` for `-` or absent, `None` for garbage.
        let number = |name: &str| -> Option<Option<u64>> {
            match field(name) {
                None => Some(None),
                Some(text) => text.parse().ok().map(Some),
            }
        };
        let version = match field("v").as_deref() {
            Some("1") => 1,
            Some("2") => 2,
            _ => return None,
        };
        let nonce = field("nonce").filter(|nonce| {
            (16..=64).contains(&nonce.len()) && nonce.chars().all(|c| c.is_ascii_hexdigit())
        })?;
        let deadline = number("deadline")?;
        if version == 2 && deadline.is_none() {
            return None;
        }
        let warm = match number("warm")? {
            Some(template) if version == 2 => Some(Warm {
                template: u32::try_from(template).ok()?,
                template_digest: field("tdigest")?,
                pool: field("pool")?,
                // `-` (empty): still warming, not claimable yet.
                address: field("addr").unwrap_or_default(),
            }),
            _ => None,
        };
        Some(Marker {
            version,
            runner: field("runner"),
            job_id: number("job")?,
            project: field("project"),
            pipeline_id: number("pipeline")?,
            created: number("created")??,
            deadline: if version == 1 { None } else { deadline },
            driver_version: field("driver")?,
            nonce,
            mac: warm.as_ref().and(field("mac")),
            warm,
        })
    }

    /// The marker on the first line of a VM description. Whatever follows that line (another
    /// marker included) does not count.
    pub fn find_in(description: &str) -> Option<Marker> {
        Marker::parse_line(description.trim_start().lines().next()?)
    }

    /// Whether `gc --runner <id>` covers this VM. A v1 marker's runner is job-controlled, so
    /// v1 VMs are judged by age alone, whatever the filter.
    pub fn made_by_runner(&self, runner_id: &str) -> bool {
        self.version == 1 || self.runner.as_deref() == Some(runner_id)
    }

    /// When gc may destroy the VM: `created + max_age` when the admin passed `--max-age`, else
    /// the recorded deadline, else (v1) `created + default_max_age`.
    pub fn sweepable_from(&self, max_age: Option<Duration>, default_max_age: Duration) -> u64 {
        match (max_age, self.deadline) {
            (Some(age), _) => self.created.saturating_add(age.as_secs()),
            (None, Some(deadline)) => deadline,
            (None, None) => self.created.saturating_add(default_max_age.as_secs()),
        }
    }
}

/// The host keys a warm VM's description pins (valid key lines only).
pub fn warm_host_keys(description: &str) -> Vec<String> {
    description
        .lines()
        .filter_map(|line| line.strip_prefix(HOST_KEY_LINE))
        .filter_map(crate::ssh::key_lines::public_key_line)
        .collect()
}

/// `Ok` when `description` carries `expected`'s marker (same version and nonce), else why not.
pub fn ownership(description: Option<&str>, expected: &Marker) -> Result<(), String> {
    match description.and_then(Marker::find_in) {
        Some(found) if found.version == expected.version && found.nonce == expected.nonce => Ok(()),
        Some(found) => Err(format!(
            "its ownership marker belongs to another prepare (job {}, created {}, nonce {})",
            found.job_id.map_or("-".to_string(), |id| id.to_string()),
            found.created,
            found.nonce
        )),
        None => Err(
            "its description carries no gitlab-proxmox-runner ownership marker on its first line"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobInfo {
        JobInfo {
            job_id: Some(8123456),
            pipeline_id: Some(991),
            project_path: Some("group/sub group/project".into()),
            project_slug: Some("group-sub-group-project".into()),
            runner_short_token: Some("xS6Vzpvo".into()),
            timeout_secs: Some(600),
            ..Default::default()
        }
    }

    fn marker() -> Marker {
        Marker::for_job(&job(), "ci-host-1", Duration::from_secs(3600))
    }

    #[test]
    fn a_marker_round_trips_through_its_line_and_the_description() {
        let marker = marker();
        let line = marker.render();
        assert!(
            line.starts_with("gitlab-proxmox-runner: v=2 nonce="),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(line.contains("job=8123456"));
        assert!(line.contains("runner=ci-host-1"), "{line}");
        assert!(line.contains("project=group/sub%20group/project"), "{line}");
        assert_eq!(Marker::parse_line(&line), Some(marker.clone()));
        assert_eq!(Marker::find_in(&marker.description()), Some(marker));
    }

    #[test]
    fn the_deadline_is_the_job_timeout_capped_by_the_host_plus_a_margin() {
        let marker = marker();
        assert_eq!(marker.deadline, Some(marker.created + 600 + 3600));
        let greedy = JobInfo {
            timeout_secs: Some(10 * 365 * 86_400),
            ..job()
        };
        let capped = Marker::for_job(&greedy, "h", Duration::from_secs(7200));
        assert_eq!(capped.deadline, Some(capped.created + 7200 + 3600));
        let unknown = JobInfo {
            timeout_secs: None,
            ..job()
        };
        let default = Marker::for_job(&unknown, "h", Duration::from_secs(7200));
        assert_eq!(
            default.deadline,
            capped
                .deadline
                .map(|d| d - capped.created + default.created)
        );
        assert_eq!(
            deadline_for(u64::MAX - 1, Some(5), Duration::from_secs(9)),
            u64::MAX
        );
    }

    #[test]
    fn job_text_cannot_add_lines_pairs_or_a_second_owner() {
        let forged_line = marker().render();
        let evil = JobInfo {
            project_path: Some(format!("g/p\n{forged_line}\nnonce=00 x=y")),
            ..job()
        };
        let ours = Marker::for_job(&evil, "ci-host-1", Duration::from_secs(3600));
        let description = ours.description();
        // Marker line, blank line, sentence: nothing else.
        assert_eq!(description.lines().count(), 3, "{description}");
        assert!(description
            .lines()
            .skip(1)
            .all(|l| !l.starts_with(MARKER_PREFIX)));
        assert_eq!(Marker::find_in(&description), Some(ours.clone()));
        assert_eq!(ownership(Some(&description), &ours), Ok(()));
        // Extra marker lines after ours (edited by hand, or a forgery): ours still counts.
        let appended = format!("{description}{forged_line}\n{forged_line}\n");
        assert_eq!(ownership(Some(&appended), &ours), Ok(()));
        // A forged line first is simply another owner.
        let prepended = format!("{forged_line}\n{description}");
        assert!(ownership(Some(&prepended), &ours).is_err());
    }

    #[test]
    fn every_prepare_gets_its_own_nonce() {
        let a = marker();
        let b = marker();
        assert_ne!(a.nonce, b.nonce);
        assert_eq!(a.nonce.len(), 32);
        assert!(ownership(Some(&a.description()), &b).is_err());
    }

    #[test]
    fn a_warm_marker_round_trips_with_its_host_keys_and_reads_as_v2() {
        let warm = Warm {
            template: 60930,
            template_digest: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567".into(),
            pool: "pool-a".into(),
            address: "192.0.2.10".into(),
        };
        let marker = Marker::for_warm("ci-host-1", warm.clone(), Duration::from_secs(600));
        assert_eq!(marker.deadline, Some(marker.created + 600));
        let keys = vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c".to_string(),
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAA=".to_string(),
        ];
        let description = marker.warm_description(&keys);
        let line = description.lines().next().unwrap();
        assert!(
            line.ends_with(
                " warm=60930 tdigest=0a1b2c3d4e5f60718293a4b5c6d7e8f901234567 pool=pool-a \
                 addr=192.0.2.10"
            ),
            "{line}"
        );
        let parsed = Marker::find_in(&description).unwrap();
        assert_eq!(parsed, marker);
        assert_eq!(parsed.warm, Some(warm.clone()));
        assert_eq!(warm_host_keys(&description), keys);
        assert_eq!(ownership(Some(&description), &marker), Ok(()));
        // A job marker has no warm fields, so job VMs' lines are unchanged.
        let job_line = self::marker().render();
        assert!(!job_line.contains("warm="), "{job_line}");
        assert_eq!(Marker::parse_line(&job_line).unwrap().warm, None);
        // Still warming: no address yet, and gc must still read it as ours.
        let warming = Marker::for_warm(
            "ci-host-1",
            Warm {
                address: String::new(),
                ..warm.clone()
            },
            Duration::from_secs(600),
        );
        let warming_line = warming.render();
        assert!(warming_line.ends_with(" addr=-"), "{warming_line}");
        assert_eq!(Marker::parse_line(&warming_line), Some(warming));
        // A warm line missing one of its fields is not a warm marker of ours.
        let broken = line.replace(" pool=pool-a", "");
        assert_eq!(Marker::parse_line(&broken), None);
    }

    #[test]
    fn a_sealed_warm_marker_verifies_only_for_its_vm_its_keys_and_its_fields() {
        let key = FleetKey::parse("dGVzdCBmbGVldCBrZXkgb2YgdGhlIHRlc3Qga2l0ISE=").unwrap();
        let warm = Warm {
            template: 60930,
            template_digest: "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567".into(),
            pool: "pool-a".into(),
            address: "192.0.2.10".into(),
        };
        let vm = VmRef {
            node: "pve1".into(),
            vmid: 2000042,
        };
        let keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c".to_string()];
        let mut marker = Marker::for_warm("ci-host-1", warm, Duration::from_secs(600));
        assert!(!marker.is_sealed_for(&key, &vm, &keys), "unsealed");
        marker.seal(&key, &vm, &keys);
        let description = marker.warm_description(&keys);
        let parsed = Marker::find_in(&description).unwrap();
        assert!(description.lines().next().unwrap().contains(" mac="));
        assert!(parsed.is_sealed_for(&key, &vm, &warm_host_keys(&description)));
        // The same line on another VM, another node, with other keys, or under another key.
        let elsewhere = VmRef {
            vmid: 2000043,
            ..vm.clone()
        };
        assert!(!parsed.is_sealed_for(&key, &elsewhere, &keys));
        let other_node = VmRef {
            node: "pve2".into(),
            ..vm.clone()
        };
        assert!(!parsed.is_sealed_for(&key, &other_node, &keys));
        assert!(!parsed.is_sealed_for(&key, &vm, &[]));
        let forger = FleetKey::parse(&crate::fleet_key::FleetKey::generate().unwrap()).unwrap();
        assert!(!parsed.is_sealed_for(&forger, &vm, &keys));
        // Any field changed on the line: the address, the deadline, the digest.
        for (from, to) in [
            ("addr=192.0.2.10", "addr=192.0.2.66"),
            ("tdigest=0a1b", "tdigest=ffff"),
            (" pool=pool-a", " pool=pool-b"),
        ] {
            let forged = description.replacen(from, to, 1);
            let forged = Marker::find_in(&forged).unwrap();
            assert!(!forged.is_sealed_for(&key, &vm, &keys), "{from} → {to}");
        }
        let mut later = parsed.clone();
        later.deadline = later.deadline.map(|d| d + 86_400);
        assert!(!later.is_sealed_for(&key, &vm, &keys));
        // A job marker never carries one, even if the line says so.
        let job_line = format!("{} mac={}", self::marker().render(), "0".repeat(64));
        assert_eq!(Marker::parse_line(&job_line).unwrap().mac, None);
    }

    #[test]
    fn a_claim_report_rides_on_the_second_line_and_verifies_only_where_it_was_written() {
        let key = FleetKey::parse("dGVzdCBmbGVldCBrZXkgb2YgdGhlIHRlc3Qga2l0ISE=").unwrap();
        let vm = VmRef {
            node: "pve1".into(),
            vmid: 2000042,
        };
        let ours = marker();
        let mut report = ClaimReport {
            outcome: ClaimOutcome::Claimed,
            ms: 412,
            discards: 1,
            template: 60900,
            mac: None,
        };
        report.seal(&key, &vm, &ours);
        let description = ours.description_with_report(&report);
        // The marker is unchanged (first line), the report is the second, the sentence after.
        assert_eq!(Marker::find_in(&description), Some(ours.clone()));
        assert_eq!(ownership(Some(&description), &ours), Ok(()));
        let line = description.lines().nth(1).unwrap();
        assert!(
            line.starts_with(
                "gitlab-proxmox-runner-claim: outcome=claimed ms=412 discards=1 template=60900 mac="
            ),
            "{line}"
        );
        assert_eq!(description.lines().count(), 4, "{description}");
        let found = ClaimReport::find_in(&description).unwrap();
        assert_eq!(found, report);
        assert!(found.is_sealed_for(&key, &vm, &ours));
        // Another VM, another job's marker, another key, any field changed: not ours.
        let elsewhere = VmRef {
            vmid: 2000043,
            ..vm.clone()
        };
        assert!(!found.is_sealed_for(&key, &elsewhere, &ours));
        assert!(!found.is_sealed_for(&key, &vm, &marker()));
        let forger = FleetKey::parse(&crate::fleet_key::FleetKey::generate().unwrap()).unwrap();
        assert!(!found.is_sealed_for(&forger, &vm, &ours));
        for (from, to) in [
            ("outcome=claimed", "outcome=none"),
            ("ms=412", "ms=1"),
            ("discards=1", "discards=9"),
            ("template=60900", "template=60901"),
        ] {
            let forged = ClaimReport::find_in(&description.replacen(from, to, 1)).unwrap();
            assert!(!forged.is_sealed_for(&key, &vm, &ours), "{from} → {to}");
        }
        // Only the second line counts; a job's project path cannot start one.
        let evil = JobInfo {
            project_path: Some(format!("g/p\n{line}")),
            ..job()
        };
        let evil = Marker::for_job(&evil, "ci-host-1", Duration::from_secs(3600));
        assert_eq!(ClaimReport::find_in(&evil.description()), None);
        assert_eq!(ClaimReport::find_in(&ours.description()), None);
        // Garbage is no report.
        for bad in [
            "gitlab-proxmox-runner-claim: outcome=maybe ms=1 discards=0 template=1",
            "gitlab-proxmox-runner-claim: outcome=none ms=-1 discards=0 template=1",
            "gitlab-proxmox-runner-claim: outcome=none ms=1 discards=0",
            "gitlab-proxmox-runner-claim: outcome=none outcome=none ms=1 discards=0 template=1",
        ] {
            assert_eq!(ClaimReport::parse_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn missing_job_facts_are_dashes() {
        let marker = Marker::new(&JobInfo::default());
        let line = marker.render();
        assert!(line.contains("runner=- "), "{line}");
        assert!(line.contains("job=- pipeline=- project=-"), "{line}");
        assert_eq!(Marker::parse_line(&line), Some(marker));
    }

    #[test]
    fn the_recorded_v1_description_parses_and_is_judged_by_age() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/proxmox/config.json"
        ))
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let description = config["data"]["description"].as_str().unwrap();
        let marker = Marker::find_in(description).unwrap();
        assert_eq!(marker.version, 1);
        assert_eq!(marker.runner.as_deref(), Some("xS6Vzpvo"));
        assert_eq!(marker.job_id, Some(8123456));
        assert_eq!(marker.created, 1764293000);
        assert_eq!(marker.deadline, None);
        assert_eq!(Marker::parse_line(&marker.render()), Some(marker.clone()));
        assert!(marker.made_by_runner("anyone"));
        let day = Duration::from_secs(86_400);
        assert_eq!(marker.sweepable_from(None, day), 1764293000 + 86_400);
        // A v1 VM whose job appended a second marker line: still ours (the first line counts).
        let forged = format!("{description}\n{}\n", marker.render());
        assert_eq!(ownership(Some(&forged), &marker), Ok(()));
    }

    #[test]
    fn gc_uses_the_deadline_unless_the_admin_overrides_it() {
        let marker = marker();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            marker.sweepable_from(None, hour * 25),
            marker.deadline.unwrap()
        );
        assert_eq!(
            marker.sweepable_from(Some(hour * 48), hour),
            marker.created + 48 * 3600
        );
        assert!(marker.made_by_runner("ci-host-1"));
        assert!(!marker.made_by_runner("xS6Vzpvo"));
    }

    #[test]
    fn damaged_or_foreign_markers_do_not_parse() {
        let line = marker().render();
        assert!(Marker::parse_line(&line.replace("v=2", "v=3")).is_none());
        assert!(Marker::parse_line(&line.replace("job=8123456", "job=abc")).is_none());
        let without_deadline: String = line
            .split(' ')
            .filter(|pair| !pair.starts_with("deadline="))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(Marker::parse_line(&without_deadline).is_none());
        let without_nonce: String = line
            .split(' ')
            .filter(|pair| !pair.starts_with("nonce="))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(Marker::parse_line(&without_nonce).is_none());
        assert!(Marker::parse_line(&format!("{line} nonce=0123456789abcdef")).is_none());
        assert!(Marker::parse_line("gitlab-proxmox-runner: garbage").is_none());
        assert!(Marker::find_in("just a VM someone made by hand").is_none());
        assert!(Marker::find_in(&format!("hand-made\n{line}")).is_none());
    }
}
