//! The answers to connections over `--max-connections`, run by
//! [`crate::tunnel::listen`] on one of its few refusal threads: the HTTP
//! CONNECT frontend answers `503`, the gRPC frontend and the agent port an
//! HTTP/2 GOAWAY (`ENHANCE_YOUR_CALM`, naming the limit; gRPC clients see
//! UNAVAILABLE and retry later). Each refusal is bounded: the TLS handshake
//! by the header timeout, then one write and at most [`LINGER`] of reading
//! (and discarding) what the client still sends, so that it sees the answer
//! rather than a reset.
//!
//! Owns: nothing past the refused connection. Must not: read requests or
//! allocate per byte received.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::h2::frame::{self, ErrorCode, setting};
use crate::h2::transport::{TlsSetup, Transport};
use crate::tls::Reloader;
use crate::tunnel::connect;
use crate::tunnel::listen::Conn;

/// How long a refused client may keep sending after the answer.
pub const LINGER: Duration = Duration::from_secs(1);

/// The bytes written to refuse an HTTP CONNECT connection.
pub fn connect_answer(max_connections: usize) -> Vec<u8> {
    connect::error_response(
        503,
        &format!("connection limit reached (--max-connections={max_connections})"),
    )
}

/// The bytes written to refuse an HTTP/2 connection: our SETTINGS (no
/// streams allowed), then GOAWAY with no stream processed.
pub fn grpc_answer(max_connections: usize) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_settings(&mut out, &[(setting::MAX_CONCURRENT_STREAMS, 0)]);
    let debug = format!("connection limit reached (--max-connections={max_connections})");
    frame::write_goaway(&mut out, 0, ErrorCode::ENHANCE_YOUR_CALM, debug.as_bytes());
    out
}

/// Writes `answer` on `conn` (after a TLS handshake when `tls` is given,
/// ALPN `h2` required when `h2`) and closes it, within `header_timeout`
/// plus [`LINGER`].
pub fn refuse(
    conn: Conn,
    tls: Option<&Reloader>,
    h2: bool,
    header_timeout: Duration,
    answer: &[u8],
) {
    let peer = conn.peer();
    let deadline = Instant::now() + header_timeout;
    let control = conn.clone();
    let write = Some(header_timeout.min(LINGER));
    let transport = match (conn, tls) {
        (Conn::Tcp(sock), Some(tls)) => Transport::tls_alpn::<TcpStream>(
            sock,
            TlsSetup::Server(tls.server_config()),
            write,
            write,
            h2,
            Some(deadline),
        ),
        (Conn::Tcp(sock), None) => Transport::plain::<TcpStream>(sock, write, write),
        (Conn::Unix(sock), _) => Transport::plain::<UnixStream>(sock, write, write),
    };
    let Transport {
        mut reader,
        mut writer,
        closer,
        ..
    } = match transport {
        Ok(t) => t,
        Err(e) => {
            log::debug!("refusing {peer}: {e}");
            return;
        }
    };
    if writer
        .write_all(answer)
        .and_then(|()| writer.flush())
        .is_ok()
    {
        linger(&mut *reader, &control);
    }
    drop(writer); // close_notify (TLS)
    closer();
}

/// Reads and discards until the client closes, for at most [`LINGER`].
fn linger(reader: &mut dyn Read, control: &Conn) {
    let until = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = match control {
            Conn::Tcp(s) => s.set_read_timeout(Some(left)),
            Conn::Unix(s) => s.set_read_timeout(Some(left)),
        };
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_limit() {
        let text = String::from_utf8(connect_answer(7)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("--max-connections=7"), "{text}");

        let wire = grpc_answer(7);
        let mut frames = frame::Decoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
        frames.spare(wire.len())[..wire.len()].copy_from_slice(&wire);
        frames.filled(wire.len());
        assert!(matches!(
            frames.next_frame().unwrap(),
            Some(frame::Frame::Settings { ack: false, .. })
        ));
        match frames.next_frame().unwrap() {
            Some(frame::Frame::GoAway {
                last_stream,
                code,
                debug,
            }) => {
                assert_eq!(last_stream, 0);
                assert_eq!(code, ErrorCode::ENHANCE_YOUR_CALM);
                assert!(String::from_utf8_lossy(&debug).contains("--max-connections=7"));
            }
            other => panic!("expected GOAWAY, got {other:?}"),
        }
    }
}
