//! Per-VM SSH keys through cloud-init (issue 23): every VM of a cloud-init template gets its
//! own key, derived from the fleet key and its marker nonce, set as its `sshkeys` before its
//! first start; every hook derives it again in memory. The lab's templates carry the static
//! key in their own `sshkeys` (nothing baked into the image), so a VM whose `sshkeys` the
//! driver replaced accepts its own key only. One sshd per VM: each VM accepts exactly what its
//! cloud-init applied.

use std::path::Path;

use base64ct::Encoding as _;
use std::sync::Arc;
use std::time::Duration;

use gitlab_proxmox_runner::fleet_key::FleetKey;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::ssh::derived::{encode_sshkeys, VmKey};
use gitlab_proxmox_runner::ssh::{Connection, HostKeyCheck, PrivateKey, Target};
use gitlab_proxmox_runner::state::{JobState, Phase};
use gpr_testkit::hook::Hook;
use gpr_testkit::pool_service::PoolService;
use gpr_testkit::ssh_job::write_stage_script;
use gpr_testkit::{driver_binary, wait_for, Lab};

const TEMPLATE: &str = "ubuntu-focal";

#[track_caller]
fn start(test: &str) -> Option<Lab> {
    Lab::builder(driver_binary!())
        .key_in_template_cloud_init()
        .with_sshd_per_vm_or_skip(test)
}

fn fleet_key() -> FleetKey {
    FleetKey::parse(gpr_testkit::fleet::FLEET_KEY).unwrap()
}

/// A job's hook on a runner host that has no static key at all.
fn job_hook(lab: &Lab, dir: &Path, job_id: u64) -> Hook {
    lab.hook(dir)
        .without_host_env("VM_SSH_PRIVATE_KEY")
        .host_env("PROXMOX_TEMPLATE", TEMPLATE)
        .job_var("CI_JOB_ID", job_id.to_string())
        .job_var("CI_PROJECT_PATH", "group/project")
        .job_var("CI_PROJECT_PATH_SLUG", "group-project")
}

fn derived(state: &JobState) -> VmKey {
    let nonce = state
        .ssh_key_nonce
        .as_deref()
        .expect("a derived key's nonce");
    VmKey::derive(&fleet_key(), state.vmid, nonce).unwrap()
}

fn static_key(lab: &Lab) -> Arc<PrivateKey> {
    Arc::new(PrivateKey::from_text(&lab.key.private_text, None).unwrap())
}

/// Logs in to the state's VM with `key`, its host key pinned: `Ok` when the VM accepts it.
fn login(state: &JobState, key: Arc<PrivateKey>) -> gitlab_proxmox_runner::Result<()> {
    let target = Target {
        host: state.ip.clone().unwrap(),
        port: state.ssh_port.unwrap(),
        user: state.ssh_user.clone().unwrap(),
        vm_label: format!("VM {}", state.vmid),
    };
    let check = HostKeyCheck::Pinned(state.host_keys.clone());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let connection = Connection::connect(&target, key, &check).await?;
            connection.close().await;
            Ok(())
        })
}

/// HKDF-SHA256 (salt: the fixed label; key: the fleet key; info: VMID and nonce), written
/// out here apart from the driver's code.
fn independent_seed(vmid: u32, nonce: &str) -> [u8; 32] {
    use base64ct::Encoding;
    let mut fleet = [0u8; 64];
    let fleet = base64ct::Base64::decode(gpr_testkit::fleet::FLEET_KEY, &mut fleet).unwrap();
    let salt = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        b"gitlab-proxmox-runner per-VM SSH key v1",
    );
    let prk = ring::hmac::sign(&salt, fleet);
    let prk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, prk.as_ref());
    let info = format!("vmid={vmid}\nnonce={nonce}\u{1}");
    let okm = ring::hmac::sign(&prk, info.as_bytes());
    okm.as_ref().try_into().unwrap()
}

/// Every file under `dir`, as text (lossy).
fn files_under(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    found
}

