//! An in-process SSH server (russh) for fast tests and for machines without OpenSSH's sshd.
//!
//! It accepts the public keys it is told to, runs `exec` requests locally with `bash -c` (the
//! channel's data on its stdin) in a
//! temp "home" directory, serves the `sftp` subsystem (enough for uploads: realpath, mkdir,
//! lstat/stat, setstat, open/write/fsetstat/close, remove), and reports exit-status or exit-signal.
//! `sudo` is a pass-through shim on the commands' PATH, so the driver's `sudo -n ...` command
//! lines work without root. Knobs let tests drop connections abruptly, freeze them (socket open, silent), refuse the first few
//! connections (a booting VM), and choose whether exit-status comes before or after EOF.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Sig};
use russh_sftp::protocol::{
    Attrs, File, FileAttributes, Handle as SftpHandle, Name, OpenFlags, Status, StatusCode, Version,
};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use crate::ssh_job::SshTarget;
use crate::sshkeys::{ClientKey, HostKey};

/// Shared between the server's tasks and the test.
struct State {
    authorized: Mutex<Vec<PublicKey>>,
    /// Algorithms of verified public-key signatures, e.g. `rsa-sha2-512`.
    auth_algorithms: Mutex<Vec<String>>,
    connections: AtomicUsize,
    refuse_first: AtomicUsize,
    status_before_eof: AtomicBool,
    links: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes every link to stop relaying while keeping its socket open (a hung VM).
    freeze: tokio::sync::watch::Sender<bool>,
    home: PathBuf,
    shim_dir: PathBuf,
}

/// The port of an SSH server on loopback, one for the whole test process, whose host key is no
/// guest's and which accepts no key: a prepare pointed at it fails at the SSH step at once (a
/// host key mismatch is final), where at a closed port it would retry, as for a booting VM,
/// until VM_BOOT_TIMEOUT. For tests that stop at the SSH step.
pub fn impostor_port() -> u16 {
    static IMPOSTOR: std::sync::OnceLock<TestSshServer> = std::sync::OnceLock::new();
    IMPOSTOR.get_or_init(TestSshServer::start).port()
}

