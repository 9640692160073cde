//! `gitlab-proxmox-runner check` with `PROXMOX_NODES` (issue 12): every node prepare may place a
//! job on is reported with its status, and every template is checked on each node's copy, against
//! a fake cluster of three nodes (pve1 holds the templates; copies are added per test).

use std::process::Command;

use gpr_testkit::checked::Checked;
use gpr_testkit::lab::ED25519_HOST_KEY_FILE;
use gpr_testkit::ssh_server::TestSshServer;
use gpr_testkit::{driver_binary, FakeConfig, Lab, NewVm, NodeLoad, RecordedRequest};

const READY: i32 = 0;
const NOT_READY: i32 = 1;

fn cluster() -> Lab {
    let config = FakeConfig {
        other_nodes: vec!["pve2".into(), "pve3".into()],
        ..FakeConfig::default()
    };
    let lab = Lab::builder(driver_binary!()).fake(config).start();
    for (node, free_gib) in [("pve1", 20), ("pve2", 40), ("pve3", 60)] {
        lab.fake.set_node(node, NodeLoad::free_gib(free_gib));
    }
    lab
}

/// A copy of ubuntu-focal (60900 on pve1) on `node`, with the same VM name; it counts as a copy
/// only where `PROXMOX_TEMPLATES` lists it (see [`LISTED`]).
fn copy(lab: &Lab, vmid: u32, node: &str) {
    lab.fake.add_vm(NewVm::template(vmid, node, "ubuntu-focal"));
}

/// ubuntu-focal with the copies the tests make on pve2 and pve3.
const LISTED: (&str, &str) = (
    "PROXMOX_TEMPLATES",
    "ubuntu-focal=60900|60901@pve2|60902@pve3",
);
/// The same with the copy on pve2 only.
const LISTED_PVE2: (&str, &str) = ("PROXMOX_TEMPLATES", "ubuntu-focal=60900|60901@pve2");

/// `check` with the lab's settings and one template, overridden by `extra`.
fn check_command(lab: &Lab, extra: &[(&str, &str)]) -> Command {
    let mut settings = vec![("PROXMOX_TEMPLATES", "ubuntu-focal=60900")];
    settings.extend_from_slice(extra);
    lab.check_command(&settings)
}

fn count(lab: &Lab, what: impl Fn(&RecordedRequest) -> bool) -> usize {
    lab.fake.requests().iter().filter(|r| what(r)).count()
}

#[test]
fn a_listed_node_without_a_copy_is_a_warning_and_the_copies_are_checked() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    let checked = Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "pve1,pve2,pve3"), LISTED_PVE2]),
        READY,
    );
    checked
        .has("✔ settings: read from the process environment (nodes pve1, pve2, pve3, 1 templates")
        .has(
            "✔ template ubuntu-focal: clones are made from 60900 on pve1 (listed), 60901 on pve2 \
             (listed)",
        )
        .has("✔ node pve1 is online, 20 GiB of 64 GiB memory free")
        .has("✔ node pve2 is online, 40 GiB of 64 GiB memory free")
        .has("✔ node pve3 is online, 60 GiB of 64 GiB memory free")
        .has("✔ template ubuntu-focal (60900) on pve1: a template, guest agent on, net0 on vmbr0")
        .has("✔ template ubuntu-focal (60901) on pve2: a template, guest agent on, net0 on vmbr0")
        .has("✔ privileges of ci@pve!runner on /vms/60901 (cloning template ubuntu-focal on pve2)")
        .has("18 passed, 0 failed, 1 advisory, 0 skipped: ready for jobs")
        .failures_are(&[
            "✘ pve3: no copy of ubuntu-focal; jobs for it go to pve1, pve2 (advisory)",
        ]);

    // One read of each listing for the whole check, then the copies' configs.
    let resources = |kind: &'static str| {
        count(&lab, move |r| {
            r.path.ends_with("/cluster/resources") && r.query == format!("type={kind}")
        })
    };
    assert_eq!(
        resources("node"),
        1,
        "{:?}",
        lab.fake.requests_by_endpoint()
    );
    assert_eq!(resources("vm"), 1, "{:?}", lab.fake.requests_by_endpoint());
    for (node, vmid) in [("pve1", 60900), ("pve2", 60901)] {
        let path = format!("/api2/json/nodes/{node}/qemu/{vmid}/config");
        assert_eq!(count(&lab, |r| r.path == path), 1, "{path}");
    }
    assert_eq!(count(&lab, |r| r.path.contains("/nodes/pve3/")), 0);
    assert!(lab.fake.requests().iter().all(|r| r.method == "GET"));
}

