//! Plays gitlab-runner for one whole job against the real binary, the way the runner's own code
//! drives a custom executor (see `custom-executor-protocol.md`):
//!
//! - every preparation attempt gets a fresh temporary directory (`os.MkdirTemp`), used as cwd
//!   and `TMPDIR` by config, prepare, run and cleanup, holding `response.json`
//!   (`JOB_RESPONSE_FILE`) and the stage scripts (`scriptNNN/script`, 0700); it is removed
//!   (`os.RemoveAll`) right after every cleanup, whatever cleanup's exit code, so nothing a
//!   hook left there reaches the next attempt;
//! - config_exec's stdout is parsed as the driver JSON, its `job_env` reaches the later hooks;
//! - config + prepare are tried up to 3 times, with cleanup after every failed attempt; a
//!   build-failure exit is not retried;
//! - run_exec gets one bash script per stage, shaped like the runner's bash shell output;
//! - every hook runs in its own process group; a cancel or timeout sends SIGTERM to the group,
//!   then SIGKILL after the graceful-kill timeout;
//! - exit codes and `BUILD_EXIT_CODE_FILE` are read as the runner reads them;
//! - cleanup always runs, and its output is kept out of the job log.
//!
//! ```ignore
//! let report = RunnerJob::new(bin)
//!     .host_env("GITLAB_PROXMOX_RUNNER_CONFIG", config_path)
//!     .job_var("PROXMOX_TEMPLATE", "debian-12")
//!     .script("build_script", "echo hi; exit 3")
//!     .run();
//! assert_eq!(report.outcome, JobOutcome::ScriptFailure { exit_code: 3 });
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::hook::{Hook, JobSecret, JobVariable, BUILD_FAILURE, SYSTEM_FAILURE};

/// The runner's `PreparationRetries`.
pub const PREPARATION_ATTEMPTS: u32 = 3;
/// The runner's `PreparationRetryInterval`.
pub const PREPARATION_RETRY_INTERVAL: Duration = Duration::from_secs(3);
/// `config_exec_timeout`, `prepare_exec_timeout`, `cleanup_exec_timeout` defaults.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
/// `graceful_kill_timeout` default.
pub const DEFAULT_GRACEFUL_KILL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the harness waits for a hook's output pipes to close after the hook exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// The stages gitlab-runner passes to run_exec, in the order it runs them. Any stage not in
/// this list (`build_script`, `step_release`, ...) is a user step and runs between
/// `download_artifacts` and `after_script`, in the order it was added.
const STAGES_BEFORE_STEPS: [&str; 4] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
];
const STAGES_AFTER_STEPS: [&str; 6] = [
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];

/// How the job ended, as GitLab would show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Success,
    /// `script_failure`: a hook exited with `$BUILD_FAILURE_EXIT_CODE`. `exit_code` is the first
    /// line of `$BUILD_EXIT_CODE_FILE` when the driver wrote it, else the hook's exit code.
    ScriptFailure {
        exit_code: i32,
    },
    /// `runner_system_failure`: `$SYSTEM_FAILURE_EXIT_CODE`, an unknown exit code, invalid
    /// config JSON, a hook that could not start or timed out.
    SystemFailure {
        reason: String,
    },
    /// The job was cancelled while its main part ran.
    Canceled,
}

/// The four executables of `[runners.custom]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executable {
    Config = 0,
    Prepare = 1,
    Run = 2,
    Cleanup = 3,
}

/// Which executable a call was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookKind {
    Config,
    Prepare,
    Run { stage: String },
    Cleanup,
}

/// One call of one of the driver's executables.
#[derive(Debug, Clone)]
pub struct HookCall {
    pub kind: HookKind,
    /// The preparation attempt (1-based) this call belongs to.
    pub attempt: u32,
    /// `None` when the hook was killed by a signal or could not start.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The harness sent SIGTERM to the hook's process group (cancel or timeout).
    pub terminated: bool,
    /// SIGTERM was not enough: the group got SIGKILL after the graceful-kill timeout.
    pub force_killed: bool,
    pub duration: Duration,
}

/// config_exec's JSON, as the runner reads it (every field optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriverConfig {
    pub driver_name: Option<String>,
    pub driver_version: Option<String>,
    pub hostname: Option<String>,
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    pub builds_dir_is_shared: Option<bool>,
    pub shell: Option<String>,
    pub job_env: BTreeMap<String, String>,
}

impl DriverConfig {
    /// Parses config_exec's stdout. Empty output is accepted; unknown keys are ignored.
    pub fn parse(stdout: &str) -> Result<DriverConfig, String> {
        if stdout.trim().is_empty() {
            return Ok(DriverConfig::default());
        }
        let value: serde_json::Value = serde_json::from_str(stdout)
            .map_err(|err| format!("error while parsing JSON output: {err}"))?;
        let object = value
            .as_object()
            .ok_or("error while parsing JSON output: not an object")?;
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(String::from);
        let driver = object.get("driver");
        let mut job_env = BTreeMap::new();
        if let Some(env) = object.get("job_env") {
            let env = env
                .as_object()
                .ok_or("error while parsing JSON output: job_env is not an object")?;
            for (name, value) in env {
                let value = value
                    .as_str()
                    .ok_or_else(|| format!("job_env {name} is not a string"))?;
                job_env.insert(name.clone(), value.to_string());
            }
        }
        Ok(DriverConfig {
            driver_name: text(driver.and_then(|d| d.get("name"))),
            driver_version: text(driver.and_then(|d| d.get("version"))),
            hostname: text(object.get("hostname")),
            builds_dir: text(object.get("builds_dir")),
            cache_dir: text(object.get("cache_dir")),
            builds_dir_is_shared: object.get("builds_dir_is_shared").and_then(|v| v.as_bool()),
            shell: text(object.get("shell")),
            job_env,
        })
    }
}

/// What one whole job did.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub outcome: JobOutcome,
    /// The job log: the runner's own lines, config's stderr, prepare's and run's stdout and
    /// stderr, with masked variables replaced by `[MASKED]`.
    pub log: String,
    /// cleanup_exec's output, which the runner keeps in its own log, never in the job log.
    pub cleanup_log: String,
    pub calls: Vec<HookCall>,
    /// Preparation attempts made (1..=3).
    pub attempts: u32,
    /// The last config_exec JSON that parsed.
    pub driver: Option<DriverConfig>,
    /// Each preparation attempt's `$TMPDIR`, in order; all removed by the time the job ends.
    pub job_dirs: Vec<PathBuf>,
}

