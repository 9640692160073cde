//! cleanup_exec: stop and destroy the job's VM, always, idempotently.

use crate::commands::Context;
use crate::error::Result;

pub async fn cleanup(_context: &Context) -> Result<()> {
    Err(crate::Error::Infrastructure(
        "cleanup: not implemented yet".into(),
    ))
}
