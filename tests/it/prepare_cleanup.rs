//! prepare and cleanup against the in-repo fake Proxmox, run as gitlab-runner runs them.
//!
//! Until a test needs the VM to answer SSH, `VM_SSH_PORT` points at an SSH server that is not
//! the VM (its host key is not the one the guest agent serves): prepare then runs every Proxmox
//! step for real and fails at the SSH step, which must leave no VM.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::{JobState, Phase, STATE_FILE_NAME};
use gpr_testkit::hook::{Hook, HookOutput, BUILD_FAILURE, SYSTEM_FAILURE};
use gpr_testkit::lab::api_hook;
use gpr_testkit::ssh_server::impostor_port;
use gpr_testkit::sshkeys::unauthorized_key;
use gpr_testkit::{
    driver_binary, wait_for_every, FakeConfig, FakeProxmox, Fault, NewVm, RecordedRequest,
};

const NO_VM_LEFT: &str = "no job VM may be left on the fake";

/// A hook wired to `fake` the way an admin would configure the driver, for job `job_id`.
fn hook(fake: &FakeProxmox, dir: &Path, job_id: u64) -> Hook {
    hook_without_key(fake, dir, job_id).host_env("VM_SSH_PRIVATE_KEY", unauthorized_key())
}

fn hook_without_key(fake: &FakeProxmox, dir: &Path, job_id: u64) -> Hook {
    api_hook(driver_binary!(), fake, dir)
        .host_env("VM_NETWORK_CIDRS", "127.0.0.0/8")
        // A host key mismatch is final: prepare does not wait out the boot deadline, as it
        // would retrying a closed port.
        .host_env("VM_SSH_PORT", impostor_port().to_string())
        .host_env("VM_BOOT_TIMEOUT", "8")
        .host_env("PROXMOX_VMID_RANGE", "2000000-2999999")
        .job_var("CI_JOB_ID", job_id.to_string())
        .job_var("CI_PIPELINE_ID", "77")
        .job_var("CI_PROJECT_PATH", "group/project")
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
        .job_var("CI_RUNNER_SHORT_TOKEN", "xS6Vzpvo")
}

fn prepare(hook: &Hook) -> HookOutput {
    hook.clone().arg("prepare").run()
}

fn cleanup(hook: &Hook) -> HookOutput {
    hook.clone().arg("cleanup").run()
}

fn state_of(dir: &Path) -> Option<JobState> {
    JobState::load(dir).unwrap()
}

fn requests_matching(fake: &FakeProxmox, method: &str, path_part: &str) -> Vec<RecordedRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == method && r.path.contains(path_part))
        .collect()
}

/// A VM of this job (its marker in the description) and a state naming it, as a prepare that
/// got as far as `phase` leaves them.
fn vm_of_this_job(fake: &FakeProxmox, dir: &Path, vmid: u32, phase: Phase) -> JobState {
    let marker = Marker::new(&JobInfo {
        job_id: Some(99),
        ..Default::default()
    });
    fake.add_vm(NewVm {
        vmid,
        name: "ci-99-group-project".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: marker.description(),
        running: phase >= Phase::Started,
        ..Default::default()
    });
    state_for(dir, vmid, phase, &marker)
}

fn state_for(dir: &Path, vmid: u32, phase: Phase, marker: &Marker) -> JobState {
    let state = JobState {
        node: "pve1".into(),
        vmid,
        phase,
        vm_name: "ci-99-group-project".into(),
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
    };
    state.save(dir).unwrap();
    state
}

#[track_caller]
fn assert_log_has(out: &HookOutput, needle: &str) {
    assert!(
        out.log().contains(needle),
        "expected {needle:?} in the log:\n{}",
        out.log()
    );
}

// ---------------------------------------------------------------- prepare: every Proxmox step

