//! The proxy-agent at work: keeps one stream per proxy-server replica (up
//! to the count the servers announce), serves each with its connection
//! [`Table`], dials destinations, pumps bytes, and drains on SIGTERM.
//!
//! Threads: the main loop (connecting, with backoff); per server stream a
//! reader (the stream's thread) and a writer (its outbound queue); per
//! destination a reader and a writer; per dial in flight one dialler (a
//! local destination is connected on the stream's reader, without one).
//! Every thread is owned by a [`WorkerSet`] and joined.

use std::collections::HashMap;
use std::fmt;
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::Config;
use super::table::{Action, Table};
use crate::grpc::{self, ClientCall, Inbound};
use crate::h2::conn::{Config as H2Config, Connection};
use crate::h2::transport::{TlsSetup, Transport};
use crate::http;
use crate::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};
use crate::shutdown::{Shutdown, WorkerSet};
use crate::sys::Connecting;
use crate::tunnel::ReadBuf;
use crate::tunnel::inbox::{self, Inbox};
use crate::tunnel::message::{Bytes, Message, data_head};
use crate::tunnel::proto::Packet;
use crate::tunnel::pump::{Pump, Reading};
use crate::tunnel::queue::{MIN_TUNNEL_QUEUE, Pop, Queue, Rejected, STREAM_QUEUE_BYTES};

const AGENT_PATH: &str = "/AgentService/Connect";
/// Bytes read from a destination per DATA packet.
const CHUNK: usize = 64 * 1024 - 64;
/// Packets queued towards one server stream before destination readers wait
/// (and at most [`STREAM_QUEUE_BYTES`] of payload).
const OUTBOX: usize = 256;
/// A destination reader waits this long for room before it gives up.
const OUTBOX_WAIT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream the agent half-closed (on SIGTERM, after DRAIN) waits
/// for the server to end the call before resetting it.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub use crate::tunnel::StartError as Error;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The agent's metrics, with upstream's names.
#[derive(Clone)]
struct AgentMetrics {
    registry: Arc<Registry>,
    dial_duration: Histogram,
    dial_failures: Counter,
    server_failures: Counter,
    open_servers: Gauge,
    known_servers: Gauge,
    open_endpoints: Gauge,
}

impl AgentMetrics {
    fn new() -> Self {
        let r = Registry::new();
        let n = |s: &str| format!("konnectivity_network_proxy_agent_{s}");
        AgentMetrics {
            dial_duration: r.histogram(
                &n("dial_duration_seconds"),
                "Latency of dial to the remote endpoint in seconds",
                &[],
                LATENCY_BUCKETS,
            ),
            dial_failures: r.counter(
                &n("endpoint_dial_failure_total"),
                "Number of failures dialing the remote endpoint, by reason",
                &["reason"],
            ),
            server_failures: r.counter(
                &n("server_connection_failure_count"),
                "Count of failures to send to or receive from the proxy server, by direction",
                &["direction"],
            ),
            open_servers: r.gauge(
                &n("open_server_connections"),
                "Current number of open server connections",
                &[],
            ),
            known_servers: r.gauge(&n("known_server_count"), "Current known server count", &[]),
            open_endpoints: r.gauge(
                &n("open_endpoint_connections"),
                "Current number of open endpoint connections",
                &[],
            ),
            registry: Arc::new(r),
        }
    }
}

/// A live destination connection, as the table holds it.
#[derive(Clone)]
struct Dest {
    inner: Arc<DestInner>,
}

struct DestInner {
    queue: Queue<Bytes>,
    /// Whether the writer thread was started: only when something had to
    /// be queued (most data is written by the stream's reader at once),
    /// so an idle or quiet destination holds no thread of its own (the
    /// stream's pump reads it).
    writer_started: Mutex<bool>,
    /// Shared with the destination's reader and writer threads (one
    /// descriptor per destination).
    socket: Arc<TcpStream>,
}

impl PartialEq for Dest {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dest")
    }
}

impl Dest {
    /// Closes now: queued data is dropped, the socket shut down.
    fn close(&self) {
        self.inner.queue.close_and_clear();
        let _ = self.inner.socket.shutdown(SocketShutdown::Both);
    }

