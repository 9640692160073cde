//! The SSH client against the in-process russh server (`gpr_testkit::ssh_server`): fast, and
//! independent of OpenSSH being installed. Both the real `run` hook and the library API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{DETECTION_SLACK, SHORT_KEEPALIVE, SHORT_SILENCE_BUDGET};
use gitlab_proxmox_runner::cancel::Cancel;
use gitlab_proxmox_runner::ssh::{self, Connection, HostKeyCheck, PrivateKey, Target};
use gpr_testkit::driver_binary;
use gpr_testkit::hook::{BUILD_FAILURE, SYSTEM_FAILURE};
use gpr_testkit::ssh_job::{spawn_until_first_line, stage_hook};
use gpr_testkit::ssh_server::TestSshServer;
use gpr_testkit::sshkeys::{ClientKey, KeyKind};

fn server_with_key() -> (TestSshServer, ClientKey) {
    let server = TestSshServer::start();
    let key = ClientKey::ed25519();
    server.authorize(&key);
    (server, key)
}

#[test]
fn exit_status_and_eof_in_either_order() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    for status_first in [false, true] {
        server.status_before_eof(status_first);
        let run = |body: &str| {
            stage_hook(
                driver_binary!(),
                job.path(),
                &server.target(),
                &key,
                "build_script",
                body,
            )
            .run()
        };
        let out = run("printf 'out'; printf 'err' >&2\n");
        out.assert_exit(0);
        assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("out", "err"));
        run("exit 3\n").assert_exit(BUILD_FAILURE);
        let code = std::fs::read_to_string(job.path().join("build_exit_code")).unwrap();
        assert_eq!(code.trim(), "3");
        let out = run("kill -TERM $$\n");
        out.assert_exit(BUILD_FAILURE);
        assert!(out.stderr.contains("SIGTERM"), "{}", out.stderr);
    }
}

#[test]
fn any_stage_name_is_data() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    let canary = job.path().join("canary");
    for stage in [
        format!("'; touch {} #", canary.display()),
        format!("$(touch {})", canary.display()),
        "../../../../etc/passwd".to_string(),
        "-n --help".to_string(),
        "step_ release ünïcode".to_string(),
        String::new(),
    ] {
        // The script reports where it runs from and its own mode.
        let body = "echo \"$(stat -c %a \"$0\") $(stat -c %a \"$(dirname \"$0\")\")\"\n";
        let out = stage_hook(
            driver_binary!(),
            job.path(),
            &server.target(),
            &key,
            &stage,
            body,
        )
        .run();
        out.assert_exit(0);
        assert_eq!(out.stdout, "700 700\n", "stage {stage:?}");
    }
    assert!(!canary.exists(), "a stage name was executed");
    // The scripts ran from the private per-job directory and were removed afterwards.
    let dir = server.home().join(".gitlab-proxmox-runner/job-4242");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_dropped_connection_mid_stage_is_a_system_failure() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    let (child, _stdout, line) = spawn_until_first_line(&stage_hook(
        driver_binary!(),
        job.path(),
        &server.target(),
        &key,
        "build_script",
        "echo started\nsleep 30\n",
    ));
    assert_eq!(line, "started\n");
    server.drop_connections();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(SYSTEM_FAILURE), "{stderr}");
    assert!(stderr.contains("lost mid-stage"), "{stderr}");
}

/// A VM whose connection stays open but goes silent (a hung guest) is noticed by keepalives
/// within the silence budget the runner host's keepalive interval sets.
#[test]
fn keepalives_notice_a_hung_vm_within_the_silence_budget() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    let (mut child, _stdout, line) = spawn_until_first_line(
        &stage_hook(
            driver_binary!(),
            job.path(),
            &server.target(),
            &key,
            "build_script",
            "echo started\nsleep 75\n",
        )
        .host_env(SHORT_KEEPALIVE.0, SHORT_KEEPALIVE.1),
    );
    assert_eq!(line, "started\n");
    server.freeze();
    let bound = SHORT_SILENCE_BUDGET + DETECTION_SLACK;
    let ended = gpr_testkit::poll(bound, Duration::from_millis(100), || {
        child.try_wait().unwrap()
    });
    if ended.is_none() {
        let _ = child.kill();
        panic!("a silent VM went unnoticed for {bound:?}");
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(SYSTEM_FAILURE), "{stderr}");
    assert!(stderr.contains("lost mid-stage"), "{stderr}");
}

