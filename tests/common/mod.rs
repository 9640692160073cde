//! A whole-job world for tests: the fake Proxmox cluster, a local sshd as the job's "VM", and a
//! TCP proxy as the network between the runner host and the VM (every SSH connection of the
//! driver goes through it, so a test can cut it).
//!
//! `GPR_BIN` replaces the binary under test (e.g. an older build, to measure it).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use gpr_testkit::fake_proxmox::{FakeConfig, FakeProxmox};
use gpr_testkit::hook::json_string;
use gpr_testkit::runner::RunnerJob;
use gpr_testkit::sshd::Sshd;
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::tcp_proxy::TcpProxy;

pub fn binary() -> PathBuf {
    std::env::var_os("GPR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gitlab-proxmox-runner")))
}

/// The fake cluster, the "VM" (local sshd) and the network between them (the proxy).
pub struct World {
    pub fake: FakeProxmox,
    pub sshd: Sshd,
    pub proxy: TcpProxy,
    pub dir: tempfile::TempDir,
    settings_file: PathBuf,
}

impl World {
    #[track_caller]
    pub fn new(test: &str) -> Option<World> {
        let sshd = Sshd::start_or_skip(test)?;
        let key = ClientKey::ed25519();
        sshd.authorize(&key);
        let host_key = sshd
            .host_key_lines()
            .into_iter()
            .find(|line| line.starts_with("ssh-ed25519 "))
            .expect("the test sshd has an ed25519 host key");
        let fake = FakeProxmox::start(FakeConfig::default());
        fake.set_guest_file("/etc/ssh/ssh_host_ed25519_key.pub", &host_key);
        let proxy = TcpProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, sshd.port())));
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("empty-path")).expect("empty PATH dir");
        std::fs::create_dir(dir.path().join("builds")).expect("builds dir");
        let settings_file = dir.path().join("driver.toml");
        let mut settings = fake.settings_env();
        settings.extend([
            ("VM_SSH_USER".to_string(), "root".to_string()),
            // Every SSH connection to the "VM" goes through the proxy.
            ("VM_SSH_PORT".to_string(), proxy.port().to_string()),
            ("VM_SSH_PRIVATE_KEY".to_string(), key.private_text.clone()),
            ("VM_BOOT_TIMEOUT".to_string(), "60".to_string()),
            ("VM_NETWORK_CIDRS".to_string(), "127.0.0.0/8".to_string()),
        ]);
        let mut text = String::new();
        for (name, value) in settings {
            text.push_str(&format!("{name} = {}\n", json_string(&value)));
        }
        std::fs::write(&settings_file, text).expect("write driver.toml");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod driver.toml");
        Some(World {
            fake,
            sshd,
            proxy,
            dir,
            settings_file,
        })
    }

    pub fn job(&self) -> RunnerJob {
        let config = self.settings_file.to_str().expect("utf-8 path");
        let builds = tempfile::tempdir_in(self.dir.path().join("builds"))
            .expect("builds dir")
            .keep();
        RunnerJob::new(binary())
            .hook_args(
                &["--config", config, "config"],
                &["--config", config, "prepare"],
                &["--config", config, "run"],
                &["--config", config, "cleanup"],
            )
            .path_env(self.dir.path().join("empty-path"))
            .builds_dir_override(builds.to_string_lossy().into_owned())
            .temp_root(self.dir.path())
            .retry_interval(Duration::ZERO)
            .hook_timeout(Duration::from_secs(300))
            .graceful_kill_timeout(Duration::from_secs(30))
    }
}
