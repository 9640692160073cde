//! Whether a VM is there, gone, or hidden from the API token, and which clone tasks are still
//! running. With the README's pool-scoped ACLs PVE checks `/vms/<vmid>` before the handler
//! runs, so a VMID that is not (yet, or any more) a member of the token's pool answers 403
//! whether a VM is there or not; `GET /cluster/nextid?vmid=N`, open to every user, tells the two
//! apart.

use super::client::Client;
use super::error::ApiError;
use super::types::{value_as_u64, VmStatus};

/// What the API says about a VMID.
#[derive(Debug, Clone)]
pub enum Presence {
    Exists(VmStatus),
    /// No config file for this VMID: never created, or removed. (A clone whose worker has
    /// not written the config yet also looks like this: ask its task, not the VMID.)
    Gone,
    /// A VM is there, but the token may not see it (not a member of the token's pool): a
    /// foreign VM, or a clone that has not joined the pool yet.
    Hidden(ApiError),
}

/// One entry of `GET /nodes/<node>/tasks`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TaskEntry {
    pub upid: String,
    #[serde(default)]
    pub starttime: serde_json::Value,
    /// Present once the task has ended.
    #[serde(default)]
    pub endtime: Option<serde_json::Value>,
    #[serde(default)]
    pub status: Option<String>,
}

impl TaskEntry {
    pub fn start_epoch(&self) -> u64 {
        value_as_u64(&self.starttime).unwrap_or(0)
    }

    pub fn is_running(&self) -> bool {
        self.endtime.is_none() && self.status.as_deref().is_none_or(|s| s == "running")
    }
}

impl Client {
    /// Tells an existing VM from a gone one and from one the token may not see.
    pub async fn vm_presence(&self, node: &str, vmid: u32) -> Result<Presence, ApiError> {
        match self.vm_status(node, vmid).await {
            Ok(Some(status)) => Ok(Presence::Exists(status)),
            Ok(None) => Ok(Presence::Gone),
            Err(err) if err.status() == Some(403) => {
                if self.vmid_is_free(vmid).await? {
                    Ok(Presence::Gone)
                } else {
                    Ok(Presence::Hidden(err))
                }
            }
            Err(err) => Err(err),
        }
    }

    /// The running `qmclone` tasks on `node` whose source is `template` (a token sees its own
    /// tasks without further privileges).
    pub async fn running_clone_tasks(
        &self,
        node: &str,
        template: u32,
    ) -> Result<Vec<TaskEntry>, ApiError> {
        let tasks: Vec<TaskEntry> = self
            .call(
                reqwest::Method::GET,
                &format!("/nodes/{}/tasks", super::client::segment(node)),
                &[
                    ("source", "active".to_string()),
                    ("typefilter", "qmclone".to_string()),
                    ("vmid", template.to_string()),
                    ("limit", "500".to_string()),
                ],
                &[],
                super::client::Retry::Idempotent,
            )
            .await?;
        Ok(tasks.into_iter().filter(TaskEntry::is_running).collect())
    }
}
