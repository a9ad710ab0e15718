//! The HTTP/2 connection: stream states, flow control, SETTINGS, PING,
//! GOAWAY and HPACK, run by a reader thread per connection and a writer
//! that runs only while it has work.
//!
//! Owns: the reader thread (socket -> frames -> state; it alone decodes
//! HPACK), the writer (a pooled job that writes what senders queued and
//! did not write themselves, sends keepalive PINGs, closes a connection
//! whose PING goes unanswered, and ends a while after its last work: an
//! idle connection, such as kube-apiserver's connection per tunnel, holds
//! no writer thread; [`timer`] starts it again when a keepalive or
//! handshake deadline comes), and the [`Stream`] handles applications
//! send and receive on. One batch is written at a time (`State::writing`): a sender
//! that finds no batch in progress writes its own frames, which spares a
//! thread hand-off per message.
//! Must not: know about gRPC; block on the socket while holding the state
//! lock; buffer without bound. A stream's receive buffer is bounded by the
//! window we advertised, and the connection's by the connection window;
//! credit is returned only when the application takes the data, so a slow
//! consumer back-pressures its peer. Senders wait on a condition variable
//! for flow-control credit and for room in the bounded output buffer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::frame::{self, ErrorCode, Frame, setting};
use super::transport::Transport;
use crate::shutdown::Worker;

/// One header field: a lower-case name and an opaque value.
pub type Field = (String, Vec<u8>);

/// Limits and timers of one connection. The defaults suit gRPC tunnels:
/// large windows for throughput, keepalive on.
#[derive(Clone, Debug)]
pub struct Config {
    /// The largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_size: u32,
    /// The receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// The receive window of the whole connection.
    pub connection_window: u32,
    /// Peer-initiated streams open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// The largest decoded header list we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// Send a PING after this long without receiving anything; `None` turns
    /// keepalive off. grpc-go and C-core servers, by default, count PINGs
    /// on a quiet connection that come more often than every 5 minutes as
    /// abuse (GOAWAY `too_many_pings`), hence the default; roles pass their
    /// `--keepalive-time` here.
    pub keepalive_interval: Option<Duration>,
    /// Close the connection when a PING is not answered within this time.
    pub keepalive_timeout: Duration,
    /// Server side: the client's preface and first SETTINGS frame must
    /// arrive within this from the start (a slowloris guard; servers pass
    /// what is left of their header timeout after the TLS handshake). Once
    /// they have, the connection lives under keepalive.
    pub handshake_timeout: Duration,
    /// Bytes queued for the writer before senders wait.
    pub max_send_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 64 * 1024,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_concurrent_streams: 1000,
            max_header_list_size: 64 * 1024,
            keepalive_interval: Some(Duration::from_secs(5 * 60 + 10)),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(20),
            max_send_buffer: 512 * 1024,
        }
    }
}

/// Why a connection or stream operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Reading or writing the transport failed.
    Io { peer: String, err: String },
    /// The peer closed the transport.
    Eof { peer: String },
    /// The peer broke the protocol; we sent GOAWAY with this code.
    Protocol { peer: String, err: frame::Error },
    /// The peer sent GOAWAY with an error code, or closed after a GOAWAY.
    GoAway {
        peer: String,
        code: ErrorCode,
        debug: String,
    },
    /// A keepalive PING went unanswered.
    KeepaliveTimeout { peer: String, after: Duration },
    /// This side closed the connection.
    Closed,
    /// The stream was reset (by the peer when `remote`).
    Reset {
        stream: u32,
        code: ErrorCode,
        remote: bool,
    },
    /// Sending on a stream whose sending side already ended.
    SendClosed { stream: u32 },
    /// A header list larger than the peer accepts.
    HeadersTooLarge { size: usize, limit: u32 },
    /// No more stream ids, or the peer refuses new streams (GOAWAY).
    NoNewStreams { peer: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { peer, err } => write!(f, "HTTP/2 connection to {peer}: {err}"),
            Error::Eof { peer } => write!(f, "HTTP/2 connection to {peer}: closed by peer"),
            Error::Protocol { peer, err } => write!(f, "HTTP/2 connection to {peer}: {err}"),
            Error::GoAway { peer, code, debug } => {
                write!(f, "HTTP/2 connection to {peer}: GOAWAY {code}")?;
                if !debug.is_empty() {
                    write!(f, " ({debug})")?;
                }
                Ok(())
            }
            Error::KeepaliveTimeout { peer, after } => {
                write!(
                    f,
                    "HTTP/2 connection to {peer}: keepalive PING unanswered after {after:?}"
                )
            }
            Error::Closed => write!(f, "HTTP/2 connection closed"),
            Error::Reset {
                stream,
                code,
                remote: true,
            } => write!(f, "stream {stream} reset by peer: {code}"),
            Error::Reset {
                stream,
                code,
                remote: false,
            } => write!(f, "stream {stream} reset: {code}"),
            Error::SendClosed { stream } => {
                write!(f, "stream {stream}: sending side already closed")
            }
            Error::HeadersTooLarge { size, limit } => {
                write!(
                    f,
                    "header list of {size} bytes exceeds the peer's limit of {limit}"
                )
            }
            Error::NoNewStreams { peer } => {
                write!(f, "HTTP/2 connection to {peer}: no new streams allowed")
            }
        }
    }
}

impl std::error::Error for Error {}

/// What a stream delivers, in order: a header block (request or response
/// headers, then possibly trailers), data, and the end.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Headers {
        fields: Vec<Field>,
        end_stream: bool,
    },
    Data(Vec<u8>),
}

/// What a tapped stream's consumer receives (see [`Stream::tap`]), in
/// the order the peer sent it.
#[derive(Debug)]
pub enum Tapped {
    /// A data chunk, or a header block after the first (trailers).
    Event(Event),
    /// The peer ended the stream (after the data and trailers).
    End,
    /// The peer reset the stream, or the connection ended, before that.
    Failed(Error),
}

/// A tapped stream's consumer. It runs on the connection's reader thread,
/// outside the connection's lock, and must not block: every stream of the
/// connection waits while it runs.
pub type Tap = Box<dyn FnMut(Tapped) + Send>;
type SharedTap = Arc<Mutex<Tap>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Client,
    Server,
}

struct PeerSettings {
    max_frame_size: u32,
    initial_window: u32,
    max_concurrent_streams: u32,
    max_header_list_size: u32,
}

struct StreamState {
    cv: Arc<Condvar>,
    local: bool,
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    events: VecDeque<Event>,
    local_closed: bool,
    remote_closed: bool,
    reset: Option<(ErrorCode, bool)>,
    send_blocked: bool,
    /// Header blocks received so far.
    blocks: u8,
    /// Threads sleeping on `cv` (a receiver, a sender).
    waiters: u32,
    /// Where the peer's frames go instead of `events` ([`Stream::tap`]),
    /// and whether it was given its last event.
    tap: Option<SharedTap>,
    tap_done: bool,
}

impl StreamState {
    /// Both sides ended (or the stream was reset).
    fn is_closed(&self) -> bool {
        self.local_closed && self.remote_closed
    }
}

struct State {
    out: Vec<u8>,
    streams: HashMap<u32, StreamState>,
    next_local_id: u32,
    last_peer_id: u32,
    peer: PeerSettings,
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    encoder: loona_hpack::Encoder<'static>,
    pending_table_size: Option<usize>,
    accept: VecDeque<u32>,
    got_settings: bool,
    goaway_received: Option<u32>,
    goaway_sent: bool,
    closed: Option<Error>,
    ping_sent: Option<(Instant, [u8; 8])>,
    ping_counter: u64,
    last_read: Instant,
    /// When the connection started (for the handshake timeout).
    started: Instant,
    /// The writer sleeps on `writer_cv`: only then is a wake-up needed
    /// (a condvar notify is a syscall even without waiters).
    writer_waiting: bool,
    /// A writer job runs (waiting or not): a kick then wakes it, rather
    /// than starting another.
    writer_running: bool,
    /// The last writer job has flushed and closed the transport.
    writer_done: bool,
    /// The reader of a plaintext connection is handling what it read, and
    /// writes what that queues itself right after ([`flush_now`]): a kick
    /// meanwhile need not wake or start the writer.
    reader_flushes: bool,
    /// A thread (the writer, or a sender writing its own frames) is
    /// writing a batch taken from `out`: nobody else may write until it
    /// clears this, so batches reach the socket in order.
    writing: bool,
    /// The buffer the next batch is swapped into (kept for its capacity).
    spare: Vec<u8>,
    /// Events for tapped streams, in order, for the reader thread to
    /// deliver once it has let go of the lock.
    tap_pending: Vec<(SharedTap, Tapped)>,
}

struct Shared {
    /// This connection, for starting its writer from where only a
    /// reference is at hand.
    me: Weak<Shared>,
    /// The connection's id with [`timer`].
    id: u64,
    state: Mutex<State>,
    /// Accept queue, stream slots, connection end.
    conn_cv: Condvar,
    /// Output queued, keepalive, connection end.
    writer_cv: Condvar,
    config: Config,
    role: Role,
    peer: String,
    secure: bool,
    /// A plaintext socket: the reader writes its answers itself
    /// ([`flush_now`]).
    plain_fd: Option<std::os::fd::RawFd>,
    closer: Box<dyn Fn() + Send + Sync>,
    /// The transport's writer half, used by whoever holds `State::writing`;
    /// taken (dropped: TLS close_notify) when the last writer job ends.
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    /// A stream was ever tapped: the reader then looks for tap events.
    tapped: AtomicBool,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // The state stays consistent between statements; a panicking thread
    // must not take every other stream down with a second panic.
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait<'a>(
    cv: &Condvar,
    guard: MutexGuard<'a, State>,
    timeout: Option<Duration>,
) -> MutexGuard<'a, State> {
    match timeout {
        Some(t) => {
            cv.wait_timeout(guard, t)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
        None => cv.wait(guard).unwrap_or_else(PoisonError::into_inner),
    }
}

/// Default HPACK table size (we never announce another).
pub(super) const TABLE_SIZE: usize = 4096;
/// The writer gives up queuing control frames past this (a PING or
/// SETTINGS flood from a peer that does not read).
const CONTROL_FLOOD_LIMIT: usize = 4 * 1024 * 1024;
/// DATA frames we send stay this small even when the peer accepts larger
/// ones (C-core announces 4 MiB): the output queue then overshoots its
/// bound by at most one such frame, and streams interleave finely.
const MAX_DATA_FRAME: u32 = 64 * 1024;

impl State {
    /// Output was queued (or the connection closed, or a deadline
    /// changed): wakes the writer, or starts one when none runs.
    fn kick(&mut self, shared: &Shared) {
        if self.reader_flushes && self.closed.is_none() {
            return; // the reader writes it, right after its read
        }
        self.wake_writer(shared);
    }

    /// Wakes the writer, or starts one when none runs (also while the
    /// reader flushes: the timer's deadlines are the writer's).
    fn wake_writer(&mut self, shared: &Shared) {
        if self.writer_waiting {
            self.writer_waiting = false;
            shared.writer_cv.notify_one();
        } else if !self.writer_running && !self.writer_done {
            self.start_writer(shared);
        }
    }

    /// Starts a writer job on a pooled thread. If no thread can be had,
    /// the connection cannot write: its socket is shut down, which ends
    /// the reader, and whoever drops the connection finishes the writer's
    /// work ([`Connection`]'s drop).
    fn start_writer(&mut self, shared: &Shared) {
        let Some(me) = shared.me.upgrade() else {
            return;
        };
        self.writer_running = true;
        if let Err(err) = crate::shutdown::helpers().spawn("h2-writer", move || write_loop(&me)) {
            log::error!("HTTP/2 peer {}: starting its writer: {err}", shared.peer);
            self.writer_running = false;
            (shared.closer)();
        }
    }

    /// Takes what is queued as the next batch to write, marking the
    /// connection as being written (`writing`) and making room for the
    /// senders that wait for it.
    fn take_batch(&mut self) -> Vec<u8> {
        self.writing = true;
        let mut batch = std::mem::take(&mut self.spare);
        std::mem::swap(&mut self.out, &mut batch);
        self.notify_senders();
        batch
    }

    fn fail_stream(&mut self, id: u32, code: ErrorCode) {
        frame::write_rst_stream(&mut self.out, id, code);
        if let Some(s) = self.streams.get_mut(&id) {
            s.reset.get_or_insert((code, false));
            s.local_closed = true;
            s.remote_closed = true;
            s.cv.notify_all();
        }
        self.tap_event(id, || {
            Tapped::Failed(Error::Reset {
                stream: id,
                code,
                remote: false,
            })
        });
    }

