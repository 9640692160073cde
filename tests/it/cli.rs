//! The binary's command line and exit-code contract, run as gitlab-runner would run it.

use gpr_testkit::driver_binary;
use gpr_testkit::hook::{Hook, SYSTEM_FAILURE};

#[test]
fn missing_settings_are_a_system_failure_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = Hook::new(driver_binary!(), dir.path()).arg("prepare").run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.stderr.contains("PROXMOX_HOST"), "{}", out.stderr);
}

#[test]
fn exit_codes_follow_the_runner_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = Hook::new(driver_binary!(), dir.path())
        .arg("prepare")
        .command()
        .env("SYSTEM_FAILURE_EXIT_CODE", "77")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77));
}
