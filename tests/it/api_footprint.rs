//! The API footprint of a typical job (prepare, six stages, cleanup), counted by endpoint against
//! the fake: at most 30 requests (issue 21; the older Python driver sent 41). Counts, not times.

use std::process::Stdio;
use std::time::Duration;

use gpr_testkit::hook::Hook;
use gpr_testkit::{driver_binary, ApiCapacity, FakeConfig, Lab};

/// What the older Python driver sent for the same job.
const OLD_DRIVER_REQUESTS: usize = 41;
/// Issue 21's budget for a typical job.
const REQUEST_BUDGET: usize = 30;

#[test]
fn a_typical_job_stays_within_the_old_drivers_request_budget() {
    // Durations as on a real node: a linked clone about a second, tasks half a second, the
    // guest's agent up a few seconds after start.
    let config = FakeConfig {
        clone_time: Duration::from_millis(1000),
        task_time: Duration::from_millis(500),
        boot_time: Duration::from_millis(3000),
        ..FakeConfig::default()
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_or_skip("a_typical_job_stays_within_the_old_drivers_request_budget")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = lab.job_hook(dir.path(), 4711);
    hook.clone().arg("prepare").run().assert_exit(0);
    let after_prepare = lab.fake.request_count();
    hook.run_typical_stages(dir.path());
    let after_stages = lab.fake.request_count();
    hook.clone().arg("cleanup").run().assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());

    let requests = lab.fake.requests();
    let counts = lab.fake.requests_by_endpoint();
    let table: Vec<String> = counts
        .iter()
        .map(|(endpoint, count)| format!("{count:4}  {endpoint}"))
        .collect();
    eprintln!(
        "API requests of one job: {} (prepare {after_prepare}, stages {}, cleanup {})\n{}",
        requests.len(),
        after_stages - after_prepare,
        requests.len() - after_stages,
        table.join("\n")
    );
    assert_eq!(after_stages, after_prepare, "stages talk to SSH only");
    assert!(
        requests.len() <= REQUEST_BUDGET,
        "{} requests for one job, budget {REQUEST_BUDGET} (the old driver: \
         {OLD_DRIVER_REQUESTS}):\n{}",
        requests.len(),
        table.join("\n")
    );
}

#[test]
fn sixteen_jobs_against_an_api_with_three_workers_all_get_their_vm() {
    let test = "sixteen_jobs_against_an_api_with_three_workers_all_get_their_vm";
    const JOBS: u64 = 16;
    // pveproxy's 3 workers, 10 ms a request, and an agent call before the agent runs holds its
    // worker for 3 s (QEMU's agent timeout).
    let config = FakeConfig {
        clone_time: Duration::from_millis(1000),
        task_time: Duration::from_millis(500),
        boot_time: Duration::from_millis(3000),
        capacity: Some(ApiCapacity {
            workers: 3,
            service_time: Duration::from_millis(10),
            agent_timeout: Duration::from_secs(3),
        }),
        ..FakeConfig::default()
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_or_skip(test)
    else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..JOBS).map(|_| tempfile::tempdir().unwrap()).collect();
    let hooks: Vec<Hook> = dirs
        .iter()
        .zip(1..)
        .map(|(dir, job)| {
            lab.job_hook(dir.path(), 5000 + job)
                // The runner host's clone cap stays out of the way: the API is what is measured.
                .host_env("PROXMOX_MAX_CONCURRENT_CLONES", JOBS.to_string())
        })
        .collect();
    let children: Vec<_> = hooks
        .iter()
        .map(|hook| {
            hook.clone()
                .arg("prepare")
                .command()
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn prepare")
        })
        .collect();
    let mut times = Vec::new();
    for child in children {
        let output = child.wait_with_output().expect("wait for prepare");
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(0), "{log}");
        times.push(prepare_time(&log));
    }
    let prepare_requests = lab.fake.request_count();
    for hook in &hooks {
        hook.clone().arg("cleanup").run().assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty());
    let (in_service, queued) = lab.fake.max_concurrent_requests();
    assert!(in_service <= 3, "{in_service} requests served at once");
    times.sort_by(f64::total_cmp);
    eprintln!(
        "16 prepares against 3 API workers: {:.1} .. {:.1} s (median {:.1} s); {} \
         prepare requests ({} per job), at most {queued} queued",
        times[0],
        times[times.len() - 1],
        times[times.len() / 2],
        prepare_requests,
        prepare_requests as u64 / JOBS,
    );
}

/// The seconds of `VM N (name) ready at IP:PORT in 4.9 s: ...`.
fn prepare_time(log: &str) -> f64 {
    log.lines()
        .find(|line| line.contains(" ready at "))
        .and_then(|line| line.split(" in ").nth(1))
        .and_then(|rest| rest.split(" s").next())
        .and_then(|secs| secs.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ready line in {log}"))
}

/// Every job teaches the runner host when its kind of task ends on that node (and when its
/// guest's agent answers): the learned times land in a file of the host's (the clone lock
/// directory), one line per API, node and kind, never below what the tasks took.
#[test]
fn jobs_teach_the_host_when_their_tasks_end() {
    let test = "jobs_teach_the_host_when_their_tasks_end";
    let task_time = Duration::from_millis(200);
    let clone_time = Duration::from_millis(400);
    let config = FakeConfig {
        clone_time,
        task_time,
        boot_time: Duration::ZERO,
        ..FakeConfig::default()
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_or_skip(test)
    else {
        return;
    };
    let host_dir = tempfile::tempdir().unwrap();
    let lock_dir = host_dir.path().join("locks");
    let file = lock_dir.join("task-durations");
    for job in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let hook = lab
            .job_hook(dir.path(), 6000 + job)
            .host_env("PROXMOX_CLONE_LOCK_DIR", lock_dir.to_str().unwrap());
        hook.clone().arg("prepare").run().assert_exit(0);
        hook.clone().arg("cleanup").run().assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty());
    let text = std::fs::read_to_string(&file).expect("the learned durations");
    for (kind, took) in [
        ("qmclone", clone_time),
        ("qmstart", task_time),
        ("qmstop", task_time),
        ("qmdestroy", task_time),
        // The guest agent's first answer after the start (the boot).
        ("agent-up", Duration::ZERO),
    ] {
        let line = text
            .lines()
            .find(|line| line.split_whitespace().nth(2) == Some(kind))
            .unwrap_or_else(|| panic!("nothing learned of {kind}:\n{text}"));
        let millis: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        // Seen ended no sooner than it ended, less the probe a fifth lower.
        assert!(
            millis as u128 >= took.as_millis() / 2,
            "{kind} learned as {millis} ms, took {took:?}:\n{text}"
        );
    }
    assert_eq!(text.lines().count(), 5, "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