    /// Queues an event for stream `id`'s tap, if it has one and has not had
    /// its last event; returns whether the stream is tapped.
    fn tap_event(&mut self, id: u32, event: impl FnOnce() -> Tapped) -> bool {
        let State {
            streams,
            tap_pending,
            ..
        } = self;
        let Some(s) = streams.get_mut(&id) else {
            return false;
        };
        if s.tap.is_none() && !s.tap_done {
            return false;
        }
        if let Some(tap) = &s.tap {
            let event = event();
            let tap = if matches!(event, Tapped::End | Tapped::Failed(_)) {
                // Its last event: the connection lets go of the consumer
                // (which may own what owns this stream).
                s.tap_done = true;
                s.tap.take()
            } else {
                Some(tap.clone())
            };
            tap_pending.extend(tap.map(|tap| (tap, event)));
        }
        true
    }

    fn close(&mut self, shared: &Shared, err: Error) {
        if self.closed.is_some() {
            return;
        }
        for s in self.streams.values_mut() {
            s.cv.notify_all();
            if let Some(tap) = s.tap.take() {
                s.tap_done = true;
                self.tap_pending.push((tap, Tapped::Failed(err.clone())));
            }
        }
        self.closed = Some(err);
        shared.conn_cv.notify_all();
        shared.writer_cv.notify_all();
        if !self.writer_running && !self.writer_done {
            self.start_writer(shared);
        }
    }

    fn notify_senders(&mut self) {
        for s in self.streams.values_mut() {
            if s.send_blocked && s.waiters > 0 {
                s.cv.notify_all();
            }
        }
    }

    fn is_closed_id(&self, id: u32, role: Role) -> bool {
        let local = (id % 2 == 1) == (role == Role::Client);
        if local {
            id < self.next_local_id
        } else {
            id <= self.last_peer_id
        }
    }

    /// Gives back `n` bytes of credit, sending WINDOW_UPDATE once a quarter
    /// of the window has been consumed (fewer, larger updates).
    /// Returns whether a WINDOW_UPDATE was queued.
    fn release(&mut self, config: &Config, id: Option<u32>, n: u32) -> bool {
        let mut queued = false;
        self.recv_unacked += n;
        if self.recv_unacked >= config.connection_window / 4 {
            frame::write_window_update(&mut self.out, 0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
            queued = true;
        }
        if let Some(s) = id.and_then(|id| self.streams.get_mut(&id).map(|s| (id, s))) {
            let (id, s) = s;
            if s.remote_closed {
                return queued;
            }
            s.recv_unacked += n;
            if s.recv_unacked >= config.stream_window / 4 {
                frame::write_window_update(&mut self.out, id, s.recv_unacked);
                s.recv_window += i64::from(s.recv_unacked);
                s.recv_unacked = 0;
                queued = true;
            }
        }
        queued
    }

    fn maybe_finish(&mut self, shared: &Shared) {
        if (self.goaway_sent || self.goaway_received.is_some()) && self.streams.is_empty() {
            let err = match self.goaway_received {
                Some(_) => Error::GoAway {
                    peer: shared.peer.clone(),
                    code: ErrorCode::NO_ERROR,
                    debug: String::new(),
                },
                None => Error::Closed,
            };
            self.close(shared, err);
        }
    }

    fn encode_headers(
        &mut self,
        shared: &Shared,
        id: u32,
        fields: &[Field],
        end_stream: bool,
    ) -> Result<(), Error> {
        let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        if size > self.peer.max_header_list_size as usize {
            return Err(Error::HeadersTooLarge {
                size,
                limit: self.peer.max_header_list_size,
            });
        }
        let mut block = Vec::with_capacity(size);
        if let Some(table) = self.pending_table_size.take() {
            // Dynamic table size update (RFC 7541 section 6.3).
            let _ = loona_hpack::encoder::encode_integer_into(table, 5, 0x20, &mut block);
        }
        let headers = fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice()));
        // Writing into a Vec cannot fail.
        let _ = self.encoder.encode_into(headers, &mut block);
        frame::write_headers(
            &mut self.out,
            id,
            &block,
            end_stream,
            self.peer.max_frame_size,
        );
        self.kick(shared);
        Ok(())
    }
}

/// One HTTP/2 connection (client or server). Dropping it closes the
/// connection and waits for its reader and its writer to end.
pub struct Connection {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
}

impl Connection {
    /// Starts the client side: sends the preface and our SETTINGS.
    pub fn client(transport: Transport, config: Config) -> Result<Connection, Error> {
        Self::start(transport, config, Role::Client)
    }

    /// Starts the server side: expects the preface, sends our SETTINGS.
    pub fn server(transport: Transport, config: Config) -> Result<Connection, Error> {
        Self::start(transport, config, Role::Server)
    }

    /// The connection's state and its writer; the reader half is the
    /// caller's to run.
    fn setup(
        transport: Transport,
        config: Config,
        role: Role,
    ) -> Result<(Connection, Box<dyn super::transport::ReadHalf>), Error> {
        let Transport {
            reader,
            writer,
            closer,
            peer,
            secure,
            plain_fd,
        } = transport;
        let mut config = config;
        config.max_frame_size = config
            .max_frame_size
            .clamp(frame::DEFAULT_MAX_FRAME_SIZE, frame::MAX_MAX_FRAME_SIZE);
        config.stream_window = config
            .stream_window
            .clamp(frame::DEFAULT_WINDOW, frame::MAX_WINDOW);
        config.connection_window = config
            .connection_window
            .clamp(frame::DEFAULT_WINDOW, frame::MAX_WINDOW);
        config.max_send_buffer = config.max_send_buffer.max(64 * 1024);
        let mut out = Vec::new();
        if role == Role::Client {
            out.extend_from_slice(frame::PREFACE);
        }
        let mut params = vec![
            (setting::INITIAL_WINDOW_SIZE, config.stream_window),
            (setting::MAX_FRAME_SIZE, config.max_frame_size),
            (setting::MAX_HEADER_LIST_SIZE, config.max_header_list_size),
        ];
        match role {
            Role::Client => params.push((setting::ENABLE_PUSH, 0)),
            Role::Server => params.push((
                setting::MAX_CONCURRENT_STREAMS,
                config.max_concurrent_streams,
            )),
        }
        frame::write_settings(&mut out, &params);
        if config.connection_window > frame::DEFAULT_WINDOW {
            frame::write_window_update(
                &mut out,
                0,
                config.connection_window - frame::DEFAULT_WINDOW,
            );
        }
        let state = State {
            out,
            streams: HashMap::new(),
            next_local_id: if role == Role::Client { 1 } else { 2 },
            last_peer_id: 0,
            peer: PeerSettings {
                max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
                initial_window: frame::DEFAULT_WINDOW,
                max_concurrent_streams: u32::MAX,
                max_header_list_size: u32::MAX,
            },
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(config.connection_window),
            recv_unacked: 0,
            encoder: loona_hpack::Encoder::new(),
            pending_table_size: None,
            accept: VecDeque::new(),
            got_settings: false,
            goaway_received: None,
            goaway_sent: false,
            closed: None,
            ping_sent: None,
            ping_counter: 0,
            last_read: Instant::now(),
            started: Instant::now(),
            writer_waiting: false,
            writer_running: false,
            writer_done: false,
            reader_flushes: false,
            writing: false,
            spare: Vec::new(),
            tap_pending: Vec::new(),
        };
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            id: timer::next_id(),
            state: Mutex::new(state),
            conn_cv: Condvar::new(),
            writer_cv: Condvar::new(),
            config,
            role,
            peer,
            secure,
            plain_fd,
            closer,
            writer: Mutex::new(Some(writer)),
            tapped: AtomicBool::new(false),
        });
        // Our preface and SETTINGS are queued. Over a plaintext socket the
        // reader sends them as it starts ([`flush_now`]), and no writer
        // starts yet: the timer starts one at the first deadline (the
        // client's handshake time, the first keepalive PING), as for an
        // idle connection. Otherwise the first writer job sends them (a
        // pooled job: a connection per tunnel, as kube-apiserver opens
        // them, must not cost a thread start).
        let first_deadline = [
            (role == Role::Server).then_some(shared.config.handshake_timeout),
            shared.config.keepalive_interval,
        ]
        .into_iter()
        .flatten()
        .min();
        let timed = shared.plain_fd.is_some()
            && first_deadline.is_none_or(|d| timer::schedule(&shared, Instant::now() + d));
        if !timed {
            let mut state = lock(&shared);
            state.kick(&shared);
            if !state.writer_running {
                return Err(Error::Io {
                    peer: shared.peer.clone(),
                    err: "no thread for its writer".into(),
                });
            }
        }
        Ok((
            Connection {
                shared,
                workers: Vec::new(),
            },
            reader,
        ))
    }

    fn start(transport: Transport, config: Config, role: Role) -> Result<Connection, Error> {
        let (mut conn, reader) = Self::setup(transport, config, role)?;
        let r = conn.shared.clone();
        match Worker::pooled("h2-reader", move || read_loop(&r, reader, None)) {
            Ok(reader) => conn.workers.push(reader),
            Err(err) => {
                return Err(Error::Io {
                    peer: conn.shared.peer.clone(),
                    err: err.to_string(),
                });
            }
        }
        Ok(conn)
    }

    /// The server side, read on this thread: until the connection ends,
    /// each stream the peer opens goes to `on_stream` (on this thread, as
    /// the frames that opened it are handled: it must not wait for the
    /// peer), in place of [`Connection::accept`]. Returns once the
    /// connection has ended and its writer is done: a connection served
    /// this way costs one thread fewer, and its first stream no thread
    /// hand-off.
    pub fn serve_here(
        transport: Transport,
        config: Config,
        mut on_stream: impl FnMut(Stream),
    ) -> Result<(), Error> {
        let (conn, reader) = Self::setup(transport, config, Role::Server)?;
        read_loop(&conn.shared, reader, Some(&mut on_stream));
        drop(conn); // closes, and waits for the writer
        Ok(())
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Whether the transport is TLS (for the `:scheme` of requests).
    pub fn is_secure(&self) -> bool {
        self.shared.secure
    }

    /// Opens a stream (client) and sends its request headers. Waits while
    /// the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached.
    pub fn open_stream(&self, fields: &[Field], end_stream: bool) -> Result<Stream, Error> {
        let shared = &self.shared;
        let mut state = lock(shared);
        loop {
            if let Some(err) = &state.closed {
                return Err(err.clone());
            }
            if state.goaway_received.is_some()
                || state.goaway_sent
                || state.next_local_id > frame::MAX_WINDOW
            {
                return Err(Error::NoNewStreams {
                    peer: shared.peer.clone(),
                });
            }
            let open = state
                .streams
                .values()
                .filter(|s| s.local && !s.is_closed())
                .count();
            if (open as u64) < u64::from(state.peer.max_concurrent_streams) {
                break;
            }
            state = wait(&shared.conn_cv, state, None);
        }
        let id = state.next_local_id;
        state.next_local_id += 2;
        let cv = Arc::new(Condvar::new());
        let stream = StreamState {
            cv: cv.clone(),
            local: true,
            send_window: i64::from(state.peer.initial_window),
            recv_window: i64::from(shared.config.stream_window),
            recv_unacked: 0,
            events: VecDeque::new(),
            local_closed: end_stream,
            remote_closed: false,
            reset: None,
            send_blocked: false,
            blocks: 0,
            waiters: 0,
            tap: None,
            tap_done: false,
        };
        state.streams.insert(id, stream);
        if let Err(err) = state.encode_headers(shared, id, fields, end_stream) {
            state.streams.remove(&id);
            return Err(err);
        }
        Ok(Stream {
            shared: shared.clone(),
            id,
            cv,
        })
    }

    /// Waits for the next peer-initiated stream (server). `None` once the
    /// connection has closed or is going away.
    pub fn accept(&self) -> Option<Stream> {
        let shared = &self.shared;
        let mut state = lock(shared);
        loop {
            if let Some(id) = state.accept.pop_front() {
                if let Some(s) = state.streams.get(&id) {
                    let cv = s.cv.clone();
                    return Some(Stream {
                        shared: shared.clone(),
                        id,
                        cv,
                    });
                }
                continue;
            }
            if state.closed.is_some() {
                return None;
            }
            state = wait(&shared.conn_cv, state, None);
        }
    }

    /// Graceful shutdown: GOAWAY(NO_ERROR) with the last stream we accepted;
    /// open streams finish, then the connection closes.
    pub fn goaway(&self) {
        graceful_goaway(&self.shared);
    }

    /// Closes now: GOAWAY(NO_ERROR), then the transport. Open streams fail.
    pub fn close(&self) {
        close_now(&self.shared);
    }

    /// Why the connection ended, once it has.
    pub fn closed(&self) -> Option<Error> {
        lock(&self.shared).closed.clone()
    }

    /// Waits until the connection has ended (both threads finish soon after).
    pub fn wait_closed(&self, timeout: Option<Duration>) -> Option<Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.shared);
        loop {
            if let Some(err) = &state.closed {
                return Some(err.clone());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return None,
                },
                None => None,
            };
            state = wait(&self.shared.conn_cv, state, left);
        }
    }

    /// A cheap handle that can close this connection from another thread
    /// (for shutdown wake-ups).
    pub fn closer(&self) -> Closer {
        Closer {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
        for w in self.workers.drain(..) {
            w.join();
        }
        // The last writer job flushes, then closes the transport; when no
        // thread could be had for it, this thread does its work.
        let shared = &self.shared;
        let mut state = lock(shared);
        while !state.writer_done {
            if !state.writer_running {
                state.writer_running = true;
                drop(state);
                write_loop(shared);
                state = lock(shared);
                continue;
            }
            state = wait(&shared.conn_cv, state, None);
        }
    }
}

