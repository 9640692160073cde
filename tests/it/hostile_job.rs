//! A hostile job, tried as an attacker would: everything a job controls (its CI/CD variables,
//! its `secrets:`, its overrides of predefined variables) thrown at the driver, through the
//! runner harness, in both setups (a settings file, and the older `[[runners]] environment`).
//! The job's "VM" is the in-process SSH server (testkit::ssh_server), so nothing here needs
//! OpenSSH or root, and nothing a job makes the driver copy can land on this machine.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gitlab_proxmox_runner::config::trust::{Trust, SPECS};
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::state::JobState;
use gpr_testkit::driver_binary;
use gpr_testkit::hook::{json_string, Hook, JobSecret, BUILD_FAILURE};
use gpr_testkit::runner::{JobOutcome, JobReport, RunnerJob};
use gpr_testkit::ssh_server::TestSshServer;
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::{FakeConfig, FakeProxmox, NewVm};

const ED25519_FILE: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
/// Another job's running VM, where a forged template map would point.
const NEIGHBOUR: u32 = 2_000_999;
const STAGED_HELPER: &str = ".gitlab-proxmox-runner/gitlab-runner.upload";

/// The runner host: a fake cluster, a "VM" and the driver's settings in a file.
struct Host {
    fake: FakeProxmox,
    vm: TestSshServer,
    key: ClientKey,
    dir: tempfile::TempDir,
    settings_file: PathBuf,
}

impl Host {
    fn new() -> Host {
        let vm = TestSshServer::start();
        let key = ClientKey::ed25519();
        vm.authorize(&key);
        // Installing the helper must never reach this machine's /usr/local/bin: the "VM"'s
        // `install` refuses, so an uploaded helper stays where the driver staged it.
        vm.shim(
            "install",
            "#!/bin/sh\necho 'install refused by the test VM' >&2\nexit 1\n",
        );
        let fake = FakeProxmox::start(FakeConfig::default());
        fake.set_guest_file(ED25519_FILE, &format!("{}\n", vm.host_key_lines()[0]));
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("builds")).expect("builds dir");
        let settings_file = dir.path().join("driver.toml");
        let host = Host {
            fake,
            vm,
            key,
            dir,
            settings_file,
        };
        let mut text = String::new();
        for (name, value) in host.settings() {
            text.push_str(&format!("{name} = {}\n", json_string(&value)));
        }
        std::fs::write(&host.settings_file, text).expect("write driver.toml");
        host
    }

    fn settings(&self) -> Vec<(String, String)> {
        let mut settings = self.fake.settings_env();
        settings.extend(
            [
                ("VM_SSH_USER", "tester".to_string()),
                ("VM_SSH_PORT", self.vm.port().to_string()),
                ("VM_SSH_PRIVATE_KEY", self.key.private_text.clone()),
                ("VM_BOOT_TIMEOUT", "60".to_string()),
                ("VM_NETWORK_CIDRS", "127.0.0.0/8".to_string()),
                ("PROXMOX_VMID_RANGE", "2000000-2999999".to_string()),
            ]
            .map(|(name, value)| (name.to_string(), value)),
        );
        settings
    }

    fn base_job(&self) -> RunnerJob {
        let builds = tempfile::tempdir_in(self.dir.path().join("builds"))
            .expect("builds dir")
            .keep();
        RunnerJob::new(driver_binary!())
            .builds_dir_override(builds.to_string_lossy().into_owned())
            .temp_root(self.dir.path())
            .retry_interval(Duration::ZERO)
            .hook_timeout(Duration::from_secs(120))
            .graceful_kill_timeout(Duration::from_secs(20))
    }

    /// The recommended setup: `--config FILE` on every hook.
    fn job(&self) -> RunnerJob {
        let config = self.settings_file.to_str().expect("utf-8 path");
        self.base_job().hook_args(
            &["--config", config, "config"],
            &["--config", config, "prepare"],
            &["--config", config, "run"],
            &["--config", config, "cleanup"],
        )
    }

    /// The older driver's setup: every setting a `[[runners]] environment` entry.
    fn compat_job(&self) -> RunnerJob {
        let mut job = self.base_job();
        for (name, value) in self.settings() {
            job = job.runner_env(name, value);
        }
        job
    }

    /// One hook of the recommended setup, for tests that stop between hooks.
    fn hook(&self, dir: &Path) -> Hook {
        let mut hook = Hook::new(driver_binary!(), dir)
            .arg("--config")
            .arg(&self.settings_file)
            .job_var("CI_JOB_ID", "4242")
            .job_var("CI_PROJECT_PATH", "group/project")
            .job_var("CI_PROJECT_PATH_SLUG", "group-project");
        hook = hook.runner_env("CI_RUNNER_SHORT_TOKEN", "t3stRunr");
        hook
    }

    fn staged_helper(&self) -> Option<String> {
        std::fs::read_to_string(self.vm.home().join(STAGED_HELPER)).ok()
    }

    /// A file on the runner host that must never reach a VM.
    fn secret_file(&self) -> PathBuf {
        let path = self.dir.path().join("runner-host-secret");
        std::fs::write(&path, "#!/bin/sh\n# runner host secret: glrt-TOKEN\n").unwrap();
        path
    }

    /// No VM of this runner's jobs is left (the neighbour [`another_jobs_vm`] must stay).
    #[track_caller]
    fn assert_no_vms(&self, report: &JobReport) {
        let left: Vec<_> = self
            .fake
            .job_vms()
            .into_iter()
            .filter(|vm| vm.vmid != NEIGHBOUR)
            .collect();
        assert!(
            left.is_empty(),
            "VMs left behind: {:?}\n--- job log\n{}\n--- cleanup log\n{}",
            left.iter().map(|vm| vm.vmid).collect::<Vec<_>>(),
            report.log,
            report.cleanup_log
        );
    }

    fn clone_requests(&self) -> Vec<String> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
            .map(|r| r.body)
            .collect()
    }
}

