//! The server's shared core: the [`Router`] behind one lock, the outbound
//! queue of every agent stream and frontend, and the metrics. Stream
//! threads call in with what they read; the hub decides under the lock and
//! queues the results after releasing it.
//!
//! Owns: the delivery rules. A thread that reads an agent stream never
//! blocks: data for a frontend whose queue is full closes that frontend
//! (it is too slow; the others keep flowing). A frontend's reader may block
//! on its agent's queue, which back-pressures that frontend alone.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::metrics::ServerMetrics;
use crate::grpc::ServerCall;
use crate::tunnel::identifiers::{Identifiers, Strategy};
use crate::tunnel::listen::Conn;
use crate::tunnel::message::{Message, data_head};
use crate::tunnel::pump::Pump;
use crate::tunnel::queue::{MIN_TUNNEL_QUEUE, Queue, Rejected, STREAM_QUEUE_BYTES};
use crate::tunnel::router::{self, Action, AgentKey, DialFailure, FrontendKey, Router};

/// Packets queued for one agent stream before frontend readers wait (and
/// at most [`STREAM_QUEUE_BYTES`] of payload).
const AGENT_QUEUE: usize = 256;
/// How long a frontend reader waits for room in its agent's queue before
/// it gives its tunnel up.
const AGENT_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// What a frontend's writer receives.
#[derive(Debug, PartialEq, Eq)]
pub enum ToFrontend {
    Message(Message),
    DialFailed { random: i64, reason: DialFailure },
}

/// A frontend's writing side as the threads that deliver to it see it,
/// once its tunnel is established ([`Hub::set_frontend_out`]): its writer
/// thread starts only when something must wait in its queue, so an idle
/// tunnel holds no writer thread, and data for a plaintext client goes
/// from the delivering thread straight to the client's socket.
pub trait FrontendOut: Send + Sync {
    /// The client's plaintext socket, written to without waiting (and only
    /// when nothing is queued or being written); None: every item queues.
    fn direct_fd(&self) -> Option<RawFd>;
    /// Something was queued, or the queue closed: a writer must run.
    fn wake(self: Arc<Self>);
    /// Sends `item` on the delivering thread without waiting, called only
    /// when nothing is queued or being written; returns what did not go.
    /// By default DATA to [`FrontendOut::direct_fd`], and nothing else.
    fn send_now(&self, item: ToFrontend) -> Option<ToFrontend> {
        match self.direct_fd() {
            Some(fd) => write_now(fd, item),
            None => Some(item),
        }
    }
    /// Whether [`FrontendOut::send_now`] may send anything: when not, an
    /// item goes straight to the queue (no claim on it per packet).
    fn sends_now(&self) -> bool {
        self.direct_fd().is_some()
    }
}

/// A frontend as the hub holds it: its queue, and its writing side once
/// the tunnel is established (set once; shared by every clone, so a
/// delivery decided before it was set still wakes the writer).
#[derive(Clone)]
struct FrontendLink {
    queue: Queue<ToFrontend>,
    out: Arc<OnceLock<Arc<dyn FrontendOut>>>,
}

impl FrontendLink {
    fn wake(&self) {
        if let Some(out) = self.out.get() {
            out.clone().wake();
        }
    }

    /// Data for the client: written to its socket at once when it takes it
    /// all and nothing is queued or being written, queued otherwise (the
    /// part the socket did not take goes first). Err(item) when the queue
    /// is full; data for a closed queue is dropped.
    fn offer(&self, item: ToFrontend) -> Result<(), ToFrontend> {
        let Some(item) = self.send_now(item) else {
            return Ok(());
        };
        match self.queue.try_push(item) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(Rejected::Full(item)) => Err(item),
            Err(Rejected::Closed(_)) => Ok(()),
        }
    }

    /// Sends `item` on this thread through the frontend's
    /// [`FrontendOut::send_now`] when nothing is queued or being written
    /// (what that leaves goes to the front of the queue); returns it
    /// untouched when it must be queued (no writing side yet, or others
    /// ahead of it).
    fn send_now(&self, item: ToFrontend) -> Option<ToFrontend> {
        let Some(out) = self.out.get().filter(|out| out.sends_now()) else {
            return Some(item);
        };
        if let Some(item) = self.queue.send_or(item, |item| out.send_now(item)) {
            return Some(item);
        }
        // What did not go is at the front of the queue: its writer's.
        if !self.queue.is_empty() {
            self.wake();
        }
        None
    }
}