/// Closes a connection from anywhere (see [`Connection::closer`]).
#[derive(Clone)]
pub struct Closer {
    shared: Arc<Shared>,
}

impl Closer {
    /// As [`Connection::close`].
    pub fn close(&self) {
        close_now(&self.shared);
    }

    /// As [`Connection::goaway`].
    pub fn goaway(&self) {
        graceful_goaway(&self.shared);
    }
}

fn graceful_goaway(shared: &Shared) {
    let mut state = lock(shared);
    if state.goaway_sent || state.closed.is_some() {
        return;
    }
    state.goaway_sent = true;
    let last = state.last_peer_id;
    frame::write_goaway(&mut state.out, last, ErrorCode::NO_ERROR, b"");
    state.kick(shared);
    shared.conn_cv.notify_all();
    state.maybe_finish(shared);
}

fn close_now(shared: &Shared) {
    let mut state = lock(shared);
    if !state.goaway_sent && state.closed.is_none() {
        state.goaway_sent = true;
        let last = state.last_peer_id;
        frame::write_goaway(&mut state.out, last, ErrorCode::NO_ERROR, b"");
    }
    state.close(shared, Error::Closed);
}

/// One HTTP/2 stream. All methods take `&self`, so one thread can send
/// while another receives. Dropping it before both sides ended resets the
/// stream (CANCEL), or NO_ERROR when only the peer's side is still open.
pub struct Stream {
    shared: Arc<Shared>,
    id: u32,
    cv: Arc<Condvar>,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Sends a header block (response headers or trailers).
    pub fn send_headers(&self, fields: &[Field], end_stream: bool) -> Result<(), Error> {
        let shared = &*self.shared;
        let mut state = self.wait_for_room()?;
        state.encode_headers(shared, self.id, fields, end_stream)?;
        if end_stream {
            self.end_local(&mut state);
        }
        Ok(())
    }

    fn wait_for_room(&self) -> Result<MutexGuard<'_, State>, Error> {
        let shared = &*self.shared;
        let mut state = lock(shared);
        loop {
            self.check_send(&state)?;
            if state.out.len() < shared.config.max_send_buffer {
                return Ok(state);
            }
            if let Some(s) = state.streams.get_mut(&self.id) {
                s.send_blocked = true;
            }
            state = self.wait(state, None);
        }
    }

    fn check_send(&self, state: &State) -> Result<(), Error> {
        if let Some(err) = &state.closed {
            return Err(err.clone());
        }
        match state.streams.get(&self.id) {
            Some(s) if s.reset.is_some() => {
                let (code, remote) = s.reset.unwrap_or((ErrorCode::CANCEL, false));
                Err(Error::Reset {
                    stream: self.id,
                    code,
                    remote,
                })
            }
            Some(s) if !s.local_closed => Ok(()),
            _ => Err(Error::SendClosed { stream: self.id }),
        }
    }

    fn end_local(&self, state: &mut State) {
        if let Some(s) = state.streams.get_mut(&self.id) {
            s.local_closed = true;
        }
        self.shared.conn_cv.notify_all();
    }

    /// Sends data, waiting for flow-control credit; never exceeds the
    /// peer's windows or frame size.
    pub fn send_data(&self, data: &[u8], end_stream: bool) -> Result<(), Error> {
        self.send_data_parts(&[], data, end_stream)
    }

    /// Sends `head` followed by `body` as one run of DATA frames, without
    /// concatenating them first (a gRPC prefix and its message).
    pub fn send_data_parts(
        &self,
        mut head: &[u8],
        mut body: &[u8],
        end_stream: bool,
    ) -> Result<(), Error> {
        let shared = &*self.shared;
        let mut state = lock(shared);
        loop {
            self.check_send(&state)?;
            let room = state.out.len() < shared.config.max_send_buffer;
            let max_frame = state.peer.max_frame_size.min(MAX_DATA_FRAME) as i64;
            let conn_window = state.send_window;
            let Some(s) = state.streams.get_mut(&self.id) else {
                return Err(Error::SendClosed { stream: self.id });
            };
            let credit = s.send_window.min(conn_window).min(max_frame);
            let total = head.len() + body.len();
            if total == 0 || (room && credit > 0) {
                let n = total.min(credit.max(0) as usize);
                let last = n == total;
                s.send_window -= n as i64;
                s.send_blocked = false;
                state.send_window -= n as i64;
                let h = n.min(head.len());
                let header = frame::data_header(self.id, n, end_stream && last);
                let parts = [&header[..], &head[..h], &body[..n - h]];
                if last {
                    if end_stream {
                        self.end_local(&mut state);
                    }
                    if state.writing {
                        queue_parts(&mut state.out, &parts);
                    } else {
                        // Written from where it lies, behind what is queued.
                        drop(write_batch_with(shared, state, &parts));
                    }
                    return Ok(());
                }
                queue_parts(&mut state.out, &parts);
                (head, body) = (&head[h..], &body[n - h..]);
                continue;
            }
            // Out of credit or room: write what is queued (ours among it)
            // unless a batch is already being written, then wait.
            if !state.writing && !state.out.is_empty() {
                state = write_batch(shared, state);
                continue;
            }
            if let Some(s) = state.streams.get_mut(&self.id) {
                s.send_blocked = true;
            }
            state = self.wait(state, None);
        }
    }

    /// Sends `head` then `body` as one DATA frame if that needs no
    /// waiting: the windows and the peer's frame size take all of it and
    /// the output buffer has room. `Ok(false)` (nothing sent) otherwise,
    /// for a caller that must not wait on the peer (it queues instead).
    pub fn try_send_data_parts(&self, head: &[u8], body: &[u8]) -> Result<bool, Error> {
        let shared = &*self.shared;
        let mut state = lock(shared);
        self.check_send(&state)?;
        let max_frame = state.peer.max_frame_size.min(MAX_DATA_FRAME) as i64;
        let conn_window = state.send_window;
        let room = state.out.len() < shared.config.max_send_buffer;
        let Some(s) = state.streams.get_mut(&self.id) else {
            return Err(Error::SendClosed { stream: self.id });
        };
        let n = head.len() + body.len();
        if !room || (n as i64) > s.send_window.min(conn_window).min(max_frame) {
            return Ok(false);
        }
        s.send_window -= n as i64;
        state.send_window -= n as i64;
        let header = frame::data_header(self.id, n, false);
        let parts = [&header[..], head, body];
        if state.writing {
            queue_parts(&mut state.out, &parts);
        } else {
            drop(write_batch_with(shared, state, &parts));
        }
        Ok(true)
    }

    /// Sleeps on this stream's condition variable, counted as a waiter.
    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        if let Some(s) = state.streams.get_mut(&self.id) {
            s.waiters += 1;
        }
        state = wait(&self.cv, state, timeout);
        if let Some(s) = state.streams.get_mut(&self.id) {
            s.waiters -= 1;
        }
        state
    }

    /// The next event: a header block or a chunk of data. `Ok(None)` once
    /// the peer ended the stream. Taking data returns its flow-control
    /// credit to the peer.
    pub fn recv(&self) -> Result<Option<Event>, Error> {
        self.recv_timeout(None).map(|e| e.flatten())
    }

    /// As [`Stream::recv`], but waits at most `timeout`: `Ok(None)` when
    /// it passed, `Ok(Some(None))` at the end of the stream,
    /// `Ok(Some(Some(event)))` for an event.
    pub fn recv_timeout(&self, timeout: Option<Duration>) -> Result<Option<Option<Event>>, Error> {
        let shared = &*self.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(shared);
        loop {
            let Some(s) = state.streams.get_mut(&self.id) else {
                return Err(state.closed.clone().unwrap_or(Error::Reset {
                    stream: self.id,
                    code: ErrorCode::STREAM_CLOSED,
                    remote: false,
                }));
            };
            if let Some(event) = s.events.pop_front() {
                if let Event::Data(data) = &event {
                    let n = data.len() as u32;
                    if state.release(&shared.config, Some(self.id), n) {
                        state.kick(shared);
                    }
                }
                return Ok(Some(Some(event)));
            }
            if let Some((code, remote)) = s.reset {
                return Err(Error::Reset {
                    stream: self.id,
                    code,
                    remote,
                });
            }
            if s.remote_closed {
                return Ok(Some(None));
            }
            if let Some(err) = &state.closed {
                return Err(err.clone());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(None),
                },
                None => None,
            };
            state = self.wait(state, left);
        }
    }

    /// Hands what the peer sends on this stream from now on to `tap`, on
    /// the connection's reader thread, instead of queueing it for
    /// [`Stream::recv`] (which must not be called afterwards): a consumer
    /// that never blocks saves a thread hand-off per frame. Events already
    /// queued go to `tap` first, on this thread. Data is credited back to
    /// the peer as `tap` receives it, so `tap` bounds what it keeps.
    /// [`Tapped::End`] or [`Tapped::Failed`] comes last, once; a reset from
    /// this side is not reported.
    pub fn tap(&self, tap: Tap) {
        let tap: SharedTap = Arc::new(Mutex::new(tap));
        // Held until the queued events are delivered: the reader's first
        // events for the stream wait behind them.
        let mut consumer = tap.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &*self.shared;
        let (events, last) = {
            let mut state = lock(shared);
            shared.tapped.store(true, Ordering::Relaxed);
            let closed = state.closed.clone();
            match state.streams.get_mut(&self.id) {
                None => {
                    let err = closed.unwrap_or(Error::Reset {
                        stream: self.id,
                        code: ErrorCode::STREAM_CLOSED,
                        remote: false,
                    });
                    (VecDeque::new(), Some(Tapped::Failed(err)))
                }
                Some(s) => {
                    s.tap = Some(tap.clone());
                    let events = std::mem::take(&mut s.events);
                    let last = match (s.reset, s.remote_closed, closed) {
                        (Some((code, remote)), _, _) => Some(Tapped::Failed(Error::Reset {
                            stream: self.id,
                            code,
                            remote,
                        })),
                        (None, true, _) => Some(Tapped::End),
                        (None, false, Some(err)) => Some(Tapped::Failed(err)),
                        (None, false, None) => None,
                    };
                    s.tap_done = last.is_some();
                    if s.tap_done {
                        s.tap = None;
                    }
                    let unread: usize = events
                        .iter()
                        .map(|e| if let Event::Data(d) = e { d.len() } else { 0 })
                        .sum();
                    if state.release(&shared.config, Some(self.id), unread as u32) {
                        state.kick(shared);
                    }
                    (events, last)
                }
            }
        };
        for event in events {
            consumer(Tapped::Event(event));
        }
        if let Some(last) = last {
            consumer(last);
        }
    }

    /// Resets the stream with `code` (CANCEL to abandon a call).
    pub fn reset(&self, code: ErrorCode) {
        let shared = &*self.shared;
        let mut state = lock(shared);
        let Some(s) = state.streams.get(&self.id) else {
            return;
        };
        if s.reset.is_some() || s.is_closed() || state.closed.is_some() {
            return;
        }
        state.fail_stream(self.id, code);
        state.kick(shared);
        shared.conn_cv.notify_all();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let shared = &*self.shared;
        let mut state = lock(shared);
        let Some(s) = state.streams.remove(&self.id) else {
            return;
        };
        if s.reset.is_none() && state.closed.is_none() {
            if !s.local_closed {
                frame::write_rst_stream(&mut state.out, self.id, ErrorCode::CANCEL);
            } else if !s.remote_closed {
                // The response is complete; ask the peer to stop sending.
                frame::write_rst_stream(&mut state.out, self.id, ErrorCode::NO_ERROR);
            }
        }
        // Whatever the peer sent and nobody read goes back as credit.
        let unread: usize = s
            .events
            .iter()
            .map(|e| if let Event::Data(d) = e { d.len() } else { 0 })
            .sum();
        state.release(&shared.config, None, unread as u32);
        state.kick(shared);
        shared.conn_cv.notify_all();
        state.maybe_finish(shared);
    }
}

