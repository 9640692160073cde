//! Waiting for a condition without fixed sleeps: poll it, give up at a limit. The one loop the
//! tests and the testkit use, so that a wait never turns into a timed assertion by accident.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_for`] looks: often enough that a test waits little past the event, rarely
/// enough that polling the fake's request log stays cheap.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `condition` every [`POLL`] until it gives a value; panics naming `what` after `limit`.
#[track_caller]
pub fn wait_for<T>(what: &str, limit: Duration, condition: impl FnMut() -> Option<T>) -> T {
    wait_for_every(what, limit, POLL, condition)
}

/// [`wait_for`], looking every `every`: for a test that acts the moment the condition holds
/// (a SIGTERM meant to land inside a short window).
#[track_caller]
pub fn wait_for_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    condition: impl FnMut() -> Option<T>,
) -> T {
    match poll(limit, every, condition) {
        Some(value) => value,
        None => panic!("timed out waiting for {what}"),
    }
}

/// Polls `condition` every `every` until it gives a value; `None` once `limit` has passed (for
/// waits whose caller says what went wrong, or where giving up is not a failure).
pub fn poll<T>(
    limit: Duration,
    every: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = condition() {
            return Some(value);
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] for async conditions (API reads in tokio tests): sleeps without blocking the runtime.
pub async fn poll_async<T, F, Fut>(limit: Duration, every: Duration, mut condition: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return Some(value);
        }
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_gives_the_first_value_and_none_at_the_limit() {
        let mut calls = 0;
        let value = poll(Duration::from_secs(10), Duration::ZERO, || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(value, Some(3));
        assert_eq!(
            poll(Duration::ZERO, Duration::ZERO, || None::<()>),
            None,
            "a condition that never holds gives up"
        );
    }

    #[test]
    #[should_panic(expected = "timed out waiting for the impossible")]
    fn wait_for_names_what_it_waited_for() {
        wait_for("the impossible", Duration::ZERO, || None::<()>);
    }
}