/// A malicious value for every host-only setting: each one, if used, visibly changes what the
/// driver does (another API server, another trust anchor, pools, sizes, the helper file...).
fn attack_values(host: &Host, attacker: &FakeProxmox) -> Vec<(String, String)> {
    let value = |name: &str| -> String {
        match name {
            "PROXMOX_HOST" => attacker.host(),
            "PROXMOX_USER" => "attacker@pve".into(),
            "PROXMOX_TOKEN_NAME" => "stolen".into(),
            "PROXMOX_TOKEN_VALUE" => "00000000-0000-0000-0000-000000000000".into(),
            "PROXMOX_NODE" => "pve-attacker".into(),
            "PROXMOX_NODES" => "pve-attacker".into(),
            "PROXMOX_NODE_MAX_VMS" => "0".into(),
            "PROXMOX_NODE_MEMORY_RESERVE_MB" => "999999999".into(),
            "PROXMOX_TLS_CA_FILE" => "/etc/ssl/certs/ca-certificates.crt".into(),
            "PROXMOX_TLS_FINGERPRINT" => attacker.fingerprint(),
            "PROXMOX_TLS_INSECURE" => "true".into(),
            "PROXMOX_HTTPS_PROXY" => "http://127.0.0.1:9".into(),
            "PROXMOX_TEMPLATES" => "ubuntu-focal=2000999".into(),
            // Not a valid value: if it were read, every hook would fail on it.
            "PROXMOX_TEMPLATE_COPIES" => "anything-named-alike".into(),
            "PROXMOX_DEFAULT_TEMPLATE" => "debian-12".into(),
            "PROXMOX_ALLOWED_TEMPLATES" => "*".into(),
            "PROXMOX_VMID_RANGE" => "100-120".into(),
            "PROXMOX_CLONE" => "full".into(),
            "PROXMOX_STORAGE" => "attacker-storage".into(),
            "PROXMOX_POOL" => "attacker-pool".into(),
            "PROXMOX_MAX_CONCURRENT_CLONES" => "1".into(),
            "PROXMOX_CLONE_LOCK_DIR" => host.dir.path().join("locks").display().to_string(),
            "PROXMOX_RUNNER_ID" => "forged-runner".into(),
            "PROXMOX_MAX_JOB_TIMEOUT" => "999999999".into(),
            "VM_CORES" => "64".into(),
            "VM_MEMORY_MB" => "999999".into(),
            "VM_DISK_GROW_GB" => "9999".into(),
            "VM_BOOT_TIMEOUT" => "1".into(),
            "VM_CLEANUP_TIMEOUT" => "1".into(),
            "VM_NETWORK_CIDRS" => "10.0.0.0/8".into(),
            "VM_SSH_USER" => "root".into(),
            "VM_SSH_PORT" => "1".into(),
            "VM_SSH_HOST_KEY_POLICY" => "none-at-all".into(),
            // Not a valid value: if it were read, every hook would fail on it.
            "VM_SSH_KEEPALIVE_INTERVAL" => "0".into(),
            "RUNNER_HELPER_PATH" => host.secret_file().display().to_string(),
            "WARM_POOL" => "ubuntu-focal=50,debian-12=50".into(),
            "WARM_MAX_IDLE" => "1".into(),
            // A key of the job's: if it counted, the job's own look-alike warm VMs would too.
            "PROXMOX_FLEET_KEY" => "YXR0YWNrZXItY2hvc2VuIGZsZWV0IGtleSwgMzIgYnl0ZXM=".into(),
            "PROXMOX_FLEET_KEY_PREVIOUS" => {
                "YXR0YWNrZXItY2hvc2VuIGZsZWV0IGtleSwgMzIgYnl0ZXM=".into()
            }
            other => panic!("no attack value for the new host-only setting {other}"),
        }
    };
    SPECS
        .iter()
        .filter(|spec| spec.trust != Trust::JobMaySet)
        .map(|spec| (spec.name.to_string(), value(spec.name)))
        .collect()
}

