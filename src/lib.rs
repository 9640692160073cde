//! gitlab-proxmox-runner: a GitLab Runner custom executor driver that gives every CI job a
//! fresh Proxmox VE virtual machine and runs the job's stage scripts in it over SSH.
//!
//! One module per concern: [`config`] (where configuration comes from and whom to trust),
//! [`proxmox`] (the API client), [`ssh`] (the in-process SSH client), [`vm`] (the engine that
//! provisions, readies and destroys VMs, knowing nothing of hooks), [`state`] (what prepare
//! leaves for the later hooks), [`commands`] (one thin module per hook), [`app`] (runtime,
//! cancellation, the context each command family gets, errors to exit codes), [`metrics`] (what
//! the fleet commands show Prometheus) and [`error`].

pub mod app;
pub mod cancel;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod fleet;
pub mod fleet_key;
pub mod hardening;
pub mod job;
pub mod joblog;
pub mod marker;
pub mod metrics;
pub mod poll;
pub mod pool;
pub mod proxmox;
pub mod secret;
pub mod ssh;
pub mod state;
pub mod vm;

/// [`config`] under its former name. Nothing in this workspace uses it any more; it stays
/// only while branches written against it are merged, then goes.
pub use config as settings;
pub use error::{Blame, Error, ExitCodes, Result};

pub const DRIVER_NAME: &str = "gitlab-proxmox-runner";
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The tag every VM this driver creates carries.
pub const VM_TAG: &str = "gitlab-proxmox-runner";
