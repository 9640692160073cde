//! Waiting for a Proxmox task (UPID) to end, and when to look: at the time this host saw the
//! same kind of task take on the same node, learned across hooks (each hook is a process of
//! its own, so the memory is a small file of the runner host's, see [`remember_durations`]).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Log;
use crate::config::Settings;
use crate::joblog;
use crate::poll::Poll;
use crate::proxmox::{ApiError, ApiErrorKind, Client, TaskOutcome, Upid};

/// Closest pause between two looks at a task whose duration is unknown.
const MIN_TASK_POLL: Duration = Duration::from_millis(50);
/// A look comes at the learned time; when it finds the task still running, the task is about
/// to end and each pause is added to the job: the next [`FINE_LOOKS`] come 1/20 of the learned
/// time apart (at least this), then the usual 1/5 of the time waited.
const MIN_LEARNED_POLL: Duration = Duration::from_millis(20);
const FINE_LOOKS: u32 = 4;
/// Farthest: a 30-minute full clone costs PVE about 1800 status reads.
const MAX_TASK_POLL: Duration = Duration::from_secs(1);

/// How long a task of this type usually takes on a healthy node (a linked clone on thin
/// storage, a start, a hard stop, a delete), for a node and task type this host has not seen
/// yet: the first look comes then (one status read for a typical task), later ones 1/5 of the
/// time waited apart. The learned time replaces it from the second task on.
pub fn typical_duration(task_type: &str) -> Duration {
    match task_type {
        "qmclone" => Duration::from_millis(1000),
        "qmstart" | "qmstop" | "qmshutdown" | "qmdestroy" => Duration::from_millis(500),
        // resize and anything else: short, but not instant.
        _ => Duration::from_millis(200),
    }
}

/// Polls a task the caller has just started until it stops or `deadline` passes. The first
/// look comes when this host's tasks of the kind usually end ([`LearnedWait`]); a task that
/// ends then costs one status read and is seen at most a few percent late. A long task prints
/// a progress line every 10 s. What the wait saw is remembered for the next one.
pub async fn wait(
    client: &Client,
    upid: &Upid,
    deadline: Instant,
    log: &dyn Log,
) -> Result<TaskOutcome, ApiError> {
    let mut learning = LearnedWait::begin(&upid.node, &upid.task_type);
    let first = learning
        .first_look(typical_duration(&upid.task_type))
        .min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(first).await;
    let mut poll = learning.poll(deadline, first, MIN_TASK_POLL, MAX_TASK_POLL);
    let outcome = poll_until_done(client, upid, &mut poll, log, || learning.missed()).await?;
    if matches!(outcome, TaskOutcome::Ok | TaskOutcome::Warnings(_)) {
        learning.ended();
    }
    Ok(outcome)
}

/// Polls a task that may have run for a while already (started by an earlier hook): the
/// first look is at once, and nothing is learned from it.
pub async fn wait_running(
    client: &Client,
    upid: &Upid,
    deadline: Instant,
    log: &dyn Log,
) -> Result<TaskOutcome, ApiError> {
    let mut poll = Poll::proportional(deadline, Duration::ZERO, MIN_TASK_POLL, MAX_TASK_POLL);
    poll_until_done(client, upid, &mut poll, log, || {}).await
}

/// A wait whose end this runner host learns from its earlier ones (a task of a type on a node,
/// or another wait such as a guest's boot): the caller's schedule plus a look at the learned
/// time and a few close looks after it. No look comes later than the schedule alone would
/// bring it: waits of one kind that differ (two templates' boots on one node) cost some
/// looks, never lateness. Report each look that found the wait not over
/// ([`LearnedWait::missed`]) and the end ([`LearnedWait::ended`]).
#[derive(Debug)]
pub struct LearnedWait {
    node: String,
    kind: String,
    learned: Option<Learned>,
    started: Instant,
    running_at: Option<Duration>,
}

