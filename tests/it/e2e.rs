//! Whole CI jobs, driven the way gitlab-runner drives them ([`RunnerJob`]), against the fake
//! Proxmox API and a real local sshd standing in for the job's VM (the fake's guest agent
//! reports 127.0.0.1). The hooks run with a PATH that holds no `ssh` or `scp`.
//!
//! `GPR_BIN` replaces the binary under test (CI points it at the static musl build).
//! Without sshd on the machine these tests are skipped, unless `GPR_REQUIRE_SSHD=1`.

use std::path::PathBuf;
use std::time::Duration;

use gpr_testkit::fake_proxmox::{FakeConfig, FakeProxmox, Fault};
use gpr_testkit::hook::{json_string, BUILD_FAILURE};
use gpr_testkit::runner::{Executable, HookKind, JobOutcome, JobReport, RunnerJob};
use gpr_testkit::wait::POLL;
use gpr_testkit::{driver_binary, Lab};

/// A fake Proxmox cluster, a "VM" (local sshd) and a runner host whose driver settings live
/// in a root-only TOML file passed by `--config`: the recommended setup.
struct World {
    lab: Lab,
    dir: tempfile::TempDir,
    settings_file: PathBuf,
    /// Settings beyond the usual ones (e.g. `PROXMOX_POOL`).
    extra_settings: Vec<(String, String)>,
}

impl World {
    /// `None` (test skipped) when there is no sshd and GPR_REQUIRE_SSHD is not set.
    #[track_caller]
    fn new(test: &str) -> Option<World> {
        World::with(test, FakeConfig::default(), &[])
    }

    /// A world whose cluster is `config`, with `extra` settings for the driver.
    #[track_caller]
    fn with(test: &str, config: FakeConfig, extra: &[(&str, &str)]) -> Option<World> {
        // The binary under test: `$GPR_BIN`, else the one cargo built for this test run.
        let lab = Lab::builder(driver_binary!())
            .fake(config)
            .with_sshd_or_skip(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("empty-path")).expect("empty PATH dir");
        std::fs::create_dir(dir.path().join("builds")).expect("builds dir");
        let settings_file = dir.path().join("driver.toml");
        let world = World {
            lab,
            dir,
            settings_file,
            extra_settings: extra
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        };
        world.write_settings();
        Some(world)
    }

