//! A cap on the clones one runner host has in flight (`PROXMOX_MAX_CONCURRENT_CLONES`).
//!
//! Every hook is its own process, so the cap lives in the file system: N slot files
//! (`clone-slot-0.lock` ...) in `PROXMOX_CLONE_LOCK_DIR`, each held with `flock`. A prepare
//! holds one slot from its clone request until the clone task ends. The kernel releases the
//! lock when the file is closed, so a prepare that crashes or is killed never leaks a slot.
//!
//! The directory decides whether the cap holds, so it must be one no other local user can
//! pre-create, swap or write into: whoever can hold our slot files (or replace them with files
//! of their own) can stop every clone of this host, or lift the cap. The default lives under
//! `/run` (root: `/run/gitlab-proxmox-runner/clone-slots`; another user: its runtime
//! directory), never in the shared `/tmp`, and any directory is refused unless it is ours
//! (euid), not writable by group or others, not a symlink, and every directory above it is
//! root's or ours and not writable by others (sticky ones like `/tmp` excepted). Slot files
//! are opened relative to the checked directory's descriptor, with `O_NOFOLLOW`.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Log;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::joblog;
use crate::poll::Poll;

/// Giving up on a slot after this long means something holds them all (a hung prepare).
const SLOT_WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Under the runtime directory (`/run` for root).
const DIR_UNDER_RUNTIME: &str = "gitlab-proxmox-runner/clone-slots";

