//! The driver against the old way, measured side by side in one run (issue 5).
//!
//! Starts a real OpenSSH sshd on loopback (`gpr_testkit::sshd`) and the in-repo fake Proxmox,
//! then measures, interleaved round by round:
//!
//! 1. per-stage overhead: our `run` hook on a trivial 4 KiB stage script vs OpenSSH `scp` +
//!    `ssh ... sudo /bin/bash <script>` (the old Python driver's way) and vs one `ssh` with the
//!    script on stdin;
//! 2. streaming: N MB of stdout through `run` vs through OpenSSH `ssh`;
//! 3. prepare overhead: wall time minus the fake's simulated task and boot time;
//! 4. cleanup overhead, the same way;
//! 5. peak RSS of every hook (wait4's ru_maxrss) and the size of the static release binary.
//!
//! ```text
//! cargo build --release --target x86_64-unknown-linux-musl
//! cargo bench --bench driver -- --out BENCHMARKS.md      # full run, writes the report
//! cargo test --bench driver -- --smoke                   # CI: 3 rounds, 10 MB, debug build
//! ```
//!
//! Options: `--smoke`, `--out FILE` (else the report goes to stdout), `--bin FILE` (the driver
//! to measure; default: `$GPR_BIN`, else the binary cargo built for this target), `--static-bin FILE` (default:
//! `target/x86_64-unknown-linux-musl/release/gitlab-proxmox-runner`, measured as a second
//! "ours" when it exists), `--baseline-bin FILE` (an older build of the driver, measured in the
//! same interleaved rounds; every table then shows it and the ratio ours/baseline),
//! `--clone-ms N`, `--task-ms N` (the fake's clone and start/stop/delete durations) and
//! `--boot-ms N,N,...` (the boot delays of the prepare rounds), `--only LIST` (some of
//! `stage,breakdown,streaming,prepare`). Needs root and /usr/sbin/sshd,
//! like the sshd tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpr_testkit::hook::Hook;
use gpr_testkit::ssh_job::{self, SshTarget};
use gpr_testkit::sshd::{self, Sshd};
use gpr_testkit::sshkeys::ClientKey;
use gpr_testkit::{FakeConfig, FakeProxmox};

const STAGE_SCRIPT_SIZE: usize = 4096;
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// The fake's task durations during the prepare/cleanup rounds: a linked clone on thin storage
/// takes about a second on real PVE, start/stop/delete about half a second.
const CLONE_TIME: Duration = Duration::from_millis(1000);
const TASK_TIME: Duration = Duration::from_millis(500);
const BASELINE: &str = "baseline";

struct Options {
    smoke: bool,
    out: Option<PathBuf>,
    bin: PathBuf,
    static_bin: PathBuf,
    baseline_bin: Option<PathBuf>,
    /// `--only stage,breakdown,streaming,prepare`: the sections to run (default: all).
    only: Option<Vec<String>>,
    clone_time: Duration,
    task_time: Duration,
    stage_rounds: usize,
    stream_bytes: u64,
    stream_rounds: usize,
    prepare_rounds: usize,
    boot_delays: Vec<Duration>,
}

impl Options {
    fn parse() -> Options {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("target"));
        let mut options = Options {
            smoke: false,
            out: None,
            bin: gpr_testkit::driver_binary!(),
            static_bin: target_dir.join("x86_64-unknown-linux-musl/release/gitlab-proxmox-runner"),
            baseline_bin: None,
            only: None,
            clone_time: CLONE_TIME,
            task_time: TASK_TIME,
            stage_rounds: 30,
            stream_bytes: 200_000_000,
            stream_rounds: 10,
            prepare_rounds: 5,
            boot_delays: vec![Duration::ZERO, Duration::from_secs(5)],
        };
        let mut args = std::env::args().skip(1);
        let mut boot_delays = None;
        let millis = |name: &str, text: String| {
            Duration::from_millis(
                text.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {text:?} is not a number of ms")),
            )
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .unwrap_or_else(|| panic!("{name} needs a value"))
            };
            match arg.as_str() {
                "--smoke" => options.smoke = true,
                "--out" => options.out = Some(PathBuf::from(value("--out"))),
                "--bin" => options.bin = PathBuf::from(value("--bin")),
                "--static-bin" => options.static_bin = PathBuf::from(value("--static-bin")),
                "--baseline-bin" => {
                    options.baseline_bin = Some(PathBuf::from(value("--baseline-bin")))
                }
                "--only" => {
                    options.only = Some(value("--only").split(',').map(String::from).collect())
                }
                "--clone-ms" => options.clone_time = millis("--clone-ms", value("--clone-ms")),
                "--task-ms" => options.task_time = millis("--task-ms", value("--task-ms")),
                "--boot-ms" => {
                    boot_delays = Some(
                        value("--boot-ms")
                            .split(',')
                            .map(|ms| millis("--boot-ms", ms.to_string()))
                            .collect::<Vec<_>>(),
                    )
                }
                // cargo bench passes --bench; cargo test may pass filters: ignore the rest.
                _ => {}
            }
        }
        // Hooks run in their job directory: a relative path would name another file there.
        for path in [&mut options.bin, &mut options.static_bin]
            .into_iter()
            .chain(options.baseline_bin.as_mut())
        {
            if path.is_relative() {
                *path = std::env::current_dir().expect("current dir").join(&*path);
            }
        }
        if options.smoke {
            options.stage_rounds = 3;
            options.stream_bytes = 10_000_000;
            options.stream_rounds = 3;
            options.prepare_rounds = 1;
            options.boot_delays = vec![Duration::ZERO, Duration::from_secs(1)];
        }
        if let Some(delays) = boot_delays {
            options.boot_delays = delays;
        }
        options
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|name| name == section))
    }
}

