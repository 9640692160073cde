//! The warm pool end to end: `gitlab-proxmox-runner pool` processes keep warm VMs on the fake
//! cluster (a real sshd on loopback for each VM, with host keys of its own), prepare hooks claim them through
//! PVE's config digest, and what nobody claims is recycled or swept.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::warm::{claiming_hook, complete_warm};
use gitlab_proxmox_runner::fleet_key::FleetKey;
use gitlab_proxmox_runner::marker::{ClaimOutcome, ClaimReport, Marker};
use gitlab_proxmox_runner::state::JobState;
use gitlab_proxmox_runner::vm::VmRef;
use gpr_testkit::pool_service::{gc_until_empty, PoolService};
use gpr_testkit::prometheus::Prometheus;
use gpr_testkit::ssh_job::write_stage_script;
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::wait::POLL;
use gpr_testkit::{driver_binary, poll, wait_for, Lab, VmSnapshot};

const TEMPLATE: &str = "ubuntu-focal";
const TEMPLATE_VMID: u32 = 60900;

/// A lab whose VMs each answer SSH with host keys of their own (an sshd per VM), as clones of a
/// properly cleaned template do: the pool refuses clones that share a host key.
#[track_caller]
fn start(test: &str) -> Option<Lab> {
    Lab::builder(driver_binary!()).with_sshd_per_vm_or_skip(test)
}

fn marker_of(vm: &VmSnapshot) -> Option<Marker> {
    Marker::find_in(&vm.description)
}

/// One complete warm VM, made by a pool service that is stopped again, so that nothing else
/// changes the cluster while the test acts.
fn one_warm_vm(lab: &Lab) -> VmSnapshot {
    let pool = PoolService::keeping(lab, "pool-a", TEMPLATE, 1, &[]);
    let warm = wait_for("a warm VM", Duration::from_secs(60), || {
        complete_warm(lab).into_iter().next()
    });
    pool.stop();
    warm
}

#[test]
fn a_warm_vm_is_claimed_the_job_runs_and_the_pool_refills() {
    let Some(lab) = start("a_warm_vm_is_claimed_the_job_runs_and_the_pool_refills") else {
        return;
    };
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 1, &[]);
    let warm = wait_for("a warm VM", Duration::from_secs(60), || {
        complete_warm(&lab).into_iter().next()
    });
    assert_eq!(warm.cloned_from, Some(TEMPLATE_VMID));

    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4711, TEMPLATE, "runner-a");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(
        log.contains(&format!("claimed warm VM {} (warm for", warm.vmid)),
        "{log}"
    );
    assert!(
        !log.contains("cloned template"),
        "no clone for this job: {log}"
    );
    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_eq!(state.vmid, warm.vmid);
    let ip = lab.fake.guest_ip(warm.vmid).to_string();
    assert_eq!(state.ip.as_deref(), Some(ip.as_str()));
    assert!(!state.host_keys.is_empty());
    // The VM is the job's now: its marker, its name, no warm fields left.
    let claimed = lab.fake.vm(warm.vmid).unwrap();
    let marker = marker_of(&claimed).unwrap();
    assert_eq!(marker.warm, None);
    assert_eq!(Some(marker), Marker::parse_line(&state.marker));
    assert!(!claimed.description.contains("ssh-host-key"));
    assert_eq!(claimed.name, "ci-4711-group-project");

    let script = write_stage_script(dir.path(), "echo hello from the warm VM\n");
    let out = hook
        .clone()
        .arg("run")
        .arg(script)
        .arg("build_script")
        .run();
    out.assert_exit(0);
    assert!(
        out.stdout.contains("hello from the warm VM"),
        "{}",
        out.log()
    );

    // The pool refills while the job runs.
    let refill = wait_for("the pool to refill", Duration::from_secs(60), || {
        complete_warm(&lab)
            .into_iter()
            .find(|vm| vm.vmid != warm.vmid)
    });
    hook.clone().arg("cleanup").run().assert_exit(0);
    assert!(
        lab.fake.vm(warm.vmid).is_none(),
        "cleanup destroys a claimed VM"
    );

    let (code, pool_log) = pool.stop();
    assert_eq!(code, 0, "{pool_log}");
    assert!(pool_log.contains("warmed VM"), "{pool_log}");
    assert!(pool_log.contains("stopped (SIGTERM)"), "{pool_log}");
    // Documented: complete warm VMs outlive the service, until their idle deadline.
    assert!(lab.fake.vm(refill.vmid).is_some());
    gc_until_empty(&lab, &[]);
}

