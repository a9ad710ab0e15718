//! The reader of the sockets whose bytes one shared stream carries: one
//! thread per stream that waits in epoll for all of them and hands what
//! each brings to its [`Reading`], which sends it on the stream itself. At
//! proxy-server, an agent stream's plaintext CONNECT clients; at
//! proxy-agent, a server stream's destinations.
//!
//! With a thread per tunnel reading its socket, many busy tunnels on one
//! stream meant a wake-up of each reader for every chunk that came, and,
//! while the stream was busy, a copy of the chunk into the stream's queue
//! and another wake-up of the stream's writer thread. The pump wakes once
//! for every socket that has something, reads one chunk from each in turn,
//! and sends it from its buffer (it is the stream's only data sender, so
//! the stream is idle whenever it comes back to it).
//!
//! Owns: the epoll set and the registered sockets until their reading ends
//! (end of stream, an error, the reading refused more, the pump stopped);
//! then [`Reading::ended`] is called once. The thread and its descriptors
//! exist only while there is something to read (and briefly after). Must
//! not: write to the sockets it reads, or wait on anything but the stream
//! it feeds.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use crate::shutdown::Worker;
use crate::sys::{self, Epoll, EventFd};

/// The token of the stop flag.
const STOP: u64 = u64::MAX;
/// One read per ready socket per round.
const CHUNK: usize = 64 * 1024 - 64;

/// A socket the pump reads, and where its bytes go.
pub trait Reading: Send + Sync {
    /// The socket (kept open by the reading for as long as it lives).
    fn fd(&self) -> RawFd;
    /// What one read brought; false stops the reading.
    fn data(&self, bytes: &[u8]) -> bool;
    /// The reading has stopped: `why` is empty at the end of the stream (or
    /// when [`Reading::data`] refused more), else the error, or that the
    /// pump stopped. Called once.
    fn ended(&self, why: &str);
}

/// How long a pump's thread waits with no socket to read before it ends
/// (and closes its epoll set); the next socket starts another.
const IDLE: Duration = Duration::from_secs(2);

/// What a running pump's thread owns: it holds the only strong reference,
/// so its descriptors close when it ends.
struct Shared {
    epoll: Epoll,
    stop: EventFd,
    state: Mutex<State>,
}

struct State {
    readings: HashMap<u64, Arc<dyn Reading>>,
    next: u64,
    /// The thread is ending (idle, or told to stop): no more sockets.
    ending: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops reading `token`'s socket and reports why.
    fn finish(&self, token: u64, why: &str) {
        let reading = self.state().readings.remove(&token);
        if let Some(reading) = reading {
            let _ = self.epoll.del(reading.fd());
            reading.ended(why);
        }
    }
}

struct Running {
    shared: Weak<Shared>,
    worker: Worker,
}

/// A stream's pump. Its thread runs while it has sockets to read (and
/// [`IDLE`] longer); [`Pump::stop`] (or dropping it) ends every reading
/// and the thread for good.
pub struct Pump {
    name: String,
    running: Mutex<Option<Running>>,
    closed: AtomicBool,
}

impl Pump {
    /// A pump whose thread, when it runs, has this name.
    pub fn new(name: &str) -> Pump {
        Pump {
            name: name.to_string(),
            running: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `reading`'s socket from now on (starting the thread if it is
    /// not running). Err (and `reading` not called) when the pump is
    /// stopped or cannot start or watch the socket: the caller reads it
    /// some other way then.
    pub fn add(&self, reading: Arc<dyn Reading>) -> io::Result<()> {
        let mut running = self.running();
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("the stream's pump has stopped"));
        }
        if let Some(shared) = running.as_ref().and_then(|r| r.shared.upgrade()) {
            let mut state = shared.state();
            if !state.ending {
                let token = state.next;
                state.next += 1;
                shared.epoll.add_level(reading.fd(), token)?;
                state.readings.insert(token, reading);
                return Ok(());
            }
        }
        // Not running, or ending: a new thread (the old one, if any, is
        // joined as its handle drops).
        let shared = Arc::new(Shared {
            epoll: Epoll::new()?,
            stop: EventFd::new()?,
            state: Mutex::new(State {
                readings: HashMap::new(),
                next: 1,
                ending: false,
            }),
        });
        shared.epoll.add_level(shared.stop.as_raw_fd(), STOP)?;
        shared.epoll.add_level(reading.fd(), 0)?;
        shared.state().readings.insert(0, reading);
        let weak = Arc::downgrade(&shared);
        let worker = Worker::spawn(&self.name, move || run(shared))?;
        *running = Some(Running {
            shared: weak,
            worker,
        });
        Ok(())
    }

