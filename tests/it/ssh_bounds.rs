//! What a job's VM can push at the runner host stays bounded, and what the runner reports is
//! this stage's own result: real sshd as the VM, the real binary as the hooks.
//!
//! Without sshd on the machine these tests are skipped, unless `GPR_REQUIRE_SSHD=1`.

use crate::common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::World;
use gpr_testkit::hook::SYSTEM_FAILURE;
use gpr_testkit::runner::JobOutcome;
use gpr_testkit::ssh_job::{spawn_until_first_line, stage_hook};
use gpr_testkit::sshd::Sshd;
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::wait_for_every;

/// A stage that failed with `exit 3` and was retried (get_sources is, on any error) leaves 3
/// in `$BUILD_EXIT_CODE_FILE`; a later stage killed by a signal must not be reported as 3.
#[test]
fn a_stage_killed_by_a_signal_does_not_report_an_earlier_stages_exit_code() {
    let test = "ssh_bounds::a_stage_killed_by_a_signal_does_not_report_an_earlier_stages_exit_code";
    let Some(world) = World::new(test) else {
        return;
    };
    let first_try = world.dir.path().join("get-sources-tried");
    let report = world
        .job()
        .job_var("GET_SOURCES_ATTEMPTS", "2")
        .script(
            "get_sources",
            format!(
                "if [ ! -e '{0}' ]; then touch '{0}'; echo first-fetch-fails; exit 3; fi\n\
                 mkdir -p \"$CI_PROJECT_DIR\"",
                first_try.display()
            ),
        )
        // `$$` is the stage script's shell (the body runs in a subshell of it).
        .script("build_script", "kill -KILL $$")
        .run();
    assert!(
        report.log.contains("first-fetch-fails"),
        "get_sources did not fail first:\n{}",
        report.log
    );
    // What a shell reports for SIGKILL (and what other executors show for the OOM killer).
    report.assert_outcome(&JobOutcome::ScriptFailure { exit_code: 137 });
}

/// Polls `/proc/<pid>/status` until the process exits; its VmHWM (peak RSS) in KiB.
fn peak_rss_kib(child: &mut std::process::Child, timeout: Duration) -> u64 {
    let mut peak = 0;
    let what = format!("the hook to exit (within {timeout:?})");
    wait_for_every(&what, timeout, Duration::from_millis(20), || {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let hwm = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok());
            if let Some(hwm) = hwm {
                peak = peak.max(hwm);
            }
        }
        child.try_wait().expect("poll the hook")
    });
    peak
}

/// A VM whose stage floods its output and whose `sudo` answers the cancel's kill command with
/// an endless stream (root in the VM is the job's: it can replace sudo): the hook's memory
/// stays bounded, and the cancel still ends within the driver's own bound.
#[test]
fn a_vm_flooding_output_during_cancel_does_not_grow_the_hooks_memory() {
    let test = "ssh_bounds::a_vm_flooding_output_during_cancel_does_not_grow_the_hooks_memory";
    if let Some(reason) = gpr_testkit::sshd::unavailable_reason() {
        gpr_testkit::sshd::skip(test, &reason);
        return;
    }
    let fake = tempfile::tempdir().unwrap();
    let sudo = fake.path().join("sudo");
    std::fs::write(
        &sudo,
        "#!/bin/sh\n# The stage itself starts through the real sudo; anything else (the kill\n\
         # command of a cancel) gets an endless stream back.\n\
         case \"$*\" in *setsid*) exec /usr/bin/sudo \"$@\";; esac\nexec cat /dev/zero\n",
    )
    .unwrap();
    std::fs::set_permissions(&sudo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sshd = Sshd::builder()
        .session_env("PATH", format!("{}:/usr/bin:/bin", fake.path().display()))
        .start();
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    let job = tempfile::tempdir().unwrap();
    let (mut child, mut stdout, line) = spawn_until_first_line(&stage_hook(
        gpr_testkit::driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &key,
        "build_script",
        "echo flooding\nexec yes 'flood flood flood flood flood flood flood flood'\n",
    ));
    assert_eq!(line, "flooding\n");
    // The runner reads everything the hook prints.
    let drain_stdout = std::thread::spawn(move || {
        std::io::copy(&mut stdout, &mut std::io::sink()).unwrap_or_default()
    });
    let mut stderr_pipe = child.stderr.take().expect("piped stderr");
    let drain_stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    // SAFETY: kill(2) to the hook's process group, as the runner cancels.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGTERM);
    }
    let cancelled_at = Instant::now();
    let peak = peak_rss_kib(&mut child, Duration::from_secs(60));
    let took = cancelled_at.elapsed();
    let status = child.wait().unwrap();
    let streamed = drain_stdout.join().unwrap();
    let stderr = drain_stderr.join().unwrap();
    eprintln!(
        "MEASURED: hook peak RSS {:.1} MiB, exited {took:.1?} after the cancel, {:.0} MiB of \
         stage output streamed",
        peak as f64 / 1024.0,
        streamed as f64 / 1_048_576.0
    );
    assert_eq!(status.code(), Some(SYSTEM_FAILURE), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(peak > 0, "VmHWM was never read");
    // Everything in flight is bounded by russh's buffers and windows (16 MiB per channel)
    // plus 64 KiB per captured stream; unbounded capture grows by the link's speed.
    assert!(
        peak < 96 * 1024,
        "the hook's peak RSS was {:.1} MiB",
        peak as f64 / 1024.0
    );
}