/// Writes DATA to a plaintext client without waiting; returns what its
/// socket did not take. A failed write drops the data: the client is gone,
/// and its reader sees that too and ends the tunnel.
fn write_now(fd: RawFd, item: ToFrontend) -> Option<ToFrontend> {
    let ToFrontend::Message(Message::Data {
        connect_id,
        error,
        data,
    }) = item
    else {
        return Some(item);
    };
    match crate::sys::send_now_realigned(fd, &data) {
        Ok(n) if n == data.len() => None,
        Ok(n) => Some(ToFrontend::Message(Message::Data {
            connect_id,
            error,
            data: data.slice(n..),
        })),
        Err(_) => None,
    }
}

/// A CONNECT client's `200 Connection Established`, written by the thread
/// that delivers the agent's DIAL_RSP (the agent connection's reader): the
/// client has its answer a thread wake-up before the frontend's own thread
/// could write it.
pub struct EarlyAnswer {
    way: AnswerWay,
    bytes: &'static [u8],
    /// [`PENDING`], then [`CLAIMED`] by the deliverer or [`CANCELLED`] by the
    /// frontend, whichever comes first.
    state: AtomicU8,
    /// How much of `bytes` the deliverer wrote (set before the DIAL_RSP is
    /// queued, so the frontend reads it after popping the DIAL_RSP).
    sent: AtomicUsize,
}

/// How the deliverer writes an [`EarlyAnswer`].
enum AnswerWay {
    /// A plaintext client's socket: what it takes now, without waiting.
    Socket(Conn),
    /// A TLS client's writer half, which its frontend lends for the dial
    /// and takes back after it ([`EarlyAnswer::take_writer`]). Its record
    /// goes into the socket of a connection that has sent nothing since the
    /// handshake, so the write does not wait either.
    Tls(Mutex<Option<Box<dyn std::io::Write + Send>>>),
}

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
const CANCELLED: u8 = 2;

impl EarlyAnswer {
    pub fn new(conn: Conn, bytes: &'static [u8]) -> Arc<EarlyAnswer> {
        Self::with(AnswerWay::Socket(conn), bytes)
    }

    /// The answer of a TLS client, written with its `writer` (see
    /// [`AnswerWay::Tls`]).
    pub fn tls(writer: Box<dyn std::io::Write + Send>, bytes: &'static [u8]) -> Arc<EarlyAnswer> {
        Self::with(AnswerWay::Tls(Mutex::new(Some(writer))), bytes)
    }

    fn with(way: AnswerWay, bytes: &'static [u8]) -> Arc<EarlyAnswer> {
        Arc::new(EarlyAnswer {
            way,
            bytes,
            state: AtomicU8::new(PENDING),
            sent: AtomicUsize::new(0),
        })
    }

    /// Writes what the client's socket takes now (all of it, on a fresh
    /// connection), unless the frontend gave up on the dial first.
    fn send(&self) {
        if self
            .state
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let n = match &self.way {
            AnswerWay::Socket(conn) => {
                let fd = conn.as_raw_fd();
                // A failed send leaves the whole answer to the frontend,
                // whose own write then fails the same way.
                crate::sys::send_now(fd, self.bytes).unwrap_or(0)
            }
            AnswerWay::Tls(writer) => {
                let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(w) = writer.as_mut() {
                    // A record cut off by an error cannot be completed:
                    // the connection is broken either way, and the
                    // frontend's next write or read finds that.
                    let _ = w.write_all(self.bytes).and_then(|()| w.flush());
                }
                self.bytes.len()
            }
        };
        self.sent.store(n, Ordering::Release);
    }

