//! run_exec: run one stage script inside the job's VM over SSH.
//!
//! One connection per stage carries both the SFTP upload and the exec. The VM's host key is the
//! one prepare pinned in the job state; the stage name is only data (messages, a sanitised file
//! name), never part of a command line.

use std::path::Path;

use zeroize::Zeroizing;

use crate::commands::Context;
use crate::error::{Error, Result};
use crate::ssh::{self, HostKeyCheck, StageOutcome, StageScript, Target};
use crate::state::{JobState, Phase};

pub async fn run(context: &Context, script: &Path, stage: &str) -> Result<()> {
    let state = JobState::load(&context.job_dir)?.ok_or_else(|| {
        Error::Infrastructure(format!(
            "no job state in {} for the stage {stage:?}: prepare did not run or did not finish \
             in this job directory",
            context.job_dir.display()
        ))
    })?;
    let vm_label = format!("VM {} on {}", state.vmid, state.node);
    let (Some(ip), true) = (state.ip.clone(), state.phase >= Phase::Ready) else {
        return Err(Error::Infrastructure(format!(
            "{vm_label} is not ready for the stage {stage:?} (prepare got as far as {:?}); \
             prepare must finish first",
            state.phase
        )));
    };
    let target = Target {
        host: ip,
        port: state.ssh_port.unwrap_or(context.settings.ssh_port),
        user: state
            .ssh_user
            .clone()
            .unwrap_or_else(|| context.settings.ssh_user.clone()),
        vm_label,
    };
    let body = Zeroizing::new(std::fs::read(script).map_err(|err| {
        Error::io(
            format!("cannot read the stage script {}", script.display()),
            err,
        )
    })?);
    let key = ssh::load_private_key(&context.settings)?;
    let check = HostKeyCheck::Pinned(state.host_keys.clone());

    let connection =
        ssh::connect_for_stage(&target, key, &check, &context.settings, &context.cancel).await?;
    let job_key = match context.job.job_id {
        Some(id) => format!("job-{id}"),
        None => format!("vm-{}", state.vmid),
    };
    let stage_script = StageScript {
        body: &body,
        stage,
        job_key: &job_key,
    };
    let outcome = connection.run_stage(&stage_script, &context.cancel).await;
    connection.close().await;
    match outcome? {
        StageOutcome::Exited(0) => Ok(()),
        StageOutcome::Exited(code) => {
            record_build_exit_code(code)?;
            Err(Error::ScriptFailed { code })
        }
        StageOutcome::Killed { signal } => Err(Error::ScriptKilled {
            signal: format!("SIG{signal}"),
        }),
    }
}

/// `$BUILD_EXIT_CODE_FILE` gets the script's own exit code, so that the job reports it and
/// `allow_failure: exit_codes: [N]` works.
fn record_build_exit_code(code: u32) -> Result<()> {
    let Some(path) = std::env::var_os("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    std::fs::write(&path, format!("{code}\n")).map_err(|err| {
        Error::io(
            format!(
                "cannot write the exit code to {} ($BUILD_EXIT_CODE_FILE)",
                Path::new(&path).display()
            ),
            err,
        )
    })
}
