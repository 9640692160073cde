//! Cancel: the runner sends SIGTERM to the hook's process group; the stage's whole process tree
//! in the VM must go, and the hook must exit promptly.

use std::time::{Duration, Instant};

use gpr_testkit::driver_binary;
use gpr_testkit::ssh_job::{spawn_until_first_line, stage_hook};
use gpr_testkit::sshd::{process_table, Sshd};
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::wait_for_every;

fn alive(pid: u32) -> bool {
    process_table().iter().any(|(p, _, _)| *p == pid)
}

#[test]
fn sigterm_kills_the_remote_process_tree_and_the_hook_exits_promptly() {
    // Like gitlab-runner's own scripts: TERM trapped into `exit 1`.
    cancel_case(
        "sigterm_kills_the_remote_process_tree_and_the_hook_exits_promptly",
        "trap 'exit 1' TERM",
    );
}

#[test]
fn a_script_that_ignores_sigterm_is_killed_after_the_grace_period() {
    // SIG_IGN is inherited: neither the script nor its children react to TERM.
    cancel_case(
        "a_script_that_ignores_sigterm_is_killed_after_the_grace_period",
        "trap '' TERM",
    );
}

#[test]
fn a_detached_straggler_that_ignores_sigterm_is_killed_too() {
    // The script itself obeys TERM (its channel ends at once), but a background child with
    // its output elsewhere ignores TERM: the kill must carry on to SIGKILL regardless.
    cancel_case_with(
        "a_detached_straggler_that_ignores_sigterm_is_killed_too",
        "trap 'exit 1' TERM",
        "(trap '' TERM; exec sleep 600) >/dev/null 2>&1 </dev/null &",
    );
}

fn cancel_case(test: &str, trap: &str) {
    cancel_case_with(test, trap, "sleep 600 &");
}

fn cancel_case_with(test: &str, trap: &str, background: &str) {
    let Some(sshd) = Sshd::start_or_skip(test) else {
        return;
    };
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    let target = sshd.root_target();
    let job = tempfile::tempdir().unwrap();
    // A background child and a long foreground command.
    let body = format!("{trap}\n{background}\necho \"pids $$ $!\"\nsleep 600\necho never\n");
    let (mut child, mut stdout, line) = spawn_until_first_line(&stage_hook(
        driver_binary!(),
        job.path(),
        &target,
        &key,
        "build_script",
        &body,
    ));
    let pids: Vec<u32> = line
        .trim()
        .strip_prefix("pids ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    let (script_pid, background_pid) = (pids[0], pids[1]);
    // The foreground `sleep 600`: the script's other child.
    let foreground_pid = wait_for_every(
        "the foreground sleep to start",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let found = process_table().into_iter().find(|(pid, ppid, comm)| {
                *ppid == script_pid && *pid != background_pid && comm == "sleep"
            });
            found.map(|(pid, _, _)| pid)
        },
    );
    assert!(alive(background_pid) && alive(foreground_pid));

    let cancelled_at = Instant::now();
    // SAFETY: plain kill(2) to the hook's process group (the runner's cancel).
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGTERM);
    }
    let status = wait_for_every(
        "the hook to exit after SIGTERM",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || child.try_wait().unwrap(),
    );
    let took = cancelled_at.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(!rest.contains("never"), "the script went on after cancel");
    assert!(
        status.code().is_some(),
        "the hook died of a signal: {status:?}\n{stderr}"
    );
    assert!(stderr.contains("cancelled"), "{stderr}");
    // The runner's force-kill window is far longer; the hook must not idle through it.
    assert!(took < Duration::from_secs(20), "hook took {took:?} to exit");
    let gone = gpr_testkit::poll(Duration::from_secs(10), Duration::from_millis(20), || {
        (!alive(background_pid) && !alive(foreground_pid) && !alive(script_pid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "remote processes survived the cancel: script {} background {} foreground {}",
        alive(script_pid),
        alive(background_pid),
        alive(foreground_pid)
    );
}
