//! Commands and stage scripts in the VM.
//!
//! A stage runs as `sudo -n -- setsid -w /bin/bash -c '<wait for go>; <record pgid>; exec
//! /bin/bash SCRIPT'` (see [`STAGE_WRAPPER`]):
//! setsid makes the script the leader of a new process group (sudo's child is not a group
//! leader, so setsid does not even fork), and its id is written next to the script. Cancel then
//! kills that whole group over a second channel: OpenSSH ignores "signal" channel requests for
//! root sessions, and closing the channel only hangs up on the script's pipes.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant, SystemTime};

use russh::{ChannelMsg, Sig};

use super::connect::{silence_budget, SessionEnd};
use super::sftp::Sftp;
use super::{CommandOutput, Connection};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::joblog;

/// What to run: the stage script gitlab-runner wrote, and names for messages and files.
pub struct StageScript<'a> {
    pub body: &'a [u8],
    /// Any text (it is data): only a sanitised form appears in the remote file name.
    pub stage: &'a str,
    /// Names the per-job directory in the VM, e.g. `job-1234`.
    pub job_key: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    Exited(u32),
    Killed {
        signal: String,
    },
    /// The VM stopped answering mid-stage: nothing will come back from it.
    Lost(LostConnection),
}

/// A connection that went silent (keepalives unanswered, or TCP gave up), as opposed to one
/// the VM closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostConnection {
    /// When the silence began, as far as we can tell: the last byte from the VM, or the start
    /// of the keepalive budget, whichever is later.
    pub since: SystemTime,
    /// What gave up, e.g. "it stopped answering: nothing arrived for 18 s and ...".
    pub cause: String,
}

impl LostConnection {
    fn after_silence_from(last_heard: Instant, cause: String) -> LostConnection {
        let now = Instant::now();
        let budget_began = now.checked_sub(silence_budget()).unwrap_or(last_heard);
        let silent_for = now.duration_since(last_heard.max(budget_began));
        LostConnection {
            since: SystemTime::now()
                .checked_sub(silent_for)
                .unwrap_or_else(SystemTime::now),
            cause,
        }
    }
}

/// The per-job directory, under the SSH user's home (which nobody else can write into, so no
/// one can plant a symlink there), mode 0700.
const BASE_DIR: &str = ".gitlab-proxmox-runner";
/// How long the remote side waits between SIGTERM and SIGKILL of the script's process group.
const GRACE_TENTHS: u32 = 30;
/// Our own bound on the whole cancel: well inside the runner's force-kill window.
const CANCEL_BOUND: Duration = Duration::from_secs(10);
/// The most of a command's stdout (and of its stderr) kept in memory. What is captured is a
/// few status lines (tool checks, an install's error); the VM is the job's, and a VM that
/// answers with more is misbehaving: the command is abandoned instead of buffered.
const CAPTURE_LIMIT: usize = 64 * 1024;

/// Appends `data` to `buffer` up to [`CAPTURE_LIMIT`]; false once something had to be dropped.
fn capture(buffer: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = CAPTURE_LIMIT.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
    data.len() <= room
}

/// `'...'` for any POSIX shell: the only special character inside single quotes is `'`.
pub(crate) fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A file-name-safe rendering of free text (stage names, job keys).
fn file_safe(text: &str, fallback: &str) -> String {
    let safe: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    if safe.trim_matches('_').is_empty() {
        fallback.to_string()
    } else {
        safe
    }
}