impl LearnedWait {
    /// Starts the clock: call it when the thing waited for begins (a task was answered).
    pub fn begin(node: &str, kind: &str) -> LearnedWait {
        let learned = history().and_then(|history| history.learned(node, kind));
        LearnedWait {
            node: node.to_string(),
            kind: kind.to_string(),
            learned,
            started: Instant::now(),
            running_at: None,
        }
    }

    /// When to look first: `typical` (the caller's default), or the learned time when sooner.
    pub fn first_look(&self, typical: Duration) -> Duration {
        self.learned
            .map_or(typical, |learned| learned.duration.min(typical))
    }

    /// `Poll::proportional(deadline, first, min, max)` with the look at the learned time.
    pub fn poll(&self, deadline: Instant, first: Duration, min: Duration, max: Duration) -> Poll {
        let poll = Poll::proportional(deadline, first, min, max);
        match self.learned {
            Some(learned) => {
                poll.with_due(learned.duration, fine_pause(learned.duration), FINE_LOOKS)
            }
            None => poll,
        }
    }

    /// A look just found the wait not over. Only looks from the learned time on count: one
    /// before it says nothing about whether the learned time is too late.
    pub fn missed(&mut self) {
        let now = self.started.elapsed();
        if self.learned.is_none_or(|learned| now >= learned.duration) {
            self.running_at = Some(now);
        }
    }

    /// The last look found it over: remember when.
    pub fn ended(self) {
        let ended_by = self.started.elapsed();
        let seen = match self.running_at {
            None => Seen::AtFirstLook(ended_by),
            Some(running) => Seen::Between(running, ended_by),
        };
        if let Some(history) = history() {
            history.learn(&self.node, &self.kind, self.learned, seen);
        }
    }
}

fn fine_pause(first_look: Duration) -> Duration {
    (first_look / 20).max(MIN_LEARNED_POLL)
}

/// Looks until the task ends, calling `missed` after each look that found it running.
async fn poll_until_done(
    client: &Client,
    upid: &Upid,
    poll: &mut Poll,
    log: &dyn Log,
    mut missed: impl FnMut(),
) -> Result<TaskOutcome, ApiError> {
    loop {
        if let Some(outcome) = client.task_status(upid).await?.outcome() {
            return Ok(outcome);
        }
        missed();
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

// ------------------------------------------------------------------ learned durations

/// What the looks at one task saw of its end, as times since the wait began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The first look found it ended: it ended at this time or before.
    AtFirstLook(Duration),
    /// A look found it running, a later one ended: it ended in between.
    Between(Duration, Duration),
}

/// Learned durations are kept within these bounds, whatever the file says.
const MIN_LEARNED: Duration = Duration::from_millis(20);
const MAX_LEARNED: Duration = Duration::from_secs(600);
/// Entries kept (API endpoint, node and task type each): the least recently updated go first.
const MAX_ENTRIES: usize = 64;
/// A longer file is not ours (or damaged): it is read only this far.
const MAX_FILE_BYTES: u64 = 16 * 1024;
const FILE_NAME: &str = "task-durations";

/// What this host knows of a kind of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Learned {
    /// When to look first.
    duration: Duration,
    /// A look has found one running: the duration is close, not just an upper bound.
    bracketed: bool,
}

/// The next first look after `seen`. A task found ended at its first look may have ended much
/// sooner: the next look comes 1/4 earlier while no look has ever found one running (the
/// typical time may be far off on this cluster), 1/20 earlier after that. One found running
/// ended after that look, and the next first look comes when this one was seen ended. On a
/// steady cluster the first look converges in a few tasks and then stays within about 5%
/// (plus one pause) above the real duration; about one task in several costs a second read.
fn next_estimate(previous: Option<Learned>, seen: Seen) -> Learned {
    let bracketed = previous.is_some_and(|learned| learned.bracketed);
    let learned = match seen {
        Seen::AtFirstLook(ended_by) if bracketed => Learned {
            duration: ended_by * 19 / 20,
            bracketed,
        },
        Seen::AtFirstLook(ended_by) => Learned {
            duration: ended_by * 3 / 4,
            bracketed,
        },
        Seen::Between(_, ended_by) => Learned {
            duration: ended_by,
            bracketed: true,
        },
    };
    Learned {
        duration: learned.duration.clamp(MIN_LEARNED, MAX_LEARNED),
        ..learned
    }
}

