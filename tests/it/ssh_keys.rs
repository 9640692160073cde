//! VM_SSH_PRIVATE_KEY handling and the run hook's own failures through the real binary: clear
//! errors that never echo key material or the passphrase. No SSH server is needed: the key is
//! loaded before connecting.

use gpr_testkit::driver_binary;
use gpr_testkit::hook::{BUILD_FAILURE, SYSTEM_FAILURE};
use gpr_testkit::ssh_job::{stage_hook, SshTarget};
use gpr_testkit::sshkeys::{ClientKey, KeyKind};

fn nowhere() -> SshTarget {
    SshTarget {
        host: "127.0.0.1".into(),
        port: 1,
        user: "root".into(),
        host_keys: vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEfbnX1MejAxciSpoiwDMBlkBWNtQ3lpuuxrdyRYQuv"
                .into(),
        ],
    }
}

/// Runs the hook with `key` (text and passphrase as given) and returns its stderr.
fn key_error(key: &ClientKey) -> String {
    let job = tempfile::tempdir().unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &nowhere(),
        key,
        "build_script",
        "true\n",
    )
    .run();
    out.assert_exit(SYSTEM_FAILURE);
    for fragment in key.secret_fragments() {
        assert!(
            !out.log().contains(&fragment[..20]),
            "key material in the log: {}",
            out.log()
        );
    }
    if let Some(pass) = &key.passphrase {
        assert!(
            !out.log().contains(pass.as_str()),
            "passphrase in the log: {}",
            out.log()
        );
    }
    out.stderr
}

#[test]
fn an_encrypted_key_without_passphrase_says_to_set_it() {
    let mut key = ClientKey::generate(KeyKind::Ed25519, Some("s3cret-pass"));
    key.passphrase = None;
    let stderr = key_error(&key);
    assert!(
        stderr.contains("key is encrypted, set VM_SSH_KEY_PASSPHRASE"),
        "{stderr}"
    );
}

#[test]
fn a_wrong_passphrase_is_named() {
    let mut key = ClientKey::generate(KeyKind::Ed25519, Some("s3cret-pass"));
    key.passphrase = Some("not-the-pass".into());
    let stderr = key_error(&key);
    assert!(stderr.contains("wrong passphrase"), "{stderr}");
}

#[test]
fn a_wrong_passphrase_for_legacy_pem_and_pkcs8_is_named() {
    if !gpr_testkit::sshkeys::ssh_keygen_available() {
        eprintln!("*** SKIPPED: PEM/PKCS#8 encrypted keys need ssh-keygen ***");
        return;
    }
    for kind in [KeyKind::RsaPkcs1, KeyKind::RsaPkcs8] {
        let mut key = ClientKey::generate(kind, Some("s3cret-pass"));
        key.passphrase = Some("not-the-pass".into());
        let stderr = key_error(&key);
        assert!(stderr.contains("wrong passphrase"), "{kind:?}: {stderr}");
        key.passphrase = None;
        let stderr = key_error(&key);
        assert!(stderr.contains("key is encrypted"), "{kind:?}: {stderr}");
    }
}

#[test]
fn garbage_public_keys_and_mangled_keys_are_not_private_keys() {
    let real = ClientKey::ed25519();
    let mangled = real.private_text.replacen('A', "!", 3);
    let truncated = real.private_text[..real.private_text.len() / 2].to_string();
    for text in [
        "definitely not a key".to_string(),
        real.public_line.clone(),
        mangled,
        truncated,
    ] {
        let key = ClientKey {
            private_text: text,
            ..real.clone()
        };
        let stderr = key_error(&key);
        assert!(stderr.contains("not a private key"), "{stderr}");
        assert!(stderr.contains("VM_SSH_PRIVATE_KEY"), "{stderr}");
    }
}

#[test]
fn a_missing_key_file_is_reported_without_echoing_the_value() {
    let real = ClientKey::ed25519();
    let key = ClientKey {
        private_text: "/nonexistent/id_ed25519".into(),
        ..real
    };
    let stderr = key_error(&key);
    assert!(stderr.contains("VM_SSH_PRIVATE_KEY"), "{stderr}");
    assert!(!stderr.contains("/nonexistent/id_ed25519"), "{stderr}");
}

#[test]
fn run_without_a_ready_job_state_is_a_system_failure() {
    let key = ClientKey::ed25519();
    let job = tempfile::tempdir().unwrap();
    let hook = stage_hook(
        driver_binary!(),
        job.path(),
        &nowhere(),
        &key,
        "build_script",
        "true\n",
    );
    // No state at all: prepare never ran here.
    std::fs::remove_file(job.path().join("gitlab-proxmox-runner-state.json")).unwrap();
    let out = hook.run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.stderr.contains("no job state"), "{}", out.stderr);

    // A state from a prepare that did not get as far as SSH.
    let job = tempfile::tempdir().unwrap();
    let hook = stage_hook(
        driver_binary!(),
        job.path(),
        &nowhere(),
        &key,
        "build_script",
        "true\n",
    );
    let path = job.path().join("gitlab-proxmox-runner-state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"ready\"", "\"started\"")).unwrap();
    let out = hook.run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.stderr.contains("not ready"), "{}", out.stderr);
}

#[test]
fn an_unreachable_vm_is_a_system_failure_naming_it() {
    let key = ClientKey::ed25519();
    let job = tempfile::tempdir().unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &nowhere(),
        &key,
        "build_script",
        "true\n",
    )
    // A stage retries refused connections up to VM_BOOT_TIMEOUT (20 s at most).
    .host_env("VM_BOOT_TIMEOUT", "1")
    .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        out.stderr.contains("VM 2000123 on pve-test"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
    assert!(!job.path().join("build_exit_code").exists());
}

#[test]
fn a_job_may_give_key_text_but_not_a_path_on_the_runner_host() {
    let key = ClientKey::ed25519();
    let job = tempfile::tempdir().unwrap();
    let key_file = job.path().join("host-key");
    std::fs::write(&key_file, &key.private_text).unwrap();
    let hook = stage_hook(
        driver_binary!(),
        job.path(),
        &nowhere(),
        &key,
        "build_script",
        "true\n",
    )
    .host_env("VM_BOOT_TIMEOUT", "1");
    // From the runner host's own settings a path is fine (fails later: nothing listens).
    let out = hook
        .clone()
        .host_env("VM_SSH_PRIVATE_KEY", key_file.display().to_string())
        .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(!out.stderr.contains("not a path"), "{}", out.stderr);
    // From the job's variables it is refused before the file is opened.
    let out = hook
        .clone()
        .without_host_env("VM_SSH_PRIVATE_KEY")
        .job_var("VM_SSH_PRIVATE_KEY", key_file.display().to_string())
        .run();
    out.assert_exit(BUILD_FAILURE);
    assert!(out.stderr.contains("not a path"), "{}", out.stderr);
}
