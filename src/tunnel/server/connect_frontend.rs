//! The HTTP CONNECT frontend (`--mode=http-connect`): one connection, one
//! tunnel. Reads a bounded request head within the header timeout, dials
//! through the hub, answers exactly `200 Connection Established` (written
//! by the thread that delivers the DIAL_RSP, see [`EarlyAnswer`]; or 405,
//! 431, 502, 503, 504 with the reason), then copies bytes both ways: a
//! plaintext client is read by its agent stream's pump
//! ([`crate::tunnel::pump`]),
//! a TLS client by this thread; what comes for the client goes from the
//! delivering thread straight into a plaintext client's socket when it
//! takes it at once, else through the tunnel's queue, drained by a pooled
//! writer thread started when something first waits there ([`ClientOut`]).
//! A TLS client's thread stays for the tunnel's life and ends it; a
//! plaintext tunnel holds no thread once it is established: the thread
//! that dialled goes back to the pool, and whoever finishes last (the pump
//! that sees the client's end, or the writer) ends it ([`Ending`]).
//!
//! Owns: the connection's socket and its two halves. Must not: decide
//! routing; the hub does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hub::{EarlyAnswer, Hub, ToFrontend};
use crate::h2::transport::{TlsSetup, Transport};
use crate::shutdown::Latch;
use crate::tls::Reloader;
use crate::tunnel::ReadBuf;
use crate::tunnel::connect::{self, ConnectRequest, ESTABLISHED};
use crate::tunnel::listen::{Conn, Held};
use crate::tunnel::message::Message;
use crate::tunnel::queue::{Pop, Queue};
use crate::tunnel::router::{DialFailure, FrontendKey};

/// Timeouts of the CONNECT frontend.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// TLS handshake plus request head (slowloris guard).
    pub header: Duration,
    /// How long a client waits for the agent's answer when the server has
    /// no `--backend-dial-timeout`.
    pub dial: Duration,
    /// Each write to the client; a client that stops reading for this long
    /// loses its tunnel.
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            dial: Duration::from_secs(30),
            write: Duration::from_secs(30),
        }
    }
}

/// Bytes read from the client per DATA packet.
const CHUNK: usize = 64 * 1024 - 64;

/// The HTTP status for a failed dial.
pub fn status_for(reason: &DialFailure) -> u16 {
    match reason {
        DialFailure::NoAgent | DialFailure::TooManyPending => 503,
        DialFailure::Timeout => 504,
        _ => 502,
    }
}

/// Serves one accepted connection to its end.
///
/// Each phase is a function of its own that is never inlined, so that its
/// locals (the request head's parse, the dial's error paths, a TLS
/// handshake) are off the stack before the next phase runs. For a TLS
/// client this thread stays for the tunnel's life as its reader, and what
/// it once touched stays resident: with 10,000 idle tunnels, every stack
/// page the setup touched costs 40 MiB. Its deepest path is a send to the
/// agent that writes the agent connection's TLS records itself. A
/// plaintext client's tunnel keeps `held` (the connection counts as open)
/// after this returns, until its [`Ending`] has run.
pub fn serve(hub: &Arc<Hub>, conn: Conn, held: Held, tls: Option<&Reloader>, timeouts: &Timeouts) {
    // The header timeout runs from here: TLS handshake plus request head.
    let started = Instant::now();
    let Some(mut client) = open(conn, tls, timeouts, started) else {
        return;
    };
    let mut buf = ReadBuf::new(CHUNK);
    let Some((request, mut head)) = read_head(&mut client, &mut buf, timeouts, started) else {
        return client.finish();
    };
    set_read_timeout(&client.control, None);
    let Some(tunnel) = dial(hub, &mut client, &request, timeouts) else {
        return client.finish();
    };
    if client.secure {
        // The handshake went about 20 KiB deep; the tunnel needs a third.
        // Trimmed once the dial is answered: not on the client's wait.
        crate::sys::trim_stack();
    }
    let early = head.split_off(request.head_len);
    drop((request, head));
    relay(hub, client, tunnel, buf, early, held);
}

/// A client's connection, between the phases of [`serve`].
struct Client {
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    closer: Box<dyn Fn() + Send + Sync>,
    /// A handle to the raw socket, for its read timeout and hang-up checks.
    control: Conn,
    peer: String,
    /// TLS (after a handshake).
    secure: bool,
}

