//! prepare with a warm VM to claim vs prepare that clones and boots, in one run (issue 11).
//!
//! The fake Proxmox boots every VM in `--boot SECONDS` (default 20, what a cloud image with
//! cloud-init and the guest agent takes on real hardware); a real sshd on loopback answers for
//! each VM (one per VM, with host keys of its own). A `gitlab-proxmox-runner pool` service
//! warms `--rounds` VMs (paying the boot once, ahead of any job) and is stopped; then the same
//! number of prepares claim them, and as many prepares with no warm VM left clone cold. Wall
//! time of the prepare hook, process start to exit: what the job waits before its first stage.
//!
//! ```text
//! cargo bench --bench warm_pool                 # 20 s boot, 3 rounds each
//! cargo bench --bench warm_pool -- --smoke      # 2 s boot, 2 rounds
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpr_testkit::{driver_binary, FakeConfig, Lab};

const TEMPLATE: &str = "ubuntu-focal";

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|arg| arg == "--smoke");
    let value = |name: &str| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|text| text.parse::<u64>().ok())
    };
    let boot = Duration::from_secs(value("--boot").unwrap_or(if smoke { 2 } else { 20 }));
    let rounds = value("--rounds").unwrap_or(if smoke { 2 } else { 3 }) as usize;
    let config = FakeConfig {
        boot_time: boot,
        // A linked clone on thin storage, start: about what real PVE takes.
        clone_time: Duration::from_millis(1000),
        task_time: Duration::from_millis(500),
        ..FakeConfig::default()
    };
    let Some(lab) = Lab::builder(driver_binary!())
        .fake(config)
        // Each VM its own sshd and host keys: the pool refuses clones that share one.
        .with_sshd_per_vm_or_skip("bench warm_pool")
    else {
        eprintln!("warm_pool bench skipped: no sshd");
        return;
    };

    // Warm the VMs ahead of any job, as the service does.
    let warming = Instant::now();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut pool = Command::new(&lab.bin)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(lab.settings())
        .envs([gpr_testkit::fleet::settings_env()])
        .env("WARM_POOL", format!("{TEMPLATE}={rounds}"))
        .args(["pool", "--id", "bench", "--interval", "0.5"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("start the pool service");
    loop {
        let warm = lab
            .fake
            .job_vms()
            .iter()
            .filter(|vm| vm.description.contains("\nssh-host-key: "))
            .count();
        if warm >= rounds {
            break;
        }
        assert!(
            warming.elapsed() < boot * 3 + Duration::from_secs(120),
            "the pool did not warm {rounds} VMs: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let warmed_in = warming.elapsed();
    unsafe { libc::kill(pool.id() as i32, libc::SIGTERM) };
    pool.wait().unwrap();

    let prepare = |job: usize| {
        let dir = tempfile::tempdir().unwrap();
        let hook = lab
            .hook(dir.path())
            .host_env("WARM_POOL", format!("{TEMPLATE}=1"))
            .job_var("CI_JOB_ID", (9000 + job).to_string())
            .job_var("CI_PROJECT_PATH_SLUG", "bench");
        let started = Instant::now();
        let out = hook.clone().arg("prepare").run();
        let took = started.elapsed();
        out.assert_exit(0);
        let claimed = out.log().contains("claimed warm VM");
        hook.arg("cleanup").run().assert_exit(0);
        (took, claimed)
    };
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    for job in 0..rounds * 2 {
        let (took, claimed) = prepare(job);
        if claimed {
            warm.push(took);
        } else {
            cold.push(took);
        }
    }
    assert_eq!(warm.len(), rounds, "every warm VM was claimed once");
    let (warm_median, cold_median) = (median(&mut warm), median(&mut cold));
    println!("# prepare: warm claim vs cold clone (fake Proxmox, boot {boot:?}, loopback sshd)\n");
    println!(
        "pool warmed {rounds} VMs in {:.1} s (ahead of any job)\n",
        warmed_in.as_secs_f64()
    );
    println!("| prepare | rounds | median | min | max |");
    println!("|---|---|---|---|---|");
    for (name, samples, median) in [
        ("warm claim", &warm, warm_median),
        ("cold clone", &cold, cold_median),
    ] {
        println!(
            "| {name} | {} | {:.3} s | {:.3} s | {:.3} s |",
            samples.len(),
            median.as_secs_f64(),
            samples.first().unwrap().as_secs_f64(),
            samples.last().unwrap().as_secs_f64()
        );
    }
    println!(
        "\ncold / warm = {:.0}x; warm claim ready for the first stage in {:.3} s (target <= 0.5 s: {})",
        cold_median.as_secs_f64() / warm_median.as_secs_f64(),
        warm_median.as_secs_f64(),
        if warm_median <= Duration::from_millis(500) { "met" } else { "NOT met" }
    );
    // Nothing may be left: the pool's service was stopped with every warm VM claimed.
    assert!(lab.fake.job_vms().is_empty(), "{:?}", lab.fake.job_vms());
}