// --- the writer ---------------------------------------------------------------

/// How long a writer job that has nothing to write waits for more before
/// it ends (a busy connection keeps its writer; an idle one lets it go).
const WRITER_LINGER: Duration = Duration::from_millis(200);

/// The writer: writes whatever senders queued and did not write themselves
/// (control frames, frames queued while another batch was being written),
/// sends keepalive PINGs, and closes the transport at the end. A job on a
/// pooled thread, started by [`State::kick`] when output waits and by
/// [`timer`] at the connection's next deadline; it ends after
/// [`WRITER_LINGER`] without work, asking [`timer`] for that deadline.
fn write_loop(shared: &Arc<Shared>) {
    let mut closing = false;
    let mut idle_since: Option<Instant> = None;
    let mut state = lock(shared);
    loop {
        if !state.writing {
            if !state.out.is_empty() {
                state = write_batch(shared, state);
                idle_since = None;
                continue;
            }
            if state.closed.is_some() {
                break;
            }
        }
        let mut timeout = keepalive(shared, &mut state);
        if let Some(left) = handshake_watch(shared, &mut state) {
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        if !state.writing && (!state.out.is_empty() || state.closed.is_some()) {
            continue;
        }
        if state.closed.is_some() {
            if !closing {
                // A sender is stuck writing to a closed connection:
                // shutting the socket down ends its write.
                closing = true;
                drop(state);
                (shared.closer)();
                state = lock(shared);
                continue;
            }
        } else {
            // Nothing to write (a sender may be writing its own: it kicks
            // the writer for whatever is queued behind it). Past the
            // linger, end; the timer starts a writer at the deadline.
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            let linger = (since + WRITER_LINGER).saturating_duration_since(now);
            if linger.is_zero() && timeout.is_none_or(|t| timer::schedule(shared, now + t)) {
                state.writer_running = false;
                return;
            }
            if !linger.is_zero() {
                timeout = Some(timeout.map_or(linger, |t| t.min(linger)));
            }
        }
        state.writer_waiting = true;
        state = wait(&shared.writer_cv, state, timeout);
        state.writer_waiting = false;
    }
    drop(state);
    // close_notify (TLS), then the socket.
    drop(
        shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(),
    );
    (shared.closer)();
    timer::forget(shared.id);
    let mut state = lock(shared);
    state.writer_done = true;
    state.writer_running = false;
    shared.conn_cv.notify_all();
}

/// Starts idle connections' writers when their deadlines (a keepalive
/// PING due or unanswered, a handshake timeout) come: one thread for the
/// process in place of a sleeping writer per connection. It runs while
/// some connection waits for a deadline, and ends when none has for a few
/// seconds (so a process with no connections holds no thread for it).
mod timer {
    use super::{Shared, lock};
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
    use std::time::Instant;

    #[derive(Default)]
    struct Timer {
        state: Mutex<TimerState>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct TimerState {
        /// Each waiting connection's deadline, by its id.
        conns: HashMap<u64, (Instant, Weak<Shared>)>,
        /// The deadlines in order; an entry no longer in `conns` (moved,
        /// or its connection ended) is passed over.
        due: BinaryHeap<Reverse<(Instant, u64)>>,
        running: bool,
    }

    fn timer() -> &'static Timer {
        static TIMER: std::sync::OnceLock<Timer> = std::sync::OnceLock::new();
        TIMER.get_or_init(Timer::default)
    }

    fn lock_timer() -> MutexGuard<'static, TimerState> {
        timer().state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection's id for [`schedule`] and [`forget`].
    pub(super) fn next_id() -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts `conn`'s writer at `at`, unless a start at or before `at` is
    /// due already (that writer asks again). False when the timer's thread
    /// cannot be started: the writer must then stay and wait itself.
    pub(super) fn schedule(conn: &Arc<Shared>, at: Instant) -> bool {
        let mut state = lock_timer();
        if let Some((when, _)) = state.conns.get(&conn.id)
            && *when <= at
        {
            return true;
        }
        if !state.running {
            match std::thread::Builder::new()
                .name("h2-timer".into())
                .spawn(run)
            {
                Ok(_) => state.running = true,
                Err(err) => {
                    log::error!("starting the HTTP/2 timer thread: {err}");
                    return false;
                }
            }
        }
        let earliest = state.due.peek().is_none_or(|Reverse((d, _))| at < *d);
        state.conns.insert(conn.id, (at, Arc::downgrade(conn)));
        state.due.push(Reverse((at, conn.id)));
        state.compact();
        drop(state);
        if earliest {
            timer().changed.notify_one();
        }
        true
    }

    /// Whether the connection `id` waits for a deadline.
    #[cfg(test)]
    pub(super) fn waits(id: u64) -> bool {
        lock_timer().conns.contains_key(&id)
    }

    /// The connection `id` has ended: it waits for nothing any more.
    pub(super) fn forget(id: u64) {
        let mut state = lock_timer();
        if state.conns.remove(&id).is_none() {
            return;
        }
        state.compact();
        if state.conns.is_empty() {
            drop(state);
            timer().changed.notify_one();
        }
    }

    impl TimerState {
        /// Rebuilds `due` from `conns` once passed-over entries (of ended
        /// connections, of moved deadlines) outnumber the live ones: a
        /// deadline can be an hour away (`--keepalive-time`), and
        /// connections come and go faster than that.
        fn compact(&mut self) {
            if self.due.len() > 2 * self.conns.len() + 64 {
                self.due = self
                    .conns
                    .iter()
                    .map(|(id, (at, _))| Reverse((*at, *id)))
                    .collect();
            }
        }
    }

    fn run() {
        let mut fired = Vec::new();
        let mut state = lock_timer();
        let mut idle_since = None;
        loop {
            let now = Instant::now();
            if state.conns.is_empty() {
                // Ends once nobody has waited for a while (as an idle
                // pooled thread does), not between one connection and the
                // next.
                state.due.clear();
                let since = *idle_since.get_or_insert(now);
                let left =
                    (since + crate::shutdown::WorkerSet::IDLE).saturating_duration_since(now);
                if left.is_zero() {
                    state.running = false;
                    return;
                }
                state = timer()
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            idle_since = None;
            while let Some(&Reverse((at, id))) = state.due.peek() {
                if at > now {
                    break;
                }
                state.due.pop();
                if state.conns.get(&id).is_some_and(|(when, _)| *when == at) {
                    fired.extend(state.conns.remove(&id).map(|(_, conn)| conn));
                }
            }
            if fired.is_empty() {
                let next = state.due.peek().map(|Reverse((at, _))| *at - now);
                state = match next {
                    Some(left) => {
                        timer()
                            .changed
                            .wait_timeout(state, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => timer()
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner),
                };
                continue;
            }
            drop(state);
            for conn in fired.drain(..).filter_map(|c| c.upgrade()) {
                lock(&conn).wake_writer(&conn);
            }
            state = lock_timer();
        }
    }
}

/// Writes the queued output as one batch; called with `writing` clear and
/// `out` not empty, returns with the lock held again. A failed write
/// closes the connection.
fn write_batch<'a>(shared: &'a Shared, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    write_batch_with(shared, state, &[&[]; 3])
}

/// [`write_batch`], then `extra` (a sender's own frame: header, gRPC
/// prefix, payload) in the same vectored write, without copying it into
/// the queue first. Called with `writing` clear.
fn write_batch_with<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    extra: &[&[u8]; 3],
) -> MutexGuard<'a, State> {
    let mut batch = state.take_batch();
    drop(state);
    let result = match shared
        .writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        Some(writer) => write_all_parts(&mut **writer, &batch, extra).and_then(|()| writer.flush()),
        None => Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "connection closed",
        )),
    };
    batch.clear();
    let mut state = lock(shared);
    state.spare = batch;
    state.writing = false;
    if let Err(err) = result {
        state = write_failed(shared, state, &err);
    }
    // Output queued meanwhile is the writer's (or the next sender's).
    if !state.out.is_empty() || state.closed.is_some() {
        state.kick(shared);
    }
    state
}