/// A running VM (another job's) at a VMID a map entry could name.
fn another_jobs_vm(fake: &FakeProxmox, vmid: u32) {
    let other = Marker::new(&Default::default());
    fake.add_vm(NewVm {
        vmid,
        name: "ci-1-other-job".into(),
        tags: "gitlab-proxmox-runner".into(),
        description: other.description(),
        running: true,
        ..Default::default()
    });
}

#[track_caller]
fn assert_nothing_of(host: &Host, attacker: &FakeProxmox, report: &JobReport) {
    assert_eq!(
        attacker.request_count(),
        0,
        "the job's PROXMOX_HOST was contacted"
    );
    for body in host.clone_requests() {
        for forbidden in ["attacker", "full=1", "newid=1"] {
            assert!(
                !body.contains(forbidden),
                "clone request {body:?}\n{}",
                report.log
            );
        }
    }
    for request in host.fake.requests() {
        assert!(
            !request.body.contains("999999") && !request.body.contains("cores=64"),
            "{} {} {}",
            request.method,
            request.path,
            request.body
        );
    }
    assert!(
        !report.log.contains("runner host secret") && host.staged_helper().is_none(),
        "a file named by the job was copied into the VM\n{}",
        report.log
    );
    assert!(host
        .fake
        .vm(NEIGHBOUR)
        .is_some_and(|vm| vm.status == "running"));
}