#[test]
fn prepare_runs_every_proxmox_step_and_a_failure_at_ssh_leaves_no_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.set_guest_file(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c0q8J5h3b1pX5F5Ttz0Qf root@vm\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 4242));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "cloned template ubuntu-focal (60900) → VM ");
    assert_log_has(&out, "(linked)");
    assert_log_has(&out, "guest agent up, IP 127.0.0.1");
    assert_log_has(&out, "prepare failed while waiting for SSH");
    assert_log_has(&out, "destroyed VM ");
    assert!(
        fake.job_vms().is_empty(),
        "{NO_VM_LEFT}: {:?}",
        fake.job_vms()
    );
    assert!(
        state_of(dir.path()).is_none(),
        "the state must go with the VM"
    );

    // The API calls a real PVE needs, with PVE's parameter conventions.
    let clone = requests_matching(&fake, "POST", "/qemu/60900/clone");
    assert_eq!(clone.len(), 1, "{:?}", fake.requests());
    assert!(!requests_matching(&fake, "GET", "/cluster/nextid").is_empty());
    assert!(requests_matching(&fake, "GET", "/cluster/nextid")[0]
        .query
        .starts_with("vmid="));
    assert_eq!(requests_matching(&fake, "PUT", "/config").len(), 1);
    assert!(!requests_matching(&fake, "POST", "/status/start").is_empty());
    assert!(!requests_matching(&fake, "GET", "/agent/network-get-interfaces").is_empty());
    assert!(requests_matching(&fake, "GET", "/agent/file-read")
        .iter()
        .any(|r| r.query.contains("ssh_host_ed25519_key.pub")));
    let delete = requests_matching(&fake, "DELETE", "/qemu/2");
    assert_eq!(delete.len(), 1);
    assert!(delete[0].query.contains("purge=1"));
    assert!(delete[0].query.contains("destroy-unreferenced-disks=1"));
    // Task status is asked of the node in the UPID, with the UPID as one encoded segment.
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.path.contains("/nodes/pve1/tasks/UPID%3Apve1%3A")));
    assert!(fake.requests().iter().all(|r| r.authorized));
}

#[test]
fn the_clone_gets_name_marker_tag_and_resources_before_it_boots() {
    // The VM must carry everything from the start: check it while prepare waits for SSH on a
    // port that accepts but never answers.
    let fake = FakeProxmox::start(FakeConfig::default());
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 8123456)
        .host_env(
            "VM_SSH_PORT",
            silent.local_addr().unwrap().port().to_string(),
        )
        .host_env("VM_CORES", "4")
        .host_env("VM_MEMORY_MB", "4096")
        .host_env("VM_DISK_GROW_GB", "5")
        .host_env("PROXMOX_RUNNER_ID", "ci-host-1");
    let mut child = hook.clone().arg("prepare").command().spawn().unwrap();
    let (vm, state) = wait_for_every(
        "the VM to boot",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            let booted = fake.job_vms().into_iter().find(|vm| vm.status == "running");
            let state = state_of(dir.path());
            if let (Some(vm), Some(state)) = (booted, state) {
                if state.phase >= Phase::Started {
                    assert_eq!(state.vmid, vm.vmid);
                    return Some((vm, state));
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("prepare ended early with {status}");
            }
            None
        },
    );
    assert_eq!(vm.name, "ci-8123456-group-project");
    assert_eq!(
        vm.tags, "gitlab-proxmox-runner",
        "inherited tags are replaced"
    );
    assert_eq!(vm.config.get("cores").map(String::as_str), Some("4"));
    assert_eq!(vm.config.get("memory").map(String::as_str), Some("4096"));
    assert_eq!(vm.cloned_from, Some(60900));
    assert_eq!(vm.full_clone, Some(false));
    let marker = Marker::find_in(&vm.description).expect("a marker in the description");
    assert_eq!(marker.job_id, Some(8123456));
    assert_eq!(marker.pipeline_id, Some(77));
    assert_eq!(marker.project.as_deref(), Some("group/project"));
    // (Changed: the runner host's PROXMOX_RUNNER_ID, not the job-overridable short token.)
    assert_eq!(marker.runner.as_deref(), Some("ci-host-1"));
    assert_eq!(Some(marker), Marker::parse_line(&state.marker));
    assert!(
        (2_000_000..=2_999_999).contains(&vm.vmid),
        "VMID {} is outside PROXMOX_VMID_RANGE",
        vm.vmid
    );
    assert!(!requests_matching(&fake, "PUT", "/resize").is_empty());
    assert_eq!(
        std::fs::metadata(dir.path().join(STATE_FILE_NAME))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o600
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(SYSTEM_FAILURE));
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn full_clones_pass_storage_and_pool_and_linked_clones_leave_storage_out() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(
        &hook(&fake, dir.path(), 1)
            .host_env("PROXMOX_CLONE", "full")
            .host_env("PROXMOX_STORAGE", "local-lvm")
            .host_env("PROXMOX_POOL", "ci"),
    );
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "(full)");
    assert_log_has(&out, "guest agent up");
    // PVE refuses `storage` for linked clones (400): the driver leaves it out and says so.
    let out = prepare(&hook(&fake, dir.path(), 1).host_env("PROXMOX_STORAGE", "local-lvm"));
    assert_log_has(&out, "PROXMOX_STORAGE applies to full clones only");
    assert_log_has(&out, "(linked)");
    assert_log_has(&out, "guest agent up");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn the_job_may_pick_a_template_from_the_map() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 2).job_var("PROXMOX_TEMPLATE", "debian-12"));
    assert_log_has(&out, "cloned template debian-12 (60930)");
    assert_eq!(
        requests_matching(&fake, "POST", "/qemu/60930/clone").len(),
        1
    );
}

