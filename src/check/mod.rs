//! The preflight's concerns, one module each; [`crate::commands::check`] runs them in order.
//!
//! - [`report`]: a finding (✔/✘, required or advisory, the fix) and how the findings print;
//! - [`tls`]: a verifier that records the API's certificate, so that an untrusted one can be
//!   named (fingerprint, subject) for pinning;
//! - [`nodes`]: with `PROXMOX_NODES`, each node prepare may place jobs on and its status;
//! - [`privileges`]: the privileges the driver needs on each path, and the token's effective
//!   ones (`GET /access/permissions`);
//! - [`templates`]: whether a template can be cloned the way the settings ask (agent, net0,
//!   storage able to make linked clones);
//! - [`smoke`]: one throwaway VM end to end through the engine;
//! - [`fleet`]: whether the fleet key that proves warm VMs ours is set where it is needed.

pub mod fleet;
pub mod nodes;
pub mod privileges;
pub mod report;
pub mod smoke;
pub mod templates;
pub mod tls;

pub use report::{Finding, Report, Status};
