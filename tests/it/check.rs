//! `gitlab-proxmox-runner check` against the in-repo fake Proxmox, run the way an admin runs it
//! (no job, the driver's settings in the environment): each misconfiguration in turn gives its
//! ✘ line and exit status 1, a correct setup is all ✔, `--smoke` leaves no VM behind, also
//! when SIGTERM arrives mid-way.

use std::process::{Command, Stdio};
use std::time::Duration;

use gpr_testkit::checked::Checked;
use gpr_testkit::fake_proxmox::AclSubject;
use gpr_testkit::{driver_binary, poll, wait_for_every, FakeConfig, FakeProxmox, Lab, NewVm};

const READY: i32 = 0;
const NOT_READY: i32 = 1;
const NOT_RUN: i32 = 2;
fn lab() -> Lab {
    Lab::builder(driver_binary!()).start()
}

fn lab_with(config: FakeConfig) -> Lab {
    Lab::builder(driver_binary!()).fake(config).start()
}

fn check_command(lab: &Lab, extra: &[(&str, &str)]) -> Command {
    lab.check_command(extra)
}

fn run(command: &mut Command) -> Checked {
    Checked::of(command.output().expect("run check"))
}

#[test]
fn a_correct_setup_is_all_ticks() {
    let lab = lab();
    let checked = run(&mut check_command(&lab, &[]));
    checked.assert_code(READY);
    assert!(checked.fail_lines().is_empty(), "{}", checked.stdout);
    for expected in [
        "✔ settings:",
        "✔ API https://",
        "certificate trusted by its pinned PROXMOX_TLS_FINGERPRINT",
        "✔ token ci@pve!runner authenticates (Proxmox VE 8.2.4)",
        "✔ node pve1 is online",
        "✔ template ubuntu-focal (60900) on pve1: a template, guest agent on, net0 on vmbr0, disks on local-lvm (lvmthin)",
        "✔ privileges of ci@pve!runner on /vms/60900",
        "✔ privileges of ci@pve!runner on /storage/local-lvm",
        "✔ privileges of ci@pve!runner on /sdn/zones/localnetwork/vmbr0",
        "✔ VMID range 2000000-2999999",
        "✔ SSH key: ssh-ed25519 SHA256:",
        "✔ runner helper: /bin/true",
        "0 failed, 0 advisory, 0 skipped: ready for jobs",
    ] {
        assert!(checked.stdout.contains(expected), "{expected:?}\n{}", checked.stdout);
    }
    // The key's public fingerprint, never the key.
    for fragment in lab.key.secret_fragments() {
        assert!(!checked.stdout.contains(&fragment) && !checked.stderr.contains(&fragment));
    }
    // A preflight changes nothing.
    assert!(lab.fake.job_vms().is_empty());
    assert!(lab
        .fake
        .requests()
        .iter()
        .all(|request| request.method == "GET"));
}

#[test]
fn json_output_has_every_check_and_the_exit_code() {
    let lab = lab();
    let checked = run(check_command(&lab, &[("PROXMOX_NODE", "pve9")]).args(["--format", "json"]));
    checked.assert_code(NOT_READY);
    let json: serde_json::Value = serde_json::from_str(&checked.stdout).expect(&checked.stdout);
    assert_eq!(json["exit_code"], NOT_READY);
    // The node, and the four templates that cannot be found on it.
    assert_eq!(json["summary"]["failed"], 5, "{json:#}");
    let node = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["id"] == "node")
        .expect("a node check");
    assert_eq!(node["status"], "fail");
    assert!(node["message"]
        .as_str()
        .unwrap()
        .contains("pve9 is not a member"));
    assert!(node["fix"].as_str().unwrap().contains("PROXMOX_NODE"));
}