    /// Writes the driver's settings file, mode 0600.
    fn write_settings(&self) {
        use std::os::unix::fs::PermissionsExt;
        let mut text = String::from("# written by tests/e2e.rs\n");
        for (name, value) in self.settings() {
            text.push_str(&format!("{name} = {}\n", json_string(&value)));
        }
        std::fs::write(&self.settings_file, text).expect("write driver.toml");
        std::fs::set_permissions(&self.settings_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod driver.toml");
    }

    fn settings(&self) -> Vec<(String, String)> {
        let mut settings = self.lab.settings();
        for (name, value) in &mut settings {
            if name == "VM_BOOT_TIMEOUT" {
                *value = "60".to_string();
            }
        }
        for (name, value) in &self.extra_settings {
            settings.retain(|(existing, _)| existing != name);
            settings.push((name.clone(), value.clone()));
        }
        settings
    }

    /// A job as gitlab-runner would run it on this runner host. Its project directory is a
    /// fresh directory on this machine (the "VM"), not /builds.
    fn job(&self) -> RunnerJob {
        self.lab
            .runner_job(&self.settings_file, self.dir.path())
            .hook_timeout(Duration::from_secs(180))
    }

    /// The older driver's setup, as in examples/config.toml: `vm_*_exec` symlinks to the binary,
    /// called with no arguments, and the settings as `[[runners]] environment` entries.
    fn compat_job(&self) -> RunnerJob {
        let links = self.dir.path().join("compat-bin");
        if !links.exists() {
            std::fs::create_dir(&links).expect("symlink dir");
            for hook in ["config", "prepare", "run", "cleanup"] {
                std::os::unix::fs::symlink(&self.lab.bin, links.join(format!("vm_{hook}_exec")))
                    .expect("vm_*_exec symlink");
            }
        }
        let exec = |hook: &str| links.join(format!("vm_{hook}_exec"));
        let mut job = RunnerJob::new(self.lab.bin.clone())
            .executable(Executable::Config, exec("config"), &[])
            .executable(Executable::Prepare, exec("prepare"), &[])
            .executable(Executable::Run, exec("run"), &[])
            .executable(Executable::Cleanup, exec("cleanup"), &[])
            .path_env(self.dir.path().join("empty-path"))
            .builds_dir_override(
                self.dir
                    .path()
                    .join("builds")
                    .to_string_lossy()
                    .into_owned(),
            )
            .temp_root(self.dir.path())
            .retry_interval(Duration::ZERO)
            .hook_timeout(Duration::from_secs(180));
        for (name, value) in self.settings() {
            job = job.runner_env(name, value);
        }
        job
    }

    /// After every job: the fake holds no VM but its templates.
    #[track_caller]
    fn assert_no_vms(&self, report: &JobReport) {
        let left = self.lab.fake.job_vms();
        assert!(
            left.is_empty(),
            "VMs left behind: {:?}\n--- job log\n{}\n--- cleanup log\n{}",
            left.iter().map(|vm| vm.vmid).collect::<Vec<_>>(),
            report.log,
            report.cleanup_log
        );
    }

    /// The clone requests the fake received.
    fn clone_requests(&self) -> usize {
        self.lab
            .fake
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
            .count()
    }
}

#[test]
fn the_hooks_need_no_ssh_or_scp_program() {
    let Some(world) = World::new("e2e::the_hooks_need_no_ssh_or_scp_program") else {
        return;
    };
    let path = world.dir.path().join("empty-path");
    for program in ["ssh", "scp", "sftp"] {
        assert!(!path.join(program).exists());
    }
    let report = world
        .job()
        .script("build_script", "echo no-openssh-needed")
        .run();
    report.assert_success();
    assert!(report.log.contains("no-openssh-needed"));
    world.assert_no_vms(&report);
}

#[test]
fn a_job_runs_in_a_fresh_vm_as_root_with_its_ci_variables() {
    let Some(world) = World::new("e2e::a_job_runs_in_a_fresh_vm_as_root_with_its_ci_variables")
    else {
        return;
    };
    let job = world
        .job()
        .job_var("MY_VARIABLE", "hello from .gitlab-ci.yml")
        .runner_env("FROM_RUNNER", "set in [[runners]] environment")
        .script(
            "build_script",
            "echo \"job=$CI_JOB_ID uid=$(id -u) var=$MY_VARIABLE runner=$FROM_RUNNER\"",
        )
        .script("build_script", "echo \"pwd=$PWD\"")
        .script("after_script", "echo after-script-ran");
    let job_id = job.job_id();
    let report = job.run();
    report.assert_success();
    assert!(
        report.log.contains(&format!(
            "job={job_id} uid=0 var=hello from .gitlab-ci.yml runner=set in [[runners]] environment"
        )),
        "{}",
        report.log
    );
    assert!(report.log.contains("/group/demo"), "{}", report.log);
    assert!(report.log.contains("after-script-ran"));
    assert_eq!(
        report.stages_run(),
        [
            "prepare_script",
            "get_sources",
            "build_script",
            "after_script"
        ]
    );
    assert!(world.clone_requests() >= 1, "the job got a cloned VM");
    // The host key came through the guest agent, so nothing was trusted on first use.
    assert!(!report.log.contains("first connection"), "{}", report.log);
    // cleanup's output goes to the runner's own log, never into the job log.
    assert!(!report.cleanup_log.trim().is_empty());
    for line in report.cleanup_log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            !report.log.contains(line),
            "cleanup output in the job log: {line}"
        );
    }
    // Settings and secrets never reach the job log or the cleanup log.
    let token = world
        .settings()
        .into_iter()
        .find(|(name, _)| name == "PROXMOX_TOKEN_VALUE")
        .map(|(_, value)| value)
        .expect("token");
    assert!(!report.log.contains(&token));
    assert!(!report.cleanup_log.contains(&token));
    world.assert_no_vms(&report);
}

#[test]
fn a_script_that_exits_3_is_a_script_failure_with_exit_code_3() {
    let Some(world) = World::new("e2e::a_script_that_exits_3_is_a_script_failure_with_exit_code_3")
    else {
        return;
    };
    let report = world
        .job()
        .script("build_script", "echo failing-on-purpose; exit 3")
        .script("build_script", "echo never-reached")
        .script("after_script", "echo after-script-ran")
        .run();
    report.assert_outcome(&JobOutcome::ScriptFailure { exit_code: 3 });
    assert!(report.log.contains("failing-on-purpose"));
    assert!(!report.log.contains("never-reached"));
    assert!(report.log.contains("after-script-ran"));
    assert_eq!(report.stage_exit_code("build_script"), Some(BUILD_FAILURE));
    world.assert_no_vms(&report);
}