// ------------------------------------------------------------------ measuring one process

/// One finished process, measured.
#[derive(Debug, Clone)]
struct Run {
    wall: Duration,
    /// user + system CPU of the process and its waited-for children.
    cpu: Duration,
    max_rss_kb: u64,
    code: i32,
    stdout_bytes: u64,
    stdout_head: Vec<u8>,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn expect_success(self, what: &str) -> Run {
        assert_eq!(
            self.code,
            0,
            "{what} failed\n--- stdout (head)\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&self.stdout_head),
            self.stderr
        );
        self
    }
}

/// Runs `command` to completion: stdout is counted and discarded (the same sink for every
/// method), stderr kept. Peak RSS and CPU come from wait4.
fn measure(mut command: Command, stdin: Option<&Path>) -> Run {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(path) = stdin {
        command.stdin(File::open(path).expect("open stdin file"));
    }
    let started = Instant::now();
    // Reaped by wait4 below (std's wait cannot return the child's resource usage).
    #[allow(clippy::zombie_processes)]
    let mut child = command.spawn().expect("start the measured program");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let counter = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        let mut total = 0u64;
        while let Ok(n) = stdout.read(&mut buffer) {
            if n == 0 {
                break;
            }
            if head.len() < 4096 {
                head.extend_from_slice(&buffer[..n.min(4096 - head.len())]);
            }
            total += n as u64;
        }
        (total, head)
    });
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let (code, usage) = wait4(child.id());
    let (stdout_bytes, stdout_head) = counter.join().expect("stdout reader");
    let stderr = errors.join().expect("stderr reader");
    let wall = started.elapsed();
    let timeval = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
    };
    Run {
        wall,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss as u64,
        code,
        stdout_bytes,
        stdout_head,
        stderr,
    }
}

fn wait4(pid: u32) -> (i32, libc::rusage) {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own child.
        let reaped = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        if reaped == pid as i32 {
            break;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::Interrupted,
            "wait4({pid}): {err}"
        );
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    (code, usage)
}

/// Two runs one after the other, as one method step (scp then ssh).
fn sequence(first: Run, second: Run) -> Run {
    Run {
        wall: first.wall + second.wall,
        cpu: first.cpu + second.cpu,
        max_rss_kb: first.max_rss_kb.max(second.max_rss_kb),
        code: if first.code != 0 {
            first.code
        } else {
            second.code
        },
        stdout_bytes: first.stdout_bytes + second.stdout_bytes,
        stdout_head: [first.stdout_head, second.stdout_head].concat(),
        stderr: first.stderr + &second.stderr,
    }
}

// ------------------------------------------------------------------ statistics

#[derive(Debug, Clone, Copy)]
struct Summary {
    median: Duration,
    min: Duration,
    max: Duration,
}

fn summarize(samples: &[Duration]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    assert!(n > 0, "no samples");
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    };
    Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn signed_ms(value: f64) -> String {
    format!("{:.0} ms", value * 1000.0)
}

fn ratio(ours: Duration, theirs: Duration) -> String {
    format!(
        "{:.2}× ({:.0}%)",
        ours.as_secs_f64() / theirs.as_secs_f64(),
        100.0 * ours.as_secs_f64() / theirs.as_secs_f64()
    )
}

fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    bytes as f64 / wall.as_secs_f64() / 1e6
}

// ------------------------------------------------------------------ the SSH side

/// Everything both the driver and OpenSSH need to reach the sshd.
struct Bench {
    options: Options,
    sshd: Sshd,
    key: ClientKey,
    /// Holds the OpenSSH key file, known_hosts and the scripts.
    scratch: tempfile::TempDir,
    key_file: PathBuf,
    known_hosts: PathBuf,
    /// Peak RSS per hook, in KiB.
    peak_rss: BTreeMap<String, u64>,
    report: String,
}

/// One way of running a stage, measured per round.
struct Method {
    name: String,
    samples: Vec<Run>,
}

impl Bench {
    fn target(&self) -> SshTarget {
        SshTarget {
            host: self.sshd.host().to_string(),
            port: self.sshd.port(),
            user: "root".into(),
            host_keys: self.sshd.host_key_lines(),
        }
    }

    fn note_rss(&mut self, hook: &str, run: &Run) {
        let peak = self.peak_rss.entry(hook.to_string()).or_default();
        *peak = (*peak).max(run.max_rss_kb);
    }

    /// OpenSSH client options shared by scp and ssh: no config files, only our key, the host
    /// key pinned in a temp known_hosts, never a prompt.
    fn openssh_options(&self, command: &mut Command) {
        command
            .arg("-F")
            .arg("none")
            .arg("-i")
            .arg(&self.key_file)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .stdin(Stdio::null());
    }

