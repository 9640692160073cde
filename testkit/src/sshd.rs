//! A real OpenSSH `sshd` for tests: its own config, host keys and authorized_keys in a temp
//! dir, listening on a loopback port, root login with a key only. Killed (with every process
//! it started) on drop.
//!
//! sshd needs root (to log in as a user) and `/usr/sbin/sshd`. Where either is missing, tests
//! print a loud `SKIPPED:` line and pass, unless `GPR_REQUIRE_SSHD=1` (CI sets it): then they
//! fail, so CI can never silently skip them.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::sshkeys::{ClientKey, HostKey};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const REQUIRE_ENV: &str = "GPR_REQUIRE_SSHD";

/// Why a real sshd cannot run here, if it cannot.
pub fn unavailable_reason() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} is not installed (apt-get install openssh-server)"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (sshd must run as root to log users in)".into());
    }
    None
}

/// Reports a test that cannot run here: a loud SKIPPED line, or a failure under
/// `GPR_REQUIRE_SSHD=1`.
#[track_caller]
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1") {
        panic!("{test}: {REQUIRE_ENV}=1 but the test cannot run: {reason}");
    }
    eprintln!("\n*** SKIPPED: {test}: {reason} (set {REQUIRE_ENV}=1 to make this a failure) ***\n");
}

#[derive(Default)]
pub struct SshdBuilder {
    extra_config: Vec<String>,
    session_env: Vec<(String, String)>,
    /// `Subsystem sftp` command; `internal-sftp` unless set.
    sftp_subsystem: Option<String>,
    /// Where it listens; `127.0.0.1` and a free port unless set.
    listen: Option<(Ipv4Addr, u16)>,
}

impl SshdBuilder {
    /// An environment variable for every session (sshd honours only the first `SetEnv` line,
    /// so they are all collected into it).
    pub fn session_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.session_env.push((name.into(), value.into()));
        self
    }

    /// An extra sshd_config line (not `SetEnv`: use [`SshdBuilder::session_env`]).
    pub fn config(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// The `Subsystem sftp` command, e.g. `/usr/lib/openssh/sftp-server` (what Debian and
    /// Ubuntu images run: a process started through the user's shell) instead of sshd's
    /// in-process `internal-sftp`.
    pub fn sftp_subsystem(mut self, command: impl Into<String>) -> Self {
        self.sftp_subsystem = Some(command.into());
        self
    }

    /// Listens on `addr:port` (another loopback address, `127.0.1.7`, is another "VM" on the
    /// same port) instead of a free port on 127.0.0.1.
    pub fn listen(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.listen = Some((addr, port));
        self
    }

    /// Starts sshd, or reports the test as skipped (see [`skip`]) and returns `None`.
    #[track_caller]
    pub fn start_or_skip(self, test: &str) -> Option<Sshd> {
        if let Some(reason) = unavailable_reason() {
            skip(test, &reason);
            return None;
        }
        Some(self.start())
    }

    pub fn start(self) -> Sshd {
        self.try_start()
            .unwrap_or_else(|err| panic!("sshd did not start: {err}"))
    }

    /// [`SshdBuilder::start`], with why it did not start instead of a panic.
    pub fn try_start(self) -> Result<Sshd, String> {
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("gpr-sshd-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let host_keys = [HostKey::ed25519(), HostKey::ecdsa_p256()];
        let mut host_key_lines = Vec::new();
        let mut host_key_config = String::new();
        for (index, key) in host_keys.iter().enumerate() {
            let path = dir.path().join(format!("host_key_{index}"));
            std::fs::write(&path, &key.private_text).expect("write host key");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod host key");
            host_key_config.push_str(&format!("HostKey {}\n", path.display()));
            host_key_lines.push(key.public_line.clone());
        }
        // The shell sshd starts reads ~/.bashrc (Debian's bash does so for ssh sessions): an
        // empty HOME keeps the runner host's own dotfiles out of the measurements, as in a VM.
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("create home");
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, "").expect("write authorized_keys");
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600))
            .expect("chmod authorized_keys");

        let mut last_error = String::new();
        for _ in 0..5 {
            let (addr, port) = self
                .listen
                .unwrap_or_else(|| (Ipv4Addr::LOCALHOST, crate::unused_port()));
            let config = format!(
                "Port {port}\nListenAddress {addr}\n{host_key_config}\
                 PidFile {dir}/sshd.pid\nAuthorizedKeysFile {authorized}\n\
                 PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp {sftp}\nLogLevel ERROR\n\
                 MaxStartups 200\nMaxSessions 50\nPrintMotd no\nUseDNS no\n\
                 SetEnv HOME={home}{session_env}\n{extra}\n",
                home = home.display(),
                session_env = self
                    .session_env
                    .iter()
                    .map(|(name, value)| format!(" {name}={value}"))
                    .collect::<String>(),
                dir = dir.path().display(),
                authorized = authorized.display(),
                extra = self.extra_config.join("\n"),
                sftp = self.sftp_subsystem.as_deref().unwrap_or("internal-sftp"),
            );
            let config_path = dir.path().join("sshd_config");
            std::fs::write(&config_path, config).expect("write sshd_config");
            let log_path = dir.path().join("sshd.log");
            let log = std::fs::File::create(&log_path).expect("create sshd log");
            let child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start sshd");
            let mut child = child;
            match wait_until_accepting(&mut child, addr, port) {
                Ok(()) => {
                    return Ok(Sshd {
                        child,
                        dir,
                        addr,
                        port,
                        host_key_lines,
                        authorized,
                    })
                }
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = format!(
                        "{err}; sshd log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        }
        Err(last_error)
    }
}

fn wait_until_accepting(child: &mut Child, addr: Ipv4Addr, port: u16) -> Result<(), String> {
    crate::poll(Duration::from_secs(20), Duration::from_millis(10), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(format!("sshd exited with {status}")));
        }
        let mut stream = TcpStream::connect((addr, port)).ok()?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut banner = [0u8; 4];
        (stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-").then_some(Ok(()))
    })
    .unwrap_or_else(|| Err("sshd did not accept connections within 20 s".into()))
}

pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    addr: Ipv4Addr,
    port: u16,
    host_key_lines: Vec<String>,
    authorized: PathBuf,
}

impl Sshd {
    pub fn builder() -> SshdBuilder {
        SshdBuilder::default()
    }

    #[track_caller]
    pub fn start_or_skip(test: &str) -> Option<Sshd> {
        SshdBuilder::default().start_or_skip(test)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The loopback address it listens on (`127.0.0.1` unless [`SshdBuilder::listen`]).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// This server as a job's "VM", logged into as root with its host keys pinned.
    pub fn root_target(&self) -> crate::ssh_job::SshTarget {
        crate::ssh_job::SshTarget {
            host: self.host(),
            port: self.port(),
            user: "root".into(),
            host_keys: self.host_key_lines(),
        }
    }

    /// The server's host public keys, OpenSSH lines (what prepare pins).
    pub fn host_key_lines(&self) -> Vec<String> {
        self.host_key_lines.clone()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Its authorized_keys file (read on every login).
    pub fn authorized_keys_path(&self) -> &Path {
        &self.authorized
    }

    /// Adds a client key to the server's authorized_keys (read on every login).
    pub fn authorize(&self, key: &ClientKey) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized)
            .expect("open authorized_keys");
        writeln!(file, "{}", key.public_line).expect("append authorized_keys");
    }

    /// Every process this sshd started (sessions, shells, scripts), deepest last.
    pub fn descendants(&self) -> Vec<(u32, String)> {
        descendants_of(self.child.id())
    }

    /// Simulates the VM dying: SIGKILL to sshd and its session processes at once (so no exit
    /// status can be sent), then to everything they started.
    pub fn crash(&mut self) {
        let all = self.descendants();
        let (sshd, others): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(_, comm)| comm.starts_with("sshd"));
        kill(self.child.id(), libc::SIGKILL);
        for (pid, _) in sshd.iter().chain(others.iter()) {
            kill(*pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    fn kill_everything(&mut self) {
        let all = self.descendants();
        kill(self.child.id(), libc::SIGKILL);
        for (pid, _) in all {
            kill(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// (pid, ppid, comm) of every process.
pub fn process_table() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses and may contain spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if let Some(ppid) = rest.get(1).and_then(|p| p.parse().ok()) {
            out.push((pid, ppid, comm));
        }
    }
    out
}

pub fn descendants_of(root: u32) -> Vec<(u32, String)> {
    let table = process_table();
    let mut children: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
    for (pid, ppid, comm) in table {
        children.entry(ppid).or_default().push((pid, comm));
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        if let Some(kids) = children.get(&pid) {
            for (kid, comm) in kids {
                out.push((*kid, comm.clone()));
                queue.push(*kid);
            }
        }
    }
    out
}

/// Processes whose command line contains `needle` (e.g. a marker argument of a test script).
pub fn processes_with_cmdline(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for (pid, _, _) in process_table() {
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}
