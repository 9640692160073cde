//! The one way the driver waits for something it can only observe by asking again: a task to
//! end, a lock to clear, the guest agent to report an address, a clone slot to free up, sshd to
//! accept. A [`Poll`] holds the deadline, the pause schedule and when the next progress line is
//! due; the caller looks, and when the wait is not over calls [`Poll::pause`]. It depends on
//! nothing of the driver, so the engine (`vm`) and the SSH client (`ssh`) both use it.

use std::time::{Duration, Instant};

// tokio's clock inside: the same as std's in the driver, and pausable in tests.
use tokio::time::Instant as Clock;

/// Status polls (tasks, locks, the guest agent): the time between a task's end (or the agent
/// coming up) and our noticing it is added to every job. So while a wait is young, the next
/// poll comes after 1/20 of the time waited so far (20 ms at least, [`FAST_POLL_MAX`] at most):
/// we notice at most 5% (and 100 ms) late. Nearly every linked clone, start, stop, delete and
/// boot ends within [`FAST_POLL_PHASE`]; after it, polls slow down by 25% a step to
/// [`SLOW_POLL_MAX`], so that a 30-minute full clone costs PVE about 1900 status reads, not
/// the 18000 of polling 100 ms apart throughout.
pub const MIN_POLL_DELAY: Duration = Duration::from_millis(20);
pub const FAST_POLL_MAX: Duration = Duration::from_millis(100);
pub const FAST_POLL_PHASE: Duration = Duration::from_secs(15);
pub const SLOW_POLL_MAX: Duration = Duration::from_secs(1);
/// A wait that lasts says so this often, so a job log never looks hung.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The pause before the next poll of a wait that began `elapsed` ago (see [`FAST_POLL_MAX`]).
pub fn next_poll_delay(previous: Duration, elapsed: Duration) -> Duration {
    if elapsed < FAST_POLL_PHASE {
        (elapsed / 20).clamp(MIN_POLL_DELAY, FAST_POLL_MAX)
    } else {
        (previous * 5 / 4).clamp(FAST_POLL_MAX, SLOW_POLL_MAX)
    }
}

/// How long to pause between looks.
#[derive(Debug, Clone, Copy)]
enum Schedule {
    /// [`next_poll_delay`]: close while young, slower later. For API state.
    Adaptive { delay: Duration },
    /// A random pause in `min..min + spread`: for waiters that compete for the same thing (clone
    /// slots), so they do not look in lockstep.
    Jittered { min: Duration, spread: Duration },
    /// Doubling from a first pause up to `max`, giving up as soon as the next pause would reach
    /// the deadline: for attempts that need time of their own (an SSH handshake).
    Doubling { delay: Duration, max: Duration },
    /// A fixed share of the time waited so far, in `min..=max`: for waits whose every look
    /// costs the API something (see [`Poll::proportional`]).
    Proportional {
        delay: Duration,
        min: Duration,
        max: Duration,
    },
}

/// The share of the time waited so far that a [`Poll::proportional`] wait pauses: it notices
/// the end at most 1/5 of the wait late, and a wait of `t` costs about `ln(t / first) / ln 1.2`
/// looks.
const PROPORTIONAL_SHARE: u32 = 5;

/// The deadline passed while the wait was not over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub waited: Duration,
}

#[derive(Debug)]
pub struct Poll {
    started: Clock,
    deadline: Clock,
    next_progress: Clock,
    /// When the last pause ended (the wait began): the look since then took its share of the
    /// next pause on a proportional schedule.
    last_wake: Clock,
    schedule: Schedule,
    /// A look due at this time (a learned end): no pause runs past it, and then `fine`.
    due: Option<(Clock, Duration, u32)>,
    /// Short pauses to take, whatever the schedule says: (pause, how many).
    fine: Option<(Duration, u32)>,
}

impl Poll {
    /// A wait for API state, until `deadline`, on the adaptive schedule.
    pub fn until(deadline: Instant) -> Poll {
        Poll::with(
            deadline,
            Schedule::Adaptive {
                delay: MIN_POLL_DELAY,
            },
        )
    }

    /// A wait whose pauses are random in `min..min + spread`.
    pub fn jittered(deadline: Instant, min: Duration, spread: Duration) -> Poll {
        Poll::with(deadline, Schedule::Jittered { min, spread })
    }

    /// A wait whose pauses double from `first` to `max`; it ends when the next pause would
    /// reach the deadline, since an attempt right at the deadline has no time to succeed.
    pub fn doubling(deadline: Instant, first: Duration, max: Duration) -> Poll {
        Poll::with(deadline, Schedule::Doubling { delay: first, max })
    }

