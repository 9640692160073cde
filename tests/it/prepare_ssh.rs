//! prepare all the way to a VM that answers SSH: the fake Proxmox's guest reports 127.0.0.1,
//! and a real sshd on loopback (gpr_testkit::sshd) stands in for the VM's sshd.

use std::collections::HashSet;

use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::{JobState, Phase};
use gpr_testkit::hook::{Hook, HookOutput, SYSTEM_FAILURE};
use gpr_testkit::lab::ED25519_HOST_KEY_FILE as ED25519_FILE;
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::{driver_binary, Lab};

/// The fake, the sshd, the key it accepts; the fake's guest serves sshd's ed25519 host key
/// through the agent, as a real guest serves its own.
#[track_caller]
fn start(test: &str) -> Option<Lab> {
    Lab::builder(driver_binary!()).with_sshd_or_skip(test)
}

fn run(hook: &Hook, name: &str) -> HookOutput {
    hook.clone().arg(name).run()
}

fn key_without_comment(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn prepare_brings_up_a_reachable_vm_and_cleanup_removes_it() {
    let Some(lab) = start("prepare_brings_up_a_reachable_vm_and_cleanup_removes_it") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = lab.job_hook(dir.path(), 4711);
    let out = run(&hook, "prepare");
    out.assert_exit(0);
    let log = out.log();
    assert!(log.contains("ready at 127.0.0.1:"), "{log}");
    for phase in ["clone ", "configure ", "start ", "agent+IP ", "ssh "] {
        assert!(log.contains(phase), "the summary lacks {phase:?}: {log}");
    }
    assert!(
        !log.contains("first connection"),
        "the host key came through the agent: {log}"
    );

    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_eq!(state.phase, Phase::Ready);
    assert_eq!(state.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(state.ssh_port, Some(lab.sshd().port()));
    assert_eq!(state.ssh_user.as_deref(), Some("root"));
    assert_eq!(state.host_key_source.as_deref(), Some("guest-agent"));
    let ed25519 = lab
        .sshd()
        .host_key_lines()
        .into_iter()
        .find(|line| line.starts_with("ssh-ed25519"))
        .unwrap();
    assert_eq!(state.host_keys, vec![key_without_comment(&ed25519)]);
    let text =
        std::fs::read_to_string(dir.path().join("gitlab-proxmox-runner-state.json")).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "no secrets in the state");
    assert!(!text.contains("fake-token"), "no secrets in the state");

    let vms = lab.fake.job_vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].vmid, state.vmid);
    assert_eq!(vms[0].status, "running");
    assert_eq!(
        Marker::find_in(&vms[0].description),
        Marker::parse_line(&state.marker)
    );

    let out = run(&hook, "cleanup");
    out.assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());
    assert!(JobState::load(dir.path()).unwrap().is_none());
    run(&hook, "cleanup").assert_exit(0);
}

#[test]
fn without_an_agent_readable_host_key_the_first_key_is_pinned_with_a_warning() {
    let Some(lab) = start("without_an_agent_readable_host_key") else {
        return;
    };
    // No host key files but an empty ed25519 one: nothing to wait for, nothing to pin.
    lab.fake.remove_host_keys();
    lab.fake.set_guest_file(ED25519_FILE, "");
    let dir = tempfile::tempdir().unwrap();
    let hook = lab.job_hook(dir.path(), 4712);
    let out = run(&hook, "prepare");
    out.assert_exit(0);
    assert!(
        out.log()
            .contains("trusting the key it presents on first connection"),
        "{}",
        out.log()
    );
    let state = JobState::load(dir.path()).unwrap().unwrap();
    assert_eq!(state.host_key_source.as_deref(), Some("first-use"));
    assert_eq!(state.host_keys.len(), 1);
    let served: Vec<String> = lab
        .sshd()
        .host_key_lines()
        .iter()
        .map(|line| key_without_comment(line))
        .collect();
    assert!(
        served.contains(&key_without_comment(&state.host_keys[0])),
        "{:?} not among {served:?}",
        state.host_keys
    );
    run(&hook, "cleanup").assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn strict_host_key_policy_refuses_without_an_agent_key_and_leaves_no_vm() {
    let Some(lab) = start("strict_host_key_policy_refuses") else {
        return;
    };
    // No host key files but an empty ed25519 one: nothing to wait for, nothing to pin.
    lab.fake.remove_host_keys();
    lab.fake.set_guest_file(ED25519_FILE, "");
    let dir = tempfile::tempdir().unwrap();
    let hook = lab
        .job_hook(dir.path(), 4713)
        .host_env("VM_SSH_HOST_KEY_POLICY", "strict");
    let out = run(&hook, "prepare");
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        out.log().contains("VM_SSH_HOST_KEY_POLICY=strict"),
        "{}",
        out.log()
    );
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_host_key_other_than_the_agents_is_refused_and_leaves_no_vm() {
    let Some(lab) = start("a_host_key_other_than_the_agents_is_refused") else {
        return;
    };
    // The agent says the VM's key is one sshd does not have: someone else answers on the IP.
    let impostor = ClientKey::ed25519();
    lab.fake
        .set_guest_file(ED25519_FILE, &format!("{}\n", impostor.public_line));
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &lab.job_hook(dir.path(), 4714)
            .host_env("VM_BOOT_TIMEOUT", "5"),
        "prepare",
    );
    out.assert_exit(SYSTEM_FAILURE);
    assert!(lab.fake.job_vms().is_empty());
    assert!(JobState::load(dir.path()).unwrap().is_none());
}

