//! The one shutdown path: SIGTERM/SIGINT (or an internal fatal error) trips a
//! shared [`Shutdown`], which wakes every waiter explicitly.
//!
//! Owns: the shutdown flag, its wake-up descriptor, the signal watcher thread,
//! [`Worker`], the join-on-drop thread handle every role uses, and
//! [`WorkerSet`], the joined pool of reusable threads for per-connection work.
//! Must not: decide what a role does on shutdown; roles register wake-ups
//! (closing a listener, say) with [`Shutdown::on_trigger`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::sys::{self, EventFd, SignalFd};

type Waker = Box<dyn Fn() + Send>;

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    event: EventFd,
}

struct State {
    triggered: bool,
    reason: Option<String>,
    wakers: Vec<Waker>,
}

/// A cloneable shutdown flag. Waiters block on [`Shutdown::wait_timeout`],
/// poll on [`Shutdown::as_raw_fd`], or register a waker.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn shutdown into a second panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shutdown {
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    triggered: false,
                    reason: None,
                    wakers: Vec::new(),
                }),
                changed: Condvar::new(),
                event: EventFd::new()?,
            }),
        })
    }

    /// Trips the flag (first reason wins) and runs every registered waker.
    pub fn trigger(&self, reason: &str) {
        let wakers = {
            let mut state = lock(&self.inner.state);
            if state.triggered {
                return;
            }
            state.triggered = true;
            state.reason = Some(reason.to_string());
            std::mem::take(&mut state.wakers)
        };
        self.inner.event.signal();
        self.inner.changed.notify_all();
        for wake in wakers {
            wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        lock(&self.inner.state).triggered
    }

    /// Why shutdown was triggered, once it was.
    pub fn reason(&self) -> Option<String> {
        lock(&self.inner.state).reason.clone()
    }

    /// Runs `wake` when shutdown triggers (at once if it already has).
    pub fn on_trigger(&self, wake: impl Fn() + Send + 'static) {
        let mut state = lock(&self.inner.state);
        if state.triggered {
            drop(state);
            wake();
        } else {
            state.wakers.push(Box::new(wake));
        }
    }

    /// Sleeps up to `timeout`; returns true as soon as shutdown triggers.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.inner.state);
        while !state.triggered {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .inner
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

impl AsRawFd for Shutdown {
    /// Readable once shutdown has triggered.
    fn as_raw_fd(&self) -> RawFd {
        self.inner.event.as_raw_fd()
    }
}

/// A thread that is joined when its handle drops, so no thread outlives its
/// owner. Panics inside the thread are logged, not propagated.
pub struct Worker {
    name: String,
    handle: Option<Handle>,
}

enum Handle {
    Thread(JoinHandle<()>),
    /// A job on a pooled thread ([`Worker::pooled`]): set when it is done.
    Pooled(Arc<Latch>),
}

impl Worker {
    pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let handle = thread::Builder::new().name(name.to_string()).spawn(body)?;
        Ok(Worker {
            name: name.to_string(),
            handle: Some(Handle::Thread(handle)),
        })
    }

    /// [`Worker::spawn`] on a reused thread of [`helpers`]: for work that
    /// comes and goes with connections (an HTTP/2 connection's reader and
    /// writer, a gRPC call), where starting a thread would cost more than
    /// the work (about 0.2 ms each here, three per gRPC connection). Joined
    /// (its job waited for) the same way.
    pub fn pooled(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let done = Arc::new(Latch::default());
        let signal = DoneOnDrop(done.clone());
        helpers().spawn(name, move || {
            let _signal = signal;
            body();
        })?;
        Ok(Worker {
            name: name.to_string(),
            handle: Some(Handle::Pooled(done)),
        })
    }

    /// Whether the thread (or the pooled job) has ended.
    pub fn is_finished(&self) -> bool {
        match &self.handle {
            None => true,
            Some(Handle::Thread(handle)) => handle.is_finished(),
            Some(Handle::Pooled(done)) => done.is_set(),
        }
    }

    /// Joins now (the same as dropping, but explicit at the call site).
    pub fn join(mut self) {
        self.join_inner();
    }

    fn join_inner(&mut self) {
        match self.handle.take() {
            Some(Handle::Thread(handle)) => handle
                .join()
                .unwrap_or_else(|_| log::error!("thread {} panicked", self.name)),
            // The pool logs a job's panic; the latch is set either way.
            Some(Handle::Pooled(done)) => done.wait(),
            None => {}
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.join_inner();
    }
}

/// A set of owned threads that run jobs (one per connection, say). A
/// thread whose job is done waits [`WorkerSet::IDLE`] for the next job
/// before it ends, and at most [`WorkerSet::MAX_IDLE`] wait at once: a new
/// connection or dial then costs a wake-up, not a thread start (about
/// 0.2 ms here: mapping a stack, and unmapping it at exit). Every thread
/// is joined by [`WorkerSet::join_all`] or when the set drops.
#[derive(Default)]
pub struct WorkerSet {
    pool: Arc<Pool>,
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Idle threads wait here for a job or the end.
    work: Condvar,
    /// `join_all` waits here for the jobs to finish.
    finished: Condvar,
}

#[derive(Default)]
struct PoolState {
    jobs: std::collections::VecDeque<(String, Job)>,
    /// Jobs queued or running.
    pending: usize,
    idle: usize,
    closing: bool,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerSet {
    /// How long a thread without a job waits for one.
    pub const IDLE: Duration = Duration::from_secs(3);
    /// The most threads waiting for a job at once.
    pub const MAX_IDLE: usize = 32;

    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `body` on an idle thread of the set, or on a new one.
    pub fn spawn(&self, name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut state = lock(&self.pool.state);
        if state.idle > state.jobs.len() {
            state.jobs.push_back((name.to_string(), Box::new(body)));
            state.pending += 1;
            drop(state);
            self.pool.work.notify_one();
            return Ok(());
        }
        // Threads that ended (idle too long) are joined as new ones start.
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut state.threads)
            .into_iter()
            .partition(|t| t.is_finished());
        state.threads = running;
        let pool = self.pool.clone();
        let first: (String, Job) = (name.to_string(), Box::new(body));
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || pool.serve(first))?;
        state.threads.push(handle);
        state.pending += 1;
        drop(state);
        for t in ended {
            let _ = t.join();
        }
        Ok(())
    }

    /// Waits for every job to finish (they must be ending: close what they
    /// block on first), then ends and joins every thread. The set can be
    /// used again afterwards.
    pub fn join_all(&self) {
        let mut state = lock(&self.pool.state);
        state.closing = true;
        self.pool.work.notify_all();
        while state.pending > 0 {
            state = self
                .pool
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let threads = std::mem::take(&mut state.threads);
        drop(state);
        for t in threads {
            let _ = t.join();
        }
        lock(&self.pool.state).closing = false;
    }
}

/// The process's pool for helpers that have no set of their own: a tunnel's
/// second direction ([`WorkerSet::beside`]), a CONNECT tunnel's writer. The
/// calls that use them wait for their jobs (the writer's, its tunnel's
/// reader); idle threads end after [`WorkerSet::IDLE`].
pub fn helpers() -> &'static WorkerSet {
    static HELPERS: std::sync::OnceLock<WorkerSet> = std::sync::OnceLock::new();
    HELPERS.get_or_init(WorkerSet::new)
}

/// A one-way flag that threads can wait for: set once, waited on by any.
#[derive(Default)]
pub(crate) struct Latch {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    pub(crate) fn set(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    pub(crate) fn is_set(&self) -> bool {
        *lock(&self.done)
    }

    pub(crate) fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Sets the [`Latch`] of a [`WorkerSet::beside`] helper when dropped
/// (its closure ran, or was dropped without running): lives inside the
/// helper's closure.
struct DoneOnDrop(Arc<Latch>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// Waits for the helper when dropped, also when `main` panics: what the
/// helper borrows outlives it.
struct WaitOnDrop(Arc<Latch>);

impl Drop for WaitOnDrop {
    fn drop(&mut self) {
        self.0.wait();
    }
}

impl WorkerSet {
    /// Runs `helper` on a thread of the set while `main` runs on this
    /// thread, and returns `main`'s result once both are done: like
    /// [`std::thread::scope`] with one spawned thread, but the thread is a
    /// reused one (a tunnel's second direction costs a wake-up, not a
    /// thread start). The helper may borrow from the caller. Err, with
    /// neither run, when no thread can be started.
    pub fn beside<'a, R>(
        &self,
        name: &str,
        helper: impl FnOnce() + Send + 'a,
        main: impl FnOnce() -> R,
    ) -> io::Result<R> {
        let done = Arc::new(Latch::default());
        let signal = DoneOnDrop(done.clone());
        let job: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
            let _signal = signal;
            helper();
        });
        // SAFETY: the job only lives past 'a if this function returns
        // before the job is consumed or dropped. It cannot: on every path
        // after a successful spawn (main returning or panicking) the
        // WaitOnDrop guard below blocks until DoneOnDrop, which the job
        // owns, has dropped; a failed spawn drops the job, and the guard
        // waits for that too. Extending the lifetime of a boxed closure is
        // the same erasure std::thread::scope performs.
        let job: Job = unsafe {
            std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Box<dyn FnOnce() + Send + 'static>>(
                job,
            )
        };
        let _wait = WaitOnDrop(done);
        self.spawn(name, job)?;
        Ok(main())
    }
}

