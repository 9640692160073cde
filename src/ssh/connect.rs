//! One TCP connection to the VM's sshd: key exchange, host-key pinning, public-key auth.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, AuthResult};
use russh::keys::{Algorithm, HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{cipher, kex, Preferred};
use tokio::sync::watch;

use super::{describe_target, Connection, HostKeyCheck, PrivateKey, Target};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::joblog;
use crate::poll::Poll;

/// Key exchange, cheapest first. Every stage is a new connection, so the kex runs once per
/// stage and its CPU cost is per-stage overhead. curve25519-sha256 is one X25519 operation per
/// side; the post-quantum hybrid mlkem768x25519-sha256 adds an ML-KEM encapsulation and ~2 KB
/// of extra handshake, and OpenSSH's sntrup761x25519 (which russh does not implement) is far
/// costlier still. The traffic is a CI job's scripts and logs on the hypervisor's network, and
/// the VM lives minutes, so "harvest now, decrypt decades later" is not worth a per-stage cost;
/// the hybrid stays in the list for servers that offer nothing classical. Finite-field DH is a
/// last resort (slow, and only for very old servers). The ext-info / strict-kex pseudo
/// algorithms must stay: ext-info-c gets us `server-sig-algs` (rsa-sha2-* for RSA keys), and
/// strict kex closes the Terrapin prefix-truncation attack.
const KEX_ORDER: &[kex::Name] = &[
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::MLKEM768X25519_SHA256,
    kex::ECDH_SHA2_NISTP256,
    kex::DH_G16_SHA512,
    kex::DH_G14_SHA256,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
];

/// AES-GCM first: with the ring backend it uses the CPU's AES instructions and outruns the
/// portable ChaCha20-Poly1305 on large outputs (both are AEADs, equally sound).
const CIPHER_ORDER: &[cipher::Name] = &[
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_128_CTR,
];

/// How a dead VM (or network) is noticed while a stage runs: after the keepalive interval
/// (`VM_SSH_KEEPALIVE_INTERVAL`, default 3 s) without a byte from the VM, russh sends a
/// keepalive, then one every interval, and gives up when the next one falls due with
/// `KEEPALIVE_MAX` unanswered: after [`silence_budget`] (3 s × 6 = 18 s) of complete silence,
/// inside the 20 s the job may lose.
///
/// Why this does not kill healthy stages on a loaded host: what must arrive is *any* byte from
/// the VM in 18 s, and the keepalive reply is sent by sshd itself, not by the job's processes.
/// A stage that prints nothing (a long compile, a quiet test suite) is kept alive by the
/// replies alone. On a guest with every CPU pegged, sshd is one runnable process among many
/// and CFS gives it a slice within milliseconds; even a guest that swaps hard or whose vCPUs
/// are starved by the node stalls for a few seconds, not 18. TCP retransmits any probe or reply
/// that is dropped (its first retransmission timeout is about 1 s), so a lossy link costs
/// seconds too. A guest that cannot get one packet out in 18 s is not going to finish its job.
/// Short intervals cost nothing on a chatty stage (any output resets the timer) and one small
/// packet every 3 s on a quiet one. The old budget (10 s × 5) let a vanished VM hold the job
/// for 50 s per stage.
pub use crate::config::DEFAULT_KEEPALIVE_INTERVAL;
const KEEPALIVE_MAX: usize = 5;
/// The runner host's interval, once per process: every connection of a hook (or of the pool
/// service) is to the VMs of the one runner host whose settings it loaded, and connections are
/// made deep inside prepare, claims and stages, which never see the settings.
static KEEPALIVE_INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets the keepalive interval from the runner host's settings, before the first connection;
/// later calls change nothing.
pub fn set_keepalive_interval(interval: Duration) {
    let _ = KEEPALIVE_INTERVAL.set(interval);
}

fn keepalive_interval() -> Duration {
    KEEPALIVE_INTERVAL
        .get()
        .copied()
        .unwrap_or(DEFAULT_KEEPALIVE_INTERVAL)
}

/// Silence after which a connection is declared dead (see above).
pub(super) fn silence_budget() -> Duration {
    keepalive_interval() * (KEEPALIVE_MAX as u32 + 1)
}
/// Our receive window per channel. Large, so that a chatty build's output streams at full speed
/// instead of stalling on window adjustments every 2 MB.
const WINDOW_SIZE: u32 = 16 * 1024 * 1024;
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn client_config(host_key_algorithms: Vec<Algorithm>) -> Arc<client::Config> {
    Arc::new(client::Config {
        client_id: russh::SshId::Standard(Cow::Borrowed(concat!(
            "SSH-2.0-gitlab-proxmox-runner_",
            env!("CARGO_PKG_VERSION")
        ))),
        preferred: Preferred {
            kex: Cow::Borrowed(KEX_ORDER),
            key: Cow::Owned(host_key_algorithms),
            cipher: Cow::Borrowed(CIPHER_ORDER),
            ..Preferred::default()
        },
        keepalive_interval: Some(keepalive_interval()),
        keepalive_max: KEEPALIVE_MAX,
        inactivity_timeout: None,
        window_size: WINDOW_SIZE,
        maximum_packet_size: 32768,
        channel_buffer_size: 256,
        nodelay: true,
        ..client::Config::default()
    })
}

/// Host-key algorithms to ask for: only the types we have pinned (so a server with several
/// host keys presents the one we can check), every sound type on first use.
fn host_key_algorithms(pinned: Option<&[PublicKey]>) -> Vec<Algorithm> {
    let Some(pinned) = pinned else {
        return Preferred::default()
            .key
            .iter()
            .filter(|algorithm| !matches!(algorithm, Algorithm::Rsa { hash: None }))
            .cloned()
            .collect();
    };
    let mut out = Vec::new();
    for key in pinned {
        let algorithms = match key.algorithm() {
            Algorithm::Rsa { .. } => vec![
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512),
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256),
                },
            ],
            other => vec![other],
        };
        for algorithm in algorithms {
            if !out.contains(&algorithm) {
                out.push(algorithm);
            }
        }
    }
    out
}

