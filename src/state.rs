//! Per-job state shared between hooks. prepare writes it *before* it creates anything, so that
//! cleanup can always find what prepare started, even after a crash halfway through.
//!
//! It lives in the per-job directory gitlab-runner gives every hook (`$TMPDIR`, unique per job
//! attempt and removed by the runner after cleanup), mode 0600, and holds no secrets.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const STATE_FILE_NAME: &str = "gitlab-proxmox-runner-state.json";

/// How far prepare got. Ordered: later phases imply the earlier ones happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A VMID was chosen; the clone may or may not have been requested.
    Allocated,
    /// The clone task finished: the VM exists.
    Cloned,
    /// The VM was started.
    Started,
    /// The VM answered over SSH: later hooks may run stages.
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub node: String,
    pub vmid: u32,
    pub phase: Phase,
    /// The VM's name (`ci-<job id>-<project slug>`).
    pub vm_name: String,
    /// The ownership marker written into the VM's description; cleanup checks it before it
    /// destroys anything.
    pub marker: String,
    #[serde(default)]
    pub template_vmid: Option<u32>,
    /// The template's node when it is not the VM's (a clone with `target`): where the clone
    /// task runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_node: Option<String>,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    #[serde(default)]
    pub ssh_user: Option<String>,
    /// The VM's SSH host public keys in OpenSSH format (`ssh-ed25519 AAAA...`), pinned for every
    /// connection after prepare.
    #[serde(default)]
    pub host_keys: Vec<String>,
    /// Where the host keys came from: `guest-agent` or `first-use`.
    #[serde(default)]
    pub host_key_source: Option<String>,
    /// Set when the VM accepts its own SSH key: the nonce it is derived from (with the fleet
    /// key and the VMID) by every hook, in memory. The key itself is never stored. `None`:
    /// the static `VM_SSH_PRIVATE_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key_nonce: Option<String>,
    /// Which fleet key that was (its public id): after a rotation, the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key_fleet: Option<String>,
    /// When the clone request left (Unix seconds); `None` until then. With no
    /// [`clone_upid`](Self::clone_upid), the answer never came: the clone may still run.
    #[serde(default)]
    pub clone_sent_at: Option<u64>,
    /// The clone task, once the API answered: until it ends, a missing VM is not a gone VM
    /// (its worker writes the config a moment later).
    #[serde(default)]
    pub clone_upid: Option<String>,
    /// Set by the stage that lost the VM: later stages fail at once instead of waiting for a
    /// VM that is gone. cleanup ignores it (it destroys the VM through the API, not SSH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    /// VMs of earlier node attempts of this prepare whose node failed before they could be
    /// removed: cleanup removes them too (once their node is back, or gc does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<LeftVm>,
}

/// A VM a failed node attempt left, with what is known about the clone that may create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftVm {
    pub node: String,
    pub vmid: u32,
    /// Its ownership marker (an earlier prepare attempt's differs from the current one's).
    pub marker: String,
    #[serde(default)]
    pub template_vmid: Option<u32>,
    #[serde(default)]
    pub template_node: Option<String>,
    #[serde(default)]
    pub clone_sent_at: Option<u64>,
    #[serde(default)]
    pub clone_upid: Option<String>,
}

impl LeftVm {
    pub fn clone_trace(&self) -> crate::vm::clone_watch::CloneTrace {
        crate::vm::clone_watch::CloneTrace {
            vm: crate::vm::VmRef {
                node: self.node.clone(),
                vmid: self.vmid,
            },
            template: self.template_vmid,
            template_node: self.template_node.clone(),
            sent_at: self.clone_sent_at,
            upid: self.clone_upid.clone(),
        }
    }
}

/// When and where a stage lost its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// Unix seconds: when the VM was last heard from.
    pub since: u64,
    /// The stage that noticed (a runner-given name: data, shown escaped).
    pub stage: String,
}