#[test]
fn racing_prepares_from_two_runners_never_share_a_warm_vm() {
    let Some(lab) = start("racing_prepares_from_two_runners_never_share_a_warm_vm") else {
        return;
    };
    // Two services, one cluster-wide target: together they settle at 4.
    let a = PoolService::keeping(&lab, "pool-a", TEMPLATE, 4, &[]);
    let b = PoolService::keeping(&lab, "pool-b", TEMPLATE, 4, &[]);
    wait_for("exactly 4 warm VMs", Duration::from_secs(90), || {
        let warm = complete_warm(&lab).len();
        let warming = lab.fake.job_vms().len() - warm;
        (warm == 4 && warming == 0).then_some(())
    });
    let (code_a, log_a) = a.stop();
    let (code_b, log_b) = b.stop();
    assert_eq!((code_a, code_b), (0, 0), "{log_a}\n{log_b}");
    let warm: HashSet<u32> = complete_warm(&lab).iter().map(|vm| vm.vmid).collect();
    assert_eq!(warm.len(), 4);

    let dirs: Vec<tempfile::TempDir> = (0..16).map(|_| tempfile::tempdir().unwrap()).collect();
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let runner = if i % 2 == 0 { "runner-a" } else { "runner-b" };
                let hook = claiming_hook(&lab, dir.path(), 5000 + i as u64, TEMPLATE, runner);
                scope.spawn(move || hook.arg("prepare").run())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut claimed = Vec::new();
    let mut vmids = HashSet::new();
    for (out, dir) in outputs.iter().zip(&dirs) {
        out.assert_exit(0);
        let state = JobState::load(dir.path()).unwrap().expect("a job state");
        assert!(
            vmids.insert(state.vmid),
            "VMID {} served two jobs",
            state.vmid
        );
        if out.log().contains("claimed warm VM") {
            claimed.push(state.vmid);
        } else {
            assert!(out.log().contains("cloned template"), "{}", out.log());
        }
    }
    claimed.sort_unstable();
    let mut expected: Vec<u32> = warm.into_iter().collect();
    expected.sort_unstable();
    assert_eq!(claimed, expected, "every warm VM served exactly one job");
    assert_eq!(vmids.len(), 16);

    for (i, dir) in dirs.iter().enumerate() {
        let runner = if i % 2 == 0 { "runner-a" } else { "runner-b" };
        claiming_hook(&lab, dir.path(), 5000 + i as u64, TEMPLATE, runner)
            .arg("cleanup")
            .run()
            .assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

#[test]
fn a_template_change_recycles_warm_vms() {
    let Some(lab) = start("a_template_change_recycles_warm_vms") else {
        return;
    };
    let pool = PoolService::start_with_args(
        &lab,
        "pool-a",
        &[("WARM_POOL", "ubuntu-focal=1")],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = pool.metrics_addr();
    let old = wait_for("a warm VM", Duration::from_secs(60), || {
        complete_warm(&lab).into_iter().next()
    });
    let old_digest = marker_of(&old).unwrap().warm.unwrap().template_digest;
    assert!(lab
        .fake
        .set_vm_config(TEMPLATE_VMID, "description", Some("ubuntu-focal, patched")));
    let new = wait_for(
        "a warm VM of the new template",
        Duration::from_secs(60),
        || {
            let now = complete_warm(&lab);
            let gone = lab.fake.vm(old.vmid).is_none();
            now.into_iter()
                .find(|vm| marker_of(vm).unwrap().warm.unwrap().template_digest != old_digest)
                .filter(|_| gone)
        },
    );
    assert_ne!(new.vmid, old.vmid);
    // Counted as a recycle, by its reason; the recycle's own marker is no claim.
    let recycles = r#"gitlab_proxmox_runner_pool_recycles_total{template="ubuntu-focal",reason="template_changed"}"#;
    wait_for("the recycle counted", Duration::from_secs(30), || {
        (scraped(metrics, recycles) == 1.0).then_some(())
    });
    let claims = r#"gitlab_proxmox_runner_pool_claims_total{template="ubuntu-focal",node="pve1"}"#;
    assert_eq!(scraped(metrics, claims), 0.0);
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!(
            "recycled warm VM {} (its template changed)",
            old.vmid
        )),
        "{log}"
    );
    gc_until_empty(&lab, &[]);
}

#[test]
fn a_broken_warm_vm_is_never_handed_to_a_job() {
    let Some(lab) = start("a_broken_warm_vm_is_never_handed_to_a_job") else {
        return;
    };
    let warm = one_warm_vm(&lab);
    // Its SSH server no longer has the host key it had when it was warmed (a guest that
    // regenerated its keys, or someone else's machine at that address): the pinned key fails.
    let stranger = ClientKey::ed25519();
    let pinned = stranger
        .public_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    // Sealed with the fleet's key, as the pool would have sealed a key it read wrongly: a
    // warm VM of ours whose pinned key the VM does not have (unsealed, it would be a mere
    // look-alike, ignored: see `a_look_alike_warm_vm_of_another_cluster_user_is_never_claimed`).
    let mut marker = marker_of(&warm).unwrap();
    let vm = VmRef {
        node: warm.node.clone(),
        vmid: warm.vmid,
    };
    let key = FleetKey::parse(gpr_testkit::fleet::FLEET_KEY).unwrap();
    marker.seal(&key, &vm, std::slice::from_ref(&pinned));
    let description = marker.warm_description(&[pinned]);
    assert!(lab
        .fake
        .set_vm_config(warm.vmid, "description", Some(&description)));

    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4712, TEMPLATE, "runner-a");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(
        log.contains(&format!("claimed warm VM {} failed its check", warm.vmid)),
        "{log}"
    );
    assert!(log.contains("cloned template"), "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_ne!(state.vmid, warm.vmid);
    assert!(
        lab.fake.vm(warm.vmid).is_none(),
        "the broken VM is destroyed"
    );
    hook.arg("cleanup").run().assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn clones_that_share_a_host_key_are_refused_recycled_and_not_warmed_again() {
    // One sshd, one host key, for every VM: clones of a template whose host keys were never
    // regenerated, where pinning the key proves nothing.
    let Some(lab) = Lab::builder(driver_binary!()).with_sshd_or_skip(
        "clones_that_share_a_host_key_are_refused_recycled_and_not_warmed_again",
    ) else {
        return;
    };
    let shared_key = lab
        .sshd()
        .host_key_lines()
        .into_iter()
        .find(|line| line.starts_with("ssh-ed25519 "))
        .unwrap();
    let fingerprint = gitlab_proxmox_runner::ssh::fingerprint_of_line(&shared_key).unwrap();
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 2, &[]);
    // The second clone to come up shows the first one's key: refused and destroyed; then the
    // first, published already, is recycled too.
    let log = wait_for(
        "a refused clone and the first one recycled",
        Duration::from_secs(60),
        || {
            let log = pool.log();
            (log.contains("(its SSH host key is not its own)") && lab.fake.job_vms().is_empty())
                .then_some(log)
        },
    );
    let refusal = log
        .lines()
        .find(|line| line.contains("warming a VM from ubuntu-focal failed"))
        .unwrap_or_else(|| panic!("no refusal:\n{log}"));
    for fragment in [
        "ERROR: pool pool-a: warming a VM from ubuntu-focal failed: settings: VM ",
        "cloned from template ubuntu-focal (60900), has an SSH host key that is not its own \
         (ssh-ed25519 ",
        fingerprint.as_str(),
        ", also held by warm VM ",
        "remove /etc/ssh/ssh_host_*",
        "The pool destroys it, never hands it to a job, and warms no VM of ubuntu-focal for 10 min",
    ] {
        assert!(refusal.contains(fragment), "{fragment:?} in\n{refusal}");
    }
    let recycled = log
        .lines()
        .find(|line| line.contains("Recycling it; warming no VM of ubuntu-focal"))
        .unwrap_or_else(|| panic!("the published one was not recycled:\n{log}"));
    assert!(
        recycled.contains("ERROR: pool pool-a: ubuntu-focal: VM "),
        "{recycled}"
    );
    assert!(recycled.contains(&fingerprint), "{recycled}");
    // The public key itself stays out of the log (the fingerprint names it).
    assert!(
        !log.contains(shared_key.split_whitespace().nth(1).unwrap()),
        "{log}"
    );
    // Held off: no clone after the two whose keys matched, though the pool is empty now.
    let clones = lab
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
        .count();
    assert_eq!(clones, 2, "{log}");
    let (code, _) = pool.stop();
    assert_eq!(code, 0);
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_killed_pool_service_leaves_nothing_gc_does_not_remove() {
    let Some(lab) = start("a_killed_pool_service_leaves_nothing_gc_does_not_remove") else {
        return;
    };
    // Slow boots: the kill lands while warm-ups are in flight.
    lab.fake.set_boot_time(Duration::from_secs(5));
    let mut pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 3, &[("WARM_MAX_IDLE", "2")]);
    wait_for("warm-ups in flight", Duration::from_secs(60), || {
        (lab.fake.job_vms().len() >= 2).then_some(())
    });
    pool.child.kill().unwrap();
    pool.child.wait().unwrap();
    assert!(!lab.fake.job_vms().is_empty());
    // The plain sweep, by each VM's own (idle) deadline: no --max-age.
    let mut last = String::new();
    let swept = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        if lab.fake.job_vms().is_empty() {
            return Some(());
        }
        let out = lab.fleet_command().arg("gc").output().unwrap();
        last = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        None
    });
    assert!(
        swept.is_some(),
        "gc left {:?}; its last run said:\n{last}",
        lab.fake.job_vms()
    );
}

