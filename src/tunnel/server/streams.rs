//! The server's two gRPC services: `AgentService/Connect` (an agent's
//! stream, the backend) and `ProxyService/Proxy` (a frontend's stream).
//! Both read the same way: the HTTP/2 connection's reader hands each packet
//! to the hub as it arrives, sending it on from there when nothing has to
//! wait; what would wait (a full queue), and every packet after it, goes in
//! order through an [`Inbox`] to a thread that may wait: the agent call's
//! own, and for a Proxy call a pooled job started only while something
//! waits (its handler returns once the stream is set up).
//! The other way, an agent stream has a writer (a scoped thread draining
//! its queue), so reading never waits on writing; a Proxy stream's
//! deliveries go out on the delivering thread when the stream takes them
//! at once, and its writer (a pooled thread) starts only when something
//! must wait.
//!
//! Owns: the metadata rules (exactly one `agentid`; `serverid` and
//! `servercount` in the response headers before any packet) and the
//! conversion between packets and the hub's messages.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::hub::{Deferred, FrontendGone, FrontendOut, Hub, ToFrontend};
use crate::grpc::{Code, Inbound, ServerCall, Status};
use crate::tunnel::identifiers::Identifiers;
use crate::tunnel::inbox::{self, Drained, Inbox};
use crate::tunnel::message::Message;
use crate::tunnel::proto::Packet;
use crate::tunnel::queue::{Pop, Queue};
use crate::tunnel::router::{AgentKey, DialFailure, FrontendKey};

pub const AGENT_PATH: &str = "/AgentService/Connect";
pub const PROXY_PATH: &str = "/ProxyService/Proxy";

/// Sends every queued item until the queue closes, a send fails, or
/// `keep_going` (asked after each send) says to stop.
fn write_queue<T>(
    call: &ServerCall,
    queue: &Queue<T>,
    what: &str,
    into_message: impl Fn(T) -> Message,
    keep_going: impl Fn() -> bool,
) {
    loop {
        // Claims each item: an agent's queue shares sending with frontend
        // threads (the hub's AgentLink::send).
        match queue.pop_claim(None) {
            Pop::Item(item) => {
                let (head, data) = into_message(item).encode_parts();
                let sent = call.send_parts(&head, &data);
                queue.release();
                if let Err(status) = sent {
                    log::debug!("{what}: send failed: {status:?}");
                    queue.close_and_clear();
                    return;
                }
                if !keep_going() {
                    return;
                }
            }
            Pop::Closed | Pop::TimedOut => return,
        }
    }
}

/// What an agent's reader thread could not hand to the hub without waiting.
enum Backlog {
    Message(Message),
    Deferred(Deferred),
}

/// A Proxy stream's [`Backlog`].
enum FrontendBacklog {
    Message(Message),
    Deferred(Deferred),
    /// The frontend was closed meanwhile: its stream's thread stops.
    Gone,
}

/// A stream's packet as a message. None for a packet that does not decode
/// (logged as from `who`, and skipped) and at the stream's end, which goes
/// to `inbox`.
fn inbound_message<T>(
    inbound: Inbound<Packet>,
    inbox: &Inbox<T>,
    who: impl FnOnce() -> String,
) -> Option<Message> {
    match inbound {
        Inbound::Message(packet) => match packet.and_then(Message::try_from) {
            Ok(message) => Some(message),
            Err(e) => {
                log::warn!("{}: skipping a packet: {e}", who());
                None
            }
        },
        Inbound::End(end) => {
            inbox.end(end);
            None
        }
    }
}

