//! Watch one whole CI job run through gitlab-proxmox-runner, with no Proxmox and no GitLab:
//!
//!     cargo run --example demo
//!
//! It starts the in-repo fake Proxmox VE API (real HTTPS on loopback) and an SSH server that
//! plays the job's VM (a real `sshd` when one is installed and we are root, else an in-process
//! SSH server), then drives the driver's four hooks exactly as gitlab-runner does and prints the
//! job log. `GPR_BIN=/path/to/gitlab-proxmox-runner` demonstrates another build of the driver;
//! by default this program re-runs itself as the driver (same code as the real binary's main).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gpr_testkit::fake_proxmox::{FakeConfig, FakeProxmox};
use gpr_testkit::hook::json_string;
use gpr_testkit::runner::{JobOutcome, RunnerJob};

/// The first argument that makes this program act as the driver binary.
const AS_DRIVER: &str = "--as-driver";

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == AS_DRIVER) {
        return run_as_driver(&args[2..]);
    }
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("demo: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Exactly what the real binary's `main` does.
fn run_as_driver(args: &[std::ffi::OsString]) -> ExitCode {
    use clap::Parser;
    use gitlab_proxmox_runner::cli::{effective_args, Cli};
    use gitlab_proxmox_runner::{app, hardening, ExitCodes};
    hardening::disable_core_dumps();
    let argv = std::iter::once("gitlab-proxmox-runner".into()).chain(args.iter().cloned());
    let cli = match Cli::try_parse_from(effective_args(argv)) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(ExitCodes::from_env().system_failure as u8);
        }
    };
    ExitCode::from(app::execute(cli).clamp(0, 255) as u8)
}