    /// Closes once the queued data is written: the writer thread drains the
    /// closed queue, then shuts the socket down (bounded by its write
    /// timeout if the destination stops reading). Without a writer nothing
    /// is queued (the stream's reader, which alone queues, starts one
    /// first): shut down now.
    fn close_after_flush(&self) {
        self.inner.queue.close();
        let mut started = lock(&self.inner.writer_started);
        if !*started {
            *started = true; // none starts later
            let _ = self.inner.socket.shutdown(SocketShutdown::Both);
        }
    }
}

/// Servers connected right now, by server id, with each stream's outbound
/// queue (the one way to send on it: one writer per call).
struct Servers {
    streams: HashMap<String, Queue<Message>>,
    count: u32,
}

struct Shared {
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    metrics: AgentMetrics,
    servers: Mutex<Servers>,
    changed: Condvar,
    threads: WorkerSet,
}

/// One server stream's state.
struct Stream {
    shared: Arc<Shared>,
    table: Mutex<Table<Dest>>,
    outbox: Queue<Message>,
    /// The call the outbox feeds: its writer thread sends on it, and so do
    /// dial and destination threads when nobody else is (send_through).
    call: Arc<ClientCall>,
    threads: WorkerSet,
    /// The reader of this stream's destinations, stopped with the stream
    /// ([`crate::tunnel::pump`]).
    pump: Pump,
    /// What the stream's reader could not hand on without waiting, in
    /// order, for the stream's thread.
    backlog: Arc<Inbox<Backlog>>,
}

/// A destination as its stream's pump reads it.
struct DestReading {
    stream: Arc<Stream>,
    connect_id: i64,
    socket: Arc<TcpStream>,
    /// Why [`Reading::data`] refused more, for the close it reports.
    refused: Mutex<Option<&'static str>>,
}

impl Reading for DestReading {
    fn fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }

    fn data(&self, bytes: &[u8]) -> bool {
        let why = match self.stream.send_data(self.connect_id, bytes) {
            Ok(()) => return true,
            Err(Rejected::Closed(_)) => "server stream closed",
            Err(Rejected::Full(_)) => "server stream stalled",
        };
        *lock(&self.refused) = Some(why);
        false
    }

    fn ended(&self, why: &str) {
        let why = lock(&self.refused).take().unwrap_or(why);
        let actions = lock(&self.stream.table).destination_closed(self.connect_id, why);
        self.stream.execute(actions, Caller::MayWait);
    }
}

/// What the connection's reader could not carry out without waiting.
enum Backlog {
    Message(Message),
    Actions(Vec<Action<Dest>>),
}

/// Who runs [`Stream::execute`]: the stream's reader must never wait on
/// the server (it would stop reading what frees the window); a dial or
/// destination thread may.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The connection's reader thread (the stream's tap): waits on nothing;
    /// what would wait is handed back to the stream's thread.
    Reader,
    StreamReader,
    MayWait,
}

impl Stream {
    /// Sends one message to the server: on this thread (with whatever is
    /// queued ahead of it) when nobody else is sending, a thread hand-off
    /// fewer; else through the outbox (data waits up to OUTBOX_WAIT for
    /// room).
    fn send(&self, message: Message) -> Result<(), Rejected<Message>> {
        let Some(message) = self.outbox.send_through(message, |message| {
            let (head, data) = message.encode_parts();
            if self.call.send_parts(&head, &data).is_err() {
                self.send_failed();
            }
        }) else {
            return Ok(());
        };
        if matches!(message, Message::Data { .. }) {
            self.outbox.push_timeout(message, OUTBOX_WAIT)
        } else {
            self.outbox.push_control(message)
        }
    }

    /// DATA from a destination's read buffer: sent from there when the
    /// outbox is idle (no copy of the payload before its TLS record),
    /// otherwise copied and sent as [`Self::send`] sends every message.
    fn send_data(&self, connect_id: i64, data: &[u8]) -> Result<(), Rejected<Message>> {
        let sent = self.outbox.run_if_idle(|| {
            let head = data_head(connect_id, String::new(), data.len());
            if self.call.send_parts(&head, data).is_err() {
                self.send_failed();
            }
        });
        if sent {
            return Ok(());
        }
        self.send(Message::Data {
            connect_id,
            error: String::new(),
            data: data.to_vec().into(),
        })
    }

