//! Multi-node placement (issue 12) against a fake cluster of four nodes: three hold a copy of
//! the template (same name, local storage, each listed in `PROXMOX_TEMPLATES`), one does not;
//! their free memory differs.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::JobState;
use gpr_testkit::hook::Hook;
use gpr_testkit::{driver_binary, FakeConfig, Fault, Lab, NewVm, NodeLoad};

/// ubuntu-focal and its copies on pve2 and pve3 (see `cluster`).
const LISTED: &str = "ubuntu-focal=60900|60901@pve2|60902@pve3";
/// Placement over the four nodes; the template's copies on each node by VMID (a VM name proves
/// nothing).
const PLACED: [(&str, &str); 3] = [
    ("PROXMOX_NODES", "pve1,pve2,pve3,pve4"),
    ("PROXMOX_TEMPLATES", LISTED),
    ("VM_MEMORY_MB", "2048"),
];

fn cluster(test: &str) -> Option<Lab> {
    let config = FakeConfig {
        other_nodes: vec!["pve2".into(), "pve3".into(), "pve4".into()],
        clone_time: Duration::from_millis(200),
        task_time: Duration::from_millis(30),
        boot_time: Duration::from_millis(100),
        ..FakeConfig::default()
    };
    let lab = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_or_skip(test)?;
    // The copies of ubuntu-focal (60900 on pve1) on the nodes with local storage.
    for (vmid, node) in [(60901, "pve2"), (60902, "pve3")] {
        lab.fake.add_vm(NewVm::template(vmid, node, "ubuntu-focal"));
    }
    lab.fake.set_node("pve1", NodeLoad::free_gib(20));
    lab.fake.set_node("pve2", NodeLoad::free_gib(40));
    lab.fake.set_node("pve3", NodeLoad::free_gib(60));
    // The most free memory, but no copy of the template.
    lab.fake.set_node("pve4", NodeLoad::free_gib(63));
    Some(lab)
}

struct Job {
    dir: tempfile::TempDir,
    hook: Hook,
}

/// Runs prepare for `jobs` in batches of `parallel`; returns each job's node from its state.
fn prepare_all(jobs: &[Job], parallel: usize) -> Vec<String> {
    let mut nodes = Vec::new();
    for batch in jobs.chunks(parallel) {
        let children: Vec<_> = batch
            .iter()
            .map(|job| {
                job.hook
                    .clone()
                    .arg("prepare")
                    .command()
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn prepare")
            })
            .collect();
        for (child, job) in children.into_iter().zip(batch) {
            let output = child.wait_with_output().expect("wait for prepare");
            let log = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(0), "{log}");
            let state = JobState::load(job.dir.path()).unwrap().expect("job state");
            assert!(
                log.contains(&format!("placed on {}: ", state.node)) && log.contains(" job VMs"),
                "the log says where and why: {log}"
            );
            nodes.push(state.node);
        }
    }
    nodes
}