impl JobReport {
    /// Exit codes of every call of `kind`, in order.
    pub fn exit_codes(&self, kind: &HookKind) -> Vec<Option<i32>> {
        self.calls
            .iter()
            .filter(|call| &call.kind == kind)
            .map(|call| call.exit_code)
            .collect()
    }

    /// The exit code of the last run_exec call for `stage`.
    pub fn stage_exit_code(&self, stage: &str) -> Option<i32> {
        self.calls
            .iter()
            .rev()
            .find(|call| matches!(&call.kind, HookKind::Run { stage: s } if s == stage))
            .and_then(|call| call.exit_code)
    }

    /// The stages run_exec was called with, in order.
    pub fn stages_run(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|call| match &call.kind {
                HookKind::Run { stage } => Some(stage.clone()),
                _ => None,
            })
            .collect()
    }

    /// Panics with both logs unless the outcome is `expected`.
    #[track_caller]
    pub fn assert_outcome(&self, expected: &JobOutcome) -> &Self {
        assert_eq!(
            &self.outcome, expected,
            "unexpected job outcome\n--- job log\n{}\n--- cleanup log\n{}",
            self.log, self.cleanup_log
        );
        self
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_outcome(&JobOutcome::Success)
    }
}

/// How the runner reads a finished hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    BuildFailure { exit_code: i32 },
    SystemFailure { reason: String },
}

/// The runner's reading of a hook's exit: `code` is `None` when a signal killed it;
/// `build_exit_code_file` is the content of `$BUILD_EXIT_CODE_FILE` if it exists.
pub fn interpret_exit(
    code: Option<i32>,
    signal: Option<i32>,
    build_exit_code_file: Option<&str>,
) -> Verdict {
    let unknown = |code: i32, how: String| Verdict::SystemFailure {
        reason: format!(
            "unknown Custom executor executable exit code {code}; executable execution \
             terminated with: {how}"
        ),
    };
    match code {
        Some(0) => Verdict::Ok,
        Some(code) if code == BUILD_FAILURE => match build_exit_code_file {
            None => Verdict::BuildFailure { exit_code: code },
            Some(text) => match text.lines().next().map(str::trim).map(str::parse::<i32>) {
                Some(Ok(exit_code)) => Verdict::BuildFailure { exit_code },
                _ => unknown(code, format!("exit status {code}")),
            },
        },
        Some(code) if code == SYSTEM_FAILURE => Verdict::SystemFailure {
            reason: format!("exit status {code}"),
        },
        Some(code) => unknown(code, format!("exit status {code}")),
        None => unknown(
            -1,
            format!(
                "signal: {}",
                signal.map_or("unknown".into(), |s| s.to_string())
            ),
        ),
    }
}

/// Bash's `$'...'` quoting: safe for any text, including quotes, newlines and control bytes.
pub fn bash_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("$'");
    for byte in text.bytes() {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            0x20..=0x7e => out.push(byte as char),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
    out.push('\'');
    out
}

/// A variable as the stage scripts export it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptVariable {
    pub name: String,
    pub value: String,
    /// File-type: the script writes `value` to a file and exports the file's path.
    pub file: bool,
}

/// What a stage script needs besides its body.
#[derive(Debug, Clone)]
pub struct ScriptContext<'a> {
    pub variables: &'a [ScriptVariable],
    pub project_dir: &'a str,
}

impl ScriptContext<'_> {
    /// Where file-type variables live in the job environment (the runner's `<project>.tmp`).
    pub fn file_variables_dir(&self) -> String {
        format!("{}.tmp", self.project_dir)
    }
}

fn is_user_step(stage: &str) -> bool {
    !STAGES_BEFORE_STEPS.contains(&stage) && !STAGES_AFTER_STEPS.contains(&stage)
}

/// Renders a stage script the way the runner's bash shell does: shebang, `trap 'exit 1' TERM`,
/// `set -eo pipefail`, the body in `( ... ) < /dev/null`, `exit 0`. Every stage except
/// prepare_script exports all job variables first; user steps and after_script `cd` into the
/// project directory and echo each command before running it.
pub fn render_stage_script(stage: &str, context: &ScriptContext<'_>, entries: &[String]) -> String {
    let mut body = String::new();
    if stage != "prepare_script" {
        let files_dir = context.file_variables_dir();
        let has_files = context.variables.iter().any(|v| v.file);
        if has_files && stage != "cleanup_file_variables" {
            let _ = writeln!(body, "mkdir -p {}", bash_quote(&files_dir));
        }
        for var in context.variables {
            if var.file {
                let path = format!("{files_dir}/{}", var.name);
                if stage != "cleanup_file_variables" {
                    let _ = writeln!(
                        body,
                        "printf '%s' {} > {}",
                        bash_quote(&var.value),
                        bash_quote(&path)
                    );
                }
                let _ = writeln!(body, "export {}={}", var.name, bash_quote(&path));
            } else {
                let _ = writeln!(body, "export {}={}", var.name, bash_quote(&var.value));
            }
        }
    }
    let echo_commands = is_user_step(stage) || stage == "after_script";
    if echo_commands {
        let _ = writeln!(body, "cd {}", bash_quote(context.project_dir));
    }
    for entry in entries {
        if echo_commands {
            let shown = entry.lines().next().unwrap_or_default();
            let _ = writeln!(body, "echo {}", bash_quote(&format!("$ {shown}")));
        }
        body.push_str(entry);
        if !entry.ends_with('\n') {
            body.push('\n');
        }
    }
    format!(
        "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\nset -o pipefail\nset -o errexit\n\
         set +o noclobber\n(\n{body}) < /dev/null\nexit 0\n"
    )
}

/// Writes a stage script where the runner does: `<job dir>/scriptNNN/script`, mode 0700.
fn write_stage_script(job_dir: &Path, sequence: u32, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let dir = job_dir.join(format!("script{sequence:03}"));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("script");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)?;
    file.write_all(text.as_bytes())?;
    Ok(path)
}

/// Lets a test watch and cancel a job that runs on another thread.
#[derive(Clone, Default)]
pub struct JobControl {
    cancel: Arc<AtomicBool>,
    log: Arc<Mutex<String>>,
}

