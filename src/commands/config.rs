//! config_exec: prints the driver JSON for gitlab-runner, after checking what can be checked
//! without the network (the settings themselves were parsed before we got here).

use crate::commands::Context;
use crate::config::Settings;
use crate::error::Result;

/// The JSON gitlab-runner reads from config_exec's stdout.
pub fn driver_json() -> serde_json::Value {
    serde_json::json!({
        "driver": {"name": crate::DRIVER_NAME, "version": crate::DRIVER_VERSION},
        "builds_dir": "/builds",
        "cache_dir": "/cache",
        "builds_dir_is_shared": false,
        "shell": "bash",
    })
}

/// Checks that need no network: TLS trust material and the SSH key's presence (with a fleet
/// key, VMs of cloud-init templates get keys of their own: the static one may be missing).
pub fn check_offline(settings: &Settings) -> Result<()> {
    crate::proxmox::tls::client_config(&settings.api.tls)?;
    if settings.fleet_key.is_some() {
        return Ok(());
    }
    settings.require_ssh_key()
}

pub async fn config(context: &Context) -> Result<()> {
    check_offline(&context.settings)?;
    println!("{}", driver_json());
    Ok(())
}