    /// Sending on the call failed: nothing more goes out on it.
    fn send_failed(&self) {
        self.shared.metrics.server_failures.inc(&["to_server"]);
        self.outbox.close_and_clear();
        self.call.cancel();
    }

    /// Carries out `actions`. For [`Caller::Reader`], the first one that
    /// would wait (data for a destination whose queue is full) and all after
    /// it come back, for the stream's thread.
    fn execute(
        self: &Arc<Self>,
        actions: Vec<Action<Dest>>,
        caller: Caller,
    ) -> Option<Vec<Action<Dest>>> {
        let mut actions = actions.into_iter();
        while let Some(action) = actions.next() {
            match action {
                Action::Reply(message) if caller == Caller::MayWait => {
                    let _ = self.send(message);
                }
                Action::Reply(message) => {
                    // Sent from here when nothing waits ahead of it and it
                    // goes out without waiting; else the outbox's writer
                    // sends it.
                    let queued = self.outbox.send_or(message, |message| {
                        let (head, data) = message.clone().encode_parts();
                        match self.call.try_send_parts(&head, &data) {
                            Ok(true) => None,
                            Ok(false) => Some(message),
                            Err(_) => {
                                self.send_failed();
                                None
                            }
                        }
                    });
                    if let Some(message) = queued {
                        let _ = self.outbox.push_control(message);
                    }
                }
                Action::Dial { random, address } => self.start_dial(random, address),
                Action::Deliver(connect_id, dest, data) => {
                    // Written here when the destination takes it at once
                    // and nothing is queued before it; never waits.
                    let fd = dest.inner.socket.as_raw_fd();
                    let sent = dest.inner.queue.send_or(data, |data| {
                        match crate::sys::send_now_realigned(fd, &data) {
                            Ok(n) if n == data.len() => None,
                            Ok(n) => Some(data.slice(n..)),
                            // The destination's reader sees the error and
                            // reports the close.
                            Err(_) => None,
                        }
                    });
                    let Some(data) = sent else {
                        // A part the destination did not take is queued.
                        if !dest.inner.queue.is_empty() {
                            self.start_writer(&dest);
                        }
                        continue;
                    };
                    // Something waits: the destination's writer thread
                    // (started now if this is the first time) sends it.
                    self.start_writer(&dest);
                    let pushed = match dest.inner.queue.try_push(data) {
                        Err(Rejected::Full(data)) if caller == Caller::Reader => {
                            let mut rest = vec![Action::Deliver(connect_id, dest, data)];
                            rest.extend(actions);
                            return Some(rest);
                        }
                        Err(Rejected::Full(data)) => {
                            // Other tunnels' packets behind this one: in
                            // this batch, or queued for the stream's thread.
                            let others_wait = || {
                                actions.as_slice().iter().any(|a| match a {
                                    Action::Deliver(c, ..) => *c != connect_id,
                                    Action::Close(d) | Action::CloseAfterFlush(d) => {
                                        !Arc::ptr_eq(&d.inner, &dest.inner)
                                    }
                                    _ => true,
                                }) || self.backlog.others_wait(|item| {
                                    matches!(item, Backlog::Message(m) if m.is_for(connect_id))
                                })
                            };
                            dest.inner.queue.push_graced(data, others_wait)
                        }
                        other => other,
                    };
                    if let Err(Rejected::Full(_)) = pushed {
                        log::warn!(
                            "destination of connection {connect_id} is not reading: closing it"
                        );
                        let actions = lock(&self.table)
                            .destination_closed(connect_id, "destination too slow");
                        self.execute(actions, caller);
                    }
                }
                Action::Close(dest) => {
                    dest.close();
                    self.shared.metrics.open_endpoints.add(&[], -1.0);
                }
                Action::CloseAfterFlush(dest) => {
                    dest.close_after_flush();
                    self.shared.metrics.open_endpoints.add(&[], -1.0);
                }
            }
        }
        None
    }

