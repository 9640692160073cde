//! `gitlab-proxmox-runner pool` and `pool status`: the command line's side of the warm-pool
//! service ([`crate::fleet::pool_service`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fleet::FleetContext;

pub struct Options<'a> {
    pub id: Option<&'a str>,
    /// Seconds between rounds.
    pub interval: f64,
    /// Seconds between orphan sweeps.
    pub gc_every: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    /// The settings file, whose mode the service warns about.
    pub settings_file: Option<&'a Path>,
}

pub async fn pool(context: &FleetContext, options: Options<'_>) -> Result<()> {
    crate::config::file_modes::warn_exposed(options.settings_file, &context.settings);
    let interval = Duration::try_from_secs_f64(options.interval)
        .ok()
        .filter(|every| *every >= Duration::from_millis(100))
        .ok_or_else(|| {
            Error::Settings(format!(
                "--interval {} must be at least 0.1 s",
                options.interval
            ))
        })?;
    let gc_every = options.gc_every.map(Duration::from_secs);
    crate::fleet::pool_service::pool(
        context,
        options.id,
        interval,
        gc_every,
        options.metrics_listen,
    )
    .await
}

pub async fn status(context: &FleetContext, json: bool) -> Result<()> {
    crate::fleet::pool_status::status(context, json).await
}