impl JobControl {
    /// Cancels the job as "Cancel" in GitLab's UI does: the running hook's process group gets
    /// SIGTERM (SIGKILL after the graceful-kill timeout); after_script, the failure uploads,
    /// cleanup_file_variables and cleanup still run.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The job log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Polls the job log until it contains `needle`; false at the deadline.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        crate::poll(timeout, POLL, || self.log().contains(needle).then_some(())).is_some()
    }
}

/// A job running on its own thread.
pub struct RunningJob {
    control: JobControl,
    thread: thread::JoinHandle<JobReport>,
}

impl RunningJob {
    pub fn control(&self) -> &JobControl {
        &self.control
    }

    pub fn cancel(&self) {
        self.control.cancel();
    }

    pub fn wait(self) -> JobReport {
        match self.thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// One CI job, described like GitLab and `[[runners]]` would describe it.
#[derive(Clone)]
pub struct RunnerJob {
    /// `[runners.custom]` `*_exec` and `*_args`, indexed by [`Executable`].
    programs: [PathBuf; 4],
    args: [Vec<OsString>; 4],
    host_env: BTreeMap<String, String>,
    runner_env: BTreeMap<String, String>,
    job_vars: BTreeMap<String, JobVariable>,
    overrides: Vec<JobVariable>,
    secrets: Vec<JobSecret>,
    scripts: Vec<(String, Vec<String>)>,
    path: Option<OsString>,
    runner_builds_dir: Option<String>,
    runner_cache_dir: Option<String>,
    builds_dir_override: Option<String>,
    runner_hostname: String,
    preparation_attempts: u32,
    retry_interval: Duration,
    hook_timeout: Duration,
    graceful_kill_timeout: Duration,
    temp_root: Option<PathBuf>,
}

impl RunnerJob {
    /// A job for the driver at `program`, with the predefined variables GitLab and the runner
    /// set (unique `CI_JOB_ID` and `CI_CONCURRENT_ID`), and the subcommands as arguments.
    pub fn new(program: impl AsRef<Path>) -> RunnerJob {
        let sequence = NEXT_JOB.fetch_add(1, Ordering::SeqCst);
        let job_id = 7_000_000 + u64::from(std::process::id() % 10_000) * 1000 + sequence % 1000;
        let mut job = RunnerJob {
            programs: std::array::from_fn(|_| program.as_ref().to_path_buf()),
            args: [
                vec!["config".into()],
                vec!["prepare".into()],
                vec!["run".into()],
                vec!["cleanup".into()],
            ],
            host_env: BTreeMap::new(),
            runner_env: BTreeMap::new(),
            job_vars: BTreeMap::new(),
            overrides: Vec::new(),
            secrets: Vec::new(),
            scripts: Vec::new(),
            path: None,
            runner_builds_dir: None,
            runner_cache_dir: None,
            builds_dir_override: None,
            runner_hostname: "runner-host".into(),
            preparation_attempts: PREPARATION_ATTEMPTS,
            retry_interval: PREPARATION_RETRY_INTERVAL,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            graceful_kill_timeout: DEFAULT_GRACEFUL_KILL_TIMEOUT,
            temp_root: None,
        };
        let payload = [
            ("CI", "true".to_string()),
            ("GITLAB_CI", "true".to_string()),
            ("CI_JOB_ID", job_id.to_string()),
            ("CI_JOB_NAME", "test".into()),
            ("CI_JOB_STAGE", "test".into()),
            ("CI_PIPELINE_ID", (job_id / 10).to_string()),
            ("CI_PROJECT_ID", "42".into()),
            ("CI_PROJECT_NAME", "demo".into()),
            ("CI_PROJECT_NAMESPACE", "group".into()),
            ("CI_PROJECT_PATH", "group/demo".into()),
            ("CI_PROJECT_PATH_SLUG", "group-demo".into()),
            ("CI_SERVER_URL", "https://gitlab.example.test".into()),
            (
                "CI_COMMIT_SHA",
                "0123456789abcdef0123456789abcdef01234567".into(),
            ),
        ];
        for (name, value) in payload {
            job = job.job_var(name, value);
        }
        job.job_variable(JobVariable {
            masked: true,
            ..JobVariable::new("CI_JOB_TOKEN", format!("glcbt-job-token-{job_id}"))
        })
        .runner_env("CI_RUNNER_SHORT_TOKEN", "t3stRunr")
        .runner_env("CI_CONCURRENT_ID", (sequence % 1000).to_string())
        .runner_env("CI_CONCURRENT_PROJECT_ID", "0")
        .runner_env("CI_JOB_TIMEOUT", "3600")
        .runner_env("CI_SERVER", "yes")
    }

    /// An environment variable of the runner process itself (its systemd unit).
    pub fn host_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.host_env.insert(name.into(), value.into());
        self
    }

    /// A `[[runners]] environment` entry: `CUSTOM_ENV_` and exported in the scripts, but not in
    /// the job payload; a job variable of the same name wins.
    pub fn runner_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.runner_env.insert(name.into(), value.into());
        self
    }

    /// A CI/CD variable of the job (project, group, instance or `.gitlab-ci.yml`).
    pub fn job_var(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.job_variable(JobVariable::new(name, value))
    }

    pub fn job_variable(mut self, variable: JobVariable) -> Self {
        self.job_vars.insert(variable.key.clone(), variable);
        self
    }

    /// A `.gitlab-ci.yml` `variables:` entry that overrides a predefined variable (e.g.
    /// `CI_PROJECT_PATH`): both entries are in the job payload, the job's last, and it wins
    /// in `CUSTOM_ENV_` and in the scripts. The runner's own paths keep the predefined value.
    pub fn override_predefined(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.overrides.push(JobVariable::new(name, value));
        self
    }

