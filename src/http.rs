//! A small, bounded HTTP/1.1 server on our own listener, over TLS or plain
//! TCP, with handlers written against its own [`Request`] and [`Response`].
//!
//! Owns: the listening socket, the connections (at most
//! [`Limits::max_connections`]) and the workers that serve them,
//! request-head parsing (httparse), bodies by `Content-Length`, keep-alive,
//! every limit and timeout, and writing [`Response`]s out.
//! Must not: know any route; a role passes one [`Handler`].
//!
//! Threads: a connection holds no thread while it waits for its next
//! request (or a new one for its first byte). It waits in one epoll set,
//! one-shot, and a pool of workers (one per core, at least two) takes
//! whichever connection has bytes to read, serves the requests that came
//! with blocking reads and writes under the usual timeouts, and puts it
//! back. Under load a worker finds the next connection ready and does not
//! sleep; the webhook's 50 keep-alive connections run on two workers
//! instead of 50 threads. A worker whose turn takes longer than
//! `STUCK_AFTER` (20 ms: a client trickling its request, or not reading its
//! answers) is stuck: the acceptor, which looks every `WATCH_TICK` (10 ms)
//! while a turn runs, starts another, so a slow client holds up only its
//! own connection; the extra workers end once idle. The acceptor also
//! closes the connections that sent nothing for the idle timeout (or, new
//! ones, the header timeout), to within an eighth of it.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use apiserver_proxy::{http, shutdown::Shutdown};
//! let shutdown = Shutdown::new().unwrap();
//! let handler: http::Handler = Arc::new(|_req: &http::Request| http::Response::text("ok"));
//! let addr = "127.0.0.1:0".parse().unwrap();
//! let server = http::Server::bind(addr, None, http::Limits::default(), handler, &shutdown).unwrap();
//! println!("listening on {}", server.local_addr());
//! server.wait(); // returns once `shutdown` triggers and every connection is done
//! ```
//!
//! Limits and their answers: a head over [`Limits::max_head_bytes`] or with
//! more than [`Limits::max_headers`] headers gets 431; a body over
//! [`Limits::max_body_bytes`] 413 (before it is read; `Expect: 100-continue`
//! is honoured); chunked bodies 411; a head not complete within
//! [`Limits::header_timeout`] of the connection (or, for later requests, of
//! its first byte) 408; a body not complete within [`Limits::body_timeout`]
//! is dropped. Connections beyond the cap get a 503 (plain TCP: written at
//! once by the acceptor; TLS: after a handshake bounded by the header
//! timeout, on one of [`REFUSERS`] threads, beyond which they are closed at
//! once), logged at most every [`REFUSAL_LOG_INTERVAL`]. After an error answer the
//! connection is closed, after reading (and discarding) what the client is
//! still sending for up to a second, so that it sees the answer.
//!
//! Shutdown: when the [`Shutdown`] triggers, the listener closes, idle
//! keep-alive connections and connections that have sent nothing close,
//! requests in flight finish (answered with `Connection: close`), and
//! [`Server::wait`] returns once all threads are joined. A TLS handshake
//! already under way is not interrupted; [`Limits::header_timeout`] bounds it.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::h2::records;
use crate::h2::transport::{Deadline, TlsSetup};
use crate::shutdown::{Shutdown, Worker, WorkerSet};
use crate::sys;
use crate::tls::Reloader;

/// The one request handler of a server.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// One request as a handler sees it: the whole (bounded) body is read.
#[derive(Debug, Clone)]
pub struct Request {
    fields: Fields,
    body: Vec<u8>,
}

/// Byte offsets `[start, end)` into [`Fields::text`].
type Span = (usize, usize);

/// A request head's method, target and headers, in one string (two
/// allocations per request, however many headers it has).
#[derive(Debug, Clone)]
struct Fields {
    text: String,
    method: Span,
    url: Span,
    headers: Vec<(Span, Span)>,
}

impl Fields {
    fn new<'a>(
        method: &str,
        url: &str,
        headers: impl ExactSizeIterator<Item = (&'a str, Cow<'a, str>)> + Clone,
    ) -> Fields {
        let len = method.len()
            + url.len()
            + headers
                .clone()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let mut text = String::with_capacity(len);
        let mut span = |s: &str| {
            let start = text.len();
            text.push_str(s);
            (start, text.len())
        };
        let method = span(method);
        let url = span(url);
        let mut spans = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            spans.push((span(name), span(&value)));
        }
        Fields {
            text,
            method,
            url,
            headers: spans,
        }
    }

    fn get(&self, (start, end): Span) -> &str {
        self.text.get(start..end).unwrap_or("")
    }

    fn method(&self) -> &str {
        self.get(self.method)
    }

    fn url(&self) -> &str {
        self.get(self.url)
    }

    /// The first header's value of that name (case-insensitive).
    fn first(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| self.get(*k).eq_ignore_ascii_case(name))
            .map(|(_, v)| self.get(*v))
    }

    /// Every header's value of that name (case-insensitive), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| self.get(*k).eq_ignore_ascii_case(name))
            .map(|(_, v)| self.get(*v))
    }
}

impl Request {
    /// A request as the server would pass it (`url`: the request target,
    /// path and query as sent).
    pub fn new(method: &str, url: &str, headers: Vec<(String, String)>, body: Vec<u8>) -> Request {
        let fields = Fields::new(
            method,
            url,
            headers
                .iter()
                .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
        );
        Request { fields, body }
    }

    pub fn method(&self) -> &str {
        self.fields.method()
    }

    /// The request target as sent: path and query, not decoded.
    pub fn raw_url(&self) -> &str {
        self.fields.url()
    }