    /// The TLS writer lent for the dial, back to the frontend (after the
    /// deliverer's write, if it is writing); None for a plaintext client.
    pub fn take_writer(&self) -> Option<Box<dyn std::io::Write + Send>> {
        match &self.way {
            AnswerWay::Socket(_) => None,
            AnswerWay::Tls(writer) => writer.lock().unwrap_or_else(PoisonError::into_inner).take(),
        }
    }

    /// The frontend gives up waiting (its dial timed out): false when the
    /// answer is written already, and the DIAL_RSP is being queued.
    pub fn cancel(&self) -> bool {
        self.state
            .compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// What the frontend still has to write of the answer, once it has the
    /// DIAL_RSP.
    pub fn rest(&self) -> &'static [u8] {
        if self.state.load(Ordering::Acquire) == CLAIMED {
            let sent = self.sent.load(Ordering::Acquire).min(self.bytes.len());
            &self.bytes[sent..]
        } else {
            self.bytes
        }
    }
}

/// An agent stream's way out: its queue, drained by the stream's writer
/// thread, and the call itself, which a frontend's thread sends on directly
/// when nothing is queued or being sent (a thread hand-off fewer per
/// packet; see [`Queue::send_or`]).
#[derive(Clone)]
struct AgentLink {
    queue: Queue<Message>,
    call: Arc<ServerCall>,
    /// The reader of this stream's plaintext CONNECT clients
    /// ([`Hub::pump_for`]), stopped with the stream.
    pump: Arc<Pump>,
}

impl AgentLink {
    /// Sends DATA from where it lies (a frontend's read buffer) when
    /// nothing is queued or being sent on this agent's stream; false, with
    /// nothing sent, otherwise.
    fn try_send_data(&self, connect_id: i64, data: &[u8]) -> bool {
        self.queue.run_if_idle(|| {
            self.write(&data_head(connect_id, String::new(), data.len()), data);
        })
    }

    /// Writes one packet on the stream, with the queue claimed; a failure
    /// closes the queue (the stream is gone).
    fn write(&self, head: &[u8], data: &[u8]) {
        if let Err(status) = self.call.send_parts(head, data) {
            log::debug!("agent stream: send failed: {status:?}");
            self.queue.close_and_clear();
        }
    }

    /// Sends from a thread that must not wait (a frontend connection's
    /// reader): on this thread when nothing is queued or being sent and the
    /// stream's windows take it at once, else queued for the stream's
    /// writer. Err(message) when that is data and the queue is full.
    fn offer(&self, message: Message) -> Result<(), Message> {
        let Some(message) = self.queue.send_or(message, |message| {
            let (head, data) = message.clone().encode_parts();
            match self.call.try_send_parts(&head, &data) {
                Ok(true) => None,
                Ok(false) => Some(message),
                Err(status) => {
                    log::debug!("agent stream: send failed: {status:?}");
                    self.queue.close_and_clear();
                    None
                }
            }
        }) else {
            return Ok(());
        };
        let queued = if matches!(message, Message::Data { .. }) {
            self.queue.try_push(message)
        } else {
            self.queue.push_control(message)
        };
        match queued {
            Err(Rejected::Full(message)) => Err(message),
            _ => Ok(()),
        }
    }

    /// Sends from a thread that may wait (a frontend's reader). Data waits
    /// up to AGENT_QUEUE_WAIT for room in the queue; control messages pass
    /// the bound.
    fn send(&self, message: Message) -> Result<(), Rejected<Message>> {
        let Some(message) = self.queue.send_or(message, |message| {
            let (head, data) = message.encode_parts();
            self.write(&head, &data);
            None
        }) else {
            return Ok(());
        };
        if matches!(message, Message::Data { .. }) {
            self.queue.push_timeout(message, AGENT_QUEUE_WAIT)
        } else {
            self.queue.push_control(message)
        }
    }
}

