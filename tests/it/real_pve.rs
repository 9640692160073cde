//! What real Proxmox VE does that a naive client gets wrong (issue 10): clones whose VM appears
//! after the request returned, clone answers that never arrive, pool-scoped tokens that see 403
//! instead of "does not exist", "does not exist" texts that are not about the VM, and locks
//! held by others. prepare and cleanup run as gitlab-runner runs them, against the fake.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::{JobState, Phase};
use gpr_testkit::hook::{Hook, HookOutput, SYSTEM_FAILURE};
use gpr_testkit::ssh_server::impostor_port;
use gpr_testkit::sshkeys::unauthorized_key;
use gpr_testkit::{driver_binary, wait_for_every, FakeConfig, FakeProxmox, Fault, NewVm};

fn hook(fake: &FakeProxmox, dir: &Path, job_id: u64) -> Hook {
    let mut hook = Hook::new(driver_binary!(), dir);
    for (name, value) in fake.settings_env() {
        hook = hook.host_env(name, value);
    }
    hook.host_env("VM_SSH_PRIVATE_KEY", unauthorized_key())
        .host_env("VM_NETWORK_CIDRS", "127.0.0.0/8")
        // Not the VM (another host key): prepare fails at the SSH step at once.
        .host_env("VM_SSH_PORT", impostor_port().to_string())
        .host_env("VM_BOOT_TIMEOUT", "20")
        .job_var("CI_JOB_ID", job_id.to_string())
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
        .job_var("CI_RUNNER_SHORT_TOKEN", "xS6Vzpvo")
}

fn pool_hook(fake: &FakeProxmox, dir: &Path, job_id: u64) -> Hook {
    hook(fake, dir, job_id).host_env("PROXMOX_POOL", "ci")
}

/// Polls `done` every 10 ms (a SIGTERM is meant to land within milliseconds of it).
#[track_caller]
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    wait_for_every(what, timeout, Duration::from_millis(10), || {
        done().then_some(())
    });
}

/// What the runner does after a prepare: cleanup in the same `$TMPDIR`, then the directory
/// goes whatever cleanup's exit code. Returns cleanup's output.
fn runner_cleanup(hook: &Hook, dir: tempfile::TempDir) -> HookOutput {
    let out = hook.clone().arg("cleanup").run();
    drop(dir);
    out
}

/// Once every clone task has ended, the fake holds no job VM.
#[track_caller]
fn assert_nothing_left(fake: &FakeProxmox, context: &str) {
    wait_until("the clone tasks end", Duration::from_secs(30), || {
        fake.running_clone_tasks() == 0
    });
    let left: Vec<u32> = fake.job_vms().iter().map(|vm| vm.vmid).collect();
    assert!(left.is_empty(), "VMs left behind {left:?}: {context}");
}

fn clone_posts(fake: &FakeProxmox) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
        .count()
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

// ------------------------------------------------------------------ 1: clones appear late

#[test]
fn a_cancel_at_any_instant_around_the_clone_request_leaves_no_vm() {
    // The answer takes 300 ms, the worker writes the config at 150 ms, the clone ends at
    // 600 ms: the SIGTERMs land before the answer (with and without a config), after it while
    // the clone runs, and after the clone.
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::from_millis(600),
        clone_config_delay: Duration::from_millis(150),
        ..FakeConfig::default()
    });
    fake.inject(Fault::SlowCloneAnswer {
        delay: Duration::from_millis(300),
    });
    fake.inject(Fault::AgentNeverStarts);
    for (round, offset_ms) in [0u64, 60, 200, 320, 450, 800].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let hook = hook(&fake, dir.path(), 100 + round as u64).host_env("VM_BOOT_TIMEOUT", "600");
        let before = clone_posts(&fake);
        let child = hook
            .clone()
            .arg("prepare")
            .command()
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("the clone request", Duration::from_secs(30), || {
            clone_posts(&fake) > before
        });
        std::thread::sleep(Duration::from_millis(offset_ms));
        sigterm(&child);
        let output = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(SYSTEM_FAILURE), "{log}");
        let cleanup = runner_cleanup(&hook, dir);
        assert_nothing_left(
            &fake,
            &format!(
                "SIGTERM {offset_ms} ms after the clone request\n--- prepare\n{log}\n--- cleanup\n{}",
                cleanup.log()
            ),
        );
    }
}

#[test]
fn a_prepare_killed_right_after_the_clone_request_is_finished_by_cleanup() {
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::from_millis(800),
        clone_config_delay: Duration::from_millis(200),
        ..FakeConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 120);
    let mut child = hook.clone().arg("prepare").command().spawn().unwrap();
    wait_until("the clone request", Duration::from_secs(30), || {
        clone_posts(&fake) > 0
    });
    // SIGKILL: no rollback at all, before the worker wrote anything.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(fake.job_vms().is_empty(), "the config is not written yet");
    let out = runner_cleanup(&hook, dir);
    out.assert_exit(0);
    assert_nothing_left(&fake, &out.log());
}