#[test]
fn cancel_during_a_long_script_stops_the_remote_processes_and_destroys_the_vm() {
    let Some(world) = World::new(
        "e2e::cancel_during_a_long_script_stops_the_remote_processes_and_destroys_the_vm",
    ) else {
        return;
    };
    let pid_file = world.dir.path().join("remote-sleep.pid");
    let job = world
        .job()
        .script(
            "build_script",
            format!(
                "sleep 900 & echo $! > {}; echo long-script-started-$((6 * 7)); wait",
                pid_file.display()
            ),
        )
        .start();
    assert!(
        job.control()
            // The marker is computed, so the echoed command line cannot match it early.
            .wait_for_log("long-script-started-42", Duration::from_secs(120)),
        "the script never started:\n{}",
        job.control().log()
    );
    // Read until it parses: under load the log line can be seen through another path first.
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
    };
    assert!(
        gpr_testkit::poll(Duration::from_secs(30), POLL, &read_pid).is_some(),
        "the script never wrote its pid to {}",
        pid_file.display()
    );
    let remote_pid = read_pid().expect("checked above");
    assert!(process_alive(remote_pid));
    job.cancel();
    let report = job.wait();
    report.assert_outcome(&JobOutcome::Canceled);
    let build = report
        .calls
        .iter()
        .find(|call| {
            call.kind
                == HookKind::Run {
                    stage: "build_script".into(),
                }
        })
        .expect("build_script ran");
    assert!(build.terminated);
    assert!(
        !build.force_killed,
        "run_exec ignored SIGTERM for the whole graceful-kill timeout"
    );
    assert!(
        gpr_testkit::poll(Duration::from_secs(30), POLL, || {
            (!process_alive(remote_pid)).then_some(())
        })
        .is_some(),
        "the script's process {remote_pid} in the VM survived the cancel"
    );
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 1);
    world.assert_no_vms(&report);
}

/// Each step of prepare fails once; the runner's next attempt (or the driver's own retry)
/// succeeds and nothing is left behind.
#[test]
fn prepare_failing_at_each_step_is_retried_and_leaks_nothing() {
    let Some(world) = World::new("e2e::prepare_failing_at_each_step_is_retried_and_leaks_nothing")
    else {
        return;
    };
    // (step, fault, what the job log shows when the fault was hit)
    let faults = [
        (
            "clone request",
            Fault::CloneRequestFails {
                count: 1,
                status: 500,
                message: "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got \
                          timeout"
                    .into(),
            },
            "pve-storage-local-lvm",
        ),
        (
            "clone task",
            Fault::CloneTaskFails {
                count: 1,
                message: "clone failed: injected storage error".into(),
            },
            "injected storage error",
        ),
        (
            "start task",
            Fault::StartTaskFails {
                count: 1,
                message: "start failed: injected QEMU exited with code 1".into(),
            },
            "injected QEMU exited",
        ),
        (
            "guest agent",
            Fault::HttpErrors {
                count: 1,
                status: 500,
                message: "No QEMU guest agent configured".into(),
                path_contains: Some("/agent/".into()),
            },
            "guest agent configured",
        ),
        (
            "api outage",
            Fault::HttpErrors {
                count: 1,
                status: 596,
                message: "Connection timed out".into(),
                path_contains: Some("/status/current".into()),
            },
            "596",
        ),
    ];
    for (step, fault, evidence) in faults {
        world.lab.fake.inject(fault);
        let marker = format!("survived-{}", step.replace(' ', "-"));
        let report = world
            .job()
            .script("build_script", format!("echo {marker}"))
            .run();
        report.assert_success();
        assert!(report.log.contains(&marker), "{step}: {}", report.log);
        assert!(
            report.log.contains(evidence),
            "{step}: the fault was not hit:\n{}",
            report.log
        );
        assert_eq!(
            report.exit_codes(&HookKind::Cleanup).len() as u32,
            report.attempts,
            "{step}: cleanup after every attempt"
        );
        world.assert_no_vms(&report);
    }
}