struct State {
    router: Router,
    agents: HashMap<AgentKey, AgentLink>,
    frontends: HashMap<FrontendKey, FrontendLink>,
    /// The frontends whose DIAL_RSP the deliverer answers (see [`EarlyAnswer`]).
    early: HashMap<FrontendKey, Arc<EarlyAnswer>>,
}

/// The server core. Shared by every listener and stream thread.
pub struct Hub {
    state: Mutex<State>,
    next_key: AtomicU64,
    frontend_queue: usize,
    pub metrics: ServerMetrics,
}

enum Delivery {
    Agent(AgentLink, Message),
    Frontend(FrontendKey, FrontendLink, ToFrontend),
    /// Goes just before its frontend's DIAL_RSP.
    Answer(Arc<EarlyAnswer>),
}

/// What [`Hub::from_agent_nowait`] could not deliver without waiting (data
/// for a frontend whose queue is full), and every frontend delivery after
/// it, in order: for a thread that may wait to finish ([`Hub::finish`]).
/// The same for [`Hub::from_frontend_nowait`] (data for an agent stream
/// whose queue is full, and every delivery after it;
/// [`Hub::finish_from_frontend`]).
pub struct Deferred(Vec<Delivery>);

/// Whether packets other than tunnel `connect_id`'s wait behind it where
/// an agent stream's packets queue for its call's thread (see
/// [`Queue::push_graced`]).
pub type OthersWait<'a> = &'a dyn Fn(i64) -> bool;

/// The frontend is no longer registered (closed as too slow, or the
/// server is shutting down): it must stop.
#[derive(Debug)]
pub struct FrontendGone;

