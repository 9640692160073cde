//! run_exec: run one stage script inside the job's VM over SSH.

use std::path::Path;

use crate::commands::Context;
use crate::error::Result;

pub async fn run(_context: &Context, _script: &Path, _stage: &str) -> Result<()> {
    Err(crate::Error::Infrastructure(
        "run: not implemented yet".into(),
    ))
}