    /// Dials for a DIAL_REQ, on the stream's reader. An IP literal is
    /// connected here without waiting: a local destination (loopback, a
    /// pod on this node) is connected at once, and then answered from
    /// here, a thread hand-off sooner. Anything else (a name to resolve, a
    /// connection under way, a failure to report) goes on in a dial
    /// thread.
    fn start_dial(self: &Arc<Self>, random: i64, address: String) {
        let started = Instant::now();
        let mut pending = None;
        if let Ok(addr) = address.parse::<SocketAddr>() {
            match crate::sys::connect_start(&addr) {
                Ok(Connecting::Connected(socket)) if socket.local_addr().ok() != Some(addr) => {
                    let _ = socket.set_nodelay(true);
                    let Some((connect_id, socket)) =
                        self.dialled(random, started, Ok(socket), Caller::StreamReader)
                    else {
                        return;
                    };
                    log::debug!("connection {connect_id} to {address} established");
                    if self.pump_destination(connect_id, &socket) {
                        return;
                    }
                    let stream = self.clone();
                    let reader = socket.clone();
                    let spawned = self.threads.spawn("dest-read", move || {
                        stream.read_destination(connect_id, &reader)
                    });
                    if let Err(e) = spawned {
                        log::error!("starting a destination reader: {e}");
                        let actions = lock(&self.table).destination_closed(
                            connect_id,
                            &format!("agent cannot start a thread: {e}"),
                        );
                        self.execute(actions, Caller::StreamReader);
                    }
                    return;
                }
                Ok(Connecting::Pending(socket)) => pending = Some((socket, addr)),
                // Connected to itself, or failed: the dial thread tries
                // again and reports what it finds.
                _ => {}
            }
        }
        let stream = self.clone();
        let spawned = self.threads.spawn("dial", move || {
            let timeout = stream.shared.config.dial_timeout;
            let outcome = match pending {
                Some((socket, addr)) => finish_dial(socket, addr, timeout),
                None => dial(&address, timeout),
            };
            let Some((connect_id, socket)) =
                stream.dialled(random, started, outcome, Caller::MayWait)
            else {
                return;
            };
            log::debug!("connection {connect_id} to {address} established");
            // The stream's pump reads the destination; if it cannot, this
            // thread goes on as its reader.
            if !stream.pump_destination(connect_id, &socket) {
                stream.read_destination(connect_id, &socket);
            }
        });
        if let Err(e) = spawned {
            log::error!("starting a dial thread: {e}");
            let (_, actions) =
                lock(&self.table).dialled(random, Err(format!("agent cannot start a thread: {e}")));
            self.execute(actions, Caller::StreamReader);
        }
    }

    /// A dial's outcome: counted, entered in the table, answered. The
    /// DIAL_RSP is sent (or queued) before the destination is read: a
    /// destination that speaks first (SSH, SMTP, a greeter) would otherwise
    /// get DATA, even its CLOSE_RSP, onto the stream ahead of the DIAL_RSP,
    /// and the server would drop them as unknown. Returns the connection
    /// to read, unless the dial failed or was cancelled meanwhile.
    fn dialled(
        self: &Arc<Self>,
        random: i64,
        started: Instant,
        outcome: Result<TcpStream, String>,
        caller: Caller,
    ) -> Option<(i64, Arc<TcpStream>)> {
        let metrics = &self.shared.metrics;
        let (socket, outcome) = match outcome {
            Ok(socket) => {
                metrics
                    .dial_duration
                    .observe(&[], started.elapsed().as_secs_f64());
                let socket = Arc::new(socket);
                let _ = socket.set_write_timeout(Some(WRITE_TIMEOUT));
                let dest = Dest {
                    inner: Arc::new(DestInner {
                        queue: Queue::new(
                            self.shared.config.xfr_channel_size.max(MIN_TUNNEL_QUEUE),
                        ),
                        writer_started: Mutex::new(false),
                        socket: socket.clone(),
                    }),
                };
                // Counted from here; every Close action uncounts it.
                metrics.open_endpoints.add(&[], 1.0);
                (Some(socket), Ok(dest))
            }
            Err(e) => {
                metrics.dial_failures.inc(&[if e.contains("timed out") {
                    "timeout"
                } else {
                    "connection"
                }]);
                (None, Err(e))
            }
        };
        let (id, actions) = lock(&self.table).dialled(random, outcome);
        self.execute(actions, caller);
        id.zip(socket)
    }

