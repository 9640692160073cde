//! Runs one hook of the real binary the way gitlab-runner does: a per-job directory as cwd and
//! `TMPDIR`, the runner's exit-code variables, `JOB_RESPONSE_FILE`, and `CUSTOM_ENV_*` built from
//! `[[runners]] environment` entries first, then the job's own variables, then its overrides of
//! predefined variables, then its resolved `secrets:` (later wins, as in the runner's
//! `GetAllVariables`).
//!
//! ```ignore
//! let out = Hook::new(bin, &job_dir)
//!     .host_env("PROXMOX_HOST", fake.host())
//!     .job_var("PROXMOX_TEMPLATE", "debian-12")
//!     .arg("prepare")
//!     .run();
//! out.assert_exit(0);
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const BUILD_FAILURE: i32 = 1;
pub const SYSTEM_FAILURE: i32 = 2;

#[derive(Clone)]
pub struct Hook {
    program: PathBuf,
    args: Vec<OsString>,
    job_dir: PathBuf,
    /// The driver process's own environment (what a systemd unit exports).
    host_env: BTreeMap<String, String>,
    /// `[[runners]] environment` entries: reach the driver as CUSTOM_ENV_, not in the job file.
    runner_env: BTreeMap<String, String>,
    /// The job's own variables: CUSTOM_ENV_ and in JOB_RESPONSE_FILE.
    job_vars: BTreeMap<String, JobVariable>,
    /// `.gitlab-ci.yml` `variables:` entries that override a predefined variable: listed after
    /// the predefined one in JOB_RESPONSE_FILE (both entries), and the job's value wins.
    overrides: Vec<JobVariable>,
    /// `secrets:` entries: under `secrets` in JOB_RESPONSE_FILE (not `variables`), resolved by
    /// the runner into variables after all the others.
    secrets: Vec<JobSecret>,
    /// Replaces `response.json` (`Some(None)`: no `JOB_RESPONSE_FILE` at all), for tests of
    /// what the driver does when the runner's file is missing or damaged.
    response_override: Option<Option<String>>,
    /// `job_env` from config_exec's JSON (prepare, run and cleanup only).
    driver_env: BTreeMap<String, String>,
    path: Option<OsString>,
}

/// One entry of the job payload's `variables` list, with the flags GitLab sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobVariable {
    pub key: String,
    pub value: String,
    /// Masked in the job log by the runner.
    pub masked: bool,
    /// A file-type variable: `value` is the file's content.
    pub file: bool,
}

impl JobVariable {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> JobVariable {
        JobVariable {
            key: key.into(),
            value: value.into(),
            masked: false,
            file: false,
        }
    }
}

/// One `secrets:` entry of a job, as gitlab-runner resolves it (`common/secrets.go`,
/// `handleSecret`): a variable named after the entry's key whose value is the secret, of file
/// type unless the job says `file: false`. For the custom executor that means
/// `CUSTOM_ENV_<key>` holds the secret's content either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSecret {
    pub key: String,
    /// What the secrets manager returned.
    pub value: String,
    pub file: bool,
}

impl JobSecret {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> JobSecret {
        JobSecret {
            key: key.into(),
            value: value.into(),
            file: true,
        }
    }

    /// The entry under the response's `secrets` map: where to fetch it, not its value.
    fn response_json(&self) -> String {
        format!(
            r#"{}:{{"vault":{{"server":{{"url":"https://vault.example.test","auth":{{"name":"jwt","path":"jwt","data":{{"jwt":"$VAULT_ID_TOKEN"}}}}}},"engine":{{"name":"kv-v2","path":"kv-v2"}},"path":{},"field":"value"}},"file":{}}}"#,
            json_string(&self.key),
            json_string(&format!("ci/{}", self.key)),
            self.file
        )
    }
}

#[derive(Debug)]
pub struct HookOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl HookOutput {
    /// Panics with the whole output when the exit code is not `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn log(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// The stages a typical job's run_exec calls come in, in order (the API footprint budget is for
/// prepare, these and cleanup).
pub const TYPICAL_STAGES: [&str; 6] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "build_script",
    "after_script",
    "archive_cache",
];

impl Hook {
    pub fn new(program: impl AsRef<Path>, job_dir: impl AsRef<Path>) -> Hook {
        Hook {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            job_dir: job_dir.as_ref().to_path_buf(),
            host_env: BTreeMap::new(),
            runner_env: BTreeMap::new(),
            job_vars: BTreeMap::new(),
            overrides: Vec::new(),
            secrets: Vec::new(),
            response_override: None,
            driver_env: BTreeMap::new(),
            path: None,
        }
    }

    /// Runs a trivial script (written into `dir`) as each of [`TYPICAL_STAGES`], each expected
    /// to succeed.
    pub fn run_typical_stages(&self, dir: &Path) {
        for stage in TYPICAL_STAGES {
            let script = dir.join(format!("{stage}.sh"));
            std::fs::write(&script, "#!/bin/sh\necho stage\n").expect("write the stage script");
            self.clone()
                .arg("run")
                .arg(&script)
                .arg(stage)
                .run()
                .assert_exit(0);
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn host_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.host_env.insert(name.into(), value.into());
        self
    }

    /// [`Hook::host_env`] for each pair (a module's settings kept in one const).
    pub fn host_envs(self, pairs: &[(&str, &str)]) -> Self {
        pairs
            .iter()
            .fold(self, |hook, (name, value)| hook.host_env(*name, *value))
    }

    pub fn without_host_env(mut self, name: &str) -> Self {
        self.host_env.remove(name);
        self
    }

    pub fn runner_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.runner_env.insert(name.into(), value.into());
        self
    }

