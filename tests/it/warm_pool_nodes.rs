//! The warm pool with placement (`PROXMOX_NODES`, issue 12) against a fake cluster of four
//! nodes: pve1, pve2 and pve3 hold a copy of ubuntu-focal (same name, local storage: 60900,
//! 60901, 60902), pve4 has the most free memory but no copy. A real sshd on loopback answers
//! for every VM.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::warm::{claiming_hook, complete_warm};
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::JobState;
use gpr_testkit::pool_service::{gc_until_empty, PoolService};
use gpr_testkit::{driver_binary, wait_for, FakeConfig, Lab, NewVm, NodeLoad, VmSnapshot};

const TEMPLATE: &str = "ubuntu-focal";
const NODES: &str = "pve1,pve2,pve3,pve4";
/// The template and its copies, by VMID (a VM name proves nothing on a shared cluster).
const LISTED: &str = "ubuntu-focal=60900|60901@pve2|60902@pve3";
/// Placement over the four nodes, on the template's listed copies.
const PLACED: [(&str, &str); 3] = [
    ("PROXMOX_NODES", NODES),
    ("PROXMOX_TEMPLATES", LISTED),
    ("VM_MEMORY_MB", "2048"),
];

/// The copy of the template on each node that has one.
fn copy_on(node: &str) -> Option<u32> {
    match node {
        "pve1" => Some(60900),
        "pve2" => Some(60901),
        "pve3" => Some(60902),
        _ => None,
    }
}

/// The cluster, with `free` GiB free on pve1, pve2 and pve3.
#[track_caller]
fn cluster(test: &str, free: [u64; 3]) -> Option<Lab> {
    let config = FakeConfig {
        other_nodes: vec!["pve2".into(), "pve3".into(), "pve4".into()],
        ..FakeConfig::default()
    };
    // Each VM its own sshd and host keys: the pool refuses clones that share one.
    let lab = Lab::builder(driver_binary!())
        .fake(config)
        .with_sshd_per_vm_or_skip(test)?;
    for node in ["pve2", "pve3"] {
        lab.fake
            .add_vm(NewVm::template(copy_on(node).unwrap(), node, TEMPLATE));
    }
    for (node, free) in ["pve1", "pve2", "pve3"].into_iter().zip(free) {
        lab.fake.set_node(node, NodeLoad::free_gib(free));
    }
    lab.fake.set_node("pve4", NodeLoad::free_gib(63));
    Some(lab)
}

fn warm_of(vm: &VmSnapshot) -> Option<gitlab_proxmox_runner::marker::Warm> {
    Marker::find_in(&vm.description).and_then(|marker| marker.warm)
}

/// Exactly `count` warm VMs, all complete, none warming.
#[track_caller]
fn settled(lab: &Lab, count: usize) -> Vec<VmSnapshot> {
    wait_for(
        &format!("exactly {count} complete warm VMs"),
        Duration::from_secs(90),
        || {
            let warm = complete_warm(lab);
            (warm.len() == count && lab.fake.job_vms().len() == count).then_some(warm)
        },
    )
}

fn tally(vms: &[VmSnapshot]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for vm in vms {
        *counts.entry(vm.node.clone()).or_insert(0) += 1;
    }
    counts
}

/// Each warm VM is a clone of the copy on its own node and records that copy.
#[track_caller]
fn assert_cloned_from_local_copies(vms: &[VmSnapshot]) {
    for vm in vms {
        let copy = copy_on(&vm.node).unwrap_or_else(|| panic!("warm VM {vm:?} on {}", vm.node));
        assert_eq!(vm.cloned_from, Some(copy), "VM {} on {}", vm.vmid, vm.node);
        assert_eq!(warm_of(vm).unwrap().template, copy, "VM {}", vm.vmid);
    }
}

/// Requests the fake received for anything on `node` (`/nodes/<node>/...`).
fn requests_to(lab: &Lab, node: &str) -> usize {
    let prefix = format!("/api2/json/nodes/{node}/");
    lab.fake
        .requests()
        .iter()
        .filter(|request| request.path.starts_with(&prefix))
        .count()
}

