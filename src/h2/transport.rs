//! The byte stream under an HTTP/2 connection, split for two threads: one
//! reader half (the connection's reader thread) and one writer half (its
//! writer thread), plus a closer that unblocks both.
//!
//! Owns: the plain-socket split (TCP, Unix: one socket shared through an
//! `Arc`, so a connection costs one descriptor) and the TLS split: the
//! handshake, then a reader half and a writer half with a key each and no
//! lock between them ([`super::records`]).
//! Must not: build TLS configs or verify peers (that is the TLS module's
//! job); it takes finished configurations.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown as SocketShutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::records;
pub use super::records::TlsSetup;

/// A connection's reading half.
pub trait ReadHalf: Read + Send {
    /// Reads as [`Read::read`] does, at most `max` bytes, onto the end of
    /// `buf` (its spare capacity, which need not be zeroed first: a buffer
    /// allocated for a payload is filled, not cleared and then filled).
    fn read_append(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let at = buf.len();
        buf.resize(at + max, 0);
        let read = self.read(&mut buf[at..]);
        buf.truncate(at + *read.as_ref().unwrap_or(&0));
        read
    }
}

/// A blocking socket that one reader and one writer use at once through
/// shared references (as `&TcpStream` allows), without a second descriptor.
pub trait Socket: Send + Sync + 'static {
    fn fd(&self) -> std::os::fd::RawFd;
    fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// [`ReadHalf::read_append`] on the socket.
    fn read_append_shared(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize>;
    fn write_shared(&self, buf: &[u8]) -> io::Result<usize>;
    fn write_vectored_shared(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
    fn shutdown_both(&self);
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    /// Sets the write timeout alone.
    fn set_write_timeout_only(&self, write: Option<Duration>) -> io::Result<()>;
    fn peer(&self) -> String;
}

impl Socket for TcpStream {
    fn fd(&self) -> std::os::fd::RawFd {
        self.as_raw_fd()
    }
    fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize> {
        crate::sys::read_polled(self.as_raw_fd(), buf, || self.read_timeout())
    }
    fn read_append_shared(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        crate::sys::read_polled_append(self.as_raw_fd(), buf, max, || self.read_timeout())
    }
    fn write_shared(&self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored_shared(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(SocketShutdown::Both);
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn set_write_timeout_only(&self, write: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(write)
    }
    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp peer".into())
    }
}

impl Socket for UnixStream {
    fn fd(&self) -> std::os::fd::RawFd {
        self.as_raw_fd()
    }
    fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize> {
        crate::sys::read_polled(self.as_raw_fd(), buf, || self.read_timeout())
    }
    fn read_append_shared(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        crate::sys::read_polled_append(self.as_raw_fd(), buf, max, || self.read_timeout())
    }
    fn write_shared(&self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored_shared(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(SocketShutdown::Both);
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn set_write_timeout_only(&self, write: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(write)
    }
    fn peer(&self) -> String {
        "unix peer".into()
    }
}

/// One handle on a shared socket: the reader half, the writer half or the
/// closer of a connection, all on the same descriptor.
pub struct SharedSocket<S>(pub Arc<S>);

impl<S: Socket> Read for SharedSocket<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_shared(buf)
    }
}

impl<S: Socket> ReadHalf for SharedSocket<S> {
    fn read_append(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        self.0.read_append_shared(buf, max)
    }
}

impl<S: Socket> Write for SharedSocket<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_shared(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored_shared(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Failure to set a transport up.
#[derive(Debug)]
pub enum Error {
    /// Setting the socket's options failed.
    Socket(io::Error),
    /// The TLS handshake failed.
    Handshake { peer: String, err: io::Error },
    /// The handshake finished but did not select ALPN `h2`.
    NoAlpnH2 { peer: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Socket(err) => write!(f, "preparing socket: {err}"),
            Error::Handshake { peer, err } => write!(f, "TLS handshake with {peer}: {err}"),
            Error::NoAlpnH2 { peer } => write!(f, "TLS peer {peer} did not negotiate ALPN h2"),
        }
    }
}

impl std::error::Error for Error {}

/// The two halves and the closer of one connection's byte stream.
pub struct Transport {
    pub(crate) reader: Box<dyn ReadHalf>,
    pub(crate) writer: Box<dyn Write + Send>,
    pub(crate) closer: Box<dyn Fn() + Send + Sync>,
    pub(crate) peer: String,
    pub(crate) secure: bool,
    /// A plaintext socket, which the connection's reader may write its
    /// answers to without waiting (`MSG_DONTWAIT`).
    pub(crate) plain_fd: Option<std::os::fd::RawFd>,
}

impl Transport {
    /// A plaintext stream (h2c with prior knowledge): TCP or a Unix socket.
    ///
    /// `read_timeout` bounds each blocking read: the reader thread then
    /// checks whether its connection was closed and reads on, so an idle
    /// connection survives it (a dead one is found by keepalive).
    /// `write_timeout` bounds each write: a peer that stops reading for that
    /// long, while it owes us flow-control credit, is dead.
    pub fn plain<S: Socket>(
        sock: impl Into<Arc<S>>,
        read_timeout: Option<Duration>,
        write_timeout: Option<Duration>,
    ) -> Result<Self, Error> {
        let sock: Arc<S> = sock.into();
        sock.set_timeouts(read_timeout, write_timeout)
            .map_err(Error::Socket)?;
        let peer = sock.peer();
        let plain_fd = Some(sock.fd());
        Ok(Transport {
            reader: Box::new(SharedSocket(sock.clone())),
            writer: Box::new(SharedSocket(sock.clone())),
            closer: Box::new(move || sock.shutdown_both()),
            peer,
            secure: false,
            plain_fd,
        })
    }

    /// A TLS stream: runs the handshake on `sock` (bounded by the socket
    /// timeouts) and requires ALPN `h2`.
    pub fn tls<S: Socket>(
        sock: impl Into<Arc<S>>,
        setup: TlsSetup,
        read_timeout: Option<Duration>,
        write_timeout: Option<Duration>,
    ) -> Result<Self, Error> {
        Self::tls_alpn(sock, setup, read_timeout, write_timeout, true, None)
    }

    /// [`Transport::tls`] for servers and for protocols other than HTTP/2
    /// (the HTTP CONNECT frontend): ALPN `h2` is only required when
    /// `require_h2`, and with a `handshake_deadline` the whole handshake
    /// must end by then (a slowloris guard: a peer trickling its
    /// ClientHello a byte at a time satisfies every per-read timeout).
    /// After the handshake the halves encrypt and decrypt on their own
    /// (see [`super::records`]).
    pub fn tls_alpn<S: Socket>(
        sock: impl Into<Arc<S>>,
        setup: TlsSetup,
        read_timeout: Option<Duration>,
        write_timeout: Option<Duration>,
        require_h2: bool,
        handshake_deadline: Option<Instant>,
    ) -> Result<Self, Error> {
        let sock: Arc<S> = sock.into();
        let peer = sock.peer();
        // The handshake's reads are bounded by the read timeout (the HTTP
        // CONNECT frontend's header timeout) or, where reads have none (h2
        // with keepalive), by the write timeout: a silent peer cannot hold
        // it forever. With a deadline, each read and write is bounded by
        // what is left of it instead.
        if handshake_deadline.is_none() {
            sock.set_timeouts(read_timeout.or(write_timeout), write_timeout)
                .map_err(Error::Socket)?;
        }
        let handshake_err = |err| Error::Handshake {
            peer: peer.clone(),
            err,
        };
        let session = match handshake_deadline {
            None => records::handshake(setup, &mut SharedSocket(sock.clone())),
            Some(deadline) => {
                records::handshake(setup, &mut Deadline::new(&*sock, deadline, write_timeout))
            }
        }
        .map_err(handshake_err)?;
        if require_h2 && session.alpn() != Some(b"h2") {
            return Err(Error::NoAlpnH2 { peer });
        }
        sock.set_timeouts(read_timeout, write_timeout)
            .map_err(Error::Socket)?;
        let (reader, writer) = session.split(sock.clone()).map_err(handshake_err)?;
        let closer = sock;
        Ok(Transport {
            reader: Box::new(reader),
            writer: Box::new(writer),
            closer: Box::new(move || closer.shutdown_both()),
            peer,
            secure: true,
            plain_fd: None,
        })
    }
}

/// A socket whose every read and write must end by `deadline`: each one
/// gets the time that is left as its timeout, and none starts after it.
/// For TLS handshakes (`complete_io` loops on its own while a peer
/// trickles bytes). A read waits in poll(2) for what is left, with no
/// socket option set; a write leaves its timeout set on the socket.
pub(crate) struct Deadline<'a, S: Socket> {
    sock: &'a S,
    deadline: Instant,
    write_timeout: Option<Duration>,
}

impl<'a, S: Socket> Deadline<'a, S> {
    pub(crate) fn new(sock: &'a S, deadline: Instant, write_timeout: Option<Duration>) -> Self {
        Deadline {
            sock,
            deadline,
            write_timeout,
        }
    }

    /// The time left, or the deadline's error once there is none.
    fn left(&self) -> io::Result<Duration> {
        match self.deadline.saturating_duration_since(Instant::now()) {
            left if left.is_zero() => Err(Self::expired()),
            left => Ok(left),
        }
    }

    fn expired() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake not finished within the header timeout",
        )
    }

    /// A socket timeout that ran into the deadline is the deadline's.
    fn check<T>(&self, result: io::Result<T>) -> io::Result<T> {
        match result {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && Instant::now() >= self.deadline =>
            {
                Err(Self::expired())
            }
            other => other,
        }
    }
}

