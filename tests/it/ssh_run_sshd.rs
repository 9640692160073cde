//! The `run` hook against a real OpenSSH sshd on loopback (see `gpr_testkit::sshd`).

use gpr_testkit::driver_binary;
use gpr_testkit::hook::{BUILD_FAILURE, SYSTEM_FAILURE};
use gpr_testkit::ssh_job::{spawn_until_first_line, stage_hook};
use gpr_testkit::sshd::Sshd;
use gpr_testkit::sshkeys::{ClientKey, KeyKind};

#[test]
fn each_key_type_authenticates_and_runs_the_stage() {
    let Some(sshd) = Sshd::start_or_skip("each_key_type_authenticates_and_runs_the_stage") else {
        return;
    };
    for (kind, pass) in [
        (KeyKind::Ed25519, None),
        (KeyKind::Rsa3072, None),
        (KeyKind::EcdsaP256, None),
        (KeyKind::Ed25519, Some("correct horse")),
        (KeyKind::RsaPkcs1, None),
        (KeyKind::RsaPkcs8, None),
        (KeyKind::EcdsaSec1, None),
        (KeyKind::RsaPkcs1, Some("legacy pem")),
        (KeyKind::RsaPkcs8, Some("pkcs8 pass")),
        (KeyKind::EcdsaSec1, Some("sec1 pass")),
    ] {
        let key = ClientKey::generate(kind, pass);
        sshd.authorize(&key);
        let job = tempfile::tempdir().unwrap();
        let out = stage_hook(
            driver_binary!(),
            job.path(),
            &sshd.root_target(),
            &key,
            "build_script",
            "#!/usr/bin/env bash\necho \"hello from $(id -un)\"\n",
        )
        .run();
        assert_eq!(
            out.code,
            0,
            "{kind:?} (passphrase: {}): {}\nsshd log: {}",
            pass.is_some(),
            out.log(),
            sshd.log()
        );
        assert_eq!(out.stdout, "hello from root\n", "{kind:?}");
    }
}

fn started(test: &str) -> Option<(Sshd, ClientKey)> {
    let sshd = Sshd::start_or_skip(test)?;
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    Some((sshd, key))
}

#[test]
fn exit_codes_and_signals_reach_the_runner() {
    let Some((sshd, key)) = started("exit_codes_and_signals_reach_the_runner") else {
        return;
    };
    let job = tempfile::tempdir().unwrap();
    let run = |body: &str| {
        stage_hook(
            driver_binary!(),
            job.path(),
            &sshd.root_target(),
            &key,
            "step_x",
            body,
        )
        .run()
    };

    run("exit 0\n").assert_exit(0);
    assert!(!job.path().join("build_exit_code").exists());

    let out = run("echo before; exit 3\n");
    out.assert_exit(BUILD_FAILURE);
    assert_eq!(out.stdout, "before\n");
    assert!(out.stderr.contains("status 3"), "{}", out.stderr);
    let recorded = std::fs::read_to_string(job.path().join("build_exit_code")).unwrap();
    assert_eq!(recorded.trim(), "3");

    let out = run("kill -KILL $$\n");
    out.assert_exit(BUILD_FAILURE);
    assert!(out.stderr.contains("SIGKILL"), "{}", out.stderr);
}

#[test]
fn a_foreign_host_key_is_refused_naming_both_fingerprints() {
    let Some((sshd, key)) = started("a_foreign_host_key_is_refused_naming_both_fingerprints")
    else {
        return;
    };
    let job = tempfile::tempdir().unwrap();
    let impostor = gpr_testkit::sshkeys::HostKey::ed25519().public_line;
    let mut wrong = sshd.root_target();
    wrong.host_keys = vec![impostor.clone()];
    let marker = job.path().join("must-not-run");
    let body = format!("touch '{}'\n", marker.display());
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &wrong,
        &key,
        "build_script",
        &body,
    )
    .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        !marker.exists(),
        "the script ran despite the host key mismatch"
    );
    let fingerprint = gitlab_proxmox_runner::ssh::fingerprint_of_line;
    let presented = fingerprint(&sshd.host_key_lines()[0]).unwrap();
    let pinned = fingerprint(&impostor).unwrap();
    assert!(out.stderr.contains("HOST KEY MISMATCH"), "{}", out.stderr);
    assert!(out.stderr.contains(&presented), "{}", out.stderr);
    assert!(out.stderr.contains(&pinned), "{}", out.stderr);
    assert!(out.stderr.contains("VM 2000123"), "{}", out.stderr);
}