impl Client {
    /// Ends the connection: close_notify (TLS) with the writer half, then
    /// the socket.
    fn finish(self) {
        drop(self.writer);
        (self.closer)();
    }

    /// Answers an error (the connection ends after it).
    fn answer(&mut self, status: u16, reason: &str) {
        let _ = self
            .writer
            .write_all(&connect::error_response(status, reason));
        let _ = self.writer.flush();
    }
}

/// An established tunnel: the hub's key and queue, the agent's connection id.
struct Tunnel {
    key: FrontendKey,
    queue: Queue<ToFrontend>,
    connect_id: i64,
}

/// The connection's transport: TLS handshake or plaintext.
#[inline(never)]
fn open(
    conn: Conn,
    tls: Option<&Reloader>,
    timeouts: &Timeouts,
    started: Instant,
) -> Option<Client> {
    let peer = conn.peer();
    let control = conn.clone();
    let transport = match (conn, tls) {
        (Conn::Tcp(sock), Some(tls)) => Transport::tls_alpn::<TcpStream>(
            sock,
            TlsSetup::Server(tls.server_config()),
            Some(timeouts.header),
            Some(timeouts.write),
            false,
            Some(started + timeouts.header),
        ),
        (Conn::Tcp(sock), None) => {
            Transport::plain::<TcpStream>(sock, Some(timeouts.header), Some(timeouts.write))
        }
        (Conn::Unix(sock), _) => {
            Transport::plain::<UnixStream>(sock, Some(timeouts.header), Some(timeouts.write))
        }
    };
    match transport {
        Ok(Transport {
            reader,
            writer,
            closer,
            secure,
            ..
        }) => Some(Client {
            reader,
            writer,
            closer,
            control,
            peer,
            secure,
        }),
        Err(e) => {
            log::debug!("CONNECT {peer}: {e}");
            None
        }
    }
}

/// The request head, within the header timeout from the connection's
/// start, and every byte read with it. None when the connection must end
/// (answered already, if it was a bad request or too slow).
#[inline(never)]
fn read_head(
    client: &mut Client,
    buf: &mut ReadBuf,
    timeouts: &Timeouts,
    started: Instant,
) -> Option<(ConnectRequest, Vec<u8>)> {
    let mut head = Vec::with_capacity(1024);
    loop {
        match connect::parse(&head) {
            Ok(Some(request)) => return Some((request, head)),
            Ok(None) => {}
            Err(refusal) => {
                log::debug!("CONNECT {}: refused: {refusal}", client.peer);
                client.answer(refusal.status, &refusal.reason);
                return None;
            }
        }
        let left = timeouts.header.saturating_sub(started.elapsed());
        if left.is_zero() {
            client.answer(408, "request header timeout");
            return None;
        }
        // A client silent after part of its head gets only what is left.
        set_read_timeout(&client.control, Some(left));
        match buf.read_from(
            &mut client.reader,
            connect::MAX_HEAD + 1 - head.len().min(connect::MAX_HEAD),
        ) {
            // Out of time: answered 408 above, on the next turn.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok([]) | Err(_) => return None,
            Ok(bytes) => head.extend_from_slice(bytes),
        }
    }
}

