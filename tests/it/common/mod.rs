//! A whole-job world for tests: the fake Proxmox cluster, a local sshd as the job's "VM", and a
//! TCP proxy as the network between the runner host and the VM (every SSH connection of the
//! driver goes through it, so a test can cut it).
//!
//! `GPR_BIN` replaces the binary under test (e.g. an older build, to measure it).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use gpr_testkit::hook::json_string;
use gpr_testkit::runner::RunnerJob;
use gpr_testkit::tcp_proxy::TcpProxy;
use gpr_testkit::{driver_binary, Lab};

/// The keepalive interval the lost-VM tests give the driver (`VM_SSH_KEEPALIVE_INTERVAL`):
/// short, so that a silent VM is given up on in seconds.
pub const SHORT_KEEPALIVE: (&str, &str) = ("VM_SSH_KEEPALIVE_INTERVAL", "1");
/// The silence after which the driver gives up on a VM with [`SHORT_KEEPALIVE`]: six
/// intervals without a byte from it.
pub const SHORT_SILENCE_BUDGET: Duration = Duration::from_secs(6);
/// What a loaded 2-core test machine may add to the silence budget before a stage has noticed
/// and said so (the bound at the default budget was 25 s for 18 s).
pub const DETECTION_SLACK: Duration = Duration::from_secs(7);

/// The fake cluster, the "VM" (local sshd) and the network between them (the proxy).
pub struct World {
    pub lab: Lab,
    pub proxy: TcpProxy,
    pub dir: tempfile::TempDir,
    settings_file: PathBuf,
}

impl World {
    #[track_caller]
    pub fn new(test: &str) -> Option<World> {
        World::with_settings(test, &[])
    }

    /// [`World::new`] with `extra` runner-host settings in the settings file.
    #[track_caller]
    pub fn with_settings(test: &str, extra: &[(&str, &str)]) -> Option<World> {
        let lab = Lab::builder(driver_binary!()).with_sshd_or_skip(test)?;
        let proxy = TcpProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, lab.sshd().port())));
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("empty-path")).expect("empty PATH dir");
        std::fs::create_dir(dir.path().join("builds")).expect("builds dir");
        let settings_file = dir.path().join("driver.toml");
        let mut text = String::new();
        for (name, mut value) in lab.settings() {
            match name.as_str() {
                // Every SSH connection to the "VM" goes through the proxy.
                "VM_SSH_PORT" => value = proxy.port().to_string(),
                "VM_BOOT_TIMEOUT" => value = "60".to_string(),
                _ => {}
            }
            text.push_str(&format!("{name} = {}\n", json_string(&value)));
        }
        for (name, value) in extra {
            text.push_str(&format!("{name} = {}\n", json_string(value)));
        }
        std::fs::write(&settings_file, text).expect("write driver.toml");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod driver.toml");
        Some(World {
            lab,
            proxy,
            dir,
            settings_file,
        })
    }

    pub fn job(&self) -> RunnerJob {
        self.lab
            .runner_job(&self.settings_file, self.dir.path())
            .hook_timeout(Duration::from_secs(300))
    }
}
pub mod warm;