// ---------------------------------------------------------------- prepare: a failure at each step

#[test]
fn an_unknown_template_is_a_build_failure_listing_the_allowed_ones() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 3).job_var("PROXMOX_TEMPLATE", "windows-xp"));
    out.assert_exit(BUILD_FAILURE);
    assert_log_has(&out, "\"windows-xp\" is not allowed");
    assert_log_has(&out, "debian-11, debian-12, ubuntu-bionic, ubuntu-focal");
    assert!(requests_matching(&fake, "POST", "/clone").is_empty());
    assert!(state_of(dir.path()).is_none());
}

#[test]
fn a_template_vmid_is_refused_unless_the_admin_allows_any_template() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 700,
        name: "secrets-vm".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let base = hook(&fake, dir.path(), 4);
    prepare(&base.clone().job_var("PROXMOX_TEMPLATE", "60910")).assert_exit(BUILD_FAILURE);
    let any = base
        .clone()
        .host_env("PROXMOX_TEMPLATES", "ubuntu-focal=60900")
        .host_env("PROXMOX_ALLOWED_TEMPLATES", "*");
    // Allowed: a template by VMID, and by its VM name (looked up on the node).
    let out = prepare(&any.clone().job_var("PROXMOX_TEMPLATE", "60910"));
    assert_log_has(&out, "cloned template 60910 (60910)");
    let out = prepare(&any.clone().job_var("PROXMOX_TEMPLATE", "debian-11"));
    assert_log_has(&out, "cloned template debian-11 (60920)");
    assert!(!requests_matching(&fake, "GET", "/cluster/resources").is_empty());
    // A listed extra is allowed, anything else is not, and the message lists both kinds.
    let listed = base
        .host_env("PROXMOX_TEMPLATES", "ubuntu-focal=60900")
        .host_env("PROXMOX_ALLOWED_TEMPLATES", "60930");
    let out = prepare(&listed.clone().job_var("PROXMOX_TEMPLATE", "60930"));
    assert_log_has(&out, "cloned template 60930 (60930)");
    let out = prepare(&listed.job_var("PROXMOX_TEMPLATE", "60920"));
    out.assert_exit(BUILD_FAILURE);
    assert_log_has(&out, "allowed templates: ubuntu-focal, 60930");
    // Never a VM that is not a template.
    let out = prepare(&any.job_var("PROXMOX_TEMPLATE", "700"));
    out.assert_exit(BUILD_FAILURE);
    assert_log_has(&out, "not a template");
    assert!(requests_matching(&fake, "POST", "/qemu/700/clone").is_empty());
    assert!(
        fake.job_vms().iter().all(|vm| vm.vmid == 700),
        "{NO_VM_LEFT}"
    );
}

#[test]
fn a_template_missing_from_the_node_is_a_system_failure() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out =
        prepare(&hook(&fake, dir.path(), 5).host_env("PROXMOX_TEMPLATES", "ubuntu-focal=61999"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "VMID 61999, which does not exist on node pve1");
    assert!(requests_matching(&fake, "POST", "/clone").is_empty());
}

#[test]
fn a_clone_lock_directory_others_can_write_fails_prepare_before_any_clone() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // Ours, but mode 0777: any local user could hold the slots or swap them for their own.
    let locks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        locks.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = prepare(
        &hook(&fake, dir.path(), 7)
            .host_env("PROXMOX_MAX_CONCURRENT_CLONES", "2")
            .host_env("PROXMOX_CLONE_LOCK_DIR", locks.path().display().to_string()),
    );
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(
        &out,
        &format!(
            "the clone lock directory {} (PROXMOX_CLONE_LOCK_DIR) is writable by group or \
             others (mode 0777)",
            locks.path().display()
        ),
    );
    assert!(requests_matching(&fake, "POST", "/clone").is_empty());
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    assert_eq!(
        std::fs::read_dir(locks.path()).unwrap().count(),
        0,
        "no slot file made"
    );
}