pub struct TestSshServer {
    port: u16,
    host_key_line: String,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl TestSshServer {
    pub fn start() -> TestSshServer {
        let dir = tempfile::Builder::new()
            .prefix("gpr-ssh-server-")
            .tempdir()
            .expect("temp dir");
        let home = dir.path().join("home");
        let shim_dir = dir.path().join("bin");
        std::fs::create_dir_all(&home).expect("create home");
        std::fs::create_dir_all(&shim_dir).expect("create shim dir");
        let sudo = shim_dir.join("sudo");
        // `sudo -n [--] cmd args...` → `cmd args...` (the test user's own rights).
        std::fs::write(
            &sudo,
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -n) shift;; --) shift; break;; \
             -*) shift;; *) break;; esac; done\nexec \"$@\"\n",
        )
        .expect("write sudo shim");
        std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o755))
            .expect("chmod sudo shim");

        let host = HostKey::ed25519();
        let host_key =
            PrivateKey::from_openssh(&host.private_text).expect("parse generated host key");
        let config = Arc::new(russh::server::Config {
            keys: vec![host_key],
            auth_rejection_time: std::time::Duration::from_millis(5),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            ..Default::default()
        });
        let state = Arc::new(State {
            authorized: Mutex::new(Vec::new()),
            auth_algorithms: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            refuse_first: AtomicUsize::new(0),
            status_before_eof: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            freeze: tokio::sync::watch::channel(false).0,
            home,
            shim_dir,
        });
        // Built on a thread of its own, so that async tests (already inside a runtime) can
        // start a server too.
        let (runtime, listener) = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime");
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                .expect("bind loopback");
            (runtime, listener)
        })
        .join()
        .expect("start the server runtime");
        let port = listener.local_addr().expect("local addr").port();
        let accept_state = state.clone();
        runtime.spawn(async move {
            while let Ok((socket, peer)) = listener.accept().await {
                let seen = accept_state.connections.fetch_add(1, Ordering::SeqCst);
                if seen < accept_state.refuse_first.load(Ordering::SeqCst) {
                    // A booting VM: the port is open but the connection is cut at once.
                    drop(socket);
                    continue;
                }
                serve(config.clone(), accept_state.clone(), socket, peer);
            }
        });
        TestSshServer {
            port,
            host_key_line: host.public_line,
            state,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host_key_lines(&self) -> Vec<String> {
        vec![self.host_key_line.clone()]
    }

    /// The login user's home: where relative SFTP paths and commands start.
    pub fn home(&self) -> &Path {
        &self.state.home
    }

    /// Puts `script` on the commands' PATH as `name`, ahead of the system's (e.g. an
    /// `install` that refuses, so a test sees what was uploaded without it landing in
    /// `/usr/local/bin` of the machine running the tests).
    pub fn shim(&self, name: &str, script: &str) {
        let path = self.state.shim_dir.join(name);
        std::fs::write(&path, script).expect("write shim");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod shim");
    }

    pub fn target(&self) -> SshTarget {
        SshTarget {
            host: "127.0.0.1".into(),
            port: self.port,
            user: "tester".into(),
            host_keys: self.host_key_lines(),
        }
    }

    pub fn authorize(&self, key: &ClientKey) {
        let public = PublicKey::from_openssh(&key.public_line).expect("parse client public key");
        self.state.authorized.lock().unwrap().push(public);
    }

    /// Signature algorithms of the successful public-key logins so far.
    pub fn auth_algorithms(&self) -> Vec<String> {
        self.state.auth_algorithms.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Cut the next `n` connections right after accepting them.
    pub fn refuse_first(&self, n: usize) {
        let already = self.connections();
        self.state.refuse_first.store(already + n, Ordering::SeqCst);
    }

    /// Send exit-status before EOF (default: after).
    pub fn status_before_eof(&self, yes: bool) {
        self.state.status_before_eof.store(yes, Ordering::SeqCst);
    }

    /// Every open connection goes silent, its TCP socket left open: a VM that hangs (or a
    /// network that drops packets). Only keepalives can notice that.
    pub fn freeze(&self) {
        self.state.freeze.send_replace(true);
    }

    /// Cuts every open connection abruptly (as when the VM dies).
    pub fn drop_connections(&self) {
        for link in self.state.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

impl Drop for TestSshServer {
    fn drop(&mut self) {
        self.drop_connections();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One connection: the SSH session runs on one end of an in-memory pipe, a task we own copies
/// between it and the socket, so that aborting that task cuts the TCP connection abruptly.
fn serve(
    config: Arc<russh::server::Config>,
    state: Arc<State>,
    socket: tokio::net::TcpStream,
    _peer: SocketAddr,
) {
    let _ = socket.set_nodelay(true);
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let handler = Connection {
        state: state.clone(),
        channels: HashMap::new(),
    };
    tokio::spawn(async move {
        if let Ok(session) = russh::server::run_stream(config, ours, handler).await {
            let _ = session.await;
        }
    });
    let mut frozen = state.freeze.subscribe();
    let link = tokio::spawn(async move {
        let mut socket = socket;
        let mut theirs = theirs;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut socket, &mut theirs) => {}
            _ = async { frozen.wait_for(|frozen| *frozen).await.is_ok() } => {
                // Hold the socket open, relay nothing, until the server is dropped.
                std::future::pending::<()>().await;
            }
        }
    });
    state.links.lock().unwrap().push(link);
}

struct Connection {
    state: Arc<State>,
    channels: HashMap<ChannelId, Channel<Msg>>,
}

fn signal_of(number: i32) -> Sig {
    match number {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(format!("SIG{other}")),
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let known = self
            .state
            .authorized
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.key_data() == key.public_key.key_data());
        if known {
            self.state
                .auth_algorithms
                .lock()
                .unwrap()
                .push(key.algorithm.to_string());
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let path = format!(
            "{}:{}",
            self.state.shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let child = tokio::process::Command::new("/bin/bash")
            .arg("-c")
            .arg(&command)
            .current_dir(&self.state.home)
            .env("HOME", &self.state.home)
            .env("PATH", path)
            // Like sshd: the channel's data is the command's stdin, its EOF closes it.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(_) => {
                session.channel_failure(channel)?;
                return Ok(());
            }
        };
        session.channel_success(channel)?;
        if let (Some(mut stdin), Some(mut stream)) =
            (child.stdin.take(), self.channels.remove(&channel))
        {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Some(message) = stream.wait().await {
                    match message {
                        russh::ChannelMsg::Data { data }
                            if stdin.write_all(&data).await.is_ok() => {}
                        russh::ChannelMsg::Data { .. }
                        | russh::ChannelMsg::Eof
                        | russh::ChannelMsg::Close => break,
                        _ => {}
                    }
                }
            });
        }
        let handle = session.handle();
        let status_first = self.state.status_before_eof.load(Ordering::SeqCst);
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let out_handle = handle.clone();
            let pump_out = async move {
                let mut buffer = vec![0u8; 32 * 1024];
                while let Ok(n) = stdout.read(&mut buffer).await {
                    if n == 0
                        || out_handle
                            .data(channel, buffer[..n].to_vec())
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            };
            let err_handle = handle.clone();
            let pump_err = async move {
                let mut buffer = vec![0u8; 32 * 1024];
                while let Ok(n) = stderr.read(&mut buffer).await {
                    if n == 0
                        || err_handle
                            .extended_data(channel, 1, buffer[..n].to_vec())
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            };
            let report = |status: std::process::ExitStatus| {
                let handle = handle.clone();
                async move {
                    match (status.code(), status.signal()) {
                        (Some(code), _) => {
                            let _ = handle.exit_status_request(channel, code as u32).await;
                        }
                        (None, Some(signal)) => {
                            let _ = handle
                                .exit_signal_request(
                                    channel,
                                    signal_of(signal),
                                    false,
                                    String::new(),
                                    String::new(),
                                )
                                .await;
                        }
                        _ => {}
                    }
                }
            };
            if status_first {
                let (status, _, _) = tokio::join!(child.wait(), pump_out, pump_err);
                if let Ok(status) = status {
                    report(status).await;
                }
                let _ = handle.eof(channel).await;
            } else {
                tokio::join!(pump_out, pump_err);
                let _ = handle.eof(channel).await;
                if let Ok(status) = child.wait().await {
                    report(status).await;
                }
            }
            let _ = handle.close(channel).await;
        });
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&channel)) {
            ("sftp", Some(stream)) => {
                session.channel_success(channel)?;
                russh_sftp::server::run(
                    stream.into_stream(),
                    Sftp {
                        home: self.state.home.clone(),
                        files: HashMap::new(),
                        next: 0,
                    },
                )
                .await;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }
}