    /// A `secrets:` entry (Vault, a cloud secrets manager, GitLab's secrets manager), resolved
    /// by the runner into a variable after all the others, listed under the payload's
    /// `secrets`, not its `variables`.
    pub fn secret(mut self, secret: JobSecret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Adds one entry (one `script:` line) to `stage`. Stages run in the runner's order; any
    /// name outside it (`build_script`, `step_release`) is a user step, run in the order added.
    pub fn script(mut self, stage: impl Into<String>, entry: impl Into<String>) -> Self {
        let stage = stage.into();
        let entry = entry.into();
        match self.scripts.iter_mut().find(|(name, _)| *name == stage) {
            Some((_, entries)) => entries.push(entry),
            None => self.scripts.push((stage, vec![entry])),
        }
        self
    }

    /// A `run:` (CI steps) job as the runner shims it on the custom executor: the steps go
    /// into the `STEPS` variable and the job's only script is `step-runner ci`, so the VM
    /// needs a `step-runner` binary on its PATH.
    pub fn run_steps(self, steps_yaml: impl Into<String>) -> Self {
        self.job_var("STEPS", steps_yaml)
            .script("build_script", "step-runner ci")
    }

    /// Replaces the driver's arguments (e.g. `["--config", path, "prepare"]`).
    pub fn hook_args(
        mut self,
        config: &[&str],
        prepare: &[&str],
        run: &[&str],
        cleanup: &[&str],
    ) -> Self {
        let owned = |args: &[&str]| args.iter().map(OsString::from).collect();
        self.args = [owned(config), owned(prepare), owned(run), owned(cleanup)];
        self
    }

    /// One hook's own `*_exec` and `*_args` (e.g. the older driver's `vm_run_exec` symlink
    /// with no arguments).
    pub fn executable(
        mut self,
        which: Executable,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> Self {
        self.programs[which as usize] = program.as_ref().to_path_buf();
        self.args[which as usize] = args.iter().map(OsString::from).collect();
        self
    }

    /// The hooks' PATH (e.g. one without `ssh`/`scp`).
    pub fn path_env(mut self, path: impl Into<OsString>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// `[[runners]] builds_dir` / `cache_dir`: used when config_exec does not set them.
    pub fn runner_dirs(mut self, builds_dir: &str, cache_dir: &str) -> Self {
        self.runner_builds_dir = Some(builds_dir.into());
        self.runner_cache_dir = Some(cache_dir.into());
        self
    }

    /// Puts the project under `dir` whatever config_exec says. A test convenience: when the
    /// "VM" is this machine, each job should work in its own directory rather than `/builds`.
    pub fn builds_dir_override(mut self, dir: impl Into<String>) -> Self {
        self.builds_dir_override = Some(dir.into());
        self
    }

    /// The runner's hostname, shown in "Running on ... via <hostname>".
    pub fn runner_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.runner_hostname = hostname.into();
        self
    }

    /// The pause between preparation attempts (the runner's is 3 s).
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// config/prepare/cleanup exec timeouts and the job timeout for run_exec.
    pub fn hook_timeout(mut self, timeout: Duration) -> Self {
        self.hook_timeout = timeout;
        self
    }

    pub fn graceful_kill_timeout(mut self, timeout: Duration) -> Self {
        self.graceful_kill_timeout = timeout;
        self
    }

    /// Where the per-attempt job directories are made (default: the system temp dir).
    pub fn temp_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_root = Some(dir.into());
        self
    }

    /// The job's `CI_JOB_ID`.
    pub fn job_id(&self) -> String {
        self.job_vars
            .get("CI_JOB_ID")
            .map(|var| var.value.clone())
            .unwrap_or_default()
    }

    /// Runs the whole job on this thread.
    pub fn run(self) -> JobReport {
        let control = JobControl::default();
        Execution::new(self, control).run()
    }

    /// Runs the whole job on a new thread; the handle cancels and watches it.
    pub fn start(self) -> RunningJob {
        let control = JobControl::default();
        let thread_control = control.clone();
        let thread = thread::Builder::new()
            .name(format!("job-{}", self.job_id()))
            .spawn(move || Execution::new(self, thread_control).run())
            .expect("start the job thread");
        RunningJob { control, thread }
    }

    fn hook(
        &self,
        which: Executable,
        job_dir: &Path,
        extra_args: Vec<OsString>,
        job_env: &BTreeMap<String, String>,
    ) -> Hook {
        let mut hook = Hook::new(&self.programs[which as usize], job_dir)
            .args(self.args[which as usize].iter().cloned())
            .args(extra_args);
        for (name, value) in &self.host_env {
            hook = hook.host_env(name, value);
        }
        for (name, value) in &self.runner_env {
            hook = hook.runner_env(name, value);
        }
        for variable in self.job_vars.values() {
            hook = hook.job_variable(variable.clone());
        }
        for variable in &self.overrides {
            hook = hook.job_override(variable.clone());
        }
        for secret in &self.secrets {
            hook = hook.secret(secret.clone());
        }
        for (name, value) in job_env {
            hook = hook.driver_env(name, value);
        }
        if let Some(path) = &self.path {
            hook = hook.path_env(path.clone());
        }
        hook
    }
}

/// Where a hook's output goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    JobLog,
    CleanupLog,
    Captured,
}

struct Finished {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    spawn_error: Option<String>,
    timed_out: bool,
}

/// A prepared job attempt: its directory and the driver's configuration.
struct Prepared {
    dir: tempfile::TempDir,
    driver: DriverConfig,
}

struct Execution {
    job: RunnerJob,
    control: JobControl,
    masks: Vec<String>,
    cleanup_log: Arc<Mutex<String>>,
    calls: Vec<HookCall>,
    attempt: u32,
    script_sequence: u32,
    job_dirs: Vec<PathBuf>,
}

impl Execution {
    fn new(job: RunnerJob, control: JobControl) -> Execution {
        let masks = job
            .job_vars
            .values()
            .filter(|var| var.masked && !var.value.is_empty())
            .map(|var| var.value.clone())
            .collect();
        Execution {
            job,
            control,
            masks,
            cleanup_log: Arc::default(),
            calls: Vec::new(),
            attempt: 0,
            script_sequence: 0,
            job_dirs: Vec::new(),
        }
    }

    fn log_line(&self, line: impl AsRef<str>) {
        append(
            &self.control.log,
            &self.masks,
            &format!("{}\n", line.as_ref()),
        );
    }