impl Pool {
    /// A pooled thread: runs its first job, then whatever comes, until it
    /// has waited [`WorkerSet::IDLE`] in vain, too many wait, or the set
    /// closes.
    fn serve(&self, first: (String, Job)) {
        let mut named = first.0.clone();
        let mut job = Some(first);
        loop {
            if let Some((name, body)) = job.take() {
                if name != named {
                    sys::set_thread_name(&name);
                    named.clone_from(&name);
                }
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                    log::error!("thread {name} panicked");
                }
                let mut state = lock(&self.state);
                state.pending -= 1;
                if state.pending == 0 {
                    self.finished.notify_all();
                }
            }
            let mut state = lock(&self.state);
            let mut waited = Duration::ZERO;
            loop {
                if let Some(next) = state.jobs.pop_front() {
                    job = Some(next);
                    break;
                }
                if state.closing || state.idle >= WorkerSet::MAX_IDLE || waited >= WorkerSet::IDLE {
                    return;
                }
                state.idle += 1;
                let started = Instant::now();
                state = self
                    .work
                    .wait_timeout(state, WorkerSet::IDLE - waited)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                state.idle -= 1;
                waited += started.elapsed();
            }
        }
    }
}

impl Drop for WorkerSet {
    fn drop(&mut self) {
        self.join_all();
    }
}

