//! Proxmox VE API client: [`client`] (HTTP, auth, retries, tasks), [`tls`] (how the API's
//! certificate is trusted), [`error`] (PVE's error wording, transient vs permanent),
//! [`types`] (answer shapes), [`address`] (which guest address is the VM's).

pub mod address;
pub mod client;
pub mod error;
pub mod presence;
pub mod tls;
pub mod types;

pub use client::{Client, CloneRequest, Retry};
pub use error::{ApiError, ApiErrorKind};
pub use presence::Presence;
pub use types::{TaskOutcome, Upid, VmConfig, VmRef, VmStatus};
