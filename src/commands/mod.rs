//! One module per hook. `execute` is everything `main` does after parsing the command line.

pub mod cleanup;
pub mod config;
pub mod gc;
pub mod prepare;
pub mod run;

use std::path::PathBuf;

use crate::cancel::Cancel;
use crate::cli::{Cli, Command};
use crate::error::{Error, ExitCodes, Result};
use crate::job::JobInfo;
use crate::settings::{self, Settings};
use crate::{hardening, joblog};

/// What every hook gets.
pub struct Context {
    pub settings: Settings,
    pub job: JobInfo,
    /// The per-job directory (`$TMPDIR`) where the job state lives.
    pub job_dir: PathBuf,
    pub cancel: Cancel,
    pub exit_codes: ExitCodes,
}

/// Runs the hook and returns the process exit code.
pub fn execute(cli: Cli) -> i32 {
    let exit_codes = ExitCodes::from_env();
    // Settings are read while the process is single-threaded, then the secret values are wiped
    // from the environment block before any thread (the tokio runtime's included) exists.
    let loaded = Settings::load(cli.config.as_deref());
    hardening::scrub_environment(settings::secret_names());

    let is_cleanup = matches!(cli.command, Command::Cleanup);
    let result = loaded.and_then(|settings| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| Error::io("cannot start the async runtime", err))?;
        runtime.block_on(async move {
            let cancel = Cancel::on_signals()
                .map_err(|err| Error::io("cannot install signal handlers", err))?;
            let context = Context {
                settings,
                job: JobInfo::from_env(),
                job_dir: crate::state::job_dir(),
                cancel,
                exit_codes,
            };
            dispatch(context, cli.command).await
        })
    });

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

async fn dispatch(context: Context, command: Command) -> Result<()> {
    match command {
        Command::Config => config::config(&context).await,
        Command::Prepare => prepare::prepare(&context).await,
        Command::Run { script, stage } => run::run(&context, &script, &stage).await,
        Command::Cleanup => cleanup::cleanup(&context).await,
        Command::Gc {
            runner,
            max_age,
            dry_run,
        } => gc::gc(&context, runner.as_deref(), max_age.as_deref(), dry_run).await,
    }
}