impl Hub {
    pub fn new(
        strategies: Vec<Strategy>,
        limits: router::Limits,
        frontend_queue: usize,
        metrics: ServerMetrics,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(State {
                router: Router::new(strategies, limits),
                agents: HashMap::new(),
                frontends: HashMap::new(),
                early: HashMap::new(),
            }),
            next_key: AtomicU64::new(1),
            frontend_queue: frontend_queue.max(MIN_TUNNEL_QUEUE),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an agent stream; returns its key and outbound queue, whose
    /// writer must share sending on `call` ([`Queue::pop_claim`]).
    pub fn add_agent(
        &self,
        id: &str,
        identifiers: Identifiers,
        call: Arc<ServerCall>,
    ) -> (AgentKey, Queue<Message>) {
        let key = self.key();
        let queue = Queue::with_bytes(AGENT_QUEUE, STREAM_QUEUE_BYTES, Message::data_len);
        {
            let mut state = self.lock();
            state.router.add_agent(key, id, identifiers);
            let link = AgentLink {
                queue: queue.clone(),
                call,
                pump: Arc::new(Pump::new("conn-pump")),
            };
            state.agents.insert(key, link);
            self.update_gauges(&state);
        }
        (key, queue)
    }

    /// An agent stream ended: its dials fail, its tunnels close.
    pub fn remove_agent(&self, key: AgentKey) {
        let (link, actions) = {
            let mut state = self.lock();
            let link = state.agents.remove(&key);
            if let Some(link) = &link {
                link.queue.close_and_clear();
            }
            (link, state.router.remove_agent(key))
        };
        // Its pump lets its clients go (each reading's end closes its
        // tunnel, here); outside the hub's lock, which those ends and the
        // pump's thread take.
        if let Some(link) = link {
            link.pump.stop();
        }
        self.execute(actions, None);
    }

    /// The pump of the agent stream that carries `key`'s tunnel (see
    /// [`crate::tunnel::pump`]); None when that stream is gone.
    pub fn pump_for(&self, key: FrontendKey, connect_id: i64) -> Option<Arc<Pump>> {
        let state = self.lock();
        let agent = state.router.agent_for_data(key, connect_id)?;
        Some(state.agents.get(&agent)?.pump.clone())
    }

    /// A message from an agent stream, on a thread that may wait (its
    /// call's): data for a full frontend queue waits as
    /// [`Queue::push_graced`] says, `others` telling whether other
    /// tunnels' packets wait behind it.
    pub fn from_agent(&self, key: AgentKey, message: Message, others: OthersWait<'_>) {
        let actions = self.lock().router.from_agent(key, message, Instant::now());
        let deliveries = self.decide(actions);
        self.deliver(deliveries, None, None, Some(others));
    }

    /// [`Hub::from_agent`] for a caller that must not wait at all (the
    /// agent connection's reader thread): what would wait comes back, to be
    /// handed to [`Hub::finish`] on a thread that may, before anything else
    /// from that agent.
    pub fn from_agent_nowait(&self, key: AgentKey, message: Message) -> Option<Deferred> {
        let actions = self.lock().router.from_agent(key, message, Instant::now());
        let deliveries = self.decide(actions);
        let mut deferred = Vec::new();
        self.deliver(deliveries, None, Some(&mut deferred), None);
        (!deferred.is_empty()).then_some(Deferred(deferred))
    }

    /// Makes the deliveries [`Hub::from_agent_nowait`] left, waiting as
    /// [`Hub::from_agent`] does (a frontend that stays full is too slow).
    pub fn finish(&self, deferred: Deferred, others: OthersWait<'_>) {
        self.deliver(deferred.0, None, None, Some(others));
    }

    /// Registers a frontend; returns its key and the queue its writer reads.
    pub fn add_frontend(&self) -> (FrontendKey, Queue<ToFrontend>) {
        let key = self.key();
        let queue = Queue::new(self.frontend_queue);
        let mut state = self.lock();
        state.router.add_frontend(key);
        let link = FrontendLink {
            queue: queue.clone(),
            out: Arc::new(OnceLock::new()),
        };
        state.frontends.insert(key, link);
        (key, queue)
    }

    /// The frontend's tunnel is established: from now on `out` starts its
    /// writer when something waits, and plaintext data may go straight to
    /// its client (see [`FrontendOut`]). What was queued meanwhile (data
    /// right behind the DIAL_RSP) wakes it at once.
    pub fn set_frontend_out(&self, key: FrontendKey, out: Arc<dyn FrontendOut>) {
        let link = self.lock().frontends.get(&key).cloned();
        let Some(link) = link else {
            // Closed meanwhile: its writer must see that.
            return out.wake();
        };
        if link.out.set(out).is_ok() && !link.queue.is_empty() {
            link.wake();
        }
    }

    /// Has the DIAL_RSP that establishes `key`'s tunnel answered to its
    /// client by whichever thread delivers it (see [`EarlyAnswer`]).
    pub fn answer_early(&self, key: FrontendKey, answer: Arc<EarlyAnswer>) {
        let mut state = self.lock();
        if state.frontends.contains_key(&key) {
            state.early.insert(key, answer);
        }
    }

    /// A frontend ended (or is being closed): its dials are cancelled and
    /// its tunnels closed at the agents; its queue closes.
    pub fn remove_frontend(&self, key: FrontendKey) {
        self.drop_frontend(key, false, Some(key));
    }

    /// [`Hub::remove_frontend`] from a thread that must not wait (a
    /// connection's reader): what the agents are told is queued for their
    /// streams' writers rather than sent from here.
    pub fn remove_frontend_nowait(&self, key: FrontendKey) {
        self.drop_frontend(key, false, None);
    }

    /// [`Hub::remove_frontend`], but what is already queued for the
    /// frontend is still delivered (its client closed its side only).
    pub fn remove_frontend_flushing(&self, key: FrontendKey) {
        self.drop_frontend(key, true, Some(key));
    }

    /// `caller`: the frontend whose own thread calls (it may wait), or None
    /// from a thread that must not (an agent stream's reader).
    fn drop_frontend(&self, key: FrontendKey, flush: bool, caller: Option<FrontendKey>) {
        let (removed, actions) = {
            let mut state = self.lock();
            state.early.remove(&key);
            let removed = state.frontends.remove(&key);
            if let Some(link) = &removed {
                if flush {
                    link.queue.close();
                } else {
                    link.queue.close_and_clear();
                }
            }
            (removed, state.router.remove_frontend(key))
        };
        // The frontend's own reader writes what is left itself; for any
        // other caller, its writer must run to see the close.
        if let Some(link) = removed
            && caller != Some(key)
        {
            link.wake();
        }
        self.execute(actions, caller);
    }

    /// A message from a frontend. Returns false when the frontend must give
    /// up (its agent's queue stayed full for a minute).
    pub fn from_frontend(&self, key: FrontendKey, message: Message) -> bool {
        let actions = {
            let mut state = self.lock();
            if !state.frontends.contains_key(&key) {
                return false; // closed meanwhile (too slow, or shutting down)
            }
            state
                .router
                .from_frontend(key, message, Instant::now(), &mut |n| {
                    (crate::sys::random_u64() % n.max(1) as u64) as usize
                })
        };
        self.execute(actions, Some(key))
    }

    /// [`Hub::from_frontend`] for a caller that must not wait at all (the
    /// reader of a frontend's HTTP/2 connection, which hands on a gRPC
    /// stream's packets as they arrive): what would wait (data for an agent
    /// stream whose queue is full, and everything after it) comes back, to
    /// be handed to [`Hub::finish_from_frontend`] on a thread that may,
    /// before anything else from that frontend.
    pub fn from_frontend_nowait(
        &self,
        key: FrontendKey,
        message: Message,
    ) -> Result<Option<Deferred>, FrontendGone> {
        let actions = {
            let mut state = self.lock();
            if !state.frontends.contains_key(&key) {
                return Err(FrontendGone);
            }
            state
                .router
                .from_frontend(key, message, Instant::now(), &mut |n| {
                    (crate::sys::random_u64() % n.max(1) as u64) as usize
                })
        };
        let deliveries = self.decide(actions);
        let mut deferred = Vec::new();
        self.deliver(deliveries, Some(key), Some(&mut deferred), None);
        Ok((!deferred.is_empty()).then_some(Deferred(deferred)))
    }

    /// Makes the deliveries [`Hub::from_frontend_nowait`] left, waiting as
    /// [`Hub::from_frontend`] does; false when the frontend must give up.
    pub fn finish_from_frontend(&self, key: FrontendKey, deferred: Deferred) -> bool {
        self.deliver(deferred.0, Some(key), None, None)
    }

    /// DATA from a frontend's reader, borrowed from its read buffer: written
    /// to the agent's stream from there when that stream is idle (no copy
    /// of the payload before its TLS record), otherwise copied and routed
    /// as [`Hub::from_frontend`] routes every message. Same result.
    pub fn data_from_frontend(&self, key: FrontendKey, connect_id: i64, data: &[u8]) -> bool {
        let link = {
            let state = self.lock();
            if !state.frontends.contains_key(&key) {
                return false;
            }
            let agent = state.router.agent_for_data(key, connect_id);
            agent.and_then(|agent| state.agents.get(&agent).cloned())
        };
        if link.is_some_and(|link| link.try_send_data(connect_id, data)) {
            return true;
        }
        let message = Message::Data {
            connect_id,
            error: String::new(),
            data: data.to_vec().into(),
        };
        self.from_frontend(key, message)
    }

    /// Fails dials past the backend dial timeout; returns when to call again.
    pub fn expire_dials(&self) -> Option<Instant> {
        let (actions, next) = {
            let mut state = self.lock();
            let actions = state.router.expire_dials(Instant::now());
            (actions, state.router.next_dial_deadline())
        };
        self.execute(actions, None);
        next
    }

    /// Whether any agent is connected (`/readyz`).
    pub fn ready(&self) -> bool {
        self.lock().router.ready_agents() > 0
    }

    /// Open frontends (for graceful shutdown).
    pub fn frontends(&self) -> usize {
        self.lock().frontends.len()
    }

    fn update_gauges(&self, state: &State) {
        let m = &self.metrics;
        m.ready_backends
            .set(&[], state.router.ready_agents() as f64);
        m.pending_dials
            .set(&[], state.router.pending_dials() as f64);
        m.established
            .set(&[], state.router.established_connections() as f64);
    }

    /// Queues the router's decisions. `blocking_for`: the frontend whose
    /// reader is calling, which may wait for room in its agent's queue.
    /// Returns false if that frontend must give up.
    fn execute(&self, actions: Vec<Action>, blocking_for: Option<FrontendKey>) -> bool {
        let deliveries = self.decide(actions);
        self.deliver(deliveries, blocking_for, None, None)
    }

    /// The deliveries the router's decisions make (under the lock).
    fn decide(&self, actions: Vec<Action>) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(actions.len());
        {
            let mut state = self.lock();
            for action in actions {
                match action {
                    Action::ToAgent(agent, message) => {
                        if let Some(link) = state.agents.get(&agent) {
                            deliveries.push(Delivery::Agent(link.clone(), message));
                        }
                    }
                    Action::ToFrontend(frontend, message) => {
                        if matches!(&message, Message::DialRsp { error, .. } if error.is_empty())
                            && let Some(answer) = state.early.remove(&frontend)
                        {
                            deliveries.push(Delivery::Answer(answer));
                        }
                        if let Some(link) = state.frontends.get(&frontend) {
                            deliveries.push(Delivery::Frontend(
                                frontend,
                                link.clone(),
                                ToFrontend::Message(message),
                            ));
                        }
                    }
                    Action::DialFailed {
                        frontend,
                        random,
                        reason,
                    } => {
                        log::debug!("dial {random} failed: {reason}");
                        self.metrics.dial_failures.inc(&[reason.label()]);
                        if let Some(link) = state.frontends.get(&frontend) {
                            deliveries.push(Delivery::Frontend(
                                frontend,
                                link.clone(),
                                ToFrontend::DialFailed { random, reason },
                            ));
                        }
                    }
                    Action::Dialed { elapsed, .. } => {
                        self.metrics
                            .dial_duration
                            .observe(&[], elapsed.as_secs_f64());
                    }
                }
            }
            self.update_gauges(&state);
        }
        deliveries
    }