fn signal_name(signal: &Sig) -> String {
    match signal {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// stdout/stderr as raw file descriptors: every chunk is written as it arrives, with no line
/// buffering (std's `Stdout` is line-buffered) and no extra copies.
struct RawOutput {
    file: ManuallyDrop<File>,
    broken: bool,
}

impl RawOutput {
    fn new(fd: i32) -> RawOutput {
        // SAFETY: fds 1 and 2 stay open for the life of the process; ManuallyDrop never closes
        // them.
        RawOutput {
            file: ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }),
            broken: false,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        // The reader went away (the runner died): keep draining the channel so the remote
        // side is not blocked, but stop writing.
        if self.file.write_all(bytes).is_err() {
            self.broken = true;
        }
    }
}

pub(super) async fn exec_capture(connection: &Connection, command: &str) -> Result<CommandOutput> {
    let where_ = connection.describe();
    let fail = |err: russh::Error| Error::ssh(format!("running a command on {where_}"), err);
    let mut channel = connection
        .handle
        .channel_open_session()
        .await
        .map_err(fail)?;
    channel.exec(true, command).await.map_err(fail)?;
    let mut output = CommandOutput {
        status: None,
        signal: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
    };
    let mut eof = false;
    while let Some(message) = channel.wait().await {
        let fits = match message {
            ChannelMsg::Data { data } => capture(&mut output.stdout, &data),
            ChannelMsg::ExtendedData { data, ext: 1 } => capture(&mut output.stderr, &data),
            ChannelMsg::ExitStatus { exit_status } => {
                output.status = Some(exit_status);
                true
            }
            ChannelMsg::ExitSignal { signal_name: s, .. } => {
                output.signal = Some(signal_name(&s));
                true
            }
            ChannelMsg::Eof => {
                eof = true;
                true
            }
            ChannelMsg::Close => break,
            _ => true,
        };
        if !fits {
            output.truncated = true;
            let _ = channel.close().await;
            return Ok(output);
        }
        if eof && (output.status.is_some() || output.signal.is_some()) {
            break;
        }
    }
    if output.status.is_none() && output.signal.is_none() && connection.handle.is_closed() {
        return Err(Error::ssh(
            format!("running a command on {where_}"),
            "the connection was lost before the command finished",
        ));
    }
    Ok(output)
}

struct Started {
    sftp: Sftp,
    channel: russh::Channel<russh::client::Msg>,
    script_path: String,
    pgid_path: String,
}

/// What the stage's shell does: wait for the go line (the script is complete in its file
/// once it comes; EOF instead means the upload failed and nothing runs), record its process
/// group, become the script. `read` takes bytes up to the newline only, so whatever follows
/// on stdin stays the script's.
const STAGE_WRAPPER: &str =
    r#"IFS= read -r go && [ "$go" = go ] && printf '%s\n' "$$" > "$1" && exec /bin/bash "$2""#;

/// Uploads the script into the private per-job directory and starts it. The stage's process
/// (sshd's session, sudo, setsid, bash: most of a stage's fixed cost) starts at once, beside
/// the upload, and waits on its stdin for the go line that is sent once the upload is
/// complete. Paths are relative to the login directory, where both sshd's sessions and
/// sftp-server start.
async fn upload_and_start(connection: &Connection, script: &StageScript<'_>) -> Result<Started> {
    let where_ = connection.describe();
    let job_dir = format!("{BASE_DIR}/{}", file_safe(script.job_key, "job"));
    let script_path = format!(
        "{job_dir}/{:016x}-{}.sh",
        rand::random::<u64>(),
        file_safe(script.stage, "stage")
    );
    let pgid_path = format!("{script_path}.pgid");
    let command = format!(
        "exec sudo -n -- setsid -w /bin/bash -c {} gitlab-proxmox-runner {} {}",
        sh_quote(STAGE_WRAPPER),
        sh_quote(&pgid_path),
        sh_quote(&script_path),
    );
    let upload = async {
        let sftp = Sftp::open(connection).await?;
        match sftp
            .write_private([BASE_DIR, &job_dir], &script_path, script.body)
            .await
        {
            Ok(()) => Ok(sftp),
            Err(err) => {
                sftp.close().await;
                Err(err)
            }
        }
    };
    let start = async {
        let channel = connection.handle.channel_open_session().await?;
        channel.exec(true, command).await?;
        Ok::<_, russh::Error>(channel)
    };
    let (sftp, channel) = tokio::join!(upload, start);
    let channel =
        channel.map_err(|err| Error::ssh(format!("starting the stage script on {where_}"), err));
    let (sftp, channel) = match (sftp, channel) {
        (Ok(sftp), Ok(channel)) => (sftp, channel),
        (Err(err), channel) => {
            // EOF without the go line: the waiting shell exits, the script never runs.
            if let Ok(channel) = channel {
                let _ = channel.eof().await;
                let _ = channel.close().await;
            }
            return Err(err);
        }
        (Ok(sftp), Err(err)) => {
            sftp.close().await;
            return Err(err);
        }
    };
    // Then EOF: a stage that reads stdin gets an empty one instead of waiting forever.
    let go = async {
        channel.data(&b"go\n"[..]).await?;
        channel.eof().await
    };
    go.await
        .map_err(|err| Error::ssh(format!("starting the stage script on {where_}"), err))?;
    Ok(Started {
        sftp,
        channel,
        script_path,
        pgid_path,
    })
}

pub(super) async fn run_stage(
    connection: &Connection,
    script: &StageScript<'_>,
    cancel: &Cancel,
) -> Result<StageOutcome> {
    let where_ = connection.describe();
    let started_at = Instant::now();
    // Nothing runs in the VM yet: a cancel here just stops.
    let prepared = tokio::select! {
        prepared = upload_and_start(connection, script) => match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                if connection.handle.is_closed() {
                    if let Some(SessionEnd::Silent(cause)) = connection.session_end().await {
                        return Ok(StageOutcome::Lost(LostConnection::after_silence_from(
                            started_at, cause,
                        )));
                    }
                }
                return Err(err);
            }
        },
        reason = cancel.cancelled() => {
            return Err(Error::Cancelled(format!(
                "the job was cancelled ({reason}) before the stage {:?} started on {where_}",
                script.stage
            )));
        }
    };
    let Started {
        sftp,
        mut channel,
        script_path,
        pgid_path,
    } = prepared;

    let mut stdout = RawOutput::new(1);
    let mut stderr = RawOutput::new(2);
    // The start of stderr, to explain a sudo that refused to run the script.
    let mut stderr_head: Vec<u8> = Vec::new();
    let mut status: Option<u32> = None;
    let mut signal: Option<String> = None;
    let mut eof = false;
    let mut cancelled: Option<&'static str> = None;
    let mut kill = None;
    let mut give_up = None;
    let mut last_heard = Instant::now();

    loop {
        tokio::select! {
            message = channel.wait() => {
                if message.is_some() {
                    last_heard = Instant::now();
                }
                match message {
                Some(ChannelMsg::Data { data }) => stdout.write(&data),
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    if ext == 1 && stderr_head.len() < 4096 {
                        stderr_head.extend_from_slice(&data[..data.len().min(4096)]);
                    }
                    stderr.write(&data);
                }
                // Exit status and EOF come in either order; once both are in, all output has
                // arrived (EOF covers stderr too) and there is no need to wait for Close.
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    status = Some(exit_status);
                    if eof {
                        break;
                    }
                }
                Some(ChannelMsg::ExitSignal { signal_name: s, .. }) => {
                    signal = Some(signal_name(&s));
                    if eof {
                        break;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    eof = true;
                    if status.is_some() || signal.is_some() {
                        break;
                    }
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
                }
            },
            reason = cancel.cancelled(), if cancelled.is_none() => {
                cancelled = Some(reason);
                joblog::warn(format!(
                    "{reason}: stopping the stage script's processes on {where_}"
                ));
                kill = Some(Box::pin(kill_process_group(connection, &pgid_path)));
                give_up = Some(Box::pin(tokio::time::sleep(CANCEL_BOUND)));
            },
            _ = async { kill.as_mut().expect("guarded").await }, if kill.is_some() => {
                kill = None;
            },
            _ = async { give_up.as_mut().expect("guarded").await }, if give_up.is_some() => {
                break;
            },
        }
    }
    // The script's channel may end (its leader died of SIGTERM) while stragglers of its group
    // still await the SIGKILL: let the kill finish, within the bound.
    if let (Some(kill), Some(give_up)) = (kill.as_mut(), give_up.as_mut()) {
        tokio::select! {
            _ = kill => {}
            _ = give_up => {}
        }
    }
    drop(kill);

    if let Some(reason) = cancelled {
        sftp.close().await;
        let _ = channel.close().await;
        return Err(Error::Cancelled(format!(
            "the job was cancelled ({reason}); the stage {:?} was stopped on {where_}",
            script.stage
        )));
    }
    let outcome = match (status, signal) {
        (_, Some(signal)) => StageOutcome::Killed { signal },
        (Some(code), None) => StageOutcome::Exited(code),
        (None, None) => {
            if let Some(SessionEnd::Silent(cause)) = connection.session_end().await {
                sftp.close().await;
                return Ok(StageOutcome::Lost(LostConnection::after_silence_from(
                    last_heard, cause,
                )));
            }
            return Err(Error::ssh(
                format!("running the stage {:?} on {where_}", script.stage),
                "the connection to the VM was lost mid-stage (no exit status arrived); the VM \
                 may have crashed, rebooted or run out of memory, or the network dropped",
            ));
        }
    };
    if outcome != StageOutcome::Exited(0) && !sftp.exists(&pgid_path).await.unwrap_or(true) {
        // The script never started: sudo (or setsid/bash) failed before it.
        let head = String::from_utf8_lossy(&stderr_head);
        let why =
            if head.contains("password is required") || head.contains("a terminal is required") {
                format!(
                    "sudo wants a password for {:?}; the SSH user needs passwordless sudo, e.g. \
                 `{} ALL=(ALL) NOPASSWD:ALL` in /etc/sudoers.d/ of the template",
                    connection.target.user, connection.target.user
                )
            } else {
                "`sudo -n setsid -w /bin/bash` failed before the script started (see the lines \
             above); the SSH user needs passwordless sudo, and the VM needs setsid (util-linux) \
             and /bin/bash"
                    .to_string()
            };
        sftp.close().await;
        return Err(Error::ssh(
            format!("starting the stage {:?} on {where_}", script.stage),
            why,
        ));
    }
    // The script holds the job's variables (tokens included): no reason to keep it around.
    sftp.remove_quietly(&script_path, &pgid_path).await;
    sftp.close().await;
    Ok(outcome)
}