/// `SHA256:...` of an OpenSSH public key line, or `None` when it does not parse.
pub fn fingerprint_of_line(line: &str) -> Option<String> {
    parse_public_key_line(line).map(|key| key.fingerprint(HashAlg::Sha256).to_string())
}

/// `type base64 [comment]`, also with known_hosts-style leading fields (`[host]:port type ...`).
fn parse_public_key_line(line: &str) -> Option<PublicKey> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields
        .windows(2)
        .find_map(|pair| PublicKey::from_openssh(&format!("{} {}", pair[0], pair[1])).ok())
}

pub(crate) struct ClientHandler {
    /// `None`: first use, accept what is presented.
    pinned: Option<Vec<PublicKey>>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    /// Why the session ended, for a stage whose channel closed without an exit status.
    ended: watch::Sender<Option<SessionEnd>>,
}

/// How an established session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Nothing came back: keepalives went unanswered, or TCP gave up (timed out, no route).
    /// The VM vanished or the network to it did; trying again at once is pointless.
    Silent(String),
    /// Closed or reset by the VM (or something on the way): it was there to do so.
    Closed(String),
}

fn session_end_of(err: &russh::Error) -> SessionEnd {
    use std::io::ErrorKind as K;
    match err {
        russh::Error::KeepaliveTimeout => SessionEnd::Silent(format!(
            "it stopped answering: nothing arrived for {} s and {KEEPALIVE_MAX} keepalives went \
             unanswered",
            silence_budget().as_secs()
        )),
        russh::Error::IO(io)
            if matches!(
                io.kind(),
                K::TimedOut | K::HostUnreachable | K::NetworkUnreachable
            ) =>
        {
            SessionEnd::Silent(format!("it stopped answering: {io}"))
        }
        other => SessionEnd::Closed(other.to_string()),
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        // We never advertise certificate algorithms, so a certificate here is a protocol error.
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            return Ok(false);
        };
        if let Ok(mut presented) = self.presented.lock() {
            *presented = Some(key.clone());
        }
        Ok(match &self.pinned {
            None => true,
            Some(pinned) => pinned.iter().any(|p| p.key_data() == key.key_data()),
        })
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> std::result::Result<(), Self::Error> {
        let (end, result) = match reason {
            // The VM's own words are not repeated: they are text a job controls.
            client::DisconnectReason::ReceivedDisconnect(_) => (
                SessionEnd::Closed("the VM's sshd closed the connection".into()),
                Ok(()),
            ),
            client::DisconnectReason::Error(err) => (session_end_of(&err), Err(err)),
        };
        self.ended.send_replace(Some(end));
        result
    }
}

