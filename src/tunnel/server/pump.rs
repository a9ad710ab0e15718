//! The reader of an agent stream's plaintext CONNECT clients: one thread per
//! agent stream that waits in epoll for all of them and sends what each
//! brings on the stream itself.
//!
//! With a thread per tunnel reading its client, many busy tunnels on one
//! stream meant a wake-up of each reader for every chunk its client wrote,
//! and, while the stream was busy, a copy of the chunk into the stream's
//! queue and another wake-up of the stream's writer thread. The pump wakes
//! once for every client that has something, reads one chunk from each in
//! turn, and sends it from its buffer (the stream is idle whenever the pump
//! comes back to it: it is the stream's only data sender).
//!
//! Owns: the epoll set and the registered clients until their reading ends
//! (end of stream, an error, the tunnel closed by the hub, the pump
//! stopped); then the tunnel's own thread, which waits for that
//! ([`Entry::ended`]), finishes the tunnel as it would have after its own
//! read loop. Must not: write to a client (the tunnel's writing side
//! does), or wait on anything but the stream it feeds.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::hub::Hub;
use crate::shutdown::{Latch, Worker};
use crate::sys::{self, Epoll, EventFd};
use crate::tunnel::listen::Conn;
use crate::tunnel::router::FrontendKey;

/// The token of the stop flag.
const STOP: u64 = u64::MAX;
/// One read per ready client per round.
const CHUNK: usize = 64 * 1024 - 64;

/// A registered client.
pub struct Entry {
    conn: Conn,
    key: FrontendKey,
    connect_id: i64,
    /// Set when the pump no longer reads this client.
    pub(crate) ended: Latch,
    done: AtomicBool,
}

impl Entry {
    fn fd(&self) -> i32 {
        match &self.conn {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
}

struct Shared {
    epoll: Epoll,
    stop: EventFd,
    stopped: AtomicBool,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next: AtomicU64,
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops reading `token`'s client and lets its tunnel's thread go on.
    fn finish(&self, token: u64) {
        if let Some(entry) = self.entries().remove(&token) {
            let _ = self.epoll.del(entry.fd());
            entry.done.store(true, Ordering::Release);
            entry.ended.set();
        }
    }
}

/// An agent stream's pump; stopping it (or dropping it) ends the reading
/// of every client it has.
pub struct Pump {
    shared: Arc<Shared>,
    worker: Mutex<Option<Worker>>,
}

impl Pump {
    /// Starts the pump's thread, which sends through `hub`.
    pub fn start(hub: Arc<Hub>, name: &str) -> io::Result<Pump> {
        let shared = Arc::new(Shared {
            epoll: Epoll::new()?,
            stop: EventFd::new()?,
            stopped: AtomicBool::new(false),
            entries: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        shared.epoll.add_level(shared.stop.as_raw_fd(), STOP)?;
        let theirs = shared.clone();
        let worker = Worker::spawn(name, move || run(&theirs, &hub))?;
        Ok(Pump {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Reads `conn` for the tunnel `key`/`connect_id` from now on. Err when
    /// the pump has stopped or the socket cannot be watched: the caller
    /// reads it itself then.
    pub fn add(&self, conn: Conn, key: FrontendKey, connect_id: i64) -> io::Result<Arc<Entry>> {
        let entry = Arc::new(Entry {
            conn,
            key,
            connect_id,
            ended: Latch::default(),
            done: AtomicBool::new(false),
        });
        let token = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.shared.entries();
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(io::Error::other("the agent stream's pump has stopped"));
        }
        self.shared.epoll.add_level(entry.fd(), token)?;
        entries.insert(token, entry.clone());
        Ok(entry)
    }

    /// Ends the reading of every client and joins the thread. Must not be
    /// called with the hub's lock held (the thread may be taking it).
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.stop.signal();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(worker); // joins
        let tokens: Vec<u64> = self.shared.entries().keys().copied().collect();
        for token in tokens {
            self.shared.finish(token);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared, hub: &Hub) {
    let mut buf = vec![0u8; CHUNK];
    let mut ready = Vec::with_capacity(64);
    loop {
        if let Err(e) = shared.epoll.wait_many(&mut ready, None) {
            log::error!("agent stream pump: {e}");
            return;
        }
        for &token in &ready {
            if token == STOP {
                return;
            }
            let Some(entry) = shared.entries().get(&token).cloned() else {
                continue;
            };
            if entry.done.load(Ordering::Acquire) {
                continue;
            }
            match sys::recv_now(entry.fd(), &mut buf) {
                Ok(Some(0)) | Err(_) => shared.finish(token),
                Ok(Some(n)) => {
                    if !hub.data_from_frontend(entry.key, entry.connect_id, &buf[..n]) {
                        shared.finish(token);
                    }
                }
                Ok(None) => {} // taken by nobody else; spurious
            }
        }
    }
}
