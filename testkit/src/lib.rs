//! Test doubles for gitlab-proxmox-runner, shared by the integration tests, the benchmarks and
//! the demo: run a hook like gitlab-runner does ([`hook`]), run whole jobs like gitlab-runner
//! does ([`runner`]), fake a Proxmox VE cluster over HTTPS ([`fake_proxmox`]), and set up all
//! of it (fake, sshd, key → hooks) in one step ([`lab`], with [`driver_binary!`]).

pub mod fake_proxmox;
pub mod fleet;
pub mod hook;
pub mod lab;
pub mod pool_service;
pub mod prometheus;
pub mod runner;
pub mod ssh_job;
pub mod ssh_server;
pub mod sshd;
pub mod sshkeys;
pub mod tcp_proxy;
pub mod vm_sshds;

pub use lab::{Lab, LabBuilder};

pub use fake_proxmox::{
    ApiCapacity, FakeConfig, FakeProxmox, Fault, GuestEvent, GuestIdentities, GuestIdentity, NewVm,
    NodeLoad, RecordedRequest, Template, VmSnapshot,
};

/// Polls `condition` every 50 ms until it gives a value; panics naming `what` after `limit`.
#[track_caller]
pub fn wait_for<T>(
    what: &str,
    limit: std::time::Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