#[test]
fn rsa_keys_sign_with_sha2_never_sha1() {
    if !gpr_testkit::sshkeys::ssh_keygen_available() {
        eprintln!("*** SKIPPED: rsa_keys_sign_with_sha2_never_sha1 needs ssh-keygen for RSA ***");
        return;
    }
    let server = TestSshServer::start();
    let key = ClientKey::generate(KeyKind::Rsa3072, None);
    server.authorize(&key);
    let job = tempfile::tempdir().unwrap();
    stage_hook(
        driver_binary!(),
        job.path(),
        &server.target(),
        &key,
        "build_script",
        "true\n",
    )
    .run()
    .assert_exit(0);
    let algorithms = server.auth_algorithms();
    assert!(!algorithms.is_empty());
    for algorithm in algorithms {
        assert!(
            algorithm.starts_with("rsa-sha2-"),
            "RSA signed with {algorithm}"
        );
    }
}

fn target_of(server: &TestSshServer) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port: server.port(),
        user: "tester".into(),
        vm_label: "VM 2000123 on pve-test".into(),
    }
}

fn key_of(key: &ClientKey) -> Arc<PrivateKey> {
    Arc::new(PrivateKey::from_text(&key.private_text, None).unwrap())
}

#[tokio::test]
async fn first_use_reports_the_host_key_and_pinning_refuses_another() {
    let (server, key) = server_with_key();
    let connection =
        Connection::connect(&target_of(&server), key_of(&key), &HostKeyCheck::FirstUse)
            .await
            .unwrap();
    let seen = connection.host_key();
    assert_eq!(
        ssh::fingerprint_of_line(&seen),
        ssh::fingerprint_of_line(&server.host_key_lines()[0])
    );
    connection.close().await;
    let pinned = HostKeyCheck::Pinned(vec![gpr_testkit::sshkeys::HostKey::ed25519().public_line]);
    let err = Connection::connect(&target_of(&server), key_of(&key), &pinned)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("HOST KEY MISMATCH"), "{err}");
}

#[tokio::test]
async fn unauthorized_keys_are_refused_clearly() {
    let server = TestSshServer::start();
    let stranger = ClientKey::ed25519();
    let check = HostKeyCheck::Pinned(server.host_key_lines());
    let err = Connection::connect(&target_of(&server), key_of(&stranger), &check)
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(text.contains("refused"), "{text}");
    assert!(text.contains("authorized_keys"), "{text}");
    assert_eq!(err.blame(), gitlab_proxmox_runner::Blame::Infrastructure);
}

#[tokio::test]
async fn wait_until_ready_retries_a_booting_vm_quietly() {
    let (server, key) = server_with_key();
    server.refuse_first(3);
    let check = HostKeyCheck::Pinned(server.host_key_lines());
    let deadline = Instant::now() + Duration::from_secs(60);
    let connection = ssh::wait_until_ready(
        &target_of(&server),
        key_of(&key),
        &check,
        deadline,
        &Cancel::never(),
    )
    .await
    .unwrap();
    assert!(server.connections() >= 4, "{}", server.connections());
    let out = connection.exec_capture("echo ready").await.unwrap();
    assert_eq!(out.stdout, b"ready\n");
    assert_eq!(out.status, Some(0));
}

