//! The server's listeners: TCP or Unix sockets, one owned thread per
//! connection (which may hand the connection on, with its [`Held`], and
//! return: a plaintext CONNECT tunnel once its agent stream's pump reads
//! it), a shared cap on open connections, and the shutdown path
//! (stop accepting; on [`Listeners::close_all`], shut every socket down so
//! that blocked reads return). A listener is held by one pooled thread at
//! a time, its leader, which accepts a connection, hands the listener on
//! and serves the connection itself ([`Leader`]).
//!
//! Over the cap, a connection gets its listener's [`Refuse`] answer (a 503,
//! a GOAWAY) on a short-lived thread, at most [`REFUSERS`] at once (as many
//! more wait for one), so that refusing stays cheaper than serving; beyond
//! that it is closed at once.
//! The refusals are logged at most every [`REFUSAL_LOG_INTERVAL`], with
//! the limit and how many were refused.
//!
//! Owns: sockets until a connection thread takes one (with its [`Held`],
//! which a `serve` closure may keep past its return). Must not: speak any
//! protocol; the role's `serve` closure does.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::shutdown::{Latch, Shutdown, Worker, WorkerSet};
use crate::sys;

/// An accepted connection. Clones share the socket (one descriptor).
#[derive(Clone)]
pub enum Conn {
    Tcp(Arc<TcpStream>),
    Unix(Arc<UnixStream>),
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Conn {
    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(SocketShutdown::Both),
            Conn::Unix(s) => s.shutdown(SocketShutdown::Both),
        };
    }

    pub fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp peer".into()),
            Conn::Unix(_) => "unix peer".into(),
        }
    }
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn tcp(bind: &str, port: u16) -> io::Result<Listener> {
        let host = if bind.is_empty() { "0.0.0.0" } else { bind };
        let addr: SocketAddr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
        .parse()
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad bind address {host:?}"),
            )
        })?;
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Binds a Unix socket; a stale socket file is removed first when
    /// `delete_existing` (upstream's `--delete-existing-uds-file`).
    pub fn unix(path: &Path, delete_existing: bool) -> io::Result<Listener> {
        if delete_existing && std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// Where it listens, for the start-up log line.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        let conn = match self {
            Listener::Tcp(l) => Conn::Tcp(Arc::new(l.accept()?.0)),
            Listener::Unix(l, _) => Conn::Unix(Arc::new(l.accept()?.0)),
        };
        // Accepted sockets inherit non-blocking mode on some systems.
        match &conn {
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
            }
            Conn::Unix(s) => s.set_nonblocking(false)?,
        }
        Ok(conn)
    }

    fn fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a connection thread runs: the connection and a handle to mark it
/// closing-allowed. It returns when the connection is done.
pub type Serve = Arc<dyn Fn(Conn, Held) + Send + Sync>;