#[test]
fn prepare_warns_when_the_settings_file_is_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("proxmox.toml");
    // A template that does not exist: prepare stops right after the warning.
    std::fs::write(&settings, "PROXMOX_TEMPLATES = { ubuntu-focal = 61999 }\n").unwrap();
    std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = prepare(&hook(&fake, dir.path(), 8).host_env(
        "GITLAB_PROXMOX_RUNNER_CONFIG",
        settings.display().to_string(),
    ));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(
        &out,
        &format!(
            "WARNING: the settings file {} is readable by group or others (mode 0644); it \
             holds the driver's secrets: chmod 0600 {}",
            settings.display(),
            settings.display()
        ),
    );
    assert_eq!(
        out.log().matches("is readable by group or others").count(),
        1
    );
    assert_log_has(&out, "VMID 61999, which does not exist on node pve1");
}

#[test]
fn a_failing_vmid_check_creates_nothing() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::HttpErrors {
        count: 100,
        status: 403,
        message: "Permission check failed (/vms, VM.Allocate)".into(),
        path_contains: Some("/cluster/nextid".into()),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 6));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "Permission check failed (/vms, VM.Allocate)");
    assert!(requests_matching(&fake, "POST", "/clone").is_empty());
    assert!(state_of(dir.path()).is_none());
}

#[test]
fn a_bad_token_fails_at_once_naming_the_token_settings() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out =
        prepare(&hook(&fake, dir.path(), 23).host_env("PROXMOX_TOKEN_VALUE", "wr0ng-t0ken-4217"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "HTTP 401");
    assert_log_has(&out, "PROXMOX_TOKEN_VALUE");
    assert!(
        !out.log().contains("wrong"),
        "the token value never shows: {}",
        out.log()
    );
    assert_eq!(fake.request_count(), 1, "401 is not retried");
}

#[test]
fn parameter_errors_are_reported_field_by_field() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 24).host_env("VM_CORES", "0"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "HTTP 400: Parameter verification failed.");
    assert_log_has(&out, "cores: value must have a minimum value of 1");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn a_refused_clone_request_fails_with_the_apis_words_and_leaves_nothing() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::CloneRequestFails {
        count: 1,
        status: 403,
        message: "Permission check failed (/vms/60900, VM.Clone)".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 7));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(
        &out,
        "HTTP 403: Permission check failed (/vms/60900, VM.Clone)",
    );
    assert_eq!(
        requests_matching(&fake, "POST", "/clone").len(),
        1,
        "403 is not retried"
    );
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    let out = cleanup(&hook(&fake, dir.path(), 7));
    out.assert_exit(0);
}

#[test]
fn newer_nodes_message_in_the_body_reads_the_same() {
    let fake = FakeProxmox::start(FakeConfig {
        message_in_body: true,
        ..FakeConfig::default()
    });
    fake.inject(Fault::CloneRequestFails {
        count: 1,
        status: 403,
        message: "Permission check failed (/pool/ci, Pool.Allocate)".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 25));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(
        &out,
        "HTTP 403: Permission check failed (/pool/ci, Pool.Allocate)",
    );
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn a_failed_clone_task_leaves_no_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: "storage 'local-lvm' is not online".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 8));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "storage 'local-lvm' is not online");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    cleanup(&hook(&fake, dir.path(), 8)).assert_exit(0);
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn a_failure_while_configuring_destroys_the_clone() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::HttpErrors {
        count: 1,
        status: 400,
        message: "Parameter verification failed.".into(),
        path_contains: Some("/config".into()),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 9));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "configuring VM");
    assert_log_has(&out, "prepare failed while configuring the VM");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    cleanup(&hook(&fake, dir.path(), 9)).assert_exit(0);
}

