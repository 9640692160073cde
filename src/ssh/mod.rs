//! In-process SSH client (russh): private keys held only in memory, host-key pinning, running
//! stage scripts, and what prepare needs (waiting for sshd, installing the runner helper).
//!
//! INTERFACE CONTRACT (used by commands::prepare / commands::run): the signatures below are
//! fixed; more may be added.
//!
//! - `keys`: `VM_SSH_PRIVATE_KEY` (text or path) → a key in zeroized memory, with clear errors.
//! - `connect`: one TCP connection, key exchange, host-key pinning, public-key auth.
//! - `exec`: commands and stage scripts, streamed byte for byte, and cancel.
//! - `sftp`: uploads over the SFTP subsystem of the same connection.
//! - `provision`: `gitlab-runner` and `git` inside the VM.
//!
//! Callers pass a key, a [`Target`], [`Deadlines`] and paths, never the runner's settings (the
//! one exception, [`load_private_key`], goes with the key-trust rule into the config module).
//!
//! A stage costs one TCP connection: kex (curve25519), public-key auth, then an SFTP session
//! and the exec channel opened side by side. In the VM, stage scripts go to
//! `~/.gitlab-proxmox-runner/job-<id>/<random>-<stage>.sh` (directory 0700, script 0700), run
//! as `sudo -n -- setsid -w /bin/bash`, and are removed after the stage. The script's process
//! group id sits next to it (`.pgid`) so that a cancel can kill the whole tree.

mod connect;
pub mod derived;
mod exec;
pub mod key_lines;
mod keys;
mod provision;
mod sftp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::config::SshSettings;
use crate::error::Result;

pub use connect::{fingerprint_of_line, set_keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL};
pub use exec::{LostConnection, StageOutcome, StageScript};

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// For messages: e.g. "VM 2000123 on pve1".
    pub vm_label: String,
}

/// A parsed private key. Key bytes live only in zeroized memory (ssh-key's private key types
/// wipe themselves on drop; every intermediate buffer here is `Zeroizing`).
pub struct PrivateKey {
    key: Arc<russh::keys::PrivateKey>,
}

impl PrivateKey {
    /// Parses key text (OpenSSH, PKCS#1, PKCS#8, SEC1; optionally encrypted). Errors never
    /// quote the text.
    pub fn from_text(text: &str, passphrase: Option<&str>) -> Result<PrivateKey> {
        keys::parse_private_key(text, passphrase)
    }

    /// `SHA256:...` of the public half, for messages.
    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(russh::keys::HashAlg::Sha256)
            .to_string()
    }

    /// e.g. `ssh-ed25519`, `rsa-sha2-512`, `ecdsa-sha2-nistp256`.
    pub fn algorithm(&self) -> String {
        self.key.algorithm().to_string()
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({} {})", self.algorithm(), self.fingerprint())
    }
}

/// How to check the server's host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// Accept only these keys (OpenSSH public key lines, `ssh-ed25519 AAAA... [comment]`).
    Pinned(Vec<String>),
    /// Accept whatever the server presents (only during prepare, when the guest agent could
    /// not read the host key); the caller pins it from then on.
    FirstUse,
}

/// Output of a command run to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// `None` when the remote side sent no exit status (killed by a signal).
    pub status: Option<u32>,
    pub signal: Option<String>,
    /// At most 64 KiB of each; the rest is not read.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command produced more than that and was abandoned (its channel closed).
    pub truncated: bool,
}

/// Loads `VM_SSH_PRIVATE_KEY` (key text or a path) with `VM_SSH_KEY_PASSPHRASE`.
pub fn load_private_key(settings: &SshSettings) -> Result<Arc<PrivateKey>> {
    keys::load_private_key(settings).map(Arc::new)
}

/// An authenticated SSH connection to the job's VM.
pub struct Connection {
    handle: russh::client::Handle<connect::ClientHandler>,
    host_key: String,
    target: Target,
    /// Set by the session task when the session ends.
    ended: tokio::sync::watch::Receiver<Option<connect::SessionEnd>>,
}

impl Connection {
    pub async fn connect(
        target: &Target,
        key: Arc<PrivateKey>,
        check: &HostKeyCheck,
    ) -> Result<Connection> {
        connect::connect(target, key, check).await
    }

    /// The host key the server presented, as an OpenSSH public key line.
    pub fn host_key(&self) -> String {
        self.host_key.clone()
    }

    pub async fn exec_capture(&self, command: &str) -> Result<CommandOutput> {
        exec::exec_capture(self, command).await
    }

    pub async fn upload(&self, remote_path: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let sftp = sftp::Sftp::open(self).await?;
        sftp.write_file(remote_path, bytes, mode, false).await?;
        sftp.close().await;
        Ok(())
    }

    /// Uploads `script` into the job's private directory in the VM and runs it with
    /// `sudo -n /bin/bash`, streaming its stdout/stderr to ours as the bytes arrive. On cancel
    /// the script's whole process group is terminated (then killed after a grace period).
    pub async fn run_stage(
        &self,
        script: &StageScript<'_>,
        cancel: &Cancel,
    ) -> Result<StageOutcome> {
        exec::run_stage(self, script, cancel).await
    }

    /// For messages: "VM 2000123 on pve1 (192.0.2.15:22)".
    pub fn describe(&self) -> String {
        describe_target(&self.target)
    }

