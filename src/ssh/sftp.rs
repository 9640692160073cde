//! Uploads over the SFTP subsystem of the job's one connection (no `scp`, no second login).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Connection;
use crate::error::{Error, Result};

/// Writes in flight at once: enough to keep a LAN link busy while the server acknowledges.
const WRITES_IN_FLIGHT: usize = 16;
/// Well below OpenSSH sftp-server's 256 KiB message limit.
const WRITE_CHUNK: usize = 64 * 1024;
/// The longest SFTP packet accepted from the VM: OpenSSH's own message limit. What we ask
/// for (status, handles, attributes, one realpath name) needs a few hundred bytes.
const MAX_PACKET_FROM_VM: u32 = 256 * 1024;

/// The SFTP channel, checking each packet's length prefix as it passes: russh-sftp allocates
/// whatever length a packet announces (up to 4 GiB) before reading it, and the VM's
/// sftp-server is the job's to replace.
struct BoundedPackets<S> {
    inner: S,
    header: [u8; 4],
    header_filled: usize,
    /// Bytes of the current packet's body still to pass.
    remaining: u64,
}

impl<S> BoundedPackets<S> {
    fn new(inner: S) -> Self {
        BoundedPackets {
            inner,
            header: [0; 4],
            header_filled: 0,
            remaining: 0,
        }
    }

    fn check(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = bytes
                    .len()
                    .min(self.remaining.try_into().unwrap_or(usize::MAX));
                self.remaining -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.header_filled] = bytes[0];
            self.header_filled += 1;
            bytes = &bytes[1..];
            if self.header_filled == self.header.len() {
                self.header_filled = 0;
                let length = u32::from_be_bytes(self.header);
                if length > MAX_PACKET_FROM_VM {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the VM's sftp-server announced a {length}-byte packet (more than \
                             {MAX_PACKET_FROM_VM}); refusing it"
                        ),
                    ));
                }
                self.remaining = u64::from(length);
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BoundedPackets<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        Poll::Ready(this.check(&buf.filled()[before..]))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BoundedPackets<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pub(crate) struct Sftp {
    session: Arc<RawSftpSession>,
    where_: String,
}

impl Sftp {
    pub async fn open(connection: &Connection) -> Result<Sftp> {
        let where_ = connection.describe();
        let fail = |message: String| Error::ssh(format!("starting SFTP on {where_}"), message);
        let channel = connection
            .handle
            .channel_open_session()
            .await
            .map_err(|err| fail(err.to_string()))?;
        channel
            .request_subsystem(false, "sftp")
            .await
            .map_err(|err| fail(err.to_string()))?;
        let session = RawSftpSession::new(BoundedPackets::new(channel.into_stream()));
        session.set_timeout(60);
        session.init().await.map_err(|err| {
            fail(format!(
                "{err}; check that the VM's sshd has the sftp subsystem (Subsystem sftp ... in \
                 sshd_config)"
            ))
        })?;
        Ok(Sftp {
            session: Arc::new(session),
            where_,
        })
    }

    fn error(&self, what: &str, path: &str, err: SftpError) -> Error {
        Error::ssh(
            format!("SFTP {what} {path:?} on {}", self.where_),
            describe_sftp_error(&err),
        )
    }

    /// The absolute form of `path` (`.` is the login user's home directory).
    pub async fn realpath(&self, path: &str) -> Result<String> {
        let name = self
            .session
            .realpath(path)
            .await
            .map_err(|err| self.error("realpath", path, err))?;
        name.files
            .into_iter()
            .next()
            .map(|file| file.filename)
            .ok_or_else(|| {
                Error::ssh(
                    format!("SFTP realpath {path:?} on {}", self.where_),
                    "empty answer",
                )
            })
    }

    /// Creates a directory only its owner can enter (0700), or accepts an existing one that is
    /// a real directory (not a symlink) closed to group and others.
    pub async fn mkdir_private(&self, path: &str) -> Result<()> {
        let attrs = FileAttributes {
            permissions: Some(0o700),
            ..FileAttributes::empty()
        };
        let created = self.session.mkdir(path, attrs).await;
        let stat = self.session.lstat(path).await;
        self.judge_private_dir(path, created, stat).await
    }

