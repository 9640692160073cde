//! Test doubles for gitlab-proxmox-runner, shared by the integration tests, the benchmarks and
//! the demo: run a hook like gitlab-runner does ([`hook`]), run whole jobs like gitlab-runner
//! does ([`runner`]), fake a Proxmox VE cluster over HTTPS ([`fake_proxmox`]), and set up all
//! of it (fake, sshd, key → hooks) in one step ([`lab`], with [`driver_binary!`]).

pub mod checked;
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
pub mod wait;

pub use lab::{Lab, LabBuilder};

pub use fake_proxmox::{
    ApiCapacity, FakeConfig, FakeProxmox, Fault, GuestEvent, GuestIdentities, GuestIdentity, NewVm,
    NodeLoad, RecordedRequest, Template, VmSnapshot,
};

pub use wait::{poll, poll_async, wait_for, wait_for_every};

/// A loopback port nothing listens on (the kernel's next ephemeral one, its listener dropped):
/// for a server the testkit starts, or for a connection that must be refused.
pub fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}