#[test]
fn large_output_arrives_intact_and_separated() {
    use sha2::{Digest, Sha256};
    let Some((sshd, key)) = started("large_output_arrives_intact_and_separated") else {
        return;
    };
    let job = tempfile::tempdir().unwrap();
    // 50 MB of varied bytes on stdout (no newlines for long stretches), 2000 lines on stderr,
    // interleaved.
    let body = "for i in $(seq 1 2000); do echo \"err line $i\" >&2; \
                head -c 25000 /dev/zero | tr '\\0' \"$(printf \\\\$(printf %o $((65 + i % 26))))\"; \
                done\n";
    let output = stage_hook(
        driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &key,
        "build_script",
        body,
    )
    .command()
    .output()
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut expected = Vec::with_capacity(50_000_000);
    for i in 1..=2000u32 {
        let byte = b'A' + ((65 + i % 26 - 65) % 26) as u8;
        expected.extend(std::iter::repeat_n(byte, 25_000));
    }
    assert_eq!(output.stdout.len(), expected.len());
    assert_eq!(
        Sha256::digest(&output.stdout),
        Sha256::digest(&expected),
        "stdout was corrupted"
    );
    let expected_err: String = (1..=2000).map(|i| format!("err line {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&output.stderr), expected_err);
}

#[test]
fn a_sudo_that_wants_a_password_fails_fast_and_says_so() {
    if gpr_testkit::sshd::unavailable_reason().is_some() {
        gpr_testkit::sshd::skip(
            "a_sudo_that_wants_a_password_fails_fast_and_says_so",
            &gpr_testkit::sshd::unavailable_reason().unwrap(),
        );
        return;
    }
    let fake = tempfile::tempdir().unwrap();
    let sudo = fake.path().join("sudo");
    std::fs::write(
        &sudo,
        "#!/bin/sh\n# behaves like `sudo -n` for a user without NOPASSWD\n\
         echo 'sudo: a password is required' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&sudo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sshd = Sshd::builder()
        .session_env("PATH", format!("{}:/usr/bin:/bin", fake.path().display()))
        .start();
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    let job = tempfile::tempdir().unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &key,
        "build_script",
        "echo hi\n",
    )
    .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(
        out.stderr.contains("sudo wants a password"),
        "{}",
        out.stderr
    );
    assert!(!job.path().join("build_exit_code").exists());
}

#[test]
fn losing_the_vm_mid_stage_is_a_system_failure() {
    let Some((mut sshd, key)) = started("losing_the_vm_mid_stage_is_a_system_failure") else {
        return;
    };
    let job = tempfile::tempdir().unwrap();
    let (child, _stdout, line) = spawn_until_first_line(&stage_hook(
        driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &key,
        "build_script",
        "echo started\nexec sleep 120\n",
    ));
    assert_eq!(line, "started\n");
    sshd.crash();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(SYSTEM_FAILURE), "{stderr}");
    assert!(stderr.contains("lost mid-stage"), "{stderr}");
}

#[test]
fn a_key_file_path_works_too() {
    let Some((sshd, key)) = started("a_key_file_path_works_too") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id_ed25519");
    std::fs::write(&path, &key.private_text).unwrap();
    let by_path = ClientKey {
        private_text: path.display().to_string(),
        ..key.clone()
    };
    let job = tempfile::tempdir().unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &sshd.root_target(),
        &by_path,
        "build_script",
        "echo ok\n",
    )
    .run();
    out.assert_exit(0);
    assert_eq!(out.stdout, "ok\n");
}

/// Files under `root` modified since `since` (skipping huge ones and unreadable ones).
fn files_changed_since(
    root: &std::path::Path,
    since: std::time::SystemTime,
    out: &mut Vec<std::path::PathBuf>,
) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let path = entry.path();
        if meta.is_dir() {
            // Build outputs are large and written by other builds; no key can be in them
            // unless a file there is new, and those are checked by mtime below anyway.
            files_changed_since(&path, since, out);
        } else if meta.is_file()
            && meta.len() < 64 * 1024 * 1024
            && meta.modified().is_ok_and(|modified| modified >= since)
        {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[test]
fn the_key_never_reaches_disk_or_the_process_environment() {
    let Some(sshd) = Sshd::start_or_skip("the_key_never_reaches_disk_or_the_process_environment")
    else {
        return;
    };
    let key = ClientKey::generate(KeyKind::Ed25519, Some("pass-phrase-for-scan-test"));
    sshd.authorize(&key);
    let fragments = key.secret_fragments();
    let raw = key.raw_secret_bytes();
    assert!(!fragments.is_empty() && raw.len() == 32);

    let job = tempfile::tempdir().unwrap();
    let gate = tempfile::tempdir().unwrap();
    let proceed = gate.path().join("proceed");
    let since = std::time::SystemTime::now();
    let body = format!(
        "echo ready\nwhile [ ! -e '{}' ]; do sleep 0.05; done\necho done\n",
        proceed.display()
    );
    let (mut child, _stdout, line) = spawn_until_first_line(
        &stage_hook(
            driver_binary!(),
            job.path(),
            &sshd.root_target(),
            &key,
            "build_script",
            &body,
        )
        .runner_env("VM_SSH_PRIVATE_KEY", key.private_text.clone()),
    );
    assert_eq!(line, "ready\n");

    // While the stage runs: the environment block holds neither the key nor the passphrase
    // (both forms: plain and CUSTOM_ENV_), and core dumps are off.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    assert!(
        contains(&environ, b"VM_SSH_PRIVATE_KEY="),
        "the test did not set the key"
    );
    for fragment in &fragments {
        assert!(
            !contains(&environ, fragment.as_bytes()),
            "key text in /proc/PID/environ"
        );
    }
    assert!(
        !contains(&environ, b"pass-phrase-for-scan-test"),
        "passphrase in environ"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");

    std::fs::write(&proceed, "").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let mut changed = Vec::new();
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    for root in [
        Some(job.path().to_path_buf()),
        home,
        Some("/tmp".into()),
        Some("/dev/shm".into()),
    ]
    .into_iter()
    .flatten()
    {
        files_changed_since(&root, since, &mut changed);
    }
    assert!(
        changed.iter().any(|p| p.starts_with(job.path())),
        "the scan saw none of the job's own files: {changed:?}"
    );
    for path in changed {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for fragment in &fragments {
            assert!(
                !contains(&bytes, fragment.as_bytes()),
                "key text found in {}",
                path.display()
            );
        }
        assert!(
            !contains(&bytes, &raw),
            "raw key bytes found in {}",
            path.display()
        );
    }
}