#[test]
fn a_privilege_missing_on_the_token_only_is_named_with_both_pve_names() {
    let lab = lab();
    let mut role: Vec<&str> = gpr_testkit::fake_proxmox::RUNNER_ROLE.to_vec();
    role.retain(|privilege| {
        !matches!(
            *privilege,
            "VM.Clone" | "VM.Monitor" | "VM.GuestAgent.Audit" | "VM.GuestAgent.FileRead"
        )
    });
    lab.fake.set_acl(AclSubject::Token, "/", &role);
    let checked = run(&mut check_command(&lab, &[]));
    checked.assert_code(NOT_READY);
    let failures = checked.fail_lines();
    let templates = failures
        .iter()
        .filter(|line| line.contains("lacks VM.Clone on /vms/"))
        .count();
    assert_eq!(templates, 4, "{}", checked.stdout);
    assert!(
        checked.stdout.contains(
            "✘ privileges: ci@pve!runner lacks VM.GuestAgent.Audit (PVE 9) / VM.Monitor (PVE 8), \
             VM.GuestAgent.FileRead (PVE 9) / VM.Monitor (PVE 8) on /vms/2000000"
        ),
        "{}",
        checked.stdout
    );
    assert!(
        checked.stdout.contains("--tokens 'ci@pve!runner'"),
        "{}",
        checked.stdout
    );

    // With Sys.Audit on /access the check can see that the user has them: only the token's
    // ACL is missing.
    let mut with_audit = role.clone();
    with_audit.push("Sys.Audit");
    lab.fake.set_acl(AclSubject::Token, "/", &with_audit);
    let mut user_role: Vec<&str> = gpr_testkit::fake_proxmox::RUNNER_ROLE.to_vec();
    user_role.push("Sys.Audit");
    lab.fake.set_acl(AclSubject::User, "/", &user_role);
    let checked = run(&mut check_command(&lab, &[]));
    checked.assert_code(NOT_READY);
    assert!(
        checked.stdout.contains(
            "its user ci@pve has them, so the token's own ACL is missing (the token has \
             privilege separation)"
        ),
        "{}",
        checked.stdout
    );
}

#[test]
fn a_template_without_the_agent_fails_its_line() {
    let mut config = FakeConfig::default();
    config.templates[0].agent = false;
    let lab = lab_with(config);
    run(&mut check_command(&lab, &[]))
        .assert_code(NOT_READY)
        .assert_single_failure(&[
            "template ubuntu-focal (60900) on pve1: its QEMU guest agent option is off",
        ]);
}

#[test]
fn a_map_entry_that_is_not_a_template_fails_its_line() {
    let lab = lab();
    lab.fake.add_vm(NewVm {
        vmid: 700,
        name: "hand-made".into(),
        ..Default::default()
    });
    run(&mut check_command(
        &lab,
        &[("PROXMOX_TEMPLATES", "ubuntu-focal=60900,plain=700")],
    ))
    .assert_code(NOT_READY)
    .assert_single_failure(&["template plain (700) on pve1: it is not a template"]);
}

#[test]
fn storage_without_linked_clones_fails_unless_clones_are_full() {
    let mut config = FakeConfig::default();
    config.templates[1].linked_clone_ok = false;
    let lab = lab_with(config);
    run(&mut check_command(&lab, &[]))
        .assert_code(NOT_READY)
        .assert_single_failure(&[
            "template ubuntu-bionic (60910) on pve1: disk scsi0 is on storage local (dir, raw), \
             which cannot make linked clones",
        ]);
    let checked = run(&mut check_command(&lab, &[("PROXMOX_CLONE", "full")]));
    checked.assert_code(READY);
    assert!(
        checked.stdout.contains("for full clones"),
        "{}",
        checked.stdout
    );
}

#[test]
fn a_foreign_vm_in_the_vmid_range_fails() {
    let lab = lab();
    lab.fake.add_vm(NewVm {
        vmid: 2_000_100,
        name: "someones-vm".into(),
        running: true,
        ..Default::default()
    });
    run(&mut check_command(&lab, &[]))
        .assert_code(NOT_READY)
        .assert_single_failure(&[
            "VMID range 2000000-2999999 (PROXMOX_VMID_RANGE) holds 1 guest(s) that are not this \
             driver's: 2000100 (someones-vm on pve1)",
        ]);
}

#[test]
fn a_wrong_ca_names_the_certificate_to_pin() {
    let lab = lab();
    let other = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let wrong_ca = other.write_ca_file(dir.path());
    let checked = run(&mut check_command(
        &lab,
        &[
            ("PROXMOX_TLS_FINGERPRINT", ""),
            ("PROXMOX_TLS_CA_FILE", wrong_ca.to_str().unwrap()),
        ],
    ));
    checked.assert_code(NOT_READY).assert_single_failure(&[
        "the API's certificate is not trusted by PROXMOX_TLS_CA_FILE",
        &format!("SHA-256 fingerprint {}", lab.fake.fingerprint()),
        "subject ",
    ]);
    assert!(
        checked.stdout.contains(&format!(
            "PROXMOX_TLS_FINGERPRINT={}",
            lab.fake.fingerprint()
        )),
        "{}",
        checked.stdout
    );
    // The right CA passes.
    let right_ca = lab.fake.write_ca_file(dir.path());
    run(&mut check_command(
        &lab,
        &[
            ("PROXMOX_TLS_FINGERPRINT", ""),
            ("PROXMOX_TLS_CA_FILE", right_ca.to_str().unwrap()),
        ],
    ))
    .assert_code(READY);
}