#[test]
fn a_prepare_that_never_succeeds_fails_the_job_as_a_system_failure_and_leaks_nothing() {
    let Some(world) = World::new(
        "e2e::a_prepare_that_never_succeeds_fails_the_job_as_a_system_failure_and_leaks_nothing",
    ) else {
        return;
    };
    world.lab.fake.inject(Fault::CloneTaskFails {
        count: 1000,
        message: "clone failed: injected permanent storage error".into(),
    });
    let report = world.job().script("build_script", "echo never").run();
    assert!(
        matches!(report.outcome, JobOutcome::SystemFailure { .. }),
        "{:?}\n{}",
        report.outcome,
        report.log
    );
    assert_eq!(report.attempts, 3);
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 3);
    assert!(
        report.log.contains("injected permanent storage error"),
        "{}",
        report.log
    );
    world.assert_no_vms(&report);
}

#[test]
fn eight_jobs_at_once_each_get_their_own_vm() {
    let Some(world) = World::new("e2e::eight_jobs_at_once_each_get_their_own_vm") else {
        return;
    };
    let jobs: Vec<(String, _)> = (0..8)
        .map(|n| {
            let job = world.job().job_var("JOB_NUMBER", n.to_string()).script(
                "build_script",
                "echo \"job-number=$JOB_NUMBER id=$CI_JOB_ID\"",
            );
            (job.job_id(), job.start())
        })
        .collect();
    let mut reports = Vec::new();
    for (n, (job_id, job)) in jobs.into_iter().enumerate() {
        let report = job.wait();
        report.assert_success();
        assert!(
            report.log.contains(&format!("job-number={n} id={job_id}")),
            "{}",
            report.log
        );
        reports.push(report);
    }
    // (A clone request the driver had to repeat under load would count twice.)
    assert!(world.clone_requests() >= 8);
    let mut vmids: Vec<&str> = reports
        .iter()
        .map(|report| cloned_vmid(&report.log).expect("the job log names its VM"))
        .collect();
    vmids.sort_unstable();
    vmids.dedup();
    assert_eq!(vmids.len(), 8, "two jobs shared a VM: {vmids:?}");
    for report in &reports {
        world.assert_no_vms(report);
    }
}

#[test]
fn a_job_that_sets_proxmox_host_is_refused_and_the_token_goes_nowhere_else() {
    let Some(world) =
        World::new("e2e::a_job_that_sets_proxmox_host_is_refused_and_the_token_goes_nowhere_else")
    else {
        return;
    };
    let elsewhere = FakeProxmox::start(FakeConfig::default());
    let report = world
        .compat_job()
        .job_var("PROXMOX_HOST", elsewhere.host())
        .script("build_script", "echo never")
        .run();
    assert!(
        matches!(report.outcome, JobOutcome::ScriptFailure { .. }),
        "a job's own mistake, not the runner's: {:?}\n{}",
        report.outcome,
        report.log
    );
    assert!(report.log.contains("PROXMOX_HOST"), "{}", report.log);
    assert_eq!(report.attempts, 1, "a refused job is not retried");
    assert_eq!(
        elsewhere.request_count(),
        0,
        "the job's PROXMOX_HOST was contacted"
    );
    assert!(report.stages_run().is_empty());
    world.assert_no_vms(&report);
}

#[test]
fn a_job_variable_shadowed_by_the_runner_hosts_settings_is_ignored() {
    let Some(world) =
        World::new("e2e::a_job_variable_shadowed_by_the_runner_hosts_settings_is_ignored")
    else {
        return;
    };
    let elsewhere = FakeProxmox::start(FakeConfig::default());
    let report = world
        .job()
        .job_var("PROXMOX_HOST", elsewhere.host())
        .script("build_script", "echo ran-on-the-right-cluster")
        .run();
    report.assert_success();
    assert_eq!(elsewhere.request_count(), 0);
    assert!(
        world.clone_requests() >= 1,
        "the job ran on the runner's own cluster"
    );
    world.assert_no_vms(&report);
}

#[test]
fn the_older_drivers_setup_still_runs_jobs() {
    let Some(world) = World::new("e2e::the_older_drivers_setup_still_runs_jobs") else {
        return;
    };
    let report = world
        .compat_job()
        .script("build_script", "echo compat-ok")
        .run();
    report.assert_success();
    assert!(report.log.contains("compat-ok"));
    world.assert_no_vms(&report);
}