/// Dials through the hub and answers the client: `200 Connection
/// Established`, or the error. None when the connection must end (the
/// frontend is removed already).
#[inline(never)]
fn dial(
    hub: &Arc<Hub>,
    client: &mut Client,
    request: &ConnectRequest,
    timeouts: &Timeouts,
) -> Option<Tunnel> {
    let peer = &client.peer;
    let (key, queue) = hub.add_frontend();
    hub.metrics.http_connections.add(&[], 1.0);
    // The 200 is written by the thread that delivers the DIAL_RSP, a
    // wake-up of this one sooner; a TLS client's writer is lent to it for
    // the dial.
    let early = if client.secure {
        let writer = std::mem::replace(&mut client.writer, Box::new(std::io::sink()));
        EarlyAnswer::tls(writer, ESTABLISHED)
    } else {
        EarlyAnswer::new(client.control.clone(), ESTABLISHED)
    };
    hub.answer_early(key, early.clone());
    let random = (crate::sys::random_u64() >> 1) as i64;
    let dial = Message::DialReq {
        protocol: "tcp".into(),
        address: request.address.clone(),
        random,
    };
    hub.from_frontend(key, dial);
    let gone = |hub: &Hub| {
        hub.remove_frontend(key);
        hub.metrics.http_connections.add(&[], -1.0);
        None
    };
    let mut answer = wait_for_dial(&queue, &client.control, timeouts.dial);
    if matches!(answer, Some(Pop::TimedOut)) && !early.cancel() {
        // The 200 went out as the wait ended here: its DIAL_RSP is being
        // queued right behind it.
        answer = Some(queue.pop_timeout(Some(Duration::from_secs(5))));
    }
    if let Some(writer) = early.take_writer() {
        client.writer = writer;
    }
    let Some(answer) = answer else {
        // The client hung up while its dial was pending: it has given up.
        // Removing the frontend cancels the dial at the agent (DIAL_CLS), or
        // closes the connection if the DIAL_RSP won the race (CLOSE_REQ).
        log::debug!(
            "CONNECT {} from {peer}: client left while dialling",
            request.address
        );
        hub.metrics.dial_failures.inc(&["frontend_close"]);
        return gone(hub);
    };
    let outcome = match answer {
        Pop::Item(ToFrontend::Message(Message::DialRsp {
            error, connect_id, ..
        })) if error.is_empty() => Ok(connect_id),
        Pop::Item(ToFrontend::DialFailed { reason, .. }) => {
            Err((status_for(&reason), reason.to_string()))
        }
        Pop::TimedOut => {
            hub.metrics.dial_failures.inc(&["frontend_close"]);
            hub.from_frontend(key, Message::DialCls { random });
            Err((
                504,
                format!(
                    "dial to {} timed out after {:?}",
                    request.address, timeouts.dial
                ),
            ))
        }
        other => Err((502, format!("unexpected answer to the dial: {other:?}"))),
    };
    let connect_id = match outcome {
        Ok(id) => id,
        Err((status, reason)) => {
            log::info!("CONNECT {} from {peer}: {status} {reason}", request.address);
            client.answer(status, &reason);
            return gone(hub);
        }
    };
    log::debug!(
        "CONNECT {} from {peer}: established as connection {connect_id}",
        request.address
    );
    let rest = early.rest();
    if !rest.is_empty()
        && client
            .writer
            .write_all(rest)
            .and_then(|()| client.writer.flush())
            .is_err()
    {
        return gone(hub);
    }
    Some(Tunnel {
        key,
        queue,
        connect_id,
    })
}

/// Copies bytes both ways until either side ends: `early` (bytes the client
/// sent after its head) first. The agent stream's pump reads a plaintext
/// client, and this thread returns at once: the tunnel holds no thread of
/// its own (its end is [`ClientReading::ended`]'s). This thread reads a
/// TLS client (or a plaintext one when there is no pump). What comes for
/// the client is written by the thread that delivers it when the socket
/// takes it at once (plaintext clients), else by a pooled writer thread
/// started when something first has to wait ([`ClientOut`]), or by
/// whoever ends the reading, once the client is done sending.
#[inline(never)]
fn relay(
    hub: &Arc<Hub>,
    client: Client,
    tunnel: Tunnel,
    mut buf: ReadBuf,
    early: Vec<u8>,
    held: Held,
) {
    let Client {
        mut reader,
        writer,
        closer,
        control,
        peer,
        secure,
    } = client;
    let Tunnel {
        key,
        queue,
        connect_id,
    } = tunnel;
    let established = Instant::now();
    if !early.is_empty() {
        hub.from_frontend(
            key,
            Message::Data {
                connect_id,
                error: String::new(),
                data: early.into(),
            },
        );
    }
    let out = Arc::new(ClientOut {
        direct: (!secure).then(|| control.clone()),
        queue,
        writer: std::sync::Mutex::new(Some(writer)),
        closer: Arc::from(closer),
        done: Latch::default(),
        then: std::sync::Mutex::new(None),
    });
    hub.set_frontend_out(key, out.clone());
    let ending = Ending {
        hub: hub.clone(),
        key,
        out: out.clone(),
        established,
        held,
    };
    // A plaintext client is read by its agent stream's pump.
    let ending = match secure {
        false => match hub.pump_for(key, connect_id) {
            Some(pump) => {
                let reading = Arc::new(ClientReading {
                    conn: control.clone(),
                    hub: hub.clone(),
                    key,
                    connect_id,
                    ending: std::sync::Mutex::new(Some(ending)),
                });
                match pump.add(reading.clone()) {
                    Ok(()) => return,
                    // Not added: `ended` is not called, the ending is back.
                    Err(_) => match reading.take_ending() {
                        Some(ending) => ending,
                        None => return,
                    },
                }
            }
            None => ending,
        },
        true => ending,
    };
    loop {
        match buf.read_from(&mut reader, CHUNK) {
            Ok([]) => {
                log::debug!("CONNECT {peer}: client closed connection {connect_id}");
                break;
            }
            Err(e) => {
                log::debug!("CONNECT {peer}: reading connection {connect_id}: {e}");
                break;
            }
            // Sent from the read buffer when the agent's stream is idle.
            Ok(bytes) => {
                if !hub.data_from_frontend(key, connect_id, bytes) {
                    break;
                }
            }
        }
    }
    // This thread may wait: it writes what is queued for the client itself
    // (or waits for the writer that does) before the connection goes.
    let out = ending.out.clone();
    ending.run(true);
    out.done.wait();
}