    /// Makes each of `dirs` (a directory, then one inside it) a private directory as
    /// [`Sftp::mkdir_private`] does, and writes `bytes` into the new file `path` inside them,
    /// mode 0700, without waiting for each answer: the mkdirs, their checks and the open go
    /// out at once, then the write and the close. sftp-server handles requests in the order
    /// they arrive, so this is the same sequence in two round trips instead of eight. A
    /// directory that fails its check fails the upload (the file, already created, is
    /// removed); the file is the owner's alone from its creation whatever the directories'
    /// modes were, and a mode found too open is fixed before the script's bytes are written.
    pub async fn write_private(&self, dirs: [&str; 2], path: &str, bytes: &[u8]) -> Result<()> {
        let private = || FileAttributes {
            permissions: Some(0o700),
            ..FileAttributes::empty()
        };
        let flags = OpenFlags::CREATE | OpenFlags::WRITE | OpenFlags::TRUNCATE | OpenFlags::EXCLUDE;
        let session = &self.session;
        // `biased`: polled in this order, so the requests are sent in this order.
        let (made_outer, outer, made_inner, inner, opened) = tokio::join!(
            biased;
            session.mkdir(dirs[0], private()),
            session.lstat(dirs[0]),
            session.mkdir(dirs[1], private()),
            session.lstat(dirs[1]),
            session.open(path, flags, private()),
        );
        let mut checked = self.judge_private_dir(dirs[0], made_outer, outer).await;
        if checked.is_ok() {
            checked = self.judge_private_dir(dirs[1], made_inner, inner).await;
        }
        let handle = match (opened, checked) {
            (Ok(opened), Ok(())) => opened.handle,
            (Ok(opened), Err(err)) => {
                let _ = tokio::join!(biased; session.close(opened.handle), session.remove(path));
                return Err(err);
            }
            (Err(_), Err(err)) => return Err(err),
            (Err(err), Ok(())) => return Err(self.error("create", path, err)),
        };
        let (written, closed) = if bytes.len() <= WRITE_CHUNK {
            let write = async {
                if bytes.is_empty() {
                    return Ok(());
                }
                session.write(&handle, 0, bytes.to_vec()).await.map(|_| ())
            };
            tokio::join!(biased; write, session.close(handle.clone()))
        } else {
            let written = self.write_all(&handle, bytes).await;
            (written, session.close(handle).await)
        };
        written.map_err(|err| self.error("write", path, err))?;
        closed
            .map(|_| ())
            .map_err(|err| self.error("close", path, err))
    }

    /// The checks of [`Sftp::mkdir_private`] on the answers to a mkdir and an lstat of `path`.
    async fn judge_private_dir(
        &self,
        path: &str,
        created: std::result::Result<russh_sftp::protocol::Status, SftpError>,
        stat: std::result::Result<russh_sftp::protocol::Attrs, SftpError>,
    ) -> Result<()> {
        let attrs = match (stat, created) {
            (Ok(stat), _) => stat.attrs,
            (Err(_), Err(create_err)) => return Err(self.error("mkdir", path, create_err)),
            (Err(err), Ok(_)) => return Err(self.error("lstat", path, err)),
        };
        if !attrs.is_dir() || attrs.is_symlink() {
            return Err(Error::ssh(
                format!("preparing the job directory {path:?} on {}", self.where_),
                "it exists but is not a directory (a symlink or file is in the way)",
            ));
        }
        if attrs.permissions.unwrap_or(0o777) & 0o077 != 0 {
            // Ours but too open (an old umask or an earlier run): tighten it.
            let fix = FileAttributes {
                permissions: Some(0o700),
                ..FileAttributes::empty()
            };
            self.session
                .setstat(path, fix)
                .await
                .map_err(|err| self.error("chmod 0700", path, err))?;
        }
        Ok(())
    }