    fn run(mut self) -> JobReport {
        self.log_line("Running with gitlab-runner (emulated by gpr-testkit)");
        self.log_line("Preparing the \"custom\" executor");
        let (outcome, driver) = match self.prepare_with_retries() {
            Err(outcome) => (outcome, None),
            Ok(prepared) => {
                let outcome = self.run_stages(&prepared);
                let Prepared { dir, driver } = prepared;
                self.cleanup(dir, &driver.job_env);
                (outcome, Some(driver))
            }
        };
        match &outcome {
            JobOutcome::Success => self.log_line("Job succeeded"),
            JobOutcome::ScriptFailure { exit_code } => {
                self.log_line(format!("ERROR: Job failed: exit code {exit_code}"))
            }
            JobOutcome::SystemFailure { reason } => {
                self.log_line(format!("ERROR: Job failed (system failure): {reason}"))
            }
            JobOutcome::Canceled => self.log_line("ERROR: Job failed: canceled"),
        }
        JobReport {
            outcome,
            log: self.control.log(),
            cleanup_log: self
                .cleanup_log
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default(),
            calls: self.calls,
            attempts: self.attempt,
            driver,
            job_dirs: self.job_dirs,
        }
    }

    /// config + prepare, up to 3 attempts, each in a fresh directory, with cleanup after every
    /// failed attempt. A build failure or a cancel ends the job at once.
    fn prepare_with_retries(&mut self) -> Result<Prepared, JobOutcome> {
        let mut last_reason = String::new();
        for attempt in 1..=self.job.preparation_attempts {
            self.attempt = attempt;
            let dir = self.new_job_dir();
            let (verdict, job_env, driver) = self.prepare_attempt(dir.path());
            let reason = match verdict {
                Verdict::Ok => {
                    return Ok(Prepared {
                        dir,
                        driver: driver.unwrap_or_default(),
                    })
                }
                Verdict::BuildFailure { exit_code } => {
                    // The runner cleans up after a build failure too, but does not retry it.
                    self.cleanup(dir, &job_env);
                    return Err(if self.control.is_cancelled() {
                        JobOutcome::Canceled
                    } else {
                        JobOutcome::ScriptFailure { exit_code }
                    });
                }
                Verdict::SystemFailure { reason } => reason,
            };
            self.cleanup(dir, &job_env);
            if self.control.is_cancelled() {
                return Err(JobOutcome::Canceled);
            }
            self.log_line(format!("ERROR: Preparation failed: {reason}"));
            last_reason = reason;
            if attempt < self.job.preparation_attempts {
                self.log_line(format!(
                    "Will be retried in {:?} ...",
                    self.job.retry_interval
                ));
                if self.pause(self.job.retry_interval) {
                    return Err(JobOutcome::Canceled);
                }
            }
        }
        Err(JobOutcome::SystemFailure {
            reason: last_reason,
        })
    }

    /// Sleeps like the runner between attempts; true when cancelled meanwhile.
    fn pause(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            if self.control.is_cancelled() {
                return true;
            }
            thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        self.control.is_cancelled()
    }