/// Why one connection attempt failed, and whether waiting for the VM may fix it.
pub(super) struct ConnectFailure {
    pub error: Error,
    /// Refused/reset/timed out/handshake cut short, or the key not (yet) authorized: normal
    /// while a VM boots and cloud-init runs.
    pub transient: bool,
}

pub(super) async fn connect(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
) -> Result<Connection> {
    attempt(target, &key, check).await.map_err(|f| f.error)
}

fn io_is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        err.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::TimedOut
            | K::UnexpectedEof
            | K::BrokenPipe
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::AddrNotAvailable
    )
}

async fn attempt(
    target: &Target,
    key: &PrivateKey,
    check: &HostKeyCheck,
) -> std::result::Result<Connection, ConnectFailure> {
    let where_ = describe_target(target);
    let fatal = |error: Error| ConnectFailure {
        error,
        transient: false,
    };
    let pinned = match check {
        HostKeyCheck::FirstUse => None,
        HostKeyCheck::Pinned(lines) => {
            let keys: Vec<PublicKey> = lines
                .iter()
                .filter_map(|line| parse_public_key_line(line))
                .collect();
            if keys.is_empty() {
                return Err(fatal(Error::ssh(
                    format!("connecting to {where_}"),
                    "no usable pinned host key in the job state (prepare stores the VM's host \
                     keys there); refusing to connect blindly",
                )));
            }
            Some(keys)
        }
    };
    let config = client_config(host_key_algorithms(pinned.as_deref()));
    let presented = Arc::new(Mutex::new(None));
    let (ended, ended_receiver) = watch::channel(None);
    let handler = ClientHandler {
        pinned: pinned.clone(),
        presented: presented.clone(),
        ended,
    };

    let tcp = tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| ConnectFailure {
        error: Error::ssh(
            format!("connecting to {where_}"),
            format!(
                "no answer within {} s; check that the VM is up and port {} is reachable from \
                 the runner host",
                TCP_CONNECT_TIMEOUT.as_secs(),
                target.port
            ),
        ),
        transient: true,
    })?
    .map_err(|err| ConnectFailure {
        transient: io_is_transient(&err),
        error: Error::ssh(format!("connecting to {where_}"), err),
    })?;
    let _ = tcp.set_nodelay(true);

    let session = async {
        let mut handle = client::connect_stream(config, tcp, handler).await?;
        let hash = rsa_hash(&handle, key).await?;
        let auth = handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(key.key.clone(), hash),
            )
            .await?;
        Ok::<_, russh::Error>((handle, auth))
    };
    let (handle, auth) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, session).await {
        Err(_) => {
            return Err(ConnectFailure {
                error: Error::ssh(
                    format!("SSH handshake with {where_}"),
                    format!(
                        "no progress within {} s; is sshd overloaded or is something else \
                         listening on port {}?",
                        HANDSHAKE_TIMEOUT.as_secs(),
                        target.port
                    ),
                ),
                transient: true,
            })
        }
        Ok(Err(err)) => {
            let seen = presented.lock().ok().and_then(|guard| guard.clone());
            return Err(classify_handshake_error(err, &where_, target, pinned, seen));
        }
        Ok(Ok(done)) => done,
    };
    match auth {
        AuthResult::Success => {}
        AuthResult::Failure {
            remaining_methods, ..
        } => {
            return Err(ConnectFailure {
                error: Error::AuthRefused {
                    context: format!("authenticating as {:?} to {where_}", target.user),
                    message: format!(
                        "the VM refused the {} key {}; check that its public half is in \
                         ~{}/.ssh/authorized_keys in the template (or cloud-init's ssh keys) \
                         and that VM_SSH_USER is right (server offers: {})",
                        key.key.algorithm(),
                        key.fingerprint(),
                        target.user,
                        remaining_methods
                            .iter()
                            .map(<&str>::from)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
                // cloud-init may still be writing authorized_keys.
                transient: true,
            });
        }
    }
    let host_key = presented
        .lock()
        .ok()
        .and_then(|guard| guard.clone())
        .and_then(|key| key.to_openssh().ok())
        .unwrap_or_default();
    Ok(Connection {
        handle,
        host_key,
        target: target.clone(),
        ended: ended_receiver,
    })
}

/// RSA keys sign with rsa-sha2-512/256, never the SHA-1 `ssh-rsa`: russh maps a missing hash to
/// SHA-1, so the hash is always chosen here.
async fn rsa_hash(
    handle: &client::Handle<ClientHandler>,
    key: &PrivateKey,
) -> std::result::Result<Option<HashAlg>, russh::Error> {
    if !key.key.algorithm().is_rsa() {
        return Ok(None);
    }
    Ok(match handle.best_supported_rsa_hash().await? {
        Some(Some(hash)) => Some(hash),
        // The server lists only ssh-rsa (SHA-1). Try SHA-256 anyway: if the server really
        // cannot verify it, authentication fails with a clear message instead of falling back.
        Some(None) => Some(HashAlg::Sha256),
        // No server-sig-algs extension (very old servers): SHA-256 is the RFC 8332 default.
        None => Some(HashAlg::Sha256),
    })
}

fn classify_handshake_error(
    err: russh::Error,
    where_: &str,
    target: &Target,
    pinned: Option<Vec<PublicKey>>,
    seen: Option<PublicKey>,
) -> ConnectFailure {
    match err {
        russh::Error::UnknownKey => {
            let presented = seen
                .map(|key| key.fingerprint(HashAlg::Sha256).to_string())
                .unwrap_or_else(|| "(none)".into());
            let expected = pinned
                .unwrap_or_default()
                .iter()
                .map(|key| format!("{} {}", key.algorithm(), key.fingerprint(HashAlg::Sha256)))
                .collect::<Vec<_>>()
                .join(", ");
            ConnectFailure {
                error: Error::HostKeyMismatch {
                    context: format!("host key check for {}", target.vm_label),
                    message: format!(
                        "HOST KEY MISMATCH at {where_}: the server presented {presented}, but \
                         the job pinned {expected}. Refusing to connect: another machine may be \
                         answering at this address (IP reuse or a man in the middle), or the \
                         VM regenerated its host keys after prepare read them"
                    ),
                },
                transient: false,
            }
        }
        russh::Error::NoCommonAlgo { kind, .. } => ConnectFailure {
            error: Error::ssh(
                format!("SSH handshake with {where_}"),
                format!(
                    "no common {kind:?} algorithm with the VM's sshd; it is too old or \
                     restricted (we need curve25519/ECDH kex, AES-GCM or ChaCha20 and an \
                     ed25519/ECDSA/RSA-SHA2 host key)"
                ),
            ),
            transient: false,
        },
        russh::Error::IO(io) => ConnectFailure {
            transient: io_is_transient(&io),
            error: Error::ssh(format!("SSH handshake with {where_}"), io),
        },
        other => ConnectFailure {
            // Connection cut during the handshake: sshd starting, MaxStartups, key
            // regeneration by cloud-init. Worth retrying while waiting for the VM.
            transient: matches!(
                other,
                russh::Error::Disconnect
                    | russh::Error::HUP
                    | russh::Error::ConnectionTimeout
                    | russh::Error::SendError
                    | russh::Error::KexInit
                    | russh::Error::Inconsistent
            ),
            error: Error::ssh(format!("SSH handshake with {where_}"), other),
        },
    }
}

/// How a retrying connect reports itself: prepare announces SSH coming up, a stage does not.
pub(super) struct Patience<'a> {
    pub deadline: Instant,
    /// The setting or rule that set the deadline, for the give-up message.
    pub limit: &'a str,
    pub announce: bool,
    /// A refused key ends the wait at once: the VM is known to be up with its keys in place
    /// (a warm VM), so waiting cannot make it accept the key.
    pub refusal_is_final: bool,
}

