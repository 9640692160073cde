//! VM_SSH_PRIVATE_KEY handling through the real binary: clear errors that never echo key
//! material or the passphrase. No SSH server is needed: the key is loaded before connecting.

use gpr_testkit::hook::SYSTEM_FAILURE;
use gpr_testkit::ssh_job::{stage_hook, SshTarget};
use gpr_testkit::sshkeys::{ClientKey, KeyKind};

const BIN: &str = env!("CARGO_BIN_EXE_gitlab-proxmox-runner");

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
    let out = stage_hook(BIN, job.path(), &nowhere(), key, "build_script", "true\n").run();
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
