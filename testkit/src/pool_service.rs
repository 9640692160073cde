//! `gitlab-proxmox-runner pool` as its systemd unit runs it (the host's settings, no job), for
//! the warm-pool tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::Lab;

/// A running pool service; dropping it kills it.
pub struct PoolService {
    pub child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PoolService {
    /// `pool --id <id> --interval 0.2` with the lab's settings and `PROXMOX_RUNNER_ID=host-<id>`,
    /// then `env` (which wins: `WARM_POOL`, `PROXMOX_NODES`, ...).
    pub fn start(lab: &Lab, id: &str, env: &[(&str, &str)]) -> PoolService {
        PoolService::start_with_args(lab, id, env, &[])
    }

    /// A pool service keeping `size` warm VMs of `template` (`WARM_POOL=<template>=<size>`),
    /// then `extra` settings.
    pub fn keeping(
        lab: &Lab,
        id: &str,
        template: &str,
        size: u32,
        extra: &[(&str, &str)],
    ) -> PoolService {
        let pool = format!("{template}={size}");
        let mut env = vec![("WARM_POOL", pool.as_str())];
        env.extend_from_slice(extra);
        PoolService::start(lab, id, &env)
    }

    /// [`PoolService::start`] with more arguments (`--metrics-listen 127.0.0.1:0`, ...).
    pub fn start_with_args(
        lab: &Lab,
        id: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> PoolService {
        let dir = tempfile::tempdir().expect("a directory for the pool's log");
        let log = dir.path().join("pool.err");
        let child = Command::new(&lab.bin)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(lab.settings())
            .envs([crate::fleet::settings_env()])
            .env("PROXMOX_RUNNER_ID", format!("host-{id}"))
            .envs(env.iter().copied())
            .args(["pool", "--id", id, "--interval", "0.2"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the pool's log file"))
            .spawn()
            .expect("start the pool service");
        PoolService {
            child,
            log,
            _dir: dir,
        }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where its metrics are served (`--metrics-listen`), as its log names it once it listens.
    #[track_caller]
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        crate::wait_for(
            "the pool service to serve its metrics",
            std::time::Duration::from_secs(30),
            || {
                let log = self.log();
                let (_, rest) = log.split_once("serving metrics at http://")?;
                rest.split_once("/metrics")?.0.parse().ok()
            },
        )
    }

    /// SIGTERM, and its exit code and log.
    pub fn stop(mut self) -> (i32, String) {
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the pool service");
        (status.code().unwrap_or(-1), self.log())
    }
}

impl Drop for PoolService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gc --max-age 0s` (with `env`) until the fake holds no job VM: what a test does last, so
/// that nothing a pool or a job made outlives it.
#[track_caller]
pub fn gc_until_empty(lab: &Lab, env: &[(&str, &str)]) {
    crate::wait_for(
        "gc to leave no VM behind",
        std::time::Duration::from_secs(60),
        || {
            let out = lab
                .fleet_command()
                .envs(env.iter().copied())
                .args(["gc", "--max-age", "0s"])
                .output()
                .expect("run gc");
            assert!(
                out.status.success() || lab.fake.job_vms().is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            lab.fake.job_vms().is_empty().then_some(())
        },
    );
}
