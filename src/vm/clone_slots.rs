//! A cap on the clones one runner host has in flight (`PROXMOX_MAX_CONCURRENT_CLONES`).
//!
//! Every hook is its own process, so the cap lives in the file system: N slot files
//! (`clone-slot-0.lock` ...) in `PROXMOX_CLONE_LOCK_DIR`, each held with `flock`. A prepare
//! holds one slot from its clone request until the clone task ends. The kernel releases the
//! lock when the file is closed, so a prepare that crashes or is killed never leaks a slot.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Log;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::joblog;
use crate::poll::Poll;

/// Giving up on a slot after this long means something holds them all (a hung prepare).
const SLOT_WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// One held slot; dropping it releases the slot.
#[derive(Debug)]
pub struct CloneSlot {
    _file: File,
    pub index: u32,
}

/// The default lock directory: per user, so that two users' runners never share (or spoof)
/// each other's slots. Not `$TMPDIR`: gitlab-runner gives each job its own, and the slots must
/// be shared by all jobs on the host.
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/tmp/gitlab-proxmox-runner-clone-slots-{uid}"))
}

/// Takes a free slot, waiting (polling with jitter) while all are held. `Ok(None)` when no cap
/// is configured.
pub async fn acquire(settings: &Settings, log: &dyn Log) -> Result<Option<CloneSlot>> {
    let slots = settings.max_concurrent_clones;
    if slots == 0 {
        return Ok(None);
    }
    let dir = settings.clone_lock_dir.clone().unwrap_or_else(default_dir);
    prepare_dir(&dir)?;
    let mut poll = Poll::jittered(
        Instant::now() + SLOT_WAIT_LIMIT,
        Duration::from_millis(50),
        Duration::from_millis(200),
    );
    loop {
        if let Some(slot) = try_acquire(&dir, slots)? {
            let waited = poll.elapsed();
            if waited >= Duration::from_millis(500) {
                log.info(&format!(
                    "waited {} for a clone slot (PROXMOX_MAX_CONCURRENT_CLONES={slots})",
                    joblog::secs(waited)
                ));
            }
            return Ok(Some(slot));
        }
        poll.pause(|waited| {
            log.info(&format!(
                "still waiting for one of {slots} clone slots after {}",
                joblog::secs(waited)
            ))
        })
        .await
        .map_err(|expired| {
            Error::Infrastructure(format!(
                "all {slots} clone slots in {} stayed taken for {}; check for hung prepare \
                 processes on this runner host, or raise PROXMOX_MAX_CONCURRENT_CLONES",
                dir.display(),
                joblog::secs(expired.waited)
            ))
        })?;
    }
}

/// Creates the directory (mode 0700) if needed and refuses one that another user owns or that
/// is a symlink: in a shared /tmp, someone else could otherwise hold our slots.
fn prepare_dir(dir: &Path) -> Result<()> {
    let io = |what: &str, err: std::io::Error| {
        Error::io(
            format!(
                "{what} the clone lock directory {} (PROXMOX_CLONE_LOCK_DIR)",
                dir.display()
            ),
            err,
        )
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io("creating", err)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|err| io("checking", err))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != uid {
        return Err(Error::Settings(format!(
            "the clone lock directory {} is not a directory owned by this user (uid {uid}); \
             remove it or set PROXMOX_CLONE_LOCK_DIR to a directory of this user",
            dir.display()
        )));
    }
    Ok(())
}

/// Tries every slot once, starting at a random one so that waiters spread out.
fn try_acquire(dir: &Path, slots: u32) -> Result<Option<CloneSlot>> {
    let first = rand::random::<u32>() % slots;
    for offset in 0..slots {
        let index = (first + offset) % slots;
        let path = dir.join(format!("clone-slot-{index}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|err| Error::io(format!("opening the clone slot {}", path.display()), err))?;
        // SAFETY: the descriptor belongs to `file`, which outlives the call.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked == 0 {
            return Ok(Some(CloneSlot { _file: file, index }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(
                format!("locking the clone slot {}", path.display()),
                err,
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exclusive_and_come_back_when_dropped() {
        let dir = std::env::temp_dir().join(format!(
            "gpr-clone-slots-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        prepare_dir(&dir).unwrap();
        let a = try_acquire(&dir, 2).unwrap().expect("a first slot");
        let b = try_acquire(&dir, 2).unwrap().expect("a second slot");
        assert_ne!(a.index, b.index);
        assert!(try_acquire(&dir, 2).unwrap().is_none(), "only two slots");
        drop(a);
        let c = try_acquire(&dir, 2).unwrap().expect("the released slot");
        assert_ne!(c.index, b.index);
        drop((b, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_that_is_a_symlink_is_refused() {
        let base = std::env::temp_dir().join(format!(
            "gpr-clone-slots-link-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&base).unwrap();
        let link = base.join("slots");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        assert!(matches!(prepare_dir(&link), Err(Error::Settings(_))));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