    /// Queues `deliveries`. With `defer`, nothing waits: data for a full
    /// frontend queue, and every frontend delivery after it, go there; when
    /// a frontend calls (`blocking_for`), also data for a full agent
    /// stream queue, and every delivery after it. Without, data for a full
    /// frontend queue waits as [`Queue::push_graced`] says: the shorter
    /// grace when later deliveries or (`others`, where the agent stream's
    /// packets queue) other tunnels' packets wait behind it.
    fn deliver(
        &self,
        deliveries: Vec<Delivery>,
        blocking_for: Option<FrontendKey>,
        mut defer: Option<&mut Vec<Delivery>>,
        others: Option<OthersWait<'_>>,
    ) -> bool {
        let mut keep_going = true;
        let mut too_slow = Vec::new();
        let mut rest = deliveries.into_iter();
        while let Some(delivery) = rest.next() {
            let delivery = match (defer.as_deref_mut(), delivery) {
                (Some(deferred), delivery @ Delivery::Frontend(..)) if !deferred.is_empty() => {
                    deferred.push(delivery);
                    continue;
                }
                (Some(deferred), Delivery::Agent(link, message)) if blocking_for.is_some() => {
                    // Behind what is deferred already, or what would wait.
                    let message = if deferred.is_empty() {
                        link.offer(message).err()
                    } else {
                        Some(message)
                    };
                    if let Some(message) = message {
                        deferred.push(Delivery::Agent(link, message));
                    }
                    continue;
                }
                (
                    Some(deferred),
                    Delivery::Frontend(
                        frontend,
                        link,
                        item @ ToFrontend::Message(Message::Data { .. }),
                    ),
                ) => {
                    if let Err(item) = link.offer(item) {
                        deferred.push(Delivery::Frontend(frontend, link, item));
                    }
                    continue;
                }
                (_, delivery) => delivery,
            };
            match delivery {
                Delivery::Agent(link, message) if blocking_for.is_some() => {
                    if let Err(Rejected::Full(_)) = link.send(message) {
                        log::warn!("agent queue full for {AGENT_QUEUE_WAIT:?}: closing the tunnel");
                        keep_going = false;
                    }
                }
                Delivery::Agent(link, message) => {
                    let _ = link.queue.push_control(message);
                }
                Delivery::Frontend(
                    frontend,
                    link,
                    item @ ToFrontend::Message(Message::Data { connect_id, .. }),
                ) => {
                    if let Err(item) = link.offer(item) {
                        let others_wait = || {
                            rest.as_slice()
                                .iter()
                                .any(|d| !is_for_tunnel(d, connect_id))
                                || others.is_none_or(|others| others(connect_id))
                        };
                        match link.queue.push_graced(item, others_wait) {
                            Ok(()) => link.wake(),
                            Err(Rejected::Full(_)) => {
                                if !too_slow.contains(&frontend) {
                                    too_slow.push(frontend);
                                }
                            }
                            Err(Rejected::Closed(_)) => {}
                        }
                    }
                }
                Delivery::Frontend(_, link, item) => {
                    if let Some(item) = link.send_now(item)
                        && link.queue.push_control(item).is_ok()
                    {
                        link.wake();
                    }
                }
                Delivery::Answer(answer) => answer.send(),
            }
        }
        for frontend in too_slow {
            log::warn!(
                "frontend {frontend} is not reading ({} packets queued): closing its tunnel",
                self.frontend_queue
            );
            self.metrics.slow_frontends.inc(&[]);
            self.drop_frontend(frontend, false, None);
        }
        keep_going
    }
}