#[test]
fn a_lost_clone_answer_is_waited_out_and_the_vm_adopted_not_leaked() {
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::from_millis(500),
        clone_config_delay: Duration::from_millis(200),
        ..FakeConfig::default()
    });
    fake.inject(Fault::CloneAnswerLost { count: 1 });
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 121);
    let out = hook.clone().arg("prepare").run();
    // prepare gets as far as SSH (not the VM's here), so the clone was adopted.
    assert!(out.log().contains("cloned template"), "{}", out.log());
    assert_eq!(
        clone_posts(&fake),
        1,
        "the VM whose answer was lost is used, not a second one"
    );
    runner_cleanup(&hook, dir);
    assert_nothing_left(&fake, &out.log());
}

// ------------------------------------------------------------------ 2: pool-scoped tokens

fn pool_fake() -> FakeProxmox {
    FakeProxmox::start(FakeConfig {
        token_pool: Some("ci".into()),
        ..FakeConfig::default()
    })
}

#[test]
fn with_a_pool_scoped_token_a_transient_clone_failure_is_retried_and_rolled_back() {
    let fake = pool_fake();
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout"
            .into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let hook = pool_hook(&fake, dir.path(), 130);
    let out = hook.clone().arg("prepare").run();
    let log = out.log();
    // Two clones: the failed one (403 once PVE removed it) and the retry, which got to SSH.
    assert_eq!(clone_posts(&fake), 2, "{log}");
    assert!(log.contains("trying again with another VMID"), "{log}");
    assert!(log.contains("waiting for SSH"), "{log}");
    assert!(!log.contains("Permission check failed"), "{log}");
    assert!(JobState::load(dir.path()).unwrap().is_none(), "rolled back");
    let cleanup = runner_cleanup(&hook, dir);
    cleanup.assert_exit(0);
    assert_nothing_left(&fake, &log);
}