#[test]
fn a_vm_accepts_its_own_derived_key_and_refuses_another_vms_and_the_static_key() {
    let Some(lab) = start("a_vm_accepts_its_own_derived_key") else {
        return;
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut states = Vec::new();
    for (n, dir) in dirs.iter().enumerate() {
        let out = job_hook(&lab, dir.path(), 9100 + n as u64)
            .arg("prepare")
            .run();
        out.assert_exit(0);
        assert!(
            out.log().contains("a per-VM SSH key through cloud-init"),
            "{}",
            out.log()
        );
        let state = JobState::load(dir.path()).unwrap().unwrap();
        assert_eq!(state.phase, Phase::Ready);
        // The nonce is the job marker's: driver-made, nothing a job chose.
        let marker = Marker::parse_line(&state.marker).unwrap();
        assert_eq!(state.ssh_key_nonce.as_deref(), Some(marker.nonce.as_str()));
        let key = derived(&state);
        let vm = lab.fake.vm(state.vmid).unwrap();
        assert_eq!(
            vm.config.get("sshkeys").cloned(),
            Some(encode_sshkeys(&[key.public_line()])),
            "the VM's own key replaced the template's"
        );
        assert_eq!(
            lab.fake.cloud_init_keys(state.vmid),
            Some(vec![key.public_line().to_string()]),
            "set before the first boot, so cloud-init applied it"
        );
        states.push(state);
    }
    let (a, b) = (&states[0], &states[1]);
    assert_ne!(derived(a).public_line(), derived(b).public_line());
    login(a, derived(a).private()).expect("VM A accepts its own key");
    login(b, derived(b).private()).expect("VM B accepts its own key");
    let err = login(a, derived(b).private()).unwrap_err();
    assert!(err.is_authentication_refused(), "{err}");
    let err = login(b, derived(a).private()).unwrap_err();
    assert!(err.is_authentication_refused(), "{err}");
    let err = login(a, static_key(&lab)).unwrap_err();
    assert!(err.is_authentication_refused(), "the static key: {err}");

    for (n, dir) in dirs.iter().enumerate() {
        job_hook(&lab, dir.path(), 9100 + n as u64)
            .arg("cleanup")
            .run()
            .assert_exit(0);
    }
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_stage_derives_the_key_again_with_nothing_of_it_on_disk() {
    let Some(lab) = start("a_stage_derives_the_key_again") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = job_hook(&lab, dir.path(), 9200);
    hook.clone().arg("prepare").run().assert_exit(0);
    let state = JobState::load(dir.path()).unwrap().unwrap();
    let key = derived(&state);

    // The key as the README specifies it, derived here independently: what its private half
    // would look like on disk, in any of its usual forms.
    let seed = independent_seed(state.vmid, state.ssh_key_nonce.as_deref().unwrap());
    let keypair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let private = russh::keys::PrivateKey::from(keypair);
    assert_eq!(
        private.public_key().to_openssh().unwrap(),
        key.public_line().rsplit_once(' ').unwrap().0,
        "the derivation is HKDF-SHA256 as documented"
    );
    let private_text = private
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap();
    let mut forms: Vec<String> = private_text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::to_string)
        .collect();
    forms.push(seed.iter().map(|b| format!("{b:02x}")).collect());
    forms.push(base64ct::Base64::encode_string(&seed));
    for (path, text) in files_under(dir.path()) {
        assert!(!text.contains("PRIVATE KEY"), "{path}: {text}");
        for form in &forms {
            assert!(!text.contains(form.as_str()), "{path} holds key material");
        }
    }

    // A new process, as every hook is: the key comes from the nonce in the state alone.
    let script = write_stage_script(dir.path(), "echo stage-ran-as-$(id -un)\n");
    let out = hook
        .clone()
        .arg("run")
        .arg(&script)
        .arg("build_script")
        .run();
    out.assert_exit(0);
    assert!(out.stdout.contains("stage-ran-as-root"), "{}", out.stdout);

    // The same stage with another nonce in the state derives another key, which the VM refuses.
    let mut forged = state.clone();
    forged.ssh_key_nonce = Some("00000000000000000000000000000001".into());
    forged.save(dir.path()).unwrap();
    let out = hook
        .clone()
        .arg("run")
        .arg(&script)
        .arg("build_script")
        .run();
    assert_ne!(out.code, 0, "{}", out.log());
    state.save(dir.path()).unwrap();

    hook.arg("cleanup").run().assert_exit(0);
}

#[test]
fn a_template_without_cloud_init_keeps_the_static_key_and_says_so() {
    // Here the static key is baked into the image (the lab's default).
    let Some(lab) = Lab::builder(driver_binary!()).with_sshd_per_vm_or_skip("static_path") else {
        return;
    };
    lab.fake.set_vm_config(60900, "ciuser", Some("root"));
    lab.fake.set_vm_config(60900, "ide2", None);
    let dir = tempfile::tempdir().unwrap();
    let hook = lab
        .hook(dir.path())
        .host_env("PROXMOX_TEMPLATE", TEMPLATE)
        .job_var("CI_JOB_ID", "9300");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    assert!(
        out.log()
            .contains("the static key VM_SSH_PRIVATE_KEY (template ubuntu-focal (60900): no cloud-init drive)"),
        "{}",
        out.log()
    );
    let state = JobState::load(dir.path()).unwrap().unwrap();
    assert_eq!(state.ssh_key_nonce, None);
    let vm = lab.fake.vm(state.vmid).unwrap();
    assert!(!vm.config.contains_key("sshkeys"), "{:?}", vm.config);
    hook.clone().arg("cleanup").run().assert_exit(0);

    // Without the static key, such a template cannot be used, and the message says why.
    let out = hook
        .clone()
        .without_host_env("VM_SSH_PRIVATE_KEY")
        .arg("prepare")
        .run();
    assert_ne!(out.code, 0);
    assert!(
        out.log()
            .contains("takes the static SSH key (no cloud-init drive)"),
        "{}",
        out.log()
    );
    hook.arg("cleanup").run().assert_exit(0);
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn a_warm_vm_is_claimed_with_its_own_derived_key() {
    let Some(lab) = start("a_warm_vm_is_claimed_with_its_own_derived_key") else {
        return;
    };
    let pool = PoolService::start(&lab, "pool-k", &[("WARM_POOL", "ubuntu-focal=1")]);
    let warm = wait_for("a warm VM", Duration::from_secs(60), || {
        lab.fake.job_vms().into_iter().find(|vm| {
            Marker::find_in(&vm.description)
                .and_then(|m| m.warm)
                .is_some_and(|w| !w.address.is_empty())
                && vm.description.contains("\nssh-host-key: ")
        })
    });
    pool.stop();
    let warm_marker = Marker::find_in(&warm.description).unwrap();
    let warm_key = VmKey::derive(&fleet_key(), warm.vmid, &warm_marker.nonce).unwrap();
    assert_eq!(
        warm.config.get("sshkeys").cloned(),
        Some(encode_sshkeys(&[warm_key.public_line()]))
    );

    let dir = tempfile::tempdir().unwrap();
    let hook = job_hook(&lab, dir.path(), 9400).host_env("WARM_POOL", "ubuntu-focal=1");
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    assert!(out.log().contains("claimed warm VM"), "{}", out.log());
    let state = JobState::load(dir.path()).unwrap().unwrap();
    assert_eq!(state.vmid, warm.vmid);
    // The warm VM's nonce, not the job marker's: the key was derived from it before its boot.
    assert_eq!(
        state.ssh_key_nonce.as_deref(),
        Some(warm_marker.nonce.as_str())
    );
    assert_ne!(
        Marker::parse_line(&state.marker).unwrap().nonce,
        warm_marker.nonce
    );
    let script = write_stage_script(dir.path(), "echo warm-stage-ran\n");
    let out = hook
        .clone()
        .arg("run")
        .arg(&script)
        .arg("build_script")
        .run();
    out.assert_exit(0);
    assert!(out.stdout.contains("warm-stage-ran"), "{}", out.stdout);
    let err = login(&state, static_key(&lab)).unwrap_err();
    assert!(err.is_authentication_refused(), "the static key: {err}");
    hook.arg("cleanup").run().assert_exit(0);
}

fn check(lab: &Lab, extra: &[(&str, &str)]) -> (i32, String) {
    let (config, fleet_file) = gpr_testkit::fleet::settings_env();
    let mut settings = vec![
        ("RUNNER_HELPER_PATH", ""),
        ("PROXMOX_TEMPLATE", TEMPLATE),
        (config.as_str(), fleet_file.as_str()),
    ];
    settings.extend_from_slice(extra);
    let output = lab
        .check_command(&settings)
        .arg("--smoke")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn line_with<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{stdout}"))
}

#[test]
fn check_tells_each_templates_key_path_and_smoke_proves_the_derived_login() {
    let Some(lab) = start("check_tells_each_templates_key_path") else {
        return;
    };
    let (_, stdout) = check(&lab, &[]);
    let template = line_with(&stdout, "✔ template ubuntu-focal (60900)");
    assert!(
        template.contains("SSH: a per-VM key through cloud-init"),
        "{template}"
    );
    let smoke = line_with(&stdout, "✔ smoke test: VM ");
    assert!(
        smoke.contains("a per-VM key (cloud-init) logs in, VM_SSH_PRIVATE_KEY is refused"),
        "{smoke}"
    );
    assert!(lab.fake.job_vms().is_empty());
    // Setting a VM's `sshkeys` takes VM.Config.Cloudinit on the job VMs.
    let job_vms = stdout
        .lines()
        .find(|line| line.contains("(the job VMs: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(job_vms.contains("VM.Config.Cloudinit"), "{job_vms}");

    // A template without a cloud-init drive needs the static key, which is not set here.
    lab.fake.set_vm_config(60900, "ide2", None);
    let (code, stdout) = check(&lab, &[("VM_SSH_PRIVATE_KEY", "")]);
    assert_ne!(code, 0, "{stdout}");
    let template = line_with(&stdout, "✘ template ubuntu-focal (60900)");
    assert!(
        template.contains(
            "its VMs would take the static SSH key (no cloud-init drive), and \
             VM_SSH_PRIVATE_KEY is not set"
        ),
        "{template}"
    );
    assert!(lab.fake.job_vms().is_empty());
}

#[test]
fn smoke_says_when_a_template_still_accepts_the_static_key() {
    // The static key baked into the image: the VM's own key works, and so does the static one.
    let Some(lab) = Lab::builder(driver_binary!()).with_sshd_per_vm_or_skip("smoke_baked_key")
    else {
        return;
    };
    lab.fake.set_vm_config(60900, "ciuser", Some("root"));
    let (_, stdout) = check(&lab, &[]);
    let smoke = line_with(&stdout, "✔ smoke test: VM ");
    assert!(
        smoke.contains("a per-VM key (cloud-init) logs in, but VM_SSH_PRIVATE_KEY is accepted too"),
        "{smoke}"
    );
}

#[test]
fn a_job_with_its_own_key_keeps_the_templates_keys_for_its_own_clone() {
    let Some(lab) = start("a_job_with_its_own_key") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The lab's key is what the templates' cloud-init carries: the job's key works on a VM
    // that keeps the template's sshkeys, and only there.
    let hook = job_hook(&lab, dir.path(), 9500)
        .job_var("VM_SSH_PRIVATE_KEY", lab.key.private_text.clone());
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    assert!(
        out.log().contains(
            "the job supplies its own VM_SSH_PRIVATE_KEY: its clone keeps the template's SSH keys"
        ),
        "{}",
        out.log()
    );
    let state = JobState::load(dir.path()).unwrap().unwrap();
    assert_eq!(state.ssh_key_nonce, None);
    let vm = lab.fake.vm(state.vmid).unwrap();
    let template = lab.fake.vm(60900).unwrap();
    assert_eq!(vm.config.get("sshkeys"), template.config.get("sshkeys"));
    let script = write_stage_script(dir.path(), "echo own-key-stage\n");
    let out = hook
        .clone()
        .arg("run")
        .arg(&script)
        .arg("build_script")
        .run();
    out.assert_exit(0);
    assert!(out.stdout.contains("own-key-stage"), "{}", out.stdout);
    hook.arg("cleanup").run().assert_exit(0);
}

#[test]
fn after_a_fleet_key_rotation_a_running_job_keeps_its_vms_key() {
    let Some(lab) = start("after_a_fleet_key_rotation") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hook = job_hook(&lab, dir.path(), 9600);
    hook.clone().arg("prepare").run().assert_exit(0);
    let state = JobState::load(dir.path()).unwrap().unwrap();
    assert_eq!(state.ssh_key_fleet, Some(fleet_key().id()));

    // The admin rotates: a new PROXMOX_FLEET_KEY, the old one kept as the previous.
    let new_key = FleetKey::generate().unwrap();
    let settings = tempfile::tempdir().unwrap();
    let rotated = settings.path().join("rotated.toml");
    gpr_testkit::fleet::write_settings(
        &rotated,
        &format!(
            "PROXMOX_FLEET_KEY = \"{}\"\nPROXMOX_FLEET_KEY_PREVIOUS = \"{}\"\n",
            new_key.as_str(),
            gpr_testkit::fleet::FLEET_KEY
        ),
    );
    let script = write_stage_script(dir.path(), "echo after-rotation\n");
    let stage = |settings_file: &Path| {
        hook.clone()
            .host_env(
                gpr_testkit::fleet::CONFIG_ENV,
                settings_file.display().to_string(),
            )
            .arg("run")
            .arg(&script)
            .arg("build_script")
            .run()
    };
    let out = stage(&rotated);
    out.assert_exit(0);
    assert!(out.stdout.contains("after-rotation"), "{}", out.stdout);

    // Once the previous key is dropped, a job that started before the rotation cannot go on,
    // and says why.
    let dropped = settings.path().join("dropped.toml");
    gpr_testkit::fleet::write_settings(
        &dropped,
        &format!("PROXMOX_FLEET_KEY = \"{}\"\n", new_key.as_str()),
    );
    let out = stage(&dropped);
    assert_ne!(out.code, 0);
    assert!(
        out.log()
            .contains("keep the old key as PROXMOX_FLEET_KEY_PREVIOUS"),
        "{}",
        out.log()
    );
    hook.arg("cleanup").run().assert_exit(0);
}
