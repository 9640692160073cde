//! config_exec: prints the driver JSON for gitlab-runner, after checking what can be checked
//! without the network (the settings themselves were parsed before we got here).

use crate::commands::Context;
use crate::config::Settings;
use crate::error::{Error, Result};

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

/// Checks that need no network: TLS trust material and the SSH key's presence.
pub fn check_offline(settings: &Settings) -> Result<()> {
    crate::proxmox::tls::client_config(&settings.tls)?;
    require_ssh_key(settings)
}

pub fn require_ssh_key(settings: &Settings) -> Result<()> {
    if settings.ssh_private_key.is_none() {
        return Err(Error::Settings(
            "VM_SSH_PRIVATE_KEY is not set: the driver needs the private key (text or a path) \
             that the template's VM_SSH_USER accepts; put it in the driver's config file or the \
             runner host's environment"
                .into(),
        ));
    }
    Ok(())
}

pub async fn config(context: &Context) -> Result<()> {
    check_offline(&context.settings)?;
    println!("{}", driver_json());
    Ok(())
}
