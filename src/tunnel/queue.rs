//! The bounded queue between a tunnel's producer (the thread that reads an
//! agent stream, a frontend or a destination) and the one writer thread of
//! its consumer.
//!
//! Owns: the rule that a reader multiplexing many connections never blocks
//! on one of them: it uses [`Queue::try_push`] and treats `Full` as "this
//! connection is too slow, close it". Producers that serve one connection
//! only (a frontend's socket reader) may wait with [`Queue::push_timeout`].
//! Control messages that must not be lost (CLOSE_RSP, DIAL_RSP) use
//! [`Queue::push_control`], which ignores the bound: there is at most a
//! handful of them per connection.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a reader that multiplexes many tunnels waits for room in one
/// tunnel's full queue, while other tunnels' packets wait behind it, before
/// it closes that tunnel as too slow. They wait meanwhile (their packets
/// are behind it on the stream, and the protocol has no per-tunnel flow
/// control to stop the stuck one's destination with), so this is how
/// long, once, a stuck client holds them: 1 s cost 15 downloads 40% of
/// their throughput in `make bench` (row 6, the stall beginning with
/// them). Long enough still that a consumer that takes anything at all (a
/// packet of up to 64 KiB every 250 ms: about 256 KiB/s), with 8 MiB and
/// its socket's buffer waiting, is not mistaken for a stuck one.
pub const SLOW_GRACE: Duration = Duration::from_millis(250);
/// The same wait while nothing else waits behind the full queue (only
/// the stuck tunnel's own packets, and the reader still has room to read
/// on): waiting holds nobody else up then, so a consumer that pauses (a
/// destination writing to a slow disk, a client starved of CPU) gets this
/// long. Checked every [`GRACE_CHECK`] as it waits: once others wait too,
/// [`SLOW_GRACE`] applies.
pub const LONE_GRACE: Duration = Duration::from_secs(5);
const GRACE_CHECK: Duration = Duration::from_millis(50);
/// The smallest per-tunnel queue, whatever `--xfr-channel-size` says:
/// upstream's default of 10 packets is sized for blocking hand-offs. 128
/// packets of at most 64 KiB from our own readers (32 KiB from upstream's
/// and kube-apiserver's): up to 8 MiB buffered for a consumer that falls
/// behind before the grace period starts.
pub const MIN_TUNNEL_QUEUE: usize = 128;

/// The payload a shared stream's queue (an agent stream at the server, a
/// server stream at the agent) holds before the readers that feed it wait,
/// besides its count of packets: about 16 packets of 64 KiB. With 16 busy
/// tunnels a 256-packet queue sat full, 16 MiB that every copy, seal and
/// send reached past the caches for (the server's RSS grew by 19 MiB); at
/// 1 MiB the server spent 5-10% less CPU per GiB for the same throughput.
pub const STREAM_QUEUE_BYTES: usize = 1 << 20;

/// Why an item was not queued; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected<T> {
    Full(T),
    Closed(T),
}

/// What a pop found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Item(T),
    /// Closed and drained.
    Closed,
    TimedOut,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// The payload bytes queued, by [`Shared::weigh`].
    bytes: usize,
    closed: bool,
    /// Items the consumer has taken, ever (for the stall clock).
    taken: u64,
    /// The stall clock: when a producer found the queue full with the
    /// consumer at `taken` items; it runs while the consumer takes nothing
    /// more ([`Queue::stalled_for`]).
    full_since: Option<(Instant, u64)>,
    /// An item taken with [`Queue::pop_claim`] or [`Queue::send_or`] is
    /// being sent: nobody else may send until it is released, so items
    /// leave in order.
    busy: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// A second bound, on the items' payload bytes (0: none), and how an
    /// item is weighed.
    max_bytes: usize,
    weigh: fn(&T) -> usize,
    readable: Condvar,
    writable: Condvar,
}

/// A bounded multi-producer queue with a close flag. Clones share it.
pub struct Queue<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            shared: self.shared.clone(),
        }
    }
}