#[test]
fn claims_race_with_two_pool_services_that_keep_refilling_and_trimming() {
    let Some(lab) = start("claims_race_with_two_pool_services_that_keep_refilling_and_trimming")
    else {
        return;
    };
    let a = PoolService::keeping(&lab, "pool-a", TEMPLATE, 4, &[]);
    let b = PoolService::keeping(&lab, "pool-b", TEMPLATE, 4, &[]);
    let initial: HashSet<u32> = wait_for("4 warm VMs", Duration::from_secs(90), || {
        let warm = complete_warm(&lab);
        (warm.len() >= 4).then(|| warm.iter().map(|vm| vm.vmid).collect())
    });

    // The services go on refilling, recycling and trimming while the jobs claim.
    let dirs: Vec<tempfile::TempDir> = (0..16).map(|_| tempfile::tempdir().unwrap()).collect();
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let runner = if i % 2 == 0 { "runner-a" } else { "runner-b" };
                let hook = claiming_hook(&lab, dir.path(), 6000 + i as u64, TEMPLATE, runner);
                scope.spawn(move || hook.arg("prepare").run())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut vmids = HashSet::new();
    let mut claimed = HashSet::new();
    for (out, dir) in outputs.iter().zip(&dirs) {
        out.assert_exit(0);
        let state = JobState::load(dir.path()).unwrap().expect("a job state");
        assert!(
            vmids.insert(state.vmid),
            "VMID {} served two jobs",
            state.vmid
        );
        // Each job's VM carries that job's marker, whichever path it took.
        let vm = lab.fake.vm(state.vmid).expect("the job's VM exists");
        assert_eq!(marker_of(&vm), Marker::parse_line(&state.marker));
        if out.log().contains("claimed warm VM") {
            claimed.insert(state.vmid);
        }
    }
    assert!(
        initial.iter().all(|vmid| lab
            .fake
            .vm(*vmid)
            .is_none_or(|vm| marker_of(&vm).is_none_or(|m| m.warm.is_none()))),
        "every VM that was warm when the jobs came was claimed or recycled"
    );
    assert!(claimed.len() >= 4, "claimed {claimed:?}");

    for (i, dir) in dirs.iter().enumerate() {
        let runner = if i % 2 == 0 { "runner-a" } else { "runner-b" };
        claiming_hook(&lab, dir.path(), 6000 + i as u64, TEMPLATE, runner)
            .arg("cleanup")
            .run()
            .assert_exit(0);
    }
    for vmid in &vmids {
        assert!(
            lab.fake.vm(*vmid).is_none(),
            "VM {vmid} outlived its cleanup"
        );
    }
    let (code_a, log_a) = a.stop();
    let (code_b, log_b) = b.stop();
    assert_eq!((code_a, code_b), (0, 0), "{log_a}\n{log_b}");
    // What is left is warm VMs no job took: gc's business.
    assert!(lab
        .fake
        .job_vms()
        .iter()
        .all(|vm| marker_of(vm).is_some_and(|m| m.warm.is_some() || m.job_id.is_none())));
    gc_until_empty(&lab, &[]);
}