#[test]
fn a_pinned_fingerprint_that_is_not_the_apis_names_the_real_one() {
    let lab = lab();
    let wrong = ["00"; 32].join(":");
    let checked = run(&mut check_command(
        &lab,
        &[("PROXMOX_TLS_FINGERPRINT", &wrong)],
    ));
    checked.assert_code(NOT_READY).assert_single_failure(&[
        "the API's certificate is not trusted by its pinned PROXMOX_TLS_FINGERPRINT",
        &format!("SHA-256 fingerprint {}", lab.fake.fingerprint()),
        "the API presents subject CN=",
    ]);
    // Nothing else could be checked without the API: skipped, not failed.
    assert!(
        checked.stdout.contains("- node: skipped (needs the API)"),
        "{}",
        checked.stdout
    );
    // The token never went to an API that failed the pin.
    assert!(lab.fake.requests().is_empty());
}

#[test]
fn an_offline_node_fails() {
    let lab = lab();
    lab.fake.set_node_online("pve1", false);
    let checked = run(&mut check_command(&lab, &[]));
    checked.assert_code(NOT_READY);
    let failures = checked.fail_lines();
    assert!(
        failures
            .iter()
            .any(|line| line.starts_with("✘ node pve1 is offline (status offline)")),
        "{}",
        checked.stdout
    );
}

#[test]
fn an_unparsable_key_fails_without_echoing_it() {
    let lab = lab();
    let garbage = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END OPENSSH PRIVATE KEY-----\n";
    let checked = run(&mut check_command(&lab, &[("VM_SSH_PRIVATE_KEY", garbage)]));
    checked
        .assert_code(NOT_READY)
        .assert_single_failure(&["SSH key: "]);
    assert!(
        !checked.stdout.contains("bm90IGEga2V5"),
        "{}",
        checked.stdout
    );
}

#[test]
fn a_settings_file_or_key_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    // The token in the settings file, the key in a file of its own, both as an admin who forgot
    // the mode leaves them: 0644.
    let token = lab
        .settings()
        .into_iter()
        .find(|(name, _)| name == "PROXMOX_TOKEN_VALUE")
        .map(|(_, value)| value)
        .unwrap();
    let settings = dir.path().join("proxmox.toml");
    std::fs::write(&settings, format!("PROXMOX_TOKEN_VALUE = {token:?}\n")).unwrap();
    let key = dir.path().join("ci-key");
    std::fs::write(&key, &lab.key.private_text).unwrap();
    for file in [&settings, &key] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let key_path = key.display().to_string();
    let settings_path = settings.display().to_string();
    let checked = |lab: &Lab| {
        run(&mut check_command(
            lab,
            &[
                ("PROXMOX_TOKEN_VALUE", ""),
                ("VM_SSH_PRIVATE_KEY", &key_path),
                ("GITLAB_PROXMOX_RUNNER_CONFIG", &settings_path),
            ],
        ))
    };
    let exposed = checked(&lab);
    // Advisory: the hooks work, but another local user can take the token and the key.
    exposed.assert_code(READY);
    let failures = exposed.fail_lines();
    assert_eq!(failures.len(), 2, "{}", exposed.stdout);
    for (what, path) in [
        ("the settings file", &settings_path),
        ("the SSH key file (VM_SSH_PRIVATE_KEY)", &key_path),
    ] {
        let line = format!(
            "✘ {what} {path} is readable by group or others (mode 0644): another local user can \
             take the secrets it holds (advisory)"
        );
        assert!(exposed.stdout.contains(&line), "{line}\n{}", exposed.stdout);
        assert!(
            exposed.stdout.contains(&format!("fix: chmod 0600 {path}")),
            "{}",
            exposed.stdout
        );
    }
    assert!(
        exposed
            .stdout
            .contains("2 advisory, 0 skipped: ready for jobs"),
        "{}",
        exposed.stdout
    );
    // The token and the key themselves are never printed.
    assert!(!exposed.stdout.contains(&token) && !exposed.stderr.contains(&token));
    for fragment in lab.key.secret_fragments() {
        assert!(!exposed.stdout.contains(&fragment) && !exposed.stderr.contains(&fragment));
    }

    for file in [&settings, &key] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let fixed = checked(&lab);
    fixed.assert_code(READY);
    assert!(fixed.fail_lines().is_empty(), "{}", fixed.stdout);
    assert!(
        fixed.stdout.contains(&format!(
            "✔ the settings file: {settings_path} is readable by its owner only (mode 0600)"
        )),
        "{}",
        fixed.stdout
    );
}

