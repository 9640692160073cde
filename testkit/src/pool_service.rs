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
        let dir = tempfile::tempdir().expect("a directory for the pool's log");
        let log = dir.path().join("pool.err");
        let child = Command::new(&lab.bin)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(lab.settings())
            .env("PROXMOX_RUNNER_ID", format!("host-{id}"))
            .envs(env.iter().copied())
            .args(["pool", "--id", id, "--interval", "0.2"])
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
