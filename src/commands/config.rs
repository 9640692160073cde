//! config_exec: prints the driver JSON for gitlab-runner.

use crate::commands::Context;
use crate::error::Result;

pub async fn config(_context: &Context) -> Result<()> {
    Err(crate::Error::Infrastructure(
        "config: not implemented yet".into(),
    ))
}
