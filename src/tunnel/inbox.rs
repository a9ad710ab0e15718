//! The overflow of a stream consumed on its connection's reader thread
//! ([`crate::grpc::ServerCall::recv_inline`],
//! [`crate::grpc::ClientCall::recv_inline`]): what the reader could not hand
//! on without waiting, kept in order for the stream's own thread, which
//! may wait.
//!
//! Owns: the order (once something is queued, everything after it queues
//! too, until the stream's thread has caught up) and the bound (past it
//! the reader waits, as a thread reading the stream itself would).
//! Must not: decide what waits; the consumer's two functions do.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::grpc::Status;

/// Items queued before the reader waits for the stream's thread.
pub const BACKLOG: usize = 256;

pub struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    bound: usize,
    /// On demand ([`Inbox::on_demand`]): starts a drainer (which calls
    /// [`Inbox::drain_ready`]) when something queues or the end comes and
    /// none runs, in place of a thread that waits for them.
    start: Mutex<Option<Starter>>,
}

type Starter = Arc<dyn Fn() + Send + Sync>;

/// How [`Inbox::drain_ready`] stopped.
pub enum Drained {
    /// Nothing is left and the end has not come: a drainer starts again
    /// when something queues.
    Idle,
    /// The stream's end, after everything before it.
    End(Result<(), Status>),
    /// The handler said stop: the inbox is closed.
    Closed,
}

struct State<T> {
    backlog: VecDeque<T>,
    /// The stream's thread is handing on an item it took: later items
    /// queue behind it.
    busy: bool,
    end: Option<Result<(), Status>>,
    /// The stream's thread stopped draining ([`Inbox::close`], or a
    /// drain told to stop): what the
    /// reader offers from now on is dropped, and it never waits.
    closed: bool,
    /// An on-demand drainer runs.
    draining: bool,
}

impl<T> Inbox<T> {
    pub fn new(bound: usize) -> Self {
        Inbox {
            state: Mutex::new(State {
                backlog: VecDeque::new(),
                busy: false,
                end: None,
                closed: false,
                draining: false,
            }),
            ready: Condvar::new(),
            bound: bound.max(1),
            start: Mutex::new(None),
        }
    }

