//! `gitlab-proxmox-runner gc` against the in-repo fake Proxmox, run the way cron or a systemd
//! timer runs it: no job variables, no `JOB_RESPONSE_FILE`, no `CUSTOM_ENV_`, no `TMPDIR`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gitlab_proxmox_runner::config::DEFAULT_MAX_JOB_TIMEOUT;
use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gpr_testkit::lab::fleet_command;
use gpr_testkit::{driver_binary, FakeConfig, FakeProxmox, NewVm};

const TAG: &str = "gitlab-proxmox-runner";
const DAY: u64 = 86_400;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A marker of runner host `runner` (its PROXMOX_RUNNER_ID) for job `job`, created `age_secs`
/// ago, with the deadline prepare records for a job of unknown timeout (24 h cap + 1 h).
fn marker(runner: &str, job: u64, age_secs: u64) -> Marker {
    let mut marker = Marker::for_job(
        &JobInfo {
            job_id: Some(job),
            pipeline_id: Some(7),
            project_path: Some("group/project".into()),
            ..Default::default()
        },
        runner,
        DEFAULT_MAX_JOB_TIMEOUT,
    );
    marker.created -= age_secs;
    marker.deadline = marker.deadline.map(|deadline| deadline - age_secs);
    marker
}

/// A job VM as prepare leaves it: tag, marker, running.
fn job_vm(fake: &FakeProxmox, vmid: u32, marker: &Marker) {
    fake.add_vm(NewVm {
        vmid,
        name: format!("ci-{}-group-project", marker.job_id.unwrap_or(0)),
        tags: TAG.into(),
        description: marker.description(),
        running: true,
        ..Default::default()
    });
}

