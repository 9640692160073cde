//! The runner host's files that hold the driver's secrets: the settings file (the API token,
//! often the SSH key) and a `VM_SSH_PRIVATE_KEY` key file (it opens every VM of the template).
//! Either one readable by another local user hands them the cluster or the VMs; writable, they
//! could also point the driver at a server of theirs. `check` reports such a file, and
//! `prepare` and `pool` warn in one line; nothing refuses to run, since the admin may have a
//! reason (a group of admins), but the file's mode is theirs to fix.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Settings, SshKey};

/// A secret-holding file others on this host can read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    /// `the settings file` or `the SSH key file (VM_SSH_PRIVATE_KEY)`.
    pub what: &'static str,
    pub path: PathBuf,
    /// The permission bits, e.g. `0o644`.
    pub mode: u32,
}

impl Exposed {
    /// `the settings file /etc/gitlab-runner/proxmox.toml is readable by group or others
    /// (mode 0644)`.
    pub fn message(&self) -> String {
        let how = match (self.mode & 0o044 != 0, self.mode & 0o022 != 0) {
            (true, true) => "readable and writable",
            (false, true) => "writable",
            _ => "readable",
        };
        format!(
            "{} {} is {how} by group or others (mode {:04o})",
            self.what,
            self.path.display(),
            self.mode & 0o7777
        )
    }

    /// What to run.
    pub fn fix(&self) -> String {
        format!(
            "chmod 0600 {} (owned by the user the hooks and the pool service run as)",
            self.path.display()
        )
    }
}

/// A secret-holding file and its mode, exposed or not (for `check`'s ✔ line too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub what: &'static str,
    pub path: PathBuf,
    pub mode: u32,
}

impl SecretFile {
    pub fn exposed(&self) -> Option<Exposed> {
        (self.mode & 0o066 != 0).then(|| Exposed {
            what: self.what,
            path: self.path.clone(),
            mode: self.mode,
        })
    }
}

/// The settings file (`config_file`, from `--config` or `GITLAB_PROXMOX_RUNNER_CONFIG`) and
/// the SSH key file, those that exist, with their modes (of the file a symlink points at).
pub fn secret_files(config_file: Option<&Path>, settings: &Settings) -> Vec<SecretFile> {
    let key_file = settings
        .ssh
        .private_key
        .as_ref()
        .and_then(|setting| match &setting.key {
            SshKey::File(path) => Some(path.as_path()),
            SshKey::Text(_) => None,
        });
    [
        ("the settings file", config_file),
        ("the SSH key file (VM_SSH_PRIVATE_KEY)", key_file),
    ]
    .into_iter()
    .filter_map(|(what, path)| {
        let path = path?;
        // A missing or unreadable file is reported where it is read.
        let meta = std::fs::metadata(path).ok()?;
        Some(SecretFile {
            what,
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        })
    })
    .collect()
}

/// One warning line per exposed file, for prepare's job log and the pool's log.
pub fn warn_exposed(config_file: Option<&Path>, settings: &Settings) {
    for file in secret_files(config_file, settings) {
        if let Some(exposed) = file.exposed() {
            crate::joblog::warn(format!(
                "{}; it holds the driver's secrets: {}",
                exposed.message(),
                exposed.fix()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_how_the_file_is_exposed() {
        let file = |mode| SecretFile {
            what: "the settings file",
            path: "/etc/gitlab-runner/proxmox.toml".into(),
            mode,
        };
        assert_eq!(file(0o600).exposed(), None);
        assert_eq!(file(0o400).exposed(), None);
        assert_eq!(
            file(0o644).exposed().unwrap().message(),
            "the settings file /etc/gitlab-runner/proxmox.toml is readable by group or others \
             (mode 0644)"
        );
        assert!(file(0o620)
            .exposed()
            .unwrap()
            .message()
            .contains("is writable by group"));
        assert!(file(0o666)
            .exposed()
            .unwrap()
            .message()
            .contains("is readable and writable by group"));
        assert!(file(0o640)
            .exposed()
            .unwrap()
            .fix()
            .starts_with("chmod 0600 /etc/gitlab-runner/proxmox.toml"));
    }
}