/// Over a second channel: SIGTERM to the script's process group, up to GRACE_TENTHS/10 s for
/// it to go, then SIGKILL. Waits (briefly) for the group id if the script is only starting.
async fn kill_process_group(connection: &Connection, pgid_path: &str) {
    let script = format!(
        r#"i=0; while [ ! -s "$1" ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
p=$(cat "$1" 2>/dev/null) || exit 0
case "$p" in ''|*[!0-9]*) exit 0;; esac
kill -TERM -- "-$p" 2>/dev/null || exit 0
i=0; while kill -0 -- "-$p" 2>/dev/null && [ $i -lt {GRACE_TENTHS} ]; do sleep 0.1; i=$((i+1)); done
kill -KILL -- "-$p" 2>/dev/null; exit 0"#
    );
    let command = format!(
        "exec sudo -n -- /bin/bash -c {} gitlab-proxmox-runner {}",
        sh_quote(&script),
        sh_quote(pgid_path)
    );
    if let Err(err) = exec_capture(connection, &command).await {
        joblog::warn(format!(
            "could not stop the stage script's processes: {err}; the VM is destroyed at cleanup \
             anyway"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_hostile_text() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(rm -rf /)`x`"), "'$(rm -rf /)`x`'");
    }

    #[test]
    fn stage_names_become_safe_file_names() {
        assert_eq!(file_safe("build_script", "stage"), "build_script");
        assert_eq!(file_safe("../../etc/passwd", "stage"), "______etc_passwd");
        assert_eq!(file_safe("'; rm -rf / #", "stage"), "___rm_-rf____");
        assert_eq!(file_safe("", "stage"), "stage");
        assert_eq!(file_safe("///", "stage"), "stage");
        assert_eq!(file_safe(&"x".repeat(500), "stage").len(), 48);
    }
}
