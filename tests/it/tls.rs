//! How the driver trusts the Proxmox API's certificate: by CA file, by pinned fingerprint
//! (right and wrong), not at all (loudly), or by the system store (absent on distroless hosts).
//! Each case runs cleanup on a job state that names a VM, so the driver must talk to the API.

use std::path::Path;

use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::{JobState, Phase};
use gpr_testkit::driver_binary;
use gpr_testkit::hook::{Hook, HookOutput, SYSTEM_FAILURE};
use gpr_testkit::sshkeys::unauthorized_key;
use gpr_testkit::{FakeConfig, FakeProxmox};

/// The fake's settings without any TLS trust setting.
fn hook_without_trust(fake: &FakeProxmox, dir: &Path) -> Hook {
    let mut hook = Hook::new(driver_binary!(), dir);
    for (name, value) in fake.settings_env() {
        if !name.starts_with("PROXMOX_TLS_") {
            hook = hook.host_env(name, value);
        }
    }
    hook.host_env("VM_SSH_PRIVATE_KEY", unauthorized_key())
}

/// Runs cleanup for a job whose state names a VM that does not exist: with working TLS that
/// is a quick success after one API call.
fn cleanup_needing_the_api(hook: Hook, dir: &Path) -> HookOutput {
    JobState {
        node: "pve1".into(),
        vmid: 2_000_321,
        phase: Phase::Cloned,
        vm_name: "ci-1".into(),
        marker: Marker::new(&JobInfo::default()).render(),
        template_vmid: None,
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
    hook.arg("cleanup").run()
}

#[test]
fn a_ca_file_is_trusted() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let ca = fake.write_ca_file(dir.path());
    let hook = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_CA_FILE", ca.display().to_string());
    let out = cleanup_needing_the_api(hook, dir.path());
    out.assert_exit(0);
    assert!(out.log().contains("does not exist"), "{}", out.log());
    assert!(fake.request_count() > 0);
}

#[test]
fn another_ca_is_refused_before_any_request() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let other = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let wrong_ca = other.write_ca_file(dir.path());
    let hook = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_CA_FILE", wrong_ca.display().to_string());
    let out = cleanup_needing_the_api(hook, dir.path());
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.log().contains("PROXMOX_TLS_CA_FILE"), "{}", out.log());
    assert_eq!(
        fake.request_count(),
        0,
        "no request may pass an untrusted handshake"
    );
}

#[test]
fn the_right_fingerprint_is_trusted() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let hook = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_FINGERPRINT", fake.fingerprint().to_lowercase());
    cleanup_needing_the_api(hook, dir.path()).assert_exit(0);
    assert!(fake.request_count() > 0);
}

#[test]
fn a_wrong_fingerprint_is_refused_and_the_real_one_is_shown() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let other = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let hook = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_FINGERPRINT", other.fingerprint());
    let out = cleanup_needing_the_api(hook, dir.path());
    out.assert_exit(SYSTEM_FAILURE);
    let log = out.log();
    assert!(log.contains("PROXMOX_TLS_FINGERPRINT"), "{log}");
    assert!(
        log.contains(&fake.fingerprint()),
        "the actual fingerprint helps: {log}"
    );
    assert_eq!(fake.request_count(), 0);
    // Not retried as if it were a network hiccup.
    assert!(!log.contains("retrying"), "{log}");
}

#[test]
fn insecure_works_with_a_loud_warning() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let hook = hook_without_trust(&fake, dir.path()).host_env("PROXMOX_TLS_INSECURE", "true");
    let out = cleanup_needing_the_api(hook, dir.path());
    out.assert_exit(0);
    assert!(
        out.log().contains("WARNING: PROXMOX_TLS_INSECURE"),
        "{}",
        out.log()
    );
    assert!(fake.request_count() > 0);
}

#[test]
fn a_host_without_system_certificates_gets_an_error_naming_the_three_settings() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // An empty CA bundle stands in for a distroless image's missing store.
    let empty = dir.path().join("empty-bundle.pem");
    std::fs::write(&empty, "").unwrap();
    let hook = hook_without_trust(&fake, dir.path())
        .host_env("SSL_CERT_FILE", empty.display().to_string())
        .host_env(
            "SSL_CERT_DIR",
            dir.path().join("none").display().to_string(),
        );
    let out = cleanup_needing_the_api(hook, dir.path());
    out.assert_exit(SYSTEM_FAILURE);
    for name in [
        "PROXMOX_TLS_CA_FILE",
        "PROXMOX_TLS_FINGERPRINT",
        "PROXMOX_TLS_INSECURE",
    ] {
        assert!(out.log().contains(name), "{name} missing: {}", out.log());
    }
    assert_eq!(fake.request_count(), 0);
}

#[test]
fn config_checks_trust_material_offline_and_prints_the_driver_json() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_FINGERPRINT", fake.fingerprint())
        .arg("config")
        .run();
    out.assert_exit(0);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["driver"]["name"], "gitlab-proxmox-runner");
    assert_eq!(json["builds_dir"], "/builds");
    assert_eq!(json["cache_dir"], "/cache");
    assert_eq!(json["builds_dir_is_shared"], false);
    assert_eq!(json["shell"], "bash");

    let out = hook_without_trust(&fake, dir.path())
        .host_env("PROXMOX_TLS_CA_FILE", "/nonexistent/pve-root-ca.pem")
        .arg("config")
        .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.log().contains("PROXMOX_TLS_CA_FILE"), "{}", out.log());
    assert!(out.stdout.is_empty());
    assert_eq!(fake.request_count(), 0, "config never calls the API");
}