#[test]
fn with_a_pool_scoped_token_cleanup_of_a_gone_or_cloning_vm_succeeds() {
    let fake = pool_fake();
    fake.set_clone_time(Duration::from_millis(800));
    let dir = tempfile::tempdir().unwrap();
    let hook = pool_hook(&fake, dir.path(), 131);
    let mut child = hook.clone().arg("prepare").command().spawn().unwrap();
    wait_until("the clone's config", Duration::from_secs(30), || {
        !fake.job_vms().is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Mid-clone the VM is not a pool member yet: every read of it is a 403.
    let out = hook.clone().arg("cleanup").run();
    out.assert_exit(0);
    assert_nothing_left(&fake, &out.log());
    // A second cleanup finds it gone (a 403 for a free VMID), and says so.
    let state = JobState {
        node: "pve1".into(),
        vmid: 2_000_131,
        phase: Phase::Ready,
        vm_name: "ci-131".into(),
        marker: Marker::new(&JobInfo::default()).render(),
        template_vmid: Some(60900),
        ip: None,
        ssh_port: None,
        ssh_user: None,
        host_keys: vec![],
        host_key_source: None,
        ssh_key_nonce: None,
        ssh_key_fleet: None,
        clone_sent_at: None,
        clone_upid: None,
        lost: None,
        template_node: None,
        left_behind: Vec::new(),
    };
    state.save(dir.path()).unwrap();
    let again = hook.clone().arg("cleanup").run();
    again.assert_exit(0);
    assert!(again.log().contains("does not exist"), "{}", again.log());
    drop(dir);
}

#[test]
fn with_a_pool_scoped_token_gc_sweeps_the_pools_orphans() {
    let fake = pool_fake();
    let old = Marker {
        created: 1_000,
        deadline: Some(2_000),
        ..Marker::new(&JobInfo {
            job_id: Some(5),
            ..Default::default()
        })
    };
    fake.add_vm(NewVm {
        vmid: 2_000_140,
        tags: "gitlab-proxmox-runner".into(),
        description: old.description(),
        pool: Some("ci".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let out = hook(&fake, dir.path(), 140).arg("gc").run();
    out.assert_exit(0);
    assert!(fake.vm(2_000_140).is_none(), "{}", out.log());
}

// ------------------------------------------------------------------ 3: "does not exist"

fn job_vm_with_state(fake: &FakeProxmox, dir: &Path, vmid: u32) {
    let marker = Marker::new(&JobInfo {
        job_id: Some(99),
        ..Default::default()
    });
    fake.add_vm(NewVm {
        vmid,
        tags: "gitlab-proxmox-runner".into(),
        description: marker.description(),
        running: true,
        ..Default::default()
    });
    JobState {
        node: "pve1".into(),
        vmid,
        phase: Phase::Ready,
        vm_name: "ci-99".into(),
        marker: marker.render(),
        template_vmid: Some(60900),
        ip: None,
        ssh_port: None,
        ssh_user: None,
        host_keys: vec![],
        host_key_source: None,
        ssh_key_nonce: None,
        ssh_key_fleet: None,
        clone_sent_at: None,
        clone_upid: None,
        lost: None,
        template_node: None,
        left_behind: Vec::new(),
    }
    .save(dir)
    .unwrap();
}

#[test]
fn a_delete_failing_with_an_unrelated_does_not_exist_is_not_a_destroyed_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    job_vm_with_state(&fake, dir.path(), 2_000_150);
    fake.inject(Fault::TaskFails {
        kind: "qmdestroy".into(),
        count: 1,
        message: "storage 'fast' does not exist".into(),
    });
    let out = hook(&fake, dir.path(), 150).arg("cleanup").run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        out.log().contains("storage 'fast' does not exist"),
        "{}",
        out.log()
    );
    assert!(fake.vm(2_000_150).is_some());
    assert!(
        JobState::load(dir.path()).unwrap().is_some(),
        "kept for the next try"
    );
}

// ------------------------------------------------------------------ 4: locks held by others

#[test]
fn a_vm_locked_by_a_backup_is_left_to_gc_within_the_cleanup_bound() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    job_vm_with_state(&fake, dir.path(), 2_000_160);
    assert!(fake.lock_vm_for(2_000_160, "backup", Duration::from_secs(600)));
    let started = Instant::now();
    let out = hook(&fake, dir.path(), 160)
        .host_env("VM_CLEANUP_TIMEOUT", "2")
        .arg("cleanup")
        .run();
    let took = started.elapsed();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(took < Duration::from_secs(20), "cleanup took {took:?}");
    let log = out.log();
    assert!(
        log.contains("still locked (backup) by another task"),
        "{log}"
    );
    assert!(log.contains("gitlab-proxmox-runner gc"), "{log}");
    assert!(fake.vm(2_000_160).is_some());
}

#[test]
fn teardown_rounds_pause_and_ride_out_a_busy_config_lock() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    job_vm_with_state(&fake, dir.path(), 2_000_170);
    fake.inject(Fault::TaskFailsUntil {
        kind: "qmdestroy".into(),
        until: Instant::now() + Duration::from_millis(2500),
        message: "can't lock file '/var/lock/qemu-server/lock-2000170.conf' - got timeout".into(),
    });
    let out = hook(&fake, dir.path(), 170).arg("cleanup").run();
    out.assert_exit(0);
    assert!(out.log().contains("trying again in"), "{}", out.log());
    assert!(fake.vm(2_000_170).is_none());
}

// ------------------------------------------------------------------ 6: the runner's TMPDIR

#[test]
fn a_vm_whose_prepare_died_before_tagging_and_whose_cleanup_failed_is_swept_by_gc() {
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::from_millis(600),
        ..FakeConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 180);
    let mut child = hook.clone().arg("prepare").command().spawn().unwrap();
    wait_until("the clone's config", Duration::from_secs(30), || {
        !fake.job_vms().is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // cleanup cannot reach the API, and the runner removes $TMPDIR anyway: the job state,
    // the only record of the VM on the runner host, is gone.
    fake.inject(Fault::HttpErrors {
        count: 1_000,
        status: 503,
        message: "Service Unavailable".into(),
        path_contains: None,
    });
    let failed = hook
        .clone()
        .host_env("VM_CLEANUP_TIMEOUT", "2")
        .arg("cleanup")
        .run();
    assert_ne!(failed.code, 0, "{}", failed.log());
    drop(dir);
    fake.clear_faults();
    wait_until("the clone ends", Duration::from_secs(30), || {
        fake.running_clone_tasks() == 0
    });
    let left = fake.job_vms();
    assert_eq!(left.len(), 1, "the leftover");
    assert!(
        !left[0].tags.contains("gitlab-proxmox-runner"),
        "never tagged"
    );
    // The safety net: gc finds it by its marker alone.
    let sweep_dir = tempfile::tempdir().unwrap();
    let gc = gc_hook(&fake, sweep_dir.path())
        .args(["gc", "--max-age", "0s"])
        .run();
    gc.assert_exit(0);
    assert!(fake.job_vms().is_empty(), "{}", gc.log());
}

fn gc_hook(fake: &FakeProxmox, dir: &Path) -> Hook {
    let mut hook = Hook::new(driver_binary!(), dir);
    for (name, value) in fake.settings_env() {
        hook = hook.host_env(name, value);
    }
    hook
}