/// One held slot; dropping it releases the slot.
#[derive(Debug)]
pub struct CloneSlot {
    _file: File,
    pub index: u32,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The default lock directory for this process: `/run/gitlab-proxmox-runner/clone-slots` for
/// root; for another user `$XDG_RUNTIME_DIR/gitlab-proxmox-runner/clone-slots`, else the same
/// under `/run/user/<uid>` when systemd-logind made that directory. Not `$TMPDIR`: gitlab-runner
/// gives each job its own, and the slots must be shared by all jobs on the host; and not
/// `/tmp`, where any local user can create the directory first. The hooks and the pool
/// service must run as the same user (or share an explicit `PROXMOX_CLONE_LOCK_DIR`) to share
/// the cap.
pub fn default_dir() -> Result<PathBuf> {
    default_dir_for(
        euid(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        |path| path.is_dir(),
    )
}

fn default_dir_for(
    uid: u32,
    xdg_runtime_dir: Option<&OsStr>,
    is_dir: impl Fn(&Path) -> bool,
) -> Result<PathBuf> {
    if uid == 0 {
        return Ok(Path::new("/run").join(DIR_UNDER_RUNTIME));
    }
    let xdg = xdg_runtime_dir
        .map(Path::new)
        .filter(|dir| dir.is_absolute() && is_dir(dir));
    if let Some(dir) = xdg {
        return Ok(dir.join(DIR_UNDER_RUNTIME));
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    if is_dir(&run_user) {
        return Ok(run_user.join(DIR_UNDER_RUNTIME));
    }
    Err(Error::Settings(format!(
        "PROXMOX_MAX_CONCURRENT_CLONES needs a lock directory only this user (uid {uid}) can \
         write, and it has no runtime directory ($XDG_RUNTIME_DIR is unset and /run/user/{uid} \
         does not exist); set PROXMOX_CLONE_LOCK_DIR to an absolute path of a directory owned \
         by uid {uid}, mode 0700, outside /tmp (e.g. under /var/lib), the same for the hooks \
         and the pool service"
    )))
}

/// Takes a free slot, waiting (polling with jitter) while all are held. `Ok(None)` when no cap
/// is configured.
pub async fn acquire(settings: &Settings, log: &dyn Log) -> Result<Option<CloneSlot>> {
    let slots = settings.clone.max_concurrent;
    if slots == 0 {
        return Ok(None);
    }
    let dir = match &settings.clone.lock_dir {
        Some(dir) => dir.clone(),
        None => default_dir()?,
    };
    let opened = open_dir(&dir)?;
    let mut poll = Poll::jittered(
        Instant::now() + SLOT_WAIT_LIMIT,
        Duration::from_millis(50),
        Duration::from_millis(200),
    );
    loop {
        if let Some(slot) = try_acquire(&opened, slots)? {
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

/// The checked lock directory, held open: slot files are opened relative to it, so a
/// directory swapped in after the check is never used.
#[derive(Debug)]
struct LockDir {
    path: PathBuf,
    fd: OwnedFd,
}

fn refused(dir: &Path, why: String) -> Error {
    Error::Settings(format!(
        "the clone lock directory {} (PROXMOX_CLONE_LOCK_DIR) {why}: another local user could \
         hold or replace the clone slots; use a directory owned by this user (uid {}), mode \
         0700, whose parent directories only root or this user can write (the default under \
         /run is one)",
        dir.display(),
        euid()
    ))
}

/// `0755` for the message.
fn mode_text(meta: &std::fs::Metadata) -> String {
    format!("{:04o}", meta.mode() & 0o7777)
}

/// Creates the directory (and its missing parents, mode 0700) if needed, checks it and every
/// directory above it, and opens it.
fn open_dir(dir: &Path) -> Result<LockDir> {
    if !dir.is_absolute() {
        return Err(Error::Settings(format!(
            "PROXMOX_CLONE_LOCK_DIR={} must be an absolute path: every hook runs in a \
             directory of its own, and the slots must be the same for all of them",
            dir.display()
        )));
    }
    let io = |what: &str, err: std::io::Error| {
        Error::io(
            format!(
                "{what} the clone lock directory {} (PROXMOX_CLONE_LOCK_DIR)",
                dir.display()
            ),
            err,
        )
    };
    // The parents first: creating the missing part of a path through a directory (or a
    // symlink) someone else controls would already put it where they chose.
    check_parents(dir, Missing::Allowed)?;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        // A symlink to something else, say: the check below names it.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io("creating", err)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|err| io("checking", err))?;
    check_own_dir(dir, &meta)?;
    check_parents(dir, Missing::Refused)?;
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        Error::Settings(format!(
            "PROXMOX_CLONE_LOCK_DIR={} contains a NUL byte",
            dir.display()
        ))
    })?;
    // SAFETY: `path` is a valid NUL-terminated string; the descriptor is owned from here on.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io("opening", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor we just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let opened = File::from(fd.try_clone().map_err(|err| io("opening", err))?)
        .metadata()
        .map_err(|err| io("checking", err))?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(refused(
            dir,
            "was replaced while it was being checked".into(),
        ));
    }
    Ok(LockDir {
        path: dir.to_path_buf(),
        fd,
    })
}

/// The lock directory itself: a real directory (not a symlink), ours, not writable by others.
fn check_own_dir(dir: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let uid = euid();
    if meta.file_type().is_symlink() {
        return Err(refused(dir, "is a symlink".into()));
    }
    if !meta.is_dir() {
        return Err(refused(dir, "is not a directory".into()));
    }
    if meta.uid() != uid {
        return Err(refused(
            dir,
            format!("is owned by uid {}, not by this user", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refused(
            dir,
            format!("is writable by group or others (mode {})", mode_text(meta)),
        ));
    }
    Ok(())
}

/// Whether a parent directory may be missing (before the directory is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    Allowed,
    Refused,
}

/// Every directory above `dir`, as written and as resolved: owned by root or us, and not
/// writable by group or others unless sticky (in `/tmp`, others cannot rename or remove what
/// is ours). A symlink on the way (`/var/run`) is fine when it is root's or ours and the
/// directory holding it passes too.
fn check_parents(dir: &Path, missing: Missing) -> Result<()> {
    let uid = euid();
    let stat = |path: &Path, follow: bool| -> Result<Option<std::fs::Metadata>> {
        let meta = if follow {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        };
        match meta {
            Ok(meta) => Ok(Some(meta)),
            Err(err)
                if missing == Missing::Allowed && err.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(err) => Err(Error::io(
                format!(
                    "checking {}, a parent of the clone lock directory {}",
                    path.display(),
                    dir.display()
                ),
                err,
            )),
        }
    };
    let judge = |parent: &Path, meta: &std::fs::Metadata| -> Result<()> {
        if meta.uid() != 0 && meta.uid() != uid {
            return Err(refused(
                dir,
                format!(
                    "lies in {}, which is owned by uid {}",
                    parent.display(),
                    meta.uid()
                ),
            ));
        }
        let sticky = meta.mode() & libc::S_ISVTX != 0;
        if meta.is_dir() && meta.mode() & 0o022 != 0 && !sticky {
            return Err(refused(
                dir,
                format!(
                    "lies in {}, which is writable by group or others (mode {})",
                    parent.display(),
                    mode_text(meta)
                ),
            ));
        }
        Ok(())
    };
    for parent in dir.ancestors().skip(1) {
        if let Some(link) = stat(parent, false)? {
            judge(parent, &link)?;
        }
        if let Some(target) = stat(parent, true)? {
            judge(parent, &target)?;
        }
    }
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    let resolved = match std::fs::canonicalize(parent) {
        Ok(resolved) => resolved,
        Err(err) if missing == Missing::Allowed && err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(err) => {
            return Err(Error::io(
                format!(
                    "resolving {}, the parent of the clone lock directory {}",
                    parent.display(),
                    dir.display()
                ),
                err,
            ))
        }
    };
    for real in resolved.ancestors() {
        if let Some(meta) = stat(real, true)? {
            judge(real, &meta)?;
        }
    }
    Ok(())
}

/// Tries every slot once, starting at a random one so that waiters spread out.
fn try_acquire(dir: &LockDir, slots: u32) -> Result<Option<CloneSlot>> {
    let first = rand::random::<u32>() % slots;
    for offset in 0..slots {
        let index = (first + offset) % slots;
        let name = format!("clone-slot-{index}.lock");
        let path = dir.path.join(&name);
        let file = open_slot(dir, &name)
            .map_err(|err| Error::io(format!("opening the clone slot {}", path.display()), err))?;
        let meta = file
            .metadata()
            .map_err(|err| Error::io(format!("checking the clone slot {}", path.display()), err))?;
        if !meta.is_file() || meta.uid() != euid() {
            return Err(refused(
                &dir.path,
                format!(
                    "holds {name}, which is not a regular file of this user (owner uid {})",
                    meta.uid()
                ),
            ));
        }
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

/// A file of this host's own beside the slots, created 0600 if missing: for state every hook of
/// the host shares and no job can reach (see [`super::task`]'s learned durations). The same
/// directory checks as the slots'; a file that is not a regular file of ours is refused.
pub(crate) fn open_host_file(configured: Option<&Path>, name: &str) -> Result<File> {
    let dir = match configured {
        Some(dir) => dir.to_path_buf(),
        None => default_dir()?,
    };
    let opened = open_dir(&dir)?;
    let path = dir.join(name);
    let file = open_slot(&opened, name)
        .map_err(|err| Error::io(format!("opening {}", path.display()), err))?;
    let meta = file
        .metadata()
        .map_err(|err| Error::io(format!("checking {}", path.display()), err))?;
    if !meta.is_file() || meta.uid() != euid() || meta.mode() & 0o022 != 0 {
        return Err(refused(
            &dir,
            format!("holds {name}, which is not a regular file only this user can write"),
        ));
    }
    Ok(file)
}

/// `name` in the checked directory, created 0600 if missing; never through a symlink.
fn open_slot(dir: &LockDir, name: &str) -> std::io::Result<File> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `dir.fd` is an open directory and `name` a NUL-terminated string; the new
    // descriptor is owned by the returned File.
    let raw = unsafe {
        libc::openat(
            dir.fd.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory under /tmp (root's, sticky: an acceptable parent).
    fn scratch(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "gpr-clone-slots-{what}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[track_caller]
    fn refusal(dir: &Path) -> String {
        match open_dir(dir) {
            Err(Error::Settings(message)) => message,
            other => panic!("{} was not refused: {other:?}", dir.display()),
        }
    }

    #[test]
    fn slots_are_exclusive_and_come_back_when_dropped() {
        let base = scratch("exclusive");
        let dir = open_dir(&base.join("created/slots")).unwrap();
        let mode = std::fs::metadata(&dir.path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "created for this user only");
        let a = try_acquire(&dir, 2).unwrap().expect("a first slot");
        let b = try_acquire(&dir, 2).unwrap().expect("a second slot");
        assert_ne!(a.index, b.index);
        assert!(try_acquire(&dir, 2).unwrap().is_none(), "only two slots");
        drop(a);
        let c = try_acquire(&dir, 2).unwrap().expect("the released slot");
        assert_ne!(c.index, b.index);
        drop((b, c));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_that_is_a_symlink_is_refused() {
        let base = scratch("link");
        let link = base.join("slots");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let message = refusal(&link);
        assert!(message.contains("is a symlink"), "{message}");
        assert!(message.contains("PROXMOX_CLONE_LOCK_DIR"), "{message}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_so_is_one_inside_such_a_directory() {
        let base = scratch("writable");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let message = refusal(&open);
        assert!(
            message.contains("is writable by group or others (mode 0777)"),
            "{message}"
        );
        // Ours and 0700, but others may rename it away or put another in its place.
        let inside = open.join("slots");
        std::fs::create_dir(&inside).unwrap();
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o700)).unwrap();
        let message = refusal(&inside);
        assert!(
            message.contains(&format!(
                "lies in {}, which is writable by group or others (mode 0777)",
                open.display()
            )),
            "{message}"
        );
        // Not even created there.
        let message = refusal(&open.join("new/slots"));
        assert!(message.contains("writable by group or others"), "{message}");
        assert!(!open.join("new").exists());
        // A sticky world-writable parent (like /tmp) is fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        open_dir(&inside).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_another_user_created_first_is_refused() {
        let base = scratch("foreign");
        let (dir, owner) = if euid() == 0 {
            // What a local user does to a predictable path: create it before we do.
            let dir = base.join("slots");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path; uid/gid 65534 (nobody).
            assert_eq!(unsafe { libc::chown(path.as_ptr(), 65534, 65534) }, 0);
            (dir, 65534)
        } else {
            // Not root: a directory root made is someone else's as well.
            (PathBuf::from("/usr"), 0)
        };
        let message = refusal(&dir);
        assert!(
            message.contains(&format!("is owned by uid {owner}, not by this user")),
            "{message}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_slot_file_that_is_a_symlink_is_not_followed() {
        let base = scratch("slotlink");
        let target = base.join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let dir = open_dir(&base.join("slots")).unwrap();
        std::os::unix::fs::symlink(&target, dir.path.join("clone-slot-0.lock")).unwrap();
        let err = try_acquire(&dir, 1).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("clone-slot-0.lock"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_relative_directory_is_refused() {
        let message = refusal(Path::new("clone-slots"));
        assert!(message.contains("must be an absolute path"), "{message}");
    }

    #[test]
    fn the_default_lives_under_run_never_in_tmp() {
        let never = |_: &Path| false;
        assert_eq!(
            default_dir_for(0, None, never).unwrap(),
            Path::new("/run/gitlab-proxmox-runner/clone-slots")
        );
        let exists = |path: &Path| path == Path::new("/run/user/1000") || path == Path::new("/xdg");
        assert_eq!(
            default_dir_for(1000, Some(OsStr::new("/xdg")), exists).unwrap(),
            Path::new("/xdg/gitlab-proxmox-runner/clone-slots")
        );
        // A relative or missing $XDG_RUNTIME_DIR is not used.
        for xdg in [None, Some(OsStr::new("xdg")), Some(OsStr::new("/missing"))] {
            assert_eq!(
                default_dir_for(1000, xdg, exists).unwrap(),
                Path::new("/run/user/1000/gitlab-proxmox-runner/clone-slots")
            );
        }
        let Err(Error::Settings(message)) = default_dir_for(1000, None, never) else {
            panic!("a user without a runtime directory has no default");
        };
        assert!(message.contains("set PROXMOX_CLONE_LOCK_DIR"), "{message}");
        assert!(
            message.contains("/run/user/1000 does not exist"),
            "{message}"
        );
    }
}
