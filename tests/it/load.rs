//! Many jobs at once from two runner hosts sharing one (fake) Proxmox cluster that refuses
//! some concurrent clones, with an orphan sweep in the middle. Every prepare goes all the way
//! to SSH: the fake's guests report 127.0.0.1, where a real sshd stands in for every VM.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::{JobState, Phase};
use gpr_testkit::hook::Hook;
use gpr_testkit::{driver_binary, FakeConfig, Fault, Lab, NewVm};

const JOBS_PER_HOST: usize = 16;
/// Clone slots per runner host (PROXMOX_MAX_CONCURRENT_CLONES).
const SLOTS_PER_HOST: usize = 2;

/// One runner host: its short token and its own clone-slot directory.
struct RunnerHost {
    token: &'static str,
    lock_dir: tempfile::TempDir,
}

fn host_hook(lab: &Lab, host: &RunnerHost, dir: &Path, job_id: u64) -> Hook {
    lab.hook(dir)
        .host_env("PROXMOX_MAX_CONCURRENT_CLONES", SLOTS_PER_HOST.to_string())
        .host_env(
            "PROXMOX_CLONE_LOCK_DIR",
            host.lock_dir.path().display().to_string(),
        )
        // The marker names the runner host by this, not by the job's short token.
        .host_env("PROXMOX_RUNNER_ID", host.token)
        .job_var("CI_JOB_ID", job_id.to_string())
        .job_var("CI_PIPELINE_ID", "500")
        .job_var("CI_PROJECT_PATH", "group/project")
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
        .job_var("CI_RUNNER_SHORT_TOKEN", host.token)
}

fn gc(lab: &Lab) -> std::process::Output {
    lab.fleet_command().arg("gc").output().expect("run gc")
}

struct Job {
    dir: tempfile::TempDir,
    hook: Hook,
    token: &'static str,
}

fn spawn(hook: &Hook, name: &str) -> Child {
    hook.clone()
        .arg(name)
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook")
}

/// Waits for every child; returns each one's exit code and log, in order.
fn finish(children: Vec<Child>) -> Vec<(i32, String)> {
    children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().expect("wait for hook");
            (
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        })
        .collect()
}

