//! The ownership marker: one machine-readable line in the description of every VM this driver
//! creates, e.g.
//!
//! ```text
//! gitlab-proxmox-runner: v=1 runner=xS6Vzpvo job=8123456 project=group/project pipeline=991 created=1764293000 driver=0.1.0 nonce=6a1f0c3d9b2e4f5a8c7d6e5f4a3b2c1d
//! ```
//!
//! cleanup compares it with the marker prepare saved in the job state before it destroys a VM
//! (never delete a VM this job did not create); the orphan sweep uses it to find old VMs and
//! their runner. The random per-prepare `nonce` makes two prepares of the same job (the runner
//! retries prepare) different owners.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::job::JobInfo;

pub const MARKER_PREFIX: &str = "gitlab-proxmox-runner:";
const FORMAT_VERSION: &str = "1";
const NONE: &str = "-";

/// Everything but what reads well in a project path or token is percent-encoded, so a value
/// can never contain a space, `=` or a newline.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `CI_RUNNER_SHORT_TOKEN` of the runner that created the VM.
    pub runner: Option<String>,
    pub job_id: Option<u64>,
    pub project: Option<String>,
    pub pipeline_id: Option<u64>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    pub driver_version: String,
    /// 128 random bits as hex, new for every prepare.
    pub nonce: String,
}

impl Marker {
    /// A new marker for this job, stamped now, with a fresh nonce.
    pub fn new(job: &JobInfo) -> Marker {
        Marker {
            runner: job.runner_short_token.clone(),
            job_id: job.job_id,
            project: job.project_path.clone(),
            pipeline_id: job.pipeline_id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|age| age.as_secs())
                .unwrap_or(0),
            driver_version: crate::DRIVER_VERSION.to_string(),
            nonce: format!("{:032x}", rand::random::<u128>()),
        }
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
        let _ = write!(
            line,
            " v={FORMAT_VERSION} runner={} job={} project={} pipeline={} created={} driver={} nonce={}",
            text(self.runner.as_deref()),
            number(self.job_id),
            text(self.project.as_deref()),
            number(self.pipeline_id),
            self.created,
            text(Some(&self.driver_version)),
            text(Some(&self.nonce)),
        );
        line
    }

    /// The whole VM description: the marker line, then a sentence for people.
    pub fn description(&self) -> String {
        let job = self
            .job_id
            .map_or_else(|| "a CI job".to_string(), |id| format!("CI job {id}"));
        let project = self
            .project
            .as_deref()
            .map_or_else(String::new, |path| format!(" of {path}"));
        format!(
            "{}\n\nCreated by gitlab-proxmox-runner for {job}{project}; destroyed by the job's \
             cleanup, or by `gitlab-proxmox-runner gc` if the runner died.\n",
            self.render()
        )
    }

    /// Parses one marker line. `None` unless it is a complete marker of a known version.
    pub fn parse_line(line: &str) -> Option<Marker> {
        let rest = line.trim().strip_prefix(MARKER_PREFIX)?;
        let mut version = None;
        let mut runner = None;
        let mut job_id = None;
        let mut project = None;
        let mut pipeline_id = None;
        let mut created = None;
        let mut driver_version = None;
        let mut nonce = None;
        for pair in rest.split_whitespace() {
            let (key, raw) = pair.split_once('=')?;
            let value = if raw == NONE {
                None
            } else {
                Some(percent_decode_str(raw).decode_utf8().ok()?.into_owned())
            };
            let number = |value: &Option<String>| -> Option<Option<u64>> {
                match value {
                    None => Some(None),
                    Some(text) => text.parse().ok().map(Some),
                }
            };
            match key {
                "v" => version = value,
                "runner" => runner = value,
                "job" => job_id = number(&value)?,
                "project" => project = value,
                "pipeline" => pipeline_id = number(&value)?,
                "created" => created = value.and_then(|text| text.parse::<u64>().ok()),
                "driver" => driver_version = value,
                "nonce" => nonce = value,
                // Later versions may add keys.
                _ => {}
            }
        }
        if version.as_deref() != Some(FORMAT_VERSION) {
            return None;
        }
        let nonce = nonce.filter(|nonce| {
            (16..=64).contains(&nonce.len()) && nonce.chars().all(|c| c.is_ascii_hexdigit())
        })?;
        Some(Marker {
            runner,
            job_id,
            project,
            pipeline_id,
            created: created?,
            driver_version: driver_version?,
            nonce,
        })
    }

    /// The marker in a VM description, if it has exactly one that parses.
    pub fn find_in(description: &str) -> Option<Marker> {
        let mut found = description
            .lines()
            .filter(|line| line.trim_start().starts_with(MARKER_PREFIX))
            .map(Marker::parse_line);
        let first = found.next()??;
        // Two marker lines: someone edited the description; trust neither.
        if found.next().is_some() {
            return None;
        }
        Some(first)
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
            ..Default::default()
        }
    }

    #[test]
    fn a_marker_round_trips_through_its_line_and_the_description() {
        let marker = Marker::new(&job());
        let line = marker.render();
        assert!(!line.contains('\n'));
        assert!(line.contains("job=8123456"));
        assert!(line.contains("project=group/sub%20group/project"), "{line}");
        assert_eq!(Marker::parse_line(&line), Some(marker.clone()));
        assert_eq!(Marker::find_in(&marker.description()), Some(marker));
    }

    #[test]
    fn every_prepare_gets_its_own_nonce() {
        let a = Marker::new(&job());
        let b = Marker::new(&job());
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a, b);
        assert_eq!(a.nonce.len(), 32);
    }

    #[test]
    fn missing_job_facts_are_dashes() {
        let marker = Marker::new(&JobInfo::default());
        let line = marker.render();
        assert!(
            line.contains("runner=- job=- project=- pipeline=-"),
            "{line}"
        );
        assert_eq!(Marker::parse_line(&line), Some(marker));
    }

    #[test]
    fn the_recorded_description_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/proxmox/config.json"
        ))
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let marker = Marker::find_in(config["data"]["description"].as_str().unwrap()).unwrap();
        assert_eq!(marker.runner.as_deref(), Some("xS6Vzpvo"));
        assert_eq!(marker.job_id, Some(8123456));
        assert_eq!(marker.created, 1764293000);
    }

    #[test]
    fn damaged_or_foreign_markers_do_not_parse() {
        let line = Marker::new(&job()).render();
        assert!(Marker::parse_line(&line.replace("v=1", "v=2")).is_none());
        assert!(Marker::parse_line(&line.replace("job=8123456", "job=abc")).is_none());
        let without_nonce: String = line.split(" nonce=").next().unwrap().to_string();
        assert!(Marker::parse_line(&without_nonce).is_none());
        assert!(Marker::parse_line("gitlab-proxmox-runner: garbage").is_none());
        assert!(Marker::find_in("just a VM someone made by hand").is_none());
        let twice = format!("{line}\n{line}\n");
        assert!(Marker::find_in(&twice).is_none());
    }
}