    fn ssh(&self, extra: &[&str], remote_command: &str) -> Command {
        let mut command = Command::new("ssh");
        self.openssh_options(&mut command);
        command
            .arg("-p")
            .arg(self.sshd.port().to_string())
            .args(extra)
            .arg(format!("root@{}", self.sshd.host()))
            .arg(remote_command);
        command
    }

    fn scp(&self, local: &Path, remote: &str) -> Command {
        let mut command = Command::new("scp");
        self.openssh_options(&mut command);
        command
            .arg("-q")
            .arg("-P")
            .arg(self.sshd.port().to_string())
            .arg(local)
            .arg(format!("root@{}:{remote}", self.sshd.host()));
        command
    }

    fn stage_hook(&self, bin: &Path, job_dir: &Path, body: &str) -> Command {
        ssh_job::stage_hook(
            bin,
            job_dir,
            &self.target(),
            &self.key,
            "build_script",
            body,
        )
        .command()
    }

    /// The measured driver binaries: the one under test, when built the static one, and last
    /// the baseline (`--baseline-bin`) when given. Targets judge only the "ours" ones.
    fn our_binaries(&self) -> Vec<(String, PathBuf)> {
        let mut out = vec![("ours".to_string(), self.options.bin.clone())];
        if self.options.static_bin.exists() && self.options.static_bin != self.options.bin {
            out.push((
                "ours (static musl)".to_string(),
                self.options.static_bin.clone(),
            ));
        }
        if let Some(baseline) = &self.options.baseline_bin {
            out.push((BASELINE.to_string(), baseline.clone()));
        }
        out
    }

