//! The API footprint of a typical job (prepare, six stages, cleanup), counted by endpoint against
//! the fake: at most the older Python driver's 41 requests (issue 12). Counts, not times.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use gpr_testkit::fake_proxmox::RecordedRequest;
use gpr_testkit::hook::Hook;
use gpr_testkit::{driver_binary, FakeConfig, Lab};

/// What the older Python driver sent for the same job.
const OLD_DRIVER_REQUESTS: usize = 41;

/// `GET /nodes/{node}/qemu/{vmid}/agent/network-get-interfaces` → `GET qemu/agent/network-get-interfaces`.
fn endpoint(request: &RecordedRequest) -> String {
    let path = request.path.trim_start_matches("/api2/json");
    let words: Vec<&str> = path
        .split('/')
        .filter(|part| !part.is_empty())
        .filter(|part| !part.chars().all(|c| c.is_ascii_digit()))
        .filter(|part| !part.starts_with("UPID"))
        .collect();
    let mut words = words;
    if words.first() == Some(&"nodes") && words.len() > 1 {
        words.remove(1);
    }
    format!("{} {}", request.method, words.join("/"))
}

fn by_endpoint(requests: &[RecordedRequest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        *counts.entry(endpoint(request)).or_insert(0) += 1;
    }
    counts
}

fn job_hook(lab: &Lab, dir: &Path) -> Hook {
    lab.hook(dir)
        .job_var("CI_JOB_ID", "4711")
        .job_var("CI_PROJECT_PATH", "group/project")
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
        .job_var("CI_RUNNER_SHORT_TOKEN", "xS6Vzpvo")
}

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
    let hook = job_hook(&lab, dir.path());
    hook.clone().arg("prepare").run().assert_exit(0);
    let after_prepare = lab.fake.request_count();
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
    let after_stages = lab.fake.request_count();
    hook.clone().arg("cleanup").run().assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());

    let requests = lab.fake.requests();
    let counts = by_endpoint(&requests);
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
        requests.len() <= OLD_DRIVER_REQUESTS,
        "{} requests for one job, budget {OLD_DRIVER_REQUESTS}:\n{}",
        requests.len(),
        table.join("\n")
    );
}