fn gc_command(fake: &FakeProxmox, args: &[&str]) -> Command {
    let mut command = fleet_command(driver_binary!(), fake);
    command
        .env("PROXMOX_VMID_RANGE", "2000000-2999999")
        .arg("gc")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

struct GcRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl GcRun {
    fn from(output: Output) -> GcRun {
        GcRun {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "gc failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn assert_summary(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "expected {needle:?} in the summary:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

fn gc(fake: &FakeProxmox, args: &[&str]) -> GcRun {
    GcRun::from(gc_command(fake, args).output().expect("run gc"))
}

fn exists(fake: &FakeProxmox, vmid: u32) -> bool {
    fake.vm(vmid).is_some()
}

/// Requests that change something (stop, delete, config, clone, ...).
fn changing_requests(fake: &FakeProxmox) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn orphans_are_destroyed_and_live_vms_kept() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let orphans = [2_000_101, 2_000_102, 2_000_103];
    for (i, vmid) in orphans.into_iter().enumerate() {
        job_vm(&fake, vmid, &marker("xS6Vzpvo", 100 + i as u64, 2 * DAY));
    }
    // A stopped orphan too (its runner died after stopping it).
    let stopped = marker("xS6Vzpvo", 199, 3 * DAY);
    fake.add_vm(NewVm {
        vmid: 2_000_104,
        tags: TAG.into(),
        description: stopped.description(),
        running: false,
        ..Default::default()
    });
    let live = [2_000_201, 2_000_202];
    job_vm(&fake, live[0], &marker("xS6Vzpvo", 201, 60));
    job_vm(&fake, live[1], &marker("other123", 202, 10 * 3600));

    gc(&fake, &[]).assert_ok().assert_summary(
        "gc: 4 orphans destroyed, 0 skipped (locked), 2 live kept, 4 foreign ignored in ",
    );
    for vmid in orphans.into_iter().chain([2_000_104]) {
        assert!(!exists(&fake, vmid), "orphan {vmid} must be gone");
    }
    for vmid in live {
        assert!(exists(&fake, vmid), "live VM {vmid} must stay");
    }
    let templates = fake.vms().into_iter().filter(|vm| vm.template).count();
    assert_eq!(templates, 4);
    // Deleted as cleanup deletes: purge and unreferenced disks.
    let deletes: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert!(deletes.iter().all(|r| r.query.contains("purge=1")));

    // A second sweep finds nothing more to do.
    gc(&fake, &[])
        .assert_ok()
        .assert_summary("gc: 0 orphans destroyed, 0 skipped (locked), 2 live kept");
}

#[test]
fn max_age_decides_what_is_an_orphan() {
    let fake = FakeProxmox::start(FakeConfig::default());
    job_vm(&fake, 2_000_301, &marker("xS6Vzpvo", 1, 5 * 3600));
    job_vm(&fake, 2_000_302, &marker("xS6Vzpvo", 2, 3 * 3600));
    // Under the default (25 h) both are live.
    gc(&fake, &[])
        .assert_ok()
        .assert_summary("0 orphans destroyed");
    assert!(exists(&fake, 2_000_301) && exists(&fake, 2_000_302));
    gc(&fake, &["--max-age", "4h"])
        .assert_ok()
        .assert_summary("1 orphans destroyed, 0 skipped (locked), 1 live kept");
    assert!(!exists(&fake, 2_000_301));
    assert!(exists(&fake, 2_000_302));

    // (Changed input: `4 hours` is an age since humantime parses them; this one is not.)
    let bad = gc(&fake, &["--max-age", "four hours"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("--max-age"), "{}", bad.stderr);
    assert!(exists(&fake, 2_000_302));
}

#[test]
fn foreign_vms_are_never_touched() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let old = marker("xS6Vzpvo", 1, 30 * DAY);
    let valid_line = old.render();
    let foreign: Vec<(u32, &str, String, bool)> = vec![
        // (Changed rule: a valid marker without the tag is an orphan now, see
        // `untagged_vms_with_a_marker_are_orphans_past_their_deadline`.)
        // The tag but no marker at all.
        (2_000_002, TAG, "a VM someone made by hand".into(), false),
        // The tag and a garbled marker.
        (
            2_000_003,
            TAG,
            "gitlab-proxmox-runner: v=1 runner=x job=abc created=1".into(),
            false,
        ),
        // The tag and a marker of an unknown (future) format.
        (2_000_004, TAG, valid_line.replace("v=2", "v=3"), false),
        // The tag and a marker that is not the description's first line: job text, or a hand
        // edit, never the driver. (Changed rule: extra lines AFTER a valid first line no
        // longer make a VM foreign.)
        (
            2_000_005,
            TAG,
            format!("copied by hand\n{valid_line}\n"),
            false,
        ),
        // A template carrying tag and marker.
        (2_000_006, TAG, old.description(), true),
        // Tag and marker, but outside PROXMOX_VMID_RANGE.
        (1_999_999, TAG, old.description(), false),
        (3_000_000, TAG, old.description(), false),
        (150, TAG, old.description(), false),
    ];
    for (vmid, tags, description, template) in &foreign {
        fake.add_vm(NewVm {
            vmid: *vmid,
            tags: tags.to_string(),
            description: description.clone(),
            template: *template,
            running: !template,
            ..Default::default()
        });
    }
    // One real orphan, so the sweep demonstrably acts.
    job_vm(&fake, 2_000_500, &marker("xS6Vzpvo", 2, 30 * DAY));

    let run = gc(&fake, &["--max-age", "0s"]);
    run.assert_ok().assert_summary(&format!(
        "gc: 1 orphans destroyed, 0 skipped (locked), 0 live kept, {} foreign ignored",
        foreign.len() + 4
    ));
    assert!(!exists(&fake, 2_000_500));
    for (vmid, ..) in &foreign {
        let vm = fake
            .vm(*vmid)
            .unwrap_or_else(|| panic!("foreign VM {vmid} was deleted"));
        if !vm.template {
            assert_eq!(vm.status, "running", "foreign VM {vmid} was stopped");
        }
    }
    let touched: Vec<String> = changing_requests(&fake)
        .into_iter()
        .filter(|request| !request.contains("/2000500"))
        .collect();
    assert!(touched.is_empty(), "foreign VMs were touched: {touched:?}");
    assert!(
        run.stderr.contains("VM 2000002 on pve1 carries the gitlab-proxmox-runner tag but no valid ownership marker"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_locked_vm_is_skipped_this_round_and_removed_by_the_next() {
    let fake = FakeProxmox::start(FakeConfig::default());
    // An old VM stuck in a clone (or under backup) ...
    let stuck = 2_000_700;
    fake.add_vm(NewVm {
        vmid: stuck,
        tags: TAG.into(),
        description: marker("xS6Vzpvo", 1, 2 * DAY).description(),
        lock: Some("clone".into()),
        ..Default::default()
    });
    // ... and a job's VM in the middle of its clone right now.
    let cloning = 2_000_701;
    fake.add_vm(NewVm {
        vmid: cloning,
        tags: TAG.into(),
        description: marker("xS6Vzpvo", 2, 1).description(),
        lock: Some("clone".into()),
        ..Default::default()
    });

    let run = gc(&fake, &[]);
    run.assert_ok()
        .assert_summary("gc: 0 orphans destroyed, 1 skipped (locked), 1 live kept");
    assert!(
        run.stderr.contains("VM 2000700 on pve1") && run.stderr.contains("locked (clone)"),
        "{}",
        run.stderr
    );
    assert!(exists(&fake, stuck) && exists(&fake, cloning));
    assert!(changing_requests(&fake).is_empty(), "{:?}", fake.requests());

    assert!(fake.set_vm_lock(stuck, None));
    gc(&fake, &[])
        .assert_ok()
        .assert_summary("gc: 1 orphans destroyed, 0 skipped (locked), 1 live kept");
    assert!(!exists(&fake, stuck));
    assert!(exists(&fake, cloning));
}

#[test]
fn two_sweeps_racing_both_succeed_and_remove_every_orphan_once() {
    // Slow tasks, so that the two sweeps meet on the same VMs.
    let fake = FakeProxmox::start(FakeConfig {
        task_time: Duration::from_millis(400),
        ..FakeConfig::default()
    });
    let orphans: Vec<u32> = (0..6).map(|i| 2_000_800 + i).collect();
    for (i, vmid) in orphans.iter().enumerate() {
        job_vm(&fake, *vmid, &marker("xS6Vzpvo", i as u64, 2 * DAY));
    }
    let live = 2_000_900;
    job_vm(&fake, live, &marker("xS6Vzpvo", 99, 60));

    let first = gc_command(&fake, &[]).spawn().unwrap();
    let second = gc_command(&fake, &[]).spawn().unwrap();
    let first = GcRun::from(first.wait_with_output().unwrap());
    let second = GcRun::from(second.wait_with_output().unwrap());
    // Whichever got there first deleted a VM; the other found it gone (or being deleted)
    // and counted it as done.
    first.assert_ok();
    second.assert_ok();
    for vmid in &orphans {
        assert!(!exists(&fake, *vmid), "orphan {vmid} must be gone");
    }
    assert!(exists(&fake, live));
    let starts = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains(&format!("/{live}/")))
        .count();
    assert_eq!(starts, 0, "the live VM was acted on");
}

#[test]
fn dry_run_lists_what_it_would_do_and_changes_nothing() {
    let fake = FakeProxmox::start(FakeConfig::default());
    job_vm(&fake, 2_000_401, &marker("xS6Vzpvo", 1, 2 * DAY));
    job_vm(&fake, 2_000_402, &marker("xS6Vzpvo", 2, 2 * DAY));
    job_vm(&fake, 2_000_403, &marker("xS6Vzpvo", 3, 60));

    let run = gc(&fake, &["--dry-run"]);
    run.assert_ok().assert_summary(
        "gc (dry run): 2 orphans would be destroyed, 0 skipped (locked), 1 live kept",
    );
    assert!(
        run.stderr
            .contains("would destroy VM 2000401 on pve1 (job 1, runner xS6Vzpvo, age 48.0 h)"),
        "{}",
        run.stderr
    );
    assert!(
        changing_requests(&fake).is_empty(),
        "{:?}",
        changing_requests(&fake)
    );
    assert_eq!(fake.job_vms().len(), 3);
    assert!(fake.job_vms().iter().all(|vm| vm.status == "running"));
}

#[test]
fn runner_limits_the_sweep_to_one_runners_vms() {
    let fake = FakeProxmox::start(FakeConfig::default());
    job_vm(&fake, 2_000_501, &marker("hostAAAA", 1, 2 * DAY));
    job_vm(&fake, 2_000_502, &marker("hostBBBB", 2, 2 * DAY));
    gc(&fake, &["--runner", "hostAAAA"])
        .assert_ok()
        .assert_summary(
            "gc: 1 orphans destroyed, 0 skipped (locked), 0 live kept, 1 of other runners kept",
        );
    assert!(!exists(&fake, 2_000_501));
    assert!(exists(&fake, 2_000_502));
}

#[test]
fn an_unreachable_api_fails_the_sweep_with_a_clear_message() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let run = GcRun::from(
        gc_command(&fake, &[])
            .env("PROXMOX_HOST", "127.0.0.1:9")
            .output()
            .unwrap(),
    );
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("gc: listing the cluster's VMs"),
        "{}",
        run.stderr
    );
}

#[test]
fn one_sweep_removes_many_orphans_among_many_live_vms() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let orphans: Vec<u32> = (0..40).map(|i| 2_100_000 + i).collect();
    for (i, vmid) in orphans.iter().enumerate() {
        job_vm(&fake, *vmid, &marker("xS6Vzpvo", i as u64, 2 * DAY));
    }
    let live: Vec<u32> = (0..60).map(|i| 2_200_000 + i).collect();
    for (i, vmid) in live.iter().enumerate() {
        job_vm(&fake, *vmid, &marker("xS6Vzpvo", 1000 + i as u64, 600));
    }
    let run = gc(&fake, &[]);
    run.assert_ok()
        .assert_summary("gc: 40 orphans destroyed, 0 skipped (locked), 60 live kept");
    eprintln!("{}", run.stdout.trim());
    assert!(orphans.iter().all(|vmid| !exists(&fake, *vmid)));
    assert!(live.iter().all(|vmid| exists(&fake, *vmid)));
}

#[test]
fn the_example_systemd_units_run_the_sweep_with_the_documented_default() {
    use gitlab_proxmox_runner::commands::gc::{parse_age, DEFAULT_MAX_AGE};
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let service =
        std::fs::read_to_string(examples.join("gitlab-proxmox-runner-gc.service")).unwrap();
    let exec = service
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(args[0].ends_with("/gitlab-proxmox-runner"), "{exec}");
    let gc_at = args.iter().position(|arg| *arg == "gc").expect("runs gc");
    assert_eq!(args[1], "--config", "{exec}");
    assert!(args[..gc_at].len() == 3, "{exec}");
    // (Changed: the unit relies on each VM's recorded deadline; `--max-age` would override
    // them all.)
    assert!(!args.contains(&"--max-age"), "{exec}");
    assert!(service.contains("25 h") && parse_age("25h").unwrap() == DEFAULT_MAX_AGE);
    assert!(service.contains("Type=oneshot"));

    let timer = std::fs::read_to_string(examples.join("gitlab-proxmox-runner-gc.timer")).unwrap();
    assert!(timer.contains("[Timer]") && timer.contains("OnCalendar="));
    assert!(timer.contains("WantedBy=timers.target"));
}

#[test]
fn a_vm_that_cannot_be_read_fails_the_sweep_but_not_the_others() {
    let fake = FakeProxmox::start(FakeConfig::default());
    // Its node stopped answering (PVE's proxy says 595), long enough to outlast the retries.
    fake.inject(gpr_testkit::Fault::HttpErrors {
        count: 1000,
        status: 595,
        message: "Errors during connection establishment, proxy handshake: No route to host".into(),
        path_contains: Some("/qemu/2000601/".into()),
    });
    job_vm(&fake, 2_000_601, &marker("xS6Vzpvo", 1, 2 * DAY));
    job_vm(&fake, 2_000_602, &marker("xS6Vzpvo", 2, 2 * DAY));
    let run = gc(&fake, &[]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    run.assert_summary("gc: 1 orphans destroyed, 1 failed");
    assert!(
        run.stderr
            .contains("cannot read the config of VM 2000601 on pve1"),
        "{}",
        run.stderr
    );
    assert!(!exists(&fake, 2_000_602));
    assert!(exists(&fake, 2_000_601));
}

#[test]
fn sigterm_stops_the_sweep_promptly() {
    // systemd stops a sweep with SIGTERM (TimeoutStartSec, shutdown): it must end, not hang in
    // a long task; the next sweep finishes the VM.
    let fake = FakeProxmox::start(FakeConfig {
        task_time: Duration::from_secs(600),
        ..FakeConfig::default()
    });
    job_vm(&fake, 2_000_650, &marker("xS6Vzpvo", 1, 2 * DAY));
    let child = gc_command(&fake, &[]).spawn().unwrap();
    gpr_testkit::wait_for_every(
        "gc to stop the VM",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            (fake.requests().iter())
                .any(|r| r.method == "POST" && r.path.contains("/2000650/status/stop"))
                .then_some(())
        },
    );
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let run = GcRun::from(child.wait_with_output().unwrap());
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("gc was cancelled"), "{}", run.stderr);
    assert!(exists(&fake, 2_000_650));
}

/// A marker line as prepare writes it (v=2), spelled out so the wire format is pinned.
fn v2_line(runner: &str, job: u64, created: u64, deadline: u64) -> String {
    format!(
        "gitlab-proxmox-runner: v=2 nonce={:032x} runner={runner} created={created} \
         deadline={deadline} driver=0.2.0 job={job} pipeline=7 project=group/project",
        u128::from(job) * 7919 + 1
    )
}

/// A marker line of an older driver version (v=1: no deadline, a job-controlled runner).
fn v1_line(runner: &str, job: u64, created: u64) -> String {
    format!(
        "gitlab-proxmox-runner: v=1 runner={runner} job={job} project=group/project pipeline=7 \
         created={created} driver=0.1.0 nonce={:032x}",
        u128::from(job) * 104_729 + 3
    )
}

fn vm_with(fake: &FakeProxmox, vmid: u32, tags: &str, first_line: &str) {
    fake.add_vm(NewVm {
        vmid,
        name: format!("ci-{vmid}"),
        tags: tags.into(),
        description: format!("{first_line}\n\nCreated by gitlab-proxmox-runner.\n"),
        running: true,
        ..Default::default()
    });
}

#[test]
fn each_vm_is_swept_past_its_own_deadline_and_v1_vms_by_age() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let now = now();
    // A 10-minute job that ended (deadline = created + 10 min + 1 h) an hour ago.
    vm_with(
        &fake,
        2_000_801,
        TAG,
        &v2_line("h", 1, now - 3 * 3600, now - 3600),
    );
    // A long job, still within its deadline, though older than the short one.
    vm_with(
        &fake,
        2_000_802,
        TAG,
        &v2_line("h", 2, now - 3 * 3600, now + 3600),
    );
    // Older driver versions: no deadline, swept by age (25 h).
    vm_with(&fake, 2_000_803, TAG, &v1_line("t", 3, now - 26 * 3600));
    vm_with(&fake, 2_000_804, TAG, &v1_line("t", 4, now - 3 * 3600));
    gc(&fake, &[])
        .assert_ok()
        .assert_summary("gc: 2 orphans destroyed, 0 skipped (locked), 2 live kept");
    assert!(!exists(&fake, 2_000_801) && !exists(&fake, 2_000_803));
    assert!(exists(&fake, 2_000_802) && exists(&fake, 2_000_804));
    // --max-age overrides every deadline.
    gc(&fake, &["--max-age", "2h"])
        .assert_ok()
        .assert_summary("gc: 2 orphans destroyed");
    assert!(!exists(&fake, 2_000_802) && !exists(&fake, 2_000_804));
}