    fn new_job_dir(&self) -> tempfile::TempDir {
        let mut builder = tempfile::Builder::new();
        builder.prefix("custom-executor");
        match &self.job.temp_root {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .expect("create the job's temporary directory")
    }

    fn prepare_attempt(
        &mut self,
        dir: &Path,
    ) -> (Verdict, BTreeMap<String, String>, Option<DriverConfig>) {
        let no_env = BTreeMap::new();
        let hook = self.job.hook(Executable::Config, dir, Vec::new(), &no_env);
        let finished = self.execute(HookKind::Config, hook, Stream::Captured, true);
        let verdict = self.verdict(dir, &finished);
        if verdict != Verdict::Ok {
            return (verdict, no_env, None);
        }
        let driver = match DriverConfig::parse(&finished.stdout) {
            Ok(driver) => driver,
            Err(reason) => return (Verdict::SystemFailure { reason }, no_env, None),
        };
        let job_env = driver.job_env.clone();
        let builds_dir = driver
            .builds_dir
            .clone()
            .or(self.job.runner_builds_dir.clone());
        let cache_dir = driver
            .cache_dir
            .clone()
            .or(self.job.runner_cache_dir.clone());
        if builds_dir.as_deref().unwrap_or_default().is_empty() {
            let reason = "the builds_dir is not configured".to_string();
            return (Verdict::SystemFailure { reason }, job_env, Some(driver));
        }
        if cache_dir.as_deref().unwrap_or_default().is_empty() {
            let reason = "the cache_dir is not configured".to_string();
            return (Verdict::SystemFailure { reason }, job_env, Some(driver));
        }
        self.log_line(format!(
            "Using Custom executor with driver {} {}...",
            driver.driver_name.as_deref().unwrap_or("(unnamed)"),
            driver.driver_version.as_deref().unwrap_or("")
        ));
        let hook = self
            .job
            .hook(Executable::Prepare, dir, Vec::new(), &job_env);
        let finished = self.execute(HookKind::Prepare, hook, Stream::JobLog, true);
        (self.verdict(dir, &finished), job_env, Some(driver))
    }

    fn verdict(&self, dir: &Path, finished: &Finished) -> Verdict {
        if let Some(error) = &finished.spawn_error {
            return Verdict::SystemFailure {
                reason: format!("failed to start command: {error}"),
            };
        }
        if finished.timed_out {
            return Verdict::SystemFailure {
                reason: "execution took longer than the timeout".into(),
            };
        }
        let file = std::fs::read_to_string(dir.join("build_exit_code")).ok();
        interpret_exit(finished.code, finished.signal, file.as_deref())
    }

    fn project_dir(&self, driver: &DriverConfig) -> String {
        let builds_dir = self
            .job
            .builds_dir_override
            .clone()
            .or(driver.builds_dir.clone())
            .or(self.job.runner_builds_dir.clone())
            .unwrap_or_else(|| "/builds".into());
        let path = self
            .job
            .job_vars
            .get("CI_PROJECT_PATH")
            .map_or("project", |var| var.value.as_str());
        if driver.builds_dir_is_shared == Some(true) {
            let token = self
                .job
                .runner_env
                .get("CI_RUNNER_SHORT_TOKEN")
                .map_or("runner", String::as_str);
            let concurrent = self
                .job
                .runner_env
                .get("CI_CONCURRENT_ID")
                .map_or("0", String::as_str);
            format!("{builds_dir}/{token}/{concurrent}/{path}")
        } else {
            format!("{builds_dir}/{path}")
        }
    }

    /// The variables the scripts export: the runner's, then `[[runners]] environment`, then the
    /// job's (later wins), plus the directories the runner computes.
    fn script_variables(&self, project_dir: &str) -> Vec<ScriptVariable> {
        let mut merged: BTreeMap<String, ScriptVariable> = BTreeMap::new();
        let builds_dir = project_dir
            .rsplit_once('/')
            .map_or(project_dir, |(parent, _)| parent);
        let computed = [
            ("CI_BUILDS_DIR", builds_dir.to_string()),
            ("CI_PROJECT_DIR", project_dir.to_string()),
        ];
        for (name, value) in computed
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .chain(self.job.runner_env.clone())
        {
            let var = ScriptVariable {
                name: name.clone(),
                value,
                file: false,
            };
            merged.insert(name, var);
        }
        for var in self.job.job_vars.values().chain(&self.job.overrides) {
            let script_var = ScriptVariable {
                name: var.key.clone(),
                value: var.value.clone(),
                file: var.file,
            };
            merged.insert(var.key.clone(), script_var);
        }
        for secret in &self.job.secrets {
            let script_var = ScriptVariable {
                name: secret.key.clone(),
                value: secret.value.clone(),
                file: secret.file,
            };
            merged.insert(secret.key.clone(), script_var);
        }
        merged.into_values().collect()
    }

    fn entries(&self, stage: &str) -> Option<Vec<String>> {
        self.job
            .scripts
            .iter()
            .find(|(name, _)| name == stage)
            .map(|(_, entries)| entries.clone())
    }

    fn run_stages(&mut self, prepared: &Prepared) -> JobOutcome {
        let dir = prepared.dir.path();
        let driver = &prepared.driver;
        let project_dir = self.project_dir(driver);
        let variables = self.script_variables(&project_dir);
        let context = ScriptContext {
            variables: &variables,
            project_dir: &project_dir,
        };
        let hostname = driver
            .hostname
            .clone()
            .unwrap_or(self.job.runner_hostname.clone());

        self.log_line("Preparing environment");
        let prepare_entries = self.entries("prepare_script").unwrap_or_else(|| {
            vec![format!(
                "printf 'Running on %s via %s...\\n' \"$(hostname)\" {}",
                bash_quote(&hostname)
            )]
        });
        let mut failure = self.stage(
            dir,
            driver,
            &context,
            "prepare_script",
            &prepare_entries,
            true,
        );

        if failure.is_none() {
            self.log_line("Getting source from Git repository");
            let entries = self.entries("get_sources").unwrap_or_else(|| {
                vec![
                    "echo 'Skipping Git repository setup'".into(),
                    format!("mkdir -p {}", bash_quote(&project_dir)),
                ]
            });
            let attempts = self.attempts_variable("GET_SOURCES_ATTEMPTS");
            for attempt in 1..=attempts {
                failure = self.stage(dir, driver, &context, "get_sources", &entries, true);
                if failure.is_none() || self.control.is_cancelled() || attempt == attempts {
                    break;
                }
            }
        }
        for (stage, variable) in [
            ("restore_cache", "RESTORE_CACHE_ATTEMPTS"),
            ("download_artifacts", "ARTIFACT_DOWNLOAD_ATTEMPTS"),
        ] {
            let Some(entries) = self.entries(stage).filter(|_| failure.is_none()) else {
                continue;
            };
            let attempts = self.attempts_variable(variable);
            for attempt in 1..=attempts {
                failure = self.stage(dir, driver, &context, stage, &entries, true);
                if failure.is_none() || self.control.is_cancelled() || attempt == attempts {
                    break;
                }
            }
        }

        let steps: Vec<(String, Vec<String>)> = self
            .job
            .scripts
            .iter()
            .filter(|(stage, _)| is_user_step(stage))
            .cloned()
            .collect();
        let reached_steps = failure.is_none() && !steps.is_empty();
        for (stage, entries) in &steps {
            if failure.is_some() {
                break;
            }
            self.log_line(format!("Executing \"{stage}\" stage of the job script"));
            failure = self.stage(dir, driver, &context, stage, entries, true);
        }

        // What follows runs after a failure or a cancel too, and is not cancelled itself.
        if reached_steps {
            if let Some(entries) = self.entries("after_script") {
                self.log_line("Running after_script");
                if let Some(after_failure) =
                    self.stage(dir, driver, &context, "after_script", &entries, false)
                {
                    self.log_line(format!("WARNING: after_script failed: {after_failure:?}"));
                }
            }
        }
        let succeeded = failure.is_none() && !self.control.is_cancelled();
        let late_stages = if succeeded {
            ["archive_cache", "upload_artifacts_on_success"]
        } else {
            ["archive_cache_on_failure", "upload_artifacts_on_failure"]
        };
        let mut late_failure = None;
        for stage in late_stages {
            if let Some(entries) = self.entries(stage) {
                self.log_line(format!("Running {stage}"));
                let result = self.stage(dir, driver, &context, stage, &entries, false);
                late_failure = late_failure.or(result);
            }
        }
        let has_file_variables = variables.iter().any(|var| var.file);
        let cleanup_entries = self.entries("cleanup_file_variables").or_else(|| {
            has_file_variables.then(|| {
                vec![format!(
                    "rm -rf {}",
                    bash_quote(&context.file_variables_dir())
                )]
            })
        });
        if let Some(entries) = cleanup_entries {
            self.log_line("Cleaning up project directory and file based variables");
            let _ = self.stage(
                dir,
                driver,
                &context,
                "cleanup_file_variables",
                &entries,
                false,
            );
        }

        if self.control.is_cancelled() {
            return JobOutcome::Canceled;
        }
        match failure.or(late_failure) {
            None => JobOutcome::Success,
            Some(Verdict::BuildFailure { exit_code }) => JobOutcome::ScriptFailure { exit_code },
            Some(Verdict::SystemFailure { reason }) => JobOutcome::SystemFailure { reason },
            Some(Verdict::Ok) => JobOutcome::Success,
        }
    }

    fn attempts_variable(&self, name: &str) -> u32 {
        self.job
            .job_vars
            .get(name)
            .and_then(|var| var.value.trim().parse::<u32>().ok())
            .filter(|n| (1..=10).contains(n))
            .unwrap_or(1)
    }

    /// Runs one stage through run_exec; `Some(failure)` unless it succeeded.
    fn stage(
        &mut self,
        dir: &Path,
        driver: &DriverConfig,
        context: &ScriptContext<'_>,
        stage: &str,
        entries: &[String],
        cancellable: bool,
    ) -> Option<Verdict> {
        if cancellable && self.control.is_cancelled() {
            return Some(Verdict::SystemFailure {
                reason: "canceled".into(),
            });
        }
        self.script_sequence += 1;
        let text = render_stage_script(stage, context, entries);
        let script = match write_stage_script(dir, self.script_sequence, &text) {
            Ok(path) => path,
            Err(err) => {
                return Some(Verdict::SystemFailure {
                    reason: format!("cannot write the stage script: {err}"),
                })
            }
        };
        // run_exec gets its own arguments, then the script's path and the stage name.
        let extra = vec![script.into_os_string(), stage.into()];
        let hook = self.job.hook(Executable::Run, dir, extra, &driver.job_env);
        let kind = HookKind::Run {
            stage: stage.to_string(),
        };
        let finished = self.execute(kind, hook, Stream::JobLog, cancellable);
        match self.verdict(dir, &finished) {
            Verdict::Ok => None,
            failure => Some(failure),
        }
    }

    /// cleanup_exec, then the attempt's directory goes, whatever cleanup's exit code: the job
    /// state a driver keeps there never outlives a cleanup.
    fn cleanup(&mut self, dir: tempfile::TempDir, job_env: &BTreeMap<String, String>) {
        let hook = self
            .job
            .hook(Executable::Cleanup, dir.path(), Vec::new(), job_env);
        let finished = self.execute(HookKind::Cleanup, hook, Stream::CleanupLog, false);
        // Its exit code never changes the job's status; the runner only logs it.
        if finished.code != Some(0) {
            let line = format!(
                "WARNING: cleanup_exec exited with {:?} (signal {:?})\n",
                finished.code, finished.signal
            );
            append(&self.cleanup_log, &[], &line);
        }
        let path = dir.path().to_path_buf();
        if let Err(err) = dir.close() {
            append(
                &self.cleanup_log,
                &[],
                &format!("WARNING: removing {}: {err}\n", path.display()),
            );
        }
        self.job_dirs.push(path);
    }

    /// Starts the hook in its own process group, streams its output, and stops it (SIGTERM,
    /// then SIGKILL) on cancel or timeout.
    fn execute(
        &mut self,
        kind: HookKind,
        hook: Hook,
        stream: Stream,
        cancellable: bool,
    ) -> Finished {
        let started = Instant::now();
        let mut command = hook.command();
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (out_sink, err_sink) = match stream {
            Stream::JobLog => (Some(self.control.log.clone()), self.control.log.clone()),
            Stream::CleanupLog => (Some(self.cleanup_log.clone()), self.cleanup_log.clone()),
            Stream::Captured => (None, self.control.log.clone()),
        };
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                self.calls.push(HookCall {
                    kind,
                    attempt: self.attempt,
                    exit_code: None,
                    signal: None,
                    terminated: false,
                    force_killed: false,
                    duration: started.elapsed(),
                });
                return Finished {
                    code: None,
                    signal: None,
                    stdout: String::new(),
                    spawn_error: Some(err.to_string()),
                    timed_out: false,
                };
            }
        };
        let masks = if stream == Stream::CleanupLog {
            Vec::new()
        } else {
            self.masks.clone()
        };
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let captured = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_target = out_sink.unwrap_or_else(|| captured.clone());
        let out_masks = if stream == Stream::Captured {
            Vec::new()
        } else {
            masks.clone()
        };
        let readers = [
            spawn_reader(stdout, out_target, out_masks, done_tx.clone()),
            spawn_reader(stderr, err_sink, masks, done_tx),
        ];

