//! One thin module per hook; the engine ([`crate::vm`]) does the work, [`crate::app`] builds
//! the context each gets.

pub mod check;
pub mod cleanup;
pub mod config;
pub mod gc;
pub mod pool;
pub mod prepare;
pub mod run;

pub use crate::app::Context;
pub use crate::fleet::FleetContext;