/// Blocks SIGTERM/SIGINT and starts a thread that trips `shutdown` when one
/// arrives. Call from `main` before spawning other threads. The thread ends
/// when shutdown triggers for any reason.
pub fn watch_signals(shutdown: &Shutdown) -> io::Result<Worker> {
    let signals = SignalFd::new()?;
    let shutdown = shutdown.clone();
    Worker::spawn("signals", move || {
        let fds = [signals.as_raw_fd(), shutdown.as_raw_fd()];
        loop {
            match signals.take() {
                Ok(Some(signo)) => {
                    let name = if signo == libc::SIGTERM {
                        "SIGTERM"
                    } else {
                        "SIGINT"
                    };
                    log::info!("received {name}, shutting down");
                    shutdown.trigger(name);
                    return;
                }
                Ok(None) => {}
                Err(err) => {
                    log::error!("reading signals: {err}");
                    return;
                }
            }
            if shutdown.is_triggered() {
                return;
            }
            if let Err(err) = sys::poll_readable(&fds, None) {
                log::error!("waiting for signals: {err}");
                return;
            }
        }
    })
}

/// The frame of every long-running `main`: a [`Shutdown`] tripped by
/// SIGTERM/SIGINT (watched from before any other thread starts, so every
/// thread inherits the blocked mask), `body`, then the trigger on every
/// path, so that threads waiting for shutdown end and can be joined.
pub fn run_with_signals<E>(
    setup_error: impl Fn(io::Error) -> E,
    body: impl FnOnce(&Shutdown) -> Result<(), E>,
) -> Result<(), E> {
    let shutdown = Shutdown::new().map_err(&setup_error)?;
    let signals = watch_signals(&shutdown).map_err(&setup_error)?;
    let result = body(&shutdown);
    shutdown.trigger("exiting");
    signals.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beside_runs_a_borrowing_helper_on_a_reused_thread_and_waits_for_it() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let set = WorkerSet::new();
        let mut ids = Vec::new();
        for round in 0..10 {
            // Borrowed, not 'static: the helper's work is visible after.
            let count = AtomicUsize::new(0);
            let (tx, rx) = std::sync::mpsc::channel();
            let got = set
                .beside(
                    "helper",
                    || {
                        count.fetch_add(1, Ordering::SeqCst);
                        tx.send(thread::current().id()).unwrap();
                    },
                    || round * 2,
                )
                .unwrap();
            assert_eq!(got, round * 2);
            assert_eq!(
                count.load(Ordering::SeqCst),
                1,
                "returned before the helper ran"
            );
            ids.push(rx.recv().unwrap());
        }
        ids.sort_by_key(|id| format!("{id:?}"));
        ids.dedup();
        assert!(ids.len() < 10, "helper threads were not reused: {ids:?}");
        // A panicking helper is logged; the call still returns.
        assert_eq!(set.beside("helper", || panic!("boom"), || 7).unwrap(), 7);
        // A panicking main still waits for the helper, which sees its
        // borrow intact to the end.
        let finished = &AtomicUsize::new(0);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            set.beside(
                "helper",
                move || {
                    go_rx.recv().unwrap();
                    finished.store(1, Ordering::SeqCst);
                },
                || {
                    go_tx.send(()).unwrap();
                    panic!("main fails")
                },
            )
        }));
        assert!(caught.is_err());
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn worker_sets_reuse_idle_threads_and_join_every_job() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let set = WorkerSet::new();
        let ids = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..20 {
            let ids = ids.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            set.spawn("job", move || {
                ids.lock().unwrap().push(thread::current().id());
                tx.send(()).unwrap();
            })
            .unwrap();
            rx.recv().unwrap();
        }
        let mut distinct = ids.lock().unwrap().clone();
        distinct.sort_by_key(|id| format!("{id:?}"));
        distinct.dedup();
        assert!(distinct.len() < 20, "threads were not reused: {distinct:?}");
        // Jobs still running when join_all starts are waited for, and jobs
        // they start meanwhile too.
        let done = Arc::new(AtomicUsize::new(0));
        let set = Arc::new(set);
        for _ in 0..(WorkerSet::MAX_IDLE + 8) {
            let (done, inner) = (done.clone(), set.clone());
            set.spawn("slow", move || {
                thread::sleep(Duration::from_millis(20));
                let done2 = done.clone();
                inner
                    .spawn("child", move || {
                        done2.fetch_add(1, Ordering::SeqCst);
                    })
                    .unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        set.join_all();
        assert_eq!(done.load(Ordering::SeqCst), 2 * (WorkerSet::MAX_IDLE + 8));
        assert!(lock(&set.pool.state).threads.is_empty());
        // Usable again after join_all.
        let (tx, rx) = std::sync::mpsc::channel();
        set.spawn("again", move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }

    #[test]
    fn trigger_wakes_waiters_and_runs_wakers_once() {
        let shutdown = Shutdown::new().unwrap();
        let count = Arc::new(Mutex::new(0));
        let c = count.clone();
        shutdown.on_trigger(move || *c.lock().unwrap() += 1);
        let waiter = {
            let s = shutdown.clone();
            Worker::spawn("waiter", move || {
                assert!(s.wait_timeout(Duration::from_secs(30)))
            })
            .unwrap()
        };
        assert!(!shutdown.wait_timeout(Duration::from_millis(1)));
        shutdown.trigger("test");
        shutdown.trigger("again");
        waiter.join();
        assert_eq!(*count.lock().unwrap(), 1);
        assert_eq!(shutdown.reason().as_deref(), Some("test"));
        let ready = sys::poll_readable(&[shutdown.as_raw_fd()], Some(Duration::ZERO)).unwrap();
        assert_eq!(ready, vec![true]);
        // A waker registered late runs at once.
        let c = count.clone();
        shutdown.on_trigger(move || *c.lock().unwrap() += 1);
        assert_eq!(*count.lock().unwrap(), 2);
    }

    #[test]
    fn a_pooled_worker_is_waited_for_and_its_thread_takes_each_jobs_name() {
        let comm = || std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (names, seen) = std::sync::mpsc::channel();
        let first = {
            let names = names.clone();
            Worker::pooled("job-a", move || {
                let _ = wait.recv();
                names.send(comm()).unwrap();
            })
            .unwrap()
        };
        assert!(!first.is_finished(), "it waits for go");
        go.send(()).unwrap();
        // Dropping waits for the job: its name is sent by then.
        drop(first);
        assert_eq!(seen.try_recv().unwrap().trim_end(), "job-a");
        // The next job most likely runs on the same (now idle) thread, which
        // is renamed; on a new thread the name is right too.
        let second = Worker::pooled("job-b-with-a-long-name", move || {
            names.send(comm()).unwrap();
        })
        .unwrap();
        second.join();
        assert_eq!(seen.try_recv().unwrap().trim_end(), "job-b-with-a-lo");
    }
}