        let (status, terminated, force_killed, timed_out) =
            self.wait_or_stop(&mut child, cancellable, started);

        // Both pipes close when every process holding them is gone.
        let drain_deadline = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
        let mut drained = 0;
        while drained < readers.len() {
            let left = drain_deadline.saturating_duration_since(Instant::now());
            match done_rx.recv_timeout(left) {
                Ok(()) => drained += 1,
                Err(_) => break,
            }
        }
        if drained < readers.len() {
            self.log_line(format!(
                "WARNING: the {kind:?} hook exited but left processes holding its output open"
            ));
        }
        let (code, signal) = match status {
            Some(status) => (status.code(), status.signal()),
            None => (None, None),
        };
        self.calls.push(HookCall {
            kind,
            attempt: self.attempt,
            exit_code: code,
            signal,
            terminated,
            force_killed,
            duration: started.elapsed(),
        });
        let stdout = captured.lock().map(|s| s.clone()).unwrap_or_default();
        Finished {
            code,
            signal,
            stdout,
            spawn_error: None,
            timed_out,
        }
    }

    fn wait_or_stop(
        &self,
        child: &mut Child,
        cancellable: bool,
        started: Instant,
    ) -> (Option<std::process::ExitStatus>, bool, bool, bool) {
        let group = child.id() as libc::pid_t;
        let mut term_sent: Option<Instant> = None;
        let mut force_killed = false;
        let mut timed_out = false;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return (Some(status), term_sent.is_some(), force_killed, timed_out)
                }
                Ok(None) => {}
                Err(_) => return (None, term_sent.is_some(), force_killed, timed_out),
            }
            if term_sent.is_none() {
                let cancelled = cancellable && self.control.is_cancelled();
                timed_out = started.elapsed() >= self.job.hook_timeout;
                if cancelled || timed_out {
                    signal_group(group, libc::SIGTERM);
                    term_sent = Some(Instant::now());
                }
            } else if let Some(sent) = term_sent {
                if !force_killed && sent.elapsed() >= self.job.graceful_kill_timeout {
                    signal_group(group, libc::SIGKILL);
                    force_killed = true;
                }
            }
            thread::sleep(POLL);
        }
    }
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-group, signal);
    }
}

fn append(sink: &Mutex<String>, masks: &[String], text: &str) {
    let mut text = text.to_string();
    for secret in masks {
        text = text.replace(secret.as_str(), "[MASKED]");
    }
    if let Ok(mut log) = sink.lock() {
        log.push_str(&text);
    }
}