#[test]
fn a_pool_fills_across_nodes_by_free_memory_from_each_nodes_copy() {
    let test = "a_pool_fills_across_nodes_by_free_memory_from_each_nodes_copy";
    // 10, 12 and 14 GiB free; six VMs of 2 GiB. Placed one after another on the node with the
    // most free memory, they level the three at 8 GiB: one, two and three VMs.
    let Some(lab) = cluster(test, [10, 12, 14]) else {
        return;
    };
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 6, &PLACED);
    let warm = settled(&lab, 6);
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    let counts = tally(&warm);
    assert_eq!(
        counts,
        BTreeMap::from([("pve1".into(), 1), ("pve2".into(), 2), ("pve3".into(), 3)]),
        "six warm VMs for the whole cluster, placed by free memory (none on pve4, which has no \
         copy): {log}"
    );
    assert_cloned_from_local_copies(&warm);
    for vm in &warm {
        let placed = format!(
            "warming VM {} on {} (placed on {}: ",
            vm.vmid, vm.node, vm.node
        );
        assert!(log.contains(&placed), "{placed:?} in {log}");
    }
    gc_until_empty(&lab, &[("PROXMOX_NODES", NODES)]);
}

#[test]
fn a_job_claims_a_warm_vm_on_its_placed_node_first_then_on_another() {
    let test = "a_job_claims_a_warm_vm_on_its_placed_node_first_then_on_another";
    // One warm VM per node at most: pve3 (30 GiB free) first, then pve1 (20) over pve2 (10).
    let Some(lab) = cluster(test, [20, 10, 30]) else {
        return;
    };
    let pool = PoolService::keeping(
        &lab,
        "pool-a",
        TEMPLATE,
        2,
        &[&PLACED[..], &[("PROXMOX_NODE_MAX_VMS", "1")]].concat(),
    );
    let warm = settled(&lab, 2);
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        tally(&warm),
        BTreeMap::from([("pve1".into(), 1), ("pve3".into(), 1)]),
        "{log}"
    );
    assert_cloned_from_local_copies(&warm);
    let on = |node: &str| warm.iter().find(|vm| vm.node == node).unwrap().vmid;
    let (on_pve1, on_pve3) = (on("pve1"), on("pve3"));

    // Jobs are placed on pve1 now (the most free memory of the nodes with a copy).
    lab.fake.set_node("pve1", NodeLoad::free_gib(60));
    let first = tempfile::tempdir().unwrap();
    let first_hook =
        claiming_hook(&lab, first.path(), 8100, TEMPLATE, "runner-a").host_envs(&PLACED);
    let out = first_hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(log.contains("placed on pve1: "), "{log}");
    assert!(
        log.contains(&format!("claimed warm VM {on_pve1} on pve1 (warm for")),
        "the warm VM on the placed node comes first: {log}"
    );
    let state = JobState::load(first.path()).unwrap().expect("a job state");
    assert_eq!((state.node.as_str(), state.vmid), ("pve1", on_pve1));

    // pve1 has none left: the next job, placed on pve1 again, takes the one on pve3.
    let second = tempfile::tempdir().unwrap();
    let second_hook =
        claiming_hook(&lab, second.path(), 8101, TEMPLATE, "runner-a").host_envs(&PLACED);
    let out = second_hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let log = out.log();
    assert!(log.contains("placed on pve1: "), "{log}");
    assert!(
        log.contains(&format!(
            "claimed warm VM {on_pve3} on pve3 (pve1 had none to claim)"
        )),
        "{log}"
    );
    assert!(!log.contains("cloned template"), "no clone: {log}");
    let state = JobState::load(second.path()).unwrap().expect("a job state");
    assert_eq!((state.node.as_str(), state.vmid), ("pve3", on_pve3));
    let ip = lab.fake.guest_ip(on_pve3).to_string();
    assert_eq!(state.ip.as_deref(), Some(ip.as_str()));
    let claimed = lab.fake.vm(on_pve3).unwrap();
    assert_eq!(warm_of(&claimed), None, "the job's now");
    assert_eq!(claimed.name, "ci-8101-group-project");

    // Cleanup finds each VM on its node.
    first_hook.arg("cleanup").run().assert_exit(0);
    second_hook.arg("cleanup").run().assert_exit(0);
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