fn queue_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// Writes `first` then the slices of `rest` (empty ones are passed over),
/// as few vectored writes as the writer takes (one, for a socket with room).
fn write_all_parts(w: &mut dyn Write, first: &[u8], rest: &[&[u8]; 3]) -> io::Result<()> {
    let mut slices = [first, rest[0], rest[1], rest[2]].map(IoSlice::new);
    let mut left = &mut slices[..];
    // Drops leading empty slices, so that nothing left means done.
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match w.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Server side, until the client's first SETTINGS frame: closes the
/// connection once the handshake timeout has passed (which also wakes a
/// reader blocked on a silent or trickling client). Returns how long the
/// writer may sleep before checking again; `None` once it no longer applies.
fn handshake_watch(shared: &Shared, state: &mut State) -> Option<Duration> {
    if shared.role != Role::Server || state.got_settings || state.closed.is_some() {
        return None;
    }
    let limit = shared.config.handshake_timeout;
    let left = (state.started + limit).saturating_duration_since(Instant::now());
    if left.is_zero() {
        state.close(
            shared,
            Error::Io {
                peer: shared.peer.clone(),
                err: format!("no connection preface and SETTINGS within {limit:?}"),
            },
        );
        return None;
    }
    Some(left)
}

/// Sends a PING after a quiet interval and closes the connection when it
/// goes unanswered. Returns how long the writer may sleep.
fn keepalive(shared: &Shared, state: &mut State) -> Option<Duration> {
    let interval = shared.config.keepalive_interval?;
    let now = Instant::now();
    if let Some((sent, _)) = state.ping_sent {
        let due = sent + shared.config.keepalive_timeout;
        if now >= due {
            let after = shared.config.keepalive_timeout;
            state.close(
                shared,
                Error::KeepaliveTimeout {
                    peer: shared.peer.clone(),
                    after,
                },
            );
            return None;
        }
        return Some(due - now);
    }
    let due = state.last_read + interval;
    if now >= due {
        state.ping_counter += 1;
        let payload = state.ping_counter.to_be_bytes();
        frame::write_ping(&mut state.out, payload, false);
        state.ping_sent = Some((now, payload));
        return Some(shared.config.keepalive_timeout);
    }
    Some(due - now)
}

// --- the reader thread ------------------------------------------------------

/// A header block being assembled from HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

struct Reader {
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
    /// Streams with a sleeper to wake once every frame of the last read is
    /// handled, outside the connection's lock: one wake-up for all the
    /// frames a read brought (a consumer then takes two 32 KiB packets per
    /// wake-up, not one), and none under the lock (woken under it, the
    /// thread would preempt the reader, find the lock taken and sleep
    /// again).
    wake: Vec<Arc<Condvar>>,
    /// Tap events taken from the state, being delivered (kept for its
    /// capacity).
    taps: Vec<(SharedTap, Tapped)>,
}

impl Reader {
    fn wake_later(&mut self, cv: &Arc<Condvar>) {
        if !self.wake.iter().any(|w| Arc::ptr_eq(w, cv)) {
            self.wake.push(cv.clone());
        }
    }

    fn wake_now(&mut self) {
        for cv in self.wake.drain(..) {
            cv.notify_all();
        }
    }
}

/// Gives each tap its events, in order (outside the connection's lock).
fn deliver_taps(pending: &mut Vec<(SharedTap, Tapped)>) {
    for (tap, event) in pending.drain(..) {
        let mut consumer = tap.lock().unwrap_or_else(PoisonError::into_inner);
        consumer(event);
    }
}

/// What a reader run by [`Connection::serve_here`] hands each new stream to.
type OnStream<'a> = Option<&'a mut dyn FnMut(Stream)>;

fn read_loop(
    shared: &Arc<Shared>,
    mut reader: Box<dyn super::transport::ReadHalf>,
    on_stream: OnStream<'_>,
) {
    let result = read_frames(shared, &mut *reader, on_stream);
    let mut state = lock(shared);
    let err = match result {
        Ok(()) => Error::Eof {
            peer: shared.peer.clone(),
        },
        Err(Fatal::Io(err)) => err,
        Err(Fatal::Protocol(err)) => {
            log::debug!("HTTP/2 peer {}: {err}", shared.peer);
            let last = state.last_peer_id;
            frame::write_goaway(&mut state.out, last, err.code(), b"");
            state.goaway_sent = true;
            Error::Protocol {
                peer: shared.peer.clone(),
                err,
            }
        }
    };
    let err = match (err, state.goaway_received) {
        (Error::Eof { .. }, Some(_)) => Error::GoAway {
            peer: shared.peer.clone(),
            code: ErrorCode::NO_ERROR,
            debug: String::new(),
        },
        (err, _) => err,
    };
    state.close(shared, err);
    let mut taps = std::mem::take(&mut state.tap_pending);
    drop(state);
    deliver_taps(&mut taps);
    // The writer flushes what is queued (a GOAWAY, say) and shuts the
    // socket down; nothing else for the reader to do.
}

/// The streams the peer opened in the last read, each to `on_stream`,
/// outside the lock.
fn hand_new_streams(shared: &Arc<Shared>, on_stream: &mut dyn FnMut(Stream)) {
    loop {
        let stream = {
            let mut state = lock(shared);
            let Some(id) = state.accept.pop_front() else {
                return;
            };
            let Some(s) = state.streams.get(&id) else {
                continue;
            };
            Stream {
                shared: shared.clone(),
                id,
                cv: s.cv.clone(),
            }
        };
        on_stream(stream);
    }
}

enum Fatal {
    Io(Error),
    Protocol(frame::Error),
}

impl From<frame::Error> for Fatal {
    fn from(err: frame::Error) -> Self {
        Fatal::Protocol(err)
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn read_frames(
    shared: &Arc<Shared>,
    reader: &mut dyn super::transport::ReadHalf,
    mut on_stream: OnStream<'_>,
) -> Result<(), Fatal> {
    let io_err = |err: io::Error| {
        Fatal::Io(Error::Io {
            peer: shared.peer.clone(),
            err: format!("reading: {err}"),
        })
    };
    let closed = || lock(shared).closed.is_some();
    flush_now(shared);
    if shared.role == Role::Server {
        // A client that connects and stays silent gets the handshake
        // timeout (the writer enforces it too, for reads without timeouts).
        let deadline = Instant::now() + shared.config.handshake_timeout;
        let mut preface = [0u8; 24];
        let mut got = 0;
        while got < preface.len() {
            match reader.read(&mut preface[got..]) {
                Ok(0) => return Ok(()),
                Ok(n) => got += n,
                Err(err) if is_timeout(&err) => {
                    if closed() {
                        return Ok(());
                    }
                }
                Err(err) => return Err(io_err(err)),
            }
            if got < preface.len() && Instant::now() >= deadline {
                let err = format!(
                    "no connection preface within {:?}",
                    shared.config.handshake_timeout
                );
                return Err(io_err(io::Error::new(io::ErrorKind::TimedOut, err)));
            }
        }
        if &preface != frame::PREFACE {
            return Err(Fatal::Protocol(frame::Error::Connection {
                code: ErrorCode::PROTOCOL_ERROR,
                reason: "bad connection preface",
            }));
        }
    }
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(TABLE_SIZE);
    let mut r = Reader {
        decoder,
        pending: None,
        wake: Vec::new(),
        taps: Vec::new(),
    };
    let mut frames = frame::Decoder::new(shared.config.max_frame_size);
    const READ_SIZE: usize = 128 * 1024;
    // A DATA payload of DIRECT_MIN bytes or more that a read left
    // incomplete is read on straight into the buffer it is delivered in,
    // rather than into the frame buffer and out again. Over TLS, where a
    // read costs no system call while decrypted records are buffered,
    // reads also stop at each frame's end, so every such payload goes
    // that way; a plain socket keeps reading READ_SIZE at a time (reads
    // to frame ends cost it more in system calls than the copies saved:
    // server CPU per GiB on the gRPC path 0.99-1.24 s against 1.18-1.57).
    const DIRECT_MIN: usize = 4096;
    // Plain reads start at FIRST_READ and double while they fill what they
    // are given, up to READ_SIZE: the frame buffer is zeroed as it grows,
    // and a connection that carries one small call (a gRPC tunnel's dial:
    // kube-apiserver opens a connection per tunnel) zeroed and faulted in
    // 256 KiB for it (a quarter of the server's CPU per gRPC dial, perf).
    // 1 KiB takes a dial's first flight (preface, SETTINGS, HEADERS and
    // the DIAL_REQ: about 400 bytes) and leaves a 2 KiB buffer to an idle
    // tunnel's connection (at 4 KiB, 8 KiB: 23.6 against 18.1 KiB of
    // proxy-server's RSS per idle gRPC tunnel, 900 of them).
    const FIRST_READ: usize = 1024;
    let mut read_size = FIRST_READ;
    let exact = shared.secure;
    let mut direct: Option<frame::DirectData> = None;
    loop {
        if direct.is_none() {
            direct = frames.start_direct(DIRECT_MIN);
        }
        let mut plain = false;
        let read = match &mut direct {
            Some(d) => {
                let missing = d.missing();
                reader.read_append(d.payload(), missing)
            }
            None if exact => reader.read(frames.spare(frames.to_frame_end())),
            None => {
                plain = true;
                reader.read(frames.spare(read_size))
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(err) => {
                if closed() {
                    return Ok(());
                }
                if is_timeout(&err) {
                    continue;
                }
                return Err(io_err(err));
            }
        };
        if n == 0 {
            return Ok(());
        }
        if direct.is_none() {
            frames.filled(n);
        }
        if plain && n == read_size {
            read_size = (read_size * 2).min(READ_SIZE);
        }
        {
            let mut state = lock(shared);
            state.last_read = Instant::now();
            state.reader_flushes = shared.plain_fd.is_some();
        }
        let handled = (|| -> Result<(), Fatal> {
            if let Some(d) = direct.take_if(|d| d.is_complete()) {
                handle_frame(shared, &mut r, d.into_frame()?)?;
            }
            while let Some(frame) = frames.next_frame()? {
                handle_frame(shared, &mut r, frame)?;
            }
            Ok(())
        })();
        if shared.tapped.load(Ordering::Relaxed) {
            std::mem::swap(&mut r.taps, &mut lock(shared).tap_pending);
            deliver_taps(&mut r.taps);
        }
        r.wake_now();
        if let Some(on_stream) = on_stream.as_deref_mut() {
            hand_new_streams(shared, on_stream);
        }
        let queued = flush_now(shared);
        handled?;
        // Answers to the peer's frames (PING ACKs, RST_STREAMs) are queued
        // without waiting; a peer that sends but never reads must not grow
        // the queue without bound.
        if queued > CONTROL_FLOOD_LIMIT + shared.config.max_send_buffer {
            return Err(conn(
                ErrorCode::ENHANCE_YOUR_CALM,
                "peer does not read our frames",
            ));
        }
    }
}

/// On the reader, after it handled a read: over a plaintext socket, writes
/// what is queued (our answers: SETTINGS and PING ACKs, WINDOW_UPDATEs,
/// RST_STREAMs; whatever else waits) itself without waiting, when nobody
/// is writing, rather than wake the writer for a few bytes; what the socket
/// does not take now is the writer's. Returns the bytes left queued.
fn flush_now(shared: &Shared) -> usize {
    let mut state = lock(shared);
    state.reader_flushes = false;
    let Some(fd) = shared.plain_fd else {
        return state.out.len();
    };
    if !state.writing && !state.out.is_empty() && state.closed.is_none() {
        let mut batch = state.take_batch();
        drop(state);
        let sent = crate::sys::send_now(fd, &batch);
        state = lock(shared);
        state.writing = false;
        match sent {
            Ok(n) if n == batch.len() => {
                batch.clear();
                state.spare = batch;
            }
            Ok(n) => {
                // The rest goes first, then what was queued meanwhile.
                batch.drain(..n);
                batch.extend_from_slice(&state.out);
                state.out = batch;
            }
            Err(err) => state = write_failed(shared, state, &err),
        }
    }
    if !state.out.is_empty() || state.closed.is_some() {
        state.kick(shared);
    }
    state.out.len()
}

/// Writing to the socket failed: the connection closes, and its socket is
/// shut down (which ends the reader). Returns with the lock held again.
fn write_failed<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    err: &io::Error,
) -> MutexGuard<'a, State> {
    state.close(
        shared,
        Error::Io {
            peer: shared.peer.clone(),
            err: format!("writing: {err}"),
        },
    );
    drop(state);
    (shared.closer)();
    lock(shared)
}

fn handle_frame(shared: &Shared, r: &mut Reader, frame: Frame) -> Result<(), Fatal> {
    if let Some(p) = &mut r.pending {
        let Frame::Continuation {
            stream,
            end_headers,
            fragment,
        } = frame
        else {
            return Err(conn(ErrorCode::PROTOCOL_ERROR, "expected CONTINUATION"));
        };
        if stream != p.stream {
            return Err(conn(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION on another stream",
            ));
        }
        if p.block.len() + fragment.len() > 2 * shared.config.max_header_list_size as usize {
            return Err(conn(ErrorCode::ENHANCE_YOUR_CALM, "header block too large"));
        }
        p.block.extend_from_slice(&fragment);
        if end_headers {
            let p = r.pending.take().expect("pending block checked above");
            return headers_complete(shared, r, p);
        }
        return Ok(());
    }
    let mut state = lock(shared);
    if !state.got_settings && !matches!(frame, Frame::Settings { ack: false, .. }) {
        return Err(conn(
            ErrorCode::PROTOCOL_ERROR,
            "first frame is not SETTINGS",
        ));
    }
    match frame {
        Frame::Data {
            stream,
            end_stream,
            data,
            flow_len,
        } => {
            if i64::from(flow_len) > state.recv_window {
                return Err(conn(
                    ErrorCode::FLOW_CONTROL_ERROR,
                    "DATA beyond the connection window",
                ));
            }
            state.recv_window -= i64::from(flow_len);
            let padding = flow_len - data.len() as u32;
            let closed_id = state.is_closed_id(stream, shared.role);
            // A tapped stream's data is taken at once: its credit goes back now.
            let mut consumed = 0;
            let open = match state.streams.get_mut(&stream) {
                Some(s) if !s.remote_closed => {
                    if i64::from(flow_len) > s.recv_window {
                        Err(ErrorCode::FLOW_CONTROL_ERROR)
                    } else {
                        s.recv_window -= i64::from(flow_len);
                        if end_stream {
                            s.remote_closed = true;
                        }
                        if s.tap.is_some() || s.tap_done {
                            consumed = data.len() as u32;
                            if !data.is_empty() {
                                state.tap_event(stream, || Tapped::Event(Event::Data(data)));
                            }
                            if end_stream {
                                state.tap_event(stream, || Tapped::End);
                            }
                        } else {
                            if !data.is_empty() {
                                s.events.push_back(Event::Data(data));
                            }
                            if s.waiters > 0 {
                                r.wake_later(&s.cv);
                            }
                        }
                        Ok(())
                    }
                }
                Some(_) => Err(ErrorCode::STREAM_CLOSED),
                None if closed_id => Err(ErrorCode::STREAM_CLOSED),
                None => return Err(conn(ErrorCode::PROTOCOL_ERROR, "DATA on an idle stream")),
            };
            match open {
                Ok(()) => {
                    if state.release(&shared.config, Some(stream), padding + consumed) {
                        state.kick(shared);
                    }
                    if end_stream {
                        state.maybe_finish(shared);
                    }
                }
                Err(code) => {
                    // Nobody will read it: the connection credit comes back now.
                    state.release(&shared.config, None, flow_len);
                    state.fail_stream(stream, code);
                    state.kick(shared);
                }
            }
        }
        Frame::Headers {
            stream,
            end_stream,
            end_headers,
            fragment,
        } => {
            drop(state);
            if fragment.len() > 2 * shared.config.max_header_list_size as usize {
                return Err(conn(ErrorCode::ENHANCE_YOUR_CALM, "header block too large"));
            }
            let p = PendingBlock {
                stream,
                end_stream,
                block: fragment,
            };
            if end_headers {
                return headers_complete(shared, r, p);
            }
            r.pending = Some(p);
            return Ok(());
        }
        Frame::Priority { .. } | Frame::Unknown { .. } => {}
        Frame::RstStream { stream, code } => {
            let closed_id = state.is_closed_id(stream, shared.role);
            match state.streams.get_mut(&stream) {
                Some(s) => {
                    s.reset.get_or_insert((code, true));
                    s.local_closed = true;
                    s.remote_closed = true;
                    s.cv.notify_all();
                    shared.conn_cv.notify_all();
                    state.tap_event(stream, || {
                        Tapped::Failed(Error::Reset {
                            stream,
                            code,
                            remote: true,
                        })
                    });
                }
                None if closed_id => {}
                None => {
                    return Err(conn(
                        ErrorCode::PROTOCOL_ERROR,
                        "RST_STREAM on an idle stream",
                    ));
                }
            }
        }
        Frame::Settings { ack: true, .. } => {}
        Frame::Settings { ack: false, params } => {
            state.got_settings = true;
            for (id, value) in params {
                match id {
                    setting::HEADER_TABLE_SIZE => {
                        let size = (value as usize).min(TABLE_SIZE);
                        state.encoder.set_max_table_size(size);
                        state.pending_table_size = Some(size);
                    }
                    setting::ENABLE_PUSH if value == 1 && shared.role == Role::Client => {
                        return Err(conn(ErrorCode::PROTOCOL_ERROR, "server enabled push"));
                    }
                    setting::MAX_CONCURRENT_STREAMS => {
                        state.peer.max_concurrent_streams = value;
                        shared.conn_cv.notify_all();
                    }
                    setting::INITIAL_WINDOW_SIZE => {
                        let delta = i64::from(value) - i64::from(state.peer.initial_window);
                        state.peer.initial_window = value;
                        for s in state.streams.values_mut() {
                            s.send_window += delta;
                            if s.send_window > i64::from(frame::MAX_WINDOW) {
                                return Err(conn(
                                    ErrorCode::FLOW_CONTROL_ERROR,
                                    "SETTINGS pushed a window past 2^31-1",
                                ));
                            }
                            s.cv.notify_all();
                        }
                    }
                    setting::MAX_FRAME_SIZE => state.peer.max_frame_size = value,
                    setting::MAX_HEADER_LIST_SIZE => state.peer.max_header_list_size = value,
                    _ => {}
                }
            }
            if state.out.len() > CONTROL_FLOOD_LIMIT + shared.config.max_send_buffer {
                return Err(conn(ErrorCode::ENHANCE_YOUR_CALM, "SETTINGS flood"));
            }
            frame::write_settings_ack(&mut state.out);
            state.kick(shared);
        }
        Frame::PushPromise { .. } => {
            return Err(conn(
                ErrorCode::PROTOCOL_ERROR,
                "PUSH_PROMISE while push is disabled",
            ));
        }
        Frame::Ping {
            ack: false,
            payload,
        } => {
            if state.out.len() > CONTROL_FLOOD_LIMIT + shared.config.max_send_buffer {
                return Err(conn(ErrorCode::ENHANCE_YOUR_CALM, "PING flood"));
            }
            frame::write_ping(&mut state.out, payload, true);
            state.kick(shared);
        }
        Frame::Ping { ack: true, payload } => {
            if state.ping_sent.is_some_and(|(_, p)| p == payload) {
                state.ping_sent = None;
                // The writer sleeps until the PING's timeout; wake it to
                // schedule the next PING one interval after this ACK.
                state.kick(shared);
            }
        }
        Frame::GoAway {
            last_stream,
            code,
            debug,
        } => {
            if code != ErrorCode::NO_ERROR {
                log::debug!(
                    "HTTP/2 peer {} sent GOAWAY {code}: {}",
                    shared.peer,
                    String::from_utf8_lossy(&debug)
                );
            }
            let last = state
                .goaway_received
                .map_or(last_stream, |l| l.min(last_stream));
            state.goaway_received = Some(last);
            let mut refused = Vec::new();
            for (&id, s) in state.streams.iter_mut() {
                if s.local && id > last {
                    s.reset.get_or_insert((ErrorCode::REFUSED_STREAM, true));
                    s.local_closed = true;
                    s.remote_closed = true;
                    s.cv.notify_all();
                    refused.push(id);
                }
            }
            for id in refused {
                state.tap_event(id, || {
                    Tapped::Failed(Error::Reset {
                        stream: id,
                        code: ErrorCode::REFUSED_STREAM,
                        remote: true,
                    })
                });
            }
            shared.conn_cv.notify_all();
            if code != ErrorCode::NO_ERROR {
                let debug = String::from_utf8_lossy(&debug).into_owned();
                state.close(
                    shared,
                    Error::GoAway {
                        peer: shared.peer.clone(),
                        code,
                        debug,
                    },
                );
            } else {
                state.maybe_finish(shared);
            }
        }
        Frame::WindowUpdate {
            stream: 0,
            increment,
        } => {
            state.send_window += i64::from(increment);
            if state.send_window > i64::from(frame::MAX_WINDOW) {
                return Err(conn(
                    ErrorCode::FLOW_CONTROL_ERROR,
                    "connection window past 2^31-1",
                ));
            }
            state.notify_senders();
        }
        Frame::WindowUpdate { stream, increment } => {
            let closed_id = state.is_closed_id(stream, shared.role);
            match state.streams.get_mut(&stream) {
                Some(s) => {
                    s.send_window += i64::from(increment);
                    if s.send_window > i64::from(frame::MAX_WINDOW) {
                        state.fail_stream(stream, ErrorCode::FLOW_CONTROL_ERROR);
                        state.kick(shared);
                    } else if s.waiters > 0 {
                        r.wake_later(&s.cv);
                    }
                }
                None if closed_id => {}
                None => {
                    return Err(conn(
                        ErrorCode::PROTOCOL_ERROR,
                        "WINDOW_UPDATE on an idle stream",
                    ));
                }
            }
        }
        Frame::Continuation { .. } => {
            return Err(conn(
                ErrorCode::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        }
    }
    Ok(())
}

fn conn(code: ErrorCode, reason: &'static str) -> Fatal {
    Fatal::Protocol(frame::Error::Connection { code, reason })
}

/// Checks the field rules of RFC 9113 section 8.2 that do not depend on
/// the request or response: lower-case names, pseudo-headers first, no
/// connection-specific fields.
pub(super) fn malformed(fields: &[Field], trailers: bool) -> Option<&'static str> {
    let mut regular = false;
    for (name, value) in fields {
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_uppercase() || b <= b' ' || b == 0x7f)
        {
            return Some("invalid header name");
        }
        if name.starts_with(':') {
            if regular || trailers {
                return Some("pseudo-header after regular header or in trailers");
            }
        } else {
            regular = true;
        }
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        ) || (name == "te" && value != b"trailers")
        {
            return Some("connection-specific header field");
        }
        if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Some("invalid header value");
        }
    }
    None
}

