//! TLS after the handshake, without rustls's buffers.
//!
//! rustls runs the handshake (its unbuffered API, which leaves every byte
//! in our buffers), then hands over the traffic keys through its kernel
//! connection API (the one kTLS uses). From there on each direction has
//! its own key and sequence number, so the reader and the writer share no
//! lock: the reader decrypts records in place in the buffer the socket
//! filled, and the writer encrypts into records that go to the socket in
//! one `writev`. The AEAD and its nonces stay rustls's own
//! (`MessageEncrypter`/`MessageDecrypter` of the negotiated suite); rustls
//! also derives the next keys on a TLS 1.3 KeyUpdate and stores session
//! tickets. What this module does itself is the record framing around
//! them, alerts, and the post-handshake messages (RFC 8446 §4.6).
//!
//! Against rustls's buffered connection this saves, per byte received, a
//! copy into its deframer (in 4 KiB steps, each a reallocation), a
//! `memmove` of every partial record and a copy into its plaintext queue;
//! per byte sent, a copy out of its record queue. Measured: the agent's
//! CPU per GiB tunnelled (see the commit message and `make bench`).
//!
//! Owns: the handshake driver, the record reader and writer halves.
//! Must not: build TLS configs or verify peers (crate::tls does), or hold a
//! lock across a socket call.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{
    CommonState, ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite,
};

use super::transport::{SharedSocket, Socket};

/// Our side of a TLS connection about to start.
pub enum TlsSetup {
    /// Accepting: the server's configuration.
    Server(Arc<rustls::ServerConfig>),
    /// Connecting: the client's configuration and the name to verify.
    Client(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
}

/// Largest plaintext in one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// Largest ciphertext a peer may send in one record: TLS 1.3 allows 256
/// bytes of expansion (§5.2), TLS 1.2 2048 (RFC 5246 §6.2.3).
const MAX_CIPHERTEXT_13: usize = MAX_PLAINTEXT + 256;
const MAX_CIPHERTEXT_12: usize = MAX_PLAINTEXT + 2048;
/// One largest record: the handshake's buffers.
const READ_FIRST: usize = HEADER + MAX_CIPHERTEXT_12;
/// The reader's buffer after the handshake: [`READ_START`] bytes at the
/// first read, doubled whenever a read fills it (a record larger than
/// what is free, or a bulk transfer), up to [`READ_MAX`]. An idle
/// connection holds the first size: zeroed before the first read, a
/// buffer of one largest record would cost each idle TLS tunnel 18 KiB
/// of resident memory.
const READ_START: usize = 1024;
const READ_MAX: usize = 128 * 1024;
/// Plaintext encrypted per `write` call: the records of one `writev`.
const WRITE_CHUNK: usize = 256 * 1024;
/// Slices one vectored write takes (the writer passes at most four: queued
/// frames, a frame header, a gRPC prefix, a payload); the rest wait for
/// the next call, as a short write allows.
const VECTORED_PARTS: usize = 8;
/// Bound on buffered handshake bytes (during and after the handshake), as
/// rustls bounds its own (64 KiB).
const MAX_HANDSHAKE: usize = 64 * 1024;
/// TLS handshake message types handled after the handshake.
const HELLO_REQUEST: u8 = 0;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn tls_err(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

/// Keys are only asked for on key updates and session tickets.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update(&mut self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, tx) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
        }
    }
}

/// What the two halves share: the key schedule (locked only for a key
/// update or a ticket) and the peer's request for our next KeyUpdate.
struct Keys {
    kernel: Mutex<Kernel>,
    suite: SupportedCipherSuite,
    tls13: bool,
    update_requested: AtomicBool,
}

impl Keys {
    fn update(&self, tx: bool) -> io::Result<(u64, ConnectionTrafficSecrets)> {
        self.kernel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(tx)
            .map_err(tls_err)
    }
}

fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageDecrypter>> {
    Ok(match (suite, secrets) {
        (SupportedCipherSuite::Tls13(s), secrets) => {
            let (key, iv) = key_iv(secrets)?;
            s.aead_alg.decrypter(key, iv)
        }
        // TLS 1.2 GCM: the 4-byte implicit salt; the rest of the nonce
        // travels in each record.
        (
            SupportedCipherSuite::Tls12(s),
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        ) => s.aead_alg.decrypter(key, &iv.as_ref()[..4]),
        (
            SupportedCipherSuite::Tls12(s),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        ) => s.aead_alg.decrypter(key, iv.as_ref()),
        _ => return Err(invalid("TLS: unsupported cipher for the record layer")),
    })
}

fn encrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageEncrypter>> {
    Ok(match (suite, secrets) {
        (SupportedCipherSuite::Tls13(s), secrets) => {
            let (key, iv) = key_iv(secrets)?;
            s.aead_alg.encrypter(key, iv)
        }
        (
            SupportedCipherSuite::Tls12(s),
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        ) => {
            let (salt, explicit) = iv.as_ref().split_at(4);
            s.aead_alg.encrypter(key, salt, explicit)
        }
        (
            SupportedCipherSuite::Tls12(s),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        ) => s.aead_alg.encrypter(key, iv.as_ref(), &[]),
        _ => return Err(invalid("TLS: unsupported cipher for the record layer")),
    })
}