#[test]
fn an_offline_node_gets_no_warm_vms_and_its_warm_vms_are_never_claimed() {
    let test = "an_offline_node_gets_no_warm_vms_and_its_warm_vms_are_never_claimed";
    let Some(lab) = cluster(test, [10, 12, 14]) else {
        return;
    };
    let pool = PoolService::keeping(&lab, "pool-a", TEMPLATE, 1, &PLACED);
    let stranded = settled(&lab, 1).remove(0);
    assert_eq!(stranded.node, "pve3");

    // pve3 goes offline with its warm VM: the pool cannot count on that one and warms another,
    // on pve2 (the most free memory left of the online nodes with a copy).
    lab.fake.set_node(
        "pve3",
        NodeLoad {
            online: false,
            ..NodeLoad::free_gib(14)
        },
    );
    let refill = wait_for("a warm VM on another node", Duration::from_secs(60), || {
        complete_warm(&lab)
            .into_iter()
            .find(|vm| vm.vmid != stranded.vmid)
    });
    // Counted from here: a round that listed the nodes just before pve3 went down may still
    // have asked it once; every round since has seen it offline.
    let asked_pve3 = requests_to(&lab, "pve3");
    assert_eq!(refill.node, "pve2");
    assert_eq!(refill.cloned_from, Some(60901));
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!(
            "warming VM {} on pve2 (placed on pve2: ",
            refill.vmid
        )),
        "{log}"
    );

    // A job that may use pve1 and pve3 only: the one warm VM it could take is on offline pve3,
    // so it clones on pve1, and never asks pve3 (whose requests could only time out).
    let dir = tempfile::tempdir().unwrap();
    let hook = claiming_hook(&lab, dir.path(), 8200, TEMPLATE, "runner-a")
        .host_envs(&PLACED)
        .host_env("PROXMOX_NODES", "pve1,pve3");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let job_log = out.log();
    assert!(
        job_log.contains("no warm VM to claim; cloning one"),
        "{job_log}"
    );
    let state = JobState::load(dir.path()).unwrap().expect("a job state");
    assert_eq!(state.node, "pve1");
    assert_eq!(lab.fake.vm(state.vmid).unwrap().cloned_from, Some(60900));
    assert!(
        warm_of(&lab.fake.vm(stranded.vmid).unwrap()).is_some(),
        "the warm VM on pve3 was left alone"
    );
    assert_eq!(
        requests_to(&lab, "pve3"),
        asked_pve3,
        "nothing asked offline pve3: pool log {log}\njob log {job_log}"
    );
    hook.arg("cleanup").run().assert_exit(0);

    lab.fake.set_node("pve3", NodeLoad::free_gib(14));
    gc_until_empty(&lab, &[("PROXMOX_NODES", NODES)]);
}