/// A Proxy stream's packets, on its connection's reader thread: routed at
/// once when nothing has to wait, else queued in order for the stream's
/// thread (see [`Inbox`]).
fn frontend_tap(
    hub: Arc<Hub>,
    key: FrontendKey,
    dials: Arc<AtomicUsize>,
    inbox: Arc<Inbox<FrontendBacklog>>,
) -> impl FnMut(Inbound<Packet>) + Send + 'static {
    move |inbound| {
        let Some(message) = inbound_message(inbound, &inbox, || format!("frontend {key}")) else {
            return;
        };
        if matches!(message, Message::DialReq { .. }) {
            dials.fetch_add(1, Ordering::AcqRel);
        }
        inbox.offer(FrontendBacklog::Message(message), |item| match item {
            FrontendBacklog::Message(message) => match hub.from_frontend_nowait(key, message) {
                Ok(None) => None,
                Ok(Some(deferred)) => Some(FrontendBacklog::Deferred(deferred)),
                Err(FrontendGone) => Some(FrontendBacklog::Gone),
            },
            other => Some(other),
        });
    }
}

/// A Proxy stream's writing side as the hub's delivering threads see it:
/// what comes for the frontend while nothing is queued or being sent goes
/// out on the delivering thread (the agent stream's reader: a DIAL_RSP,
/// data) when the stream takes it at once. A writer (a pooled thread)
/// starts only when something must wait in the queue, and then writes
/// until the queue closes: an idle tunnel holds no writer thread.
struct ProxyOut {
    call: Arc<ServerCall>,
    queue: Queue<ToFrontend>,
    /// The stream's DIAL_REQs so far (its only dial refused as too many
    /// pending ends the call).
    dials: Arc<AtomicUsize>,
    what: String,
    writer: std::sync::Mutex<WriterSlot>,
}

enum WriterSlot {
    Idle,
    Running(crate::shutdown::Worker),
    /// The handler is ending: no writer starts any more.
    Ended,
}

impl ProxyOut {
    /// The writer: sends what the queue holds, in turn with the delivering
    /// threads, until it closes, a send fails, or a refused dial ends the
    /// call.
    fn write(&self) {
        let exhausted = Cell::new(false);
        let message = |item| match item {
            ToFrontend::Message(m) => m,
            ToFrontend::DialFailed { random, reason } => {
                exhausted.set(reason == DialFailure::TooManyPending);
                Message::DialRsp {
                    error: reason.to_string(),
                    connect_id: 0,
                    random,
                }
            }
        };
        let keep_going = || {
            if !exhausted.replace(false) {
                return true;
            }
            log::info!(
                "{} from {}: dial refused: {}",
                self.what,
                self.call.peer(),
                DialFailure::TooManyPending
            );
            if self.dials.load(Ordering::Acquire) != 1 {
                return true;
            }
            self.call.end(&Status::new(
                Code::RESOURCE_EXHAUSTED,
                DialFailure::TooManyPending.to_string(),
            ));
            self.queue.close_and_clear();
            false
        };
        write_queue(&self.call, &self.queue, &self.what, message, keep_going)
    }

    /// No writer starts from now on; the one that runs, if any, comes back
    /// to be joined.
    fn end(&self) -> Option<crate::shutdown::Worker> {
        let mut slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match std::mem::replace(&mut *slot, WriterSlot::Ended) {
            WriterSlot::Running(worker) => Some(worker),
            WriterSlot::Idle | WriterSlot::Ended => None,
        }
    }
}

impl FrontendOut for ProxyOut {
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn sends_now(&self) -> bool {
        true
    }

    fn wake(self: Arc<Self>) {
        if self.queue.is_empty() && !self.queue.is_closed() {
            return; // taken meanwhile: nothing to write
        }
        let mut slot = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !matches!(*slot, WriterSlot::Idle) {
            return; // running, or the handler is ending
        }
        let out = self.clone();
        match crate::shutdown::Worker::pooled("grpc-frontend-write", move || out.write()) {
            Ok(worker) => *slot = WriterSlot::Running(worker),
            Err(e) => {
                *slot = WriterSlot::Ended;
                drop(slot);
                log::error!("{}: starting the writer thread: {e}", self.what);
                self.call.end(&Status::new(
                    Code::RESOURCE_EXHAUSTED,
                    format!("cannot start a thread: {e}"),
                ));
                self.queue.close_and_clear();
            }
        }
    }