fn key_iv(
    secrets: ConnectionTrafficSecrets,
) -> io::Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(invalid("TLS: unsupported cipher for the record layer")),
    }
}

// --- the handshake --------------------------------------------------------

/// The two unbuffered connection types, for one handshake driver.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &CommonState;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// What a finished handshake leaves: bytes read past it (the start of the
/// next record), application data that arrived with its last flight, and
/// records encrypted after it that are still to be sent.
struct Leftovers {
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
    /// A TLS 1.3 server's session tickets, when it asked for the client's
    /// certificate: those can only be made once the client's Finished is
    /// in, and are sent ahead of the first record the writer half sends.
    unsent: Vec<u8>,
}

/// Runs the handshake on `io` until both sides may exchange application
/// data and nothing is left to send, except, with `hold_tickets` (servers),
/// what a TLS 1.3 handshake encrypts once it is over: the session tickets
/// a server sends after the client's Finished. Written at once, they would
/// cost the first request a write and its client a wake-up before the
/// request is even read (the CONNECT frontend's dial); they go out with the
/// first answer instead.
fn drive<U: Unbuffered>(
    conn: &mut U,
    io: &mut (impl Read + Write),
    hold_tickets: bool,
) -> io::Result<Leftovers> {
    let mut incoming = vec![0u8; READ_FIRST];
    let mut used = 0;
    let mut outgoing = vec![0u8; READ_FIRST];
    let mut out_used = 0;
    let mut plaintext = Vec::new();
    loop {
        // Once the handshake is over rustls sees no more input: what
        // follows (data, tickets, alerts) is the record layer's, from the
        // first byte after the last handshake record.
        let done = !conn.common().is_handshaking();
        let window = if done { 0 } else { used };
        let mut traffic = false;
        let mut need_read = false;
        let mut transmit = false;
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..window]);
        let state = match state {
            Ok(state) => state,
            Err(err) => {
                // A peer that sent an alert itself has given up: no answer.
                if !matches!(err, rustls::Error::AlertReceived(_)) {
                    send_alert(conn, io);
                }
                return Err(tls_err(err));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut data) => loop {
                match data.encode(&mut outgoing[out_used..]) {
                    Ok(n) => {
                        out_used += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                        if out_used + required_size <= MAX_HANDSHAKE =>
                    {
                        outgoing.resize(out_used + required_size, 0);
                    }
                    Err(e) => return Err(invalid(format!("TLS handshake: {e}"))),
                }
            },
            // Written below, once rustls no longer borrows the connection.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                transmit = true;
            }
            ConnectionState::BlockedHandshake if !done => need_read = true,
            ConnectionState::WriteTraffic(_) => traffic = true,
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_err)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
            other => return Err(invalid(format!("TLS handshake: unexpected {other:?}"))),
        }
        if transmit {
            let over = !conn.common().is_handshaking()
                && conn.common().protocol_version() == Some(ProtocolVersion::TLSv1_3);
            if !(hold_tickets && over) {
                io.write_all(&outgoing[..out_used])?;
                out_used = 0;
            }
        }
        // rustls never asks for more than it was given; bounded anyway.
        let discard = discard.min(used);
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if traffic {
            if done {
                incoming.truncate(used);
                return Ok(Leftovers {
                    ciphertext: incoming,
                    plaintext,
                    unsent: outgoing[..out_used].to_vec(),
                });
            }
            // A TLS 1.3 server may send before the client's Finished; we
            // wait for it (client certificates are checked there).
            need_read = true;
        }
        if need_read {
            if used == incoming.len() {
                if used >= MAX_HANDSHAKE {
                    return Err(invalid("TLS handshake message too large"));
                }
                incoming.resize((2 * used).min(MAX_HANDSHAKE), 0);
            }
            match io.read(&mut incoming[used..])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ));
                }
                n => used += n,
            }
        }
    }
}

/// Sends the alert rustls queued when the handshake failed (a bad
/// certificate, no common version), so that the peer learns why instead
/// of seeing the connection drop. Best effort: the connection is over.
fn send_alert<U: Unbuffered>(conn: &mut U, io: &mut impl Write) {
    let mut alert = [0u8; 64];
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(&mut []).state {
        if let Ok(n) = data.encode(&mut alert) {
            let _ = io.write_all(&alert[..n]);
        }
    }
}

/// A finished handshake, ready to be split into its two halves.
pub(crate) struct Session {
    keys: Arc<Keys>,
    tx: (u64, ConnectionTrafficSecrets),
    rx: (u64, ConnectionTrafficSecrets),
    leftovers: Leftovers,
    alpn: Option<Vec<u8>>,
}

/// The configuration as given when it lets the keys out (crate::tls sets
/// the flag), else a copy that does (a caller's own, as tests build them).
fn extractable<C: Clone>(config: Arc<C>, set: bool, flag: impl Fn(&mut C) -> &mut bool) -> Arc<C> {
    if set {
        return config;
    }
    let mut owned = (*config).clone();
    *flag(&mut owned) = true;
    Arc::new(owned)
}