#[test]
fn a_template_change_on_one_node_recycles_only_that_nodes_warm_vms() {
    let test = "a_template_change_on_one_node_recycles_only_that_nodes_warm_vms";
    let Some(lab) = cluster(test, [10, 12, 14]) else {
        return;
    };
    // One per node.
    let pool = PoolService::keeping(
        &lab,
        "pool-a",
        TEMPLATE,
        3,
        &[&PLACED[..], &[("PROXMOX_NODE_MAX_VMS", "1")]].concat(),
    );
    let before = settled(&lab, 3);
    assert_eq!(
        tally(&before),
        BTreeMap::from([("pve1".into(), 1), ("pve2".into(), 1), ("pve3".into(), 1)])
    );
    assert_cloned_from_local_copies(&before);
    let on = |node: &str| before.iter().find(|vm| vm.node == node).unwrap().clone();
    let old = on("pve2");
    let old_digest = warm_of(&old).unwrap().template_digest;

    // The admin updates the copy on pve2 only.
    assert!(lab
        .fake
        .set_vm_config(60901, "description", Some("ubuntu-focal, patched on pve2")));
    let new = wait_for(
        "a warm VM of pve2's new copy",
        Duration::from_secs(60),
        || {
            let gone = lab.fake.vm(old.vmid).is_none();
            complete_warm(&lab)
                .into_iter()
                .find(|vm| vm.node == "pve2" && warm_of(vm).unwrap().template_digest != old_digest)
                .filter(|_| gone)
        },
    );
    assert_eq!(new.cloned_from, Some(60901));
    let after = settled(&lab, 3);
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    for node in ["pve1", "pve3"] {
        let kept = on(node);
        assert!(
            after.iter().any(|vm| vm.vmid == kept.vmid),
            "the warm VM on {node} ({}) is still current and stays: {log}",
            kept.vmid
        );
        assert!(
            !log.contains(&format!("recycled warm VM {}", kept.vmid)),
            "{log}"
        );
    }
    assert!(
        log.contains(&format!(
            "recycled warm VM {} (its template changed)",
            old.vmid
        )),
        "{log}"
    );
    gc_until_empty(&lab, &[("PROXMOX_NODES", NODES)]);
}

#[test]
fn a_shared_storage_template_fills_nodes_without_a_copy_and_the_count_holds() {
    let test = "a_shared_storage_template_fills_nodes_without_a_copy_and_the_count_holds";
    let Some(lab) = cluster(test, [10, 12, 14]) else {
        return;
    };
    // One template on the shared RBD pool, on pve2: pve4 (63 GiB free) has no copy, but clones
    // of it go there with `target`.
    lab.fake
        .add_vm(NewVm::shared_template(61000, "pve2", "ubuntu-shared"));
    let shared = [
        ("WARM_POOL", "ubuntu-shared=3"),
        ("PROXMOX_ALLOWED_TEMPLATES", "ubuntu-shared"),
    ];
    let pool = PoolService::keeping(
        &lab,
        "pool-a",
        TEMPLATE,
        3,
        &[&PLACED[..], &shared].concat(),
    );
    let warm = settled(&lab, 3);
    for vm in &warm {
        assert_eq!(vm.node, "pve4", "VM {} placed by free memory", vm.vmid);
        assert_eq!(vm.cloned_from, Some(61000));
        assert_eq!(warm_of(vm).unwrap().template, 61000);
    }
    // The VMs on pve4 count for the pool although pve4 has no copy: a few more rounds add none.
    let listings = || {
        lab.fake
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/cluster/resources") && r.query == "type=vm")
            .count()
    };
    let seen = listings();
    wait_for("three more pool rounds", Duration::from_secs(30), || {
        (listings() >= seen + 3 * 2).then_some(())
    });
    assert_eq!(
        lab.fake.job_vms().len(),
        3,
        "{:?}",
        tally(&lab.fake.job_vms())
    );

    // A job placed on pve4 claims one there.
    let dir = tempfile::tempdir().unwrap();
    let out = claiming_hook(&lab, dir.path(), 9300, TEMPLATE, "runner-a")
        .host_envs(&PLACED)
        .host_env("WARM_POOL", "ubuntu-shared=3")
        .host_env("PROXMOX_ALLOWED_TEMPLATES", "ubuntu-shared")
        .job_var("PROXMOX_TEMPLATE", "ubuntu-shared")
        .arg("prepare")
        .run();
    let log = out.log();
    assert_eq!(out.code, 0, "{log}");
    assert!(log.contains("claimed warm VM"), "{log}");
    let state = JobState::load(dir.path()).unwrap().expect("job state");
    assert_eq!(state.node, "pve4");
    let (code, log) = pool.stop();
    assert_eq!(code, 0, "{log}");
    claiming_hook(&lab, dir.path(), 9300, TEMPLATE, "runner-a")
        .host_envs(&PLACED)
        .arg("cleanup")
        .run()
        .assert_exit(0);
    gc_until_empty(&lab, &[("PROXMOX_NODES", NODES)]);
}