    /// Why the session ended, once a channel saw it end. The session task records the reason
    /// just before it finishes; `None` when it says nothing within a moment (or still runs).
    pub(crate) async fn session_end(&self) -> Option<connect::SessionEnd> {
        let mut ended = self.ended.clone();
        let waited =
            tokio::time::timeout(Duration::from_secs(2), ended.wait_for(|end| end.is_some())).await;
        match waited {
            Ok(Ok(end)) => end.clone(),
            _ => None,
        }
    }

    /// Closes the connection politely (the VM's sshd logs a clean disconnect).
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

pub(crate) fn describe_target(target: &Target) -> String {
    if target.host.contains(':') {
        format!("{} ([{}]:{})", target.vm_label, target.host, target.port)
    } else {
        format!("{} ({}:{})", target.vm_label, target.host, target.port)
    }
}

/// Waits until the VM's sshd accepts and authenticates, retrying refusals and resets quietly,
/// printing progress at least every 10 s, giving up at `deadline` or on cancel.
pub async fn wait_until_ready(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
    deadline: Instant,
    cancel: &Cancel,
) -> Result<Connection> {
    let patience = connect::Patience {
        deadline,
        limit: "VM_BOOT_TIMEOUT",
        announce: true,
        refusal_is_final: false,
    };
    wait_announced(target, key, check, patience, cancel).await
}

/// [`wait_until_ready`] for a VM known to be up with its keys in place (a warm VM being
/// claimed): resets and refusals are retried until `deadline`, but a refused key is final.
pub async fn connect_to_running(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
    deadline: Instant,
    cancel: &Cancel,
) -> Result<Connection> {
    let patience = connect::Patience {
        deadline,
        limit: "a claimed warm VM gets 15 s",
        announce: true,
        refusal_is_final: true,
    };
    wait_announced(target, key, check, patience, cancel).await
}

async fn wait_announced(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
    patience: connect::Patience<'_>,
    cancel: &Cancel,
) -> Result<Connection> {
    connect::wait_until_ready(target, key, check, patience, cancel)
        .await
        .map_err(|failure| failure.error)
}

/// How long a stage keeps retrying a connection that was refused, reset or timed out: a network
/// blip or an sshd restart at a stage's start should not fail the job as a system failure.
pub const STAGE_CONNECT_PATIENCE: Duration = Duration::from_secs(20);

/// The time limits the SSH layer works within, chosen by the caller from the runner host's
/// settings (the SSH layer never sees the settings themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// How long a stage retries connecting before it gives up.
    pub stage_connect: Duration,
}

impl Deadlines {
    /// [`STAGE_CONNECT_PATIENCE`], or the VM's boot timeout when that is shorter (a VM that
    /// may take only 5 s to boot should not get 20 s to answer a stage).
    pub fn for_stages(boot_timeout: Duration) -> Deadlines {
        Deadlines {
            stage_connect: STAGE_CONNECT_PATIENCE.min(boot_timeout),
        }
    }
}

/// A stage could not connect.
#[derive(Debug)]
pub struct StageConnectError {
    pub error: crate::error::Error,
    /// The VM never answered within [`Deadlines::stage_connect`] (as opposed to a host-key
    /// mismatch, a cancel, or a job state without keys): the next stage need not wait again.
    pub unreachable: bool,
}

impl From<StageConnectError> for crate::error::Error {
    fn from(failure: StageConnectError) -> Self {
        failure.error
    }
}

/// Connects for one stage: like [`wait_until_ready`] but quiet on success and bounded by
/// `deadlines.stage_connect`. A host-key mismatch still fails at once.
pub async fn connect_for_stage(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
    deadlines: Deadlines,
    cancel: &Cancel,
) -> std::result::Result<Connection, StageConnectError> {
    let patience = connect::Patience {
        deadline: Instant::now() + deadlines.stage_connect,
        limit: "a stage retries connecting for 20 s at most, or VM_BOOT_TIMEOUT if shorter",
        announce: false,
        refusal_is_final: false,
    };
    connect::wait_until_ready(target, key, check, patience, cancel)
        .await
        .map_err(|failure| StageConnectError {
            error: failure.error,
            unreachable: failure.gave_up,
        })
}

/// Makes sure `gitlab-runner` (for artifacts and caches) and `git` exist in the VM: uploads
/// the helper binary when missing, warns loudly when it cannot. `helper` is the binary the
/// runner host's settings name (`RUNNER_HELPER_PATH`); without one, `gitlab-runner` on the
/// host's PATH is used if there is one.
pub async fn provision_runner_helper(
    connection: &Connection,
    helper: Option<&std::path::Path>,
) -> Result<()> {
    provision::provision_runner_helper(connection, helper).await
}

/// The helper binary prepare would copy into a VM that lacks `gitlab-runner`:
/// `RUNNER_HELPER_PATH` as configured (whether it exists or not), else `gitlab-runner` on the
/// runner host's PATH.
pub fn runner_helper_on_host(configured: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    provision::helper_on_host(configured)
}

/// The upload-and-install step of [`provision_runner_helper`], to any path (tests, and admins
/// who keep the helper elsewhere).
pub async fn install_runner_helper(
    connection: &Connection,
    helper: &std::path::Path,
    remote_path: &str,
) -> Result<()> {
    provision::install_helper(connection, helper, remote_path).await
}