    /// An entry of config_exec's `job_env`.
    pub fn driver_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.driver_env.insert(name.into(), value.into());
        self
    }

    pub fn job_var(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.job_variable(JobVariable::new(name, value))
    }

    /// A job variable with its flags (masked, file).
    pub fn job_variable(mut self, variable: JobVariable) -> Self {
        self.job_vars.insert(variable.key.clone(), variable);
        self
    }

    /// A `.gitlab-ci.yml` override of a predefined variable (`CI_PROJECT_PATH: ...`).
    pub fn job_override(mut self, variable: JobVariable) -> Self {
        self.overrides.push(variable);
        self
    }

    /// A `secrets:` entry, resolved by the runner before the hooks run.
    pub fn secret(mut self, secret: JobSecret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Runs the hook without `JOB_RESPONSE_FILE` (a runner never does this).
    pub fn without_job_response_file(mut self) -> Self {
        self.response_override = Some(None);
        self
    }

    /// Writes `text` as `response.json` instead of the job payload.
    pub fn job_response_text(mut self, text: impl Into<String>) -> Self {
        self.response_override = Some(Some(text.into()));
        self
    }

    /// Replaces PATH (e.g. to prove no `ssh`/`scp` is needed).
    pub fn path_env(mut self, path: impl Into<OsString>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The driver's own environment as set so far, in name order.
    pub fn host_env_pairs(&self) -> Vec<(String, String)> {
        self.host_env
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }

    pub fn job_dir(&self) -> &Path {
        &self.job_dir
    }

    /// The runner's job payload: `{"variables":[{"key","value",...}],"secrets":{...}}`.
    pub fn job_response_json(&self) -> String {
        let variables: Vec<String> = self
            .job_vars
            .values()
            .chain(&self.overrides)
            .map(|var| {
                format!(
                    r#"{{"key":{},"value":{},"public":{},"masked":{},"file":{},"raw":false}}"#,
                    json_string(&var.key),
                    json_string(&var.value),
                    !var.masked,
                    var.masked,
                    var.file
                )
            })
            .collect();
        let secrets: Vec<String> = self.secrets.iter().map(JobSecret::response_json).collect();
        let id = self
            .job_vars
            .get("CI_JOB_ID")
            .and_then(|var| var.value.parse::<u64>().ok())
            .unwrap_or(1);
        let token = self
            .job_vars
            .get("CI_JOB_TOKEN")
            .map_or("job-token", |var| var.value.as_str());
        let secrets = if secrets.is_empty() {
            String::new()
        } else {
            format!(r#","secrets":{{{}}}"#, secrets.join(","))
        };
        format!(
            r#"{{"id":{id},"token":{},"variables":[{}]{secrets}}}"#,
            json_string(token),
            variables.join(",")
        )
    }

    /// The fully configured command (not started).
    pub fn command(&self) -> Command {
        std::fs::create_dir_all(&self.job_dir).expect("create job dir");
        let response = self.job_dir.join("response.json");
        let response_text = match &self.response_override {
            None => Some(self.job_response_json()),
            Some(text) => text.clone(),
        };
        if let Some(text) = &response_text {
            std::fs::write(&response, text).expect("write response.json");
        }
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .current_dir(&self.job_dir)
            .env_clear()
            .envs(std::env::var_os("HOME").map(|home| ("HOME", home)))
            .env(
                "PATH",
                self.path
                    .clone()
                    .or_else(|| std::env::var_os("PATH"))
                    .unwrap_or_default(),
            )
            .envs(&self.host_env)
            .env("TMPDIR", &self.job_dir)
            .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
            .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
            .env("BUILD_EXIT_CODE_FILE", self.job_dir.join("build_exit_code"))
            .stdin(Stdio::null())
            // The runner starts every executable in its own process group, so that a cancel
            // (SIGTERM, then SIGKILL, to the group) reaches everything the hook started.
            .process_group(0);
        if response_text.is_some() {
            command.env("JOB_RESPONSE_FILE", &response);
        }
        // config_exec's `job_env`: after the runner's own variables, before the job's.
        command.envs(&self.driver_env);
        let job_vars = self
            .job_vars
            .values()
            .chain(&self.overrides)
            .map(|var| (&var.key, &var.value));
        let secrets = self
            .secrets
            .iter()
            .map(|secret| (&secret.key, &secret.value));
        for (name, value) in self.runner_env.iter().chain(job_vars).chain(secrets) {
            command.env(format!("CUSTOM_ENV_{name}"), value);
        }
        command
    }

    /// Starts the hook with stdout and stderr piped, for tests that run several at once.
    pub fn spawn(&self) -> std::process::Child {
        self.command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the hook binary")
    }

    pub fn run(&self) -> HookOutput {
        let output = self.command().output().expect("start the hook binary");
        HookOutput {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