#[test]
fn thirty_two_jobs_from_two_hosts_each_get_their_own_vm_and_leave_nothing() {
    let test = "thirty_two_jobs_from_two_hosts_each_get_their_own_vm_and_leave_nothing";
    // Short simulated tasks keep the run modest; clones long enough to overlap.
    let config = FakeConfig {
        clone_time: Duration::from_millis(300),
        task_time: Duration::from_millis(30),
        boot_time: Duration::from_millis(100),
        ..FakeConfig::default()
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_or_skip(test)
    else {
        return;
    };
    let fake = &lab.fake;
    // The storage takes two clones at a time; more fail as PVE's cluster lock times out.
    fake.inject(Fault::ConcurrentCloneLimit {
        max: 2,
        message: "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout"
            .into(),
    });
    // And a few failures that happen regardless of load.
    fake.inject(Fault::CloneTaskFails {
        count: 2,
        message: "clone failed: can't lock file '/var/lock/qemu-server/lock-60900.conf' - got \
                  timeout"
            .into(),
    });
    fake.inject(Fault::CloneRequestFails {
        count: 2,
        status: 500,
        message: "unable to create VM 2000000: config file already exists".into(),
    });

    // A VM of a job whose runner died two days ago: the only thing gc may remove.
    let mut orphan_marker = Marker::new(&JobInfo {
        job_id: Some(1),
        runner_short_token: Some("hostAAAA".into()),
        ..Default::default()
    });
    let two_days_ago = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 2 * 86_400;
    let age = orphan_marker.created - two_days_ago;
    orphan_marker.created = two_days_ago;
    orphan_marker.deadline = orphan_marker.deadline.map(|deadline| deadline - age);
    let orphan = 2_999_999;
    lab.fake.add_vm(NewVm {
        vmid: orphan,
        tags: "gitlab-proxmox-runner".into(),
        description: orphan_marker.description(),
        running: true,
        ..Default::default()
    });

    let hosts = [
        RunnerHost {
            token: "hostAAAA",
            lock_dir: tempfile::tempdir().unwrap(),
        },
        RunnerHost {
            token: "hostBBBB",
            lock_dir: tempfile::tempdir().unwrap(),
        },
    ];
    let jobs: Vec<Job> = (0..2 * JOBS_PER_HOST)
        .map(|index| {
            let host = &hosts[index % 2];
            let dir = tempfile::tempdir().unwrap();
            let hook = host_hook(&lab, host, dir.path(), 9_000 + index as u64);
            Job {
                dir,
                hook,
                token: host.token,
            }
        })
        .collect();

    let started = Instant::now();
    let children: Vec<Child> = jobs.iter().map(|job| spawn(&job.hook, "prepare")).collect();

    // The sweep runs while clones are in flight and the first VMs are booting or ready.
    // The orphan and 8 of the jobs' VMs.
    gpr_testkit::wait_for_every(
        "the first VMs to appear",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || (lab.fake.job_vms().len() > 8).then_some(()),
    );
    let gc = gc(&lab);
    let gc_stdout = String::from_utf8_lossy(&gc.stdout).into_owned();
    assert_eq!(
        gc.status.code(),
        Some(0),
        "gc failed: {gc_stdout}\n{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        gc_stdout.contains("gc: 1 orphans destroyed"),
        "gc must remove the orphan and nothing else: {gc_stdout}"
    );
    assert!(lab.fake.vm(orphan).is_none(), "the orphan must be gone");

    let results = finish(children);
    let prepared_in = started.elapsed();
    for (index, (code, log)) in results.iter().enumerate() {
        assert_eq!(*code, 0, "prepare of job {index} failed:\n{log}");
        assert!(log.contains("ready at 127.0.0.1:"), "job {index}:\n{log}");
    }
    let all_logs: String = results.iter().map(|(_, log)| log.as_str()).collect();
    // The injected failures were met and ridden out: a lock on the template is load (pause,
    // then a new attempt), a taken id means another id.
    assert!(
        all_logs.contains("lock-60900.conf") && all_logs.contains("trying again"),
        "{all_logs}"
    );
    assert!(
        all_logs.contains("config file already exists); trying another"),
        "{all_logs}"
    );

    // Every job has its own VM, carrying its own marker; no VMID is shared.
    let mut vmids = HashSet::new();
    for job in &jobs {
        let state = JobState::load(job.dir.path())
            .unwrap()
            .expect("every job has a state");
        assert_eq!(state.phase, Phase::Ready);
        assert!(vmids.insert(state.vmid), "VMID {} shared", state.vmid);
        let vm = lab.fake.vm(state.vmid).expect("the job's VM exists");
        assert_eq!(vm.status, "running");
        let marker = Marker::find_in(&vm.description).expect("a marker");
        assert_eq!(Some(&marker), Marker::parse_line(&state.marker).as_ref());
        assert_eq!(marker.runner.as_deref(), Some(job.token));
    }
    assert_eq!(vmids.len(), 2 * JOBS_PER_HOST);
    assert_eq!(
        lab.fake.job_vms().len(),
        2 * JOBS_PER_HOST,
        "exactly one VM per job: no leftovers of failed clones"
    );
    // Each host had at most SLOTS_PER_HOST clone tasks running.
    assert!(
        lab.fake.max_concurrent_clones() <= 2 * SLOTS_PER_HOST,
        "{} clones ran at once",
        lab.fake.max_concurrent_clones()
    );

    let cleanups: Vec<Child> = jobs.iter().map(|job| spawn(&job.hook, "cleanup")).collect();
    for (index, (code, log)) in finish(cleanups).into_iter().enumerate() {
        assert_eq!(code, 0, "cleanup of job {index} failed:\n{log}");
    }
    assert!(
        lab.fake.job_vms().is_empty(),
        "nothing may be left: {:?}",
        lab.fake.job_vms()
    );
    eprintln!(
        "32 prepares in {} (the longest clone wait included), cleanups after",
        gpr_seconds(prepared_in)
    );
}

fn gpr_seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}