    /// Has the stream's pump read the destination; false when it cannot
    /// (the stream has ended, or no pump thread starts): the caller reads
    /// it with a thread then.
    fn pump_destination(self: &Arc<Self>, connect_id: i64, socket: &Arc<TcpStream>) -> bool {
        let reading = Arc::new(DestReading {
            stream: self.clone(),
            connect_id,
            socket: socket.clone(),
            refused: Mutex::new(None),
        });
        match self.pump.add(reading) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("connection {connect_id}: read by a thread: {e}");
                false
            }
        }
    }

    /// Destination -> server until the destination ends or the stream
    /// breaks; then reports the close.
    fn read_destination(self: &Arc<Self>, connect_id: i64, socket: &TcpStream) {
        let mut buf = ReadBuf::new(CHUNK);
        let error = loop {
            match buf.read_from(&mut SharedRead(socket), CHUNK) {
                Ok([]) => break String::new(),
                Ok(bytes) => match self.send_data(connect_id, bytes) {
                    Ok(()) => {}
                    Err(Rejected::Closed(_)) => break "server stream closed".into(),
                    Err(Rejected::Full(_)) => break "server stream stalled".into(),
                },
                Err(e) => break e.to_string(),
            }
        };
        let actions = lock(&self.table).destination_closed(connect_id, &error);
        self.execute(actions, Caller::MayWait);
    }

    /// Starts the destination's writer thread (queue -> destination) unless
    /// it runs already or the destination is closing.
    fn start_writer(self: &Arc<Self>, dest: &Dest) {
        {
            let mut started = lock(&dest.inner.writer_started);
            if *started {
                return;
            }
            *started = true;
        }
        let dest = dest.clone();
        let failed = dest.clone();
        let spawned = self.threads.spawn("dest-write", move || {
            let inner = &dest.inner;
            while let Pop::Item(data) = inner.queue.pop_claim(None) {
                let written = crate::sys::write_all_realigned(&*inner.socket, &data);
                inner.queue.release();
                if written.is_err() {
                    break;
                }
            }
            // Ends the reader too (it then reports the close once).
            let _ = inner.socket.shutdown(SocketShutdown::Both);
        });
        if let Err(e) = spawned {
            log::error!("starting a destination writer: {e}");
            failed.close();
        }
    }
}

/// A destination's socket as its reader reads it: asleep in poll, so that
/// the stream's reader writing to the same socket does not wake it (see
/// [`crate::sys::read_polled`]).
struct SharedRead<'a>(&'a TcpStream);

impl std::io::Read for SharedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        crate::h2::transport::Socket::read_shared(self.0, buf)
    }
}

/// Dials `address` ("host:port") with a timeout per resolved address.
/// A connection to itself (a local destination port in the ephemeral range
/// with nothing listening, which the kernel happened to pick as the source
/// port: TCP simultaneous open) is no connection: like Go's dialer, retry
/// (another source port), then report the port as refused.
fn dial(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = address
        .to_socket_addrs()
        .map_err(|e| format!("dial tcp {address}: {e}"))?;
    let mut last = format!("dial tcp {address}: no address");
    for addr in addrs {
        let mut attempt = TcpStream::connect_timeout(&addr, timeout);
        for _ in 0..2 {
            match &attempt {
                Ok(s) if s.local_addr().ok() == Some(addr) => {
                    attempt = TcpStream::connect_timeout(&addr, timeout);
                }
                _ => break,
            }
        }
        match attempt {
            Ok(s) if s.local_addr().ok() == Some(addr) => {
                last = format!("dial tcp {addr}: connection refused (connected to itself)");
            }
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                last = format!("dial tcp {addr}: i/o timed out after {timeout:?}");
            }
            Err(e) => last = format!("dial tcp {addr}: {e}"),
        }
    }
    Err(last)
}