#[test]
fn a_failed_start_destroys_the_clone() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::StartTaskFails {
        count: 1,
        message: "start failed: QEMU exited with code 1".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 10));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "start failed: QEMU exited with code 1");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn an_agent_that_never_comes_times_out_and_destroys_the_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::AgentNeverStarts);
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 11).host_env("VM_BOOT_TIMEOUT", "2"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "within VM_BOOT_TIMEOUT (2 s)");
    assert_log_has(&out, "qemu-guest-agent");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn a_template_without_agent_is_a_clear_permanent_error() {
    let mut config = FakeConfig::default();
    config.templates[0].agent = false;
    let fake = FakeProxmox::start(config);
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 12));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "no QEMU guest agent configured");
    assert!(requests_matching(&fake, "POST", "/status/start").is_empty());
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn an_address_outside_the_allowed_networks_is_never_used() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(
        &hook(&fake, dir.path(), 13)
            .host_env("VM_NETWORK_CIDRS", "192.0.2.0/24")
            .host_env("VM_BOOT_TIMEOUT", "2"),
    );
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "no usable IP address");
    assert_log_has(&out, "127.0.0.1");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn sigterm_during_prepare_stops_waiting_and_destroys_the_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::AgentNeverStarts);
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 14).host_env("VM_BOOT_TIMEOUT", "600");
    let child = hook
        .clone()
        .arg("prepare")
        .command()
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_every(
        "prepare to start the VM",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            state_of(dir.path())
                .is_some_and(|state| state.phase >= Phase::Started)
                .then_some(())
        },
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(SYSTEM_FAILURE), "{log}");
    assert!(log.contains("cancelled (SIGTERM)"), "{log}");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    assert!(state_of(dir.path()).is_none());
}

// ---------------------------------------------------------------- prepare: what it recovers from

#[test]
fn a_retried_prepare_first_removes_the_vm_of_the_earlier_attempt() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // The earlier attempt's VM survived (its cleanup failed); its state is still there.
    vm_of_this_job(&fake, dir.path(), 2_000_950, Phase::Started);
    let out = prepare(&hook(&fake, dir.path(), 22));
    assert_log_has(
        &out,
        "an earlier prepare attempt of this job left VM 2000950",
    );
    assert!(fake.vm(2_000_950).is_none());
    assert_log_has(&out, "cloned template");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn cleanup_finds_a_vm_that_was_migrated_to_another_node() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    vm_of_this_job(&fake, dir.path(), 2_000_960, Phase::Ready);
    // HA (or an admin) moved it: it reads as missing on pve1, the node the state names.
    assert!(fake.migrate_vm(2_000_960, "pve2"));
    let out = cleanup(&hook(&fake, dir.path(), 99));
    assert_eq!(out.code, 0, "{}", out.log());
    assert_log_has(&out, "VM 2000960 is not on pve1 but on pve2 (migrated)");
    assert!(fake.vm(2_000_960).is_none(), "{NO_VM_LEFT}");
    assert!(state_of(dir.path()).is_none());
}

#[test]
fn cleanup_removes_the_vms_that_failed_node_attempts_left_behind() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let mut state = vm_of_this_job(&fake, dir.path(), 2_000_970, Phase::Ready);
    // A VM of an earlier attempt on pve2 (the node failed then), with its own marker.
    let earlier = Marker::new(&JobInfo {
        job_id: Some(99),
        ..Default::default()
    });
    fake.add_vm(NewVm {
        vmid: 2_000_971,
        node: "pve2".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: earlier.description(),
        running: true,
        ..Default::default()
    });
    // And one that is not ours any more (its VMID reused by somebody else's VM).
    fake.add_vm(NewVm {
        vmid: 2_000_972,
        node: "pve2".into(),
        description: "someone else's".into(),
        ..Default::default()
    });
    for vmid in [2_000_971, 2_000_972] {
        state
            .left_behind
            .push(gitlab_proxmox_runner::state::LeftVm {
                node: "pve2".into(),
                vmid,
                marker: earlier.render(),
                template_vmid: Some(60900),
                template_node: None,
                clone_sent_at: None,
                clone_upid: None,
            });
    }
    state.save(dir.path()).unwrap();
    let out = cleanup(&hook(&fake, dir.path(), 99));
    assert_eq!(out.code, 0, "{}", out.log());
    assert!(fake.vm(2_000_970).is_none() && fake.vm(2_000_971).is_none());
    assert!(fake.vm(2_000_972).is_some(), "a foreign VM is left alone");
    assert_log_has(
        &out,
        "VM 2000972 on pve2 is not the VM a failed node attempt created",
    );
}

