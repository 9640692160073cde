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
//! cargo bench --bench api -- --bin FILE --baseline-bin OLD   # both, side by side
//! ```
//!
//! `--bin FILE`: the driver to measure (default: `$GPR_BIN`, else the one cargo built);
//! `--baseline-bin FILE`: an older build measured in the same run, interleaved with ours, every
//! table showing both and the ratio ours/baseline.
//!
//! Needs /usr/sbin/sshd (a real sshd stands in for every VM), like the sshd tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
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
    lab.job_hook(dir, job_id)
        .host_env("PROXMOX_MAX_CONCURRENT_CLONES", "64")
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

/// One typical job's figures.
struct OneJob {
    by_endpoint: BTreeMap<String, usize>,
    total: usize,
    prepare: f64,
}

fn one_job(bin: &Path) -> Option<OneJob> {
    let lab = Lab::builder(bin)
        .fake(config(None))
        .with_sshd_or_skip("bench api: one job")?;
    let dir = tempfile::tempdir().unwrap();
    let hook = job_hook(&lab, dir.path(), 1);
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let prepare = prepare_time(&out.log());
    hook.run_typical_stages(dir.path());
    hook.clone().arg("cleanup").run().assert_exit(0);
    let by_endpoint = lab.fake.requests_by_endpoint();
    let total = by_endpoint.values().sum();
    Some(OneJob {
        by_endpoint,
        total,
        prepare,
    })
}

/// Prepare of `jobs` jobs at once against 3 API workers.
struct Concurrent {
    fastest: f64,
    median: f64,
    slowest: f64,
    requests_per_job: f64,
    most_queued: usize,
}

fn concurrent(bin: &Path, jobs: u64) -> Option<Concurrent> {
    let capacity = ApiCapacity {
        workers: 3,
        service_time: Duration::from_millis(10),
        agent_timeout: Duration::from_secs(3),
    };
    let lab = Lab::builder(bin)
        .fake(config(Some(capacity)))
        .with_sshd_or_skip("bench api: concurrent jobs")?;
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
    let (_, most_queued) = lab.fake.max_concurrent_requests();
    Some(Concurrent {
        fastest: times[0],
        median: times[times.len() / 2],
        slowest: times[times.len() - 1],
        requests_per_job: requests as f64 / jobs as f64,
        most_queued,
    })
}

fn ratio(ours: f64, theirs: f64) -> String {
    if theirs > 0.0 {
        format!("{:.2}×", ours / theirs)
    } else {
        "–".into()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut bin = driver_binary!();
    let mut baseline: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        // cargo bench also passes --bench, which needs nothing.
        match arg.as_str() {
            "--out" => out = args.next(),
            "--bin" => bin = PathBuf::from(args.next().expect("--bin needs a value")),
            "--baseline-bin" => {
                baseline = Some(PathBuf::from(
                    args.next().expect("--baseline-bin needs a value"),
                ))
            }
            _ => {}
        }
    }
    // Hooks run in their job directory: a relative path would name another file there.
    let absolute = |path: PathBuf| {
        if path.is_relative() {
            std::env::current_dir().expect("current dir").join(path)
        } else {
            path
        }
    };
    let mut binaries = vec![("ours", absolute(bin))];
    if let Some(baseline) = baseline {
        binaries.push(("baseline", absolute(baseline)));
    }
    let mut report = String::from("# API footprint and prepare latency (benches/api.rs)\n\n");
    for (name, path) in &binaries {
        let _ = writeln!(report, "- {name}: `{}`", path.display());
    }
    let _ = writeln!(report);

    // Interleaved: each measurement runs every binary once before the next one starts.
    let jobs: Vec<Option<OneJob>> = binaries.iter().map(|(_, bin)| one_job(bin)).collect();
    let mut crowds: BTreeMap<u64, Vec<Option<Concurrent>>> = BTreeMap::new();
    for count in [1, 16] {
        let results = binaries
            .iter()
            .map(|(_, bin)| concurrent(bin, count))
            .collect();
        crowds.insert(count, results);
    }
    if jobs.iter().any(Option::is_none) {
        report.push_str("Skipped: no sshd.\n");
    } else {
        let jobs: Vec<OneJob> = jobs.into_iter().flatten().collect();
        let _ = writeln!(
            report,
            "## API requests of one job (prepare, 6 stages, cleanup)\n"
        );
        let mut endpoints: Vec<&String> = jobs.iter().flat_map(|j| j.by_endpoint.keys()).collect();
        endpoints.sort();
        endpoints.dedup();
        let names: Vec<&str> = binaries.iter().map(|(name, _)| *name).collect();
        let _ = writeln!(
            report,
            "| endpoint | {} |\n|---{}|",
            names.join(" | "),
            "|---".repeat(names.len())
        );
        for endpoint in endpoints {
            let counts: Vec<String> = jobs
                .iter()
                .map(|j| {
                    j.by_endpoint
                        .get(endpoint)
                        .copied()
                        .unwrap_or(0)
                        .to_string()
                })
                .collect();
            let _ = writeln!(report, "| `{endpoint}` | {} |", counts.join(" | "));
        }
        let totals: Vec<String> = jobs.iter().map(|j| format!("**{}**", j.total)).collect();
        let _ = writeln!(
            report,
            "| **total** (older Python driver: {OLD_DRIVER_REQUESTS}) | {} |\n",
            totals.join(" | ")
        );
        let floor = (CLONE_TIME + TASK_TIME + BOOT_TIME).as_secs_f64();
        for (job, name) in jobs.iter().zip(&names) {
            let _ = writeln!(
                report,
                "- {name}: prepare, one job, no capacity limit: {:.1} s (floor {floor:.1} s of \
                 simulated clone, start and boot, plus SSH and the helper)",
                job.prepare
            );
        }
        if jobs.len() > 1 {
            let _ = writeln!(
                report,
                "- ours / baseline: requests {}, prepare {}",
                ratio(jobs[0].total as f64, jobs[1].total as f64),
                ratio(jobs[0].prepare, jobs[1].prepare)
            );
        }
        let _ = writeln!(report);
    }
    let _ = writeln!(
        report,
        "## Prepare against 3 API workers (10 ms a request, agent calls before the agent runs \
         hold a worker 3 s)\n\n| driver | jobs at once | fastest s | median s | slowest s | \
         prepare requests per job | most queued |\n|---|---|---|---|---|---|---|"
    );
    for (count, results) in &crowds {
        for (result, (name, _)) in results.iter().zip(&binaries) {
            if let Some(r) = result {
                let _ = writeln!(
                    report,
                    "| {name} | {count} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    r.fastest, r.median, r.slowest, r.requests_per_job, r.most_queued
                );
            }
        }
        if let [Some(ours), Some(base)] = results.as_slice() {
            let _ = writeln!(
                report,
                "| ours / baseline | {count} | {} | {} | {} | {} | – |",
                ratio(ours.fastest, base.fastest),
                ratio(ours.median, base.median),
                ratio(ours.slowest, base.slowest),
                ratio(ours.requests_per_job, base.requests_per_job)
            );
        }
    }
    match out {
        Some(path) => std::fs::write(&path, &report).expect("write the report"),
        None => print!("{report}"),
    }
}