/// Finishes a connection [`crate::sys::connect_start`] left under way,
/// within `timeout`, reporting as [`dial`] does.
fn finish_dial(
    socket: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    match crate::sys::connect_finish(&socket, timeout) {
        Ok(true) => {
            let _ = socket.set_nodelay(true);
            Ok(socket)
        }
        Ok(false) => Err(format!("dial tcp {addr}: i/o timed out after {timeout:?}")),
        Err(e) => Err(format!("dial tcp {addr}: {e}")),
    }
}

/// Opens one stream to the server address; returns the client (which owns
/// the connection), the call, and the server's id and count.
fn open_stream(shared: &Shared) -> Result<(grpc::Client, ClientCall, String, u32), String> {
    let config = &shared.config;
    let target = if config.server_host.contains(':') {
        format!("[{}]:{}", config.server_host, config.server_port)
    } else {
        format!("{}:{}", config.server_host, config.server_port)
    };
    let socket = dial(&target, CONNECT_TIMEOUT)?;
    let name = rustls::pki_types::ServerName::try_from(config.server_host.clone())
        .map_err(|e| format!("server name {:?}: {e}", config.server_host))?;
    let tls = TlsSetup::Client(shared.tls.clone(), name);
    let transport =
        Transport::tls(socket, tls, None, Some(WRITE_TIMEOUT)).map_err(|e| e.to_string())?;
    let h2 = H2Config {
        keepalive_interval: Some(config.keepalive_time),
        ..H2Config::default()
    };
    let conn = Connection::client(transport, h2).map_err(|e| e.to_string())?;
    let client = grpc::Client::new(conn, &target);
    let identifiers = config.identifiers.to_string();
    let mut metadata = vec![
        ("agentid", config.agent_id.as_str()),
        ("agentidentifiers", identifiers.as_str()),
    ];
    let bearer;
    if let Some(path) = &config.token_path {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("reading token {}: {e}", path.display()))?;
        bearer = format!("Bearer {}", token.trim());
        metadata.push(("authorization", bearer.as_str()));
    }
    let call = client
        .call(AGENT_PATH, &metadata)
        .map_err(|s| format!("{s:?}"))?;
    let headers = call.headers().map_err(|s| format!("{s:?}"))?;
    let one = |key: &str| -> Result<String, String> {
        let values: Vec<&[u8]> = headers.get_all(key).collect();
        match values.as_slice() {
            [v] => Ok(String::from_utf8_lossy(v).into_owned()),
            other => Err(format!(
                "expected exactly one {key} header, got {}",
                other.len()
            )),
        }
    };
    let server_id = one("serverid")?;
    let count = one("servercount")?
        .parse::<u32>()
        .map_err(|e| format!("bad servercount: {e}"))?;
    Ok((client, call, server_id, count))
}

