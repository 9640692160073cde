//! `gitlab-runner` and `git` inside the VM.
//!
//! The artifact and cache stages call `gitlab-runner` inside the VM, guarded by
//! `gitlab-runner --version`: when it is missing they print "Missing gitlab-runner" and the job
//! still passes, with its artifacts silently lost. So prepare installs the runner's own binary
//! (it is a static Go program) when the template lacks it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::exec::sh_quote;
use super::sftp::Sftp;
use super::Connection;
use crate::error::{Error, Result};
use crate::joblog;

const REMOTE_HELPER: &str = "/usr/local/bin/gitlab-runner";

/// Both checks in one round trip, under sudo like the stages themselves (secure_path).
const CHECK: &str = "exec sudo -n -- /bin/bash -c 'gitlab-runner --version >/dev/null 2>&1; \
                     echo \"runner=$?\"; command -v git >/dev/null 2>&1; echo \"git=$?\"'";

fn flag(stdout: &str, name: &str) -> Option<bool> {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{name}=")))
        .map(|code| code.trim() == "0")
}

/// The configured helper, else `gitlab-runner` on the host's PATH.
pub(super) fn helper_on_host(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("gitlab-runner"))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) async fn provision_runner_helper(
    connection: &Connection,
    configured: Option<&Path>,
) -> Result<()> {
    let where_ = connection.describe();
    let check = connection.exec_capture(CHECK).await?;
    let stdout = String::from_utf8_lossy(&check.stdout);
    let (Some(has_runner), Some(has_git)) = (flag(&stdout, "runner"), flag(&stdout, "git")) else {
        joblog::warn(format!(
            "could not check for gitlab-runner and git on {where_} (is passwordless sudo set \
             up for {:?}? stages run with `sudo -n`): {}",
            connection.target.user,
            String::from_utf8_lossy(&check.stderr).trim()
        ));
        return Ok(());
    };
    if !has_git {
        joblog::warn(format!(
            "git is missing on {where_}: fetching the sources (get_sources) will fail; install \
             git (and git-lfs if used) in the template"
        ));
    }
    if has_runner {
        return Ok(());
    }
    let Some(helper) = helper_on_host(configured) else {
        joblog::warn(format!(
            "gitlab-runner is missing on {where_} and there is no helper binary to install \
             (RUNNER_HELPER_PATH is unset and no gitlab-runner is on the runner host's PATH). \
             ARTIFACTS AND CACHES OF THIS JOB WILL BE SILENTLY SKIPPED. Install gitlab-runner \
             in the template or set RUNNER_HELPER_PATH"
        ));
        return Ok(());
    };
    install_helper(connection, &helper, REMOTE_HELPER).await
}

/// Uploads `helper` to `remote_path` in the VM (mode 0755, via sudo) and checks that it runs.
/// Failures that leave the job able to run (wrong architecture, no sudo) are loud warnings.
pub(super) async fn install_helper(
    connection: &Connection,
    helper: &Path,
    remote_path: &str,
) -> Result<()> {
    let where_ = connection.describe();
    let started = Instant::now();
    let bytes = std::fs::read(helper).map_err(|err| {
        Error::io(
            format!(
                "cannot read the runner helper {} (RUNNER_HELPER_PATH)",
                helper.display()
            ),
            err,
        )
    })?;
    let sftp = Sftp::open(connection).await?;
    let home = sftp.realpath(".").await?;
    let staging_dir = format!("{}/.gitlab-proxmox-runner", home.trim_end_matches('/'));
    sftp.mkdir_private(&staging_dir).await?;
    let staged = format!("{staging_dir}/gitlab-runner.upload");
    sftp.write_file(&staged, &bytes, 0o700, false).await?;
    sftp.close().await;
    let install = format!(
        "exec sudo -n -- /bin/bash -c 'install -m 0755 \"$1\" \"$2\" && rm -f \"$1\" && \
         \"$2\" --version' gitlab-proxmox-runner {} {}",
        sh_quote(&staged),
        sh_quote(remote_path)
    );
    let output = connection.exec_capture(&install).await?;
    if output.status != Some(0) {
        joblog::warn(format!(
            "installing the runner helper {} as {remote_path} on {where_} failed (wrong CPU \
             architecture, or no passwordless sudo?): {}. ARTIFACTS AND CACHES OF THIS JOB WILL \
             BE SILENTLY SKIPPED",
            helper.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
        return Ok(());
    }
    joblog::info(format!(
        "installed the runner helper {} ({:.1} MB) as {remote_path} on {where_} in {}",
        helper.display(),
        bytes.len() as f64 / 1_000_000.0,
        joblog::secs(started.elapsed())
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_output_is_read_per_tool() {
        assert_eq!(flag("runner=127\ngit=0\n", "runner"), Some(false));
        assert_eq!(flag("runner=127\ngit=0\n", "git"), Some(true));
        assert_eq!(flag("sudo: a password is required\n", "git"), None);
    }
}