/// What is left to do once a client is done sending (or gone), and what
/// the connection holds until then.
struct Ending {
    hub: Arc<Hub>,
    key: FrontendKey,
    out: Arc<ClientOut>,
    established: Instant,
    /// The connection's place among the open ones, given up last.
    held: Held,
}

impl Ending {
    /// Closes the tunnel at the agent; data already queued for the client
    /// is still written: by a writer that runs already, else here when
    /// `may_wait` or nothing is queued (a closed, empty queue is done at
    /// once), else by a pooled writer thread. The connection goes when the
    /// writing is over.
    fn run(self, may_wait: bool) {
        let Ending {
            hub,
            key,
            out,
            established,
            held,
        } = self;
        hub.remove_frontend_flushing(key);
        if let Some(writer) = out.take_writer() {
            // Closed (by the removal) and empty: nothing to write, and no
            // wait for the queue either.
            if may_wait || (out.queue.is_closed() && out.queue.is_empty()) {
                out.write(writer);
            } else {
                out.clone().write_elsewhere(writer);
            }
        }
        // The socket was shut down when the writing ended (`ClientOut::end`).
        out.after_done(Box::new(move || {
            hub.metrics.http_connections.add(&[], -1.0);
            hub.metrics
                .connection_duration
                .observe(&[], established.elapsed().as_secs_f64());
            drop(held);
        }));
    }
}

/// A plaintext client as its agent stream's pump reads it.
struct ClientReading {
    conn: Conn,
    hub: Arc<Hub>,
    key: FrontendKey,
    connect_id: i64,
    /// Taken (and run) when the pump is done with the client.
    ending: std::sync::Mutex<Option<Ending>>,
}

