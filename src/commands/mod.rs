//! One thin module per hook; the engine ([`crate::vm`]) does the work, [`crate::app`] builds
//! the context each gets.

pub mod check;
pub mod cleanup;
pub mod config;
pub mod gc;
pub mod pool;
pub mod prepare;
pub mod run;

pub use crate::fleet::FleetContext;

use std::path::PathBuf;

use crate::cancel::Cancel;
use crate::config::Settings;
use crate::job::JobInfo;

/// What every job hook gets.
pub struct Context {
    pub settings: Settings,
    pub job: JobInfo,
    /// The per-job directory (`$TMPDIR`) where the job state lives.
    pub job_dir: PathBuf,
    pub cancel: Cancel,
}