/// Where this host keeps what it learned: the clone lock directory (`PROXMOX_CLONE_LOCK_DIR`,
/// by default under `/run`), whose checks keep other local users (and so jobs) out.
struct History {
    dir: Option<PathBuf>,
    /// The API endpoint: two clusters may have nodes of the same name.
    api: String,
}

static HISTORY: OnceLock<History> = OnceLock::new();

fn history() -> Option<&'static History> {
    HISTORY.get()
}

/// Lets this process's task waits learn from (and teach) this host's earlier ones. Without
/// it (the library alone, tests) every wait starts from [`typical_duration`]. Learning is best
/// effort: a directory that fails its checks, or a damaged file, only means no learning.
pub fn remember_durations(settings: &Settings) {
    let _ = HISTORY.set(History {
        dir: settings.clone.lock_dir.clone(),
        api: settings.api.endpoint.base_url(),
    });
}

/// One line of the file: `API NODE TYPE MILLIS BRACKETED UPDATED` (whitespace-separated,
/// BRACKETED 0 or 1, UPDATED in Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    millis: u64,
    bracketed: bool,
    updated: u64,
}

impl History {
    fn key(&self, node: &str, kind: &str) -> Option<String> {
        let clean = |text: &str| {
            !text.is_empty() && text.len() <= 200 && !text.chars().any(char::is_whitespace)
        };
        (clean(&self.api) && clean(node) && clean(kind))
            .then(|| format!("{} {node} {kind}", self.api))
    }

    fn open(&self) -> Option<File> {
        crate::vm::clone_slots::open_host_file(self.dir.as_deref(), FILE_NAME).ok()
    }

    fn learned(&self, node: &str, kind: &str) -> Option<Learned> {
        let key = self.key(node, kind)?;
        let mut file = self.open()?;
        lock(&file, libc::LOCK_SH)?;
        let entries = read_entries(&mut file);
        entries
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| Learned {
                duration: Duration::from_millis(entry.millis).clamp(MIN_LEARNED, MAX_LEARNED),
                bracketed: entry.bracketed,
            })
    }

    fn learn(&self, node: &str, kind: &str, previous: Option<Learned>, seen: Seen) {
        let Some(key) = self.key(node, kind) else {
            return;
        };
        let Some(mut file) = self.open() else { return };
        if lock(&file, libc::LOCK_EX).is_none() {
            return;
        }
        let mut entries = read_entries(&mut file);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_secs());
        entries.retain(|entry| entry.key != key);
        let next = next_estimate(previous, seen);
        entries.push(Entry {
            key,
            millis: next.duration.as_millis() as u64,
            bracketed: next.bracketed,
            updated: now,
        });
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.updated));
        entries.truncate(MAX_ENTRIES);
        let text: String = entries
            .iter()
            .map(|entry| {
                format!(
                    "{} {} {} {}\n",
                    entry.key,
                    entry.millis,
                    u8::from(entry.bracketed),
                    entry.updated
                )
            })
            .collect();
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()));
    }
}

/// Blocks for the lock: every holder keeps it for one small read or write.
fn lock(file: &File, how: libc::c_int) -> Option<()> {
    // SAFETY: the descriptor belongs to `file`, which outlives the call.
    (unsafe { libc::flock(file.as_raw_fd(), how) } == 0).then_some(())
}

fn read_entries(file: &mut File) -> Vec<Entry> {
    let mut text = String::new();
    if Read::by_ref(file)
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .is_err()
    {
        return Vec::new();
    }
    parse_entries(&text)
}