    fn stage_overhead(&mut self) {
        let rounds = self.options.stage_rounds;
        let body = stage_script_body();
        let local_script = self.scratch.path().join("stage.sh");
        std::fs::write(&local_script, &body).expect("write stage script");
        let remote_dir = self.scratch.path().join("remote");
        std::fs::create_dir_all(&remote_dir).expect("remote dir");
        let remote_script = remote_dir.join("stage.sh").display().to_string();
        let job = tempfile::tempdir().expect("job dir");

        let ours = self.our_binaries();
        let mut methods: Vec<Method> = ours
            .iter()
            .map(|(name, _)| Method {
                name: format!("{name}: `run` hook"),
                samples: Vec::new(),
            })
            .collect();
        let old = methods.len();
        for name in [
            "(a) old: `scp` + `ssh sudo /bin/bash <script>`",
            "(b) one `ssh ... sudo /bin/bash -s` < script",
            "(c) info: (b) with `-o KexAlgorithms=curve25519-sha256`",
        ] {
            methods.push(Method {
                name: name.into(),
                samples: Vec::new(),
            });
        }
        for round in 0..rounds {
            // Rotate the order every round: no method always runs first or after another.
            for step in 0..methods.len() {
                let index = (round + step) % methods.len();
                let run = if index < old {
                    let command = self.stage_hook(&ours[index].1, job.path(), &body);
                    let run = measure(command, None).expect_success("run hook");
                    self.note_rss(&format!("run (4 KiB stage), {}", ours[index].0), &run);
                    run
                } else if index == old {
                    let copy = measure(self.scp(&local_script, &remote_script), None)
                        .expect_success("scp");
                    let exec = measure(
                        self.ssh(&[], &format!("sudo /bin/bash {remote_script}")),
                        None,
                    )
                    .expect_success("ssh");
                    sequence(copy, exec)
                } else if index == old + 1 {
                    measure(self.ssh(&[], "sudo /bin/bash -s"), Some(&local_script))
                        .expect_success("ssh -s")
                } else {
                    measure(
                        self.ssh(
                            &["-o", "KexAlgorithms=curve25519-sha256"],
                            "sudo /bin/bash -s",
                        ),
                        Some(&local_script),
                    )
                    .expect_success("ssh -s curve25519")
                };
                assert_eq!(
                    run.stdout_head, b"stage ok\n",
                    "{}: unexpected stdout",
                    methods[index].name
                );
                methods[index].samples.push(run);
            }
        }

        let summaries: Vec<(Summary, Summary)> = methods
            .iter()
            .map(|method| {
                let walls: Vec<Duration> = method.samples.iter().map(|run| run.wall).collect();
                let cpus: Vec<Duration> = method.samples.iter().map(|run| run.cpu).collect();
                (summarize(&walls), summarize(&cpus))
            })
            .collect();
        let report = &mut self.report;
        let _ = writeln!(report, "## 1. Per-stage overhead\n");
        let _ = writeln!(
            report,
            "A trivial {STAGE_SCRIPT_SIZE}-byte stage script (`echo stage ok` plus comment \
             padding), {rounds} rounds, methods interleaved in a rotating order. Wall time of \
             the whole client side (process start to exit, output drained); CPU is the client \
             process's user+system time. The old method's figure is scp and ssh together.\n"
        );
        let _ = writeln!(
            report,
            "| method | median | min | max | client CPU (median) |\n|---|---|---|---|---|"
        );
        for (method, (wall, cpu)) in methods.iter().zip(&summaries) {
            let _ = writeln!(
                report,
                "| {} | {} | {} | {} | {} |",
                method.name,
                ms(wall.median),
                ms(wall.min),
                ms(wall.max),
                ms(cpu.median)
            );
        }
        let baseline = baseline_index(&ours);
        let _ = writeln!(
            report,
            "\n| ours, median as a ratio to | (a) old scp + ssh | (b) one ssh | (c) one ssh, \
             curve25519 | baseline |\n|---|---|---|---|---|"
        );
        for (index, (name, _)) in ours.iter().enumerate() {
            let ours = summaries[index].0.median;
            let _ = writeln!(
                report,
                "| {name} | **{}** | {} | {} | {} |",
                ratio(ours, summaries[old].0.median),
                ratio(ours, summaries[old + 1].0.median),
                ratio(ours, summaries[old + 2].0.median),
                baseline
                    .map(|b| ratio(ours, summaries[b].0.median))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        let judged = baseline.unwrap_or(old);
        let _ = writeln!(
            report,
            "\nTarget: ours ≤ 25% of (a), for every build of ours. **{}**\n",
            verdict(summaries[..judged].iter().all(|(wall, _)| {
                wall.median.as_secs_f64() <= 0.25 * summaries[old].0.median.as_secs_f64()
            }))
        );
    }

    /// Where a stage's time goes, measured in this process with the driver's own SSH code
    /// (`gitlab_proxmox_runner::ssh`) against the same sshd: each probe is a fresh connection
    /// doing one more step than the previous one, interleaved round by round, so the differences
    /// of the medians are the steps' costs. OpenSSH doing `true` is the reference for what sshd
    /// itself costs per connection.
    fn stage_breakdown(&mut self) {
        use gitlab_proxmox_runner::cancel::Cancel;
        use gitlab_proxmox_runner::ssh::{
            Connection, HostKeyCheck, PrivateKey, StageOutcome, StageScript, Target,
        };
        let rounds = self.options.stage_rounds;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let key = std::sync::Arc::new(
            PrivateKey::from_text(&self.key.private_text, None).expect("client key"),
        );
        let target = Target {
            host: self.sshd.host().to_string(),
            port: self.sshd.port(),
            user: "root".into(),
            vm_label: "bench".into(),
        };
        let check = HostKeyCheck::Pinned(self.sshd.host_key_lines());
        let body = stage_script_body();
        let upload_dir = self.scratch.path().join("uploads");
        std::fs::create_dir_all(&upload_dir).expect("upload dir");
        let upload_path = upload_dir.join("script.sh").display().to_string();
        let probes: [(&str, &str); 7] = [
            (
                "connect",
                "TCP connect, key exchange, host key check, public-key auth",
            ),
            (
                "+ exec `true`",
                "a session channel, exec through the login shell, exit status",
            ),
            ("+ exec `sudo -n true`", "sudo's start-up (PAM, sudoers)"),
            (
                "+ exec `sudo -n -- setsid -w /bin/bash -c true`",
                "setsid and bash start-up",
            ),
            (
                "+ SFTP upload of the 4 KiB script",
                "SFTP channel, sftp-server start-up, open/write/close",
            ),
            (
                "+ `run_stage` (ours, in process)",
                "all of a stage after connecting",
            ),
            (
                "OpenSSH `ssh -o KexAlgorithms=curve25519-sha256 host true`",
                "reference: sshd's own cost per connection, with OpenSSH's client",
            ),
        ];
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); probes.len()];
        for round in 0..rounds {
            for step in 0..probes.len() {
                let index = (round + step) % probes.len();
                let started = Instant::now();
                if index == probes.len() - 1 {
                    measure(
                        self.ssh(&["-o", "KexAlgorithms=curve25519-sha256"], "true"),
                        None,
                    )
                    .expect_success("ssh true");
                    samples[index].push(started.elapsed());
                    continue;
                }
                runtime.block_on(async {
                    let connection = Connection::connect(&target, key.clone(), &check)
                        .await
                        .expect("connect");
                    let run = |command: &'static str| {
                        let connection = &connection;
                        async move {
                            let out = connection.exec_capture(command).await.expect(command);
                            assert_eq!(out.status, Some(0), "{command}");
                        }
                    };
                    match index {
                        0 => {}
                        1 => run("true").await,
                        2 => run("sudo -n true").await,
                        3 => run("sudo -n -- setsid -w /bin/bash -c true").await,
                        4 => connection
                            .upload(&upload_path, body.as_bytes(), 0o700)
                            .await
                            .expect("upload"),
                        _ => {
                            let script = StageScript {
                                body: body.as_bytes(),
                                stage: "build_script",
                                job_key: "bench",
                            };
                            let outcome = connection
                                .run_stage(&script, &Cancel::never())
                                .await
                                .expect("run_stage");
                            assert_eq!(outcome, StageOutcome::Exited(0));
                        }
                    }
                    connection.close().await;
                });
                samples[index].push(started.elapsed());
            }
        }
        let medians: Vec<Duration> = samples.iter().map(|s| summarize(s).median).collect();
        let report = &mut self.report;
        let _ = writeln!(
            report,
            "## 1b. Where a stage's time goes
"
        );
        let _ = writeln!(
            report,
            "In this process, with the driver's own SSH code (`gitlab_proxmox_runner::ssh`, \
             this build) against the same sshd, {rounds} rounds interleaved. Each probe is a \
             fresh connection doing one step more than `connect`; a step's cost is its \
             median minus the median of the probe it extends. The stage's own output went to \
             this benchmark's stdout (the `run` hook's figure above adds the driver process and \
             the job state).\n"
        );
        let _ = writeln!(
            report,
            "| probe | what it adds | median | min | max | step's cost (median − the probe \
             it extends) |\n|---|---|---|---|---|---|"
        );
        for (index, (name, what)) in probes.iter().enumerate() {
            let summary = summarize(&samples[index]);
            let base = match index {
                0 | 6 => None,
                1 | 4 | 5 => Some(0),
                other => Some(other - 1),
            };
            let step = match base {
                Some(base) => signed_ms(medians[index].as_secs_f64() - medians[base].as_secs_f64()),
                None => "–".into(),
            };
            let _ = writeln!(
                report,
                "| {name} | {what} | {} | {} | {} | {step} |",
                ms(summary.median),
                ms(summary.min),
                ms(summary.max)
            );
        }
        let _ = writeln!(report);
    }

    fn streaming(&mut self) {
        let bytes = self.options.stream_bytes;
        let rounds = self.options.stream_rounds;
        let job = tempfile::tempdir().expect("job dir");
        let command_text = format!("head -c {bytes} /dev/zero");
        let body = format!("{command_text}\n");
        let ours = self.our_binaries();
        let mut methods: Vec<Method> = ours
            .iter()
            .map(|(name, _)| Method {
                name: format!("{name}: `run` hook, script `{command_text}`"),
                samples: Vec::new(),
            })
            .collect();
        let openssh = methods.len();
        methods.push(Method {
            name: format!("OpenSSH `ssh host '{command_text}'` (defaults)"),
            samples: Vec::new(),
        });
        methods.push(Method {
            name: "info: OpenSSH with `-c aes128-gcm@openssh.com`".into(),
            samples: Vec::new(),
        });
        for round in 0..rounds {
            for step in 0..methods.len() {
                let index = (round + step) % methods.len();
                let run = if index < openssh {
                    let run = measure(self.stage_hook(&ours[index].1, job.path(), &body), None)
                        .expect_success("run hook (streaming)");
                    self.note_rss(&format!("run (streaming), {}", ours[index].0), &run);
                    run
                } else if index == openssh {
                    measure(self.ssh(&[], &command_text), None).expect_success("ssh streaming")
                } else {
                    measure(
                        self.ssh(&["-c", "aes128-gcm@openssh.com"], &command_text),
                        None,
                    )
                    .expect_success("ssh streaming aes-gcm")
                };
                assert_eq!(run.stdout_bytes, bytes, "{}", methods[index].name);
                methods[index].samples.push(run);
            }
        }
        let report = &mut self.report;
        let _ = writeln!(report, "## 2. Streaming throughput\n");
        let _ = writeln!(
            report,
            "{} MB (10^6 bytes) of stdout, {rounds} rounds interleaved; stdout drained by \
             the benchmark through a pipe and counted (the same reader for every method). MB/s \
             is over the whole client wall time, connection setup included.\n",
            bytes / 1_000_000
        );
        let _ = writeln!(
            report,
            "| method | median MB/s | best MB/s | worst MB/s | client CPU (median) | every round, MB/s |\n|---|---|---|---|---|---|"
        );
        let mut medians = Vec::new();
        for method in &methods {
            let walls: Vec<Duration> = method.samples.iter().map(|run| run.wall).collect();
            let cpus: Vec<Duration> = method.samples.iter().map(|run| run.cpu).collect();
            let wall = summarize(&walls);
            medians.push(mb_per_s(bytes, wall.median));
            let _ = writeln!(
                report,
                "| {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                method.name,
                mb_per_s(bytes, wall.median),
                mb_per_s(bytes, wall.min),
                mb_per_s(bytes, wall.max),
                ms(summarize(&cpus).median),
                walls
                    .iter()
                    .map(|wall| format!("{:.0}", mb_per_s(bytes, *wall)))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        let _ = writeln!(report);
        let baseline = baseline_index(&ours);
        for (index, (name, _)) in ours.iter().enumerate() {
            let against_baseline = match baseline {
                Some(b) if b != index => {
                    format!("; {:.2}× the baseline's", medians[index] / medians[b])
                }
                _ => String::new(),
            };
            let _ = writeln!(
                report,
                "- {name}: **{:.2}×** OpenSSH's default throughput ({:.2}× the AES-GCM \
                 one{against_baseline})",
                medians[index] / medians[openssh],
                medians[index] / medians[openssh + 1]
            );
        }
        let _ = writeln!(
            report,
            "\nTarget: ours ≥ OpenSSH, for every build of ours. **{}**\n",
            verdict(
                medians[..baseline.unwrap_or(openssh)]
                    .iter()
                    .all(|ours| *ours >= medians[openssh])
            )
        );
    }

    // -------------------------------------------------------------- prepare and cleanup

    fn prepare_and_cleanup(&mut self) {
        let host_key = self.sshd.host_key_lines()[0].clone();
        assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");
        let mut guest_files = BTreeMap::new();
        guest_files.insert(
            "/etc/ssh/ssh_host_ed25519_key.pub".to_string(),
            format!("{host_key} root@vm\n"),
        );
        let (clone_time, task_time) = (self.options.clone_time, self.options.task_time);
        let fake = FakeProxmox::start(FakeConfig {
            clone_time,
            task_time,
            boot_time: Duration::ZERO,
            guest_files,
            ..FakeConfig::default()
        });
        let ours = self.our_binaries();
        let mut rows = Vec::new();
        let mut last_prepare_log = String::new();
        let mut job_id = 7_000_000u64;
        let boot_delays = self.options.boot_delays.clone();
        // Every (binary, boot delay) pair once per round, in a rotating order.
        let pairs: Vec<(usize, Duration)> = (0..ours.len())
            .flat_map(|which| boot_delays.iter().map(move |boot| (which, *boot)))
            .collect();
        for round in 0..self.options.prepare_rounds {
            for step in 0..pairs.len() {
                let (which, boot) = pairs[(round + step) % pairs.len()];
                let (name, bin) = &ours[which];
                fake.set_boot_time(boot);
                job_id += 1;
                let job = tempfile::tempdir().expect("job dir");
                let mut hook = Hook::new(bin, job.path());
                for (name, value) in fake.settings_env() {
                    hook = hook.host_env(name, value);
                }
                let hook = hook
                    .host_env("VM_SSH_PRIVATE_KEY", self.key.private_text.clone())
                    .host_env("VM_SSH_USER", "root")
                    .host_env("VM_SSH_PORT", self.sshd.port().to_string())
                    .host_env("VM_NETWORK_CIDRS", "127.0.0.0/8")
                    .host_env("VM_BOOT_TIMEOUT", "120")
                    .host_env("PROXMOX_VMID_RANGE", "2000000-2999999")
                    .path_env(ssh_job::NO_SSH_PATH)
                    .job_var("CI_JOB_ID", job_id.to_string())
                    .job_var("CI_PROJECT_PATH_SLUG", "group-project");

                let command = hook.clone().arg("prepare").command();
                let simulated = fake.simulated_time();
                let prepare = measure(command, None).expect_success("prepare");
                let prepare_simulated = fake.simulated_time() - simulated;
                self.note_rss(&format!("prepare, {name}"), &prepare);
                if which == 0 {
                    last_prepare_log = without_ansi_colours(&prepare.stderr);
                }

                let command = hook.clone().arg("cleanup").command();
                let simulated = fake.simulated_time();
                let cleanup = measure(command, None).expect_success("cleanup");
                let cleanup_simulated = fake.simulated_time() - simulated;
                self.note_rss(&format!("cleanup, {name}"), &cleanup);
                assert!(
                    fake.job_vms().is_empty(),
                    "cleanup left a VM: {:?}",
                    fake.job_vms()
                );
                rows.push((
                    which,
                    boot,
                    prepare.wall,
                    prepare_simulated,
                    cleanup.wall,
                    cleanup_simulated,
                ));
            }
        }

        let report = &mut self.report;
        let _ = writeln!(report, "## 3. Prepare overhead and 4. cleanup overhead\n");
        let _ = writeln!(
            report,
            "The fake Proxmox simulates a linked clone of {} and start/stop/delete tasks of {} \
             each, plus the boot delay (until the guest agent answers). Overhead = wall time of \
             the hook minus the simulated time the fake served during it (`simulated_time()` \
             delta). prepare includes reading the host key through the agent, the SSH \
             connection to the (already listening) sshd and the runner-helper check. {} rounds \
             per boot delay, interleaved.\n",
            ms(clone_time),
            ms(task_time),
            self.options.prepare_rounds
        );
        let _ = writeln!(
            report,
            "| driver | boot delay | prepare wall (median) | simulated | **prepare overhead** median (min–max) | cleanup wall (median) | simulated | **cleanup overhead** median (min–max) |\n|---|---|---|---|---|---|---|---|"
        );
        let mut prepare_ok = true;
        let mut cleanup_ok = true;
        let baseline = baseline_index(&ours);
        // (which, boot, prepare wall, prepare overhead, cleanup wall, cleanup overhead) medians.
        let mut medians: Vec<(usize, Duration, Duration, f64, Duration, f64)> = Vec::new();
        for ((which, boot), (name, _)) in pairs
            .iter()
            .zip(ours.iter().flat_map(|o| boot_delays.iter().map(move |_| o)))
        {
            let mine: Vec<_> = rows
                .iter()
                .filter(|row| row.0 == *which && row.1 == *boot)
                .map(|row| (row.1, row.2, row.3, row.4, row.5))
                .collect();
            let overhead =
                |wall: Duration, simulated: Duration| wall.as_secs_f64() - simulated.as_secs_f64();
            let mut prepare_over: Vec<f64> = mine.iter().map(|r| overhead(r.1, r.2)).collect();
            let mut cleanup_over: Vec<f64> = mine.iter().map(|r| overhead(r.3, r.4)).collect();
            let prepare_wall = summarize(&mine.iter().map(|r| r.1).collect::<Vec<_>>());
            let cleanup_wall = summarize(&mine.iter().map(|r| r.3).collect::<Vec<_>>());
            let (p_med, p_min, p_max) = median_min_max(&mut prepare_over);
            let (c_med, c_min, c_max) = median_min_max(&mut cleanup_over);
            if Some(*which) != baseline {
                prepare_ok &= p_med <= 0.300;
                cleanup_ok &= c_med <= 0.200;
            }
            medians.push((
                *which,
                *boot,
                prepare_wall.median,
                p_med,
                cleanup_wall.median,
                c_med,
            ));
            let _ = writeln!(
                report,
                "| {name} | {} s | {} | {} | **{}** ({}–{}) | {} | {} | **{}** ({}–{}) |",
                boot.as_secs_f64(),
                ms(prepare_wall.median),
                ms(mine[0].2),
                signed_ms(p_med),
                signed_ms(p_min),
                signed_ms(p_max),
                ms(cleanup_wall.median),
                ms(mine[0].4),
                signed_ms(c_med),
                signed_ms(c_min),
                signed_ms(c_max),
            );
        }
        if let Some(b) = baseline {
            let _ = writeln!(
                report,
                "\n| ours / baseline | boot delay | prepare wall | prepare overhead | cleanup \
                 wall | cleanup overhead |\n|---|---|---|---|---|---|"
            );
            let fraction = |ours: f64, theirs: f64| {
                if theirs > 0.0 {
                    format!("{:.2}×", ours / theirs)
                } else {
                    "–".into()
                }
            };
            for row in medians.iter().filter(|row| row.0 != b) {
                let Some(base) = medians.iter().find(|m| m.0 == b && m.1 == row.1) else {
                    continue;
                };
                let _ = writeln!(
                    report,
                    "| {} | {} s | {} | {} ({} vs {}) | {} | {} ({} vs {}) |",
                    ours[row.0].0,
                    row.1.as_secs_f64(),
                    ratio(row.2, base.2),
                    fraction(row.3, base.3),
                    signed_ms(row.3),
                    signed_ms(base.3),
                    ratio(row.4, base.4),
                    fraction(row.5, base.5),
                    signed_ms(row.5),
                    signed_ms(base.5),
                );
            }
        }
        let _ = writeln!(
            report,
            "\nTargets: prepare overhead ≤ 300 ms: **{}**; cleanup overhead ≤ 200 ms: **{}**\n",
            verdict(prepare_ok),
            verdict(cleanup_ok)
        );
        let _ = writeln!(
            report,
            "<details><summary>prepare's job log (last round)</summary>\n\n```text\n{}```\n</details>\n",
            last_prepare_log
        );
    }

    fn resources(&mut self) {
        let static_bin = self.options.static_bin.clone();
        let report = &mut self.report;
        let _ = writeln!(report, "## 5. Resources\n");
        let _ = writeln!(
            report,
            "Peak RSS (wait4 `ru_maxrss`, highest over all rounds); \"ours\" is `{}`:\n",
            self.options.bin.display()
        );
        let _ = writeln!(report, "| hook | peak RSS |\n|---|---|");
        let mut worst = 0;
        for (hook, kib) in &self.peak_rss {
            if !hook.ends_with(BASELINE) {
                worst = worst.max(*kib);
            }
            let _ = writeln!(report, "| {hook} | {:.1} MB |", *kib as f64 / 1024.0);
        }
        let _ = writeln!(
            report,
            "\nTarget: peak RSS ≤ 20 MB: **{}**\n",
            verdict(worst <= 20 * 1024)
        );
        match std::fs::metadata(&static_bin) {
            Ok(meta) => {
                let size = meta.len();
                let _ = writeln!(
                    report,
                    "Static release binary `{}`: **{:.2} MB** ({size} bytes), {}.\n\nTarget: ≤ 8 MB: **{}**\n",
                    static_bin.display(),
                    size as f64 / 1e6,
                    describe_elf(&static_bin),
                    verdict(size <= 8_000_000)
                );
            }
            Err(_) => {
                let _ = writeln!(
                    report,
                    "Static release binary: **not built** (`{}` is missing; build it with \
                     `cargo build --release --target x86_64-unknown-linux-musl`).\n",
                    static_bin.display()
                );
            }
        }
    }
}

/// The job log colours warnings (`ESC[33;1m`); markdown shows the escapes as text.
fn without_ansi_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for inner in chars.by_ref() {
                if inner.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Where the baseline (`--baseline-bin`) is among the measured binaries: always last.
fn baseline_index(binaries: &[(String, PathBuf)]) -> Option<usize> {
    binaries.iter().position(|(name, _)| name == BASELINE)
}

fn median_min_max(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// `#!/usr/bin/env bash`, comment padding, `echo stage ok`: exactly STAGE_SCRIPT_SIZE bytes.
fn stage_script_body() -> String {
    let head = "#!/usr/bin/env bash\nset -eo pipefail\n";
    let tail = "echo stage ok\n";
    let mut body = String::from(head);
    let line = format!("# {}\n", "x".repeat(77));
    while body.len() + line.len() + tail.len() <= STAGE_SCRIPT_SIZE {
        body.push_str(&line);
    }
    let rest = STAGE_SCRIPT_SIZE - body.len() - tail.len();
    if rest > 0 {
        body.push('#');
        body.push_str(&"x".repeat(rest.saturating_sub(2)));
        body.push('\n');
    }
    body.push_str(tail);
    assert_eq!(body.len(), STAGE_SCRIPT_SIZE);
    body
}

/// "statically linked" when the ELF file has no program interpreter.
fn describe_elf(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return "unreadable".into();
    };
    let read = |offset: usize, len: usize| -> Option<u64> {
        let slice = bytes.get(offset..offset + len)?;
        let mut value = 0u64;
        for (i, byte) in slice.iter().enumerate() {
            value |= (*byte as u64) << (8 * i);
        }
        Some(value)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return "not a 64-bit ELF file".into();
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (read(0x20, 8), read(0x36, 2), read(0x38, 2))
    else {
        return "truncated ELF header".into();
    };
    let interpreted = (0..phnum).any(|i| {
        read((phoff + i * phentsize) as usize, 4) == Some(3) // PT_INTERP
    });
    if interpreted {
        "dynamically linked (has an ELF interpreter)".into()
    } else {
        "statically linked (no ELF interpreter)".into()
    }
}

// ------------------------------------------------------------------ machine description

fn command_output(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text).trim().to_string()
        }
        Err(err) => format!("unavailable ({err})"),
    }
}