#[test]
fn transient_api_errors_are_retried() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::HttpErrors {
        count: 2,
        status: 503,
        message: "Service Unavailable".into(),
        path_contains: Some("/cluster/nextid".into()),
    });
    fake.inject(Fault::HttpErrors {
        count: 1,
        status: 596,
        message: "Connection timed out".into(),
        path_contains: Some("/status/current".into()),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 15));
    assert_log_has(&out, "retrying in");
    assert_log_has(&out, "guest agent up");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn clone_lock_timeouts_and_taken_ids_are_retried_with_another_vmid() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
            .into(),
    });
    fake.inject(Fault::CloneRequestFails {
        count: 1,
        status: 500,
        message: "unable to create VM 2000000: config file already exists".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 16));
    assert_log_has(&out, "guest agent up");
    assert!(requests_matching(&fake, "POST", "/clone").len() >= 3);
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn clones_refused_under_parallel_load_are_retried_until_each_job_has_its_vm() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::ConcurrentCloneLimit {
        max: 2,
        message: "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
            .into(),
    });
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(index, dir)| {
            hook(&fake, dir.path(), 100 + index as u64)
                .arg("prepare")
                .spawn()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(log.contains("guest agent up"), "{log}");
    }
    assert!(fake.max_concurrent_clones() >= 1);
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn taken_vmids_are_skipped_and_never_touched() {
    let fake = FakeProxmox::start(FakeConfig::default());
    for vmid in 3000..3003 {
        fake.add_vm(NewVm {
            vmid,
            name: format!("hand-made-{vmid}"),
            running: true,
            ..Default::default()
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 17).host_env("PROXMOX_VMID_RANGE", "3000-3003"));
    assert_log_has(&out, "→ VM 3003 ");
    let left: Vec<u32> = fake.job_vms().iter().map(|vm| vm.vmid).collect();
    assert_eq!(left, vec![3000, 3001, 3002]);
    assert!(fake.job_vms().iter().all(|vm| vm.status == "running"));
}

#[test]
fn a_full_vmid_range_is_a_clear_error() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 3100,
        name: "hand-made".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 18).host_env("PROXMOX_VMID_RANGE", "3100-3100"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "no free VMID found in PROXMOX_VMID_RANGE 3100-3100");
    assert!(fake.vm(3100).is_some());
}

#[test]
fn task_warnings_count_as_success_and_a_lingering_clone_lock_is_waited_out() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.inject(Fault::TaskWarnings { count: 3 });
    fake.inject(Fault::LockAfterClone {
        duration: Duration::from_millis(700),
    });
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(&hook(&fake, dir.path(), 19));
    assert_log_has(&out, "guest agent up");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
}

#[test]
fn a_key_from_custom_env_is_warned_about() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // (Changed: key text, because a job's key path is now refused before prepare starts.)
    let out = prepare(&hook_without_key(&fake, dir.path(), 20).job_var(
        "VM_SSH_PRIVATE_KEY",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-usable-key\n-----END OPENSSH PRIVATE KEY-----",
    ));
    assert_log_has(&out, "VM_SSH_PRIVATE_KEY came in through CUSTOM_ENV_");
    let fake2 = FakeProxmox::start(FakeConfig::default());
    let out = prepare(&hook(&fake2, dir.path(), 20));
    assert!(
        !out.log().contains("came in through CUSTOM_ENV_"),
        "{}",
        out.log()
    );
}

#[test]
fn a_key_path_from_the_job_is_refused_before_any_request() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(
        &hook_without_key(&fake, dir.path(), 22)
            .job_var("VM_SSH_PRIVATE_KEY", "/etc/ssh/ssh_host_ed25519_key"),
    );
    out.assert_exit(BUILD_FAILURE);
    assert_log_has(&out, "must hold the key text itself");
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn a_missing_ssh_key_fails_before_any_vm_exists() {
    // Without a fleet key every VM takes the static key: nothing to ask the API.
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = prepare(
        &hook_without_key(&fake, dir.path(), 21).without_host_env(gpr_testkit::fleet::CONFIG_ENV),
    );
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "VM_SSH_PRIVATE_KEY is not set");
    assert_eq!(fake.request_count(), 0);

    // With one, a template whose cloud-init cannot take a per-VM key (the fake's ciuser is
    // `ci`, not VM_SSH_USER root) still needs it: the job fails once the template is known,
    // before anything is cloned.
    let out = prepare(&hook_without_key(&fake, dir.path(), 21).host_env("VM_SSH_USER", "root"));
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(
        &out,
        "takes the static SSH key (its ciuser ci is not VM_SSH_USER root), and \
         VM_SSH_PRIVATE_KEY is not set",
    );
    assert!(fake.job_vms().is_empty());
    assert!(
        !fake.requests().iter().any(|r| r.path.ends_with("/clone")),
        "{:?}",
        fake.requests_by_endpoint()
    );
}