    /// The path without the query, percent-decoded (invalid escapes and
    /// bytes are kept as they are, UTF-8 lossily).
    pub fn url(&self) -> String {
        let path = self.raw_url().split('?').next().unwrap_or("").as_bytes();
        let hex = |b: u8| (b as char).to_digit(16);
        let mut out = Vec::with_capacity(path.len());
        let mut i = 0;
        while i < path.len() {
            match (
                path[i],
                path.get(i + 1).copied().and_then(hex),
                path.get(i + 2).copied().and_then(hex),
            ) {
                (b'%', Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.fields.first(name)
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A handler's answer. The server adds Content-Length and Connection and
/// drops headers that would break the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status_code: u16,
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with `text/plain; charset=utf-8`.
    pub fn text(text: impl Into<String>) -> Response {
        Response::from_data("text/plain; charset=utf-8", text.into())
    }

    /// 200 with the given content type.
    pub fn from_data(
        content_type: impl Into<Cow<'static, str>>,
        data: impl Into<Vec<u8>>,
    ) -> Response {
        Response {
            status_code: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: data.into(),
        }
    }

    /// 404 with no body.
    pub fn empty_404() -> Response {
        Response {
            status_code: 404,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_status_code(mut self, code: u16) -> Response {
        self.status_code = code;
        self
    }

    /// Sets `name` to `value`, replacing any header of that name.
    pub fn with_unique_header(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Response {
        let name = name.into();
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        self.headers.push((name, value.into()));
        self
    }
}

/// Called after every answer, including the server's own error answers
/// (a refused connection is reported with method and path `-` and 503).
pub type Observer = Arc<dyn Fn(&Exchange<'_>) + Send + Sync>;

/// One finished request, for metrics and logs.
#[derive(Debug)]
pub struct Exchange<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub status: u16,
    /// From the complete request head to the answer written.
    pub elapsed: Duration,
}

/// TLS connections over the cap being answered 503 at once.
pub const REFUSERS: usize = 8;

/// How often the refusal log line repeats while connections are refused.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The most headers [`Limits::max_headers`] can allow (parsed on the stack).
pub const MAX_HEADERS: usize = 256;

/// Bounds on what a client may make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Request line plus headers, in bytes.
    pub max_head_bytes: usize,
    /// At most [`MAX_HEADERS`].
    pub max_headers: usize,
    pub max_body_bytes: usize,
    /// For the TLS handshake and the first head; for later heads, from the
    /// first byte. Guards against slowloris.
    pub header_timeout: Duration,
    /// For a whole body, from the end of the head.
    pub body_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// For each socket write.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 3 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Errors starting a server. Errors on a connection only close it.
#[derive(Debug)]
pub enum Error {
    Bind { addr: SocketAddr, err: io::Error },
    Listener(io::Error),
    Spawn(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, err } => write!(f, "listening on {addr}: {err}"),
            Error::Listener(err) => write!(f, "setting up the listener: {err}"),
            Error::Spawn(err) => write!(f, "starting a server thread: {err}"),
        }
    }
}

impl std::error::Error for Error {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    limits: Limits,
    tls: Option<Reloader>,
    handler: Handler,
    observer: Option<Observer>,
    shutdown: Shutdown,
    /// Every connection waiting for its next request (or a new one for its
    /// first byte), one-shot, and the shutdown flag: a worker takes the
    /// next connection with bytes to read.
    epoll: sys::Epoll,
    /// The connections in `epoll`, by token.
    parked: Mutex<Slab>,
    /// Each worker's turn clock: when its current turn began, in
    /// [`Shared::clock`] nanoseconds, or 0 while it waits in `epoll`.
    crew: Mutex<Vec<Arc<AtomicU64>>>,
    /// `crew`'s length, and how many of them are stuck in a turn (longer
    /// than [`STUCK_AFTER`]: a client trickling its request or not reading
    /// its answers), as the acceptor last counted.
    live: AtomicUsize,
    stuck: AtomicUsize,
    /// Workers free to take connections that the pool keeps: one per core,
    /// at least two.
    core: usize,
    /// Connections accepted and not yet closed (the cap counts these).
    open: AtomicUsize,
    started: Instant,
    /// Threads answering TLS connections over the cap, and how many run.
    refusers: WorkerSet,
    refusing: AtomicUsize,
    /// When the refusal line was last logged, and refusals since.
    refusal_log: Mutex<(Option<Instant>, u64)>,
}

impl Shared {
    /// Nanoseconds since the server started, never 0.
    fn clock(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64 + 1
    }
}

/// The token of the shutdown flag in [`Shared::epoll`].
const SHUTDOWN_TOKEN: u64 = u64::MAX;
/// A turn running longer than this counts as stuck: the acceptor then
/// starts another worker, so that the others' connections do not wait.
const STUCK_AFTER: Duration = Duration::from_millis(20);
/// How often the acceptor looks for stuck workers while any turn runs.
const WATCH_TICK: Duration = Duration::from_millis(10);
/// How long a worker beyond the pool's size waits for a connection before
/// it ends.
const SURPLUS_IDLE: Duration = Duration::from_secs(1);
/// The read buffer of each worker.
const SCRATCH: usize = 16 * 1024;

/// A connection between requests, off any thread.
struct Parked {
    transport: Transport,
    peer: SocketAddr,
    buf: Vec<u8>,
    read_timeout: Option<Duration>,
    /// A new connection: when it was accepted (its first head is due within
    /// the header timeout of that).
    accepted: Option<Instant>,
    /// When the acceptor closes it, if no request has begun by then.
    deadline: Instant,
    /// In the epoll set already (re-armed, not added).
    registered: bool,
}

/// Parked connections by token: the slot's index and generation, so that
/// an event for a connection closed meanwhile finds nothing.
#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Parked>)>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, parked: Parked) -> u64 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push((0, None));
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        slot.0 = slot.0.wrapping_add(1);
        slot.1 = Some(parked);
        ((index as u64) << 32) | u64::from(slot.0)
    }

    fn take(&mut self, token: u64) -> Option<Parked> {
        let index = (token >> 32) as usize;
        let slot = self.slots.get_mut(index)?;
        if slot.0 != token as u32 {
            return None;
        }
        let parked = slot.1.take()?;
        self.free.push(index);
        Some(parked)
    }

    fn take_any(&mut self) -> Option<Parked> {
        let index = self.slots.iter().position(|slot| slot.1.is_some())?;
        self.free.push(index);
        self.slots[index].1.take()
    }

    /// Takes every connection `pick` chooses.
    fn take_all(&mut self, pick: impl Fn(&Parked) -> bool) -> Vec<Parked> {
        let mut taken = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.1.as_ref().is_some_and(&pick) {
                taken.extend(slot.1.take());
                self.free.push(index);
            }
        }
        taken
    }
}

/// A running server. Dropping it (or [`Server::wait`]) blocks until the
/// shutdown flag it was given triggers and every connection is finished.
pub struct Server {
    local_addr: SocketAddr,
    acceptor: Worker,
    #[cfg(test)]
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) and starts accepting. With `tls`,
    /// every connection is TLS with the reloader's current config.
    pub fn bind(
        addr: SocketAddr,
        tls: Option<Reloader>,
        limits: Limits,
        handler: Handler,
        shutdown: &Shutdown,
    ) -> Result<Server, Error> {
        Self::bind_observed(addr, tls, limits, handler, None, shutdown)
    }

    /// [`Server::bind`], reporting every answer to `observer`.
    pub fn bind_observed(
        addr: SocketAddr,
        tls: Option<Reloader>,
        limits: Limits,
        handler: Handler,
        observer: Option<Observer>,
        shutdown: &Shutdown,
    ) -> Result<Server, Error> {
        let listener = TcpListener::bind(addr).map_err(|err| Error::Bind { addr, err })?;
        let local_addr = listener.local_addr().map_err(Error::Listener)?;
        listener.set_nonblocking(true).map_err(Error::Listener)?;
        let epoll = sys::Epoll::new().map_err(Error::Listener)?;
        epoll
            .add_level(shutdown.as_raw_fd(), SHUTDOWN_TOKEN)
            .map_err(Error::Listener)?;
        let core = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let shared = Arc::new(Shared {
            limits,
            tls,
            handler,
            observer,
            shutdown: shutdown.clone(),
            epoll,
            parked: Mutex::new(Slab::default()),
            crew: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            stuck: AtomicUsize::new(0),
            core,
            open: AtomicUsize::new(0),
            started: Instant::now(),
            refusers: WorkerSet::new(),
            refusing: AtomicUsize::new(0),
            refusal_log: Mutex::new((None, 0)),
        });
        #[cfg(test)]
        let watched = shared.clone();
        let acceptor = Worker::spawn(&format!("http-accept-{}", local_addr.port()), move || {
            let workers = WorkerSet::new();
            accept_loop(&listener, &shared, &workers);
            drop(listener);
            // Each worker sees the shutdown flag, answers the parked
            // connections whose next request has begun, closes the others
            // and ends; then what was parked meanwhile goes the same way.
            workers.join_all();
            drain(&shared, &mut vec![0; SCRATCH]);
            shared.refusers.join_all();
        })
        .map_err(Error::Spawn)?;
        Ok(Server {
            local_addr,
            acceptor,
            #[cfg(test)]
            shared: watched,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Blocks until shutdown has triggered and every connection is done.
    pub fn wait(self) {
        self.acceptor.join();
    }

    /// Worker threads, and connections open.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let shared = &self.shared;
        (
            shared.live.load(Ordering::Acquire),
            shared.open.load(Ordering::Acquire),
        )
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, workers: &WorkerSet) {
    let fds = [listener.as_raw_fd(), shared.shutdown.as_raw_fd()];
    while !shared.shutdown.is_triggered() {
        let tick = watch(shared, workers);
        if let Err(err) = sys::poll_readable(&fds, tick) {
            log::error!("waiting for connections: {err}");
            shared.shutdown.wait_timeout(Duration::from_millis(100));
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => admit(shared, stream, peer),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    // Out of descriptors, say: back off instead of spinning.
                    log::warn!("accepting a connection: {err}");
                    shared.shutdown.wait_timeout(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

/// Parks a new connection until its first byte (or refuses it over the cap).
fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if shared.open.load(Ordering::Acquire) >= shared.limits.max_connections {
        refuse(shared, stream, peer);
        return;
    }
    let limits = &shared.limits;
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(limits.write_timeout)))
        // Every read sets its own deadline; this is the backstop.
        .and_then(|()| stream.set_read_timeout(Some(limits.header_timeout)));
    if let Err(err) = prepared {
        log::debug!("connection from {peer}: {err}");
        return;
    }
    shared.open.fetch_add(1, Ordering::AcqRel);
    let transport = match &shared.tls {
        None => Transport::Plain(stream),
        Some(reloader) => Transport::Handshake(reloader.server_config(), Arc::new(stream)),
    };
    let now = Instant::now();
    park(
        shared,
        Parked {
            transport,
            peer,
            buf: Vec::new(),
            read_timeout: None,
            accepted: Some(now),
            deadline: now + limits.header_timeout,
            registered: false,
        },
    );
}

/// Puts a connection in the epoll set until its next bytes arrive.
fn park(shared: &Shared, parked: Parked) {
    let fd = parked.transport.socket().as_raw_fd();
    let registered = parked.registered;
    // In the slab before it is armed: its event may come at once.
    let token = lock(&shared.parked).insert(Parked {
        registered: true,
        ..parked
    });
    let armed = if registered {
        shared.epoll.rearm(fd, token)
    } else {
        shared.epoll.add_oneshot(fd, token)
    };
    if let Err(err) = armed {
        log::warn!("waiting for a connection's next request: {err}");
        if let Some(parked) = lock(&shared.parked).take(token) {
            close_parked(shared, parked);
        }
    }
}

/// Closes a connection nobody serves, without waiting on its socket.
fn close_parked(shared: &Shared, parked: Parked) {
    // A close_notify that does not fit the send buffer is dropped, rather
    // than holding up the acceptor for the write timeout.
    let _ = parked.transport.socket().set_nonblocking(true);
    parked.transport.close();
    shared.open.fetch_sub(1, Ordering::AcqRel);
}

/// The acceptor's rounds: counts the stuck workers and starts more until
/// [`Shared::core`] are free, and closes the parked connections past their
/// deadline. Returns when to look again.
fn watch(shared: &Arc<Shared>, workers: &WorkerSet) -> Option<Duration> {
    let now = shared.clock();
    let (mut busy, mut stuck) = (0, 0);
    for turn in lock(&shared.crew).iter() {
        let began = turn.load(Ordering::Acquire);
        if began != 0 {
            busy += 1;
            if now.saturating_sub(began) > STUCK_AFTER.as_nanos() as u64 {
                stuck += 1;
            }
        }
    }
    shared.stuck.store(stuck, Ordering::Release);
    let most = shared.limits.max_connections + shared.core;
    while shared.live.load(Ordering::Acquire) < (shared.core + stuck).min(most) {
        if !spawn_worker(shared, workers) {
            break;
        }
    }
    let now = Instant::now();
    let expired = lock(&shared.parked).take_all(|p| p.deadline <= now);
    for parked in expired {
        log::debug!("connection from {}: idle, closed", parked.peer);
        close_parked(shared, parked);
    }
    if busy > 0 {
        Some(WATCH_TICK)
    } else if shared.open.load(Ordering::Acquire) > 0 {
        // Deadlines are kept to within an eighth of their timeout.
        let limits = &shared.limits;
        let eighth = limits.header_timeout.min(limits.idle_timeout) / 8;
        Some(eighth.clamp(Duration::from_millis(10), Duration::from_secs(1)))
    } else {
        None
    }
}

fn spawn_worker(shared: &Arc<Shared>, workers: &WorkerSet) -> bool {
    let turn = Arc::new(AtomicU64::new(0));
    {
        let mut crew = lock(&shared.crew);
        crew.push(turn.clone());
        shared.live.store(crew.len(), Ordering::Release);
    }
    let owner = shared.clone();
    let mine = turn.clone();
    match workers.spawn("http-conn", move || work_loop(&owner, &mine)) {
        Ok(()) => true,
        Err(err) => {
            log::error!("starting a connection thread: {err}");
            leave(shared, &turn, 0);
            false
        }
    }
}

/// Takes a worker off the crew when more than `keep` are in it; false
/// (and nothing changes) otherwise.
fn leave(shared: &Shared, turn: &Arc<AtomicU64>, keep: usize) -> bool {
    let mut crew = lock(&shared.crew);
    if crew.len() <= keep {
        return false;
    }
    crew.retain(|t| !Arc::ptr_eq(t, turn));
    shared.live.store(crew.len(), Ordering::Release);
    true
}

/// Logs the first refusal, then at most one line per
/// [`REFUSAL_LOG_INTERVAL`] with the count (the observer counts each).
fn note_refusal(shared: &Shared, local: Option<SocketAddr>, peer: SocketAddr) {
    let mut log = lock(&shared.refusal_log);
    log.1 += 1;
    let now = Instant::now();
    if log
        .0
        .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
    {
        return;
    }
    let local = local.map(|a| a.to_string()).unwrap_or_default();
    log::warn!(
        "HTTP server {local}: connection limit of {} reached: refusing {peer} \
         ({} refused since the last report)",
        shared.limits.max_connections,
        log.1
    );
    *log = (Some(now), 0);
}

fn refuse(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    note_refusal(shared, stream.local_addr().ok(), peer);
    if shared.tls.is_some() {
        // A TLS client reads a 503 only after a handshake: a refusal
        // thread does it, bounded; beyond them, close at once.
        if shared.refusing.fetch_add(1, Ordering::AcqRel) < REFUSERS {
            let owner = shared.clone();
            let spawned = shared.refusers.spawn("http-refuse", move || {
                refuse_tls(&owner, stream, peer);
                owner.refusing.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_ok() {
                return; // observed by the refusal
            }
        } else {
            let _ = stream.shutdown(SocketShutdown::Both);
        }
        shared.refusing.fetch_sub(1, Ordering::AcqRel);
    } else {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let body = "too many connections\n";
        let _ = stream.write_all(
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let _ = stream.shutdown(SocketShutdown::Both);
    }
    if let Some(observer) = &shared.observer {
        observer(&Exchange {
            method: "-",
            path: "-",
            status: 503,
            elapsed: Duration::ZERO,
        });
    }
}

/// Answers a TLS connection over the cap with 503, within the header
/// timeout plus the usual linger.
fn refuse_tls(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(shared.limits.write_timeout)));
    let (Ok(()), Some(reloader)) = (prepared, &shared.tls) else {
        return;
    };
    let mut scratch = vec![0; SCRATCH];
    let mut conn = Conn {
        shared,
        transport: Transport::Handshake(reloader.server_config(), Arc::new(stream)),
        peer,
        buf: Vec::new(),
        scratch: &mut scratch,
        read_timeout: None,
    };
    let deadline = Instant::now() + shared.limits.header_timeout;
    let answered = conn.handshake(deadline).is_ok()
        && conn
            .reject(
                Reject {
                    status: 503,
                    reason: "too many connections",
                },
                "-",
                "-",
            )
            .is_ok();
    if !answered {
        conn.observe("-", "-", 503, Duration::ZERO);
    }
    conn.transport.close();
}

/// A worker: takes the next connection with bytes to read, serves the
/// requests that came, and parks it again. It waits only when no
/// connection is ready, so that under load a request costs no thread
/// wake-up; a worker whose turn blocks (a slow client) holds up only its
/// own connection, as the acceptor starts another.
fn work_loop(shared: &Shared, turn: &Arc<AtomicU64>) {
    let mut scratch = vec![0; SCRATCH];
    loop {
        // Beyond the pool's size, a worker ends once idle for a while.
        let surplus = shared.live.load(Ordering::Acquire) > shared.core;
        let token = match shared.epoll.wait(surplus.then_some(SURPLUS_IDLE)) {
            Ok(Some(token)) => token,
            Ok(None) => {
                let keep = shared.core + shared.stuck.load(Ordering::Acquire);
                if surplus && leave(shared, turn, keep) {
                    return;
                }
                continue;
            }
            Err(err) => {
                log::error!("waiting for connections: {err}");
                shared.shutdown.wait_timeout(Duration::from_millis(100));
                continue;
            }
        };
        if token == SHUTDOWN_TOKEN {
            drain(shared, &mut scratch);
            leave(shared, turn, 0);
            return;
        }
        let Some(parked) = lock(&shared.parked).take(token) else {
            continue; // closed meanwhile
        };
        turn.store(shared.clock(), Ordering::Release);
        let next = serve_turn(shared, parked, &mut scratch);
        turn.store(0, Ordering::Release);
        if let Some(parked) = next {
            park(shared, parked);
        }
        // More free workers than the pool keeps (a stuck one came back).
        let keep = shared.core + shared.stuck.load(Ordering::Acquire);
        if shared.live.load(Ordering::Acquire) > keep && leave(shared, turn, keep) {
            return;
        }
    }
}

/// At shutdown: answers the parked connections whose next request has
/// begun to arrive (with `Connection: close`) and closes the others.
fn drain(shared: &Shared, scratch: &mut [u8]) {
    loop {
        let Some(parked) = lock(&shared.parked).take_any() else {
            return;
        };
        let fd = parked.transport.socket().as_raw_fd();
        let begun = parked.transport.has_buffered()
            || sys::poll_readable(&[fd], Some(Duration::ZERO)).is_ok_and(|r| r[0]);
        if !begun {
            close_parked(shared, parked);
        } else if let Some(parked) = serve_turn(shared, parked, scratch) {
            close_parked(shared, parked);
        }
    }
}

/// Serves a connection's requests for as long as they come without
/// waiting; returns it to park when it waits for the next one.
fn serve_turn(shared: &Shared, parked: Parked, scratch: &mut [u8]) -> Option<Parked> {
    let Parked {
        transport,
        peer,
        buf,
        read_timeout,
        accepted,
        registered,
        ..
    } = parked;
    let mut conn = Conn {
        shared,
        transport,
        peer,
        buf,
        scratch,
        read_timeout,
    };
    match conn.serve_requests(accepted) {
        Ok(true) => {
            let mut buf = conn.buf;
            if buf.capacity() > SCRATCH {
                // A large body's room is not kept while the connection idles.
                buf = Vec::new();
            }
            return Some(Parked {
                transport: conn.transport,
                peer,
                buf,
                read_timeout: conn.read_timeout,
                accepted: None,
                deadline: Instant::now() + shared.limits.idle_timeout,
                registered,
            });
        }
        Ok(false) => {}
        Err(err) => log::debug!("connection from {peer}: {err}"),
    }
    conn.transport.close();
    shared.open.fetch_sub(1, Ordering::AcqRel);
    None
}

/// The byte stream of one connection, TLS or not.
enum Transport {
    Plain(TcpStream),
    /// TLS before its handshake, which the first read runs.
    Handshake(Arc<rustls::ServerConfig>, Arc<TcpStream>),
    /// TLS after the handshake: rustls handed the keys over and
    /// [`records`] decrypts in place and encrypts straight into the records
    /// it sends (no rustls buffers, no copy into a plaintext queue).
    Tls(Box<TlsHalves>, Arc<TcpStream>),
    /// A TLS handshake that failed: nothing more is read or written.
    Failed(Arc<TcpStream>),
}

struct TlsHalves {
    reader: records::RecordReader<TcpStream>,
    writer: records::RecordWriter<TcpStream>,
}

impl Transport {
    fn socket(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Handshake(_, s) | Transport::Tls(_, s) | Transport::Failed(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(tls, _) => tls.reader.read(buf),
            Transport::Handshake(..) | Transport::Failed(_) => Err(Self::unusable()),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(data),
            Transport::Tls(tls, _) => tls.writer.write_all(data),
            Transport::Handshake(..) | Transport::Failed(_) => Err(Self::unusable()),
        }
    }

    fn unusable() -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, "no TLS session")
    }

    /// Decrypted bytes, or a whole record, waiting in the reader (a
    /// pipelined request).
    fn has_buffered(&self) -> bool {
        match self {
            Transport::Tls(tls, _) => tls.reader.has_buffered(),
            _ => false,
        }
    }

    fn close(self) {
        let sock = match self {
            Transport::Plain(s) => {
                let _ = s.shutdown(SocketShutdown::Write);
                return;
            }
            // Dropping the writer half sends close_notify.
            Transport::Tls(tls, s) => {
                drop(tls);
                s
            }
            Transport::Handshake(_, s) | Transport::Failed(s) => s,
        };
        let _ = sock.shutdown(SocketShutdown::Write);
    }
}

/// Why reading a request stopped.
enum ReadError {
    /// The peer closed, idled out, or we are shutting down between requests.
    Closed,
    TimedOut,
    Io(io::Error),
}

struct Conn<'a> {
    shared: &'a Shared,
    transport: Transport,
    peer: SocketAddr,
    /// Bytes read but not yet consumed (the next request's start).
    buf: Vec<u8>,
    /// Where each read lands before it is appended to `buf` (the worker's).
    scratch: &'a mut [u8],
    /// The read timeout [`Conn::read_more`] last set on the socket (None:
    /// unknown), so that a keep-alive request, whose deadline is about
    /// where the last one's was, costs no setsockopt.
    read_timeout: Option<Duration>,
}

/// A read timeout is set this much past its deadline, and kept while it
/// ends at most twice this past the next deadline: a read may then wait
/// that much longer than the deadline, never less.
const READ_TIMEOUT_SLACK: Duration = Duration::from_millis(20);

/// A parsed request head.
struct Head {
    fields: Fields,
    minor_version: u8,
    /// Its length in bytes on the wire.
    len: usize,
}

impl Head {
    fn method(&self) -> &str {
        self.fields.method()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.fields.first(name)
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.fields
            .values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn path(&self) -> &str {
        self.fields.url().split('?').next().unwrap_or("")
    }
}

/// A problem answered by the server itself, then the connection closes.
struct Reject {
    status: u16,
    reason: &'static str,
}

impl Conn<'_> {
    /// Serves requests for as long as they come without waiting: true when
    /// the connection is to wait (parked) for its next request, false when
    /// it is done. `accepted`: a new connection, accepted then.
    fn serve_requests(&mut self, accepted: Option<Instant>) -> io::Result<bool> {
        let limits = &self.shared.limits;
        let mut first = accepted.is_some();
        let mut served = false;
        loop {
            let deadline = match accepted {
                Some(at) if first => at + limits.header_timeout,
                _ => {
                    // Between requests: nothing more has come, park.
                    if served && self.buf.is_empty() && !self.transport.has_buffered() {
                        return Ok(true);
                    }
                    Instant::now() + limits.header_timeout
                }
            };
            let head = match self.read_head(deadline, std::mem::take(&mut first)) {
                Ok(Ok(head)) => head,
                Ok(Err(reject)) => return self.reject(reject, "-", "-").map(|()| false),
                Err(ReadError::Closed) => return Ok(false),
                Err(ReadError::TimedOut) => {
                    if self.buf.is_empty() {
                        return Ok(false); // nothing asked, nothing to answer
                    }
                    let reject = Reject {
                        status: 408,
                        reason: "request head timed out",
                    };
                    return self.reject(reject, "-", "-").map(|()| false);
                }
                Err(ReadError::Io(err)) => return Err(err),
            };
            let started = Instant::now();
            let body = match self.read_body(&head) {
                Ok(Ok(body)) => body,
                Ok(Err(reject)) => {
                    return self
                        .reject(reject, head.method(), head.path())
                        .map(|()| false);
                }
                Err(ReadError::Io(err)) => return Err(err),
                Err(_) => return Ok(false),
            };
            let keep_alive = if head.minor_version >= 1 {
                !head.has_token("connection", "close")
            } else {
                head.has_token("connection", "keep-alive")
            } && !self.shared.shutdown.is_triggered();
            let head_only = head.method() == "HEAD";
            let request = Request {
                fields: head.fields,
                body,
            };
            let response = (self.shared.handler)(&request);
            let status = response.status_code;
            self.write_response(response, head_only, keep_alive)?;
            let path = request.raw_url().split('?').next().unwrap_or("");
            self.observe(request.method(), path, status, started.elapsed());
            if !keep_alive {
                return Ok(false);
            }
            served = true;
        }
    }

    fn observe(&self, method: &str, path: &str, status: u16, elapsed: Duration) {
        if let Some(observer) = &self.shared.observer {
            observer(&Exchange {
                method,
                path,
                status,
                elapsed,
            });
        }
    }

    /// Reads more bytes into `buf`, giving up at `deadline`.
    fn read_more(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::TimedOut);
        }
        // A zero timeout means "none" to std: keep it at least 1 ms.
        let remaining = (deadline - now).max(Duration::from_millis(1));
        let kept = self
            .read_timeout
            .is_some_and(|set| set >= remaining && set - remaining <= 2 * READ_TIMEOUT_SLACK);
        if !kept {
            let timeout = remaining + READ_TIMEOUT_SLACK;
            self.transport
                .socket()
                .set_read_timeout(Some(timeout))
                .map_err(ReadError::Io)?;
            self.read_timeout = Some(timeout);
        }
        if matches!(&self.transport, Transport::Handshake(..)) {
            // The handshake sets its own timeouts.
            self.read_timeout = None;
        }
        let read = self
            .handshake(deadline)
            .and_then(|()| self.transport.read(&mut self.scratch[..]));
        match read {
            Ok(0) => Err(ReadError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&self.scratch[..n]);
                Ok(())
            }
            Err(err) => match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Err(ReadError::TimedOut),
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Err(ReadError::Closed),
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(ReadError::Io(err)),
            },
        }
    }

    /// Finishes a TLS handshake by `deadline`: rustls reads on by itself
    /// while the handshake lasts, so a client trickling its ClientHello
    /// would otherwise renew the read timeout with every byte.
    fn handshake(&mut self, deadline: Instant) -> io::Result<()> {
        let Transport::Handshake(config, sock) = &self.transport else {
            return Ok(());
        };
        let (config, sock) = (config.clone(), sock.clone());
        let write_timeout = Some(self.shared.limits.write_timeout);
        let mut bounded = Deadline::new(&*sock, deadline, write_timeout);
        let split = records::handshake(TlsSetup::Server(config), &mut bounded)
            .and_then(|session| session.split(sock.clone()));
        match split {
            Ok((reader, writer)) => {
                self.transport = Transport::Tls(Box::new(TlsHalves { reader, writer }), sock);
                self.transport.socket().set_write_timeout(write_timeout)
            }
            Err(err) => {
                self.transport = Transport::Failed(sock);
                Err(err)
            }
        }
    }

    /// Reads one request head. With `abortable` (a new connection), a
    /// shutdown before its first byte closes it instead.
    fn read_head(
        &mut self,
        deadline: Instant,
        abortable: bool,
    ) -> Result<Result<Head, Reject>, ReadError> {
        let limits = &self.shared.limits;
        loop {
            if abortable && self.buf.is_empty() && !self.transport.has_buffered() {
                // Nothing of a request yet (a new connection, perhaps still
                // before its TLS handshake): shutdown may close it.
                let fds = [
                    self.transport.socket().as_raw_fd(),
                    self.shared.shutdown.as_raw_fd(),
                ];
                let remaining = deadline.saturating_duration_since(Instant::now());
                let ready = sys::poll_readable(&fds, Some(remaining)).map_err(ReadError::Io)?;
                if ready[1] && !ready[0] {
                    return Err(ReadError::Closed);
                }
            } else {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let slots = limits.max_headers.min(MAX_HEADERS);
                let mut request = httparse::Request::new(&mut headers[..slots]);
                let scan = &self.buf[..self.buf.len().min(limits.max_head_bytes)];
                match request.parse(scan) {
                    Ok(httparse::Status::Complete(len)) => {
                        let headers = request.headers.iter().map(|h| {
                            let value = String::from_utf8_lossy(h.value);
                            (h.name, value)
                        });
                        return Ok(Ok(Head {
                            fields: Fields::new(
                                request.method.unwrap_or(""),
                                request.path.unwrap_or(""),
                                headers,
                            ),
                            minor_version: request.version.unwrap_or(1),
                            len,
                        }));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() >= limits.max_head_bytes => {
                        return Ok(Err(Reject {
                            status: 431,
                            reason: "request header fields too large",
                        }));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Ok(Err(Reject {
                            status: 431,
                            reason: "too many request header fields",
                        }));
                    }
                    Err(httparse::Error::Version) => {
                        return Ok(Err(Reject {
                            status: 505,
                            reason: "HTTP version not supported",
                        }));
                    }
                    Err(_) => {
                        return Ok(Err(Reject {
                            status: 400,
                            reason: "malformed request head",
                        }));
                    }
                }
            }
            self.read_more(deadline)?;
        }
    }

    fn read_body(&mut self, head: &Head) -> Result<Result<Vec<u8>, Reject>, ReadError> {
        let limits = &self.shared.limits;
        if head.header("transfer-encoding").is_some() {
            return Ok(Err(Reject {
                status: 411,
                reason: "chunked bodies are not supported: send Content-Length",
            }));
        }
        let mut length: Option<usize> = None;
        for value in head.fields.values("content-length") {
            let value = value.trim();
            let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                value.parse::<usize>().ok()
            } else {
                None
            };
            match (parsed, length) {
                // Too many digits for usize is certainly too large.
                (None, _) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    length = Some(usize::MAX);
                }
                (None, _) => {
                    return Ok(Err(Reject {
                        status: 400,
                        reason: "invalid Content-Length",
                    }));
                }
                (Some(n), Some(seen)) if n != seen => {
                    return Ok(Err(Reject {
                        status: 400,
                        reason: "conflicting Content-Length headers",
                    }));
                }
                (Some(n), _) => length = Some(n),
            }
        }
        let length = length.unwrap_or(0);
        if length > limits.max_body_bytes {
            return Ok(Err(Reject {
                status: 413,
                reason: "request body too large",
            }));
        }
        self.buf.drain(..head.len);
        if self.buf.len() < length
            && head.minor_version >= 1
            && head.has_token("expect", "100-continue")
        {
            self.transport
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(ReadError::Io)?;
        }
        let deadline = Instant::now() + limits.body_timeout;
        while self.buf.len() < length {
            self.read_more(deadline)?;
        }
        let body = self.buf[..length].to_vec();
        self.buf.drain(..length);
        Ok(Ok(body))
    }

    /// Answers with the server's own error and closes after a short linger.
    fn reject(&mut self, reject: Reject, method: &str, path: &str) -> io::Result<()> {
        log::debug!(
            "{}: answering {} ({})",
            self.peer,
            reject.status,
            reject.reason
        );
        let response =
            Response::text(format!("{}\n", reject.reason)).with_status_code(reject.status);
        self.write_response(response, false, false)?;
        self.observe(method, path, reject.status, Duration::ZERO);
        // Read what the client is still sending, so that closing does not
        // reset the connection before it has read the answer.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut discarded = 0;
        while discarded < 2 * self.shared.limits.max_body_bytes {
            self.buf.clear();
            if self.read_more(deadline).is_err() {
                break;
            }
            discarded += self.buf.len();
        }
        Ok(())
    }

    fn write_response(
        &mut self,
        response: Response,
        head_only: bool,
        keep_alive: bool,
    ) -> io::Result<()> {
        let status = response.status_code;
        let mut out = Vec::with_capacity(512 + response.body.len());
        let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
        for (name, value) in &response.headers {
            let managed = [
                "connection",
                "content-length",
                "transfer-encoding",
                "trailer",
                "upgrade",
            ]
            .iter()
            .any(|m| name.eq_ignore_ascii_case(m));
            let unsafe_text = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
            if managed || unsafe_text(name) || unsafe_text(value) {
                continue;
            }
            let _ = write!(out, "{name}: {value}\r\n");
        }
        let _ = write!(out, "Content-Length: {}\r\n", response.body.len());
        if !keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let body_start = out.len();
        out.extend_from_slice(&response.body);
        if head_only {
            out.truncate(body_start);
        }
        self.transport.write_all(&out)
    }
}

