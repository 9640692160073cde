//! The one setup for tests that run the driver against a fake cluster: the fake Proxmox, the
//! client key the "VMs" accept, optionally a real sshd on loopback standing in for every VM
//! (its ed25519 host key served through the fake's guest agent, as a real guest serves its
//! own) or one sshd per VM (each VM its own host keys), and hooks wired to all of it.
//!
//! ```ignore
//! let Some(lab) = Lab::builder(gpr_testkit::driver_binary!()).with_sshd_or_skip("my_test") else {
//!     return;
//! };
//! lab.hook(dir.path()).arg("prepare").run().assert_exit(0);
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::fake_proxmox::{FakeConfig, FakeProxmox};
use crate::hook::Hook;
use crate::ssh_job::vm_on_local_sshd;
use crate::sshd::Sshd;
use crate::sshkeys::ClientKey;
use crate::vm_sshds::VmSshds;

/// The driver binary under test: `$GPR_BIN` (CI points it at the static musl build), else the
/// one cargo built for the calling test or bench.
#[macro_export]
macro_rules! driver_binary {
    () => {
        $crate::lab::binary_or_override(env!("CARGO_BIN_EXE_gitlab-proxmox-runner"))
    };
}

/// `$GPR_BIN` if set, else `built`.
pub fn binary_or_override(built: &str) -> PathBuf {
    std::env::var_os("GPR_BIN")
        .filter(|bin| !bin.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(built))
}

/// A hook of `bin` in job directory `dir` with `fake`'s API settings in the driver's own
/// environment (what a systemd unit or the runner's service environment exports).
pub fn api_hook(bin: impl AsRef<Path>, fake: &FakeProxmox, dir: impl AsRef<Path>) -> Hook {
    let mut hook = Hook::new(bin, dir);
    for (name, value) in fake.settings_env() {
        hook = hook.host_env(name, value);
    }
    let (name, value) = crate::fleet::settings_env();
    hook.host_env(name, value)
}

/// A fleet command of `bin` (`gc ...`) the way cron or a systemd timer runs it: no job
/// variables, no `JOB_RESPONSE_FILE`, no `CUSTOM_ENV_`, no `TMPDIR`; `fake`'s settings in the
/// environment.
pub fn fleet_command(bin: impl AsRef<Path>, fake: &FakeProxmox) -> Command {
    let mut command = Command::new(bin.as_ref());
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(fake.settings_env())
        .envs([crate::fleet::settings_env()])
        .stdin(Stdio::null());
    command
}

/// Where the fake guest agent serves the "VM"'s host key from.
pub const ED25519_HOST_KEY_FILE: &str = "/etc/ssh/ssh_host_ed25519_key.pub";

pub struct LabBuilder {
    bin: PathBuf,
    config: FakeConfig,
    key_in_cloud_init: bool,
}

impl LabBuilder {
    /// The fake's configuration (task durations, node, templates, ...).
    pub fn fake(mut self, config: FakeConfig) -> LabBuilder {
        self.config = config;
        self
    }

    /// The client key reaches the VMs through the templates' `sshkeys` (cloud-init, applied at
    /// first boot, for `ciuser` root, the lab's VM_SSH_USER) instead of being baked into their
    /// image: a clone whose `sshkeys` the driver
    /// replaced accepts the static key no more. Takes effect with
    /// [`LabBuilder::with_sshd_per_vm_or_skip`].
    pub fn key_in_template_cloud_init(mut self) -> LabBuilder {
        self.key_in_cloud_init = true;
        self
    }

    /// A lab without sshd: the hooks reach the Proxmox steps, the SSH settings are the test's.
    pub fn start(self) -> Lab {
        Lab {
            bin: self.bin,
            fake: FakeProxmox::start(self.config),
            sshd: None,
            vm_sshds: None,
            key: ClientKey::ed25519(),
        }
    }

    /// A lab whose every VM answers SSH with host keys of its own (an sshd per VM, on a
    /// loopback address of its own and the lab's SSH port; see [`VmSshds`]), as VMs cloned from
    /// a properly cleaned template do. `None` (skipped) as [`LabBuilder::with_sshd_or_skip`].
    #[track_caller]
    pub fn with_sshd_per_vm_or_skip(self, test: &str) -> Option<Lab> {
        let in_cloud_init = self.key_in_cloud_init;
        let mut lab = self.with_sshd_or_skip(test)?;
        let baked = if in_cloud_init {
            let value = encode_sshkeys(&lab.key.public_line);
            for template in lab.fake.templates() {
                lab.fake.set_vm_config(template, "sshkeys", Some(&value));
                // cloud-init installs keys for the user the driver logs in as (VM_SSH_USER).
                lab.fake.set_vm_config(template, "ciuser", Some("root"));
            }
            None
        } else {
            Some(&lab.key)
        };
        lab.vm_sshds = Some(VmSshds::start_with(&lab.fake, lab.sshd().port(), baked));
        Some(lab)
    }

    /// A lab whose VMs answer SSH: `None` (the test is skipped, loudly) when this machine has no
    /// sshd and `GPR_REQUIRE_SSHD` is not set.
    #[track_caller]
    pub fn with_sshd_or_skip(self, test: &str) -> Option<Lab> {
        let sshd = Sshd::start_or_skip(test)?;
        let key = ClientKey::ed25519();
        sshd.authorize(&key);
        let fake = FakeProxmox::start(self.config);
        // The guests' host keys are the sshd's, so that the keys read through the agent are
        // the ones SSH presents.
        fake.set_host_keys(&sshd.host_key_lines());
        // Every VM is this sshd: what any VM's cloud-init applies, it accepts.
        fake.set_shared_authorized_keys(sshd.authorized_keys_path());
        Some(Lab {
            bin: self.bin,
            fake,
            sshd: Some(sshd),
            vm_sshds: None,
            key,
        })
    }
}