/// One complete header block, decoded.
pub(super) struct DecodedBlock {
    /// The fields that fit in the limit, in order.
    pub fields: Vec<Field>,
    /// The whole list's size as RFC 9113 counts it (name + value + 32 each).
    pub size: usize,
    /// A field name within the limit was not UTF-8.
    pub bad_name: bool,
}

/// Decodes one complete block. Every field goes through the HPACK table
/// (which must see every block), but only fields within `limit` are kept.
pub(super) fn decode_block(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    limit: usize,
) -> Result<DecodedBlock, frame::Error> {
    let mut size = 0usize;
    let mut fields = Vec::new();
    let mut bad_name = false;
    decoder
        .decode_with_cb(block, |name, value| {
            size += name.len() + value.len() + 32;
            if size <= limit {
                match std::str::from_utf8(&name) {
                    Ok(name) => fields.push((name.to_string(), value.into_owned())),
                    Err(_) => bad_name = true,
                }
            }
        })
        .map_err(|_| frame::Error::Connection {
            code: ErrorCode::COMPRESSION_ERROR,
            reason: "HPACK decoding failed",
        })?;
    Ok(DecodedBlock {
        fields,
        size,
        bad_name,
    })
}

fn headers_complete(shared: &Shared, r: &mut Reader, p: PendingBlock) -> Result<(), Fatal> {
    // Decode before anything else: the HPACK table must see every block,
    // even one for a stream we then refuse.
    let limit = shared.config.max_header_list_size as usize;
    let DecodedBlock {
        fields,
        size,
        bad_name,
    } = decode_block(&mut r.decoder, &p.block, limit)?;
    let id = p.stream;
    let mut state = lock(shared);
    let stream_error = |state: &mut State, code| {
        state.fail_stream(id, code);
        state.kick(shared);
        Ok(())
    };
    let peer_initiated = (id % 2 == 1) == (shared.role == Role::Server);
    let existing = state.streams.contains_key(&id);
    if !existing {
        if !peer_initiated || shared.role == Role::Client {
            if state.is_closed_id(id, shared.role) {
                return stream_error(&mut state, ErrorCode::STREAM_CLOSED);
            }
            return Err(conn(
                ErrorCode::PROTOCOL_ERROR,
                "HEADERS opening a stream with the wrong id parity",
            ));
        }
        if id <= state.last_peer_id {
            return stream_error(&mut state, ErrorCode::STREAM_CLOSED);
        }
        state.last_peer_id = id;
        // Closed streams whose handle still lives (a handler finishing)
        // no longer count, as the peer sees them (RFC 9113 section 5.1.2).
        let open = state
            .streams
            .values()
            .filter(|s| !s.local && !s.is_closed())
            .count();
        if state.goaway_sent || open as u64 >= u64::from(shared.config.max_concurrent_streams) {
            return stream_error(&mut state, ErrorCode::REFUSED_STREAM);
        }
        if size > limit || bad_name || malformed(&fields, false).is_some() {
            return stream_error(&mut state, ErrorCode::PROTOCOL_ERROR);
        }
        let stream = StreamState {
            cv: Arc::new(Condvar::new()),
            local: false,
            send_window: i64::from(state.peer.initial_window),
            recv_window: i64::from(shared.config.stream_window),
            recv_unacked: 0,
            events: VecDeque::from([Event::Headers {
                fields,
                end_stream: p.end_stream,
            }]),
            local_closed: false,
            remote_closed: p.end_stream,
            reset: None,
            send_blocked: false,
            blocks: 0,
            waiters: 0,
            tap: None,
            tap_done: false,
        };
        state.streams.insert(id, stream);
        state.accept.push_back(id);
        shared.conn_cv.notify_all();
        return Ok(());
    }
    let s = state.streams.get_mut(&id).expect("presence checked above");
    if s.remote_closed {
        return stream_error(&mut state, ErrorCode::STREAM_CLOSED);
    }
    // Blocks after the first (request or response headers) are trailers:
    // they end the stream and carry no pseudo-headers.
    let trailers = !s.local || s.blocks > 0;
    s.blocks = s.blocks.saturating_add(1);
    if size > limit
        || bad_name
        || (trailers && !p.end_stream)
        || malformed(&fields, trailers).is_some()
    {
        return stream_error(&mut state, ErrorCode::PROTOCOL_ERROR);
    }
    if p.end_stream {
        s.remote_closed = true;
    }
    let event = Event::Headers {
        fields,
        end_stream: p.end_stream,
    };
    if s.tap.is_some() || s.tap_done {
        // Trailers end the stream (checked above).
        state.tap_event(id, || Tapped::Event(event));
        state.tap_event(id, || Tapped::End);
    } else {
        s.events.push_back(event);
        r.wake_later(&s.cv);
    }
    if p.end_stream {
        state.maybe_finish(shared);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::frame::{flag, kind};
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A hand-driven peer: writes raw frames, reads frames back.
    struct Raw {
        sock: UnixStream,
        frames: frame::Decoder,
        hpack: loona_hpack::Encoder<'static>,
    }

    impl Raw {
        fn send(&mut self, bytes: &[u8]) {
            // The connection may already have closed the socket.
            let _ = self.sock.write_all(bytes);
        }

        fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let mut out = Vec::new();
            frame::FrameHeader {
                len: payload.len() as u32,
                kind,
                flags,
                stream,
            }
            .write(&mut out);
            out.extend_from_slice(payload);
            self.send(&out);
        }

        fn headers(&mut self, stream: u32, fields: &[(&str, &str)], flags: u8) {
            let block = self
                .hpack
                .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            self.frame(kind::HEADERS, flags, stream, &block);
        }

        fn request(&mut self, stream: u32) {
            self.headers(
                stream,
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/x"),
                    (":authority", "t"),
                ],
                flag::END_HEADERS,
            );
        }

        fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(f) = self.frames.next_frame().expect("our frames are valid") {
                    return Some(f);
                }
                let n = self.sock.read(self.frames.spare(4096)).unwrap_or(0);
                self.frames.filled(n);
                if n == 0 {
                    return None;
                }
            }
        }

        /// Skips frames until one matches; panics at the end of the stream.
        fn expect(&mut self, what: &str, mut pick: impl FnMut(&Frame) -> bool) -> Frame {
            loop {
                match self.next() {
                    Some(f) if pick(&f) => return f,
                    Some(_) => {}
                    None => panic!("connection ended before {what}"),
                }
            }
        }

        fn expect_goaway(&mut self) -> ErrorCode {
            match self.expect("GOAWAY", |f| matches!(f, Frame::GoAway { .. })) {
                Frame::GoAway { code, .. } => code,
                _ => unreachable!(),
            }
        }

        fn expect_rst(&mut self, stream: u32) -> ErrorCode {
            match self.expect(
                "RST_STREAM",
                |f| matches!(f, Frame::RstStream { stream: s, .. } if *s == stream),
            ) {
                Frame::RstStream { code, .. } => code,
                _ => unreachable!(),
            }
        }
    }

    fn raw_pair(config: Config, server: bool) -> (Connection, Raw) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Transport::plain(
            a,
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(10)),
        )
        .unwrap();
        let conn = if server {
            Connection::server(t, config)
        } else {
            Connection::client(t, config)
        }
        .unwrap();
        let mut raw = Raw {
            sock: b,
            frames: frame::Decoder::new(frame::MAX_MAX_FRAME_SIZE),
            hpack: loona_hpack::Encoder::new(),
        };
        if server {
            raw.send(frame::PREFACE);
        } else {
            let mut preface = [0u8; 24];
            raw.sock.read_exact(&mut preface).unwrap();
            assert_eq!(&preface, frame::PREFACE);
        }
        let mut settings = Vec::new();
        frame::write_settings(&mut settings, &[]);
        raw.send(&settings);
        (conn, raw)
    }

    fn server() -> (Connection, Raw) {
        raw_pair(Config::default(), true)
    }

    #[test]
    fn settings_are_acknowledged_and_pings_answered() {
        let (_conn, mut raw) = server();
        raw.expect("SETTINGS", |f| {
            matches!(f, Frame::Settings { ack: false, .. })
        });
        raw.expect("SETTINGS ACK", |f| {
            matches!(f, Frame::Settings { ack: true, .. })
        });
        raw.frame(kind::PING, 0, 0, b"pingpong");
        let pong = raw.expect("PING ACK", |f| matches!(f, Frame::Ping { .. }));
        assert_eq!(
            pong,
            Frame::Ping {
                ack: true,
                payload: *b"pingpong"
            }
        );
    }

    #[test]
    fn bad_preface_and_missing_settings_are_protocol_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = Transport::plain(a, None, None).unwrap();
        let conn = Connection::server(t, Config::default()).unwrap();
        let mut raw = Raw {
            sock: b,
            frames: frame::Decoder::new(1 << 20),
            hpack: loona_hpack::Encoder::new(),
        };
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);
        assert!(matches!(
            conn.wait_closed(None),
            Some(Error::Protocol { .. })
        ));

        let (a, b) = UnixStream::pair().unwrap();
        let t = Transport::plain(a, None, None).unwrap();
        let _conn = Connection::server(t, Config::default()).unwrap();
        let mut raw = Raw {
            sock: b,
            frames: frame::Decoder::new(1 << 20),
            hpack: loona_hpack::Encoder::new(),
        };
        raw.send(frame::PREFACE);
        raw.frame(kind::PING, 0, 0, b"12345678");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);
    }

    #[test]
    fn a_silent_client_is_dropped() {
        let (a, _b) = UnixStream::pair().unwrap();
        let tick = Some(Duration::from_millis(20));
        let t = Transport::plain(a, tick, tick).unwrap();
        let config = Config {
            handshake_timeout: Duration::from_millis(100),
            ..Config::default()
        };
        let conn = Connection::server(t, config).unwrap();
        let err = conn.wait_closed(Some(Duration::from_secs(10)));
        assert!(
            matches!(&err, Some(Error::Io { err, .. }) if err.contains("no connection preface")),
            "{err:?}"
        );
    }

    #[test]
    fn a_trickling_or_silent_client_is_dropped_after_the_handshake_timeout() {
        let config = Config {
            handshake_timeout: Duration::from_millis(300),
            ..Config::default()
        };
        // Reads without a timeout (as on gRPC listeners, which live under
        // keepalive): the writer's watch closes the socket under the reader.
        // `trickle`: bytes of the preface and SETTINGS sent before stalling.
        for trickle in [0, 10, 24, 30] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let t = Transport::plain(a, None, Some(Duration::from_secs(10))).unwrap();
            let conn = Connection::server(t, config.clone()).unwrap();
            let mut opening = frame::PREFACE.to_vec();
            frame::write_settings(&mut opening, &[]);
            b.write_all(&opening[..trickle]).unwrap();
            let err = conn.wait_closed(Some(Duration::from_secs(10)));
            assert!(
                matches!(&err, Some(Error::Io { err, .. }) if err.contains("within")),
                "after {trickle} bytes: {err:?}"
            );
        }
        // A client that sent both in time is not held to it.
        let (conn, mut raw) = raw_pair(config, true);
        raw.expect("SETTINGS", |f| {
            matches!(f, Frame::Settings { ack: false, .. })
        });
        assert_eq!(conn.wait_closed(Some(Duration::from_millis(600))), None);
        let mut payload = [0u8; 8];
        payload[0] = 7;
        raw.frame(kind::PING, 0, 0, &payload);
        raw.expect("PING ACK", |f| matches!(f, Frame::Ping { ack: true, .. }));
    }

    #[test]
    fn window_overflow_past_2_31_is_a_flow_control_error() {
        let (_conn, mut raw) = server();
        raw.request(1);
        raw.frame(kind::WINDOW_UPDATE, 0, 1, &frame::MAX_WINDOW.to_be_bytes());
        assert_eq!(raw.expect_rst(1), ErrorCode::FLOW_CONTROL_ERROR);
        raw.frame(kind::WINDOW_UPDATE, 0, 0, &frame::MAX_WINDOW.to_be_bytes());
        assert_eq!(raw.expect_goaway(), ErrorCode::FLOW_CONTROL_ERROR);
    }

    #[test]
    fn settings_that_push_windows_past_2_31_are_flow_control_errors() {
        let (_conn, mut raw) = server();
        raw.request(1);
        raw.frame(
            kind::WINDOW_UPDATE,
            0,
            1,
            &(frame::MAX_WINDOW - 65_535).to_be_bytes(),
        );
        let mut s = setting::INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        s.extend(frame::MAX_WINDOW.to_be_bytes());
        raw.frame(kind::SETTINGS, 0, 0, &s);
        assert_eq!(raw.expect_goaway(), ErrorCode::FLOW_CONTROL_ERROR);
    }

    #[test]
    fn bad_settings_values_close_the_connection() {
        for (id, value, code) in [
            (
                setting::INITIAL_WINDOW_SIZE,
                1u32 << 31,
                ErrorCode::FLOW_CONTROL_ERROR,
            ),
            (setting::MAX_FRAME_SIZE, 100, ErrorCode::PROTOCOL_ERROR),
            (setting::ENABLE_PUSH, 7, ErrorCode::PROTOCOL_ERROR),
        ] {
            let (_conn, mut raw) = server();
            let mut s = id.to_be_bytes().to_vec();
            s.extend(value.to_be_bytes());
            raw.frame(kind::SETTINGS, 0, 0, &s);
            assert_eq!(raw.expect_goaway(), code, "setting {id} = {value}");
        }
    }

    #[test]
    fn stream_ids_must_be_odd_and_increasing() {
        let (_conn, mut raw) = server();
        raw.request(2);
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);

        let (conn, mut raw) = server();
        raw.request(5);
        let s5 = conn.accept().unwrap();
        assert_eq!(s5.id(), 5);
        raw.request(3);
        assert_eq!(raw.expect_rst(3), ErrorCode::STREAM_CLOSED);
    }

    #[test]
    fn frames_on_idle_and_closed_streams() {
        let (conn, mut raw) = server();
        raw.frame(kind::DATA, 0, 7, b"x");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);
        drop(conn);

        let (conn, mut raw) = server();
        raw.request(1);
        let s = conn.accept().unwrap();
        s.reset(ErrorCode::CANCEL);
        assert_eq!(raw.expect_rst(1), ErrorCode::CANCEL);
        drop(s);
        raw.frame(kind::DATA, flag::END_STREAM, 1, b"late");
        assert_eq!(raw.expect_rst(1), ErrorCode::STREAM_CLOSED);
        // WINDOW_UPDATE and RST_STREAM on a closed stream are ignored.
        raw.frame(kind::WINDOW_UPDATE, 0, 1, &1u32.to_be_bytes());
        raw.frame(kind::RST_STREAM, 0, 1, &0u32.to_be_bytes());
        raw.frame(kind::PING, 0, 0, b"stillok!");
        raw.expect("PING ACK", |f| matches!(f, Frame::Ping { ack: true, .. }));
        // Data after END_STREAM on an open stream.
        raw.headers(
            3,
            &[(":method", "POST"), (":path", "/x")],
            flag::END_HEADERS | flag::END_STREAM,
        );
        let _s3 = conn.accept().unwrap();
        raw.frame(kind::DATA, 0, 3, b"x");
        assert_eq!(raw.expect_rst(3), ErrorCode::STREAM_CLOSED);
    }

    #[test]
    fn continuation_must_follow_headers_on_the_same_stream() {
        let (_conn, mut raw) = server();
        raw.frame(kind::HEADERS, 0, 1, b"");
        raw.frame(kind::PING, 0, 0, b"12345678");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);

        let (_conn, mut raw) = server();
        raw.frame(kind::HEADERS, 0, 1, b"");
        raw.frame(kind::CONTINUATION, flag::END_HEADERS, 3, b"");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);

        let (_conn, mut raw) = server();
        raw.frame(kind::CONTINUATION, flag::END_HEADERS, 1, b"");
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);

        // Split correctly, the same block opens a stream.
        let (conn, mut raw) = server();
        let block = raw
            .hpack
            .encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/split")]);
        let (a, b) = block.split_at(3);
        raw.frame(kind::HEADERS, 0, 1, a);
        raw.frame(kind::CONTINUATION, flag::END_HEADERS, 1, b);
        let s = conn.accept().unwrap();
        match s.recv().unwrap().unwrap() {
            Event::Headers { fields, .. } => {
                assert!(fields.contains(&(":path".into(), b"/split".to_vec())))
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn oversized_headers_are_refused() {
        let config = Config {
            max_header_list_size: 1000,
            ..Config::default()
        };
        let (_conn, mut raw) = raw_pair(config.clone(), true);
        let big = "v".repeat(1500);
        raw.headers(
            1,
            &[(":method", "POST"), ("x-big", &big)],
            flag::END_HEADERS,
        );
        assert_eq!(raw.expect_rst(1), ErrorCode::PROTOCOL_ERROR);
        // A block that is too large even compressed costs the connection.
        let (_conn, mut raw) = raw_pair(config, true);
        raw.frame(kind::HEADERS, 0, 1, &[0x40; 1500]);
        raw.frame(kind::CONTINUATION, 0, 1, &[0x40; 1500]);
        assert_eq!(raw.expect_goaway(), ErrorCode::ENHANCE_YOUR_CALM);
    }

    #[test]
    fn hpack_garbage_is_a_compression_error() {
        let (_conn, mut raw) = server();
        raw.frame(
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        );
        assert_eq!(raw.expect_goaway(), ErrorCode::COMPRESSION_ERROR);
    }

    #[test]
    fn data_beyond_the_windows_is_refused() {
        let config = Config {
            stream_window: 65_535,
            connection_window: 65_535,
            max_frame_size: 1 << 17,
            ..Config::default()
        };
        let (_conn, mut raw) = raw_pair(config.clone(), true);
        raw.request(1);
        raw.frame(kind::DATA, 0, 1, &vec![0; 65_536]);
        // Exceeds both: the connection window is checked first.
        assert_eq!(raw.expect_goaway(), ErrorCode::FLOW_CONTROL_ERROR);

        let config = Config {
            stream_window: 65_535,
            connection_window: 1 << 20,
            ..config
        };
        let (_conn, mut raw) = raw_pair(config, true);
        raw.request(1);
        raw.frame(kind::DATA, 0, 1, &vec![0; 65_536]);
        assert_eq!(raw.expect_rst(1), ErrorCode::FLOW_CONTROL_ERROR);
    }

    #[test]
    fn oversized_frames_are_frame_size_errors() {
        let (_conn, mut raw) = raw_pair(
            Config {
                max_frame_size: 16_384,
                ..Config::default()
            },
            true,
        );
        raw.request(1);
        raw.frame(kind::DATA, 0, 1, &vec![0; 16_385]);
        assert_eq!(raw.expect_goaway(), ErrorCode::FRAME_SIZE_ERROR);
    }

    #[test]
    fn push_promise_to_a_client_is_a_protocol_error() {
        let (conn, mut raw) = raw_pair(Config::default(), false);
        let _s = conn
            .open_stream(&[(":method".into(), b"POST".to_vec())], false)
            .unwrap();
        raw.frame(kind::PUSH_PROMISE, flag::END_HEADERS, 1, &[0, 0, 0, 2]);
        assert_eq!(raw.expect_goaway(), ErrorCode::PROTOCOL_ERROR);
    }

    #[test]
    fn padded_data_is_delivered_and_credited() {
        let (conn, mut raw) = server();
        raw.request(1);
        let s = conn.accept().unwrap();
        s.recv().unwrap();
        raw.frame(
            kind::DATA,
            flag::PADDED | flag::END_STREAM,
            1,
            b"\x02ok\0\0",
        );
        assert_eq!(s.recv().unwrap(), Some(Event::Data(b"ok".to_vec())));
        assert_eq!(s.recv().unwrap(), None);
    }

    #[test]
    fn flow_control_blocks_senders_until_the_peer_reads() {
        // Our server sends into a peer that grants only the default window.
        let (conn, mut raw) = server();
        raw.request(1);
        let s = Arc::new(conn.accept().unwrap());
        s.recv().unwrap();
        let sender = {
            let s = s.clone();
            Worker::spawn("sender", move || {
                s.send_headers(&[(":status".into(), b"200".to_vec())], false)
                    .unwrap();
                s.send_data(&vec![1; 100_000], true).unwrap();
            })
            .unwrap()
        };
        let mut got = 0;
        while got < 65_535 {
            if let Frame::Data { data, .. } =
                raw.expect("DATA", |f| matches!(f, Frame::Data { .. }))
            {
                got += data.len();
            }
        }
        assert_eq!(got, 65_535, "never more than the window");
        // Both windows need credit before the rest flows.
        raw.frame(kind::WINDOW_UPDATE, 0, 1, &40_000u32.to_be_bytes());
        raw.frame(kind::WINDOW_UPDATE, 0, 0, &40_000u32.to_be_bytes());
        let mut end = false;
        while !end {
            if let Frame::Data {
                data, end_stream, ..
            } = raw.expect("DATA", |f| matches!(f, Frame::Data { .. }))
            {
                got += data.len();
                end = end_stream;
            }
        }
        assert_eq!(got, 100_000);
        sender.join();
    }

    #[test]
    fn data_frames_stay_small_when_the_peer_allows_huge_ones() {
        let (conn, mut raw) = server();
        let mut s = setting::MAX_FRAME_SIZE.to_be_bytes().to_vec();
        s.extend(frame::MAX_MAX_FRAME_SIZE.to_be_bytes());
        s.extend(setting::INITIAL_WINDOW_SIZE.to_be_bytes());
        s.extend(frame::MAX_WINDOW.to_be_bytes());
        raw.frame(kind::SETTINGS, 0, 0, &s);
        raw.frame(
            kind::WINDOW_UPDATE,
            0,
            0,
            &(frame::MAX_WINDOW - 65_535).to_be_bytes(),
        );
        raw.request(1);
        let stream = conn.accept().unwrap();
        stream.recv().unwrap();
        stream
            .send_headers(&[(":status".into(), b"200".to_vec())], false)
            .unwrap();
        // A sender may write its frames itself: read them meanwhile.
        let sender = std::thread::spawn(move || stream.send_data(&vec![3; 1 << 20], true));
        let mut got = 0;
        loop {
            if let Frame::Data {
                data, end_stream, ..
            } = raw.expect("DATA", |f| matches!(f, Frame::Data { .. }))
            {
                assert!(
                    data.len() <= MAX_DATA_FRAME as usize,
                    "{} byte frame",
                    data.len()
                );
                got += data.len();
                if end_stream {
                    break;
                }
            }
        }
        assert_eq!(got, 1 << 20);
        sender.join().unwrap().unwrap();
    }

    /// What a tap saw, for the tests.
    fn recorder() -> (Tap, std::sync::mpsc::Receiver<(String, Tapped)>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tap = Box::new(move |t: Tapped| {
            // The kernel's name: a pooled thread takes its job's.
            let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
            let thread = thread.trim_end().to_string();
            let _ = tx.send((thread, t));
        });
        (tap, rx)
    }

    #[test]
    fn a_tap_gets_queued_then_live_events_in_order_on_the_reader_and_returns_credit() {
        let config = Config {
            stream_window: 65_535,
            ..Config::default()
        };
        let (conn, mut raw) = raw_pair(config, true);
        raw.request(1);
        raw.frame(kind::DATA, 0, 1, b"queued");
        let s = conn.accept().unwrap();
        s.recv().unwrap(); // the request headers
        // Wait until the first DATA is queued, so the tap takes it over.
        raw.frame(kind::PING, 0, 0, b"ordering");
        raw.expect("PING ACK", |f| matches!(f, Frame::Ping { ack: true, .. }));
        let (tap, seen) = recorder();
        s.tap(tap);
        let wait = Duration::from_secs(10);
        let (thread, first) = seen.recv_timeout(wait).unwrap();
        assert!(matches!(first, Tapped::Event(Event::Data(d)) if d == b"queued"));
        assert_ne!(
            thread, "h2-reader",
            "queued events are delivered by the tapping thread"
        );
        // More than a quarter of the window: credit must come back unread.
        for _ in 0..2 {
            raw.frame(kind::DATA, 0, 1, &[7; 16_000]);
        }
        raw.expect("WINDOW_UPDATE", |f| {
            matches!(f, Frame::WindowUpdate { stream: 1, .. })
        });
        let fields = [("x-trailer", "1")];
        raw.headers(1, &fields, flag::END_HEADERS | flag::END_STREAM);
        let mut got = 0;
        while got < 32_000 {
            let (thread, event) = seen.recv_timeout(wait).unwrap();
            assert_eq!(thread, "h2-reader");
            match event {
                Tapped::Event(Event::Data(d)) => got += d.len(),
                e => panic!("{e:?}"),
            }
        }
        let (_, trailers) = seen.recv_timeout(wait).unwrap();
        assert!(matches!(
            trailers,
            Tapped::Event(Event::Headers {
                end_stream: true,
                ..
            })
        ));
        assert!(matches!(seen.recv_timeout(wait).unwrap().1, Tapped::End));
        assert!(seen.try_recv().is_err(), "nothing after the end");
    }

    #[test]
    fn a_tap_hears_of_a_reset_and_of_the_connection_ending() {
        let (conn, mut raw) = server();
        raw.request(1);
        raw.request(3);
        let (a, b) = (conn.accept().unwrap(), conn.accept().unwrap());
        a.recv().unwrap();
        b.recv().unwrap();
        let (tap_a, seen_a) = recorder();
        let (tap_b, seen_b) = recorder();
        a.tap(tap_a);
        b.tap(tap_b);
        let wait = Duration::from_secs(10);
        raw.frame(kind::RST_STREAM, 0, 1, &ErrorCode::CANCEL.0.to_be_bytes());
        let (_, reset) = seen_a.recv_timeout(wait).unwrap();
        assert!(
            matches!(
                reset,
                Tapped::Failed(Error::Reset {
                    stream: 1,
                    remote: true,
                    ..
                })
            ),
            "{reset:?}"
        );
        drop(raw); // the peer goes away
        let (_, gone) = seen_b.recv_timeout(wait).unwrap();
        assert!(matches!(gone, Tapped::Failed(_)), "{gone:?}");
        assert!(
            seen_a.recv_timeout(Duration::from_millis(100)).is_err(),
            "one last event"
        );
    }

    #[test]
    fn credit_returns_only_as_the_application_reads() {
        let config = Config {
            stream_window: 65_535,
            ..Config::default()
        };
        let (conn, mut raw) = raw_pair(config, true);
        raw.request(1);
        for _ in 0..4 {
            raw.frame(kind::DATA, 0, 1, &[9; 16_000]);
        }
        // Frames are answered in order: whatever receiving the data caused
        // is queued before this PING's ACK.
        raw.frame(kind::PING, 0, 0, b"ordering");
        loop {
            match raw.next().expect("connection open") {
                Frame::Ping { ack: true, .. } => break,
                Frame::WindowUpdate { stream: 1, .. } => {
                    panic!("credit before the application read")
                }
                _ => {}
            }
        }
        let stream = conn.accept().unwrap();
        stream.recv().unwrap();
        let mut got = 0;
        while got < 64_000 {
            match stream.recv().unwrap() {
                Some(Event::Data(d)) => got += d.len(),
                e => panic!("{e:?}"),
            }
        }
        let update = raw.expect("WINDOW_UPDATE", |f| {
            matches!(f, Frame::WindowUpdate { stream: 1, .. })
        });
        assert!(matches!(update, Frame::WindowUpdate { increment, .. } if increment >= 16_000));
    }

    #[test]
    fn goaway_lets_open_streams_finish() {
        let (conn, mut raw) = server();
        raw.request(1);
        let s = conn.accept().unwrap();
        conn.goaway();
        match raw.expect("GOAWAY", |f| matches!(f, Frame::GoAway { .. })) {
            Frame::GoAway {
                last_stream, code, ..
            } => assert_eq!((last_stream, code), (1, ErrorCode::NO_ERROR)),
            _ => unreachable!(),
        }
        // New streams are refused, the open one still works.
        raw.request(3);
        assert_eq!(raw.expect_rst(3), ErrorCode::REFUSED_STREAM);
        s.send_headers(&[(":status".into(), b"200".to_vec())], true)
            .unwrap();
        raw.frame(kind::DATA, flag::END_STREAM, 1, b"");
        drop(s);
        assert!(matches!(
            conn.wait_closed(Some(Duration::from_secs(10))),
            Some(Error::Closed)
        ));
        assert!(conn.accept().is_none());
    }

    /// The next PING follows the interval after an ACK, even when the
    /// interval is shorter than the timeout (the writer must not sleep the
    /// whole timeout once its PING was answered).
    #[test]
    fn answered_keepalive_pings_keep_the_interval() {
        let config = Config {
            keepalive_interval: Some(Duration::from_millis(50)),
            keepalive_timeout: Duration::from_secs(5),
            ..Config::default()
        };
        let (conn, mut raw) = raw_pair(config, true);
        let start = Instant::now();
        for _ in 0..3 {
            let ping = raw.expect("PING", |f| matches!(f, Frame::Ping { ack: false, .. }));
            let Frame::Ping { payload, .. } = ping else {
                unreachable!()
            };
            raw.frame(kind::PING, flag::ACK, 0, &payload);
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "three PINGs took {:?}",
            start.elapsed()
        );
        assert_eq!(conn.closed(), None);
    }

    /// Over a plaintext socket the reader sends our SETTINGS and answers
    /// the peer's SETTINGS and PINGs itself: no writer runs for them.
    #[test]
    fn a_plaintext_connections_reader_writes_its_answers_itself() {
        let (conn, mut raw) = raw_pair(Config::default(), true);
        for round in 0..3u8 {
            raw.frame(kind::PING, 0, 0, &[round; 8]);
            let ack = raw.expect("PING ACK", |f| matches!(f, Frame::Ping { ack: true, .. }));
            assert_eq!(
                ack,
                Frame::Ping {
                    ack: true,
                    payload: [round; 8]
                }
            );
        }
        let state = lock(&conn.shared);
        assert!(!state.writer_running && !state.writer_done, "no writer ran");
    }

    /// An idle connection holds no writer: its writer ends after
    /// WRITER_LINGER, and the timer starts one for each keepalive PING,
    /// which still closes the connection when it goes unanswered.
    #[test]
    fn an_idle_connections_writer_ends_and_the_timer_sends_its_pings() {
        let config = Config {
            keepalive_interval: Some(WRITER_LINGER * 3),
            keepalive_timeout: WRITER_LINGER * 3,
            ..Config::default()
        };
        let (conn, mut raw) = raw_pair(config, true);
        let idle = || !lock(&conn.shared).writer_running;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !idle() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(idle(), "the writer still runs");
        for _ in 0..2 {
            let ping = raw.expect("PING", |f| matches!(f, Frame::Ping { ack: false, .. }));
            let Frame::Ping { payload, .. } = ping else {
                unreachable!()
            };
            raw.frame(kind::PING, flag::ACK, 0, &payload);
        }
        raw.expect("PING", |f| matches!(f, Frame::Ping { ack: false, .. }));
        let err = conn.wait_closed(Some(Duration::from_secs(10)));
        assert!(
            matches!(err, Some(Error::KeepaliveTimeout { .. })),
            "{err:?}"
        );
        let id = conn.shared.id;
        drop(conn);
        assert!(!timer::waits(id), "the timer forgets a closed connection");
    }

    #[test]
    fn unanswered_keepalive_closes_the_connection() {
        let config = Config {
            keepalive_interval: Some(Duration::from_millis(50)),
            keepalive_timeout: Duration::from_millis(100),
            ..Config::default()
        };
        let (conn, mut raw) = raw_pair(config, true);
        raw.expect("PING", |f| matches!(f, Frame::Ping { ack: false, .. }));
        let err = conn.wait_closed(Some(Duration::from_secs(10)));
        assert!(
            matches!(err, Some(Error::KeepaliveTimeout { .. })),
            "{err:?}"
        );
    }
}