/// The standard reason phrase (any text is allowed; clients ignore it).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_carry_what_handlers_read() {
        let headers = vec![("content-TYPE".to_string(), "a/b".to_string())];
        let req = Request::new("POST", "/x%20y/%zz%4?q=%20", headers, b"body".to_vec());
        assert_eq!(req.raw_url(), "/x%20y/%zz%4?q=%20");
        assert_eq!(req.url(), "/x y/%zz%4", "decoded, without the query");
        assert_eq!(req.header("Content-Type"), Some("a/b"));
        assert_eq!(req.header("Accept"), None);
        assert_eq!((req.method(), req.body()), ("POST", &b"body"[..]));
        let text = Response::text("ok").with_status_code(503);
        assert_eq!(text.status_code, 503);
        assert_eq!(text.headers[0].1, "text/plain; charset=utf-8");
        let r =
            Response::from_data("application/json", "{}").with_unique_header("content-type", "x/y");
        assert_eq!(r.headers, vec![("content-type".into(), "x/y".into())]);
        assert_eq!(Response::empty_404().status_code, 404);
    }

    /// A server that shuts down when dropped, so a failed assertion ends
    /// the test instead of hanging in the join.
    struct Running {
        server: Option<Server>,
        shutdown: Shutdown,
    }

    impl Running {
        fn addr(&self) -> SocketAddr {
            self.server.as_ref().expect("running").local_addr()
        }

        fn stop(mut self) {
            self.shutdown.trigger("test");
            self.server.take().expect("running").wait();
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.shutdown.trigger("test over");
        }
    }

    fn start(limits: Limits) -> Running {
        let shutdown = Shutdown::new().unwrap();
        let handler: Handler = Arc::new(|req: &Request| {
            Response::text(format!(
                "{} {} {}",
                req.method(),
                req.raw_url(),
                req.body().len()
            ))
        });
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            None,
            limits,
            handler,
            &shutdown,
        )
        .unwrap();
        Running {
            server: Some(server),
            shutdown,
        }
    }

    fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
        stream.write_all(request).unwrap();
        let mut buf = vec![0; 8192];
        let mut out = Vec::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Read until one full response (head + Content-Length body) is in.
        loop {
            let n = stream.read(&mut buf).unwrap_or(0);
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if out.len() >= end + 4 + len {
                    return text;
                }
            }
            if n == 0 {
                return text;
            }
        }
    }

    #[test]
    fn keep_alive_bodies_limits_and_shutdown() {
        let limits = Limits {
            max_body_bytes: 100,
            max_headers: 5,
            ..Limits::default()
        };
        let server = start(limits);
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut s, b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("GET /a?x=1 0"), "{r}");
        let r = exchange(
            &mut s,
            b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(r.ends_with("POST /b 5"), "{r}");
        // Pipelined: two requests in one write, two answers.
        let mut r = exchange(&mut s, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n");
        if !r.ends_with("GET /2 0") {
            r += &exchange(&mut s, b""); // the second answer came in its own read
        }
        let first = r.find("GET /1 0").expect("first answer");
        assert!(r[first..].ends_with("GET /2 0"), "{r}");
        let r = exchange(&mut s, b"POST /big HTTP/1.1\r\nContent-Length: 101\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 413 "), "{r}");
        assert!(r.contains("Connection: close"), "{r}");

        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(
            &mut s,
            b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\nf: 1\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut s, b"\x16\x03\x01garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(
            &mut s,
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(
            &mut s,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 411 "), "{r}");

        // An idle keep-alive connection does not hold up shutdown.
        let mut idle = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut idle, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let addr = server.addr();
        server.stop();
        assert!(
            TcpStream::connect(addr).is_err(),
            "the listener must be closed"
        );
    }

    #[test]
    fn http10_and_head_requests() {
        let server = start(Limits::default());
        let mut s = TcpStream::connect(server.addr()).unwrap();
        // A HEAD answer has a Content-Length but no body: read to the blank line.
        s.write_all(b"HEAD /h HTTP/1.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let r = String::from_utf8_lossy(&head).to_string();
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("Content-Length: 9\r\n"),
            "{r}"
        );
        let r = exchange(&mut s, b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200")
                && r.ends_with("GET /k 0")
                && !r.contains("Connection: close"),
            "{r}"
        );
        let r = exchange(&mut s, b"GET /c HTTP/1.0\r\n\r\n");
        assert!(
            r.contains("Connection: close") && r.ends_with("GET /c 0"),
            "{r}"
        );
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap_or(0),
            0,
            "HTTP/1.0 without keep-alive closes"
        );
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut s, b"GET / HTTP/2.0\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 505") || r.starts_with("HTTP/1.1 400"),
            "{r}"
        );
        server.stop();
    }

    #[test]
    fn connections_beyond_the_cap_are_refused() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let server = start(limits);
        let mut first = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut first, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let mut second = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut second, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        // The first still works, and once it closes a new one is served.
        let r = exchange(&mut first, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let addr = server.addr();
        let mut deadline = 0;
        loop {
            let mut third = TcpStream::connect(addr).unwrap();
            let r = exchange(&mut third, b"GET / HTTP/1.1\r\n\r\n");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            deadline += 1;
            assert!(deadline < 1000, "the freed slot was never reused: {r}");
            std::thread::sleep(Duration::from_millis(5));
        }
        server.stop();
    }

    #[test]
    fn shutdown_does_not_wait_for_silent_connections() {
        let limits = Limits {
            header_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let server = start(limits);
        let _silent = TcpStream::connect(server.addr()).unwrap();
        let mut half = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut half, b"GET /x HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        // A request in flight is still answered.
        half.write_all(b"GET /x HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        server.shutdown.trigger("test");
        let r = exchange(&mut half, b"\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("Connection: close"),
            "{r}"
        );
        server.stop();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "shutdown waited for the header timeout"
        );
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn idle_keep_alive_connections_hold_no_thread_and_close_after_the_idle_timeout() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = start(limits);
        let core = server.server.as_ref().unwrap().shared.core;
        let mut idle: Vec<TcpStream> = (0..3 * core + 4)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr()).unwrap();
                let r = exchange(&mut s, b"GET /k HTTP/1.1\r\n\r\n");
                assert!(r.ends_with("GET /k 0"), "{r}");
                s
            })
            .collect();
        let counts = || server.server.as_ref().unwrap().counts();
        let (workers, open) = counts();
        assert_eq!(open, idle.len(), "every connection is open");
        assert!(
            workers <= core,
            "{workers} workers for {open} idle connections"
        );
        // Each is closed by the server once idle for the timeout.
        for s in &mut idle {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(s.read(&mut byte).unwrap_or(0), 0, "closed by the server");
        }
        wait_until("no connection is open", || counts().1 == 0);
        // A request on time keeps a connection: three in a row, each well
        // within the idle timeout of the last.
        let mut s = TcpStream::connect(server.addr()).unwrap();
        for _ in 0..3 {
            let r = exchange(&mut s, b"GET /again HTTP/1.1\r\n\r\n");
            assert!(r.ends_with("GET /again 0"), "{r}");
        }
        server.stop();
    }

    #[test]
    fn clients_stuck_mid_request_do_not_hold_up_the_others() {
        let limits = Limits {
            header_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let server = start(limits);
        let core = server.server.as_ref().unwrap().shared.core;
        // More clients than the pool keeps workers, each stopping halfway
        // through its head: each holds a worker.
        let stuck: Vec<TcpStream> = (0..core + 2)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr()).unwrap();
                s.write_all(b"GET /slow HTTP/1.1\r\nX-Half: ").unwrap();
                s
            })
            .collect();
        let counts = || server.server.as_ref().unwrap().counts();
        wait_until("a worker per stuck client, and free ones", || {
            counts().0 >= stuck.len() + core
        });
        let started = Instant::now();
        let mut s = TcpStream::connect(server.addr()).unwrap();
        let r = exchange(&mut s, b"GET /fast HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("GET /fast 0"), "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the stuck clients' header timeout"
        );
        // The stuck ones finish their heads and are answered too; then the
        // pool shrinks back to its free workers.
        for mut s in stuck {
            let r = exchange(&mut s, b"1\r\n\r\n");
            assert!(r.ends_with("GET /slow 0"), "{r}");
        }
        wait_until("the pool is back to its size", || counts().0 == core);
        server.stop();
    }

    #[test]
    fn slow_heads_time_out() {
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let server = start(limits);
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
        let r = exchange(&mut s, b"a");
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
        server.stop();
    }
}