pub struct Lab {
    pub bin: PathBuf,
    pub fake: FakeProxmox,
    pub sshd: Option<Sshd>,
    /// With [`LabBuilder::with_sshd_per_vm_or_skip`]: the sshd of each VM. Without, every VM
    /// is `sshd` and shows its host key: clones of a template whose host keys were never
    /// regenerated.
    pub vm_sshds: Option<VmSshds>,
    /// The client key: accepted by the sshd (when there is one), and the driver's
    /// `VM_SSH_PRIVATE_KEY` in [`Lab::settings`].
    pub key: ClientKey,
}

impl Lab {
    /// A job as gitlab-runner runs it on this runner host, every hook reading `settings_file`.
    /// Its project directory is a fresh directory under `dir/builds` on this machine (the
    /// "VM"), not /builds; per-attempt job directories live under `dir`.
    pub fn runner_job(&self, settings_file: &Path, dir: &Path) -> crate::runner::RunnerJob {
        let config = settings_file.to_str().expect("utf-8 path");
        let builds = tempfile::tempdir_in(dir.join("builds"))
            .expect("builds dir")
            .keep();
        crate::runner::RunnerJob::new(self.bin.clone())
            .hook_args(
                &["--config", config, "config"],
                &["--config", config, "prepare"],
                &["--config", config, "run"],
                &["--config", config, "cleanup"],
            )
            .path_env(dir.join("empty-path"))
            .builds_dir_override(builds.to_string_lossy().into_owned())
            .temp_root(dir)
            .retry_interval(std::time::Duration::ZERO)
            .graceful_kill_timeout(std::time::Duration::from_secs(30))
    }

    pub fn builder(bin: impl Into<PathBuf>) -> LabBuilder {
        LabBuilder {
            bin: bin.into(),
            config: FakeConfig::default(),
            key_in_cloud_init: false,
        }
    }

    /// The sshd standing in for the VMs; panics in a lab started without one.
    #[track_caller]
    pub fn sshd(&self) -> &Sshd {
        self.sshd
            .as_ref()
            .expect("this lab was started without sshd")
    }

    /// The driver's settings as a runner host would set them: the fake's API, and with sshd
    /// the VMs' SSH (see [`vm_on_local_sshd`]).
    /// The fleet's settings file ([`crate::fleet`]) is not among them: it is a file, not a
    /// setting; commands that need the fleet key add [`crate::fleet::settings_env`].
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut settings = self.hook(".").host_env_pairs();
        settings.retain(|(name, _)| name != crate::fleet::CONFIG_ENV);
        settings
    }

    fn with_sshd_settings(&self, hook: Hook) -> Hook {
        match &self.sshd {
            Some(sshd) => vm_on_local_sshd(hook, sshd.port(), &self.key),
            None => hook,
        }
    }

    /// A hook of the driver in job directory `dir`, with [`Lab::settings`] in its environment.
    pub fn hook(&self, dir: impl AsRef<Path>) -> Hook {
        self.with_sshd_settings(api_hook(&self.bin, &self.fake, dir))
    }

    /// [`Lab::hook`] for job `job_id` of project group/project, with the variables GitLab sets
    /// for every job that the driver reads (the VM's name and marker come from them).
    pub fn job_hook(&self, dir: impl AsRef<Path>, job_id: u64) -> Hook {
        self.hook(dir)
            .job_var("CI_JOB_ID", job_id.to_string())
            .job_var("CI_PROJECT_PATH", "group/project")
            .job_var("CI_PROJECT_PATH_SLUG", "group-project")
            .job_var("CI_RUNNER_SHORT_TOKEN", "xS6Vzpvo")
    }

    /// [`fleet_command`] against this lab's fake.
    pub fn fleet_command(&self) -> Command {
        fleet_command(&self.bin, &self.fake)
    }

    /// `check` as an admin runs it: the lab's settings, the client key and `/bin/true` as the
    /// runner helper, then `extra` (which wins; an empty value removes the setting).
    pub fn check_command(&self, extra: &[(&str, &str)]) -> Command {
        let mut settings = self.settings();
        // The process environment alone, as the check tests expect to read it (a test that
        // wants the fleet's settings file passes GITLAB_PROXMOX_RUNNER_CONFIG in `extra`).
        settings.retain(|(name, _)| name != crate::fleet::CONFIG_ENV);
        settings.push(("VM_SSH_PRIVATE_KEY".into(), self.key.private_text.clone()));
        settings.push(("RUNNER_HELPER_PATH".into(), "/bin/true".into()));
        for (name, value) in extra {
            settings.retain(|(key, _)| key != name);
            if !value.is_empty() {
                settings.push((name.to_string(), value.to_string()));
            }
        }
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(settings)
            .arg("check")
            .stdin(Stdio::null());
        command
    }
}

/// One OpenSSH key line as PVE's `sshkeys` holds it (URL-encoded, newline-terminated).
pub fn encode_sshkeys(line: &str) -> String {
    let mut out = String::new();
    for byte in format!("{line}\n").bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