#[test]
fn the_pool_service_can_run_the_orphan_sweep_on_a_schedule() {
    let Some(lab) = start("the_pool_service_can_run_the_orphan_sweep_on_a_schedule") else {
        return;
    };
    // A job VM whose runner died long ago: past its recorded deadline.
    let mut orphan = Marker::new(&Default::default());
    orphan.created = 1_700_000_000;
    orphan.deadline = Some(1_700_003_600);
    lab.fake.add_vm(gpr_testkit::NewVm {
        vmid: 2_000_500,
        name: "ci-1-dead".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: orphan.description(),
        running: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("pool.err");
    let mut sweeping = Command::new(&lab.bin)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(lab.settings())
        .envs([gpr_testkit::fleet::settings_env()])
        .env("WARM_POOL", format!("{TEMPLATE}=0"))
        .args(["pool", "--interval", "0.2", "--gc-every", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let swept = poll(Duration::from_secs(30), POLL, || {
        lab.fake.vm(2_000_500).is_none().then_some(())
    });
    if swept.is_none() {
        let _ = sweeping.kill();
        panic!(
            "the orphan is still there: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
    }
    unsafe { libc::kill(sweeping.id() as i32, libc::SIGTERM) };
    assert!(sweeping.wait().unwrap().success());
}

/// Issue 19's first attack: another user of the cluster clones a template into a VMID of our
/// range, starts it, tags it like ours and copies a real warm VM's description (its marker
/// line, its address, its host key: all readable with VM.Audit). Its sshd would take any key.
/// Without a MAC only our hosts can make, the next job claims it and runs there.
#[test]
fn a_look_alike_warm_vm_of_another_cluster_user_is_never_claimed_counted_or_destroyed() {
    let Some(lab) =
        start("a_look_alike_warm_vm_of_another_cluster_user_is_never_claimed_counted_or_destroyed")
    else {
        return;
    };
    let real = one_warm_vm(&lab);

    // The forger's VM, in our range, running, its description a copy of the real one's.
    let mallory = lab.fake.co_tenant();
    let forged = real.vmid + 500;
    mallory
        .clone_vm(&real.node, TEMPLATE_VMID, forged, &real.name)
        .unwrap();
    mallory
        .set_config(
            &real.node,
            forged,
            &[
                ("tags", "gitlab-proxmox-runner"),
                ("description", &real.description),
            ],
        )
        .unwrap();
    mallory.start(&real.node, forged).unwrap();
    // Booted, its agent answering: a working machine, as a forger would have it.
    let ping = format!("/nodes/{}/qemu/{forged}/agent/ping", real.node);
    wait_for(
        "the look-alike's guest agent",
        Duration::from_secs(60),
        || mallory.call("POST", &ping, &[]).ok(),
    );
    // The real one is busy (a backup holds it), so the look-alike is the only candidate.
    assert!(lab.fake.set_vm_lock(real.vmid, Some("backup")));

    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4719, TEMPLATE, "runner-a");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(
        log.contains("ignored 1 look-alike warm VMs (bad MAC)"),
        "{log}"
    );
    assert!(!log.contains("claimed warm VM"), "{log}");
    assert!(log.contains("cloned template"), "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_ne!(state.vmid, forged, "the job runs on the forger's VM");
    let untouched = lab
        .fake
        .vm(forged)
        .expect("the look-alike is not ours to destroy");
    assert_eq!(untouched.description, real.description);
    hook.arg("cleanup").run().assert_exit(0);

    // The pool neither counts it nor recycles it: with the real one gone, it warms a new one.
    assert!(lab.fake.set_vm_lock(real.vmid, None));
    let out = lab
        .fleet_command()
        .args(["gc", "--max-age", "0s"])
        .output()
        .unwrap();
    let swept = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        swept.contains("1 look-alike warm VMs ignored (bad MAC)"),
        "{swept}"
    );
    assert!(lab.fake.vm(real.vmid).is_none(), "gc sweeps our own");
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 1, &[]);
    wait_for("a new warm VM of ours", Duration::from_secs(60), || {
        complete_warm(&lab)
            .into_iter()
            .find(|vm| vm.vmid != forged && vm.vmid != real.vmid)
    });
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        lab.fake.vm(forged).map(|vm| vm.description),
        Some(real.description.clone()),
        "neither gc nor the pool touches the look-alike"
    );
    mallory.stop(&real.node, forged).unwrap();
    mallory
        .call(
            "DELETE",
            &format!("/nodes/{}/qemu/{forged}", real.node),
            &[],
        )
        .unwrap();
    gc_until_empty(&lab, &[]);
}

/// A job's own key decides nothing about warm VMs: one that does not parse fails the job
/// (build failure) before any claim or clone; one that parses gets a cold clone of its own,
/// since warm VMs were made (and checked) for the host's key.
#[test]
fn a_job_that_brings_its_own_key_never_claims_and_a_broken_one_fails_before_any_claim() {
    let Some(lab) =
        start("a_job_that_brings_its_own_key_never_claims_and_a_broken_one_fails_before_any_claim")
    else {
        return;
    };
    let warm = one_warm_vm(&lab);
    let clones_before = lab
        .fake
        .requests_by_endpoint()
        .get("POST nodes/qemu/clone")
        .copied();

    let dir = tempfile::tempdir().unwrap();
    // The host sets no key of its own: the job's is the one used.
    let broken = claiming_hook(&lab, dir.path(), 4730, TEMPLATE, "runner-a")
        .without_host_env("VM_SSH_PRIVATE_KEY")
        .job_var(
            "VM_SSH_PRIVATE_KEY",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----",
        );
    let out = broken.arg("prepare").run();
    out.assert_exit(gpr_testkit::hook::BUILD_FAILURE);
    assert!(out.log().contains("VM_SSH_PRIVATE_KEY"), "{}", out.log());
    assert_eq!(
        lab.fake.vm(warm.vmid).map(|vm| vm.description),
        Some(warm.description.clone()),
        "the warm VM is untouched"
    );
    assert_eq!(
        lab.fake
            .requests_by_endpoint()
            .get("POST nodes/qemu/clone")
            .copied(),
        clones_before,
        "nothing was cloned"
    );

    // The job's own (working) key: a clone for it, the warm VM left for the host's jobs.
    let dir = tempfile::tempdir().unwrap();
    let own = claiming_hook(&lab, dir.path(), 4731, TEMPLATE, "runner-a")
        .without_host_env("VM_SSH_PRIVATE_KEY")
        .job_var("VM_SSH_PRIVATE_KEY", lab.key.private_text.clone());
    let out = own.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(
        log.contains("the job supplies its own VM_SSH_PRIVATE_KEY"),
        "{log}"
    );
    assert!(!log.contains("claimed warm VM"), "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_ne!(state.vmid, warm.vmid);
    assert_eq!(
        lab.fake.vm(warm.vmid).map(|vm| vm.description),
        Some(warm.description.clone())
    );
    own.arg("cleanup").run().assert_exit(0);
    gc_until_empty(&lab, &[]);
}

/// A runner host whose key the warm VMs refuse (rotated on the host, not yet in the
/// template) costs the pool one VM per job, not all of them: the first refusal stops the
/// claims and the job clones (and fails there, as it would without a pool).
#[test]
fn a_refused_key_discards_one_warm_vm_and_stops_claiming() {
    let Some(lab) = start("a_refused_key_discards_one_warm_vm_and_stops_claiming") else {
        return;
    };
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 3, &[]);
    wait_for("three warm VMs", Duration::from_secs(90), || {
        (complete_warm(&lab).len() == 3).then_some(())
    });
    pool.stop();

    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4740, TEMPLATE, "runner-a")
        .host_env("VM_SSH_PRIVATE_KEY", ClientKey::ed25519().private_text)
        .host_env("VM_BOOT_TIMEOUT", "3");
    let out = hook.clone().arg("prepare").run();
    assert_ne!(out.code, 0);
    let log = out.log();
    assert_eq!(
        log.matches("failed its check").count(),
        1,
        "exactly one warm VM spent: {log}"
    );
    assert!(log.contains("not claiming more warm VMs"), "{log}");
    assert_eq!(complete_warm(&lab).len(), 2, "{log}");
    hook.arg("cleanup").run().assert_exit(0);
    gc_until_empty(&lab, &[]);
}

/// The claim is recorded before its compare-and-swap: a prepare killed (SIGKILL, no chance to
/// roll back) after the swap landed but before it heard so leaves a job state that names the
/// VM, with no clone to wait for, and cleanup destroys it.
#[test]
fn a_prepare_killed_in_the_middle_of_a_claim_leaves_the_vm_to_its_cleanup() {
    let Some(lab) = start("a_prepare_killed_in_the_middle_of_a_claim_leaves_the_vm_to_its_cleanup")
    else {
        return;
    };
    let warm = one_warm_vm(&lab);
    // The swap's answer is held back: the write lands, the prepare never hears of it.
    lab.fake.inject(gpr_testkit::Fault::SlowAnswer {
        method: "PUT".into(),
        path_contains: format!("/qemu/{}/config", warm.vmid),
        delay: Duration::from_secs(60),
    });
    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4750, TEMPLATE, "runner-a");
    let mut prepare = hook.clone().arg("prepare").spawn();
    wait_for("the claim's swap to land", Duration::from_secs(30), || {
        lab.fake
            .vm(warm.vmid)
            .filter(|vm| vm.description.contains(" job=4750 "))
    });
    prepare.kill().unwrap();
    prepare.wait().unwrap();
    lab.fake.clear_faults();

    let state = JobState::load(dir.path())
        .unwrap()
        .expect("the claim is in the job state");
    assert_eq!(state.vmid, warm.vmid);
    assert_eq!(
        state.clone_sent_at, None,
        "a claim has no clone to wait for"
    );
    let out = hook.arg("cleanup").run();
    out.assert_exit(0);
    assert!(lab.fake.vm(warm.vmid).is_none(), "{}", out.log());
    gc_until_empty(&lab, &[]);
}