/// Runs the handshake; every read and write goes through `io` (which
/// carries the handshake's timeouts or deadline).
pub(crate) fn handshake(setup: TlsSetup, io: &mut (impl Read + Write)) -> io::Result<Session> {
    let (kernel, secrets, leftovers, alpn) = match setup {
        TlsSetup::Server(config) => {
            let set = config.enable_secret_extraction;
            let config = extractable(config, set, |c: &mut rustls::ServerConfig| {
                &mut c.enable_secret_extraction
            });
            let mut conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
            let leftovers = drive(&mut conn, io, true)?;
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
            (Kernel::Server(kernel), secrets, leftovers, alpn)
        }
        TlsSetup::Client(config, name) => {
            let set = config.enable_secret_extraction;
            let config = extractable(config, set, |c: &mut rustls::ClientConfig| {
                &mut c.enable_secret_extraction
            });
            let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_err)?;
            let leftovers = drive(&mut conn, io, false)?;
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
            (Kernel::Client(kernel), secrets, leftovers, alpn)
        }
    };
    let (suite, version) = match &kernel {
        Kernel::Client(k) => (k.negotiated_cipher_suite(), k.protocol_version()),
        Kernel::Server(k) => (k.negotiated_cipher_suite(), k.protocol_version()),
    };
    Ok(Session {
        keys: Arc::new(Keys {
            kernel: Mutex::new(kernel),
            suite,
            tls13: version == ProtocolVersion::TLSv1_3,
            update_requested: AtomicBool::new(false),
        }),
        tx: secrets.tx,
        rx: secrets.rx,
        leftovers,
        alpn,
    })
}

impl Session {
    pub(crate) fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The reader and writer halves over `sock`.
    pub(crate) fn split<S: Socket>(
        self,
        sock: Arc<S>,
    ) -> io::Result<(RecordReader<S>, RecordWriter<S>)> {
        let suite = self.keys.suite;
        let limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let mut ciphertext = self.leftovers.ciphertext;
        let end = ciphertext.len();
        // Allocated at the first read, or only as large as what is left:
        // the handshake's buffer held one largest record.
        ciphertext.shrink_to(if end == 0 { 0 } else { end.max(READ_START) });
        let reader = RecordReader {
            sock: SharedSocket(sock.clone()),
            keys: self.keys.clone(),
            dec: decrypter(suite, self.rx.1)?,
            seq: self.rx.0,
            buf: ciphertext,
            start: 0,
            end,
            plain: (0, 0),
            early: self.leftovers.plaintext,
            early_at: 0,
            handshake: Vec::new(),
            closed: false,
            failed: None,
        };
        let writer = RecordWriter {
            sock: SharedSocket(sock),
            keys: self.keys,
            enc: encrypter(suite, self.tx.1)?,
            seq: self.tx.0,
            // Well before the cipher's limit (AES-GCM: 2^24.5 records),
            // as rustls does for its own connections.
            rekey_at: limit.saturating_sub(limit / 16),
            // The handshake's held tickets go out ahead of the first record.
            records: match self.leftovers.unsent {
                unsent if unsent.is_empty() => Vec::new(),
                unsent => vec![unsent],
            },
        };
        Ok((reader, writer))
    }
}

// --- the reader half ------------------------------------------------------

/// Decrypts records in place in the buffer the socket filled; one socket
/// read serves as many records as it brought.
pub(crate) struct RecordReader<S> {
    sock: SharedSocket<S>,
    keys: Arc<Keys>,
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    /// `[start, end)`: ciphertext not yet decrypted.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Decrypted application data not yet returned, inside `buf` before
    /// `start` (the buffer is only moved once it is empty).
    plain: (usize, usize),
    /// Application data that came with the handshake.
    early: Vec<u8>,
    early_at: usize,
    /// A post-handshake message split across records.
    handshake: Vec<u8>,
    closed: bool,
    /// A bad record ends the stream: this error from then on (the bytes
    /// of the records before it are returned first).
    failed: Option<(io::ErrorKind, String)>,
}

impl<S: Socket> RecordReader<S> {
    /// Whether a read would return bytes without waiting for the socket:
    /// plaintext not yet returned, or a whole record still to decrypt (a
    /// partial one needs the socket anyway).
    pub(crate) fn has_buffered(&self) -> bool {
        if self.early_at < self.early.len() || self.plain.0 < self.plain.1 {
            return true;
        }
        let avail = &self.buf[self.start..self.end];
        avail.first_chunk::<HEADER>().is_some_and(|head| {
            avail.len() >= HEADER + usize::from(u16::from_be_bytes([head[3], head[4]]))
        })
    }