// ---------------------------------------------------------------- the trust rule

#[test]
fn a_job_that_redirects_the_api_is_refused_before_any_request() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let attacker = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // The admin configured the API through [[runners]] environment (CUSTOM_ENV_); the job's
    // own variable with the same name wins there, so the driver must notice and refuse.
    let mut hook = Hook::new(driver_binary!(), dir.path());
    for (name, value) in fake.settings_env() {
        hook = hook.runner_env(name, value);
    }
    let hook = hook
        .runner_env("VM_SSH_PRIVATE_KEY", unauthorized_key())
        .job_var("PROXMOX_HOST", attacker.host())
        .job_var("PROXMOX_TLS_FINGERPRINT", attacker.fingerprint());
    for hook_name in ["prepare", "cleanup", "config"] {
        let out = hook.clone().arg(hook_name).run();
        out.assert_exit(BUILD_FAILURE);
        assert_log_has(&out, "PROXMOX_HOST");
    }
    assert_eq!(
        attacker.request_count(),
        0,
        "the token must never reach the job's server"
    );
    assert_eq!(fake.request_count(), 0);
}

// ---------------------------------------------------------------- cleanup

#[test]
fn cleanup_without_state_does_nothing_and_succeeds() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = cleanup(&hook(&fake, dir.path(), 30));
    out.assert_exit(0);
    assert_log_has(&out, "nothing to clean up");
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn cleanup_stops_and_deletes_a_running_vm_and_is_idempotent() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    vm_of_this_job(&fake, dir.path(), 2_000_500, Phase::Ready);
    let hook = hook(&fake, dir.path(), 31);
    let out = cleanup(&hook);
    out.assert_exit(0);
    assert_log_has(&out, "destroyed VM 2000500 on pve1");
    assert!(fake.vm(2_000_500).is_none());
    assert_eq!(
        requests_matching(&fake, "POST", "/qemu/2000500/status/stop").len(),
        1
    );
    let delete = requests_matching(&fake, "DELETE", "/qemu/2000500");
    assert_eq!(delete.len(), 1);
    assert!(delete[0].query.contains("purge=1"));
    assert!(delete[0].query.contains("destroy-unreferenced-disks=1"));
    assert!(state_of(dir.path()).is_none());
    // Twice: the state is gone, so there is nothing to do.
    cleanup(&hook).assert_exit(0);
    // With a state whose VM is already gone (deleted behind its back): "does not exist" is done.
    let again = tempfile::tempdir().unwrap();
    state_for(
        again.path(),
        2_000_501,
        Phase::Ready,
        &Marker::new(&JobInfo::default()),
    );
    let out = cleanup(&hook_in(&fake, again.path()));
    out.assert_exit(0);
    assert_log_has(&out, "VM 2000501 on pve1 does not exist");
    assert!(state_of(again.path()).is_none());
}

fn hook_in(fake: &FakeProxmox, dir: &Path) -> Hook {
    hook(fake, dir, 1)
}

#[test]
fn cleanup_after_a_half_finished_prepare_succeeds() {
    let fake = FakeProxmox::start(FakeConfig::default());
    // Allocated: the state was written, the clone never happened.
    let dir = tempfile::tempdir().unwrap();
    state_for(
        dir.path(),
        2_000_600,
        Phase::Allocated,
        &Marker::new(&JobInfo::default()),
    );
    let out = cleanup(&hook(&fake, dir.path(), 32));
    out.assert_exit(0);
    assert_log_has(&out, "VM 2000600 on pve1 does not exist");
    assert!(state_of(dir.path()).is_none());
    // Cloned but never started: deleted without a stop.
    let dir = tempfile::tempdir().unwrap();
    vm_of_this_job(&fake, dir.path(), 2_000_601, Phase::Cloned);
    cleanup(&hook(&fake, dir.path(), 32)).assert_exit(0);
    assert!(fake.vm(2_000_601).is_none());
    assert!(requests_matching(&fake, "POST", "/qemu/2000601/status/stop").is_empty());
}