    /// A wait whose pauses are 1/5 of the time waited so far, in `min..=max`; the time before
    /// the first look (spent by the caller, e.g. a task's typical duration) counts as waited
    /// when `already_waited` says so. Each look costs an API request (or, for the guest agent,
    /// an API worker for seconds): the pauses grow with the wait instead of staying short.
    pub fn proportional(
        deadline: Instant,
        already_waited: Duration,
        min: Duration,
        max: Duration,
    ) -> Poll {
        let mut poll = Poll::with(
            deadline,
            Schedule::Proportional {
                delay: (already_waited / PROPORTIONAL_SHARE).clamp(min, max),
                min,
                max,
            },
        );
        poll.started = poll
            .started
            .checked_sub(already_waited)
            .unwrap_or(poll.started);
        poll
    }

    fn with(deadline: Instant, schedule: Schedule) -> Poll {
        let started = Clock::now();
        Poll {
            started,
            deadline: Clock::from_std(deadline),
            next_progress: started + PROGRESS_EVERY,
            last_wake: started,
            schedule,
            due: None,
            fine: None,
        }
    }

    /// Adds a look `at` after the wait began (when this host learned such waits end): no
    /// pause runs past it, and the `looks` pauses after it are `fine` long, since the end is
    /// expected about then; then the schedule again. No look comes later than the schedule
    /// alone would bring it, so a wrong guess costs looks, never lateness.
    pub fn with_due(mut self, at: Duration, fine: Duration, looks: u32) -> Poll {
        self.due = Some((self.started + at, fine, looks));
        self
    }