    /// Decrypts the next whole record in the buffer; `false` when there is
    /// none.
    fn next_record(&mut self) -> io::Result<bool> {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = avail.first_chunk::<HEADER>() else {
            return Ok(false);
        };
        let typ = head[0];
        let version = u16::from_be_bytes([head[1], head[2]]);
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        let (max, outer_ok) = if self.keys.tls13 {
            (MAX_CIPHERTEXT_13, typ == 23)
        } else {
            (MAX_CIPHERTEXT_12, matches!(typ, 21..=23))
        };
        if !outer_ok || version != 0x0303 {
            return Err(invalid(format!(
                "TLS: unexpected record (type {typ}, version {version:#06x})"
            )));
        }
        if len > max {
            return Err(invalid(format!("TLS: record of {len} bytes is too large")));
        }
        if avail.len() < HEADER + len {
            return Ok(false);
        }
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS: record sequence exhausted"))?;
        let base = self.buf.as_ptr() as usize;
        let message = InboundOpaqueMessage::new(
            ContentType::from(typ),
            ProtocolVersion::from(version),
            &mut self.buf[body],
        );
        let plain = self.dec.decrypt(message, seq).map_err(tls_err)?;
        let at = plain.payload.as_ptr() as usize - base;
        match plain.typ {
            ContentType::ApplicationData => self.plain = (at, at + plain.payload.len()),
            ContentType::Alert => match plain.payload {
                [_, 0] => self.closed = true,
                // user_canceled is a warning that precedes close_notify.
                [1, 90] => {}
                [level, description] => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("TLS alert from peer (level {level}, description {description})"),
                    ));
                }
                _ => return Err(invalid("TLS: malformed alert")),
            },
            ContentType::Handshake => {
                if self.handshake.len() + plain.payload.len() > MAX_HANDSHAKE {
                    return Err(invalid("TLS: post-handshake message too large"));
                }
                self.handshake.extend_from_slice(plain.payload);
                self.post_handshake()?;
            }
            other => {
                return Err(invalid(format!(
                    "TLS: unexpected {other:?} record after the handshake"
                )));
            }
        }
        Ok(true)
    }

    /// Handles the whole messages in `self.handshake` (RFC 8446 §4.6).
    fn post_handshake(&mut self) -> io::Result<()> {
        let mut at = 0;
        while let Some(head) = self.handshake[at..].first_chunk::<4>() {
            let (typ, len) = (
                head[0],
                u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize,
            );
            let Some(body) = self.handshake.get(at + 4..at + 4 + len) else {
                break;
            };
            match typ {
                KEY_UPDATE if self.keys.tls13 => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(invalid("TLS: malformed KeyUpdate")),
                    };
                    // A key change ends the record (§5.1).
                    if at + 4 + len != self.handshake.len() {
                        return Err(invalid("TLS: data after a KeyUpdate in its record"));
                    }
                    let (seq, secrets) = self.keys.update(false)?;
                    self.dec = decrypter(self.keys.suite, secrets)?;
                    self.seq = seq;
                    if requested {
                        self.keys.update_requested.store(true, Ordering::Release);
                    }
                }
                NEW_SESSION_TICKET if self.keys.tls13 => {
                    let mut kernel = self
                        .keys
                        .kernel
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    match &mut *kernel {
                        Kernel::Client(k) => k.handle_new_session_ticket(body).map_err(tls_err)?,
                        Kernel::Server(_) => {
                            return Err(invalid("TLS: a client sent a NewSessionTicket"));
                        }
                    }
                }
                // TLS 1.2 renegotiation is not supported; a HelloRequest
                // may be ignored (RFC 5246 §7.4.1.1).
                HELLO_REQUEST if !self.keys.tls13 && len == 0 => {}
                other => {
                    return Err(invalid(format!(
                        "TLS: unexpected handshake message {other} after the handshake"
                    )));
                }
            }
            at += 4 + len;
        }
        self.handshake.drain(..at);
        Ok(())
    }

    /// Reads more ciphertext; `false` at the end of the stream. Called
    /// only when less than one record is buffered and no plaintext waits,
    /// so moving the partial record to the front loses nothing.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // Full (a partial record as long as the buffer), or not yet
            // allocated. READ_MAX holds any record.
            let grown = (2 * self.buf.len()).clamp(READ_START, READ_MAX);
            self.buf.resize(grown, 0);
        }
        let room = self.buf.len() - self.end;
        let n = self.sock.read(&mut self.buf[self.end..])?;
        self.end += n;
        if n == room && self.buf.len() < READ_MAX {
            self.buf.resize((2 * self.buf.len()).min(READ_MAX), 0);
        }
        Ok(n > 0)
    }
}

impl<S: Socket> Read for RecordReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        self.read_pieces(out.len(), &mut |piece| {
            out[n..n + piece.len()].copy_from_slice(piece);
            n += piece.len();
        })
    }
}

impl<S: Socket> super::transport::ReadHalf for RecordReader<S> {
    fn read_append(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        self.read_pieces(max, &mut |piece| buf.extend_from_slice(piece))
    }
}

impl<S: Socket> RecordReader<S> {
    /// Reads as [`Read::read`] does, at most `max` bytes, handing them to
    /// `put` in the pieces they lie in.
    fn read_pieces(&mut self, max: usize, put: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            if self.early_at < self.early.len() {
                let take = (max - n).min(self.early.len() - self.early_at);
                put(&self.early[self.early_at..self.early_at + take]);
                self.early_at += take;
                n += take;
                if self.early_at == self.early.len() {
                    self.early = Vec::new();
                    self.early_at = 0;
                }
                continue;
            }
            let (from, to) = self.plain;
            if from < to {
                let take = (max - n).min(to - from);
                put(&self.buf[from..from + take]);
                self.plain.0 += take;
                n += take;
                continue;
            }
            if self.closed {
                break;
            }
            if let Some((kind, msg)) = &self.failed {
                if n > 0 {
                    break;
                }
                return Err(io::Error::new(*kind, msg.clone()));
            }
            match self.next_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    continue;
                }
            }
            if n > 0 {
                break;
            }
            // Nothing decrypted is left: wait for the socket. A timeout
            // leaves every buffer as it was.
            if !self.fill()? {
                break;
            }
        }
        Ok(n)
    }
}