fn spawn_reader(
    pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<String>>,
    masks: Vec<String>,
    done: mpsc::Sender<()>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => append(&sink, &masks, &String::from_utf8_lossy(&line)),
            }
        }
        let _ = done.send(());
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<ScriptVariable> {
        vec![
            ScriptVariable {
                name: "CI_JOB_ID".into(),
                value: "42".into(),
                file: false,
            },
            ScriptVariable {
                name: "TRICKY".into(),
                value: "it's \"quoted\"\n$HOME `x` \\ \u{1}".into(),
                file: false,
            },
            ScriptVariable {
                name: "KUBECONFIG".into(),
                value: "apiVersion: v1\n".into(),
                file: true,
            },
        ]
    }

    fn context(variables: &[ScriptVariable]) -> ScriptContext<'_> {
        ScriptContext {
            variables,
            project_dir: "/builds/group/demo",
        }
    }

    #[test]
    fn stage_scripts_have_the_runners_shape() {
        let variables = vars();
        let script = render_stage_script(
            "build_script",
            &context(&variables),
            &["echo hi; exit 3".to_string()],
        );
        assert!(script.starts_with("#!/usr/bin/env bash\n"), "{script}");
        let trap = script.find("trap 'exit 1' TERM").unwrap();
        let pipefail = script.find("set -o pipefail").unwrap();
        let errexit = script.find("set -o errexit").unwrap();
        let open = script.find("\n(\n").unwrap();
        assert!(
            trap < pipefail && pipefail < errexit && errexit < open,
            "{script}"
        );
        assert!(script.ends_with(") < /dev/null\nexit 0\n"), "{script}");
        let export = script.find("export CI_JOB_ID=$'42'").unwrap();
        let cd = script.find("cd $'/builds/group/demo'").unwrap();
        let echo = script.find("echo $'$ echo hi; exit 3'").unwrap();
        let body = script.find("\necho hi; exit 3\n").unwrap();
        assert!(
            open < export && export < cd && cd < echo && echo < body,
            "{script}"
        );
    }

    #[test]
    fn prepare_script_exports_nothing_and_other_stages_export_everything() {
        let variables = vars();
        let prepare = render_stage_script("prepare_script", &context(&variables), &[]);
        assert!(!prepare.contains("export"), "{prepare}");
        for stage in ["get_sources", "after_script", "upload_artifacts_on_failure"] {
            let script = render_stage_script(stage, &context(&variables), &[]);
            assert!(script.contains("export CI_JOB_ID="), "{stage}: {script}");
            assert!(
                script.contains("export KUBECONFIG=$'/builds/group/demo.tmp/KUBECONFIG'"),
                "{stage}: {script}"
            );
        }
        let get_sources = render_stage_script("get_sources", &context(&variables), &[]);
        assert!(!get_sources.contains("cd $"), "{get_sources}");
    }

    #[test]
    fn file_variables_are_written_then_removed_by_cleanup_file_variables() {
        let variables = vars();
        let build = render_stage_script("build_script", &context(&variables), &[]);
        assert!(
            build.contains(
                "printf '%s' $'apiVersion: v1\\n' > $'/builds/group/demo.tmp/KUBECONFIG'"
            ),
            "{build}"
        );
        let cleanup = render_stage_script("cleanup_file_variables", &context(&variables), &[]);
        assert!(!cleanup.contains("printf"), "{cleanup}");
    }

    #[test]
    fn scripts_run_in_bash_with_every_value_intact() {
        let dir = tempfile::tempdir().unwrap();
        let variables = vars();
        let context = ScriptContext {
            variables: &variables,
            project_dir: dir.path().to_str().unwrap(),
        };
        let script = render_stage_script(
            "build_script",
            &context,
            &[
                "printf '%s' \"$TRICKY\" > tricky; cat \"$KUBECONFIG\" > kube".to_string(),
                "exit 3".into(),
            ],
        );
        let path = dir.path().join("script");
        std::fs::write(&path, script).unwrap();
        let status = std::process::Command::new("bash")
            .arg(&path)
            .output()
            .unwrap()
            .status;
        assert_eq!(status.code(), Some(3));
        let tricky = std::fs::read_to_string(dir.path().join("tricky")).unwrap();
        assert_eq!(tricky, variables[1].value);
        let kube = std::fs::read_to_string(dir.path().join("kube")).unwrap();
        assert_eq!(kube, "apiVersion: v1\n");
    }

    #[test]
    fn exit_codes_are_read_as_the_runner_reads_them() {
        assert_eq!(interpret_exit(Some(0), None, Some("7")), Verdict::Ok);
        assert_eq!(
            interpret_exit(Some(BUILD_FAILURE), None, None),
            Verdict::BuildFailure {
                exit_code: BUILD_FAILURE
            }
        );
        assert_eq!(
            interpret_exit(Some(BUILD_FAILURE), None, Some("3\n")),
            Verdict::BuildFailure { exit_code: 3 }
        );
        assert_eq!(
            interpret_exit(Some(BUILD_FAILURE), None, Some(" 42 \ntrailing")),
            Verdict::BuildFailure { exit_code: 42 }
        );
        assert!(matches!(
            interpret_exit(Some(BUILD_FAILURE), None, Some("three")),
            Verdict::SystemFailure { reason } if reason.contains("unknown Custom executor")
        ));
        assert!(matches!(
            interpret_exit(Some(SYSTEM_FAILURE), None, Some("3")),
            Verdict::SystemFailure { .. }
        ));
        assert!(matches!(
            interpret_exit(Some(255), None, None),
            Verdict::SystemFailure { reason } if reason.contains("exit code 255")
        ));
        assert!(matches!(
            interpret_exit(None, Some(9), None),
            Verdict::SystemFailure { reason } if reason.contains("signal: 9")
        ));
    }

    #[test]
    fn driver_json_is_read_leniently_but_invalid_json_fails() {
        assert_eq!(DriverConfig::parse("").unwrap(), DriverConfig::default());
        let driver = DriverConfig::parse(
            r#"{"driver":{"name":"d","version":"1"},"builds_dir":"/b","unknown":1,
                "job_env":{"A":"x"}}"#,
        )
        .unwrap();
        assert_eq!(driver.driver_name.as_deref(), Some("d"));
        assert_eq!(driver.builds_dir.as_deref(), Some("/b"));
        assert_eq!(driver.job_env["A"], "x");
        assert!(DriverConfig::parse("{not json").is_err());
    }

    #[test]
    fn bash_quoting_survives_every_byte() {
        let text: String = (1u8..=127).map(char::from).collect();
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s' {}", bash_quote(&text)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
    }
}