#[test]
fn secrets_for_every_host_only_setting_change_nothing_with_a_settings_file() {
    let host = Host::new();
    let attacker = FakeProxmox::start(FakeConfig::default());
    another_jobs_vm(&host.fake, NEIGHBOUR);
    let mut job = host
        .job()
        .script("build_script", "echo ran-on-the-runners-own-terms");
    let attacks = attack_values(&host, &attacker);
    for (name, value) in &attacks {
        job = job.secret(JobSecret::new(name, value));
    }
    let report = job.run();
    report.assert_success();
    assert!(report.log.contains("ran-on-the-runners-own-terms"));
    assert_nothing_of(&host, &attacker, &report);
    // One line names what was ignored, never the values.
    let line = report
        .log
        .lines()
        .find(|line| line.contains("ignored CUSTOM_ENV_"))
        .unwrap_or_else(|| panic!("no line about ignored values\n{}", report.log));
    for (name, _) in &attacks {
        assert!(
            line.contains(&format!("CUSTOM_ENV_{name}")),
            "{name}: {line}"
        );
    }
    for value in [attacker.host(), "attacker".into(), "999999".into()] {
        assert!(!line.contains(value.as_str()), "{line}");
    }
    assert_eq!(
        report.log.matches("ignored CUSTOM_ENV_").count(),
        1,
        "{}",
        report.log
    );
    host.assert_no_vms(&report);
}

#[test]
fn plain_variables_for_every_host_only_setting_change_nothing_with_a_settings_file() {
    let host = Host::new();
    let attacker = FakeProxmox::start(FakeConfig::default());
    another_jobs_vm(&host.fake, NEIGHBOUR);
    let mut job = host.job().script("build_script", "echo still-fine");
    for (name, value) in attack_values(&host, &attacker) {
        job = job.job_var(name, value);
    }
    let report = job.run();
    report.assert_success();
    assert_nothing_of(&host, &attacker, &report);
    host.assert_no_vms(&report);
}

#[test]
fn secrets_for_host_only_settings_are_refused_in_the_runners_environment_setup() {
    let host = Host::new();
    let attacker = FakeProxmox::start(FakeConfig::default());
    another_jobs_vm(&host.fake, NEIGHBOUR);
    for (name, value) in attack_values(&host, &attacker) {
        let report = host
            .compat_job()
            .secret(JobSecret::new(&name, value))
            .script("build_script", "echo never")
            .run();
        // Never read from CUSTOM_ENV_ in any setup: ignored, the job runs.
        let never_read = [
            "RUNNER_HELPER_PATH",
            "PROXMOX_FLEET_KEY",
            "PROXMOX_FLEET_KEY_PREVIOUS",
        ]
        .contains(&name.as_str());
        assert!(
            matches!(report.outcome, JobOutcome::ScriptFailure { .. }) || never_read,
            "{name}: {:?}\n{}",
            report.outcome,
            report.log
        );
        if never_read {
            report.assert_success();
            assert!(report.log.contains(&format!("ignored CUSTOM_ENV_{name}")));
        } else {
            assert!(report.log.contains(&name), "{name}\n{}", report.log);
            assert_eq!(report.attempts, 1, "a refused job is not retried");
            assert!(report.stages_run().is_empty());
        }
        assert_nothing_of(&host, &attacker, &report);
        host.assert_no_vms(&report);
    }
    assert!(
        host.clone_requests().len() == 3,
        "only the RUNNER_HELPER_PATH, PROXMOX_FLEET_KEY and PROXMOX_FLEET_KEY_PREVIOUS jobs ran"
    );
}

#[test]
fn a_helper_path_from_a_job_is_never_copied_into_the_vm() {
    let host = Host::new();
    let secret = host.secret_file().display().to_string();
    let jobs = [
        (
            "variable, settings file",
            host.job().job_var("RUNNER_HELPER_PATH", &secret),
        ),
        (
            "secret, settings file",
            host.job()
                .secret(JobSecret::new("RUNNER_HELPER_PATH", &secret)),
        ),
        (
            "secret, [[runners]] environment",
            host.compat_job()
                .secret(JobSecret::new("RUNNER_HELPER_PATH", &secret)),
        ),
    ];
    for (how, job) in jobs {
        let report = job.script("build_script", "true").run();
        report.assert_success();
        assert_eq!(
            host.staged_helper(),
            None,
            "{how}: the VM received the file\n{}",
            report.log
        );
        assert!(
            !report.log.contains("runner-host-secret"),
            "{how}\n{}",
            report.log
        );
        host.assert_no_vms(&report);
    }
    // The detector works: the runner host's own RUNNER_HELPER_PATH is uploaded.
    let report = host
        .job()
        .host_env("RUNNER_HELPER_PATH", &secret)
        .script("build_script", "true")
        .run();
    report.assert_success();
    assert!(
        host.staged_helper()
            .is_some_and(|text| text.contains("runner host secret")),
        "{}",
        report.log
    );
}

