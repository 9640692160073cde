//! The driver's API footprint and its prepare latency against a capacity-limited API (issue 12).
//!
//! 1. API requests of one typical job (prepare, six stages, cleanup) by endpoint, next to the
//!    older Python driver's 41;
//! 2. prepare latency at 1 and at 16 concurrent jobs against a fake API that serves 3 requests
//!    at a time, 10 ms each, where a guest-agent call made before the agent runs holds its
//!    worker for 3 s; against the floor of simulated clone + start + boot.
//!
//! ```text
//! cargo bench --bench api                  # report to stdout
//! cargo bench --bench api -- --out FILE
//! ```
//!
//! Needs /usr/sbin/sshd (a real sshd stands in for every VM), like the sshd tests.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use gpr_testkit::hook::Hook;
use gpr_testkit::{driver_binary, ApiCapacity, FakeConfig, Lab};

const OLD_DRIVER_REQUESTS: usize = 41;
const CLONE_TIME: Duration = Duration::from_millis(1000);
const TASK_TIME: Duration = Duration::from_millis(500);
const BOOT_TIME: Duration = Duration::from_millis(3000);

fn config(capacity: Option<ApiCapacity>) -> FakeConfig {
    FakeConfig {
        clone_time: CLONE_TIME,
        task_time: TASK_TIME,
        boot_time: BOOT_TIME,
        capacity,
        ..FakeConfig::default()
    }
}

fn job_hook(lab: &Lab, dir: &Path, job_id: u64) -> Hook {
    lab.hook(dir)
        .host_env("PROXMOX_MAX_CONCURRENT_CLONES", "64")
        .job_var("CI_JOB_ID", job_id.to_string())
        .job_var("CI_PROJECT_PATH", "group/project")
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
        .job_var("CI_RUNNER_SHORT_TOKEN", "xS6Vzpvo")
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

fn one_job(report: &mut String) {
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config(None))
        .with_sshd_or_skip("bench api: one job")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = job_hook(&lab, dir.path(), 1);
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let prepare = prepare_time(&out.log());
    for stage in [
        "prepare_script",
        "get_sources",
        "restore_cache",
        "build_script",
        "after_script",
        "archive_cache",
    ] {
        let script = dir.path().join(format!("{stage}.sh"));
        std::fs::write(&script, "#!/bin/sh\necho stage\n").unwrap();
        hook.clone()
            .arg("run")
            .arg(&script)
            .arg(stage)
            .run()
            .assert_exit(0);
    }
    hook.clone().arg("cleanup").run().assert_exit(0);
    let counts = lab.fake.requests_by_endpoint();
    let total: usize = counts.values().sum();
    let _ = writeln!(
        report,
        "## API requests of one job (prepare, 6 stages, cleanup)\n"
    );
    let _ = writeln!(report, "| endpoint | requests |\n|---|---|");
    for (endpoint, count) in &counts {
        let _ = writeln!(report, "| `{endpoint}` | {count} |");
    }
    let _ = writeln!(
        report,
        "| **total** | **{total}** (older Python driver: {OLD_DRIVER_REQUESTS}) |\n"
    );
    let floor = (CLONE_TIME + TASK_TIME + BOOT_TIME).as_secs_f64();
    let _ = writeln!(
        report,
        "Prepare, one job, no capacity limit: {prepare:.1} s (floor {floor:.1} s of simulated \
         clone, start and boot, plus SSH and the helper).\n"
    );
}

fn concurrent(report: &mut String, jobs: u64) {
    let capacity = ApiCapacity {
        workers: 3,
        service_time: Duration::from_millis(10),
        agent_timeout: Duration::from_secs(3),
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config(Some(capacity)))
        .with_sshd_or_skip("bench api: concurrent jobs")
    else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..jobs).map(|_| tempfile::tempdir().unwrap()).collect();
    let hooks: Vec<Hook> = dirs
        .iter()
        .zip(100..)
        .map(|(dir, job)| job_hook(&lab, dir.path(), job))
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
    let mut times: Vec<f64> = children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().expect("wait for prepare");
            let log = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(0), "{log}");
            prepare_time(&log)
        })
        .collect();
    let requests = lab.fake.request_count();
    for hook in &hooks {
        hook.clone().arg("cleanup").run().assert_exit(0);
    }
    times.sort_by(f64::total_cmp);
    let (_, queued) = lab.fake.max_concurrent_requests();
    let _ = writeln!(
        report,
        "| {jobs} | {:.1} | {:.1} | {:.1} | {} | {queued} |",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        requests as u64 / jobs
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    while let Some(arg) = args.next() {
        // cargo bench also passes --bench, which needs nothing.
        if arg == "--out" {
            out = args.next();
        }
    }
    let mut report = String::from("# API footprint and prepare latency (benches/api.rs)\n\n");
    one_job(&mut report);
    let _ = writeln!(
        report,
        "## Prepare against 3 API workers (10 ms a request, agent calls before the agent runs \
         hold a worker 3 s)\n\n| jobs at once | fastest s | median s | slowest s | prepare \
         requests per job | most queued |\n|---|---|---|---|---|---|"
    );
    concurrent(&mut report, 1);
    concurrent(&mut report, 16);
    match out {
        Some(path) => std::fs::write(&path, &report).expect("write the report"),
        None => print!("{report}"),
    }
}