#[test]
fn untagged_vms_with_a_marker_are_orphans_past_their_deadline() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let now = now();
    // The runner died between the clone (marker in the description) and tagging.
    vm_with(
        &fake,
        2_000_901,
        "ubuntu",
        &v2_line("h", 1, now - 3 * 3600, now - 60),
    );
    vm_with(&fake, 2_000_902, "", &v1_line("t", 2, now - 30 * 3600));
    // Mid-prepare right now: not yet tagged, well within its deadline.
    vm_with(
        &fake,
        2_000_903,
        "ubuntu",
        &v2_line("h", 3, now - 5, now + 3600),
    );
    // No marker on the first line: foreign, whatever follows.
    vm_with(
        &fake,
        2_000_904,
        "ubuntu",
        &format!("database\n{}", v2_line("h", 4, now - 3 * 3600, now - 60)),
    );
    let run = gc(&fake, &[]);
    run.assert_ok()
        .assert_summary("gc: 2 orphans destroyed, 0 skipped (locked), 1 live kept");
    assert!(!exists(&fake, 2_000_901) && !exists(&fake, 2_000_902));
    assert!(exists(&fake, 2_000_903) && exists(&fake, 2_000_904));
    assert!(
        run.stderr
            .contains("VM 2000901 on pve1 has this driver's ownership marker but not the"),
        "{}",
        run.stderr
    );
    let touched: Vec<String> = changing_requests(&fake)
        .into_iter()
        .filter(|request| request.contains("/2000903") || request.contains("/2000904"))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
}