    /// Time since the wait began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time left until the deadline (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Clock::now())
    }

    /// Called after a look that found the wait not over: `Err` once the deadline has passed;
    /// otherwise calls `progress` with the time waited when a progress line is due, then sleeps
    /// until the next look (never past the deadline).
    pub async fn pause(&mut self, progress: impl FnOnce(Duration)) -> Result<(), Expired> {
        let now = Clock::now();
        let scheduled = match self.schedule {
            Schedule::Adaptive { delay } | Schedule::Doubling { delay, .. } => delay,
            // A look that took long (an agent call held until QEMU's agent timeout) was
            // waiting too: only the rest of the pause is left, and at least `min`.
            Schedule::Proportional { delay, min, .. } => {
                delay.saturating_sub(now - self.last_wake).max(min)
            }
            Schedule::Jittered { min, spread } => {
                let spread_ms = spread.as_millis().max(1) as u64;
                min + Duration::from_millis(rand::random::<u64>() % spread_ms)
            }
        };
        // The due look has been made (or a long look overran it): the close looks begin.
        if let Some((due, fine, looks)) = self.due {
            if now >= due {
                self.due = None;
                self.fine = (looks > 0).then_some((fine, looks));
            }
        }
        let pause = match &mut self.fine {
            Some((pause, looks)) => {
                let pause = *pause;
                *looks -= 1;
                if *looks == 0 {
                    self.fine = None;
                }
                pause
            }
            None => scheduled,
        };
        let pause = match self.due {
            Some((due, _, _)) if now + pause >= due => due - now,
            _ => pause,
        };
        let over = match self.schedule {
            Schedule::Doubling { .. } => now + pause >= self.deadline,
            _ => now >= self.deadline,
        };
        if over {
            return Err(Expired {
                waited: self.elapsed(),
            });
        }
        if now >= self.next_progress {
            progress(self.elapsed());
            self.next_progress = now + PROGRESS_EVERY;
        }
        tokio::time::sleep_until(now + pause.min(self.deadline - now)).await;
        self.last_wake = Clock::now();
        // The adaptive schedule grows with the time waited, the sleep just taken included.
        let waited = self.elapsed();
        match &mut self.schedule {
            Schedule::Adaptive { delay } => *delay = next_poll_delay(*delay, waited),
            Schedule::Doubling { delay, max } => *delay = (*delay * 2).min(*max),
            Schedule::Proportional { delay, min, max } => {
                *delay = (waited / PROPORTIONAL_SHARE).clamp(*min, *max)
            }
            Schedule::Jittered { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_stay_close_while_a_wait_is_young_then_slow_down() {
        let mut delay = MIN_POLL_DELAY;
        let mut elapsed = Duration::ZERO;
        let mut polls = 0;
        while elapsed < FAST_POLL_PHASE {
            delay = next_poll_delay(delay, elapsed);
            // Never more than 5% of the wait late (or 20 ms), never more than 100 ms.
            assert!(delay <= FAST_POLL_MAX, "{delay:?} apart at {elapsed:?}");
            assert!(
                delay <= MIN_POLL_DELAY.max(elapsed / 20),
                "{delay:?} apart at {elapsed:?}"
            );
            elapsed += delay;
            polls += 1;
        }
        assert!(polls <= 200, "{polls} polls in the fast phase");
        for _ in 0..20 {
            delay = next_poll_delay(delay, elapsed);
            elapsed += delay;
        }
        assert_eq!(delay, SLOW_POLL_MAX);
        let slow_phase = Duration::from_secs(30 * 60);
        let mut polls = 0;
        while elapsed < slow_phase {
            delay = next_poll_delay(delay, elapsed);
            elapsed += delay;
            polls += 1;
        }
        assert!(polls <= 1800, "{polls} polls in a 30-minute wait");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_reports_progress_every_ten_seconds_and_ends_at_its_deadline() {
        let deadline = Clock::now() + Duration::from_secs(25);
        let mut poll = Poll::until(deadline.into_std());
        let mut progress = Vec::new();
        let expired = loop {
            if let Err(expired) = poll.pause(|waited| progress.push(waited.as_secs())).await {
                break expired;
            }
        };
        assert_eq!(progress, vec![10, 20]);
        assert!(expired.waited >= Duration::from_secs(25), "{expired:?}");
        assert!(Clock::now() >= deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn doubling_pauses_give_up_before_sleeping_into_the_deadline() {
        let start = Clock::now();
        let deadline = start + Duration::from_millis(1000);
        let mut poll = Poll::doubling(
            deadline.into_std(),
            Duration::from_millis(100),
            Duration::from_millis(500),
        );
        let mut pauses = Vec::new();
        let expired = loop {
            let before = Clock::now();
            match poll.pause(|_| {}).await {
                Ok(()) => pauses.push((Clock::now() - before).as_millis()),
                Err(expired) => break expired,
            }
        };
        // 100 + 200 + 400 = 700 ms; the next 500 ms pause would reach the deadline.
        assert_eq!(pauses, vec![100, 200, 400]);
        assert!(Clock::now() < deadline, "gave up before the deadline");
        assert_eq!(expired.waited, Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn proportional_pauses_grow_with_the_wait_and_count_the_time_before_the_first_look() {
        let deadline = Clock::now() + Duration::from_secs(3600);
        let mut poll = Poll::proportional(
            deadline.into_std(),
            Duration::from_millis(500),
            Duration::from_millis(50),
            Duration::from_secs(1),
        );
        assert_eq!(poll.elapsed(), Duration::from_millis(500));
        let mut looks = 1;
        while poll.elapsed() < Duration::from_secs(1) {
            poll.pause(|_| {}).await.unwrap();
            looks += 1;
        }
        // 0.5, 0.6, 0.72, 0.864, 1.037 s: a 1 s task costs 5 looks and is seen 37 ms late.
        assert_eq!(looks, 5);
        assert!(
            poll.elapsed() < Duration::from_millis(1100),
            "{:?}",
            poll.elapsed()
        );
        let mut looks = 0;
        while poll.elapsed() < Duration::from_secs(1800) {
            poll.pause(|_| {}).await.unwrap();
            looks += 1;
        }
        assert!(looks <= 1820, "{looks} looks in a 30-minute wait");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_look_counts_as_part_of_the_next_proportional_pause() {
        let deadline = Clock::now() + Duration::from_secs(60);
        let min = Duration::from_millis(250);
        let mut poll = Poll::proportional(deadline.into_std(), Duration::ZERO, min, min * 8);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = Clock::now();
        poll.pause(|_| {}).await.unwrap();
        assert_eq!(Clock::now() - before, min);
        let before = Clock::now();
        poll.pause(|_| {}).await.unwrap();
        // 3.25 s waited: 1/5 of it.
        assert_eq!(Clock::now() - before, Duration::from_millis(650));
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_look_comes_on_time_then_close_looks_then_the_schedule() {
        let deadline = Clock::now() + Duration::from_secs(60);
        let mut poll = Poll::proportional(
            deadline.into_std(),
            Duration::from_secs(1),
            Duration::from_millis(50),
            Duration::from_secs(1),
        )
        .with_due(Duration::from_millis(1300), Duration::from_millis(30), 2);
        let mut looks = Vec::new();
        for _ in 0..5 {
            poll.pause(|_| {}).await.unwrap();
            looks.push(poll.elapsed().as_millis());
        }
        // 1.0 s + 1/5 is 1.2 s; the due look at 1.3 s cuts the next pause short; two close
        // looks; then 1/5 of the 1.36 s waited.
        assert_eq!(looks, vec![1200, 1300, 1330, 1360, 1632]);
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_pauses_stay_in_their_range() {
        let mut poll = Poll::jittered(
            (Clock::now() + Duration::from_secs(60)).into_std(),
            Duration::from_millis(50),
            Duration::from_millis(200),
        );
        for _ in 0..50 {
            let before = Clock::now();
            poll.pause(|_| {}).await.unwrap();
            let took = before.elapsed();
            assert!(
                took >= Duration::from_millis(50) && took < Duration::from_millis(250),
                "{took:?}"
            );
        }
    }
}