    /// Drains on demand: `start` is called (on the reader, which must not
    /// wait: it hands the work to another thread) whenever something
    /// queues or the end comes while no drainer runs. Set before the
    /// reader starts; [`Inbox::stop_on_demand`] drops it.
    pub fn on_demand(&self, start: impl Fn() + Send + Sync + 'static) {
        *self.start.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(start));
    }

    /// Stops taking items: what is queued and what the reader offers from
    /// now on is dropped, and a reader waiting for room goes on.
    pub fn close(&self) {
        self.close_locked(self.lock());
    }

    /// [`Inbox::close`] with the lock held already (released here).
    fn close_locked(&self, mut state: MutexGuard<'_, State<T>>) {
        state.closed = true;
        state.draining = false;
        state.backlog.clear();
        drop(state);
        self.ready.notify_all();
    }

    /// Drops the starter (and what it holds).
    pub fn stop_on_demand(&self) {
        self.start
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Claims the drainer's part when one is wanted and none runs.
    fn wants_drainer(&self, state: &mut State<T>) -> Option<Starter> {
        if state.draining || state.closed {
            return None;
        }
        let start = self
            .start
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        state.draining = true;
        Some(start)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        self.ready
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// On the reader: hands `item` on with `now`, which must not wait and
    /// gives back what it could not finish, unless earlier items are still
    /// queued; queues what is left for [`Inbox::drain`].
    pub fn offer(&self, item: T, now: impl FnOnce(T) -> Option<T>) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let left = if state.backlog.is_empty() && !state.busy {
            drop(state);
            let Some(left) = now(item) else {
                return;
            };
            state = self.lock();
            left
        } else {
            while state.backlog.len() >= self.bound && !state.closed {
                state = self.wait(state);
            }
            item
        };
        if state.closed {
            return;
        }
        state.backlog.push_back(left);
        let start = self.wants_drainer(&mut state);
        drop(state);
        self.ready.notify_all();
        if let Some(start) = start {
            start();
        }
    }

    /// Whether anything but `mine` waits here (an item `mine` does not
    /// claim), or the reader may have more behind the bound (it waits for
    /// room, so what it has not read yet is unknown).
    pub fn others_wait(&self, mine: impl Fn(&T) -> bool) -> bool {
        let state = self.lock();
        state.backlog.len() >= self.bound || state.backlog.iter().any(|item| !mine(item))
    }

    /// On the reader: the stream's end, after its last item.
    pub fn end(&self, end: Result<(), Status>) {
        let mut state = self.lock();
        state.end = Some(end);
        let start = self.wants_drainer(&mut state);
        drop(state);
        self.ready.notify_all();
        if let Some(start) = start {
            start();
        }
    }

    /// On an on-demand drainer ([`Inbox::on_demand`]): hands on every
    /// queued item with `later` (which may wait) until nothing is left,
    /// `later` says stop (the inbox closes, as in [`Inbox::drain_until`]),
    /// or the end has come after the last item.
    pub fn drain_ready(&self, later: impl FnMut(T) -> bool) -> Drained {
        self.drain_loop(later, false)
    }

    /// On the stream's thread: hands on every queued item with `later`
    /// (which may wait), until the end has come and nothing is left;
    /// returns the end.
    pub fn drain(&self, mut later: impl FnMut(T)) -> Result<(), Status> {
        let end = self.drain_until(|item| {
            later(item);
            true
        });
        end.unwrap_or(Ok(()))
    }

    /// [`Inbox::drain`], until `later` returns false: then the inbox
    /// closes (what is queued and what comes later is dropped, and a
    /// reader waiting for room goes on) and None is returned.
    pub fn drain_until(&self, later: impl FnMut(T) -> bool) -> Option<Result<(), Status>> {
        match self.drain_loop(later, true) {
            Drained::End(end) => Some(end),
            Drained::Closed | Drained::Idle => None,
        }
    }

    /// Hands on queued items until `later` says stop, the end comes, or
    /// (unless `wait`, which waits for more) nothing is left.
    fn drain_loop(&self, mut later: impl FnMut(T) -> bool, wait: bool) -> Drained {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.backlog.pop_front() {
                state.busy = true;
                drop(state);
                self.ready.notify_all(); // room for a waiting reader
                let go_on = later(item);
                state = self.lock();
                state.busy = false;
                if !go_on {
                    self.close_locked(state);
                    return Drained::Closed;
                }
                continue;
            }
            if let Some(end) = state.end.take() {
                state.draining = false;
                return Drained::End(end);
            }
            if !wait {
                state.draining = false;
                return Drained::Idle;
            }
            state = self.wait(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn what_waits_and_everything_after_it_keeps_its_order() {
        let inbox = Arc::new(Inbox::new(2));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let blocked = AtomicBool::new(true);
        // 1 goes through at once; 2 would wait, so it and 3..=6 queue (the
        // reader waits for room past two).
        let reader = {
            let (inbox, delivered) = (inbox.clone(), delivered.clone());
            std::thread::spawn(move || {
                for i in 1..=6 {
                    inbox.offer(i, |i| {
                        if i == 2 {
                            return Some(i);
                        }
                        delivered.lock().unwrap().push(i);
                        None
                    });
                }
                inbox.end(Ok(()));
            })
        };
        let end = inbox.drain(|i| {
            blocked.store(false, Ordering::Relaxed);
            delivered.lock().unwrap().push(i);
        });
        reader.join().unwrap();
        assert!(end.is_ok());
        assert!(!blocked.load(Ordering::Relaxed));
        assert_eq!(*delivered.lock().unwrap(), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_drain_that_stops_lets_a_waiting_reader_go_and_drops_the_rest() {
        let inbox = Arc::new(Inbox::new(1));
        // Queued behind the first, which the drain stops at; the reader
        // waits for room with the third.
        let reader = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for i in 1..=3 {
                    inbox.offer(i, Some);
                }
                inbox.offer(4, |_| panic!("offered after the close"));
                inbox.end(Ok(()));
            })
        };
        let mut seen = Vec::new();
        let end = inbox.drain_until(|i| {
            seen.push(i);
            false
        });
        reader.join().unwrap();
        assert!(end.is_none());
        assert_eq!(seen, [1]);
    }

    #[test]
    fn the_end_comes_after_the_backlog() {
        let inbox = Inbox::new(8);
        inbox.offer("a", Some);
        inbox.offer("b", |_| panic!("queued behind a"));
        inbox.end(Err(Status::new(crate::grpc::Code::INTERNAL, "gone")));
        let mut seen = Vec::new();
        let end = inbox.drain(|s| seen.push(s));
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(end.unwrap_err().message, "gone");
    }

    #[test]
    fn others_wait_when_an_item_is_not_mine_or_the_bound_is_reached() {
        let inbox = Inbox::new(3);
        let mine = |n: &u32| *n == 7;
        assert!(!inbox.others_wait(mine), "empty");
        inbox.offer(7, Some);
        inbox.offer(7, Some);
        assert!(!inbox.others_wait(mine), "only mine, under the bound");
        inbox.offer(7, Some);
        assert!(inbox.others_wait(mine), "at the bound the reader waits");
        let inbox = Inbox::new(8);
        inbox.offer(7, Some);
        inbox.offer(9, Some);
        assert!(inbox.others_wait(mine));
    }

    #[test]
    fn on_demand_a_drainer_starts_when_something_queues_or_the_end_comes() {
        use std::sync::atomic::AtomicUsize;
        let inbox = Arc::new(Inbox::new(8));
        let starts = Arc::new(AtomicUsize::new(0));
        {
            let starts = starts.clone();
            inbox.on_demand(move || {
                starts.fetch_add(1, Ordering::SeqCst);
            });
        }
        inbox.offer(1, |_| None);
        assert_eq!(starts.load(Ordering::SeqCst), 0, "handed on at once");
        inbox.offer(2, Some);
        inbox.offer(3, |_| panic!("queued behind 2"));
        assert_eq!(starts.load(Ordering::SeqCst), 1, "one drainer for both");
        let mut seen = Vec::new();
        assert!(matches!(
            inbox.drain_ready(|i| {
                seen.push(i);
                true
            }),
            Drained::Idle
        ));
        assert_eq!(seen, [2, 3]);
        inbox.offer(4, |_| None);
        assert_eq!(starts.load(Ordering::SeqCst), 1, "nothing waits");
        inbox.end(Ok(()));
        assert_eq!(starts.load(Ordering::SeqCst), 2, "the end wants a drainer");
        assert!(matches!(inbox.drain_ready(|_| true), Drained::End(Ok(()))));

        // Told to stop: closed, and nothing starts any more.
        let inbox = Arc::new(Inbox::new(8));
        let starts = Arc::new(AtomicUsize::new(0));
        {
            let starts = starts.clone();
            inbox.on_demand(move || {
                starts.fetch_add(1, Ordering::SeqCst);
            });
        }
        inbox.offer(1, Some);
        assert!(matches!(inbox.drain_ready(|_| false), Drained::Closed));
        inbox.offer(2, |_| panic!("closed"));
        inbox.end(Ok(()));
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        inbox.stop_on_demand();
    }
}