#[test]
fn runner_compares_the_hosts_runner_id_and_v1_vms_go_by_age() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let now = now();
    vm_with(
        &fake,
        2_000_951,
        TAG,
        &v2_line("ci-host-1", 1, now - 3 * 3600, now - 60),
    );
    vm_with(
        &fake,
        2_000_952,
        TAG,
        &v2_line("ci-host-2", 2, now - 3 * 3600, now - 60),
    );
    // A v1 VM whose job set CI_RUNNER_SHORT_TOKEN to dodge the sweep: age decides.
    vm_with(
        &fake,
        2_000_953,
        TAG,
        &v1_line("someone-else", 3, now - 30 * 3600),
    );
    gc(&fake, &["--runner", "ci-host-1"])
        .assert_ok()
        .assert_summary(
            "gc: 2 orphans destroyed, 0 skipped (locked), 0 live kept, 1 of other runners kept",
        );
    assert!(!exists(&fake, 2_000_951) && !exists(&fake, 2_000_953));
    assert!(exists(&fake, 2_000_952));
}

/// The gauges of a textfile, by name and labels (`name{labels}`), as node_exporter reads them.
fn textfile_values(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn metrics_file_holds_the_sweep_for_node_exporter_and_is_replaced_whole() {
    let fake = FakeProxmox::start(FakeConfig::default());
    job_vm(&fake, 2_000_701, &marker("xS6Vzpvo", 1, 2 * DAY));
    job_vm(&fake, 2_000_702, &marker("xS6Vzpvo", 2, 2 * DAY));
    job_vm(&fake, 2_000_703, &marker("xS6Vzpvo", 3, 60));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gitlab-proxmox-runner-gc.prom");
    let file = path.to_str().unwrap();

    gc(&fake, &["--dry-run", "--metrics-file", file]).assert_ok();
    let text = std::fs::read_to_string(&path).expect("the metrics file");
    let values = textfile_values(&text);
    assert_eq!(
        values.get("gitlab_proxmox_runner_gc_vms{result=\"would_destroy\"}"),
        Some(&2.0),
        "{text}"
    );
    assert_eq!(values.get("gitlab_proxmox_runner_gc_dry_run"), Some(&1.0));

    gc(&fake, &["--metrics-file", file]).assert_ok();
    let text = std::fs::read_to_string(&path).unwrap();
    let values = textfile_values(&text);
    for (series, value) in [
        ("gitlab_proxmox_runner_gc_vms{result=\"destroyed\"}", 2.0),
        (
            "gitlab_proxmox_runner_gc_vms{result=\"would_destroy\"}",
            0.0,
        ),
        ("gitlab_proxmox_runner_gc_vms{result=\"live\"}", 1.0),
        ("gitlab_proxmox_runner_gc_vms{result=\"failed\"}", 0.0),
        ("gitlab_proxmox_runner_gc_success", 1.0),
        ("gitlab_proxmox_runner_gc_dry_run", 0.0),
    ] {
        assert_eq!(values.get(series), Some(&value), "{series} in\n{text}");
    }
    let ran_at = values["gitlab_proxmox_runner_gc_last_run_timestamp_seconds"];
    assert!((ran_at - now() as f64).abs() < 120.0, "{text}");
    assert!(values.contains_key("gitlab_proxmox_runner_gc_duration_seconds"));
    assert!(
        text.contains("# TYPE gitlab_proxmox_runner_gc_vms gauge\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "gitlab_proxmox_runner_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // Nothing but the file is left in its directory (the temporary file was renamed).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // Prometheus's own linter reads it as the text format node_exporter parses.
    match gpr_testkit::prometheus::unavailable_reason() {
        Some(reason) => gpr_testkit::prometheus::skip(
            "metrics_file_holds_the_sweep_for_node_exporter_and_is_replaced_whole (promtool)",
            &reason,
        ),
        None => {
            let mut lint = Command::new(gpr_testkit::prometheus::PROMTOOL)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run promtool");
            use std::io::Write as _;
            lint.stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = lint.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics:\n{}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // A sweep that fails (no API) still replaces the file, saying so.
    let failed = GcRun::from(
        gc_command(&fake, &["--metrics-file", file])
            .env("PROXMOX_HOST", "127.0.0.1:9")
            .output()
            .unwrap(),
    );
    assert_ne!(failed.code, 0);
    let values = textfile_values(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(values.get("gitlab_proxmox_runner_gc_success"), Some(&0.0));
    assert_eq!(
        values.get("gitlab_proxmox_runner_gc_vms{result=\"destroyed\"}"),
        Some(&0.0)
    );
}