#[test]
fn cleanup_never_deletes_a_vm_whose_marker_differs() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // Another prepare's VM (another nonce) sits at the VMID this job's state names.
    let other = Marker::new(&JobInfo {
        job_id: Some(555),
        ..Default::default()
    });
    fake.add_vm(NewVm {
        vmid: 2_000_700,
        name: "ci-555-other".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: other.description(),
        running: true,
        ..Default::default()
    });
    let mine = Marker::new(&JobInfo {
        job_id: Some(555),
        ..Default::default()
    });
    state_for(dir.path(), 2_000_700, Phase::Ready, &mine);
    let out = cleanup(&hook(&fake, dir.path(), 33));
    out.assert_exit(0);
    assert_log_has(&out, "is not the VM this job created");
    let vm = fake.vm(2_000_700).expect("the foreign VM must survive");
    assert_eq!(vm.status, "running");
    assert!(requests_matching(&fake, "POST", "/status/stop").is_empty());
    assert!(requests_matching(&fake, "DELETE", "/qemu/").is_empty());

    // A hand-made VM without any marker: also left alone.
    let dir = tempfile::tempdir().unwrap();
    fake.add_vm(NewVm {
        vmid: 2_000_701,
        name: "hand-made".into(),
        description: "important database".into(),
        running: true,
        ..Default::default()
    });
    state_for(dir.path(), 2_000_701, Phase::Ready, &mine);
    let out = cleanup(&hook(&fake, dir.path(), 33));
    out.assert_exit(0);
    assert_log_has(&out, "no gitlab-proxmox-runner ownership marker");
    assert!(fake.vm(2_000_701).is_some());

    // A foreign VM under a long lock (a backup): not waited on, not touched.
    let dir = tempfile::tempdir().unwrap();
    fake.add_vm(NewVm {
        vmid: 2_000_702,
        name: "being-backed-up".into(),
        running: true,
        lock: Some("backup".into()),
        ..Default::default()
    });
    state_for(dir.path(), 2_000_702, Phase::Ready, &mine);
    let out = cleanup(&hook(&fake, dir.path(), 33));
    out.assert_exit(0);
    assert_log_has(&out, "is not the VM this job created");
    assert!(!out.log().contains("waiting for the lock"), "{}", out.log());
    assert!(fake.vm(2_000_702).is_some());
}

#[test]
fn cleanup_waits_for_a_clone_in_flight_then_removes_it() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.set_clone_time(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let hook = hook(&fake, dir.path(), 34);
    // prepare dies hard (SIGKILL: no rollback) while its clone runs.
    let mut child = hook.clone().arg("prepare").command().spawn().unwrap();
    wait_for_every(
        "the clone to start",
        Duration::from_secs(60),
        Duration::from_millis(10),
        || {
            (fake.job_vms().iter())
                .any(|vm| vm.lock.as_deref() == Some("clone"))
                .then_some(())
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(fake.job_vms().len(), 1);
    let out = cleanup(&hook);
    out.assert_exit(0);
    assert_log_has(&out, "still runs; waiting for its task to end");
    assert!(fake.job_vms().is_empty(), "{NO_VM_LEFT}");
    assert!(state_of(dir.path()).is_none());
}

#[test]
fn cleanup_retries_transient_errors() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    vm_of_this_job(&fake, dir.path(), 2_000_800, Phase::Ready);
    fake.inject(Fault::HttpErrors {
        count: 2,
        status: 500,
        message: "can't lock file '/var/lock/qemu-server/lock-2000800.conf' - got timeout".into(),
        path_contains: Some("/qemu/2000800".into()),
    });
    let out = cleanup(&hook(&fake, dir.path(), 35));
    out.assert_exit(0);
    assert!(fake.vm(2_000_800).is_none());
}

#[test]
fn cleanup_failing_keeps_the_state_for_the_next_try() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    vm_of_this_job(&fake, dir.path(), 2_000_900, Phase::Ready);
    fake.inject(Fault::HttpErrors {
        count: 1,
        status: 403,
        message: "Permission check failed (/vms/2000900, VM.Allocate)".into(),
        path_contains: Some("/qemu/2000900/status/current".into()),
    });
    let hook = hook(&fake, dir.path(), 36);
    let out = cleanup(&hook);
    out.assert_exit(SYSTEM_FAILURE);
    assert_log_has(&out, "VM.Allocate");
    assert!(state_of(dir.path()).is_some());
    cleanup(&hook).assert_exit(0);
    assert!(fake.vm(2_000_900).is_none());
}
