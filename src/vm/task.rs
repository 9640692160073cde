//! Waiting for a Proxmox task (UPID) to end.

use std::time::{Duration, Instant};

use super::Log;
use crate::joblog;
use crate::poll::Poll;
use crate::proxmox::{ApiError, ApiErrorKind, Client, TaskOutcome, Upid};

/// Closest pause between two looks at a task.
const MIN_TASK_POLL: Duration = Duration::from_millis(50);
/// Farthest: a 30-minute full clone costs PVE about 1800 status reads.
const MAX_TASK_POLL: Duration = Duration::from_secs(1);

/// How long a task of this type usually takes on a healthy node (a linked clone on thin
/// storage, a start, a hard stop, a delete): no task ends much sooner, so the first look comes
/// after 3/5 of it, and later ones 1/5 of the time waited apart. A job's four tasks cost
/// about 16 status reads instead of the ~100 of polling 20-100 ms apart, and each is seen
/// less than 20% (typically ~40 ms) late.
pub fn typical_duration(task_type: &str) -> Duration {
    match task_type {
        "qmclone" => Duration::from_millis(1000),
        "qmstart" | "qmstop" | "qmshutdown" | "qmdestroy" => Duration::from_millis(500),
        // resize and anything else: short, but not instant.
        _ => Duration::from_millis(200),
    }
}

/// Polls a task until it stops or `deadline` passes (see [`typical_duration`] for when). A
/// long task prints a progress line every 10 s.
pub async fn wait(
    client: &Client,
    upid: &Upid,
    deadline: Instant,
    log: &dyn Log,
) -> Result<TaskOutcome, ApiError> {
    let first_look = typical_duration(&upid.task_type) * 3 / 5;
    let first_look = first_look.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(first_look).await;
    let mut poll = Poll::proportional(deadline, first_look, MIN_TASK_POLL, MAX_TASK_POLL);
    loop {
        if let Some(outcome) = client.task_status(upid).await?.outcome() {
            return Ok(outcome);
        }
        poll.pause(|waited| {
            log.info(&format!(
                "{} {} on {} still running after {}",
                upid.task_type,
                upid.id,
                upid.node,
                joblog::secs(waited)
            ))
        })
        .await
        .map_err(|expired| {
            ApiError::new(
                ApiErrorKind::Timeout,
                format!(
                    "task {upid} still running after {} when we stopped waiting",
                    joblog::secs(expired.waited)
                ),
            )
        })?;
    }
}

/// Waits for a task and turns a failed one into an error (`WARNINGS: N` is success).
pub async fn finish(
    client: &Client,
    upid: &Upid,
    deadline: Instant,
    log: &dyn Log,
) -> Result<(), ApiError> {
    match wait(client, upid, deadline, log).await? {
        TaskOutcome::Ok | TaskOutcome::Warnings(_) => Ok(()),
        TaskOutcome::Failed(message) => Err(ApiError::new(ApiErrorKind::Task, message)),
    }
}
