//! In-process SSH client (russh): private keys held only in memory, host-key pinning, running
//! stage scripts, and what prepare needs (waiting for sshd, installing the runner helper).
//!
//! INTERFACE CONTRACT (used by commands::prepare / commands::run): the signatures below are
//! fixed; the bodies are being implemented in the SSH work.

use std::sync::Arc;
use std::time::Instant;

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::settings::Settings;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// For messages: e.g. "VM 2000123 on pve1".
    pub vm_label: String,
}

/// A parsed private key. Key bytes live only in zeroized memory.
pub struct PrivateKey {
    _private: (),
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
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Loads `VM_SSH_PRIVATE_KEY` (key text or a path) with `VM_SSH_KEY_PASSPHRASE`.
pub fn load_private_key(_settings: &Settings) -> Result<Arc<PrivateKey>> {
    Err(Error::Infrastructure("ssh: not implemented yet".into()))
}

/// An authenticated SSH connection to the job's VM.
pub struct Connection {
    _private: (),
}

impl Connection {
    pub async fn connect(
        _target: &Target,
        _key: Arc<PrivateKey>,
        _check: &HostKeyCheck,
    ) -> Result<Connection> {
        Err(Error::Infrastructure("ssh: not implemented yet".into()))
    }

    /// The host key the server presented, as an OpenSSH public key line.
    pub fn host_key(&self) -> String {
        String::new()
    }

    pub async fn exec_capture(&self, _command: &str) -> Result<CommandOutput> {
        Err(Error::Infrastructure("ssh: not implemented yet".into()))
    }

    pub async fn upload(&self, _remote_path: &str, _bytes: &[u8], _mode: u32) -> Result<()> {
        Err(Error::Infrastructure("ssh: not implemented yet".into()))
    }
}

/// Waits until the VM's sshd accepts and authenticates, retrying refusals and resets quietly,
/// printing progress at least every 10 s, giving up at `deadline` or on cancel.
pub async fn wait_until_ready(
    _target: &Target,
    _key: Arc<PrivateKey>,
    _check: &HostKeyCheck,
    _deadline: Instant,
    _cancel: &Cancel,
) -> Result<Connection> {
    Err(Error::Infrastructure("ssh: not implemented yet".into()))
}

/// Makes sure `gitlab-runner` (for artifacts and caches) and `git` exist in the VM: uploads
/// the helper binary when missing, warns loudly when it cannot.
pub async fn provision_runner_helper(_connection: &Connection, _settings: &Settings) -> Result<()> {
    Err(Error::Infrastructure("ssh: not implemented yet".into()))
}