    fn send_now(&self, item: ToFrontend) -> Option<ToFrontend> {
        // A refused dial is the writer's: it may end the call.
        let ToFrontend::Message(message) = item else {
            return Some(item);
        };
        let (head, data) = message.clone().encode_parts();
        match self.call.try_send_parts(&head, &data) {
            Ok(true) => None,
            Ok(false) => Some(ToFrontend::Message(message)),
            // The call is over: its reader ends the frontend.
            Err(status) => {
                log::debug!("{}: send failed: {status:?}", self.what);
                None
            }
        }
    }
}

/// The agent stream's consumer, on its connection's reader thread: each
/// packet goes to the hub at once; what would wait (a full frontend queue)
/// and every packet after it queue for the call's thread (which waits for
/// the stream's end), in order.
fn agent_tap(
    hub: Arc<Hub>,
    key: AgentKey,
    agent_id: String,
    inbox: Arc<Inbox<Backlog>>,
) -> impl FnMut(Inbound<Packet>) + Send + 'static {
    move |inbound| {
        let Some(message) = inbound_message(inbound, &inbox, || format!("agent {agent_id}")) else {
            return;
        };
        if message == Message::Drain {
            log::info!("agent {agent_id} is draining: new dials go to other agents");
        }
        inbox.offer(Backlog::Message(message), |item| match item {
            Backlog::Message(message) => hub.from_agent_nowait(key, message).map(Backlog::Deferred),
            deferred => Some(deferred),
        });
    }
}

/// The `AgentService/Connect` handler.
pub fn agent_handler(
    hub: Arc<Hub>,
    server_id: String,
    server_count: u32,
) -> impl Fn(&Arc<ServerCall>) -> Status + Send + Sync + 'static {
    move |call: &Arc<ServerCall>| {
        let metadata = call.metadata();
        let ids: Vec<&[u8]> = metadata.get_all("agentid").collect();
        let [agent_id] = ids.as_slice() else {
            return Status::new(
                Code::INVALID_ARGUMENT,
                format!("expected exactly one agentid, got {}", ids.len()),
            );
        };
        let agent_id = String::from_utf8_lossy(agent_id).into_owned();
        let identifiers = match metadata
            .get("agentidentifiers")
            .map(|q| Identifiers::parse(q, false))
        {
            None => Identifiers::default(),
            Some(Ok(ids)) => ids,
            Some(Err(e)) => {
                return Status::new(Code::INVALID_ARGUMENT, format!("bad agentidentifiers: {e}"));
            }
        };
        call.set_header("serverid", &server_id);
        call.set_header("servercount", &server_count.to_string());
        if let Err(status) = call.send_headers() {
            return status;
        }
        let (key, outbox) = hub.add_agent(&agent_id, identifiers.clone(), call.clone());
        hub.metrics
            .grpc_connections
            .add(&["AgentService/Connect"], 1.0);
        log::info!(
            "agent {agent_id} connected from {} ({identifiers})",
            call.peer()
        );
        let what = format!("agent {agent_id}");
        std::thread::scope(|scope| {
            scope.spawn(|| write_queue(call, &outbox, &what, |m| m, || true));
            let inbox = Arc::new(Inbox::new(inbox::BACKLOG));
            call.recv_inline(agent_tap(hub.clone(), key, agent_id.clone(), inbox.clone()));
            // Whether other tunnels' packets wait behind `connect_id`'s.
            let others = |connect_id: i64| {
                inbox
                    .others_wait(|item| matches!(item, Backlog::Message(m) if m.is_for(connect_id)))
            };
            let end = inbox.drain(|item| match item {
                Backlog::Message(message) => hub.from_agent(key, message, &others),
                Backlog::Deferred(deferred) => hub.finish(deferred, &others),
            });
            if let Err(status) = end {
                log::debug!("{what}: stream ended: {status:?}");
            }
            hub.remove_agent(key); // closes the outbox, so the writer ends
        });
        hub.metrics
            .grpc_connections
            .add(&["AgentService/Connect"], -1.0);
        log::info!("agent {agent_id} disconnected");
        Status::ok()
    }
}