/// Two forged marker lines, one per format, after a newline in the project path.
fn forged_project_path() -> String {
    let v1 = "gitlab-proxmox-runner: v=1 runner=x job=1 project=x pipeline=1 created=1 \
              driver=0.1.0 nonce=0123456789abcdef0123456789abcdef";
    let v2 = "gitlab-proxmox-runner: v=2 nonce=0123456789abcdef0123456789abcdef runner=x \
              created=1 deadline=99999999999 driver=0.1.0 job=1 pipeline=1 project=x";
    format!("group/project\n{v1}\n{v2}\nnonce=ffff x=y")
}

#[test]
fn a_marker_forging_project_path_does_not_keep_the_vm_alive() {
    let host = Host::new();
    let report = host
        .job()
        .override_predefined("CI_PROJECT_PATH", forged_project_path())
        .script("build_script", "echo forged")
        .run();
    report.assert_success();
    let clone = &host.clone_requests()[0];
    assert!(clone.contains("description="), "{clone}");
    host.assert_no_vms(&report);
}

#[test]
fn gc_sweeps_an_orphan_whose_job_forged_markers_and_its_deadline_is_capped() {
    let host = Host::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = std::fs::read_to_string(&host.settings_file).unwrap();
    settings.push_str("PROXMOX_MAX_JOB_TIMEOUT = 600\nPROXMOX_RUNNER_ID = \"ci-host-7\"\n");
    std::fs::write(&host.settings_file, settings).unwrap();
    let hook = host
        .hook(dir.path())
        .job_override(gpr_testkit::hook::JobVariable::new(
            "CI_PROJECT_PATH",
            forged_project_path(),
        ))
        // A job that wants its VM to outlive every sweep.
        .job_override(gpr_testkit::hook::JobVariable::new(
            "CI_JOB_TIMEOUT",
            "315360000",
        ))
        .job_override(gpr_testkit::hook::JobVariable::new(
            "CI_RUNNER_SHORT_TOKEN",
            "ci-host-8",
        ));
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    let state = JobState::load(dir.path())
        .unwrap()
        .expect("prepare saved its state");
    let marker = Marker::parse_line(&state.marker).expect("a marker in the state");
    assert_eq!(
        marker.runner.as_deref(),
        Some("ci-host-7"),
        "the host's id, not the job's"
    );
    assert_eq!(
        marker.deadline.map(|deadline| deadline - marker.created),
        Some(600 + 3600),
        "the job's timeout is capped by PROXMOX_MAX_JOB_TIMEOUT"
    );
    let vm = host.fake.vm(state.vmid).expect("the VM exists");
    assert_eq!(vm.description.lines().count(), 3, "{:?}", vm.description);

    // The runner dies: no cleanup. The sweep of this runner's VMs finds the orphan anyway.
    let gc = std::process::Command::new(driver_binary!())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .args(["--config", host.settings_file.to_str().unwrap()])
        .args(["gc", "--runner", "ci-host-7", "--max-age", "0s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&gc.stdout);
    let stderr = String::from_utf8_lossy(&gc.stderr);
    assert!(gc.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("1 orphans destroyed"), "{stdout}\n{stderr}");
    assert!(host.fake.vm(state.vmid).is_none());
}

#[test]
fn the_older_setup_refuses_a_missing_or_incomplete_job_response_file() {
    let host = Host::new();
    let attacker = FakeProxmox::start(FakeConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Hook::new(driver_binary!(), dir.path()).job_var("PROXMOX_HOST", attacker.host());
    for (name, value) in host.settings() {
        hook = hook.runner_env(name, value);
    }
    // The job's PROXMOX_HOST wins in CUSTOM_ENV_; only the response file could tell.
    let cases = [
        (
            "no JOB_RESPONSE_FILE",
            hook.clone().without_job_response_file(),
        ),
        (
            "no variables list",
            hook.clone().job_response_text(r#"{"id":1,"token":"t"}"#),
        ),
        ("not JSON", hook.clone().job_response_text("{garbage")),
    ];
    for (how, hook) in cases {
        for name in ["config", "prepare", "cleanup"] {
            let out = hook.clone().arg(name).run();
            assert_ne!(out.code, 0, "{how}, {name}: accepted\n{}", out.log());
            assert!(
                out.log().contains("JOB_RESPONSE_FILE"),
                "{how}, {name}\n{}",
                out.log()
            );
        }
    }
    assert_eq!(attacker.request_count(), 0);
    assert_eq!(host.fake.request_count(), 0);
    // With the runner's real file the job's variable is named and refused as the job's fault.
    let out = hook.arg("prepare").run();
    out.assert_exit(BUILD_FAILURE);
    assert!(out.log().contains("PROXMOX_HOST"), "{}", out.log());
}

/// A loopback "proxy" that counts the connections it gets and closes them.
struct CountingProxy {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl CountingProxy {
    fn start() -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buffer = [0u8; 512];
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = stream.read(&mut buffer);
            }
        });
        CountingProxy { port, connections }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[test]
fn proxy_variables_in_the_environment_do_not_route_api_traffic() {
    let host = Host::new();
    let proxy = CountingProxy::start();
    let dir = tempfile::tempdir().unwrap();
    let mut hook = host.hook(dir.path());
    for name in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        hook = hook.host_env(name, proxy.url());
    }
    let out = hook.clone().arg("prepare").run();
    out.assert_exit(0);
    hook.clone().arg("cleanup").run().assert_exit(0);
    assert_eq!(
        proxy.connections(),
        0,
        "API traffic went through the environment's proxy"
    );
    assert!(host.fake.request_count() > 0);
    assert!(host.fake.job_vms().is_empty());

    // PROXMOX_HTTPS_PROXY is the one way to use a proxy (this one answers nothing).
    let dir = tempfile::tempdir().unwrap();
    let out = host
        .hook(dir.path())
        .host_env("PROXMOX_HTTPS_PROXY", proxy.url())
        .arg("prepare")
        .run();
    assert_ne!(out.code, 0, "{}", out.log());
    assert!(proxy.connections() > 0, "{}", out.log());
}

#[test]
fn a_map_entry_that_is_not_a_template_is_never_cloned() {
    let host = Host::new();
    another_jobs_vm(&host.fake, NEIGHBOUR);
    let mut settings = std::fs::read_to_string(&host.settings_file).unwrap();
    settings.push_str("PROXMOX_TEMPLATES = \"ubuntu-focal=60900,neighbour=2000999\"\n");
    std::fs::write(&host.settings_file, settings).unwrap();
    let report = host
        .job()
        .job_var("PROXMOX_TEMPLATE", "neighbour")
        .script("build_script", "echo never")
        .run();
    assert!(
        !matches!(report.outcome, JobOutcome::Success),
        "{:?}\n{}",
        report.outcome,
        report.log
    );
    assert!(report.log.contains("not a template"), "{}", report.log);
    assert!(
        host.clone_requests().is_empty(),
        "{:?}",
        host.clone_requests()
    );
    assert!(host
        .fake
        .vm(NEIGHBOUR)
        .is_some_and(|vm| vm.status == "running"));
    host.assert_no_vms(&report);
}