impl<S: Socket> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.check(crate::sys::read_polled(self.sock.fd(), buf, || {
            Ok(Some(left))
        }))
    }
}

impl<S: Socket> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        let write = self.write_timeout.map_or(left, |w| w.min(left));
        self.sock.set_write_timeout_only(Some(write))?;
        self.check(self.sock.write_shared(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn server_config() -> Arc<rustls::ServerConfig> {
        crate::tls::test_server_config("server.crt", "server.key").unwrap()
    }

    fn client_hello() -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = "localhost".try_into().unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        hello
    }

    #[test]
    fn a_handshake_trickled_a_byte_at_a_time_ends_at_its_deadline() {
        let (server_side, mut client_side) = UnixStream::pair().unwrap();
        let hello = client_hello();
        // Every read finds a byte well within the 10 s read timeout; the
        // whole ClientHello would take seconds.
        let feeder = std::thread::spawn(move || {
            for byte in hello {
                if client_side.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20)); // the attack's pace
            }
        });
        let started = Instant::now();
        let ten = Some(Duration::from_secs(10));
        let result = Transport::tls_alpn(
            server_side,
            TlsSetup::Server(server_config()),
            ten,
            ten,
            true,
            Some(started + Duration::from_millis(300)),
        );
        let elapsed = started.elapsed();
        assert!(
            matches!(&result, Err(Error::Handshake { err, .. }) if err.kind() == io::ErrorKind::TimedOut),
            "{:?}",
            result.err()
        );
        assert!(elapsed < Duration::from_secs(3), "ended after {elapsed:?}");
        drop(result);
        feeder.join().unwrap();
    }
}