#[tokio::test]
async fn wait_until_ready_gives_up_at_the_deadline_and_on_cancel() {
    let (server, key) = server_with_key();
    server.refuse_first(usize::MAX / 2);
    let check = HostKeyCheck::Pinned(server.host_key_lines());
    let deadline = Instant::now() + Duration::from_secs(2);
    let err = ssh::wait_until_ready(
        &target_of(&server),
        key_of(&key),
        &check,
        deadline,
        &Cancel::never(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("gave up"), "{err}");

    let (trigger, cancel) = Cancel::new();
    let far = Instant::now() + Duration::from_secs(600);
    let target = target_of(&server);
    let waiting = ssh::wait_until_ready(&target, key_of(&key), &check, far, &cancel);
    trigger.cancel("SIGTERM");
    let err = waiting.await.err().unwrap();
    assert!(
        matches!(err, gitlab_proxmox_runner::Error::Cancelled(_)),
        "{err}"
    );
}

#[tokio::test]
async fn uploads_arrive_intact_with_their_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (server, key) = server_with_key();
    let check = HostKeyCheck::Pinned(server.host_key_lines());
    let connection = Connection::connect(&target_of(&server), key_of(&key), &check)
        .await
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let path = server.home().join("upload.bin");
    let remote = path.to_string_lossy().into_owned();
    connection.upload(&remote, &data, 0o640).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // Overwriting an existing file sets the new mode too.
    connection.upload(&remote, b"small", 0o755).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"small");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

#[tokio::test]
async fn the_runner_helper_is_installed_executable() {
    use std::os::unix::fs::PermissionsExt;
    let (server, key) = server_with_key();
    let check = HostKeyCheck::Pinned(server.host_key_lines());
    let connection = Connection::connect(&target_of(&server), key_of(&key), &check)
        .await
        .unwrap();
    let host = tempfile::tempdir().unwrap();
    let helper = host.path().join("gitlab-runner");
    std::fs::write(&helper, "#!/bin/sh\necho 'Version: 17.0.0-test'\n").unwrap();
    let installed = server.home().join("bin-gitlab-runner");
    ssh::install_runner_helper(&connection, &helper, &installed.to_string_lossy())
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let out = connection
        .exec_capture(&format!("'{}' --version", installed.display()))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"Version: 17.0.0-test\n");
    // The staged upload is gone.
    assert!(!server
        .home()
        .join(".gitlab-proxmox-runner/gitlab-runner.upload")
        .exists());
}

#[test]
fn a_stage_retries_a_connection_the_vm_refused_at_first() {
    let (server, key) = server_with_key();
    server.refuse_first(2);
    let job = tempfile::tempdir().unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &server.target(),
        &key,
        "build_script",
        "echo made-it\n",
    )
    .run();
    out.assert_exit(0);
    assert!(out.stdout.contains("made-it"), "{}", out.log());
    assert!(server.connections() >= 3, "{}", server.connections());
}

/// The stage's shell starts beside the upload and waits for the go line: the script it runs is
/// the whole script (several SFTP writes long), and its stdin is empty, not a pipe that never
/// ends.
#[test]
fn a_stage_runs_its_whole_script_with_an_empty_stdin() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    let padding = format!("# {}\n", "x".repeat(1000)).repeat(300);
    let body = format!(
        "{padding}if IFS= read -r line; then echo \"stdin: $line\"; else echo 'stdin empty'; fi\n\
         wc -c < \"$0\"\n"
    );
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &server.target(),
        &key,
        "build_script",
        &body,
    )
    .run();
    out.assert_exit(0);
    assert_eq!(out.stdout, format!("stdin empty\n{}\n", body.len()));
}

/// A stage whose upload fails never runs: its shell, already started, sees EOF instead of the
/// go line.
#[test]
fn a_failed_upload_runs_nothing() {
    let (server, key) = server_with_key();
    let job = tempfile::tempdir().unwrap();
    let canary = job.path().join("canary");
    std::fs::create_dir_all(server.home().join(".gitlab-proxmox-runner")).unwrap();
    // A file where the job's directory belongs.
    std::fs::write(server.home().join(".gitlab-proxmox-runner/job-4242"), "").unwrap();
    let out = stage_hook(
        driver_binary!(),
        job.path(),
        &server.target(),
        &key,
        "build_script",
        &format!("touch {}\n", canary.display()),
    )
    .run();
    out.assert_exit(SYSTEM_FAILURE);
    assert!(out.stderr.contains("not a directory"), "{}", out.stderr);
    assert!(!canary.exists(), "the script ran");
}