/// Whether `delivery` is for tunnel `connect_id`'s frontend (its data, or
/// its close).
fn is_for_tunnel(delivery: &Delivery, connect_id: i64) -> bool {
    matches!(
        delivery,
        Delivery::Frontend(_, _, ToFrontend::Message(m)) if m.is_for(connect_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A writer whose bytes the test keeps.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_tls_clients_early_answer_goes_through_its_lent_writer_once() {
        let written = Shared::default();
        let answer = EarlyAnswer::tls(Box::new(written.clone()), b"200 OK");
        answer.send();
        answer.send();
        assert_eq!(*written.0.lock().unwrap(), b"200 OK", "once");
        assert_eq!(answer.rest(), b"", "nothing left for the frontend");
        assert!(answer.take_writer().is_some(), "the writer comes back");
        assert!(answer.take_writer().is_none());

        // The frontend gave up first: nothing written, all of it its own.
        let written = Shared::default();
        let answer = EarlyAnswer::tls(Box::new(written.clone()), b"200 OK");
        assert!(answer.cancel());
        answer.send();
        assert!(written.0.lock().unwrap().is_empty());
        assert_eq!(answer.rest(), b"200 OK");
        assert!(answer.take_writer().is_some());
    }

    #[test]
    fn an_early_answer_is_written_once_by_whoever_comes_first() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let answer = EarlyAnswer::new(Conn::Unix(Arc::new(ours)), b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            answer.rest(),
            b"HTTP/1.1 200 OK\r\n\r\n",
            "nothing sent yet"
        );
        answer.send();
        assert_eq!(answer.rest(), b"", "the deliverer wrote it all");
        assert!(
            !answer.cancel(),
            "too late to give up: the DIAL_RSP follows"
        );
        answer.send(); // a second delivery writes nothing more
        drop(answer);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\n");

        // A frontend that gave up first: the deliverer writes nothing.
        let (ours, mut client) = UnixStream::pair().unwrap();
        let answer = EarlyAnswer::new(Conn::Unix(Arc::new(ours)), b"200");
        assert!(answer.cancel());
        answer.send();
        assert_eq!(answer.rest(), b"200", "the frontend answers itself");
        drop(answer);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "{got:?}");
    }
}
