//! `check --smoke` as findings: the smoke test's outcome ([`smoke::run`]) in the preflight's
//! lines, its phase times for the JSON report, and whether the check could not finish.

use crate::cancel::Cancel;
use crate::check::{smoke, Finding};
use crate::config::Settings;
use crate::joblog;
use crate::proxmox::Client;

/// What the smoke test adds to the report.
#[derive(Debug, Default)]
pub struct Outcome {
    pub findings: Vec<Finding>,
    /// `(phase, seconds)`, in order.
    pub phases: Vec<(String, f64)>,
    /// Interrupted, or its VM could not be removed: the check did not run to the end.
    pub not_run: bool,
}

/// Runs the smoke test and says how it went.
pub async fn run(settings: &Settings, cancel: &Cancel) -> Outcome {
    let mut outcome = Outcome::default();
    let out = &mut outcome.findings;
    let client = match Client::new(&settings.api) {
        Ok(client) => client,
        Err(err) => {
            out.push(Finding::fail(
                "smoke",
                format!("smoke test: {err}"),
                "the message names it",
            ));
            return outcome;
        }
    };
    let smoke = smoke::run(&client, settings, cancel).await;
    outcome.phases = smoke
        .phases
        .iter()
        .map(|(phase, took)| (phase.to_string(), took.as_secs_f64()))
        .collect();
    let phases = smoke
        .phases
        .iter()
        .map(|(phase, took)| format!("{phase} {}", joblog::secs(*took)))
        .collect::<Vec<_>>()
        .join(", ");
    match smoke.result {
        Ok(summary) => out.push(Finding::pass("smoke", format!("{summary}: {phases}"))),
        Err((step, _)) if smoke.interrupted.is_some() => out.push(Finding::fail(
            "smoke",
            format!(
                "smoke test interrupted ({}) while {step}; {}",
                smoke.interrupted.unwrap_or("cancelled"),
                if smoke.left_behind.is_some() {
                    "its VM could NOT be removed (see below)"
                } else {
                    "nothing of it is left on the cluster"
                }
            ),
            "run it again",
        )),
        Err((step, err)) => out.push(Finding::fail(
            "smoke",
            format!("smoke test failed while {step}: {err}"),
            "the Troubleshooting row for the message (the hooks report the same)",
        )),
    }
    if smoke.host_key_source == Some(crate::vm::HostKeySource::FirstUse) {
        out.push(
            Finding::fail(
                "smoke.host_key",
                "smoke test: the VM's SSH host key could not be read through the guest agent",
                "give the token VM.GuestAgent.FileRead (PVE 9) / VM.Monitor (PVE 8), and keep the \
                 host keys at /etc/ssh/ssh_host_*_key.pub in the template",
            )
            .advisory(),
        );
    }
    if let Some((vm, why)) = &smoke.left_behind {
        out.push(Finding::fail(
            "smoke.cleanup",
            format!("smoke test: could not remove {vm}: {why}"),
            format!(
                "remove it by hand (qm stop {0}; qm destroy {0} --purge on {1}), or let \
                 gitlab-proxmox-runner gc sweep it after an hour",
                vm.vmid, vm.node
            ),
        ));
        outcome.not_run = true;
    }
    outcome.not_run |= smoke.interrupted.is_some();
    outcome
}