fn demo() -> Result<bool, String> {
    let started = Instant::now();
    let work = tempfile::tempdir().map_err(|err| format!("cannot make a temp dir: {err}"))?;

    println!("== starting the fake Proxmox VE API");
    let fake = FakeProxmox::start(FakeConfig::default());
    println!(
        "   https://{} (node pve1, templates ubuntu-focal=60900 ... debian-12=60930)",
        fake.host()
    );

    println!("== starting the job's \"VM\" (an SSH server on loopback)");
    let vm = ssh_target::start()?;
    println!("   {} on 127.0.0.1:{} as {}", vm.kind, vm.port, vm.user);
    // The fake's guest agent hands the driver the VM's host key, as a real agent would.
    fake.set_guest_file("/etc/ssh/ssh_host_ed25519_key.pub", &vm.host_public_key);

    // The runner host's settings: a root-only file passed with --config (the recommended setup).
    let settings_file = work.path().join("proxmox.toml");
    let mut settings = fake.settings_env();
    settings.extend([
        ("VM_SSH_USER".to_string(), vm.user.clone()),
        ("VM_SSH_PORT".to_string(), vm.port.to_string()),
        ("VM_SSH_PRIVATE_KEY".to_string(), vm.client_key.clone()),
        ("VM_BOOT_TIMEOUT".to_string(), "60".to_string()),
        // The fake's guest agent reports the "VM" at 127.0.0.1, where the SSH server listens.
        ("VM_NETWORK_CIDRS".to_string(), "127.0.0.0/8".to_string()),
    ]);
    let text: String = settings
        .iter()
        .map(|(name, value)| format!("{name} = {}\n", json_string(value)))
        .collect();
    write_private(&settings_file, &text)?;

    let (program, mut prefix) = match std::env::var_os("GPR_BIN") {
        Some(bin) => (PathBuf::from(bin), Vec::new()),
        None => (
            std::env::current_exe().map_err(|err| format!("cannot find myself: {err}"))?,
            vec![AS_DRIVER.to_string()],
        ),
    };
    prefix.extend(["--config".to_string(), settings_file.display().to_string()]);
    let args =
        |hook: &str| -> Vec<String> { prefix.iter().cloned().chain([hook.to_string()]).collect() };
    let (config, prepare, run, cleanup) = (
        args("config"),
        args("prepare"),
        args("run"),
        args("cleanup"),
    );

    println!("== running a job like gitlab-runner: config, prepare, run (per stage), cleanup\n");
    let builds = work.path().join("builds");
    let report = RunnerJob::new(&program)
        .hook_args(
            &strs(&config),
            &strs(&prepare),
            &strs(&run),
            &strs(&cleanup),
        )
        .builds_dir_override(builds.display().to_string())
        .temp_root(work.path())
        .hook_timeout(Duration::from_secs(120))
        .graceful_kill_timeout(Duration::from_secs(10))
        .job_var("PROXMOX_TEMPLATE", "debian-12")
        .job_var("GREETING", "Hello from a CI variable")
        .script(
            "build_script",
            "echo \"$GREETING, job $CI_JOB_ID of $CI_PROJECT_PATH\"",
        )
        .script(
            "build_script",
            "echo \"running as $(id -un) on $(hostname) in $PWD\"",
        )
        .script(
            "build_script",
            "for step in compile test package; do echo \"  $step ... ok\"; done",
        )
        .script(
            "after_script",
            "echo 'after_script runs even when the job fails'",
        )
        .run();

    println!("---------------------------------- job log ----------------------------------");
    print!("{}", report.log);
    println!(
        "------------------- cleanup (the runner's own log, not the job's) -------------------"
    );
    print!("{}", report.cleanup_log);
    println!("--------------------------------------------------------------------------------\n");
    let left = fake.job_vms();
    println!(
        "outcome: {:?}; hooks called: {}; VMs left on the fake Proxmox: {}; {:.1} s in all",
        report.outcome,
        report.calls.len(),
        left.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(report.outcome == JobOutcome::Success && left.is_empty())
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

/// The job's "VM": a real sshd when possible, else the test kit's in-process SSH server.
mod ssh_target {
    use gpr_testkit::ssh_server::TestSshServer;
    use gpr_testkit::sshd::{self, Sshd};
    use gpr_testkit::sshkeys::ClientKey;

    pub struct Target {
        pub kind: String,
        pub port: u16,
        pub user: String,
        /// What the VM's guest agent would read from /etc/ssh/ssh_host_ed25519_key.pub.
        pub host_public_key: String,
        /// The private key the driver logs in with (text, as VM_SSH_PRIVATE_KEY accepts it).
        pub client_key: String,
        _server: Box<dyn std::any::Any>,
    }

    /// `GPR_DEMO_IN_PROCESS_SSH=1` picks the in-process server even where sshd could run.
    pub fn start() -> Result<Target, String> {
        let key = ClientKey::ed25519();
        let forced = std::env::var_os("GPR_DEMO_IN_PROCESS_SSH").is_some();
        match sshd::unavailable_reason() {
            None if !forced => openssh(key),
            reason => in_process(
                key,
                reason.unwrap_or_else(|| "GPR_DEMO_IN_PROCESS_SSH".into()),
            ),
        }
    }

    fn openssh(key: ClientKey) -> Result<Target, String> {
        let server = Sshd::builder().start();
        server.authorize(&key);
        let host_public_key = server
            .host_key_lines()
            .into_iter()
            .find(|line| line.starts_with("ssh-ed25519 "))
            .ok_or("the sshd has no ed25519 host key")?;
        Ok(Target {
            kind: "OpenSSH sshd".into(),
            port: server.port(),
            user: "root".into(),
            host_public_key,
            client_key: key.private_text,
            _server: Box::new(server),
        })
    }

    /// Runs the stage scripts as the current user (its `sudo` is a pass-through shim).
    fn in_process(key: ClientKey, why: String) -> Result<Target, String> {
        let server = TestSshServer::start();
        server.authorize(&key);
        let host_public_key = server
            .host_key_lines()
            .into_iter()
            .next()
            .ok_or("the in-process SSH server has no host key")?;
        Ok(Target {
            kind: format!("in-process SSH server (not OpenSSH's sshd: {why})"),
            port: server.port(),
            user: std::env::var("USER").unwrap_or_else(|_| "ci".into()),
            host_public_key,
            client_key: key.private_text,
            _server: Box::new(server),
        })
    }
}
