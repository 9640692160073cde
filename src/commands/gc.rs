//! gc: destroy VMs this driver created whose jobs are gone (orphans after a runner crash).

use crate::commands::Context;
use crate::error::Result;

pub async fn gc(
    _context: &Context,
    _runner: Option<&str>,
    _max_age: Option<&str>,
    _dry_run: bool,
) -> Result<()> {
    Err(crate::Error::Infrastructure(
        "gc: not implemented yet".into(),
    ))
}