fn tally(nodes: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for node in nodes {
        *counts.entry(node.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn thirty_jobs_spread_by_free_memory_and_an_offline_node_gets_no_more() {
    let test = "thirty_jobs_spread_by_free_memory_and_an_offline_node_gets_no_more";
    let Some(lab) = cluster(test) else {
        return;
    };
    let jobs: Vec<Job> = (0..30)
        .map(|n| {
            let dir = tempfile::tempdir().unwrap();
            let hook = lab.job_hook(dir.path(), 7000 + n).host_envs(&PLACED);
            Job { dir, hook }
        })
        .collect();

    // 20 jobs of 2 GiB onto 20 + 40 + 60 GiB free: pve3 first, then pve2 and pve3 together.
    let first = prepare_all(&jobs[..20], 4);
    let counts = tally(&first);
    eprintln!("first 20 jobs: {counts:?}");
    let on = |node: &str| counts.get(node).copied().unwrap_or(0);
    assert_eq!(on("pve4"), 0, "pve4 has no copy of the template");
    assert!(on("pve3") > on("pve2"), "{counts:?}");
    assert!(on("pve2") >= on("pve1"), "{counts:?}");
    assert!(on("pve3") >= 10, "{counts:?}");
    for vm in lab.fake.job_vms() {
        let expected = match vm.node.as_str() {
            "pve1" => 60900,
            "pve2" => 60901,
            "pve3" => 60902,
            other => panic!("VM {} on {other}", vm.vmid),
        };
        assert_eq!(vm.cloned_from, Some(expected), "cloned from the local copy");
    }

    // pve3 goes offline: the next ten jobs go elsewhere and all succeed.
    lab.fake.set_node(
        "pve3",
        NodeLoad {
            online: false,
            ..NodeLoad::free_gib(60)
        },
    );
    let rest = prepare_all(&jobs[20..], 4);
    let later = tally(&rest);
    eprintln!("last 10 jobs with pve3 offline: {later:?}");
    assert!(!later.contains_key("pve3"), "{later:?}");
    assert!(!later.contains_key("pve4"), "{later:?}");

    // Back online: cleanup removes every VM on every node, and gc sweeps an orphan on pve2.
    lab.fake.set_node("pve3", NodeLoad::free_gib(60));
    let orphan = 2_999_999;
    lab.fake.add_vm(NewVm {
        vmid: orphan,
        node: "pve2".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: old_marker().description(),
        running: true,
        ..Default::default()
    });
    for job in &jobs {
        job.hook.clone().arg("cleanup").run().assert_exit(0);
    }
    let gc = lab.fleet_command().arg("gc").output().expect("run gc");
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let left: Vec<_> = lab.fake.job_vms();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The marker of a job whose runner died two days ago.
fn old_marker() -> Marker {
    let mut marker = Marker::new(&JobInfo {
        job_id: Some(1),
        runner_short_token: Some("xS6Vzpvo".into()),
        ..Default::default()
    });
    let two_days_ago = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 2 * 86_400;
    let age = marker.created - two_days_ago;
    marker.created = two_days_ago;
    marker.deadline = marker.deadline.map(|deadline| deadline - age);
    marker
}

#[test]
fn a_template_on_no_listed_node_fails_the_job_and_creates_nothing() {
    let test = "a_template_on_no_listed_node_fails_the_job_and_creates_nothing";
    let Some(lab) = cluster(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Only pve4 is allowed, and it has no copy.
    let out = lab
        .job_hook(dir.path(), 7100)
        .host_envs(&PLACED)
        .host_env("PROXMOX_NODES", "pve4")
        .arg("prepare")
        .run();
    assert_ne!(out.code, 0);
    let log = out.log();
    assert!(log.contains("pve4: has no copy of the template"), "{log}");
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_shared_storage_template_is_cloned_with_target_to_a_node_without_a_copy() {
    let test = "a_shared_storage_template_is_cloned_with_target_to_a_node_without_a_copy";
    let Some(lab) = cluster(test) else {
        return;
    };
    // On pve2, on the shared RBD pool; pve4 (the most free memory) has no copy.
    lab.fake
        .add_vm(NewVm::shared_template(61000, "pve2", "ubuntu-shared"));
    let jobs: Vec<(tempfile::TempDir, Hook)> = (0..3)
        .map(|n| {
            let dir = tempfile::tempdir().unwrap();
            let hook = lab
                .job_hook(dir.path(), 7200 + n)
                .host_envs(&PLACED)
                .host_env("PROXMOX_NODES", "pve2,pve4")
                .host_env("PROXMOX_ALLOWED_TEMPLATES", "ubuntu-shared")
                .job_var("PROXMOX_TEMPLATE", "ubuntu-shared");
            (dir, hook)
        })
        .collect();
    for (dir, hook) in &jobs {
        let out = hook.clone().arg("prepare").run();
        let log = out.log();
        assert_eq!(out.code, 0, "{log}");
        assert!(
            log.contains("placed on pve4: ") && log.contains("cloned there with target"),
            "{log}"
        );
        let state = JobState::load(dir.path()).unwrap().expect("job state");
        assert_eq!(state.node, "pve4");
        assert_eq!(state.template_node.as_deref(), Some("pve2"));
        let vm = lab.fake.vm(state.vmid).expect("the job's VM");
        assert_eq!(vm.node, "pve4", "the clone moved to its target");
        assert_eq!(vm.cloned_from, Some(61000));
        assert_eq!(vm.status, "running");
        assert!(
            vm.config["scsi0"].starts_with("ceph-vm:"),
            "{:?}",
            vm.config
        );
    }
    for (_, hook) in &jobs {
        hook.clone().arg("cleanup").run().assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

#[test]
fn a_local_storage_template_is_never_cloned_to_another_node() {
    let test = "a_local_storage_template_is_never_cloned_to_another_node";
    let Some(lab) = cluster(test) else {
        return;
    };
    // ubuntu-focal's copies are all on local-lvm: pve4, with the most free memory, has none.
    let dir = tempfile::tempdir().unwrap();
    let out = lab
        .job_hook(dir.path(), 7300)
        .host_envs(&PLACED)
        .host_env("PROXMOX_NODES", "pve1,pve4")
        .arg("prepare")
        .run();
    let log = out.log();
    assert_eq!(out.code, 0, "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("job state");
    assert_eq!(state.node, "pve1", "{log}");
    assert_eq!(state.template_node, None);
    let targeted = lab
        .fake
        .requests()
        .iter()
        .filter(|request| request.method == "POST" && request.path.ends_with("/clone"))
        .filter(|request| request.body.contains("target="))
        .count();
    assert_eq!(targeted, 0, "no clone asked for a target");
    lab.job_hook(dir.path(), 7300)
        .host_envs(&PLACED)
        .arg("cleanup")
        .run()
        .assert_exit(0);
}

#[test]
fn a_node_that_fails_mid_clone_sends_the_job_to_another_node_and_cleanup_gets_both() {
    let test = "a_node_that_fails_mid_clone_sends_the_job_to_another_node_and_cleanup_gets_both";
    let Some(lab) = cluster(test) else {
        return;
    };
    // pve3 has the most free memory; it goes down right after it accepted the clone.
    lab.fake.inject(Fault::NodeDownAfterCloneRequest {
        node: "pve3".into(),
        count: 1,
    });
    let dir = tempfile::tempdir().unwrap();
    let hook = lab.job_hook(dir.path(), 7400).host_envs(&PLACED);
    let out = hook.clone().arg("prepare").run();
    let log = out.log();
    assert_eq!(out.code, 0, "{log}");
    assert!(log.contains("node pve3 failed while"), "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("job state");
    assert_ne!(state.node, "pve3", "{log}");
    assert_eq!(state.left_behind.len(), 1, "{state:?}");
    assert_eq!(state.left_behind[0].node, "pve3");
    let stranded = state.left_behind[0].vmid;

    // pve3 is back: its clone finished meanwhile, and cleanup removes both VMs.
    lab.fake.set_node("pve3", NodeLoad::free_gib(60));
    assert!(lab.fake.vm(stranded).is_some(), "the clone on pve3 went on");
    let cleanup = hook.clone().arg("cleanup").run();
    assert_eq!(cleanup.code, 0, "{}", cleanup.log());
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

/// Issue 19: another user of the cluster (the co-tenant `mallory@pve!t`, over HTTP with its own
/// token) makes a template named ubuntu-focal on pve4, the node with the most free memory and
/// no copy of ours. It never gets a job: a `PROXMOX_TEMPLATES` entry means only the VMIDs it
/// lists (one VMID: only that one), never a template of the same name.
#[test]
fn a_co_tenants_look_alike_template_never_gets_jobs_only_listed_copies_do() {
    let test = "a_co_tenants_look_alike_template_never_gets_jobs_only_listed_copies_do";
    let Some(lab) = cluster(test) else {
        return;
    };
    let mallory = lab.fake.co_tenant();
    mallory
        .create_template("pve4", 61950, "ubuntu-focal")
        .expect("the co-tenant's look-alike template on pve4");
    let forged = lab.fake.vm(61950).expect("look-alike");
    assert!(forged.template && forged.node == "pve4" && forged.name == "ubuntu-focal");

    let run = |map: &str, first_id: u64| -> Vec<String> {
        let jobs: Vec<Job> = (0..6)
            .map(|n| {
                let dir = tempfile::tempdir().unwrap();
                let hook = lab
                    .job_hook(dir.path(), first_id + n)
                    .host_envs(&PLACED)
                    .host_env("PROXMOX_TEMPLATES", map);
                Job { dir, hook }
            })
            .collect();
        let nodes = prepare_all(&jobs, 3);
        for vm in lab.fake.job_vms() {
            assert_ne!(
                vm.cloned_from,
                Some(61950),
                "cloned from the look-alike: {vm:?}"
            );
        }
        for job in &jobs {
            job.hook.clone().arg("cleanup").run().assert_exit(0);
        }
        assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
        nodes
    };

    // The simple form names one template VM: every job is cloned from it, on its node.
    let single = run("ubuntu-focal=60900", 7500);
    assert!(single.iter().all(|node| node == "pve1"), "{single:?}");

    // The listed copies get the jobs, by free memory: pve3 (60 GiB) first, never pve4.
    let listed = run(LISTED, 7600);
    let counts = tally(&listed);
    assert!(!counts.contains_key("pve4"), "{counts:?}");
    assert!(counts.get("pve3").copied().unwrap_or(0) >= 3, "{counts:?}");
}