#[test]
fn a_bad_token_and_bad_settings_fail_with_their_fix() {
    let lab = lab();
    run(&mut check_command(
        &lab,
        &[("PROXMOX_TOKEN_VALUE", "wrong")],
    ))
    .assert_code(NOT_READY)
    .assert_single_failure(&["the API refused the token ci@pve!runner"]);
    run(&mut check_command(&lab, &[("PROXMOX_CLONE", "sideways")]))
        .assert_code(NOT_READY)
        .assert_single_failure(&["settings: ", "PROXMOX_CLONE"]);
}

#[test]
fn smoke_runs_one_vm_end_to_end_and_leaves_none() {
    let Some(lab) = Lab::builder(driver_binary!())
        .with_sshd_or_skip("smoke_runs_one_vm_end_to_end_and_leaves_none")
    else {
        return;
    };
    // No helper: the "VM" is this machine's own sshd, and a helper would be installed into its
    // /usr/local/bin (the runner-helper line is advisory, so the exit status stays 0).
    let checked = run(check_command(&lab, &[("RUNNER_HELPER_PATH", "")]).arg("--smoke"));
    checked.assert_code(READY);
    assert!(
        checked
            .stdout
            .contains("✘ runner helper: none on this host"),
        "{}",
        checked.stdout
    );
    let smoke = checked
        .stdout
        .lines()
        .find(|line| line.starts_with("✔ smoke test: VM "))
        .unwrap_or_else(|| panic!("{}", checked.stdout));
    for phase in [
        "host key read through the guest agent",
        "`sudo -n true` as root works",
        "destroyed",
        "clone ",
        "agent+IP ",
        "ssh ",
        "sudo ",
        "destroy ",
    ] {
        assert!(smoke.contains(phase), "{phase:?} in {smoke}");
    }
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
    assert!(lab
        .fake
        .requests()
        .iter()
        .any(|r| r.method == "POST" && r.path.ends_with("/clone")));
}

#[test]
fn smoke_fails_when_a_warm_vm_pins_the_same_host_key() {
    use gpr_testkit::pool_service::{gc_until_empty, PoolService};
    // One sshd for every VM: clones of a template whose host keys were never regenerated.
    let Some(lab) = Lab::builder(driver_binary!())
        .with_sshd_or_skip("smoke_fails_when_a_warm_vm_pins_the_same_host_key")
    else {
        return;
    };
    let pool = PoolService::start(&lab, "pool-a", &[("WARM_POOL", "ubuntu-focal=1")]);
    let warm = gpr_testkit::wait_for("a warm VM", Duration::from_secs(60), || {
        lab.fake
            .job_vms()
            .into_iter()
            .find(|vm| vm.description.contains("\nssh-host-key: "))
    });
    // Finished warm VMs stay when the service stops.
    pool.stop();
    let fingerprint = gitlab_proxmox_runner::ssh::fingerprint_of_line(
        &lab.sshd()
            .host_key_lines()
            .into_iter()
            .find(|line| line.starts_with("ssh-ed25519 "))
            .unwrap(),
    )
    .unwrap();
    // With the fleet's key: only warm VMs proven ours are compared with.
    let (config, fleet_file) = gpr_testkit::fleet::settings_env();
    let checked = run(check_command(
        &lab,
        &[
            ("RUNNER_HELPER_PATH", ""),
            (config.as_str(), fleet_file.as_str()),
        ],
    )
    .arg("--smoke"));
    checked.assert_code(NOT_READY);
    let failure = checked
        .stdout
        .lines()
        .find(|line| line.starts_with("✘ smoke test failed"))
        .unwrap_or_else(|| panic!("{}", checked.stdout));
    for fragment in [
        "while comparing the VM's SSH host keys with the warm VMs': settings: VM ",
        "cloned from template ubuntu-focal (60900), has an SSH host key that is not its own",
        &format!(
            "ssh-ed25519 {fingerprint}, also held by warm VM {} on pve1",
            warm.vmid
        ),
        "remove /etc/ssh/ssh_host_*",
    ] {
        assert!(failure.contains(fragment), "{fragment:?} in {failure}");
    }
    // The smoke VM is gone; the warm VM is left to the pool and gc.
    let left: Vec<u32> = lab.fake.job_vms().iter().map(|vm| vm.vmid).collect();
    assert_eq!(left, vec![warm.vmid], "{}", checked.stdout);
    gc_until_empty(&lab, &[]);
}

