//! Per-stage wall time of the `run` hook against a local sshd (median of 20), next to the
//! OpenSSH client doing the same with `scp` + `ssh`. A measurement, not a test: run with
//! `cargo test --release --test ssh_bench -- --ignored --nocapture`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpr_testkit::driver_binary;
use gpr_testkit::ssh_job::stage_hook;
use gpr_testkit::sshd::Sshd;
use gpr_testkit::sshkeys::ClientKey;

const RUNS: usize = 20;
const SCRIPT: &str = "#!/usr/bin/env bash\necho \"stage on $(hostname)\"\n";

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
#[ignore = "a measurement; run explicitly"]
fn per_stage_wall_time_against_local_sshd() {
    let Some(sshd) = Sshd::start_or_skip("per_stage_wall_time_against_local_sshd") else {
        return;
    };
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    let target = sshd.root_target();
    let job = tempfile::tempdir().unwrap();
    let mut ours = Vec::new();
    for _ in 0..RUNS {
        let hook = stage_hook(
            driver_binary!(),
            job.path(),
            &target,
            &key,
            "build_script",
            SCRIPT,
        );
        let started = Instant::now();
        let out = hook.run();
        ours.push(started.elapsed());
        out.assert_exit(0);
    }
    let ours = median(ours);
    println!("run hook per stage (median of {RUNS}): {ours:?}");

    if std::path::Path::new("/usr/bin/ssh").exists() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("id");
        std::fs::write(&key_path, &key.private_text).unwrap();
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let known = dir.path().join("known_hosts");
        let lines: String = sshd
            .host_key_lines()
            .iter()
            .map(|line| format!("[127.0.0.1]:{} {line}\n", sshd.port()))
            .collect();
        std::fs::write(&known, lines).unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, SCRIPT).unwrap();
        let common = |program: &str| {
            let mut command = Command::new(program);
            command
                .arg("-i")
                .arg(&key_path)
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", known.display()))
                .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
                .stdout(Stdio::null());
            command
        };
        let mut openssh = Vec::new();
        for _ in 0..RUNS {
            let started = Instant::now();
            let scp = common("/usr/bin/scp")
                .args(["-P", &sshd.port().to_string()])
                .arg(&script)
                .arg("root@127.0.0.1:/tmp/gpr-bench-script")
                .status()
                .unwrap();
            let ssh = common("/usr/bin/ssh")
                .args(["-p", &sshd.port().to_string(), "root@127.0.0.1"])
                .arg("sudo -n /bin/bash /tmp/gpr-bench-script")
                .status()
                .unwrap();
            openssh.push(started.elapsed());
            assert!(scp.success() && ssh.success());
        }
        let openssh = median(openssh);
        println!("scp + ssh per stage (median of {RUNS}): {openssh:?}");
        println!(
            "run hook / (scp + ssh): {:.0} %",
            ours.as_secs_f64() / openssh.as_secs_f64() * 100.0
        );
    }
}