#[test]
fn host_keys_regenerated_at_first_boot_are_read_again_through_the_agent() {
    let Some(lab) = start("host_keys_regenerated_at_first_boot") else {
        return;
    };
    // The agent answers before cloud-init replaced the template's host key.
    let template_key = ClientKey::ed25519();
    lab.fake
        .set_stale_guest_file(ED25519_FILE, &format!("{}\n", template_key.public_line), 1);
    let dir = tempfile::tempdir().unwrap();
    let hook = lab.job_hook(dir.path(), 4716);
    let out = run(&hook, "prepare");
    out.assert_exit(0);
    assert!(
        out.log()
            .contains("changed since the guest agent first read them"),
        "{}",
        out.log()
    );
    let state = JobState::load(dir.path()).unwrap().unwrap();
    let real = lab
        .sshd()
        .host_key_lines()
        .into_iter()
        .find(|line| line.starts_with("ssh-ed25519 "))
        .unwrap();
    assert_eq!(state.host_keys, vec![key_without_comment(&real)]);
    run(&hook, "cleanup").assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_failure_installing_the_runner_helper_leaves_no_vm() {
    let Some(lab) = start("a_failure_installing_the_runner_helper") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &lab.job_hook(dir.path(), 4715)
            .host_env("RUNNER_HELPER_PATH", "/nonexistent/gitlab-runner"),
        "prepare",
    );
    if out.code == 0 {
        // This host has gitlab-runner on PATH, so nothing needed installing.
        run(&lab.job_hook(dir.path(), 4715), "cleanup").assert_exit(0);
        return;
    }
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        out.log().contains("/nonexistent/gitlab-runner"),
        "{}",
        out.log()
    );
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn sixteen_prepares_at_once_never_share_a_vm() {
    let Some(lab) = start("sixteen_prepares_at_once_never_share_a_vm") else {
        return;
    };
    // A narrow range makes the random picks collide, in nextid and in the clone itself.
    let dirs: Vec<tempfile::TempDir> = (0..16).map(|_| tempfile::tempdir().unwrap()).collect();
    let hooks: Vec<Hook> = dirs
        .iter()
        .enumerate()
        .map(|(index, dir)| {
            lab.job_hook(dir.path(), 9000 + index as u64)
                .host_env("PROXMOX_VMID_RANGE", "2000000-2000023")
        })
        .collect();
    let children: Vec<_> = hooks
        .iter()
        .map(|hook| hook.clone().arg("prepare").spawn())
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let states: Vec<JobState> = dirs
        .iter()
        .map(|dir| {
            JobState::load(dir.path())
                .unwrap()
                .expect("a state per job")
        })
        .collect();
    let vmids: HashSet<u32> = states.iter().map(|state| state.vmid).collect();
    assert_eq!(vmids.len(), 16, "two jobs share a VMID: {vmids:?}");
    assert_eq!(lab.fake.job_vms().len(), 16);
    for state in &states {
        let vm = lab.fake.vm(state.vmid).expect("the job's VM exists");
        assert_eq!(
            Marker::find_in(&vm.description),
            Marker::parse_line(&state.marker),
            "VM {} carries another job's marker",
            state.vmid
        );
    }
    for hook in &hooks {
        run(hook, "cleanup").assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty());
}
