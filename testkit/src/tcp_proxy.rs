//! A loopback TCP proxy between the driver and a test's "VM" (a local sshd), that a test can
//! tell to misbehave the way a network does when a VM vanishes:
//!
//! - [`TcpProxy::black_hole`]: every open connection stays open but carries nothing either way
//!   (bytes are read and dropped), and new connections are accepted and treated the same. To
//!   both ends it looks like a crashed guest or a cut link: no RST, no FIN, only silence.
//! - [`TcpProxy::refuse_new`]: open connections keep forwarding, new ones are reset at once
//!   (an sshd restarting).
//! - [`TcpProxy::forward`]: back to normal for new connections (a blip that ends).
//!
//! Plain threads and blocking sockets: the proxy must keep working while a test thread is
//! blocked, and it never shares a runtime with the code under test.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

const FORWARD: u8 = 0;
const BLACK_HOLE: u8 = 1;
const REFUSE_NEW: u8 = 2;

#[derive(Default)]
struct Shared {
    mode: AtomicU8,
    stopping: AtomicBool,
    accepted: AtomicUsize,
    /// Both ends of every connection, to shut them down when the proxy is dropped.
    sockets: Mutex<Vec<TcpStream>>,
}

pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on an ephemeral 127.0.0.1 port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy's listener");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let acceptor_shared = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("tcp-proxy-{port}"))
            .spawn(move || accept_loop(listener, upstream, acceptor_shared))
            .expect("start the proxy thread");
        TcpProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (including ones that were refused or black-holed).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Open and new connections go silent: bytes are dropped, sockets stay open.
    pub fn black_hole(&self) {
        self.shared.mode.store(BLACK_HOLE, Ordering::SeqCst);
    }

    /// New connections are reset right after they are accepted; open ones keep forwarding.
    pub fn refuse_new(&self) {
        self.shared.mode.store(REFUSE_NEW, Ordering::SeqCst);
    }

    /// Forwards again (connections black-holed meanwhile have lost their bytes for good).
    pub fn forward(&self) {
        self.shared.mode.store(FORWARD, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let Ok(sockets) = self.shared.sockets.lock() {
            for socket in sockets.iter() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        match shared.mode.load(Ordering::SeqCst) {
            REFUSE_NEW => {
                reset(&client);
                continue;
            }
            BLACK_HOLE => {
                // Keep it open, never connect upstream: the SYN was "answered" by the proxy,
                // but nothing behind it ever speaks.
                remember(&shared, &client);
                let sink = shared.clone();
                thread::spawn(move || pump(client, None, sink));
                continue;
            }
            _ => {}
        }
        let Ok(server) = TcpStream::connect(upstream) else {
            reset(&client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        remember(&shared, &client);
        remember(&shared, &server);
        let (Ok(client_reader), Ok(server_reader)) = (client.try_clone(), server.try_clone())
        else {
            continue;
        };
        let up = shared.clone();
        let down = shared.clone();
        thread::spawn(move || pump(client_reader, Some(server), up));
        thread::spawn(move || pump(server_reader, Some(client), down));
    }
}

fn remember(shared: &Shared, socket: &TcpStream) {
    if let (Ok(copy), Ok(mut sockets)) = (socket.try_clone(), shared.sockets.lock()) {
        sockets.push(copy);
    }
}

/// SO_LINGER 0 then close: the peer gets an RST, as from a port nobody listens on any more.
fn reset(socket: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Copies `from` to `to` while the proxy forwards; drops the bytes once it black-holes. Ends
/// when `from` closes (the other end is then half-closed, as TCP would).
fn pump(mut from: TcpStream, mut to: Option<TcpStream>, shared: Arc<Shared>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.mode.load(Ordering::SeqCst) == BLACK_HOLE {
            continue;
        }
        if let Some(out) = to.as_mut() {
            if out.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
    }
    if shared.mode.load(Ordering::SeqCst) != BLACK_HOLE {
        if let Some(out) = to {
            let _ = out.shutdown(Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let mut writer = stream;
                    let _ = std::io::copy(&mut reader, &mut writer);
                });
            }
        });
        address
    }

    fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text)?;
        let mut answer = vec![0u8; text.len()];
        stream.read_exact(&mut answer)?;
        Ok(answer)
    }

    #[test]
    fn forwards_then_goes_silent_without_closing_then_refuses() {
        let proxy = TcpProxy::start(echo_server());
        let mut open = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        assert_eq!(round_trip(&mut open, b"ping").unwrap(), b"ping");

        proxy.black_hole();
        open.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let silent = round_trip(&mut open, b"lost").unwrap_err();
        assert!(
            matches!(
                silent.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{silent:?}"
        );
        // A new connection is accepted but nothing answers either.
        let mut new = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        new.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(round_trip(&mut new, b"anyone?").is_err());

        proxy.refuse_new();
        let mut refused = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        refused
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        let outcome = refused.read(&mut byte);
        assert!(
            matches!(outcome, Ok(0) | Err(_)),
            "a refused connection carried data: {outcome:?}"
        );

        proxy.forward();
        let mut again = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        assert_eq!(round_trip(&mut again, b"back").unwrap(), b"back");
        assert_eq!(proxy.connections(), 4);
    }
}