impl ClientReading {
    fn take_ending(&self) -> Option<Ending> {
        self.ending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl crate::tunnel::pump::Reading for ClientReading {
    fn fd(&self) -> std::os::fd::RawFd {
        self.conn.as_raw_fd()
    }

    fn data(&self, bytes: &[u8]) -> bool {
        self.hub
            .data_from_frontend(self.key, self.connect_id, bytes)
    }

    /// On the pump's thread, which must not wait on the client: what is
    /// queued for it goes to a writer thread.
    fn ended(&self, why: &str) {
        if !why.is_empty() {
            log::debug!("CONNECT: reading connection {}: {why}", self.connect_id);
        }
        if let Some(ending) = self.take_ending() {
            ending.run(false);
        }
    }
}

/// A CONNECT client's writing side once its tunnel is up (see
/// [`crate::tunnel::server::hub::FrontendOut`]).
struct ClientOut {
    /// The plaintext client's socket (held open for as long as a
    /// delivering thread may write to it); None for TLS, whose records only
    /// the writer writes.
    direct: Option<Conn>,
    queue: Queue<ToFrontend>,
    /// The writer half, until a thread takes it to write: a pooled one
    /// when something waits in the queue, or the tunnel's [`Ending`].
    writer: std::sync::Mutex<Option<Box<dyn Write + Send>>>,
    closer: Arc<dyn Fn() + Send + Sync>,
    /// Set when the writing has ended, or will not start.
    done: Latch,
    /// Runs once `done` is set ([`ClientOut::after_done`]).
    then: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl ClientOut {
    fn take_writer(&self) -> Option<Box<dyn Write + Send>> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Writes what the queue holds until it closes or the agent closes the
    /// connection, in turn with the threads that write directly ([`Queue::
    /// pop_claim`]); then ends the connection (close_notify first, then
    /// the socket, which also wakes the reader if it is still blocked).
    fn write(&self, mut writer: Box<dyn Write + Send>) {
        loop {
            let item = self.queue.pop_claim(None);
            let go_on = match &item {
                Pop::Item(ToFrontend::Message(Message::Data { data, .. })) => {
                    crate::sys::write_all_realigned(&mut writer, data).is_ok()
                }
                Pop::Item(ToFrontend::Message(Message::CloseRsp { .. })) => false,
                Pop::Item(_) => true,
                Pop::Closed | Pop::TimedOut => break,
            };
            self.queue.release();
            if !go_on {
                break;
            }
        }
        let _ = writer.flush();
        drop(writer);
        self.end();
    }

    /// Closes the queue, waits out a direct write under way (none starts
    /// on a closed queue), and ends the connection.
    fn end(&self) {
        self.queue.close_and_clear();
        let _ = self.queue.pop_claim(None);
        (self.closer)();
        let then = {
            let mut then = self.lock_then();
            self.done.set();
            then.take()
        };
        if let Some(then) = then {
            then();
        }
    }

    /// [`ClientOut::write`] on a pooled writer thread; when none can be
    /// had, nobody can write: the connection ends (its reader wakes).
    fn write_elsewhere(self: Arc<Self>, writer: Box<dyn Write + Send>) {
        let out = self.clone();
        let spawned = crate::shutdown::helpers().spawn("conn-write", move || out.write(writer));
        if let Err(e) = spawned {
            log::error!("CONNECT: starting the writer thread: {e}");
            self.end();
        }
    }

    /// Runs `then` once the writing has ended: now, if it has.
    fn after_done(&self, then: Box<dyn FnOnce() + Send>) {
        let mut slot = self.lock_then();
        if self.done.is_set() {
            drop(slot);
            then();
        } else {
            *slot = Some(then);
        }
    }

    fn lock_then(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn FnOnce() + Send>>> {
        self.then
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl super::hub::FrontendOut for ClientOut {
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        self.direct.as_ref().map(|conn| conn.as_raw_fd())
    }

    fn wake(self: Arc<Self>) {
        // The frontend's own thread may have taken what woke this (a
        // DIAL_RSP it was waiting for, queued as the tunnel's writing side
        // was being set): nothing to write, no writer to start.
        if self.queue.is_empty() && !self.queue.is_closed() {
            return;
        }
        let Some(writer) = self.take_writer() else {
            return; // being written already, or done
        };
        self.write_elsewhere(writer);
    }
}

/// The first and the longest pause between two checks for a client that
/// hung up while its dial is pending.
const HANGUP_CHECK: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));

/// Waits up to `limit` for the dial's answer. None when the client hangs up
/// first (checked between waits, at growing intervals: a pending dial costs
/// a few wake-ups a second at most).
fn wait_for_dial(
    queue: &Queue<ToFrontend>,
    control: &Conn,
    limit: Duration,
) -> Option<Pop<ToFrontend>> {
    let fd = control.as_raw_fd();
    let deadline = Instant::now() + limit;
    let mut pause = HANGUP_CHECK.0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match queue.pop_timeout(Some(left.min(pause))) {
            Pop::TimedOut if left > pause => {
                if crate::sys::peer_hung_up(fd) {
                    return None;
                }
                pause = (pause * 2).min(HANGUP_CHECK.1);
            }
            other => return Some(other),
        }
    }
}

fn set_read_timeout(conn: &Conn, timeout: Option<Duration>) {
    let _ = match conn {
        Conn::Tcp(s) => s.set_read_timeout(timeout),
        Conn::Unix(s) => s.set_read_timeout(timeout),
    };
}