impl<T> State<T> {
    /// Room for one more bounded item: under the count, and under the
    /// byte budget (the item that crosses it is still taken).
    fn has_room(&self, max_bytes: usize) -> bool {
        self.items.len() < self.capacity && (max_bytes == 0 || self.bytes < max_bytes)
    }

    /// A producer comes: when it finds the queue full, the stall clock
    /// starts, unless it runs already with no item taken since.
    fn note_fill(&mut self, max_bytes: usize) {
        if self.has_room(max_bytes) {
            return;
        }
        if self.full_since.is_none_or(|(_, taken)| taken != self.taken) {
            self.full_since = Some((Instant::now(), self.taken));
        }
    }
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Self::with_bytes(capacity, 0, |_| 0)
    }

    /// A queue bounded by `capacity` items and by `max_bytes` of payload as
    /// `weigh` counts it (a shared stream's queue: many tunnels' packets of
    /// up to 64 KiB each would otherwise keep megabytes in flight, out of
    /// every cache, for no more throughput). Control items pass both
    /// bounds, as in [`Queue::push_control`].
    pub fn with_bytes(capacity: usize, max_bytes: usize, weigh: fn(&T) -> usize) -> Self {
        Queue {
            shared: Arc::new(Shared {
                max_bytes,
                weigh,
                state: Mutex::new(State {
                    items: VecDeque::new(),
                    bytes: 0,
                    capacity: capacity.max(1),
                    taken: 0,
                    full_since: None,
                    closed: false,
                    busy: false,
                }),
                readable: Condvar::new(),
                writable: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues without waiting.
    pub fn try_push(&self, item: T) -> Result<(), Rejected<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected::Closed(item));
        }
        state.note_fill(self.shared.max_bytes);
        if !state.has_room(self.shared.max_bytes) {
            return Err(Rejected::Full(item));
        }
        state.bytes += (self.shared.weigh)(&item);
        state.items.push_back(item);
        drop(state);
        self.shared.readable.notify_one();
        Ok(())
    }

    /// How long the consumer has taken nothing while the queue was full;
    /// None when it is not stalling.
    pub fn stalled_for(&self) -> Option<Duration> {
        let state = self.lock();
        let (since, taken) = state.full_since?;
        (taken == state.taken && !state.has_room(self.shared.max_bytes)).then(|| since.elapsed())
    }

    /// Queues, waiting up to `timeout` for room.
    pub fn push_timeout(&self, item: T, timeout: Duration) -> Result<(), Rejected<T>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(Rejected::Closed(item));
            }
            state.note_fill(self.shared.max_bytes);
            if state.has_room(self.shared.max_bytes) {
                state.bytes += (self.shared.weigh)(&item);
                state.items.push_back(item);
                drop(state);
                self.shared.readable.notify_one();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Rejected::Full(item));
            }
            state = self
                .shared
                .writable
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Queues, waiting for room as a reader that multiplexes many tunnels
    /// may, while the consumer is not stuck: gives up once it has taken
    /// nothing for [`SLOW_GRACE`] (by the stall clock, [`Queue::stalled_for`])
    /// while `others_wait()` (other tunnels' packets wait behind this
    /// one), or for [`LONE_GRACE`] (`others_wait` is asked again as it
    /// waits).
    pub fn push_graced(&self, item: T, others_wait: impl Fn() -> bool) -> Result<(), Rejected<T>> {
        let mut item = item;
        loop {
            let stalled = self.stalled_for().unwrap_or(Duration::ZERO);
            if stalled >= LONE_GRACE || (stalled >= SLOW_GRACE && others_wait()) {
                return Err(Rejected::Full(item));
            }
            let slice = if stalled < SLOW_GRACE {
                SLOW_GRACE - stalled
            } else {
                GRACE_CHECK.min(LONE_GRACE - stalled)
            };
            match self.push_timeout(item, slice) {
                Err(Rejected::Full(back)) => item = back,
                other => return other,
            }
        }
    }

    /// Queues past the bound (control messages only; see the module docs).
    pub fn push_control(&self, item: T) -> Result<(), Rejected<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected::Closed(item));
        }
        state.bytes += (self.shared.weigh)(&item);
        state.items.push_back(item);
        drop(state);
        self.shared.readable.notify_one();
        Ok(())
    }

    /// Takes the next item, waiting up to `timeout` (None: no limit). Items
    /// queued before `close` are still delivered, then `Closed`.
    pub fn pop_timeout(&self, timeout: Option<Duration>) -> Pop<T> {
        self.pop(timeout, false)
    }

    /// Sends `item` on the producer's own thread when the queue is empty
    /// and nothing is being sent (one thread hand-off fewer); `send` returns
    /// what it could not send now, which goes to the front of the queue for
    /// the consumer. Returns the item untouched when it must be queued as
    /// usual (others are queued or being sent, or the queue is closed).
    pub fn send_or(&self, item: T, send: impl FnOnce(T) -> Option<T>) -> Option<T> {
        if !self.claim_if_idle() {
            return Some(item);
        }
        let rest = send(item);
        self.end_claim(rest);
        None
    }

    /// Runs `send` (which sends something that is not an item, such as
    /// bytes borrowed from a read buffer) on the caller's thread when the
    /// queue is empty and nothing is being sent, so that it goes out in
    /// order; false (and `send` not run) otherwise.
    pub fn run_if_idle(&self, send: impl FnOnce()) -> bool {
        if !self.claim_if_idle() {
            return false;
        }
        send();
        self.end_claim(None);
        true
    }

    /// Marks the queue busy when it is open, empty and nobody sends.
    fn claim_if_idle(&self) -> bool {
        let mut state = self.lock();
        if state.closed || state.busy || !state.items.is_empty() {
            return false;
        }
        state.busy = true;
        true
    }

    /// Ends a claim: what the sender could not send goes to the front.
    fn end_claim(&self, rest: Option<T>) {
        let mut state = self.lock();
        state.busy = false;
        if let Some(rest) = rest {
            if !state.closed {
                state.bytes += (self.shared.weigh)(&rest);
                state.items.push_front(rest);
            }
        }
        // The consumer sleeps while items (or the close) wait behind a
        // send: wake it.
        let wake = !state.items.is_empty() || state.closed;
        drop(state);
        if wake {
            self.shared.readable.notify_one();
        }
    }

    /// As [`Queue::send_or`] for a `send` that takes whole items (it sends
    /// all of one, or closes the queue when sending fails), and one more
    /// case: a producer that finds items queued while nobody sends (the
    /// consumer was woken for them but is not running yet) sends those
    /// first, then its own. Items still leave in order, and nobody waits
    /// for the consumer to be scheduled: on a busy machine that wait is
    /// longer than the send (a dial's answer stuck behind another
    /// tunnel's close). It takes at most what was queued when it came;
    /// later items are the consumer's, which it wakes. Returns the item
    /// when it must be queued as usual (another thread is sending, or the
    /// queue is closed).
    pub fn send_through(&self, item: T, mut send: impl FnMut(T)) -> Option<T> {
        let mut state = self.lock();
        if state.closed || state.busy {
            return Some(item);
        }
        state.busy = true;
        let mut ahead = state.items.len();
        while ahead > 0 {
            ahead -= 1;
            let Some(queued) = state.items.pop_front() else {
                break;
            };
            state.bytes -= (self.shared.weigh)(&queued);
            state.taken += 1;
            drop(state);
            self.shared.writable.notify_one();
            send(queued);
            state = self.lock();
            if state.closed {
                break;
            }
        }
        let mut rest = None;
        if state.closed {
            rest = Some(item);
        } else {
            drop(state);
            send(item);
            state = self.lock();
        }
        state.busy = false;
        let wake = !state.items.is_empty() || state.closed;
        drop(state);
        if wake {
            self.shared.readable.notify_one();
        }
        rest
    }

    /// [`Queue::pop_timeout`] for a consumer that shares sending with
    /// [`Queue::send_or`]: waits while another thread sends, and marks the
    /// item it returns as being sent until [`Queue::release`].
    pub fn pop_claim(&self, timeout: Option<Duration>) -> Pop<T> {
        self.pop(timeout, true)
    }

    /// The item from [`Queue::pop_claim`] is sent.
    pub fn release(&self) {
        self.lock().busy = false;
    }

    fn pop(&self, timeout: Option<Duration>, claim: bool) -> Pop<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        loop {
            if !(claim && state.busy) {
                if let Some(item) = state.items.pop_front() {
                    state.bytes -= (self.shared.weigh)(&item);
                    state.taken += 1;
                    state.busy |= claim;
                    drop(state);
                    self.shared.writable.notify_one();
                    return Pop::Item(item);
                }
                if state.closed {
                    return Pop::Closed;
                }
            }
            state = match deadline {
                None => self
                    .shared
                    .readable
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Pop::TimedOut;
                    }
                    self.shared
                        .readable
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Closes the queue: pushes fail from now on, waiters wake.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.readable.notify_all();
        self.shared.writable.notify_all();
    }

    /// Closes and drops whatever is still queued (the consumer is gone).
    pub fn close_and_clear(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            state.items.clear();
            state.bytes = 0;
        }
        self.shared.readable.notify_all();
        self.shared.writable.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::Worker;

    #[test]
    fn bounded_with_control_messages_past_the_bound() {
        let q = Queue::new(2);
        assert_eq!(q.try_push(1), Ok(()));
        assert_eq!(q.try_push(2), Ok(()));
        assert_eq!(q.try_push(3), Err(Rejected::Full(3)));
        assert_eq!(
            q.push_timeout(3, Duration::from_millis(1)),
            Err(Rejected::Full(3))
        );
        assert_eq!(q.push_control(99), Ok(()));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop_timeout(None), Pop::Item(1));
        assert_eq!(
            q.try_push(4),
            Err(Rejected::Full(4)),
            "control item still counts"
        );
    }

    #[test]
    fn a_byte_budget_bounds_the_payload_as_well_as_the_count() {
        let q: Queue<Vec<u8>> = Queue::with_bytes(100, 10, Vec::len);
        assert_eq!(q.try_push(vec![1; 6]), Ok(()));
        // Under the budget when it comes: taken, though it crosses it.
        assert_eq!(q.try_push(vec![2; 6]), Ok(()));
        assert_eq!(q.try_push(vec![3]), Err(Rejected::Full(vec![3])));
        assert_eq!(
            q.push_timeout(vec![3], Duration::from_millis(1)),
            Err(Rejected::Full(vec![3]))
        );
        assert_eq!(q.push_control(vec![9; 50]), Ok(()), "control passes");
        assert_eq!(q.pop_timeout(None), Pop::Item(vec![1; 6]));
        assert_eq!(
            q.try_push(vec![3]),
            Err(Rejected::Full(vec![3])),
            "56 queued"
        );
        assert_eq!(q.pop_timeout(None), Pop::Item(vec![2; 6]));
        assert_eq!(q.pop_timeout(None), Pop::Item(vec![9; 50]));
        assert_eq!(q.try_push(vec![3]), Ok(()), "room again");
        // A remainder sent back to the front counts too.
        assert_eq!(q.pop_claim(None), Pop::Item(vec![3]));
        q.release();
        assert_eq!(q.send_or(vec![4; 20], Some), None);
        assert_eq!(q.try_push(vec![5]), Err(Rejected::Full(vec![5])));
        q.close_and_clear();
        let q: Queue<Vec<u8>> = Queue::with_bytes(100, 10, Vec::len);
        assert_eq!(q.send_or(vec![4; 20], Some), None);
        q.close_and_clear();
        assert_eq!(q.pop_timeout(None), Pop::Closed);
    }

    #[test]
    fn direct_sends_keep_the_order_and_share_with_the_consumer() {
        let q = Queue::new(8);
        // Idle queue: the producer sends itself; a remainder goes first.
        assert_eq!(q.send_or(1, |_| None), None);
        assert_eq!(q.send_or(2, |_| Some(20)), None);
        assert_eq!(
            q.send_or(3, |_| None),
            Some(3),
            "20 is queued: wait behind it"
        );
        q.try_push(3).unwrap();
        assert_eq!(q.pop_claim(None), Pop::Item(20));
        // The consumer is sending: producers queue.
        assert_eq!(q.send_or(4, |_| None), Some(4));
        q.release();
        assert_eq!(q.pop_claim(None), Pop::Item(3));
        q.release();
        // A consumer waiting behind a direct send wakes for its remainder
        // and for the close.
        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match q.pop_claim(Some(Duration::from_secs(30))) {
                        Pop::Item(i) => {
                            got.push(i);
                            q.release();
                        }
                        Pop::Closed => return got,
                        Pop::TimedOut => panic!("the close did not wake the consumer"),
                    }
                }
            })
        };
        let q2 = q.clone();
        assert_eq!(
            q.send_or(5, move |_| {
                q2.close();
                Some(50)
            }),
            None
        );
        // Closed during the send: the remainder is dropped with the queue.
        assert_eq!(waiter.join().unwrap(), Vec::<i32>::new());
        assert_eq!(q.send_or(6, |_| None), Some(6), "closed");
    }

    #[test]
    fn borrowed_sends_run_only_on_an_idle_queue() {
        let q = Queue::new(8);
        let ran = std::cell::Cell::new(0);
        assert!(q.run_if_idle(|| ran.set(ran.get() + 1)), "idle");
        // While it runs the queue is busy: items and other sends wait.
        let q2 = q.clone();
        assert!(q.run_if_idle(|| {
            assert!(!q2.run_if_idle(|| panic!("ran during another send")));
            assert_eq!(q2.send_or(1, |_| None), Some(1));
            q2.try_push(1).unwrap();
        }));
        // An item queued (pushed during that send): it goes first.
        assert!(!q.run_if_idle(|| panic!("ran ahead of a queued item")));
        assert_eq!(q.pop_claim(None), Pop::Item(1));
        assert!(!q.run_if_idle(|| panic!("ran while the consumer sends")));
        q.release();
        assert!(q.run_if_idle(|| ran.set(ran.get() + 1)));
        q.close();
        assert!(!q.run_if_idle(|| panic!("ran on a closed queue")));
        assert_eq!(ran.get(), 2);
    }

    #[test]
    fn producers_send_what_waits_for_a_sleeping_consumer_in_order() {
        let q = Queue::new(8);
        let sent = std::cell::RefCell::new(Vec::new());
        // Idle: the producer sends its own.
        assert_eq!(q.send_through(1, |i| sent.borrow_mut().push(i)), None);
        // Queued and nobody sending: those first, then its own.
        q.push_control(2).unwrap();
        q.push_control(3).unwrap();
        assert_eq!(q.send_through(4, |i| sent.borrow_mut().push(i)), None);
        assert_eq!(*sent.borrow(), vec![1, 2, 3, 4]);
        assert!(q.is_empty());
        // Items queued during the drain are the consumer's.
        q.push_control(5).unwrap();
        let q2 = q.clone();
        assert_eq!(
            q.send_through(6, |i| {
                if i == 5 {
                    q2.push_control(7).unwrap();
                }
                sent.borrow_mut().push(i)
            }),
            None
        );
        assert_eq!(*sent.borrow(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(q.pop_claim(None), Pop::Item(7));
        // The consumer is sending: queue as usual.
        assert_eq!(q.send_through(8, |_| panic!("must queue")), Some(8));
        q.release();
        // A send that fails closes the queue: the producer's item comes
        // back, and the consumer sees the close.
        q.push_control(9).unwrap();
        let q3 = q.clone();
        assert_eq!(q.send_through(10, |_| q3.close_and_clear()), Some(10));
        assert_eq!(q.pop_claim(Some(Duration::ZERO)), Pop::Closed);
        assert_eq!(q.send_through(11, |_| panic!("closed")), Some(11));
    }

    #[test]
    fn close_delivers_the_rest_then_reports_closed() {
        let q = Queue::new(4);
        q.try_push("a").unwrap();
        q.close();
        assert_eq!(q.try_push("b"), Err(Rejected::Closed("b")));
        assert_eq!(q.push_control("c"), Err(Rejected::Closed("c")));
        assert_eq!(q.pop_timeout(Some(Duration::ZERO)), Pop::Item("a"));
        assert_eq!(q.pop_timeout(None), Pop::Closed);
        let cleared = Queue::new(4);
        cleared.try_push(1).unwrap();
        cleared.close_and_clear();
        assert_eq!(cleared.pop_timeout(None), Pop::Closed);
    }

    #[test]
    fn waiters_wake_on_room_items_and_close() {
        let q = Queue::new(1);
        q.try_push(0u32).unwrap();
        let producer = {
            let q = q.clone();
            Worker::spawn("producer", move || {
                for i in 1..=100 {
                    q.push_timeout(i, Duration::from_secs(30)).unwrap();
                }
                q.close();
            })
            .unwrap()
        };
        let mut seen = Vec::new();
        loop {
            match q.pop_timeout(Some(Duration::from_secs(30))) {
                Pop::Item(i) => seen.push(i),
                Pop::Closed => break,
                Pop::TimedOut => panic!("producer stalled"),
            }
        }
        producer.join();
        assert_eq!(seen, (0..=100).collect::<Vec<_>>());
        assert_eq!(
            Queue::<u8>::new(1).pop_timeout(Some(Duration::from_millis(1))),
            Pop::TimedOut
        );
        // A blocked producer wakes when the queue closes.
        let q = Queue::new(1);
        q.try_push(0).unwrap();
        let blocked = {
            let q = q.clone();
            Worker::spawn("blocked", move || {
                assert_eq!(
                    q.push_timeout(1, Duration::from_secs(30)),
                    Err(Rejected::Closed(1))
                );
            })
            .unwrap()
        };
        q.close();
        blocked.join();
    }

    #[test]
    fn the_stall_clock_runs_while_a_full_queue_is_not_taken_from() {
        let q = Queue::new(2);
        q.try_push(1).unwrap();
        q.try_push(2).unwrap();
        assert_eq!(q.stalled_for(), None, "full, but nobody found it so yet");
        assert_eq!(q.try_push(3), Err(Rejected::Full(3)));
        let first = q.stalled_for().expect("a producer found it full");
        assert_eq!(q.try_push(4), Err(Rejected::Full(4)));
        assert!(q.stalled_for().unwrap() >= first, "the same clock runs on");
        assert_eq!(q.pop_timeout(None), Pop::Item(1));
        assert_eq!(q.stalled_for(), None, "taken from: not stalling");
        q.try_push(5).unwrap();
        assert_eq!(q.stalled_for(), None, "full again, not found so yet");
        assert_eq!(q.try_push(6), Err(Rejected::Full(6)));
        assert!(q.stalled_for().is_some(), "a new clock");
    }

    #[test]
    fn a_full_queue_waits_longer_while_nobody_else_waits() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Nobody else waits: a consumer that pauses past SLOW_GRACE (well
        // within LONE_GRACE) still gets the item.
        let q = Queue::new(1);
        q.try_push(1).unwrap();
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(SLOW_GRACE * 2);
                q.pop_timeout(None)
            })
        };
        assert_eq!(q.push_graced(2, || false), Ok(()));
        assert_eq!(consumer.join().unwrap(), Pop::Item(1));
        assert_eq!(q.pop_timeout(None), Pop::Item(2));

        // Others wait from the start: SLOW_GRACE, then the item comes back.
        let q = Queue::new(1);
        q.try_push(1).unwrap();
        assert_eq!(q.push_graced(2, || true), Err(Rejected::Full(2)));

        // Others come to wait while it waits: it gives up then, before a
        // consumer that takes the first item only after LONE_GRACE / 2.
        let others = Arc::new(AtomicBool::new(false));
        let late = {
            let (q, others) = (q.clone(), others.clone());
            std::thread::spawn(move || {
                std::thread::sleep(SLOW_GRACE * 2);
                others.store(true, Ordering::SeqCst);
                std::thread::sleep(LONE_GRACE / 2);
                q.pop_timeout(None)
            })
        };
        assert_eq!(
            q.push_graced(3, || others.load(Ordering::SeqCst)),
            Err(Rejected::Full(3))
        );
        assert_eq!(late.join().unwrap(), Pop::Item(1));
    }
}
