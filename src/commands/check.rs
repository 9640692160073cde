//! `check`: the preflight. Runs against the live cluster with the driver's settings, read by
//! the same trust rule as the hooks (a fleet command: the host's settings file and
//! environment, no job), and prints one line per check, ✔ or ✘ with the fix, then a summary
//! (or all of it as JSON with `--format json`). The checks and their wording live in
//! [`crate::check`], whose modules return findings; this only runs them in order and prints
//! (text: each module's lines as it finishes). Every ✘ has its row in the README's
//! troubleshooting table. With `PROXMOX_NODES`, the node and template checks cover every node
//! placement may use ([`crate::check::copies`]), each template on each node's copy of it.
//!
//! Exit status: [`EXIT_READY`] when every required check passed, [`EXIT_NOT_READY`] when one
//! failed, [`EXIT_NOT_RUN`] when the check itself could not finish: interrupted, or its smoke
//! VM could not be removed.

use std::path::Path;

use crate::cancel::Cancel;
use crate::check::{
    api, copies, fleet, host, nodes, privileges, settings, smoke_outcome, templates, vmids,
    Finding, Report,
};
use crate::cli::CheckFormat;
use crate::config::{Settings, CONFIG_FILE_ENV};
use crate::error::Result;
use crate::vm::placement::Strategy;

pub const EXIT_READY: i32 = 0;
pub const EXIT_NOT_READY: i32 = 1;
pub const EXIT_NOT_RUN: i32 = 2;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub smoke: bool,
    pub format: CheckFormat,
    /// Where the settings came from, for the first line.
    pub source: String,
    /// The settings file (`--config` or `GITLAB_PROXMOX_RUNNER_CONFIG`), whose mode is checked.
    pub config_file: Option<std::path::PathBuf>,
}

/// `settings file /etc/...` or `the process environment`.
pub fn settings_source(file: Option<&Path>) -> String {
    file.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(Into::into))
        .map_or_else(
            || "the process environment".to_string(),
            |path| {
                format!(
                    "settings file {} and the process environment",
                    path.display()
                )
            },
        )
}

/// Prints the findings as each check returns them (text) or all at the end (JSON).
struct Output<'a> {
    report: Report,
    options: &'a Options,
}

impl Output<'_> {
    fn add(&mut self, finding: Finding) {
        if self.options.format == CheckFormat::Text {
            println!("{}", finding.text());
        }
        self.report.add(finding);
    }

    fn extend(&mut self, findings: impl IntoIterator<Item = Finding>) {
        for finding in findings {
            self.add(finding);
        }
    }

    fn finish(self, exit_code: i32) -> i32 {
        match self.options.format {
            CheckFormat::Text => println!("{}", self.report.summary_line()),
            CheckFormat::Json => println!("{}", self.report.json(exit_code)),
        }
        exit_code
    }
}

pub async fn run(loaded: Result<Settings>, options: &Options, cancel: &Cancel) -> i32 {
    let mut out = Output {
        report: Report::default(),
        options,
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(err) => {
            out.add(Finding::fail(
                "settings",
                format!("settings: {err}"),
                "the setting the message names (README, Settings); `check` reads the same \
                 settings file and environment as the hooks",
            ));
            return out.finish(EXIT_NOT_READY);
        }
    };
    let interrupted = tokio::select! {
        () = checks(&settings, &mut out) => None,
        reason = cancel.cancelled() => Some(reason),
    };
    if let Some(reason) = interrupted {
        out.add(Finding::fail(
            "interrupted",
            format!("check was interrupted ({reason}) before it finished"),
            "run it again",
        ));
        return out.finish(EXIT_NOT_RUN);
    }
    if options.smoke {
        if !out.report.all_required_passed() {
            out.add(Finding::skip(
                "smoke",
                "smoke test skipped: fix the ✘ lines above first",
            ));
        } else {
            let smoke = smoke_outcome::run(&settings, cancel).await;
            out.report.smoke_phases = smoke.phases;
            out.extend(smoke.findings);
            if smoke.not_run {
                return out.finish(EXIT_NOT_RUN);
            }
        }
    }
    let exit = if out.report.all_required_passed() {
        EXIT_READY
    } else {
        EXIT_NOT_READY
    };
    out.finish(exit)
}

async fn checks(settings: &Settings, out: &mut Output<'_>) {
    out.extend(settings::findings(settings, &out.options.source));
    out.extend(settings::file_modes(
        out.options.config_file.as_deref(),
        settings,
    ));
    let (api, found) = api::connect(settings).await;
    out.extend(found);
    match api {
        Some(api) => {
            let (needs, vms) = if let Strategy::One { .. } = Strategy::of(settings) {
                out.add(nodes::node_finding(&api, settings).await);
                // One listing for the look-alike templates and the VMID range.
                let vms = api.client.cluster_vms().await;
                let (needs, found) = templates::findings(&api, settings, vms.as_deref().ok()).await;
                out.extend(found);
                (needs, vms)
            } else {
                // One read of each listing serves the node, template and VMID-range checks.
                let cluster = api.client.cluster_nodes().await;
                let vms = api.client.cluster_vms().await;
                let (needs, found) = copies::findings(&api, settings, cluster, &vms).await;
                out.extend(found);
                (needs, vms)
            };
            out.extend(privileges::findings(&api, settings, &needs).await);
            out.add(vmids::range_finding(&api, settings, vms).await);
        }
        None => {
            for what in ["node", "templates", "privileges", "vmid_range"] {
                out.add(Finding::skip(
                    what,
                    format!("{what}: skipped (needs the API)"),
                ));
            }
        }
    }
    out.add(host::ssh_key(settings));
    out.add(host::runner_helper(settings));
    out.add(fleet::fleet_key_finding(settings));
}