#[test]
fn a_node_without_a_copy_is_served_by_a_copy_on_shared_storage() {
    let lab = cluster();
    // On the shared RBD pool: placement clones it to pve1 and pve3 with `target`.
    lab.fake
        .add_vm(NewVm::shared_template(61000, "pve2", "ubuntu-shared"));
    let checked = Checked::run(
        &mut check_command(
            &lab,
            &[
                ("PROXMOX_NODES", "pve1,pve2,pve3"),
                ("PROXMOX_TEMPLATES", "ubuntu-shared=61000"),
                ("PROXMOX_TEMPLATE", "ubuntu-shared"),
            ],
        ),
        READY,
    );
    checked
        .has("✔ template ubuntu-shared (61000) on pve2: a template, guest agent on")
        .has(
            "✔ pve1: no copy of ubuntu-shared; its jobs get clones of 61000 on pve2 (every drive \
             on shared storage), made with target",
        )
        .has("✔ pve3: no copy of ubuntu-shared; its jobs get clones of 61000 on pve2")
        .lacks("✘ pve3: no copy")
        .failures_are(&[]);
}

#[test]
fn an_offline_listed_node_is_a_warning_and_not_asked() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    copy(&lab, 60902, "pve3");
    lab.fake.set_node_online("pve3", false);
    let checked = Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "pve1 pve2 pve3"), LISTED]),
        READY,
    );
    checked
        .has("✔ template ubuntu-focal (60900) on pve1: ")
        .has("✔ template ubuntu-focal (60901) on pve2: ")
        .lacks("on pve3:")
        .failures_are(&[
            "✘ node pve3 is offline (status offline): jobs avoid it until it is back (advisory)",
        ]);
    // A config read on a node that is down would only fail (595).
    assert_eq!(count(&lab, |r| r.path.contains("/nodes/pve3/")), 0);
}

#[test]
fn a_listed_node_that_is_not_in_the_cluster_is_an_error() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "pve1,pve2,pve22"), LISTED_PVE2]),
        NOT_READY,
    )
    .has("✔ node pve1 is online")
    .has("✔ node pve2 is online")
    .has("    fix: PROXMOX_NODES must name nodes as `pvecm nodes` lists them")
    .failures_are(&[
        "✘ node pve22 (PROXMOX_NODES) is not a member of this cluster (members: pve1, pve2, pve3)",
    ]);
}

#[test]
fn a_copy_with_the_agent_off_is_an_error_naming_its_node_and_vmid() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    copy(&lab, 60902, "pve3");
    assert!(lab.fake.set_vm_config(60902, "agent", Some("0")));
    let checked = Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "*"), LISTED]),
        NOT_READY,
    );
    checked
        .has("✔ settings: read from the process environment (every online node, ")
        .has("✔ template ubuntu-focal (60900) on pve1: ")
        .has("✔ template ubuntu-focal (60901) on pve2: ")
        .has("    fix: qm set 60902 --agent enabled=1")
        .failures_are(&[
            "✘ template ubuntu-focal (60902) on pve3: its QEMU guest agent option is off",
        ]);
}

#[test]
fn no_online_node_with_a_copy_is_an_error() {
    let lab = cluster();
    // pve1 holds the only copy, and is not listed.
    Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "pve2,pve3")]),
        NOT_READY,
    )
    .lacks("no copy of ubuntu-focal")
    .failures_are(&[
        "✘ template ubuntu-focal: no online node of PROXMOX_NODES holds a copy of it, so its jobs \
         cannot run (copies: 60900 on pve1)",
    ]);

    // Every node down: the nodes line says so, and the template has nowhere to go.
    for node in ["pve1", "pve2", "pve3"] {
        lab.fake.set_node_online(node, false);
    }
    Checked::run(
        &mut check_command(&lab, &[("PROXMOX_NODES", "*")]),
        NOT_READY,
    )
    .failures_are(&[
        "✘ node pve1 is offline",
        "✘ node pve2 is offline",
        "✘ node pve3 is offline",
        "✘ nodes: no node of the cluster is online, so no job can get a VM",
        "✘ template ubuntu-focal: no online node of PROXMOX_NODES holds a copy of it",
    ]);
}

