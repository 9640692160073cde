//! A VM that vanishes mid-job (crashed guest, bridge or firewall change, node without uplink):
//! whole jobs driven like gitlab-runner drives them ([`RunnerJob`]), against the fake Proxmox
//! and a real local sshd as the VM, reached through a TCP proxy that the test black-holes.
//! The runner host sets a short keepalive interval ([`SHORT_KEEPALIVE`]): the bounds are the
//! silence budget that follows from it, plus slack.
//!
//! `GPR_BIN` replaces the binary under test (e.g. an older build, to measure it).
//! Without sshd on the machine these tests are skipped, unless `GPR_REQUIRE_SSHD=1`.

use crate::common;

use std::time::{Duration, Instant};

use common::{World, DETECTION_SLACK, SHORT_KEEPALIVE, SHORT_SILENCE_BUDGET};
use gpr_testkit::hook::SYSTEM_FAILURE;
use gpr_testkit::runner::{HookKind, JobOutcome, JobReport};

fn run_call<'a>(report: &'a JobReport, stage: &str) -> Option<&'a gpr_testkit::runner::HookCall> {
    report.calls.iter().find(|call| {
        call.kind
            == HookKind::Run {
                stage: stage.into(),
            }
    })
}

/// `12:03:41` → seconds since midnight.
fn seconds_of_day(text: &str) -> Option<u64> {
    let mut parts = text.split(':').map(|part| part.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    Some(h * 3600 + m * 60 + s)
}

/// The scenario: the network to the VM goes silent while a quiet stage runs.
#[test]
fn a_vm_that_vanishes_mid_stage_fails_the_job_in_seconds_and_leaks_nothing() {
    let test =
        "ssh_lost_vm::a_vm_that_vanishes_mid_stage_fails_the_job_in_seconds_and_leaks_nothing";
    let Some(world) = World::with_settings(test, &[SHORT_KEEPALIVE]) else {
        return;
    };
    let job = world
        .job()
        // A stage that prints nothing for minutes is normal (a long compile, a test suite):
        // only keepalives can tell it from a dead VM.
        .script(
            "build_script",
            "echo quiet-stage-started-$((6 * 7)); sleep 600",
        )
        .script("after_script", "echo after-script-ran")
        .script("upload_artifacts_on_failure", "echo uploading")
        .start();
    assert!(
        job.control()
            .wait_for_log("quiet-stage-started-42", Duration::from_secs(120)),
        "the stage never started:\n{}",
        job.control().log()
    );
    let connections_before_the_loss = world.proxy.connections();
    let lost_at = Instant::now();
    let lost_wall = std::time::SystemTime::now();
    world.proxy.black_hole();

    // The harness announces the next stage the moment build_script's hook has exited.
    let noticed = job
        .control()
        .wait_for_log("Running after_script", Duration::from_secs(240));
    let detection = lost_at.elapsed();
    let report = job.wait();
    let job_end = lost_at.elapsed();
    let cleanup = report
        .calls
        .iter()
        .find(|call| call.kind == HookKind::Cleanup)
        .map(|call| call.duration);
    eprintln!(
        "MEASURED: loss noticed by the stage after {detection:.1?}; job over (cleanup \
         included) {job_end:.1?} after the loss; cleanup took {cleanup:.1?}; later stages: {:?}",
        ["after_script", "upload_artifacts_on_failure"]
            .map(|stage| run_call(&report, stage).map(|call| call.duration))
    );
    for line in report.log.lines().filter(|line| line.contains("ERROR")) {
        eprintln!("  job log: {line}");
    }
    assert!(noticed, "build_script never ended:\n{}", report.log);

    assert!(
        matches!(report.outcome, JobOutcome::SystemFailure { .. }),
        "{:?}\n{}",
        report.outcome,
        report.log
    );
    assert_eq!(report.stage_exit_code("build_script"), Some(SYSTEM_FAILURE));
    assert!(
        detection < SHORT_SILENCE_BUDGET + DETECTION_SLACK,
        "the stage noticed the loss only after {detection:?}:\n{}",
        report.log
    );
    assert!(
        report.log.contains("stopped answering"),
        "the stage does not say what happened:\n{}",
        report.log
    );
    // Every later stage fails at once, with one clear line, without trying to connect.
    for stage in ["after_script", "upload_artifacts_on_failure"] {
        let call = run_call(&report, stage).unwrap_or_else(|| panic!("{stage} did not run"));
        assert_eq!(call.exit_code, Some(SYSTEM_FAILURE), "{stage}");
        assert!(
            call.duration < Duration::from_secs(5),
            "{stage} took {:?}",
            call.duration
        );
    }
    assert_eq!(
        world.proxy.connections(),
        connections_before_the_loss,
        "a later stage tried to reach the lost VM:\n{}",
        report.log
    );
    let unreachable_lines: Vec<&str> = report
        .log
        .lines()
        .filter(|line| line.contains("has been unreachable since"))
        .collect();
    assert_eq!(unreachable_lines.len(), 2, "{}", report.log);
    for line in unreachable_lines {
        assert!(
            line.contains("UTC (lost during build_script); not retrying"),
            "{line}"
        );
        assert!(line.contains("VM "), "{line}");
        // "since" is when the VM went silent, not when the loss was noticed.
        let shown = line
            .split("unreachable since ")
            .nth(1)
            .and_then(|rest| rest.get(..8))
            .and_then(seconds_of_day)
            .unwrap_or_else(|| panic!("no time in {line}"));
        let actual = lost_wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 86_400;
        let off = (shown + 86_400 - actual) % 86_400;
        assert!(
            off <= 3 || off >= 86_400 - 3,
            "shown {shown}, lost at {actual}: {line}"
        );
    }
    assert!(!report.log.contains("after-script-ran"));
    // cleanup destroys the VM through the API, lost or not.
    assert_eq!(
        report
            .calls
            .iter()
            .filter(|call| call.kind == HookKind::Cleanup)
            .map(|call| call.exit_code)
            .collect::<Vec<_>>(),
        [Some(0)],
        "{}",
        report.cleanup_log
    );
    let left = world.lab.fake.job_vms();
    assert!(
        left.is_empty(),
        "VMs left behind: {:?}\n{}",
        left.iter().map(|vm| vm.vmid).collect::<Vec<_>>(),
        report.cleanup_log
    );
    // Detection, two later stages that fail at once, and cleanup through the API.
    assert!(
        job_end < SHORT_SILENCE_BUDGET + DETECTION_SLACK + Duration::from_secs(10),
        "the job ended {job_end:?} after the loss:\n{}",
        report.log
    );
}

/// A VM that was not lost gets the connect retry at a stage's start (a restart blip): here it
/// never comes back, so that one stage retries for its 20 s, records the loss, and the stage
/// after it does not wait again.
#[test]
fn a_vm_that_stops_accepting_between_stages_costs_one_stage_its_patience_not_every_stage() {
    let test = "ssh_lost_vm::a_vm_that_stops_accepting_between_stages_costs_one_stage_its_patience_not_every_stage";
    let Some(world) = World::new(test) else {
        return;
    };
    let gate = world.dir.path().join("connections-refused");
    let job = world
        .job()
        .script(
            "build_script",
            format!(
                "echo build-waiting-$((6 * 7)); while [ ! -e '{}' ]; do sleep 0.05; done",
                gate.display()
            ),
        )
        .script("after_script", "echo after-script-ran")
        .script("upload_artifacts_on_success", "echo uploading")
        .start();
    assert!(
        job.control()
            .wait_for_log("build-waiting-42", Duration::from_secs(120)),
        "the stage never started:\n{}",
        job.control().log()
    );
    // The open connection keeps working; every new one is reset (sshd gone for good).
    world.proxy.refuse_new();
    std::fs::write(&gate, "").unwrap();
    let report = job.wait();
    let durations = [
        "build_script",
        "after_script",
        "upload_artifacts_on_success",
    ]
    .map(|stage| run_call(&report, stage).map(|call| (call.exit_code, call.duration)));
    eprintln!("MEASURED: stages (exit code, duration): {durations:?}");
    assert_eq!(
        report.stage_exit_code("build_script"),
        Some(0),
        "{}",
        report.log
    );
    let (after_code, after_took) = durations[1].expect("after_script ran");
    assert_eq!(after_code, Some(SYSTEM_FAILURE), "{}", report.log);
    // It retried (a blip would have been ridden out), bounded by the stage's patience.
    assert!(
        report.log.contains("gave up after"),
        "after_script did not retry:\n{}",
        report.log
    );
    assert!(
        after_took < Duration::from_secs(28),
        "after_script took {after_took:?}"
    );
    let (upload_code, upload_took) = durations[2].expect("upload_artifacts_on_success ran");
    assert_eq!(upload_code, Some(SYSTEM_FAILURE), "{}", report.log);
    assert!(
        upload_took < Duration::from_secs(5),
        "upload_artifacts_on_success took {upload_took:?}"
    );
    assert!(
        report
            .log
            .contains("UTC (lost during after_script); not retrying"),
        "{}",
        report.log
    );
    assert!(
        world.lab.fake.job_vms().is_empty(),
        "{}",
        report.cleanup_log
    );
}

/// The other side of the bound: a stage that prints nothing for longer than the keepalive
/// budget is healthy, and must not be taken for a lost VM.
#[test]
fn a_quiet_stage_longer_than_the_keepalive_budget_is_not_a_lost_vm() {
    use gpr_testkit::ssh_job::stage_hook;
    use gpr_testkit::sshd::Sshd;
    use gpr_testkit::sshkeys::ClientKey;
    let test = "ssh_lost_vm::a_quiet_stage_longer_than_the_keepalive_budget_is_not_a_lost_vm";
    let Some(sshd) = Sshd::start_or_skip(test) else {
        return;
    };
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    let job = tempfile::tempdir().unwrap();
    // Half the silence budget again of silence from the script itself.
    let quiet = SHORT_SILENCE_BUDGET * 3 / 2;
    let out = stage_hook(
        gpr_testkit::driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &key,
        "build_script",
        &format!("sleep {}; echo still-here\n", quiet.as_secs()),
    )
    .host_env(SHORT_KEEPALIVE.0, SHORT_KEEPALIVE.1)
    .run();
    out.assert_exit(0);
    assert_eq!(out.stdout, "still-here\n");
}