    /// Writes `bytes` to `path` with `mode`. `exclusive`: fail if it exists (fresh names only).
    pub async fn write_file(
        &self,
        path: &str,
        bytes: &[u8],
        mode: u32,
        exclusive: bool,
    ) -> Result<()> {
        let mut flags = OpenFlags::CREATE | OpenFlags::WRITE | OpenFlags::TRUNCATE;
        if exclusive {
            flags |= OpenFlags::EXCLUDE;
        }
        let attrs = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        let handle = self
            .session
            .open(path, flags, attrs)
            .await
            .map_err(|err| self.error("create", path, err))?
            .handle;
        let written = self.write_all(&handle, bytes).await;
        // The mode given at open is only applied to a new file (and masked by the umask).
        let chmod = if written.is_ok() && !exclusive {
            let attrs = FileAttributes {
                permissions: Some(mode),
                ..FileAttributes::empty()
            };
            self.session
                .fsetstat(handle.clone(), attrs)
                .await
                .map(|_| ())
                .map_err(|err| self.error("chmod", path, err))
        } else {
            Ok(())
        };
        let closed = self
            .session
            .close(handle)
            .await
            .map(|_| ())
            .map_err(|err| self.error("close", path, err));
        written.map_err(|err| self.error("write", path, err))?;
        chmod?;
        closed
    }

    async fn write_all(&self, handle: &str, bytes: &[u8]) -> std::result::Result<(), SftpError> {
        if bytes.len() <= WRITE_CHUNK {
            if !bytes.is_empty() {
                self.session.write(handle, 0, bytes.to_vec()).await?;
            }
            return Ok(());
        }
        let mut in_flight = tokio::task::JoinSet::new();
        for (index, chunk) in bytes.chunks(WRITE_CHUNK).enumerate() {
            if in_flight.len() >= WRITES_IN_FLIGHT {
                if let Some(done) = in_flight.join_next().await {
                    done.map_err(|err| SftpError::IO(err.to_string()))??;
                }
            }
            let session = self.session.clone();
            let handle = handle.to_string();
            let chunk = chunk.to_vec();
            let offset = (index * WRITE_CHUNK) as u64;
            in_flight.spawn(async move { session.write(handle, offset, chunk).await.map(|_| ()) });
        }
        while let Some(done) = in_flight.join_next().await {
            done.map_err(|err| SftpError::IO(err.to_string()))??;
        }
        Ok(())
    }

    /// Whether `path` exists (a missing file is `false`; other failures are errors).
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.session.lstat(path).await {
            Ok(_) => Ok(true),
            Err(SftpError::Status(status)) if status.status_code == StatusCode::NoSuchFile => {
                Ok(false)
            }
            Err(err) => Err(self.error("lstat", path, err)),
        }
    }

    /// Removes two files at once, ignoring failures (best effort; the VM is destroyed at
    /// cleanup anyway).
    pub async fn remove_quietly(&self, first: &str, second: &str) {
        let _ = tokio::join!(self.session.remove(first), self.session.remove(second));
    }

    pub async fn close(self) {
        let _ = self.session.close_session();
    }
}

fn describe_sftp_error(err: &SftpError) -> String {
    match err {
        SftpError::Status(status) => match status.status_code {
            StatusCode::PermissionDenied => format!(
                "permission denied ({}); check the SSH user's rights in the VM",
                status.error_message
            ),
            StatusCode::NoSuchFile => {
                format!("no such file or directory ({})", status.error_message)
            }
            code => format!("{code}: {}", status.error_message),
        },
        SftpError::Timeout => "the VM did not answer within 60 s".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn packets_pass_until_one_announces_too_much() {
        let (mut vm, ours) = tokio::io::duplex(1 << 20);
        let mut guarded = BoundedPackets::new(ours);
        // Two small packets, split awkwardly across writes, then a 4 GiB announcement.
        let mut stream = Vec::new();
        for body in [&b"hello"[..], &[7u8; 300][..]] {
            stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
            stream.extend_from_slice(body);
        }
        let (first, second) = stream.split_at(3);
        vm.write_all(first).await.unwrap();
        vm.write_all(second).await.unwrap();
        let mut passed = vec![0u8; stream.len()];
        guarded.read_exact(&mut passed).await.unwrap();
        assert_eq!(passed, stream);

        vm.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut more = [0u8; 16];
        let err = guarded.read(&mut more).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("sftp-server"), "{err}");
    }
}