/// The VMID in the driver's "cloned template … → VM N" line.
fn cloned_vmid(log: &str) -> Option<&str> {
    let rest = &log[log.find("→ VM ")? + "→ VM ".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    (end > 0).then(|| &rest[..end])
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent has not reaped it yet.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

// ------------------------------------------------------------- real PVE and real guests

#[test]
fn a_whole_job_runs_with_a_pool_scoped_token_through_a_failed_clone() {
    let config = FakeConfig {
        token_pool: Some("ci".into()),
        ..FakeConfig::default()
    };
    let Some(world) = World::with(
        "e2e::a_whole_job_runs_with_a_pool_scoped_token_through_a_failed_clone",
        config,
        &[("PROXMOX_POOL", "ci")],
    ) else {
        return;
    };
    world.lab.fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout"
            .into(),
    });
    let report = world
        .job()
        .script("build_script", "echo pool-scoped-job-ran")
        .run();
    report.assert_success();
    assert!(report.log.contains("pool-scoped-job-ran"));
    assert_eq!(world.clone_requests(), 2, "{}", report.log);
    assert!(
        !report.cleanup_log.contains("Permission check failed"),
        "{}",
        report.cleanup_log
    );
    world.assert_no_vms(&report);
}

#[test]
fn an_agent_that_reports_ipv6_first_gets_the_job_its_ipv4_address() {
    let config = FakeConfig {
        // ::1 answers "connection refused" here: the test sshd listens on 127.0.0.1 only, like
        // a VM whose IPv6 the runner host cannot reach.
        guest_ip6: Some("::1".parse().expect("IPv6")),
        guest_ip_delay: Duration::from_millis(1500),
        ..FakeConfig::default()
    };
    let Some(world) = World::with(
        "e2e::an_agent_that_reports_ipv6_first_gets_the_job_its_ipv4_address",
        config,
        &[
            ("VM_NETWORK_CIDRS", "127.0.0.0/8,::1/128"),
            ("VM_BOOT_TIMEOUT", "30"),
        ],
    ) else {
        return;
    };
    let report = world.job().script("build_script", "echo v4-ok").run();
    report.assert_success();
    assert!(report.log.contains("IP 127.0.0.1"), "{}", report.log);
    world.assert_no_vms(&report);
}

#[test]
fn host_keys_that_appear_after_the_agent_are_still_pinned() {
    let Some(world) = World::new("e2e::host_keys_that_appear_after_the_agent_are_still_pinned")
    else {
        return;
    };
    let host_key = world
        .lab
        .sshd()
        .host_key_lines()
        .into_iter()
        .find(|line| line.starts_with("ssh-ed25519 "))
        .expect("ed25519 host key");
    // cloud-init writes the keys a while after the agent is up.
    world.lab.fake.remove_host_keys();
    world.lab.fake.set_late_guest_file(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        &host_key,
        Duration::from_millis(1500),
    );
    let report = world.job().script("build_script", "echo pinned").run();
    report.assert_success();
    assert!(
        report.log.contains("host keys appeared after"),
        "{}",
        report.log
    );
    assert!(!report.log.contains("first connection"), "{}", report.log);
    world.assert_no_vms(&report);
}

#[test]
fn a_run_steps_job_runs_step_runner_in_the_vm() {
    let Some(world) = World::new("e2e::a_run_steps_job_runs_step_runner_in_the_vm") else {
        return;
    };
    // The template's step-runner: here a stand-in that shows what the runner handed it.
    let bin = world.dir.path().join("vm-bin");
    std::fs::create_dir(&bin).expect("vm-bin");
    let step_runner = bin.join("step-runner");
    std::fs::write(
        &step_runner,
        "#!/bin/sh\necho \"step-runner $1 got: $STEPS\"\n",
    )
    .expect("write step-runner");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&step_runner, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let report = world
        .job()
        .job_var("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .run_steps("- name: hello\n  script: echo hi")
        .run();
    report.assert_success();
    assert!(
        report.log.contains("step-runner ci got: - name: hello"),
        "{}",
        report.log
    );
    assert!(report.stages_run().contains(&"build_script".to_string()));
    world.assert_no_vms(&report);
}