/// Why waiting for SSH ended without a connection.
pub(super) struct WaitFailure {
    pub error: Error,
    /// The deadline passed with every attempt failing in a way that waiting might have fixed
    /// (refused, reset, timed out, unreachable): the VM did not answer, as opposed to a host
    /// key mismatch, a bad key or a cancel.
    pub gave_up: bool,
}

pub(super) async fn wait_until_ready(
    target: &Target,
    key: Arc<PrivateKey>,
    check: &HostKeyCheck,
    patience: Patience<'_>,
    cancel: &Cancel,
) -> std::result::Result<Connection, WaitFailure> {
    let Patience {
        deadline,
        limit,
        announce,
        refusal_is_final,
    } = patience;
    // Short pauses: a VM whose sshd starts moments after the guest agent should not wait
    // seconds.
    let mut poll = Poll::doubling(
        deadline,
        Duration::from_millis(100),
        Duration::from_millis(500),
    );
    let where_ = describe_target(target);
    let cancelled = |reason: &str| WaitFailure {
        error: Error::Cancelled(format!(
            "cancelled ({reason}) while waiting for SSH on {where_}"
        )),
        gave_up: false,
    };
    loop {
        // One attempt may not outlast the deadline: a black-holed address would otherwise
        // hold a stage for the whole handshake timeout.
        let bounded = tokio::time::timeout_at(deadline.into(), attempt(target, &key, check));
        let outcome = tokio::select! {
            outcome = bounded => outcome.unwrap_or_else(|_| Err(ConnectFailure {
                error: Error::ssh(
                    format!("connecting to {where_}"),
                    "no answer before the deadline",
                ),
                transient: true,
            })),
            reason = cancel.cancelled() => return Err(cancelled(reason)),
        };
        let failure = match outcome {
            Ok(connection) => {
                if announce {
                    joblog::info(format!(
                        "SSH up on {where_} after {}",
                        joblog::secs(poll.elapsed())
                    ));
                }
                return Ok(connection);
            }
            Err(failure)
                if !failure.transient
                    || (refusal_is_final && failure.error.is_authentication_refused()) =>
            {
                return Err(WaitFailure {
                    error: failure.error,
                    gave_up: false,
                })
            }
            Err(failure) => failure,
        };
        let paused = tokio::select! {
            paused = poll.pause(|waited| {
                joblog::info(format!(
                    "still waiting for SSH on {where_} ({} so far; last: {})",
                    joblog::secs(waited),
                    failure.error
                ))
            }) => paused,
            reason = cancel.cancelled() => return Err(cancelled(reason)),
        };
        if let Err(expired) = paused {
            return Err(WaitFailure {
                error: Error::ssh_within(
                    format!(
                        "waiting for SSH on {where_} (gave up after {}, {limit})",
                        joblog::secs(expired.waited)
                    ),
                    failure.error,
                ),
                gave_up: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_rsa_asks_only_for_sha2_signatures() {
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDUd7r9/O7puKvQ2yx/O89S93xL+q3nbzYOYnP6uRoI0Vz5dXwF3c1KfqafUv84WG137WzNoP2srmwYH/kNRUbVJr8a5OIaU5zlFmGcgkA6mDW+9CMvulbb3dzwM78Afc/4N/LjI3SS9uQdlYlPMIfmnPRoU2lbAWLmPWPBKeZqzyfI1QkkL7Zzfbe4ljgHUhYjtqe4ZARzu12Qvb2ke8hs7AWSwl74Li57X7AopWSUYKSFqVPZtvydP8dAHVFv7knaYbuHcSdtLTXqTxOSiBTGPHgiCOvAEUHlxuPK9awA4HjCHSS/UxB4ZK8YyOJwec5sODMpz600sVQeNOO5H7IH x";
        let pinned = parse_public_key_line(rsa).unwrap();
        assert_eq!(
            host_key_algorithms(Some(&[pinned])),
            vec![
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512)
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256)
                },
            ]
        );
        // A truncated key does not parse: it is never pinned.
        assert!(parse_public_key_line(&rsa[..60]).is_none());
        let first_use = host_key_algorithms(None);
        assert!(!first_use.contains(&Algorithm::Rsa { hash: None }));
        assert_eq!(first_use.first(), Some(&Algorithm::Ed25519));
    }

    #[test]
    fn fingerprints_of_lines_with_comments() {
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEfbnX1MejAxciSpoiwDMBlkBWNtQ3lpuuxrdyRYQuv some comment";
        let fp = fingerprint_of_line(line).unwrap();
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(
            host_key_algorithms(Some(&[parse_public_key_line(line).unwrap()])),
            vec![Algorithm::Ed25519]
        );
        assert_eq!(fingerprint_of_line("garbage"), None);
        let known_hosts = format!("[192.0.2.15]:22 {line}");
        assert_eq!(fingerprint_of_line(&known_hosts), Some(fp));
    }

    #[test]
    fn curve25519_is_negotiated_first_and_extensions_are_kept() {
        assert_eq!(KEX_ORDER[0], kex::CURVE25519);
        assert!(KEX_ORDER.contains(&kex::EXTENSION_SUPPORT_AS_CLIENT));
        assert!(KEX_ORDER.contains(&kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT));
    }
}