/// The SFTP side: the real file system, relative paths from the home directory.
struct Sftp {
    home: PathBuf,
    files: HashMap<String, std::fs::File>,
    next: u64,
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn code_of(err: std::io::Error) -> StatusCode {
    match err.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    }
}

impl Sftp {
    fn path(&self, path: &str) -> PathBuf {
        if path.is_empty() || path == "." {
            self.home.clone()
        } else {
            self.home.join(path)
        }
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let full = self.path(&path);
        let resolved = std::fs::canonicalize(&full).unwrap_or(full);
        Ok(Name {
            id,
            files: vec![File::dummy(resolved.to_string_lossy())],
        })
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        std::fs::create_dir(&path).map_err(code_of)?;
        if let Some(mode) = attrs.permissions {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(code_of)?;
        }
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = std::fs::symlink_metadata(self.path(&path)).map_err(code_of)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = std::fs::metadata(self.path(&path)).map_err(code_of)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        if let Some(mode) = attrs.permissions {
            std::fs::set_permissions(
                self.path(&path),
                std::fs::Permissions::from_mode(mode & 0o7777),
            )
            .map_err(code_of)?;
        }
        Ok(ok(id))
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<SftpHandle, Self::Error> {
        let mut options = std::fs::OpenOptions::new();
        options
            .read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.unwrap_or(0o666) & 0o7777);
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        let file = options.open(self.path(&filename)).map_err(code_of)?;
        self.next += 1;
        let handle = self.next.to_string();
        self.files.insert(handle.clone(), file);
        Ok(SftpHandle { id, handle })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.files.get(&handle).ok_or(StatusCode::Failure)?;
        file.write_all_at(&data, offset).map_err(code_of)?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.files.get(&handle).ok_or(StatusCode::Failure)?;
        if let Some(mode) = attrs.permissions {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(code_of)?;
        }
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        std::fs::remove_file(self.path(&filename)).map_err(code_of)?;
        Ok(ok(id))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        self.files.remove(&handle).ok_or(StatusCode::Failure)?;
        Ok(ok(id))
    }
}
