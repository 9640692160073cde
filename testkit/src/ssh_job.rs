//! Runs the driver's `run` hook against an SSH server the way a job would after prepare: a job
//! state naming the server and its pinned host keys, a stage script file, the key in the
//! driver's environment.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::hook::Hook;
use crate::sshkeys::ClientKey;

/// Where the "VM" is and which host keys prepare pinned.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub host_keys: Vec<String>,
}

/// Writes the job state the way prepare leaves it when the VM is ready.
pub fn write_job_state(job_dir: &Path, target: &SshTarget) {
    std::fs::create_dir_all(job_dir).expect("create job dir");
    let state = serde_json::json!({
        "node": "pve-test",
        "vmid": 2_000_123,
        "phase": "ready",
        "vm_name": "ci-1-test",
        "marker": "gitlab-proxmox-runner test marker",
        "template_vmid": 9000,
        "ip": target.host,
        "ssh_port": target.port,
        "ssh_user": target.user,
        "host_keys": target.host_keys,
        "host_key_source": "guest-agent",
    });
    std::fs::write(
        job_dir.join("gitlab-proxmox-runner-state.json"),
        serde_json::to_vec_pretty(&state).expect("encode state"),
    )
    .expect("write job state");
}

/// Writes a stage script like gitlab-runner does (`$TMPDIR/scriptNNN/script`, mode 0700).
pub fn write_stage_script(job_dir: &Path, body: &str) -> PathBuf {
    let n = std::fs::read_dir(job_dir)
        .map(|entries| entries.count())
        .unwrap_or(0);
    let dir = job_dir.join(format!("script{n:03}"));
    std::fs::create_dir_all(&dir).expect("create script dir");
    let path = dir.join("script");
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    path
}

/// A PATH without `ssh`, `scp` (or anything else).
pub const NO_SSH_PATH: &str = "/nonexistent/gpr-no-ssh-on-this-path";

/// The settings every hook needs; the Proxmox ones are never contacted by `run`.
pub fn driver_settings(hook: Hook) -> Hook {
    hook.host_env("PROXMOX_HOST", "127.0.0.1:9")
        .host_env("PROXMOX_USER", "ci@pve")
        .host_env("PROXMOX_TOKEN_NAME", "ci")
        .host_env("PROXMOX_TOKEN_VALUE", "not-used-by-run")
        .host_env("PROXMOX_NODE", "pve-test")
}

/// Settings for a prepare whose "VM" is a local SSH server: the fake Proxmox's guest reports
/// 127.0.0.1 (so loopback must count as the VM's network), logged into as root with `key`.
pub fn vm_on_local_sshd(hook: Hook, port: u16, key: &ClientKey) -> Hook {
    hook.host_env("VM_NETWORK_CIDRS", "127.0.0.0/8")
        .host_env("VM_SSH_PRIVATE_KEY", key.private_text.clone())
        .host_env("VM_SSH_USER", "root")
        .host_env("VM_SSH_PORT", port.to_string())
        .host_env("VM_BOOT_TIMEOUT", "120")
}

/// A `run <script> <stage>` hook for `body`, with the key in the driver's environment.
pub fn stage_hook(
    program: impl AsRef<Path>,
    job_dir: &Path,
    target: &SshTarget,
    key: &ClientKey,
    stage: &str,
    body: &str,
) -> Hook {
    write_job_state(job_dir, target);
    let script = write_stage_script(job_dir, body);
    let mut hook = driver_settings(Hook::new(program, job_dir))
        .host_env("VM_SSH_PRIVATE_KEY", key.private_text.clone())
        .job_var("CI_JOB_ID", "4242")
        // The runner host may have no OpenSSH client at all: nothing may need one.
        .path_env(NO_SSH_PATH)
        .arg("run")
        .arg(script)
        .arg(stage);
    if let Some(pass) = &key.passphrase {
        hook = hook.host_env("VM_SSH_KEY_PASSPHRASE", pass.clone());
    }
    hook
}

/// Starts the hook with piped output and returns it once the stage printed its first stdout
/// line (so a test can act while the stage runs), with that line and the rest of stdout.
pub fn spawn_until_first_line(
    hook: &Hook,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut child = hook
        .command()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the hook");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the stage's first line");
    (child, stdout, line)
}
