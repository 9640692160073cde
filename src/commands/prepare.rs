//! prepare_exec: clone, boot, wait for the guest agent and SSH, record the job state.

use crate::commands::Context;
use crate::error::Result;

pub async fn prepare(_context: &Context) -> Result<()> {
    Err(crate::Error::Infrastructure(
        "prepare: not implemented yet".into(),
    ))
}
