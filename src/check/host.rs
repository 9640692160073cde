//! What this host supplies to every job: the SSH key and the runner helper binary.

use crate::check::Finding;
use crate::config::Settings;

/// The SSH key the driver logs in with: set, and readable with its passphrase.
pub fn ssh_key(settings: &Settings) -> Finding {
    if settings.ssh.private_key.is_none() && settings.fleet_key.is_some() {
        Finding::pass(
            "ssh_key",
            "SSH key: VM_SSH_PRIVATE_KEY is not set; VMs of templates with cloud-init get keys \
             of their own, derived from PROXMOX_FLEET_KEY (templates without it cannot be used)",
        )
    } else if settings.ssh.private_key.is_none() {
        Finding::fail(
            "ssh_key",
            "SSH key: VM_SSH_PRIVATE_KEY is not set",
            "VM_SSH_PRIVATE_KEY in the settings file (the private key, or its path)",
        )
    } else {
        match crate::ssh::load_private_key(&settings.ssh) {
            Ok(key) => Finding::pass(
                "ssh_key",
                format!(
                    "SSH key: {} {} (its public half must be in ~{}/.ssh/authorized_keys in \
                     the template)",
                    key.algorithm(),
                    key.fingerprint(),
                    settings.ssh.user
                ),
            ),
            Err(err) => Finding::fail(
                "ssh_key",
                format!("SSH key: {err}"),
                "the key file (the private half, in text form) and VM_SSH_KEY_PASSPHRASE",
            ),
        }
    }
}

/// The gitlab-runner binary copied into VMs whose template lacks one.
pub fn runner_helper(settings: &Settings) -> Finding {
    use std::os::unix::fs::PermissionsExt;
    let configured = settings.ssh.runner_helper_path.as_deref();
    match crate::ssh::runner_helper_on_host(configured) {
        Some(path) => {
            let executable = std::fs::metadata(&path)
                .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            if executable {
                Finding::pass(
                    "runner_helper",
                    format!(
                        "runner helper: {} (copied into VMs whose template lacks gitlab-runner)",
                        path.display()
                    ),
                )
            } else {
                Finding::fail(
                    "runner_helper",
                    format!(
                        "runner helper: RUNNER_HELPER_PATH {} is not an executable file",
                        path.display()
                    ),
                    "point RUNNER_HELPER_PATH at the gitlab-runner binary (linux-amd64), or \
                     unset it and install gitlab-runner in the template",
                )
            }
        }
        None => Finding::fail(
            "runner_helper",
            "runner helper: none on this host (RUNNER_HELPER_PATH is unset and no gitlab-runner \
             is on PATH): a template without gitlab-runner loses every job's artifacts and caches",
            "install gitlab-runner in the template or set RUNNER_HELPER_PATH",
        )
        .advisory(),
    }
}