#[test]
fn prometheus_scrapes_the_pool_service_and_sees_warm_vms_and_claims() {
    let test = "prometheus_scrapes_the_pool_service_and_sees_warm_vms_and_claims";
    if let Some(reason) = gpr_testkit::prometheus::unavailable_reason() {
        gpr_testkit::prometheus::skip(test, &reason);
        return;
    }
    let Some(lab) = start(test) else {
        return;
    };
    // debian-12 has a pool entry of 0: the service watches it, and a job that looks for one of
    // its warm VMs finds none (deterministically) and clones.
    let pool = PoolService::start_with_args(
        &lab,
        "pool-a",
        &[("WARM_POOL", "ubuntu-focal=1,debian-12=0")],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = pool.metrics_addr();
    let prometheus = Prometheus::start(&[metrics]);
    let warm = wait_for("a warm VM", Duration::from_secs(60), || {
        complete_warm(&lab).into_iter().next()
    });
    let ready =
        r#"gitlab_proxmox_runner_pool_warm_vms{template="ubuntu-focal",node="pve1",state="ready"}"#;
    let warming = r#"gitlab_proxmox_runner_pool_warm_vms{template="ubuntu-focal",node="pve1",state="warming"}"#;
    let claims = r#"gitlab_proxmox_runner_pool_claims_total{template="ubuntu-focal",node="pve1"}"#;
    let reported = |template: &str, outcome: &str| {
        format!(
            r#"gitlab_proxmox_runner_prepare_claims_total{{template="{template}",outcome="{outcome}"}}"#
        )
    };
    wait_for(
        "Prometheus to see 1 ready warm VM",
        Duration::from_secs(60),
        || (prometheus.value(ready) == Some(1.0)).then_some(()),
    );
    assert_eq!(
        prometheus.target_health().len(),
        1,
        "{:?}",
        prometheus.target_health()
    );
    assert!(
        prometheus.query(claims).is_empty(),
        "no claim yet: {:?}",
        prometheus.query(claims)
    );
    assert_eq!(
        prometheus.value(r#"gitlab_proxmox_runner_pool_target_vms{template="ubuntu-focal"}"#),
        Some(1.0)
    );

    // Slow boots from here: the refill after the claim is seen warming.
    lab.fake.set_boot_time(Duration::from_secs(4));
    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 4801, TEMPLATE, "runner-a");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    assert!(
        out.log()
            .contains(&format!("claimed warm VM {} (warm for", warm.vmid)),
        "{}",
        out.log()
    );
    wait_for(
        "Prometheus to see no ready warm VM and the refill warming",
        Duration::from_secs(30),
        || {
            (prometheus.value(ready) == Some(0.0) && prometheus.value(warming) == Some(1.0))
                .then_some(())
        },
    );
    wait_for(
        "Prometheus to see the claim",
        Duration::from_secs(30),
        || {
            (prometheus.value(claims) == Some(1.0)
                && prometheus.value(&reported("ubuntu-focal", "claimed")) == Some(1.0))
            .then_some(())
        },
    );
    assert_eq!(
        prometheus.value(
            r#"gitlab_proxmox_runner_prepare_claim_duration_seconds_count{template="ubuntu-focal",outcome="claimed"}"#
        ),
        Some(1.0)
    );

    // A job of debian-12 finds no warm VM and clones: its clone reports it.
    let cold_dir = tempfile::tempdir().unwrap();
    let cold = claiming_hook(&lab, cold_dir.path(), 4802, TEMPLATE, "runner-a")
        .host_env("WARM_POOL", "debian-12=1")
        .job_var("PROXMOX_TEMPLATE", "debian-12");
    let out = cold.clone().arg("prepare").run();
    out.assert_exit(0);
    assert!(out.log().contains("no warm VM to claim"), "{}", out.log());
    wait_for(
        "Prometheus to see the job that found none",
        Duration::from_secs(30),
        || (prometheus.value(&reported("debian-12", "none")) == Some(1.0)).then_some(()),
    );
    wait_for(
        "Prometheus to see the pool refilled",
        Duration::from_secs(60),
        || (prometheus.value(ready) == Some(1.0)).then_some(()),
    );
    // The rest of the families, as Prometheus stored them.
    for expr in [
        r#"gitlab_proxmox_runner_pool_warmups_finished_total{template="ubuntu-focal"} >= 2"#,
        r#"gitlab_proxmox_runner_pool_warmup_duration_seconds_count{template="ubuntu-focal"} >= 2"#,
        r#"sum(gitlab_proxmox_runner_api_requests_total{status_class="2xx"}) > 0"#,
        r#"gitlab_proxmox_runner_pool_round_duration_seconds_count > 0"#,
        r#"gitlab_proxmox_runner_build_info == 1"#,
        r#"gitlab_proxmox_runner_prepare_claims_total{outcome="discarded"} > 0 or vector(0)"#,
    ] {
        assert_eq!(
            prometheus.query(expr).len(),
            1,
            "{expr}: {:?}",
            prometheus.query(expr)
        );
    }
    assert!(prometheus
        .query(r#"gitlab_proxmox_runner_prepare_claims_total{outcome="discarded"}"#)
        .is_empty());
    // What a scrape reads, for the record.
    let (status, text) = gpr_testkit::prometheus::http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    eprintln!("--- a scrape of the pool service ---\n{text}--- end ---");
    for expr in [
        ready,
        warming,
        claims,
        "gitlab_proxmox_runner_prepare_claims_total",
    ] {
        for (labels, value) in prometheus.query(expr) {
            eprintln!("prometheus: {expr} -> {labels} = {value}");
        }
    }
    assert!(
        !text.contains(&warm.vmid.to_string()),
        "no VMID in a label:\n{text}"
    );
    assert!(
        !text.contains("4801") && !text.contains("group/project"),
        "{text}"
    );

    hook.arg("cleanup").run().assert_exit(0);
    cold.arg("cleanup").run().assert_exit(0);
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    gc_until_empty(&lab, &[]);
}

#[test]
fn pool_status_shows_each_warm_vm_with_its_node_state_and_age() {
    let Some(lab) = start("pool_status_shows_each_warm_vm_with_its_node_state_and_age") else {
        return;
    };
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 1, &[]);
    let warm = wait_for("a warm VM", Duration::from_secs(60), || {
        complete_warm(&lab).into_iter().next()
    });
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    let status = |args: &[&str]| {
        let out = Command::new(&lab.bin)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(lab.settings())
            .envs([gpr_testkit::fleet::settings_env()])
            .env("WARM_POOL", format!("{TEMPLATE}=2"))
            .args(["pool", "status"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        stdout
    };
    let text = status(&[]);
    assert!(
        text.contains(&format!("{TEMPLATE}: 1 ready, 0 warming, 2 wanted\n")),
        "{text}"
    );
    let line = text
        .lines()
        .find(|line| line.contains(&format!("VM {}", warm.vmid)))
        .unwrap_or_else(|| panic!("a line for VM {}:\n{text}", warm.vmid));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &words[..4],
        ["ready", "pve1", "VM", &warm.vmid.to_string()],
        "{line}"
    );
    assert!(
        line.contains(" age ") && line.ends_with("pool pool-a"),
        "{line}"
    );

    let json = status(&["--json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), 1, "{json}");
    let vm = &lines[0];
    assert_eq!(vm["template"], TEMPLATE);
    assert_eq!(vm["node"], "pve1");
    assert_eq!(vm["vmid"], warm.vmid);
    assert_eq!(vm["state"], "ready");
    assert_eq!(vm["pool"], "pool-a");
    assert!(vm["age_secs"].as_u64().is_some_and(|age| age < 600), "{vm}");
    assert!(
        vm["idle_left_secs"].as_u64().is_some_and(|left| left > 0),
        "{vm}"
    );
    // Read-only: nothing changed on the cluster.
    assert!(lab.fake.vm(warm.vmid).is_some());
    gc_until_empty(&lab, &[]);
}

/// The value of one series in a scrape of `/metrics` (`name{labels}` as the text format
/// writes it), 0 when absent.
fn scraped(metrics: std::net::SocketAddr, series: &str) -> f64 {
    let (status, text) = gpr_testkit::prometheus::http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn claim_reports_count_only_when_sealed_by_the_fleet_for_their_vm() {
    let Some(lab) = start("claim_reports_count_only_when_sealed_by_the_fleet_for_their_vm") else {
        return;
    };
    let pool = PoolService::start_with_args(
        &lab,
        "pool-a",
        &[("WARM_POOL", "ubuntu-focal=0")],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = pool.metrics_addr();
    let fleet = FleetKey::parse(gpr_testkit::fleet::FLEET_KEY).unwrap();
    let stranger = FleetKey::parse(&FleetKey::generate().unwrap()).unwrap();
    // Job VMs that look like clones after a prepare found no warm VM (made after the service
    // started, so their reports would count).
    let add = |vmid: u32, job: u64, seal: &dyn Fn(&mut ClaimReport, &VmRef, &Marker)| {
        let marker = Marker::for_job(
            &gitlab_proxmox_runner::job::JobInfo {
                job_id: Some(job),
                ..Default::default()
            },
            "runner-a",
            Duration::from_secs(3600),
        );
        let mut report = ClaimReport {
            outcome: ClaimOutcome::None,
            ms: 10,
            discards: 2,
            template: TEMPLATE_VMID,
            mac: None,
        };
        let vm = VmRef {
            node: "pve1".into(),
            vmid,
        };
        seal(&mut report, &vm, &marker);
        lab.fake.add_vm(gpr_testkit::NewVm {
            vmid,
            name: format!("ci-{job}-x"),
            tags: "gitlab-proxmox-runner".into(),
            description: marker.description_with_report(&report),
            running: true,
            ..Default::default()
        });
    };
    // Not sealed; sealed with another key; sealed by the fleet for another VM (copied).
    add(2_000_601, 1, &|_, _, _| {});
    add(2_000_602, 2, &|report, vm, marker| {
        report.seal(&stranger, vm, marker)
    });
    add(2_000_603, 3, &|report, _, marker| {
        let other = VmRef {
            node: "pve1".into(),
            vmid: 2_000_699,
        };
        report.seal(&fleet, &other, marker)
    });
    // And one genuine report, the control: it counts, in the same round as the others.
    add(2_000_604, 4, &|report, vm, marker| {
        report.seal(&fleet, vm, marker)
    });
    let none =
        r#"gitlab_proxmox_runner_prepare_claims_total{template="ubuntu-focal",outcome="none"}"#;
    let discarded = r#"gitlab_proxmox_runner_prepare_claims_total{template="ubuntu-focal",outcome="discarded"}"#;
    wait_for(
        "the genuine report counted",
        Duration::from_secs(30),
        || (scraped(metrics, none) > 0.0).then_some(()),
    );
    // Later rounds see them all again: still one prepare, two discards.
    let rounds = r#"gitlab_proxmox_runner_pool_round_duration_seconds_count"#;
    let seen = scraped(metrics, rounds);
    wait_for("three more rounds", Duration::from_secs(30), || {
        (scraped(metrics, rounds) >= seen + 3.0).then_some(())
    });
    assert_eq!(scraped(metrics, none), 1.0);
    assert_eq!(scraped(metrics, discarded), 2.0);
    // A warm VM never left the pool: no claim observed.
    assert_eq!(
        scraped(
            metrics,
            r#"gitlab_proxmox_runner_pool_claims_total{template="ubuntu-focal",node="pve1"}"#
        ),
        0.0
    );
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    gc_until_empty(&lab, &[]);
}

/// SIGTERM stops warm-ups in flight, but a warm VM whose publishing write landed is complete:
/// a job may claim it already, so the stopping service must not destroy it because the
/// write's answer had not arrived yet.
#[test]
fn a_warm_vm_published_as_the_service_stops_is_kept_for_jobs() {
    let Some(lab) = start("a_warm_vm_published_as_the_service_stops_is_kept_for_jobs") else {
        return;
    };
    lab.fake.set_boot_time(Duration::from_secs(2));
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 1, &[]);
    let booting = wait_for("a warm VM booting", Duration::from_secs(60), || {
        lab.fake
            .job_vms()
            .into_iter()
            .find(|vm| marker_of(vm).is_some_and(|m| m.warm.is_some()) && vm.status == "running")
    });
    // Configured and started already: the next write to its config is the publishing swap.
    lab.fake.inject(gpr_testkit::Fault::SlowAnswer {
        method: "PUT".into(),
        path_contains: format!("/qemu/{}/config", booting.vmid),
        delay: Duration::from_secs(3),
    });
    let published = wait_for("the warm VM published", Duration::from_secs(60), || {
        complete_warm(&lab)
            .into_iter()
            .find(|vm| vm.vmid == booting.vmid)
    });
    let (_, log) = pool.stop();
    lab.fake.clear_faults();
    assert_eq!(
        lab.fake.vm(published.vmid).map(|vm| vm.description),
        Some(published.description),
        "the published warm VM stays for jobs: {log}"
    );
}