/// An accepted connection's place among the open connections: it counts
/// towards the cap, and [`Listeners::close_all`] shuts its socket down,
/// until this is dropped. The thread that serves the connection drops it
/// when it returns, unless it hands the connection (and this) on to
/// whatever serves it from then on.
pub struct Held {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        lock(&self.open.closers).remove(&self.id);
        self.open.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection over the cap and closes it; must be bounded in
/// time (it runs on one of [`REFUSERS`] threads).
pub type Refuse = Arc<dyn Fn(Conn) + Send + Sync>;

/// Connections being refused with an answer at once, across listeners.
pub const REFUSERS: usize = 8;

/// How often the refusal log line repeats while connections are refused.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

struct Open {
    closers: Mutex<HashMap<u64, Conn>>,
    workers: WorkerSet,
    count: AtomicUsize,
    refusals: Mutex<Refusals>,
    /// Wakes a refusal thread lingering for the next connection to refuse.
    refusal_cv: Condvar,
    next: AtomicU64,
}

/// Connections waiting for a refusal thread, and how many of those run.
/// A refusal thread takes the next waiting connection before it ends, and
/// lingers [`REFUSAL_LINGER`] for one when none waits, so that in a flood
/// the same threads keep refusing: a thread that ended one refusal is not
/// yet idle in the pool, and starting the next refusal on a thread of its
/// own would have taken a new one.
#[derive(Default)]
struct Refusals {
    waiting: std::collections::VecDeque<(u64, Conn, Refuse)>,
    threads: usize,
    /// Refusal threads waiting on `refusal_cv` (counted in `threads` too).
    lingering: usize,
}

/// How long a refusal thread waits for the next connection to refuse.
const REFUSAL_LINGER: Duration = Duration::from_millis(100);

/// All listeners of a process, sharing one connection cap.
pub struct Listeners {
    open: Arc<Open>,
    max_connections: usize,
    acceptors: Vec<Worker>,
    shutdown: Shutdown,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Listeners {
    pub fn new(max_connections: usize, shutdown: &Shutdown) -> Self {
        Listeners {
            open: Arc::new(Open {
                closers: Mutex::new(HashMap::new()),
                workers: WorkerSet::new(),
                count: AtomicUsize::new(0),
                refusals: Mutex::new(Refusals::default()),
                refusal_cv: Condvar::new(),
                next: AtomicU64::new(0),
            }),
            max_connections,
            acceptors: Vec::new(),
            shutdown: shutdown.clone(),
        }
    }

    /// Starts accepting on `listener` until shutdown; each connection runs
    /// `serve` on its own thread. `on_refused` is called for connections
    /// beyond the cap (they are closed at once).
    pub fn spawn(
        &mut self,
        name: &str,
        listener: Listener,
        serve: Serve,
        on_refused: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<()> {
        self.spawn_refusing(name, listener, serve, None, on_refused)
    }

    /// [`Listeners::spawn`], with connections beyond the cap answered by
    /// `refuse` while a refusal thread is free.
    pub fn spawn_refusing(
        &mut self,
        name: &str,
        listener: Listener,
        serve: Serve,
        refuse: Option<Refuse>,
        on_refused: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<()> {
        listener.set_nonblocking()?;
        let ended = Arc::new(Latch::default());
        let leader = Box::new(Leader {
            listener,
            open: self.open.clone(),
            shutdown: self.shutdown.clone(),
            max: self.max_connections,
            name: name.to_string(),
            serve,
            refuse,
            on_refused,
            refusals: RefusalLog::default(),
            ended: ended.clone(),
        });
        // This thread only waits for the leaders to end (at shutdown), so
        // that joining it means the listener is closed.
        let shutdown = self.shutdown.clone();
        let worker = Worker::spawn(&format!("accept-{name}"), move || {
            let mut leader = leader;
            // No thread for the first leader: retry (connections wait in
            // the listen backlog meanwhile), until shutdown.
            while let Err(back) = leader.hand_on() {
                if shutdown.wait_timeout(Duration::from_millis(100)) {
                    return; // the leader drops here: the listener closes
                }
                leader = back;
            }
            ended.wait();
        })?;
        self.acceptors.push(worker);
        Ok(())
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.open.count.load(Ordering::Acquire)
    }

    /// Shuts every open socket down (their threads then end).
    pub fn close_all(&self) {
        for conn in lock(&self.open.closers).values() {
            conn.shutdown();
        }
    }

    /// Stops accepting (shutdown must have triggered), closes everything,
    /// and joins every thread. Dropping does the same.
    pub fn join(self) {}
}

impl Drop for Listeners {
    fn drop(&mut self) {
        // Acceptors end once shutdown has triggered (the caller's job).
        self.acceptors.clear();
        self.close_all();
        self.open.workers.join_all();
    }
}

/// Logs the first refusal, then at most one line per
/// [`REFUSAL_LOG_INTERVAL`] with the count: a flood of refused connections
/// must not become a flood of log lines.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, name: &str, max: usize, peer: &str) {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        log::warn!(
            "{name}: connection limit reached (--max-connections={max}): refusing {peer} \
             ({} refused since the last report)",
            self.unlogged
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Has `refuse` answer `conn` on one of the [`REFUSERS`] threads (at most
/// as many connections wait for one); closes it at once otherwise.
fn start_refusal(open: &Arc<Open>, name: &str, conn: Conn, refuse: &Refuse) {
    let mut refusals = lock(&open.refusals);
    if refusals.threads >= REFUSERS && refusals.waiting.len() >= REFUSERS {
        drop(refusals);
        conn.shutdown();
        return;
    }
    let id = open.next.fetch_add(1, Ordering::Relaxed);
    lock(&open.closers).insert(id, conn.clone());
    refusals.waiting.push_back((id, conn, refuse.clone()));
    if refusals.lingering > 0 {
        drop(refusals);
        open.refusal_cv.notify_one();
        return;
    }
    if refusals.threads >= REFUSERS {
        return; // a running refusal thread takes it next
    }
    refusals.threads += 1;
    drop(refusals);
    let owner = open.clone();
    let spawned = open.workers.spawn(&format!("refuse-{name}"), move || {
        loop {
            let next = {
                let mut refusals = lock(&owner.refusals);
                if refusals.waiting.is_empty() {
                    refusals.lingering += 1;
                    refusals = owner
                        .refusal_cv
                        .wait_timeout_while(refusals, REFUSAL_LINGER, |r| r.waiting.is_empty())
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    refusals.lingering -= 1;
                }
                let next = refusals.waiting.pop_front();
                if next.is_none() {
                    refusals.threads -= 1;
                }
                next
            };
            let Some((id, conn, refuse)) = next else {
                return;
            };
            refuse(conn);
            if let Some(conn) = lock(&owner.closers).remove(&id) {
                conn.shutdown();
            }
        }
    });
    if spawned.is_err() {
        let mut refusals = lock(&open.refusals);
        refusals.threads -= 1;
        if refusals.threads == 0 {
            // Nobody will take them: close what waits.
            for (id, _, _) in std::mem::take(&mut refusals.waiting) {
                if let Some(conn) = lock(&open.closers).remove(&id) {
                    conn.shutdown();
                }
            }
        }
    }
}

/// A listener and everything accepting on it needs, held by one thread at
/// a time: the leader. The leader waits for a connection, hands the
/// listener on to a pooled thread, and serves the connection itself, so a
/// new connection costs one wake-up (the kernel's, of the leader) before
/// it is served, not two (an accept thread's, then a connection thread's).
/// The next leader is woken while this one already serves.
struct Leader {
    listener: Listener,
    open: Arc<Open>,
    shutdown: Shutdown,
    max: usize,
    name: String,
    serve: Serve,
    refuse: Option<Refuse>,
    on_refused: Arc<dyn Fn() + Send + Sync>,
    refusals: RefusalLog,
    /// Set when this leader ends (and the listener closes).
    ended: Arc<Latch>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        // The listener closes (and a socket file goes) with this value.
        self.ended.set();
    }
}

/// A connection that its leader accepted and registered.
struct Accepted {
    open: Arc<Open>,
    id: u64,
    conn: Conn,
    serve: Serve,
}

impl Accepted {
    fn run(self) {
        let held = Held {
            open: self.open,
            id: self.id,
        };
        (self.serve)(self.conn, held);
    }

    /// Closes a connection that no thread can serve.
    fn refuse_now(self) {
        if let Some(conn) = lock(&self.open.closers).remove(&self.id) {
            conn.shutdown();
        }
        self.open.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Leader {
    /// Makes a pooled thread the leader; the leader back when no thread
    /// can be started.
    fn hand_on(self: Box<Self>) -> Result<(), Box<Leader>> {
        let open = self.open.clone();
        let name = format!("conn-{}", self.name);
        let slot = Arc::new(Mutex::new(Some(self)));
        let theirs = slot.clone();
        let spawned = open.workers.spawn(&name, move || {
            let leader = lock(&theirs).take();
            // The accepted connection is served after lead() returns, so
            // that its frame is off the stack of the connection's thread.
            if let Some(accepted) = leader.and_then(Leader::lead) {
                accepted.run();
            }
        });
        match spawned {
            Ok(()) => Ok(()),
            Err(e) => match lock(&slot).take() {
                Some(leader) => {
                    log::error!("{}: starting a connection thread: {e}", leader.name);
                    Err(leader)
                }
                None => Ok(()),
            },
        }
    }

    /// Accepts until a connection is accepted, registered and the listener
    /// handed on (the connection is returned, for this thread to serve), or
    /// until shutdown (None; the listener closes). Connections over the
    /// cap are refused here.
    fn lead(mut self: Box<Self>) -> Option<Accepted> {
        let fds = [self.listener.fd(), self.shutdown.as_raw_fd()];
        while !self.shutdown.is_triggered() {
            match self.listener.accept() {
                Ok(conn) => {
                    if self.open.count.load(Ordering::Acquire) >= self.max {
                        self.refusals.note(&self.name, self.max, &conn.peer());
                        (self.on_refused)();
                        match &self.refuse {
                            Some(refuse) => start_refusal(&self.open, &self.name, conn, refuse),
                            None => conn.shutdown(),
                        }
                        continue;
                    }
                    let open = self.open.clone();
                    let id = open.next.fetch_add(1, Ordering::Relaxed);
                    lock(&open.closers).insert(id, conn.clone());
                    open.count.fetch_add(1, Ordering::AcqRel);
                    let accepted = Accepted {
                        open,
                        id,
                        conn,
                        serve: self.serve.clone(),
                    };
                    match self.hand_on() {
                        Ok(()) => return Some(accepted),
                        Err(leader) => {
                            self = leader;
                            accepted.refuse_now();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = sys::poll_readable(&fds, None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    log::error!("{}: accept: {e}", self.name);
                    let _ = self.shutdown.wait_timeout(Duration::from_millis(100));
                }
            }
        }
        None
    }
}
