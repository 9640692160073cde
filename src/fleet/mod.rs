//! The fleet commands' work, outside any job: the orphan sweep (gc's, also run by the pool
//! service), the warm-pool service and its status. They sit above the engine ([`crate::vm`])
//! and the warm-pool library ([`crate::pool`]); nothing below imports them.

pub mod pool_service;
pub mod pool_status;
pub mod sweep;

use crate::cancel::Cancel;
use crate::config::Settings;

/// What a fleet command gets: no job, no job directory.
pub struct FleetContext {
    pub settings: Settings,
    pub cancel: Cancel,
}
