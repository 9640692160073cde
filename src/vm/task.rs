//! Waiting for a Proxmox task (UPID) to end.

use std::time::Instant;

use super::Log;
use crate::joblog;
use crate::poll::Poll;
use crate::proxmox::{ApiError, ApiErrorKind, Client, TaskOutcome, Upid};

/// Polls a task until it stops or `deadline` passes. A long task prints a progress line every
/// 10 s.
pub async fn wait(
    client: &Client,
    upid: &Upid,
    deadline: Instant,
    log: &dyn Log,
) -> Result<TaskOutcome, ApiError> {
    let mut poll = Poll::until(deadline);
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