/// Serves one server stream until it ends. `ended` runs as soon as the
/// stream is over, before waiting for its dial threads (a dial to a
/// blackhole lasts the whole dial timeout; the agent must not wait for it
/// to reconnect).
fn serve_stream(
    shared: Arc<Shared>,
    client: grpc::Client,
    call: Arc<ClientCall>,
    server_id: String,
    outbox: Queue<Message>,
    ended: impl FnOnce(),
) {
    let stream = Arc::new(Stream {
        shared: shared.clone(),
        table: Mutex::new(Table::new(shared.config.max_connections)),
        outbox,
        call: call.clone(),
        threads: WorkerSet::new(),
        pump: Pump::new("dest-pump"),
        backlog: Arc::new(Inbox::new(inbox::BACKLOG)),
    });
    // Disconnected when the reader below is done: the writer's cue that
    // the call has ended.
    let (reader_finished, reader_done) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let writer_stream = stream.clone();
        let writer_call = call.clone();
        scope.spawn(move || {
            loop {
                // Shares sending with the dial and destination threads
                // (Stream::send): one message at a time, in order.
                match writer_stream.outbox.pop_claim(None) {
                    Pop::Item(message) => {
                        let (head, data) = message.encode_parts();
                        let sent = writer_call.send_parts(&head, &data);
                        writer_stream.outbox.release();
                        if sent.is_err() {
                            writer_stream.send_failed();
                            return;
                        }
                    }
                    // Closed and drained (a DRAIN went out last): end the
                    // stream with a half-close, not a reset. gRPC C-core
                    // (grpcio) drops messages its application has not read
                    // yet when RST_STREAM follows them, so the DRAIN was
                    // lost. The server then ends the call; reset if it
                    // does not within CLOSE_WAIT.
                    Pop::Closed | Pop::TimedOut => {
                        let _ = writer_call.close_send();
                        let _ = reader_done.recv_timeout(CLOSE_WAIT);
                        writer_call.cancel();
                        return;
                    }
                }
            }
        });
        // Packets are handled on the connection's reader thread as they
        // arrive; what would wait goes on here, in order.
        let inbox = stream.backlog.clone();
        let tap = {
            let (stream, inbox, server_id) = (stream.clone(), inbox.clone(), server_id.clone());
            move |inbound| {
                let message = match inbound {
                    Inbound::Message(packet) => match packet.and_then(Message::try_from) {
                        Ok(message) => message,
                        Err(e) => {
                            log::warn!("server {server_id}: skipping a packet: {e}");
                            return;
                        }
                    },
                    Inbound::End(end) => return inbox.end(end),
                };
                inbox.offer(Backlog::Message(message), |item| match item {
                    Backlog::Message(message) => {
                        let actions = lock(&stream.table).from_server(message);
                        stream
                            .execute(actions, Caller::Reader)
                            .map(Backlog::Actions)
                    }
                    actions => Some(actions),
                });
            }
        };
        call.recv_inline::<Packet>(tap);
        let end = inbox.drain(|item| {
            let actions = match item {
                Backlog::Message(message) => lock(&stream.table).from_server(message),
                Backlog::Actions(actions) => actions,
            };
            stream.execute(actions, Caller::StreamReader);
        });
        if let Err(status) = end {
            shared.metrics.server_failures.inc(&["from_server"]);
            log::info!("server {server_id}: stream ended: {status:?}");
            call.cancel();
        }
        drop(reader_finished);
        let actions = lock(&stream.table).close_all();
        stream.execute(actions, Caller::StreamReader);
        // Let a queued DRAIN or CLOSE_RSP go out only while the stream lives.
        stream.outbox.close_and_clear();
    });
    drop(client);
    ended();
    stream.pump.stop();
    stream.threads.join_all();
}