impl Lost {
    /// `12:03:41 UTC`: a job lasts hours at most, the time of day is what an admin compares
    /// with the node's logs.
    pub fn since_utc(&self) -> String {
        let of_day = self.since % 86_400;
        format!(
            "{:02}:{:02}:{:02} UTC",
            of_day / 3600,
            of_day % 3600 / 60,
            of_day % 60
        )
    }
}

impl JobState {
    /// What the engine needs to know about the clone that may create this state's VM.
    pub fn clone_trace(&self) -> crate::vm::clone_watch::CloneTrace {
        self.as_left_vm().clone_trace()
    }

    /// This state's VM, as a VM a failed node attempt leaves behind.
    pub fn as_left_vm(&self) -> LeftVm {
        LeftVm {
            node: self.node.clone(),
            vmid: self.vmid,
            marker: self.marker.clone(),
            template_vmid: self.template_vmid,
            template_node: self.template_node.clone(),
            clone_sent_at: self.clone_sent_at,
            clone_upid: self.clone_upid.clone(),
        }
    }
}

/// The directory for per-job files: `$TMPDIR` as the runner sets it, else the working directory
/// (which the runner also makes per job).
pub fn job_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE_NAME)
}

impl JobState {
    /// Writes the state atomically (temp file + rename), mode 0600.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = state_path(dir);
        let tmp = dir.join(format!(".{STATE_FILE_NAME}.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|err| Error::Infrastructure(format!("cannot encode the job state: {err}")))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|err| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(
                format!(
                    "cannot write the job state {} (is $TMPDIR writable?)",
                    path.display()
                ),
                err,
            )
        })
    }

    /// `Ok(None)` when prepare never wrote a state (nothing was created).
    pub fn load(dir: &Path) -> Result<Option<JobState>> {
        let path = state_path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| {
                Error::Infrastructure(format!(
                    "the job state {} is corrupt ({err}); the VM it named may need the orphan \
                     sweep (gitlab-proxmox-runner gc)",
                    path.display()
                ))
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(Error::io(
                format!("cannot read the job state {}", path.display()),
                err,
            )),
        }
    }

    pub fn remove(dir: &Path) -> Result<()> {
        match std::fs::remove_file(state_path(dir)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(Error::io("cannot remove the job state", err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobState {
        JobState {
            node: "pve1".into(),
            vmid: 2_000_123,
            phase: Phase::Allocated,
            vm_name: "ci-1-demo".into(),
            marker: "marker".into(),
            template_vmid: Some(9000),
            ip: None,
            ssh_port: None,
            ssh_user: None,
            host_keys: vec![],
            host_key_source: None,
            ssh_key_nonce: None,
            ssh_key_fleet: None,
            clone_sent_at: None,
            clone_upid: None,
            lost: None,
            template_node: None,
            left_behind: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(JobState::load(dir.path()).unwrap(), None);
        let mut state = sample();
        state.save(dir.path()).unwrap();
        state.phase = Phase::Ready;
        state.save(dir.path()).unwrap();
        assert_eq!(JobState::load(dir.path()).unwrap(), Some(state));
        let mode = std::fs::metadata(state_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        JobState::remove(dir.path()).unwrap();
        JobState::remove(dir.path()).unwrap();
        assert_eq!(JobState::load(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_lost_vm_is_remembered_and_older_states_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample();
        state.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(state_path(dir.path())).unwrap();
        assert!(!text.contains("lost"), "{text}");
        state.lost = Some(Lost {
            since: 1_764_676_421,
            stage: "build_script".into(),
        });
        state.save(dir.path()).unwrap();
        assert_eq!(JobState::load(dir.path()).unwrap(), Some(state.clone()));
        assert_eq!(state.lost.unwrap().since_utc(), "11:53:41 UTC");
    }

    #[test]
    fn phases_are_ordered() {
        assert!(Phase::Allocated < Phase::Cloned && Phase::Started < Phase::Ready);
    }
}