/// The `ProxyService/Proxy` handler (gRPC frontend).
///
/// A dial refused because `--max-pending-dials` is reached gets its
/// DIAL_RSP with the reason; when it was the stream's only dial (as
/// kube-apiserver opens one stream per dial), the call then ends with
/// RESOURCE_EXHAUSTED. A stream carrying other tunnels keeps them.
///
/// The handler returns once the stream is set up: its packets are handled
/// on the connection's reader as they arrive, what must wait goes to a
/// pooled job started only then ([`ProxyCall::drain`]), and the same job
/// ends the call after the stream's end. An idle gRPC tunnel holds no
/// thread of its own (its connection's reader is the thread that accepted
/// it).
pub fn proxy_handler(hub: Arc<Hub>) -> impl Fn(&Arc<ServerCall>) -> Status + Send + Sync + 'static {
    move |call: &Arc<ServerCall>| {
        let (key, queue) = hub.add_frontend();
        let what = format!("frontend {key}");
        let dials = Arc::new(AtomicUsize::new(0));
        let out = Arc::new(ProxyOut {
            call: call.clone(),
            queue,
            dials: dials.clone(),
            what: what.clone(),
            writer: std::sync::Mutex::new(WriterSlot::Idle),
        });
        hub.set_frontend_out(key, out.clone());
        hub.metrics
            .grpc_connections
            .add(&["ProxyService/Proxy"], 1.0);
        let inbox = Arc::new(Inbox::new(inbox::BACKLOG));
        let proxy = Arc::new(ProxyCall {
            hub: hub.clone(),
            key,
            call: call.clone(),
            out,
            inbox: inbox.clone(),
            what,
        });
        inbox.on_demand(move || proxy.clone().start_drain());
        // The client's packets are handed on by its connection's reader as
        // they arrive (no thread wake-up per packet).
        call.recv_inline(frontend_tap(hub.clone(), key, dials, inbox));
        call.detach();
        Status::ok()
    }
}

/// A Proxy call after its handler returned: what its connection's reader
/// could not hand on without waiting, and the call's end.
struct ProxyCall {
    hub: Arc<Hub>,
    key: FrontendKey,
    call: Arc<ServerCall>,
    out: Arc<ProxyOut>,
    inbox: Arc<Inbox<FrontendBacklog>>,
    what: String,
}

impl ProxyCall {
    /// On the reader, when something waits in the inbox or the stream
    /// ended: a pooled job takes it from there.
    fn start_drain(self: Arc<Self>) {
        let proxy = self.clone();
        if let Err(e) = crate::shutdown::helpers().spawn("grpc-frontend", move || proxy.drain()) {
            log::error!("{}: starting a thread: {e}", self.what);
            // Nothing can wait for it: the call ends here.
            self.inbox.close();
            self.call.end(&Status::new(
                Code::RESOURCE_EXHAUSTED,
                format!("cannot start a thread: {e}"),
            ));
            self.inbox.stop_on_demand();
            // This is the connection's reader: it must not wait.
            let _ = self.out.end();
            self.hub.remove_frontend_nowait(self.key);
        }
    }

    /// Hands on what waits, as [`Hub::from_frontend`] does (this thread
    /// may wait); at the stream's end (or once the frontend was closed),
    /// ends the tunnel and the call.
    fn drain(&self) {
        let (hub, key) = (&self.hub, self.key);
        let end = self.inbox.drain_ready(|item| match item {
            FrontendBacklog::Message(message) => hub.from_frontend(key, message),
            FrontendBacklog::Deferred(deferred) => hub.finish_from_frontend(key, deferred),
            FrontendBacklog::Gone => false,
        });
        match end {
            Drained::Idle => return,
            Drained::End(Err(status)) => log::debug!("{}: stream ended: {status:?}", self.what),
            Drained::End(Ok(())) => {}
            Drained::Closed => log::debug!("{}: closed by the server", self.what),
        }
        // Closes the queue, so a running writer ends.
        hub.remove_frontend(key);
        if let Some(writer) = self.out.end() {
            writer.join();
        }
        hub.metrics
            .grpc_connections
            .add(&["ProxyService/Proxy"], -1.0);
        self.call.complete(&Status::ok());
        // The starter holds this call: let it go.
        self.inbox.stop_on_demand();
    }
}