// --- the writer half ------------------------------------------------------

/// Encrypts into records and sends each batch with one `writev`.
pub(crate) struct RecordWriter<S: Socket> {
    sock: SharedSocket<S>,
    keys: Arc<Keys>,
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// TLS 1.3: send a KeyUpdate at this sequence number; TLS 1.2, which
    /// has none, ends the connection there.
    rekey_at: u64,
    records: Vec<Vec<u8>>,
}

impl<S: Socket> RecordWriter<S> {
    fn seal(&mut self, typ: ContentType, payload: &[u8]) -> io::Result<()> {
        self.seal_chunks(typ, OutboundChunks::Single(payload))
    }

    /// One record whose plaintext may lie in several slices: rustls copies
    /// them into the record once and encrypts there.
    fn seal_chunks(&mut self, typ: ContentType, payload: OutboundChunks<'_>) -> io::Result<()> {
        let message = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload,
        };
        let record = self.enc.encrypt(message, self.seq).map_err(tls_err)?;
        self.seq += 1;
        self.records.push(record.encode());
        Ok(())
    }

    /// Our KeyUpdate, when the peer asked for one or our key has been used
    /// long enough; sent under the old key, then the new one takes over.
    fn maybe_rekey(&mut self) -> io::Result<()> {
        // Read before the swap: this runs for every record, and the flag is
        // almost never set (a plain load costs no locked instruction).
        let requested = self.keys.update_requested.load(Ordering::Relaxed)
            && self.keys.update_requested.swap(false, Ordering::Acquire);
        if !requested && self.seq < self.rekey_at {
            return Ok(());
        }
        if !self.keys.tls13 {
            return Err(invalid(
                "TLS 1.2 connection reached its cipher's record limit; reconnect",
            ));
        }
        self.seal(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.keys.update(true)?;
        self.enc = encrypter(self.keys.suite, secrets)?;
        self.seq = seq;
        Ok(())
    }

    fn send_records(&mut self) -> io::Result<()> {
        let result = {
            let mut slices: Vec<IoSlice<'_>> =
                self.records.iter().map(|r| IoSlice::new(r)).collect();
            let mut left = &mut slices[..];
            let mut result = Ok(());
            while !left.is_empty() {
                match self.sock.0.write_vectored_shared(left) {
                    Ok(0) => {
                        result = Err(io::ErrorKind::WriteZero.into());
                        break;
                    }
                    Ok(n) => IoSlice::advance_slices(&mut left, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            result
        };
        self.records.clear();
        result
    }

    #[cfg(test)]
    fn rekey_after(&mut self, records: u64) {
        self.rekey_at = self.seq + records;
    }
}

impl<S: Socket> Write for RecordWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Records are filled across the slices (an HTTP/2 frame header, a
    /// gRPC prefix and a packet's payload go into one record), so the
    /// caller need not gather them into one buffer first.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut parts: [&[u8]; VECTORED_PARTS] = [&[]; VECTORED_PARTS];
        let mut count = 0;
        for buf in bufs.iter().filter(|b| !b.is_empty()).take(VECTORED_PARTS) {
            parts[count] = buf;
            count += 1;
        }
        let all = OutboundChunks::new(&parts[..count.max(1)]);
        let (mut rest, _) = all.split_at(WRITE_CHUNK);
        let taken = rest.len();
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(MAX_PLAINTEXT);
            self.maybe_rekey()?;
            self.seal_chunks(ContentType::ApplicationData, piece)?;
            rest = tail;
        }
        if taken > 0 {
            self.send_records()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Socket> Drop for RecordWriter<S> {
    /// Ends the TLS session cleanly (close_notify) when the writer half
    /// goes, so that peers that insist on it (rustls, Go's crypto/tls) see
    /// a clean end of stream rather than a truncation.
    fn drop(&mut self) {
        if self.seal(ContentType::Alert, &[1, 0]).is_ok() {
            let _ = self.send_records();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_data as data;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn our_server() -> Arc<rustls::ServerConfig> {
        crate::tls::test_server_config("server.crt", "server.key").unwrap()
    }

    fn our_client() -> Arc<rustls::ClientConfig> {
        crate::tls::client_config(&data("ca.crt"), None, vec![b"h2".to_vec()]).unwrap()
    }

    /// Our server config, requiring a client certificate signed by the test CA.
    fn server_asking_for_certificates(alpn: Vec<Vec<u8>>) -> Arc<rustls::ServerConfig> {
        crate::tls::Reloader::new(&crate::tls::ServerFiles {
            cert: data("server.crt"),
            key: data("server.key"),
            client_ca: Some(data("ca.crt")),
            alpn,
        })
        .unwrap()
        .server_config()
    }

    /// A peer on rustls's own buffered connection, limited to `version`.
    fn their_client(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(data("ca.crt")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
    }

    fn their_server() -> rustls::ServerConnection {
        let mut config = (*our_server()).clone();
        config.enable_secret_extraction = false;
        rustls::ServerConnection::new(Arc::new(config)).unwrap()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn read_exactly(r: &mut impl Read, n: usize) -> Vec<u8> {
        let mut out = vec![0; n];
        r.read_exact(&mut out).unwrap();
        out
    }

    type Halves = (RecordReader<UnixStream>, RecordWriter<UnixStream>);

    /// Our side over one end of a socket pair (in a thread), theirs over
    /// the other.
    fn pair(setup: TlsSetup) -> (std::thread::JoinHandle<Halves>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        for s in [&ours, &theirs] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let ours = Arc::new(ours);
        let side = std::thread::spawn(move || {
            let session = handshake(setup, &mut SharedSocket(ours.clone())).unwrap();
            session.split(ours).unwrap()
        });
        (side, theirs)
    }

    #[test]
    fn a_tls13_server_that_asks_for_certificates_sends_its_tickets_with_its_first_write() {
        let server = server_asking_for_certificates(vec![b"h2".to_vec()]);
        let identity = (data("client.crt"), data("client.key"));
        let client = crate::tls::client_config(
            &data("ca.crt"),
            Some((&identity.0, &identity.1)),
            vec![b"h2".to_vec()],
        )
        .unwrap();
        // The second connection resumes with a ticket the first one got.
        for kind in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let (side, sock) = pair(TlsSetup::Server(server.clone()));
            let name = "localhost".try_into().unwrap();
            let conn = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut peer = rustls::StreamOwned::new(conn, sock);
            peer.write_all(b"hi").unwrap();
            peer.flush().unwrap();
            let (mut reader, mut writer) = side.join().unwrap();
            assert_eq!(read_exactly(&mut reader, 2), b"hi");
            assert_eq!(peer.conn.handshake_kind(), Some(kind));
            // The server's handshake is over and nothing has come since.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&peer.sock);
            let waiting = crate::sys::poll_readable(&[fd], Some(Duration::ZERO)).unwrap();
            assert_eq!(waiting, [false], "{kind:?}: sent before the first write");
            writer.write_all(b"ok").unwrap();
            assert_eq!(read_exactly(&mut peer, 2), b"ok");
        }
    }

    #[test]
    fn appending_reads_give_the_bytes_plain_reads_give() {
        use crate::h2::transport::ReadHalf;
        let (side, sock) = pair(TlsSetup::Server(our_server()));
        let mut peer = rustls::StreamOwned::new(their_client(&rustls::version::TLS13), sock);
        let up = pattern(200_000, 3);
        peer.write_all(&up[..100]).unwrap();
        let (mut reader, _writer) = side.join().unwrap();
        let sending = std::thread::spawn(move || {
            peer.write_all(&up[100..]).unwrap();
            peer.flush().unwrap();
            (peer, up)
        });
        // Onto what is there, at most `max` at a time, across records.
        let mut got = b"head".to_vec();
        while got.len() < 4 + 200_000 {
            let before = got.len();
            let n = reader.read_append(&mut got, 50_000).unwrap();
            assert!(n > 0 && n <= 50_000, "{n}");
            assert_eq!(got.len(), before + n);
        }
        let (_peer, up) = sending.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..] == up[..], "appended bytes differ");
    }

    #[test]
    fn tls13_and_tls12_carry_bytes_both_ways_then_close_notify() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (side, sock) = pair(TlsSetup::Server(our_server()));
            let mut peer = rustls::StreamOwned::new(their_client(version), sock);
            peer.write_all(b"hi").unwrap();
            let (mut reader, mut writer) = side.join().unwrap();
            assert_eq!(reader.keys.tls13, version == &rustls::version::TLS13);
            assert_eq!(read_exactly(&mut reader, 2), b"hi");
            // More than the socket buffers hold: each side in a thread.
            let up = pattern(1 << 20, 1);
            let expected = up.clone();
            let receiving =
                std::thread::spawn(move || (read_exactly(&mut reader, 1 << 20), reader));
            peer.write_all(&up).unwrap();
            peer.flush().unwrap();
            let (got, mut reader) = receiving.join().unwrap();
            assert!(got == expected, "{version:?}: upload differs");
            let down = pattern(1 << 20, 7);
            let sent = down.clone();
            let sending = std::thread::spawn(move || {
                writer.write_all(&sent).unwrap();
                writer
            });
            assert!(
                read_exactly(&mut peer, down.len()) == down,
                "{version:?}: download differs"
            );
            let writer = sending.join().unwrap();
            // Their close_notify is our end of stream; ours is theirs.
            peer.conn.send_close_notify();
            peer.flush().unwrap();
            assert_eq!(reader.read(&mut [0; 16]).unwrap(), 0);
            drop(writer);
            let mut rest = Vec::new();
            peer.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn a_peer_key_update_is_followed_and_answered() {
        let (side, sock) = pair(TlsSetup::Server(our_server()));
        let mut peer = rustls::StreamOwned::new(their_client(&rustls::version::TLS13), sock);
        peer.write_all(b"before").unwrap();
        let (mut reader, mut writer) = side.join().unwrap();
        assert_eq!(read_exactly(&mut reader, 6), b"before");
        // KeyUpdate(update_requested), then data under the new key.
        peer.conn.refresh_traffic_keys().unwrap();
        peer.write_all(b"after").unwrap();
        peer.flush().unwrap();
        assert_eq!(read_exactly(&mut reader, 5), b"after");
        assert!(reader.keys.update_requested.load(Ordering::Acquire));
        // Our answer (KeyUpdate, new key) goes out before the next data.
        writer.write_all(b"answer").unwrap();
        assert!(!reader.keys.update_requested.load(Ordering::Acquire));
        assert_eq!(read_exactly(&mut peer, 6), b"answer");
        peer.write_all(b"again").unwrap();
        assert_eq!(read_exactly(&mut reader, 5), b"again");
    }

    #[test]
    fn our_key_updates_before_the_limit_are_followed_by_the_peer() {
        let (side, sock) = pair(TlsSetup::Server(our_server()));
        let mut peer = rustls::StreamOwned::new(their_client(&rustls::version::TLS13), sock);
        peer.write_all(b"x").unwrap();
        let (mut reader, mut writer) = side.join().unwrap();
        assert_eq!(read_exactly(&mut reader, 1), b"x");
        writer.rekey_after(3);
        let down = pattern(300 * 1024, 3); // about 19 records: 6 key updates
        let sent = down.clone();
        let sending = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer
        });
        assert!(read_exactly(&mut peer, down.len()) == down);
        let writer = sending.join().unwrap();
        // rekey_at stays where it was set: a fresh key is used for at most
        // that many records (19 records without updates would end at 20).
        assert!(writer.seq <= 5, "seq {}", writer.seq);
    }

    #[test]
    fn as_client_we_take_tickets_and_key_updates_from_a_rustls_server() {
        let (side, sock) = pair(TlsSetup::Client(
            our_client(),
            "localhost".try_into().unwrap(),
        ));
        let mut peer = rustls::StreamOwned::new(their_server(), sock);
        // The server's first write completes its handshake; its tickets
        // (two, rustls's default) follow the client's Finished.
        let hello = pattern(100_000, 9);
        peer.write_all(&hello).unwrap();
        let (mut reader, mut writer) = side.join().unwrap();
        assert_eq!(read_exactly(&mut reader, hello.len()), hello);
        peer.conn.refresh_traffic_keys().unwrap();
        peer.write_all(b"rekeyed").unwrap();
        assert_eq!(read_exactly(&mut reader, 7), b"rekeyed");
        writer.write_all(b"up").unwrap();
        assert_eq!(read_exactly(&mut peer, 2), b"up");
    }

    /// Our server side over a socket pair, and a rustls client whose
    /// records the test writes to the socket itself.
    fn hand_driven_client() -> (Halves, rustls::ClientConnection, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let ours = Arc::new(ours);
        let side = std::thread::spawn(move || {
            let session = handshake(
                TlsSetup::Server(our_server()),
                &mut SharedSocket(ours.clone()),
            )
            .unwrap();
            session.split(ours).unwrap()
        });
        let mut client = their_client(&rustls::version::TLS13);
        while client.is_handshaking() {
            while client.wants_write() {
                client.write_tls(&mut theirs).unwrap();
            }
            if client.is_handshaking() {
                client.read_tls(&mut theirs).unwrap();
                client.process_new_packets().unwrap();
            }
        }
        while client.wants_write() {
            client.write_tls(&mut theirs).unwrap();
        }
        (side.join().unwrap(), client, theirs)
    }

    /// A vectored write seals records across its slices (a frame header,
    /// a prefix and a payload share a record), takes at most WRITE_CHUNK
    /// bytes per call, and a rustls peer reads the slices back in order.
    #[test]
    fn a_vectored_write_fills_records_across_its_slices() {
        let ((_reader, mut writer), mut client, mut theirs) = hand_driven_client();
        let parts = [
            pattern(9, 1),
            Vec::new(),
            pattern(5, 2),
            pattern(WRITE_CHUNK + 40_000, 3),
            pattern(3, 4),
        ];
        let expected: Vec<u8> = parts.concat();
        let receiving = std::thread::spawn(move || {
            let (mut raw, mut fed, mut got) = (Vec::new(), 0, Vec::new());
            let mut buf = vec![0; 64 * 1024];
            while got.len() < expected.len() {
                let n = theirs.read(&mut buf).unwrap();
                assert!(n > 0, "the writer's end closed early");
                raw.extend_from_slice(&buf[..n]);
                while fed < raw.len() {
                    fed += client.read_tls(&mut &raw[fed..]).unwrap();
                    let state = client.process_new_packets().unwrap();
                    let n = state.plaintext_bytes_to_read();
                    client.reader().read_exact(&mut buf[..n]).unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
            }
            // Every record's length, from the headers on the wire (the
            // server's session tickets among them).
            let mut lens = Vec::new();
            let mut at = 0;
            while at + 5 <= raw.len() {
                let len = usize::from(u16::from_be_bytes([raw[at + 3], raw[at + 4]]));
                lens.push(len);
                at += 5 + len;
            }
            (got == expected, lens)
        });
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let first = writer.write_vectored(&slices).unwrap();
        assert_eq!(first, WRITE_CHUNK, "one call takes at most WRITE_CHUNK");
        let mut left = &mut slices[..];
        IoSlice::advance_slices(&mut left, first);
        let second = writer.write_vectored(left).unwrap();
        assert_eq!(first + second, parts.iter().map(Vec::len).sum::<usize>());
        let (same, lens) = receiving.join().unwrap();
        assert!(same, "the bytes differ");
        // Full records (plaintext, type byte, tag) across the slices: 16 for
        // the first call, 2 and a short one for the second; none for the
        // 9- and 5-byte slices alone.
        let full = lens.iter().filter(|&&l| l == MAX_PLAINTEXT + 17).count();
        assert_eq!(full, WRITE_CHUNK / MAX_PLAINTEXT + 2, "{lens:?}");
        assert!(lens.iter().all(|&l| l > 100), "{lens:?}");
    }

    #[test]
    fn a_tampered_record_is_an_error_not_data() {
        let ((mut reader, _writer), mut client, mut theirs) = hand_driven_client();
        client.writer().write_all(b"secret").unwrap();
        let mut record = Vec::new();
        client.write_tls(&mut record).unwrap();
        let last = record.len() - 1;
        record[last] ^= 1;
        theirs.write_all(&record).unwrap();
        let err = reader.read(&mut [0; 16]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn records_larger_than_the_first_buffer_arriving_in_pieces_are_read_whole() {
        let ((mut reader, _writer), mut client, mut theirs) = hand_driven_client();
        // A small record, then two of the largest, sent a few bytes at a
        // time: the reader's buffer starts at READ_START and must grow to
        // hold a record that does not fit, or move a partial one forward.
        let data = [pattern(10, 3), pattern(2 * MAX_PLAINTEXT, 5)].concat();
        client.writer().write_all(&data).unwrap();
        let mut records = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut records).unwrap();
        }
        assert!(records.len() > 2 * MAX_PLAINTEXT && READ_START < MAX_PLAINTEXT);
        let receiving = std::thread::spawn(move || {
            let got = read_exactly(&mut reader, data.len());
            (got == data, reader.buf.len())
        });
        for piece in records.chunks(333) {
            theirs.write_all(piece).unwrap();
            std::thread::yield_now();
        }
        let (same, size) = receiving.join().unwrap();
        assert!(same, "the bytes differ");
        assert!(size <= READ_MAX, "{size}");
    }

    #[test]
    fn a_failed_handshake_tells_the_peer_why() {
        // A server that requires a client certificate, a client without.
        let server = server_asking_for_certificates(vec![]);
        let (ours, theirs) = UnixStream::pair().unwrap();
        for s in [&ours, &theirs] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let ours = Arc::new(ours);
        // Our end stays open until the peer has read: otherwise the peer's
        // last handshake write can meet a closed socket (EPIPE) before it
        // reads the alert waiting for it.
        let open = ours.clone();
        let side = std::thread::spawn(move || {
            handshake(TlsSetup::Server(server), &mut SharedSocket(ours)).map(|_| ())
        });
        let mut peer = rustls::StreamOwned::new(their_client(&rustls::version::TLS13), theirs);
        let _ = peer.write_all(b"hi");
        let mut buf = [0u8; 16];
        let read = peer.read(&mut buf);
        drop(open);
        let ours = side.join().unwrap().unwrap_err();
        assert!(ours.to_string().contains("no certificate"), "{ours}");
        let theirs = read.unwrap_err();
        assert!(
            theirs.to_string().contains("CertificateRequired"),
            "the peer saw {theirs}"
        );
    }

    #[test]
    fn a_peer_that_closes_during_the_handshake_gets_no_alert_back() {
        // Found by the tls_records fuzz target: a rustls client that sent
        // close_notify before the handshake ended, answered with a fatal
        // alert, broke an assertion of its own (debug builds).
        crate::h2::fuzzing::tls_records(&[0xf7, 0x17]);
    }

    #[test]
    fn oversized_and_unexpected_records_are_refused() {
        for (head, what) in [
            ([23u8, 3, 3, 0x48, 0x01], "too large"),
            ([22, 3, 3, 0, 16], "unexpected record"),
            ([23, 3, 1, 0, 16], "unexpected record"),
        ] {
            let (side, sock) = pair(TlsSetup::Server(our_server()));
            let mut peer = rustls::StreamOwned::new(their_client(&rustls::version::TLS13), sock);
            peer.write_all(b"hi").unwrap();
            let (mut reader, _writer) = side.join().unwrap();
            assert_eq!(read_exactly(&mut reader, 2), b"hi");
            peer.sock.write_all(&head).unwrap();
            peer.sock.write_all(&[0; 32]).unwrap();
            let err = reader.read(&mut [0; 16]).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
    }
}