#[test]
fn smoke_places_its_vm_like_prepare_and_names_the_node() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    // pve3 has the most free memory (see `cluster`) but no copy: placement passes it over.
    lab.fake.set_node("pve2", NodeLoad::free_gib(50));
    // The "VM" is an in-process SSH server on loopback, its host key served by the guest agent.
    let vm = TestSshServer::start();
    vm.authorize(&lab.key);
    lab.fake.set_guest_file(
        ED25519_HOST_KEY_FILE,
        &format!("{}\n", vm.host_key_lines()[0]),
    );
    let port = vm.port().to_string();
    let checked = Checked::run(
        check_command(
            &lab,
            &[
                ("PROXMOX_NODES", "pve1,pve2,pve3"),
                LISTED_PVE2,
                ("VM_NETWORK_CIDRS", "127.0.0.0/8"),
                ("VM_SSH_USER", "tester"),
                ("VM_SSH_PORT", &port),
                ("VM_BOOT_TIMEOUT", "60"),
                // No helper to install into the test server.
                ("RUNNER_HELPER_PATH", ""),
            ],
        )
        .arg("--smoke"),
        READY,
    );
    let smoke = checked
        .stdout
        .lines()
        .find(|line| line.starts_with("✔ smoke test: VM "))
        .unwrap_or_else(|| panic!("{}\n{}", checked.stdout, checked.stderr));
    assert!(
        smoke.contains(" on pve2 (placed there by PROXMOX_NODES: 50 GiB free, 0 job VMs) cloned"),
        "{smoke}"
    );
    assert!(smoke.contains("destroyed"), "{smoke}");
    let clones: Vec<String> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
        .map(|r| r.path)
        .collect();
    assert_eq!(
        clones,
        ["/api2/json/nodes/pve2/qemu/60901/clone"],
        "cloned from pve2's copy"
    );
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

/// Issue 19: a template named like ours that another user (the co-tenant `mallory@pve!t`, over
/// HTTP with its own token) made on pve3, where we have no copy, is not used and check says so;
/// the copies it will use are listed. By-name discovery and names allowed by
/// `PROXMOX_ALLOWED_TEMPLATES` are flagged as a risk on a shared cluster, and a listed copy
/// found on another node than its `@node` is refused.
#[test]
fn check_lists_the_copies_it_uses_and_warns_about_a_co_tenants_look_alike() {
    let lab = cluster();
    copy(&lab, 60901, "pve2");
    let mallory = lab.fake.co_tenant();
    mallory
        .create_template("pve3", 61950, "ubuntu-focal")
        .expect("the co-tenant's look-alike on pve3");
    let nodes = ("PROXMOX_NODES", "pve1,pve2,pve3");
    let look_alike = "✘ template VM 61950 on pve3 is named ubuntu-focal but is not a listed copy \
                      of ubuntu-focal: not used (another user's?) (advisory)";

    let checked = Checked::run(&mut check_command(&lab, &[nodes, LISTED_PVE2]), READY);
    checked
        .has(
            "✔ template ubuntu-focal: clones are made from 60900 on pve1 (listed), 60901 on pve2 \
             (listed)",
        )
        .lacks("(61950)")
        .failures_are(&[
            look_alike,
            "✘ pve3: no copy of ubuntu-focal; jobs for it go to pve1, pve2 (advisory)",
        ]);
    // The look-alike is not even read.
    assert_eq!(count(&lab, |r| r.path.contains("/qemu/61950")), 0);

    // By-name discovery takes it, and check flags that.
    let checked = Checked::run(
        &mut check_command(
            &lab,
            &[nodes, LISTED_PVE2, ("PROXMOX_TEMPLATE_COPIES", "by-name")],
        ),
        READY,
    );
    checked
        .has(
            "✔ template ubuntu-focal: clones are made from 60900 on pve1 (listed), 60901 on pve2 \
             (listed), 61950 on pve3 (same VM name, PROXMOX_TEMPLATE_COPIES=by-name)",
        )
        .has("    fix: list the copies instead: PROXMOX_TEMPLATES ubuntu-focal=60900@pve1|60901@pve2|61950@pve3")
        .failures_are(&[
            "✘ settings: PROXMOX_TEMPLATE_COPIES=by-name: on every node without a listed copy, any \
             template VM named like a PROXMOX_TEMPLATES template is cloned for its jobs",
            "✘ template ubuntu-focal: 61950 on pve3 used only because named ubuntu-focal \
             (PROXMOX_TEMPLATE_COPIES=by-name)",
        ]);

    // A name PROXMOX_ALLOWED_TEMPLATES allows resolves by VM name: every ubuntu-focal counts.
    let checked = Checked::run(
        &mut check_command(
            &lab,
            &[
                nodes,
                ("PROXMOX_TEMPLATES", "debian-12=60930"),
                ("PROXMOX_ALLOWED_TEMPLATES", "ubuntu-focal"),
                ("PROXMOX_TEMPLATE", "ubuntu-focal"),
            ],
        ),
        READY,
    );
    checked
        .has(
            "✔ template ubuntu-focal: clones are made from 60900 on pve1 (by VM name, \
             PROXMOX_ALLOWED_TEMPLATES), 60901 on pve2 (by VM name",
        )
        .has("✘ settings: PROXMOX_ALLOWED_TEMPLATES lets jobs ask for templates by VM name (ubuntu-focal)")
        .has("✘ template ubuntu-focal is found by VM name (PROXMOX_ALLOWED_TEMPLATES), not by VMID");

    // A listed copy pinned to pve2 that turns up on pve3 (here: the co-tenant's template made
    // with that VMID) is refused; our unlisted copy on pve2 is only a look-alike then.
    mallory
        .create_template("pve3", 61904, "ubuntu-focal")
        .expect("a template with the VMID of a copy listed for pve2");
    Checked::run(
        &mut check_command(
            &lab,
            &[
                nodes,
                ("PROXMOX_TEMPLATES", "ubuntu-focal=60900|61904@pve2"),
            ],
        ),
        NOT_READY,
    )
    .has("✔ template ubuntu-focal: clones are made from 60900 on pve1 (listed)")
    .failures_are(&[
        "✘ template ubuntu-focal: template VM 61904 (ubuntu-focal) is on pve3, not on pve2 as \
         ubuntu-focal=60900|61904@pve2 says: not used",
        "✘ template VM 60901 on pve2 is named ubuntu-focal but is not a listed copy",
        look_alike,
        "✘ pve2: no copy of ubuntu-focal",
        "✘ pve3: no copy of ubuntu-focal",
    ]);
}