    /// Ends every reading and the thread, for good. Must not be called from
    /// a [`Reading`] or with a lock held that one may take.
    pub fn stop(&self) {
        self.closed.store(true, Ordering::Release);
        let Some(running) = self.running().take() else {
            return;
        };
        let shared = running.shared.upgrade();
        if let Some(shared) = &shared {
            shared.state().ending = true;
            shared.stop.signal();
        }
        drop(running.worker); // joins
        if let Some(shared) = shared {
            let tokens: Vec<u64> = shared.state().readings.keys().copied().collect();
            for token in tokens {
                shared.finish(token, "the stream ended");
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: Arc<Shared>) {
    let mut buf = vec![0u8; CHUNK];
    let mut ready = Vec::with_capacity(64);
    loop {
        if let Err(e) = shared.epoll.wait_many(&mut ready, Some(IDLE)) {
            // Nothing more can be read here: every reading ends.
            log::error!("stream pump: {e}");
            let tokens: Vec<u64> = {
                let mut state = shared.state();
                state.ending = true;
                state.readings.keys().copied().collect()
            };
            for token in tokens {
                shared.finish(token, &format!("the stream's pump failed: {e}"));
            }
            return;
        }
        if ready.is_empty() {
            let mut state = shared.state();
            if state.readings.is_empty() {
                state.ending = true;
                return;
            }
        }
        for &token in &ready {
            if token == STOP {
                return;
            }
            let Some(reading) = shared.state().readings.get(&token).cloned() else {
                continue; // finished earlier in this round
            };
            match sys::recv_now(reading.fd(), &mut buf) {
                Ok(Some(0)) => shared.finish(token, ""),
                Ok(Some(n)) => {
                    if !reading.data(&buf[..n]) {
                        shared.finish(token, "");
                    }
                }
                Ok(None) => {}
                Err(e) => shared.finish(token, &e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// A socket whose bytes are kept, refusing more past `limit`.
    struct Kept {
        sock: UnixStream,
        got: Mutex<Vec<u8>>,
        limit: usize,
        ended: Mutex<Option<String>>,
        ends: std::sync::atomic::AtomicUsize,
    }

    impl Reading for Kept {
        fn fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn data(&self, bytes: &[u8]) -> bool {
            let mut got = self.got.lock().unwrap();
            got.extend_from_slice(bytes);
            got.len() < self.limit
        }
        fn ended(&self, why: &str) {
            self.ends.fetch_add(1, Ordering::SeqCst);
            *self.ended.lock().unwrap() = Some(why.to_string());
        }
    }

    fn kept(limit: usize) -> (Arc<Kept>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let kept = Arc::new(Kept {
            sock: ours,
            got: Mutex::new(Vec::new()),
            limit,
            ended: Mutex::new(None),
            ends: Default::default(),
        });
        (kept, theirs)
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pump_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|n| n.trim() == "test-pump")
            .count()
    }

    #[test]
    fn reads_every_socket_in_order_ends_each_once_and_idles_out() {
        let pump = Pump::new("test-pump");
        let (a, mut a_peer) = kept(usize::MAX);
        let (b, mut b_peer) = kept(usize::MAX);
        let (c, mut c_peer) = kept(10);
        for r in [&a, &b, &c] {
            pump.add(r.clone()).unwrap();
        }
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            std::thread::spawn(move || {
                a_peer.write_all(&data).unwrap();
                drop(a_peer); // the end of a's stream
                b_peer.write_all(&data).unwrap();
                b_peer
            })
        };
        c_peer.write_all(&[1; 100]).unwrap();
        let mut b_peer = sender.join().unwrap();
        wait_until("a read to its end", || a.ends.load(Ordering::SeqCst) == 1);
        assert!(*a.got.lock().unwrap() == data, "a's bytes in order");
        assert_eq!(a.ended.lock().unwrap().as_deref(), Some(""));
        wait_until("c refused more", || c.ends.load(Ordering::SeqCst) == 1);
        assert!(c.got.lock().unwrap().len() >= 10);
        wait_until("b read", || b.got.lock().unwrap().len() == data.len());
        assert_eq!(b.ends.load(Ordering::SeqCst), 0, "b goes on");
        // Idle: with b open the thread stays; once b ends it goes.
        std::thread::sleep(IDLE + Duration::from_millis(300));
        assert_eq!(pump_threads(), 1);
        b_peer.flush().unwrap();
        drop(b_peer);
        wait_until("b's end", || b.ends.load(Ordering::SeqCst) == 1);
        wait_until("the idle thread gone", || pump_threads() == 0);
        // The next socket starts it again; stop ends it for good.
        let (d, mut d_peer) = kept(usize::MAX);
        pump.add(d.clone()).unwrap();
        d_peer.write_all(b"hello").unwrap();
        wait_until("d read", || *d.got.lock().unwrap() == b"hello");
        pump.stop();
        assert_eq!(d.ended.lock().unwrap().as_deref(), Some("the stream ended"));
        assert_eq!(d.ends.load(Ordering::SeqCst), 1);
        let (e, _e_peer) = kept(usize::MAX);
        assert!(pump.add(e.clone()).is_err(), "stopped for good");
        assert_eq!(e.ends.load(Ordering::SeqCst), 0);
        assert_eq!(pump_threads(), 0);
        for r in [&a, &b, &c] {
            assert_eq!(r.ends.load(Ordering::SeqCst), 1, "ended once");
        }
    }
}
