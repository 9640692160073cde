//! The preflight's concerns, one module each; [`crate::commands::check`] runs them in order.
//!
//! Each returns its findings; none prints.
//!
//! - [`report`]: a finding (✔/✘, required or advisory, the fix) and how the findings print;
//! - [`settings`]: the settings as read, the advisories about what they allow, and the modes
//!   of the files holding secrets;
//! - [`api`]: the API reachable, its certificate trusted, the token taken; [`tls`] records the
//!   certificate it presented, so that an untrusted one can be named for pinning;
//! - [`nodes`]: `PROXMOX_NODE`'s status, or with `PROXMOX_NODES` each node prepare may place
//!   jobs on;
//! - [`templates`]: whether a template can be cloned the way the settings ask (agent, net0,
//!   storage able to make linked clones), on `PROXMOX_NODE`; [`copies`]: the same for each
//!   node's copy with `PROXMOX_NODES`, and which copy placement uses;
//! - [`privileges`]: the privileges the driver needs on each path, and the token's effective
//!   ones (`GET /access/permissions`);
//! - [`vmids`]: whether the VMID range holds guests that are not the driver's;
//! - [`host`]: the SSH key and the runner helper this host supplies;
//! - [`fleet`]: whether the fleet key that proves warm VMs ours is set where it is needed;
//! - [`smoke`]: one throwaway VM end to end through the engine; [`smoke_outcome`]: its lines.

pub mod api;
pub mod copies;
pub mod fleet;
pub mod host;
pub mod nodes;
pub mod privileges;
pub mod report;
pub mod settings;
pub mod smoke;
pub mod smoke_outcome;
pub mod templates;
pub mod tls;
pub mod vmids;

pub use report::{Finding, Report, Status};

#[cfg(test)]
pub(crate) use crate::config::test_settings;