/// The well-formed lines, at most [`MAX_ENTRIES`]; anything else is dropped.
fn parse_entries(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [api, node, kind, millis, bracketed, updated] = fields.as_slice() else {
                return None;
            };
            Some(Entry {
                key: format!("{api} {node} {kind}"),
                millis: millis.parse().ok()?,
                bracketed: match *bracketed {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                },
                updated: updated.parse().ok()?,
            })
        })
        .take(MAX_ENTRIES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn upid(node: &str, kind: &str) -> (String, String) {
        (node.to_string(), kind.to_string())
    }

    impl History {
        fn learned_of(&self, what: &(String, String)) -> Option<Learned> {
            self.learned(&what.0, &what.1)
        }

        fn learn_of(&self, what: &(String, String), previous: Option<Learned>, seen: Seen) {
            self.learn(&what.0, &what.1, previous, seen)
        }
    }

    fn scratch(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "gpr-task-history-{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// `tasks` tasks of exactly `duration` on the schedule [`wait`] uses (first look at the
    /// typical time or the learned one if sooner, 1/5 of the time waited apart, a look at the
    /// learned time and close ones after it): the looks they cost and the worst lateness of the
    /// last `tail`. Without learning when `learn` is false.
    fn simulate(duration: Duration, tasks: usize, tail: usize, learn: bool) -> (usize, Duration) {
        let typical = typical_duration("qmstop");
        let mut learned: Option<Learned> = None;
        let (mut looks, mut late) = (0, Duration::ZERO);
        for task in 0..tasks {
            let due = learned.map(|l| l.duration);
            let mut at = due.map_or(typical, |due| due.min(typical));
            let mut due = due.filter(|due| *due > at);
            let mut fine = match (learned, due) {
                (Some(l), None) => Some((fine_pause(l.duration), FINE_LOOKS)),
                _ => None,
            };
            let mut running = None;
            looks += 1;
            while at < duration {
                if learned.is_none_or(|l| at >= l.duration) {
                    running = Some(at);
                }
                let mut pause = match &mut fine {
                    Some((pause, left)) => {
                        let pause = *pause;
                        *left -= 1;
                        if *left == 0 {
                            fine = None;
                        }
                        pause
                    }
                    None => (at / 5).max(MIN_TASK_POLL),
                };
                if let Some(d) = due {
                    if at + pause >= d {
                        pause = d - at;
                        due = None;
                        fine = Some((fine_pause(d), FINE_LOOKS));
                    }
                }
                at += pause;
                looks += 1;
            }
            if task >= tasks - tail {
                late = late.max(at - duration);
            }
            let seen = match running {
                None => Seen::AtFirstLook(at),
                Some(running) => Seen::Between(running, at),
            };
            if learn {
                learned = Some(next_estimate(learned, seen));
            }
        }
        (looks, late)
    }

    #[test]
    fn a_wait_first_looks_at_the_typical_time_or_the_learned_one_if_sooner() {
        let wait = |learned: Option<u64>| LearnedWait {
            node: "n".into(),
            kind: "qmstop".into(),
            learned: learned.map(|millis| Learned {
                duration: ms(millis),
                bracketed: true,
            }),
            started: Instant::now(),
            running_at: None,
        };
        assert_eq!(wait(None).first_look(ms(500)), ms(500));
        assert_eq!(wait(Some(210)).first_look(ms(500)), ms(210));
        assert_eq!(wait(Some(3400)).first_look(ms(500)), ms(500));
    }

    #[test]
    fn estimates_probe_lower_after_an_early_end_and_jump_to_a_late_one() {
        let fresh = |millis| Learned {
            duration: ms(millis),
            bracketed: false,
        };
        let close = |millis| Learned {
            duration: ms(millis),
            bracketed: true,
        };
        // Unbracketed: a quarter earlier; bracketed: a twentieth.
        assert_eq!(next_estimate(None, Seen::AtFirstLook(ms(400))), fresh(300));
        assert_eq!(
            next_estimate(Some(close(400)), Seen::AtFirstLook(ms(400))),
            close(380)
        );
        assert_eq!(
            next_estimate(Some(fresh(180)), Seen::Between(ms(180), ms(220))),
            close(220)
        );
        // Bounded whatever was seen.
        assert_eq!(
            next_estimate(None, Seen::AtFirstLook(ms(1))).duration,
            MIN_LEARNED
        );
        assert_eq!(
            next_estimate(None, Seen::Between(ms(1), Duration::from_secs(5000))).duration,
            MAX_LEARNED
        );
    }

    #[test]
    fn a_steady_task_is_soon_looked_at_close_to_its_end() {
        // Far below the typical 500 ms, at it, and far above it.
        for duration in [ms(200), ms(500), ms(1700)] {
            let (looks, late) = simulate(duration, 40, 30, true);
            let (default_looks, default_late) = simulate(duration, 40, 30, false);
            // The probing costs about one look per task more at worst.
            assert!(
                looks <= default_looks * 2 + 40,
                "{duration:?}: {looks} looks for 40 tasks ({default_looks} unlearned)"
            );
            assert!(
                late <= duration / 15 + MIN_LEARNED_POLL,
                "{duration:?}: seen {late:?} late after it was learned ({default_late:?} unlearned)"
            );
        }
    }

    #[test]
    fn the_history_file_round_trips_and_stays_bounded() {
        let dir = scratch("bounded");
        let history = History {
            dir: Some(dir.clone()),
            api: "https://pve.example:8006".into(),
        };
        let stop = upid("pve1", "qmstop");
        assert_eq!(history.learned_of(&stop), None);
        history.learn_of(&stop, None, Seen::AtFirstLook(ms(400)));
        let learned = history.learned_of(&stop).expect("learned");
        assert_eq!(learned.duration, ms(300));
        assert!(!learned.bracketed);
        history.learn_of(&stop, Some(learned), Seen::Between(ms(250), ms(290)));
        assert_eq!(
            history.learned_of(&stop),
            Some(Learned {
                duration: ms(290),
                bracketed: true
            })
        );
        assert_eq!(
            history.learned_of(&upid("pve2", "qmstop")),
            None,
            "per node"
        );
        for node in 0..MAX_ENTRIES + 10 {
            history.learn_of(
                &upid(&format!("n{node}"), "qmdestroy"),
                None,
                Seen::Between(ms(100), ms(150)),
            );
        }
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), MAX_ENTRIES);
        let mode = std::fs::metadata(dir.join(FILE_NAME))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        // A name with whitespace could forge a line: never stored.
        history.learn_of(&upid("pve1 x", "qmstop"), None, Seen::AtFirstLook(ms(300)));
        assert!(!std::fs::read_to_string(dir.join(FILE_NAME))
            .unwrap()
            .contains("pve1 x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_lines_are_dropped_and_values_bounded() {
        let entries = parse_entries(
            "a b c 100 0 5\ngarbage\na b d notanumber 1 5\na b e 99999999999 1 7\n\n\
             a b f 1 2 3\na b g 1 0 2 3\n",
        );
        assert_eq!(entries.len(), 2);
        let dir = scratch("damaged");
        std::fs::write(dir.join(FILE_NAME), "https://x n qmstop 99999999999 1 1\n").unwrap();
        std::fs::set_permissions(dir.join(FILE_NAME), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let history = History {
            dir: Some(dir.clone()),
            api: "https://x".into(),
        };
        let learned = history.learned_of(&upid("n", "qmstop")).expect("learned");
        assert_eq!(learned.duration, MAX_LEARNED);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_teaches_nothing() {
        let dir = scratch("open");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let history = History {
            dir: Some(dir.clone()),
            api: "https://x".into(),
        };
        let stop = upid("n", "qmstop");
        history.learn_of(&stop, None, Seen::AtFirstLook(ms(300)));
        assert_eq!(history.learned_of(&stop), None);
        assert!(!dir.join(FILE_NAME).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
