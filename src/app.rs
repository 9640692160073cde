//! Everything `main` does after parsing the command line: load the settings, start the async
//! runtime and the cancellation token, build the context the command's family needs, run it,
//! and turn its error into the exit code its caller expects.
//!
//! Two families: the job hooks (config, prepare, run, cleanup) run by gitlab-runner for one job,
//! and the fleet commands (gc, check) run by an admin, cron or a timer, outside any job. Only the job
//! hooks read `$JOB_RESPONSE_FILE`, the job's identity and the runner's exit codes.

use std::path::Path;

use crate::cancel::Cancel;
use crate::cli::{Cli, Command};
use crate::commands::{cleanup, config, gc, pool, prepare, run};
use crate::config::{secret_names, Settings};
use crate::error::{Error, ExitCodes, Result};
use crate::job::JobInfo;
use crate::{hardening, joblog};

pub use crate::commands::Context;
pub use crate::fleet::FleetContext;

/// Runs the command and returns the process exit code.
pub fn execute(cli: Cli) -> i32 {
    let file = cli.config;
    // The settings file whose mode prepare and pool warn about.
    let settings_file = crate::config::config_file_path(file.as_deref());
    match cli.command {
        Command::Gc {
            runner,
            max_age,
            dry_run,
            metrics_file,
        } => fleet_command(file.as_deref(), |context| async move {
            let (runner, max_age) = (runner.as_deref(), max_age.as_deref());
            match metrics_file {
                Some(path) => {
                    gc::gc_with_metrics_file(&context, runner, max_age, dry_run, &path).await
                }
                None => gc::gc(&context, runner, max_age, dry_run).await,
            }
        }),
        Command::Check { smoke, format } => fleet_check(file.as_deref(), smoke, format),
        Command::Pool {
            action: Some(crate::cli::PoolAction::Status { json }),
            ..
        } => fleet_command(file.as_deref(), |context| async move {
            pool::status(&context, json).await
        }),
        Command::Pool {
            action: None,
            id,
            interval,
            gc_every,
            metrics_listen,
        } => fleet_command(file.as_deref(), |context| async move {
            let options = pool::Options {
                id: id.as_deref(),
                interval,
                gc_every,
                metrics_listen,
                settings_file: settings_file.as_deref(),
            };
            pool::pool(&context, options).await
        }),
        Command::FleetKey => match crate::fleet_key::FleetKey::generate() {
            Ok(key) => {
                println!("PROXMOX_FLEET_KEY = \"{}\"", key.as_str());
                0
            }
            Err(err) => {
                eprintln!("gitlab-proxmox-runner: {err}");
                1
            }
        },
        Command::Config => job_hook(file.as_deref(), false, |context| async move {
            config::config(&context).await
        }),
        Command::Prepare => job_hook(file.as_deref(), false, |context| async move {
            // One line in the job log per secret file other local users can read.
            crate::config::file_modes::warn_exposed(settings_file.as_deref(), &context.settings);
            prepare::prepare(&context).await
        }),
        Command::Run { script, stage } => job_hook(file.as_deref(), false, |context| async move {
            run::run(&context, &script, &stage).await
        }),
        Command::Cleanup => job_hook(file.as_deref(), true, |context| async move {
            cleanup::cleanup(&context).await
        }),
    }
}

/// A hook gitlab-runner runs for one job: the job's variable names (`$JOB_RESPONSE_FILE`) take
/// part in the settings' trust rule, the job's identity and directory come from the runner's
/// environment, and errors map to the exit codes the runner asked for.
fn job_hook<F, Fut>(file: Option<&Path>, is_cleanup: bool, hook: F) -> i32
where
    F: FnOnce(Context) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let exit_codes = ExitCodes::from_env();
    let loaded = Settings::load(file);
    let result = with_runtime(loaded, |settings, cancel| {
        crate::vm::task::remember_durations(&settings);
        crate::ssh::set_keepalive_interval(settings.ssh.keepalive_interval);
        hook(Context {
            settings,
            job: JobInfo::from_env(),
            job_dir: crate::state::job_dir(),
            cancel,
        })
    });
    exit_code(result, exit_codes, is_cleanup)
}

/// A command run by an admin, cron or a timer, outside any job: no job variables, no job
/// directory; the plain exit codes (1: the request was wrong, 2: the infrastructure failed).
fn fleet_command<F, Fut>(file: Option<&Path>, command: F) -> i32
where
    F: FnOnce(FleetContext) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let loaded = Settings::load_for_fleet(file);
    let result = with_runtime(loaded, |settings, cancel| {
        crate::vm::task::remember_durations(&settings);
        crate::ssh::set_keepalive_interval(settings.ssh.keepalive_interval);
        command(FleetContext { settings, cancel })
    });
    exit_code(result, ExitCodes::FALLBACK, false)
}

/// The preflight: a fleet command whose settings failing to load is one of its findings, and
/// whose exit code is its verdict (see [`crate::check`]).
fn fleet_check(file: Option<&Path>, smoke: bool, format: crate::cli::CheckFormat) -> i32 {
    let loaded = Settings::load_for_fleet(file);
    if let Ok(settings) = &loaded {
        crate::ssh::set_keepalive_interval(settings.ssh.keepalive_interval);
    }
    let source = crate::commands::check::settings_source(file);
    let result = with_runtime(Ok(()), |(), cancel| async move {
        let options = crate::commands::check::Options {
            smoke,
            format,
            source,
            config_file: crate::config::config_file_path(file),
        };
        Ok(crate::commands::check::run(loaded, &options, &cancel).await)
    });
    result.unwrap_or_else(|err| {
        joblog::error(err.to_string());
        crate::commands::check::EXIT_NOT_RUN
    })
}

/// Wipes the secrets from the environment, then runs `command` on a current-thread runtime
/// with SIGTERM/SIGINT cancelling its token.
fn with_runtime<S, T, F, Fut>(loaded: Result<S>, command: F) -> Result<T>
where
    F: FnOnce(S, Cancel) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    // Settings are read while the process is single-threaded, then the secret values are wiped
    // from the environment block before any thread (the tokio runtime's included) exists.
    hardening::scrub_environment(secret_names());
    let settings = loaded?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Error::io("cannot start the async runtime", err))?;
    runtime.block_on(async move {
        let cancel =
            Cancel::on_signals().map_err(|err| Error::io("cannot install signal handlers", err))?;
        command(settings, cancel).await
    })
}

fn exit_code(result: Result<()>, exit_codes: ExitCodes, is_cleanup: bool) -> i32 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            joblog::error(err.to_string());
            if is_cleanup {
                joblog::error(
                    "cleanup did not finish; `gitlab-proxmox-runner gc` will sweep what is left",
                );
            }
            exit_codes.for_blame(err.blame())
        }
    }
}
