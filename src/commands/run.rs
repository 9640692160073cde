//! run_exec: run one stage script inside the job's VM over SSH.
//!
//! One connection per stage carries both the SFTP upload and the exec. The VM's host key is the
//! one prepare pinned in the job state; the stage name is only data (messages, a sanitised file
//! name), never part of a command line.
//!
//! A stage that loses its VM (it stops answering mid-stage, or never answers at the stage's
//! start) records that in the job state; every later stage of the job then fails at once
//! instead of waiting for a VM that is gone, and cleanup destroys it through the API as always.

use std::path::Path;
use std::time::SystemTime;

use zeroize::Zeroizing;

use crate::commands::Context;
use crate::error::{Error, Result};
use crate::joblog;
use crate::ssh::{self, Deadlines, HostKeyCheck, StageOutcome, StageScript, Target};
use crate::state::{JobState, Lost, Phase};
use crate::vm::ssh_key::KeyPath;

pub async fn run(context: &Context, script: &Path, stage: &str) -> Result<()> {
    let ended = run_in_vm(context, script, stage).await;
    // Whatever happened, $BUILD_EXIT_CODE_FILE now speaks for this stage: the runner reads it
    // after every build-failure exit, and a code left by an earlier stage would be reported
    // as this one's.
    let reported = match &ended {
        Ok(Ended::Exited(code)) if *code != 0 => Some(*code),
        Ok(Ended::Killed(signal)) => exit_code_of_signal(signal),
        _ => None,
    };
    let recorded = record_build_exit_code(reported);
    match ended? {
        Ended::Exited(0) => recorded,
        Ended::Exited(code) => {
            recorded?;
            Err(Error::ScriptFailed { code })
        }
        Ended::Killed(signal) => {
            recorded?;
            Err(Error::ScriptKilled {
                signal: format!("SIG{signal}"),
            })
        }
    }
}

/// How the stage's script ended in the VM.
enum Ended {
    Exited(u32),
    Killed(String),
}

/// Runs the stage; a lost VM is recorded in the job state and comes back as an error.
async fn run_in_vm(context: &Context, script: &Path, stage: &str) -> Result<Ended> {
    let mut state = JobState::load(&context.job_dir)?.ok_or_else(|| {
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
        port: state.ssh_port.unwrap_or(context.settings.ssh.port),
        user: state
            .ssh_user
            .clone()
            .unwrap_or_else(|| context.settings.ssh.user.clone()),
        vm_label,
    };
    let body = Zeroizing::new(std::fs::read(script).map_err(|err| {
        Error::io(
            format!("cannot read the stage script {}", script.display()),
            err,
        )
    })?);
    // The key first: a job whose key is unusable hears about that, not about the VM.
    let key_path = match &state.ssh_key_nonce {
        Some(nonce) => KeyPath::Derived {
            nonce: nonce.clone(),
            fleet: state.ssh_key_fleet.clone(),
        },
        None => KeyPath::Static,
    };
    let vm = crate::vm::VmRef {
        node: state.node.clone(),
        vmid: state.vmid,
    };
    // Derived again here, in memory, from the nonce prepare recorded: nothing on disk holds it.
    let key = crate::vm::ssh_key::private_key(&context.settings, &vm, &key_path)?;
    if let Some(lost) = &state.lost {
        return Err(Error::Infrastructure(format!(
            "{} has been unreachable since {} (lost during {}); not retrying",
            target.vm_label,
            lost.since_utc(),
            lost.stage.escape_debug()
        )));
    }
    let check = HostKeyCheck::Pinned(state.host_keys.clone());
    let deadlines = Deadlines::for_stages(context.settings.boot_timeout);

    let connecting_since = SystemTime::now();
    let connection =
        match ssh::connect_for_stage(&target, key, &check, deadlines, &context.cancel).await {
            Ok(connection) => connection,
            Err(failure) => {
                if failure.unreachable {
                    record_lost(context, &mut state, &target, connecting_since, stage);
                }
                return Err(failure.error);
            }
        };
    let where_ = connection.describe();
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
        StageOutcome::Lost(lost) => {
            record_lost(context, &mut state, &target, lost.since, stage);
            Err(Error::ssh(
                format!("running the stage {stage:?} on {where_}"),
                format!(
                    "the VM was lost mid-stage: {}. It crashed, or its network (bridge, \
                     firewall, the node's uplink) went away; check it on the node. Later stages \
                     of this job will not try to reach it, and cleanup destroys it",
                    lost.cause
                ),
            ))
        }
        StageOutcome::Exited(code) => Ok(Ended::Exited(code)),
        StageOutcome::Killed { signal } => Ok(Ended::Killed(signal)),
    }
}

/// Remembers in the job state that the VM is gone, so that later stages fail at once.
fn record_lost(
    context: &Context,
    state: &mut JobState,
    target: &Target,
    since: SystemTime,
    stage: &str,
) {
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    state.lost = Some(Lost {
        since,
        stage: stage.to_string(),
    });
    if let Err(err) = state.save(&context.job_dir) {
        joblog::warn(format!(
            "could not record that {} is unreachable ({err}); later stages will try to reach \
             it again",
            target.vm_label
        ));
    }
}

/// The code a shell reports for a process killed by `signal` (128 + its number), so that the
/// job shows e.g. 137 for SIGKILL (the OOM killer), as other executors do. `None` for a
/// signal name we do not know.
fn exit_code_of_signal(signal: &str) -> Option<u32> {
    let number = match signal.trim_start_matches("SIG") {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "SYS" => libc::SIGSYS,
        _ => return None,
    };
    u32::try_from(128 + number).ok()
}

/// `$BUILD_EXIT_CODE_FILE` gets the script's own exit code, so that the job reports it and
/// `allow_failure: exit_codes: [N]` works; with no code to report (success, a system failure,
/// an unknown signal) the file is removed, so the runner falls back to the hook's own exit.
fn record_build_exit_code(code: Option<u32>) -> Result<()> {
    let Some(path) = std::env::var_os("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let path = Path::new(&path);
    let written = match code {
        Some(code) => std::fs::write(path, format!("{code}\n")),
        None => match std::fs::remove_file(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    written.map_err(|err| {
        Error::io(
            format!(
                "cannot update the exit code in {} ($BUILD_EXIT_CODE_FILE)",
                path.display()
            ),
            err,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killed_stages_report_what_a_shell_would() {
        assert_eq!(exit_code_of_signal("KILL"), Some(137));
        assert_eq!(exit_code_of_signal("SIGTERM"), Some(143));
        assert_eq!(exit_code_of_signal("SEGV"), Some(139));
        assert_eq!(exit_code_of_signal("RTMIN+3"), None);
        assert_eq!(exit_code_of_signal(""), None);
    }
}