fn machine_description(options: &Options) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut text = String::new();
    let _ = writeln!(text, "| | |\n|---|---|");
    let _ = writeln!(
        text,
        "| date (UTC) | {} |",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    let _ = writeln!(text, "| CPUs (nproc) | {} |", command_output("nproc", &[]));
    let _ = writeln!(text, "| CPU model | {cpu} |");
    let _ = writeln!(text, "| kernel | {} |", command_output("uname", &["-sr"]));
    let _ = writeln!(
        text,
        "| OpenSSH (client and sshd) | {} |",
        command_output("ssh", &["-V"])
    );
    let _ = writeln!(text, "| rustc | {} |", command_output("rustc", &["-V"]));
    let _ = writeln!(
        text,
        "| load average at start (1/5/15 min) | {} |",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(text, "| driver measured | `{}` |", options.bin.display());
    if let Some(baseline) = &options.baseline_bin {
        let _ = writeln!(text, "| baseline driver | `{}` |", baseline.display());
    }
    let _ = writeln!(
        text,
        "| sshd | loopback, ed25519 host key, sessions with an empty `HOME` (no dotfiles), \
         sftp subsystem `{}` |",
        if Path::new(SFTP_SERVER).exists() {
            SFTP_SERVER
        } else {
            "internal-sftp"
        }
    );
    let _ = writeln!(
        text,
        "| mode | {} |",
        if options.smoke {
            "SMOKE (few rounds, small sizes: not for conclusions)"
        } else {
            "full"
        }
    );
    text
}

fn main() {
    let options = Options::parse();
    if let Some(reason) = sshd::unavailable_reason() {
        sshd::skip("driver benchmark", &reason);
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("gpr-bench-")
        .tempdir()
        .expect("scratch dir");
    // The sessions get an empty HOME (testkit): this machine's root has a ~/.bashrc that runs
    // `pyenv init`, hundreds of ms per remote command (bash sources ~/.bashrc for commands run
    // by sshd), which a VM's account does not have. And sftp is the separate
    // /usr/lib/openssh/sftp-server process Debian and Ubuntu configure, not sshd's built-in.
    let mut builder = Sshd::builder();
    if Path::new(SFTP_SERVER).exists() {
        builder = builder.sftp_subsystem(SFTP_SERVER);
    }
    let sshd = builder.start();
    let key = ClientKey::ed25519();
    sshd.authorize(&key);
    // The old method needs the key in a file and the host key in a known_hosts file; the
    // driver gets the key in its environment and the host key from the job state.
    let key_file = scratch.path().join("id_ed25519");
    std::fs::write(&key_file, &key.private_text).expect("write key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let known_hosts = scratch.path().join("known_hosts");
    let known: String = sshd
        .host_key_lines()
        .iter()
        .map(|line| format!("[{}]:{} {line}\n", sshd.host(), sshd.port()))
        .collect();
    std::fs::write(&known_hosts, known).expect("write known_hosts");

    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(report, "## Machine\n\n{}", machine_description(&options));
    let mut bench = Bench {
        options,
        sshd,
        key,
        scratch,
        key_file,
        known_hosts,
        peak_rss: BTreeMap::new(),
        report,
    };
    if bench.options.wants("stage") {
        eprintln!(
            "benchmark: per-stage overhead ({} rounds)",
            bench.options.stage_rounds
        );
        bench.stage_overhead();
    }
    if bench.options.wants("breakdown") {
        eprintln!("benchmark: per-stage breakdown");
        bench.stage_breakdown();
    }
    if bench.options.wants("streaming") {
        eprintln!(
            "benchmark: streaming ({} bytes)",
            bench.options.stream_bytes
        );
        bench.streaming();
    }
    if bench.options.wants("prepare") {
        eprintln!("benchmark: prepare and cleanup");
        bench.prepare_and_cleanup();
    }
    bench.resources();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        bench.report,
        "Load average at the end: {}; the benchmark took {:.0} s.",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    match &bench.options.out {
        Some(path) => {
            write_report(path, &bench.report);
            eprintln!("benchmark: report written to {}", path.display());
        }
        None => println!("{}", bench.report),
    }
}

const BEGIN: &str = "<!-- benchmark output begins: generated by benches/driver.rs -->";
const END: &str = "<!-- benchmark output ends -->";

/// Replaces the generated part of `path` (between the markers), keeping the hand-written rest;
/// a new file gets a title and the markers.
fn write_report(path: &Path, generated: &str) {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let text = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{BEGIN}\n\n{generated}\n{}",
            &existing[..begin],
            &existing[end..]
        ),
        _ => format!("# Benchmarks\n\n{BEGIN}\n\n{generated}\n{END}\n"),
    };
    std::fs::write(path, text).expect("write the report");
}