/// `check --smoke` builds its VM where placement puts it: for a template on shared storage on
/// pve2 and pve3 chosen (the most free memory), a clone with `target=pve3`, as prepare makes it,
/// not a VM on the template's node.
#[test]
fn smoke_clones_a_shared_storage_template_with_target_to_the_node_it_names() {
    let lab = cluster();
    lab.fake
        .add_vm(NewVm::shared_template(61000, "pve2", "ubuntu-shared"));
    let vm = TestSshServer::start();
    vm.authorize(&lab.key);
    lab.fake.set_guest_file(
        ED25519_HOST_KEY_FILE,
        &format!("{}\n", vm.host_key_lines()[0]),
    );
    let port = vm.port().to_string();
    let checked = Checked::run(
        check_command(
            &lab,
            &[
                ("PROXMOX_NODES", "pve1,pve2,pve3"),
                ("PROXMOX_TEMPLATES", "ubuntu-shared=61000"),
                ("PROXMOX_TEMPLATE", "ubuntu-shared"),
                ("VM_NETWORK_CIDRS", "127.0.0.0/8"),
                ("VM_SSH_USER", "tester"),
                ("VM_SSH_PORT", &port),
                ("VM_BOOT_TIMEOUT", "60"),
                ("RUNNER_HELPER_PATH", ""),
            ],
        )
        .arg("--smoke"),
        READY,
    );
    let smoke = checked
        .stdout
        .lines()
        .find(|line| line.starts_with("✔ smoke test: VM "))
        .unwrap_or_else(|| panic!("{}\n{}", checked.stdout, checked.stderr));
    assert!(
        smoke.contains(" on pve3 (placed there by PROXMOX_NODES: 60 GiB free, 0 job VMs"),
        "{smoke}"
    );
    assert!(smoke.contains("destroyed"), "{smoke}");
    let clones: Vec<(String, String)> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
        .map(|r| (r.path, r.body))
        .collect();
    let [(path, body)] = clones.as_slice() else {
        panic!("one clone request: {clones:?}");
    };
    assert_eq!(path, "/api2/json/nodes/pve2/qemu/61000/clone");
    assert!(body.contains("target=pve3"), "cloned with target: {body}");
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}