#[test]
fn smoke_interrupted_by_sigterm_removes_its_vm() {
    let lab = lab();
    // The VM boots for longer than the test lasts: SIGTERM arrives while the check waits for it.
    lab.fake.set_boot_time(Duration::from_secs(600));
    let mut child = check_command(&lab, &[])
        .arg("--smoke")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start check");
    wait_for_every(
        "the smoke VM to start",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            (lab.fake.job_vms().iter())
                .any(|vm| vm.status == "running")
                .then_some(())
        },
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = poll(Duration::from_secs(60), Duration::from_millis(20), || {
        child.try_wait().expect("wait for check")
    })
    .unwrap_or_else(|| {
        let _ = child.kill();
        panic!("check ends after SIGTERM")
    });
    let output = child.wait_with_output().expect("collect output");
    let checked = Checked::of(std::process::Output { status, ..output });
    checked.assert_code(NOT_RUN);
    assert!(
        checked
            .stdout
            .contains("✘ smoke test interrupted (SIGTERM) while "),
        "{}",
        checked.stdout
    );
    assert!(
        checked
            .stdout
            .contains("nothing of it is left on the cluster"),
        "{}",
        checked.stdout
    );
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}

/// The whole text of a correct setup's check, byte for byte but for what differs per run (the
/// fake's port, the generated key's fingerprint): restructuring the checks must not change it.
#[test]
fn a_correct_setups_output_is_exactly_these_lines() {
    let lab = lab();
    let checked = run(&mut check_command(&lab, &[]));
    checked.assert_code(READY);
    let stdout = checked
        .stdout
        .replace(&lab.fake.api_url(), "https://FAKE/api2/json");
    let key = stdout
        .split_once("SHA256:")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(fingerprint, _)| fingerprint.to_string())
        .unwrap_or_default();
    let stdout = stdout.replace(&format!("SHA256:{key} "), "SHA256:KEY ");
    let expected = "\
✔ settings: read from the process environment (node pve1, 4 templates, VMIDs 2000000-2999999, linked clones of templates)
✔ API https://FAKE/api2/json reachable, certificate trusted by its pinned PROXMOX_TLS_FINGERPRINT
✔ token ci@pve!runner authenticates (Proxmox VE 8.2.4)
✔ node pve1 is online
✔ template debian-11 (60920) on pve1: a template, guest agent on, net0 on vmbr0, disks on local-lvm (lvmthin) for linked clones
✔ template debian-12 (60930) on pve1: a template, guest agent on, net0 on vmbr0, disks on local-lvm (lvmthin) for linked clones
✔ template ubuntu-bionic (60910) on pve1: a template, guest agent on, net0 on vmbr0, disks on local-lvm (lvmthin) for linked clones
✔ template ubuntu-focal (60900) on pve1: a template, guest agent on, net0 on vmbr0, disks on local-lvm (lvmthin) for linked clones
✔ privileges of ci@pve!runner on /vms/60920 (cloning template debian-11): VM.Clone, VM.Audit
✔ privileges of ci@pve!runner on /vms/60930 (cloning template debian-12): VM.Clone, VM.Audit
✔ privileges of ci@pve!runner on /vms/60910 (cloning template ubuntu-bionic): VM.Clone, VM.Audit
✔ privileges of ci@pve!runner on /vms/60900 (cloning template ubuntu-focal): VM.Clone, VM.Audit
✔ privileges of ci@pve!runner on /vms/2000000 (the job VMs: create, configure, start, guest agent, destroy): VM.Allocate, VM.Audit, VM.PowerMgmt, VM.Config.Options, VM.GuestAgent.Audit (PVE 9) / VM.Monitor (PVE 8), VM.GuestAgent.FileRead (PVE 9) / VM.Monitor (PVE 8)
✔ privileges of ci@pve!runner on /storage/local-lvm (the clones' disks): Datastore.AllocateSpace, Datastore.Audit
✔ privileges of ci@pve!runner on /sdn/zones/localnetwork/vmbr0 (the clones' NIC on bridge vmbr0): SDN.Use
✔ VMID range 2000000-2999999 (PROXMOX_VMID_RANGE) holds no foreign VM (0 of this driver's)
✔ SSH key: ssh-ed25519 SHA256:KEY (its public half must be in ~ci/.ssh/authorized_keys in the template)
✔ runner helper: /bin/true (copied into VMs whose template lacks gitlab-runner)
✔ fleet key: PROXMOX_FLEET_KEY is not set (needed only with a warm pool; gc leaves warm VMs alone, since without it they cannot be told from another user's look-alikes)
19 passed, 0 failed, 0 advisory, 0 skipped: ready for jobs
";
    assert_eq!(stdout, expected);
}
