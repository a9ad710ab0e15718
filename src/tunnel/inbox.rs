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
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::grpc::Status;

/// Items queued before the reader waits for the stream's thread.
pub const BACKLOG: usize = 256;

pub struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    bound: usize,
}

struct State<T> {
    backlog: VecDeque<T>,
    /// The stream's thread is handing on an item it took: later items
    /// queue behind it.
    busy: bool,
    end: Option<Result<(), Status>>,
    /// The stream's thread stopped draining ([`Inbox::close`]): what the
    /// reader offers from now on is dropped, and it never waits.
    closed: bool,
}

impl<T> Inbox<T> {
    pub fn new(bound: usize) -> Self {
        Inbox {
            state: Mutex::new(State {
                backlog: VecDeque::new(),
                busy: false,
                end: None,
                closed: false,
            }),
            ready: Condvar::new(),
            bound: bound.max(1),
        }
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
        drop(state);
        self.ready.notify_all();
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
        self.lock().end = Some(end);
        self.ready.notify_all();
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
    pub fn drain_until(&self, mut later: impl FnMut(T) -> bool) -> Option<Result<(), Status>> {
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
                    state.closed = true;
                    state.backlog.clear();
                    drop(state);
                    self.ready.notify_all();
                    return None;
                }
                continue;
            }
            if let Some(end) = state.end.take() {
                return Some(end);
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
}