/// Runs the agent until `shutdown` triggers.
pub fn run(config: &Config, shutdown: &Shutdown) -> Result<(), Error> {
    let fail = |message: String| {
        shutdown.trigger("start-up failed");
        Error(message)
    };
    let mut alpn = vec![b"h2".to_vec()];
    alpn.extend(config.alpn.iter().map(|p| p.as_bytes().to_vec()));
    let identity = config
        .client_cert
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    let tls = crate::tls::client_config(&config.ca_cert, identity, alpn)
        .map_err(|e| fail(e.to_string()))?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        tls,
        metrics: AgentMetrics::new(),
        servers: Mutex::new(Servers {
            streams: HashMap::new(),
            count: 1,
        }),
        changed: Condvar::new(),
        threads: WorkerSet::new(),
    });
    {
        let shared = shared.clone();
        shutdown.on_trigger(move || shared.changed.notify_all());
    }

    let health_handler = |probes: bool| -> http::Handler {
        let shared = shared.clone();
        Arc::new(
            move |request: &crate::http::Request| match request.url().as_str() {
                "/healthz" if probes => crate::http::Response::text("ok"),
                "/readyz" if probes => {
                    if lock(&shared.servers).streams.is_empty() {
                        crate::http::Response::text("not ready: no connection to any proxy server")
                            .with_status_code(503)
                    } else {
                        crate::http::Response::text("ok")
                    }
                }
                "/metrics" => crate::http::Response::from_data(
                    crate::metrics::CONTENT_TYPE,
                    shared.metrics.registry.render(),
                ),
                _ => crate::http::Response::empty_404(),
            },
        )
    };
    let addr = |host: &str, port: u16| -> Result<std::net::SocketAddr, Error> {
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        let text = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        text.parse()
            .map_err(|_| Error(format!("bad address {host:?}")))
    };
    let health = http::Server::bind(
        addr(&config.health_host, config.health_port).map_err(|e| fail(e.0))?,
        None,
        http::Limits::default(),
        health_handler(true),
        shutdown,
    )
    .map_err(|e| fail(format!("health port: {e}")))?;
    log::info!("health port listening on {}", health.local_addr());
    let admin = http::Server::bind(
        addr(&config.admin_bind, config.admin_port).map_err(|e| fail(e.0))?,
        None,
        http::Limits::default(),
        health_handler(false),
        shutdown,
    )
    .map_err(|e| fail(format!("admin port: {e}")))?;
    log::info!("admin port listening on {}", admin.local_addr());
    log::info!(
        "agent {} connecting to {}:{}",
        config.agent_id,
        config.server_host,
        config.server_port
    );

    let mut interval = config.sync_interval;
    loop {
        if shutdown.is_triggered() {
            break;
        }
        let (have, want) = {
            let servers = lock(&shared.servers);
            (servers.streams.len() as u32, servers.count)
        };
        let mut progressed = false;
        if have < want || config.sync_forever {
            match open_stream(&shared) {
                Ok((client, call, server_id, count)) => {
                    let call = Arc::new(call);
                    let mut servers = lock(&shared.servers);
                    servers.count = count.max(1);
                    shared.metrics.known_servers.set(&[], count as f64);
                    if servers.streams.contains_key(&server_id) {
                        log::debug!(
                            "already connected to server {server_id}; closing the duplicate"
                        );
                        drop(servers);
                        call.cancel();
                    } else {
                        log::info!(
                            "connected to server {server_id} ({} of {count})",
                            servers.streams.len() + 1
                        );
                        let outbox =
                            Queue::with_bytes(OUTBOX, STREAM_QUEUE_BYTES, Message::data_len);
                        servers.streams.insert(server_id.clone(), outbox.clone());
                        shared
                            .metrics
                            .open_servers
                            .set(&[], servers.streams.len() as f64);
                        drop(servers);
                        progressed = true;
                        let worker_shared = shared.clone();
                        let spawned = shared.threads.spawn("server-stream", move || {
                            let ended = || {
                                let mut servers = lock(&worker_shared.servers);
                                servers.streams.remove(&server_id);
                                worker_shared
                                    .metrics
                                    .open_servers
                                    .set(&[], servers.streams.len() as f64);
                                drop(servers);
                                worker_shared.changed.notify_all();
                            };
                            serve_stream(
                                worker_shared.clone(),
                                client,
                                call,
                                server_id.clone(),
                                outbox,
                                ended,
                            );
                        });
                        if let Err(e) = spawned {
                            log::error!("starting a stream thread: {e}");
                        }
                    }
                }
                Err(e) => {
                    shared.metrics.server_failures.inc(&["connect"]);
                    log::warn!(
                        "connecting to {}:{}: {e}",
                        config.server_host,
                        config.server_port
                    );
                }
            }
        }
        // Backoff: reset on progress, x1.5 with jitter otherwise, capped.
        interval = if progressed {
            config.sync_interval
        } else {
            let jitter = 1.0 + (crate::sys::random_u64() % 1000) as f64 / 10_000.0;
            interval.mul_f64(1.5 * jitter).min(config.sync_interval_cap)
        };
        let servers = lock(&shared.servers);
        let satisfied = servers.streams.len() as u32 >= servers.count && !config.sync_forever;
        if satisfied {
            // Wait for a stream to end (or shutdown), checking every probe interval.
            let _ = shared.changed.wait_timeout(servers, config.probe_interval);
            interval = config.sync_interval;
        } else {
            drop(servers);
            shutdown.wait_timeout(if progressed { Duration::ZERO } else { interval });
        }
    }

    // SIGTERM: tell every server we are going (DRAIN), then close: each
    // stream's writer sends what is queued, DRAIN last, and ends the call.
    for (id, outbox) in &lock(&shared.servers).streams {
        log::info!("draining: sending DRAIN to server {id}");
        let _ = outbox.push_control(Message::Drain);
        outbox.close();
    }
    shared.threads.join_all();
    health.wait();
    admin.wait();
    log::info!("stopped");
    Ok(())
}
