//! The proxy-server's routing state, as a pure state machine: which agent
//! streams exist, which dials are pending and where each established
//! connection goes. Every event (a message from a frontend or an agent, a
//! stream ending, time passing) returns the messages to send; the caller
//! sends them after releasing its lock, so no send ever happens under it.
//!
//! Owns: the protocol's flows on the server side (protocol.md, "Flows"),
//! including the ones upstream gets wrong: a pending dial fails at once when
//! its agent goes away, a late DIAL_RSP for an abandoned dial closes the
//! orphaned connection, and the number of pending dials is bounded.
//! Must not: do I/O, read clocks or draw random numbers (the caller passes
//! `now` and a picker).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use super::identifiers::{Identifiers, Strategy};
use super::message::Message;

/// The server's handle for one agent stream (unique per process).
pub type AgentKey = u64;
/// The server's handle for one frontend (a gRPC Proxy stream or an HTTP
/// CONNECT connection; unique per process).
pub type FrontendKey = u64;

/// Why a dial failed before or instead of an agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialFailure {
    /// No agent is connected (or none matches the strategies).
    NoAgent,
    /// The bound on pending dials is reached.
    TooManyPending,
    /// The frontend reused a dial id that is still pending.
    DuplicateDial,
    /// The chosen agent's stream ended before it answered.
    AgentGone,
    /// The agent did not answer within the backend dial timeout.
    Timeout,
    /// The agent gave up on the dial (DIAL_CLS from the agent).
    AgentClosed,
    /// The agent answered with this error (its dial failed).
    Agent(String),
}

impl fmt::Display for DialFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialFailure::NoAgent => f.write_str("No agent available"),
            DialFailure::TooManyPending => {
                f.write_str("too many pending dials (--max-pending-dials)")
            }
            DialFailure::DuplicateDial => f.write_str("a dial with this id is already pending"),
            DialFailure::AgentGone => f.write_str("agent disconnected before answering the dial"),
            DialFailure::Timeout => f.write_str("dial timeout waiting for the agent"),
            DialFailure::AgentClosed => f.write_str("dial closed by the agent"),
            DialFailure::Agent(error) => f.write_str(error),
        }
    }
}

impl DialFailure {
    /// The `reason` label of `dial_failure_count`, upstream's names where
    /// upstream has one.
    pub fn label(&self) -> &'static str {
        match self {
            DialFailure::NoAgent => "no_agent",
            DialFailure::TooManyPending => "too_many_pending",
            DialFailure::DuplicateDial => "duplicate_dial",
            DialFailure::AgentGone | DialFailure::AgentClosed => "backend_close",
            DialFailure::Timeout => "backend_dial_timeout",
            DialFailure::Agent(_) => "error_response",
        }
    }
}

/// Something to send, decided by the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ToAgent(AgentKey, Message),
    ToFrontend(FrontendKey, Message),
    /// The dial `random` of this frontend failed. gRPC frontends send it as
    /// DIAL_RSP{error}; HTTP CONNECT answers 503, 502 or 504 by the reason.
    DialFailed {
        frontend: FrontendKey,
        random: i64,
        reason: DialFailure,
    },
    /// The dial `random` succeeded after `elapsed` (for the dial metrics);
    /// the DIAL_RSP itself follows as a `ToFrontend`.
    Dialed {
        frontend: FrontendKey,
        random: i64,
        elapsed: Duration,
    },
}

struct AgentStream {
    id: String,
    identifiers: Identifiers,
    draining: bool,
}

struct Pending {
    frontend: FrontendKey,
    agent: AgentKey,
    started: Instant,
}

#[derive(Default)]
struct Frontend {
    pending: BTreeSet<i64>,
    /// (agent, connectID) of this frontend's connections.
    connections: BTreeSet<(AgentKey, i64)>,
}

/// Limits of the router.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Pending dials across all frontends.
    pub max_pending_dials: usize,
    /// How long a dial may wait for its DIAL_RSP (None: forever, as
    /// upstream's default `--backend-dial-timeout=0`).
    pub dial_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending_dials: 10_000,
            dial_timeout: None,
        }
    }
}

/// The routing state. Callers wrap it in a mutex.
pub struct Router {
    strategies: Vec<Strategy>,
    limits: Limits,
    /// BTreeMap: iteration in connection order, so "the first stream of an
    /// agent id" is the lowest key.
    agents: BTreeMap<AgentKey, AgentStream>,
    pending: HashMap<i64, Pending>,
    connections: HashMap<(AgentKey, i64), FrontendKey>,
    frontends: HashMap<FrontendKey, Frontend>,
}

impl Router {
    pub fn new(strategies: Vec<Strategy>, limits: Limits) -> Self {
        Router {
            strategies,
            limits,
            agents: BTreeMap::new(),
            pending: HashMap::new(),
            connections: HashMap::new(),
            frontends: HashMap::new(),
        }
    }

    /// A new agent stream.
    pub fn add_agent(&mut self, key: AgentKey, id: &str, identifiers: Identifiers) {
        self.agents.insert(
            key,
            AgentStream {
                id: id.to_string(),
                identifiers,
                draining: false,
            },
        );
    }

    /// Whether another stream of agent `id` is already registered.
    pub fn has_agent_id(&self, id: &str) -> bool {
        self.agents.values().any(|a| a.id == id)
    }

    /// Distinct agent ids with a stream: upstream's "ready backends".
    pub fn ready_agents(&self) -> usize {
        self.agents
            .values()
            .map(|a| a.id.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn pending_dials(&self) -> usize {
        self.pending.len()
    }

    pub fn established_connections(&self) -> usize {
        self.connections.len()
    }

    /// A new frontend (before its first message).
    pub fn add_frontend(&mut self, key: FrontendKey) {
        self.frontends.entry(key).or_default();
    }

    /// A message from a frontend. `pick(n)` returns an index below `n`.
    pub fn from_frontend(
        &mut self,
        frontend: FrontendKey,
        message: Message,
        now: Instant,
        pick: &mut dyn FnMut(usize) -> usize,
    ) -> Vec<Action> {
        self.frontends.entry(frontend).or_default();
        match message {
            Message::DialReq {
                protocol,
                address,
                random,
            } => {
                let fail = |reason| {
                    vec![Action::DialFailed {
                        frontend,
                        random,
                        reason,
                    }]
                };
                if self.pending.contains_key(&random) {
                    return fail(DialFailure::DuplicateDial);
                }
                if self.pending.len() >= self.limits.max_pending_dials {
                    return fail(DialFailure::TooManyPending);
                }
                let Some(agent) = self.choose_agent(&address, pick) else {
                    return fail(DialFailure::NoAgent);
                };
                self.pending.insert(
                    random,
                    Pending {
                        frontend,
                        agent,
                        started: now,
                    },
                );
                self.frontend_mut(frontend).pending.insert(random);
                vec![Action::ToAgent(
                    agent,
                    Message::DialReq {
                        protocol,
                        address,
                        random,
                    },
                )]
            }
            Message::DialCls { random } => match self.pending.get(&random) {
                Some(p) if p.frontend == frontend => {
                    let agent = p.agent;
                    self.forget_pending(random);
                    vec![Action::ToAgent(agent, Message::DialCls { random })]
                }
                _ => Vec::new(),
            },
            Message::Data {
                connect_id,
                error,
                data,
            } => match self.connection_of(frontend, connect_id) {
                Some(agent) => {
                    vec![Action::ToAgent(
                        agent,
                        Message::Data {
                            connect_id,
                            error,
                            data,
                        },
                    )]
                }
                None => vec![Action::ToFrontend(
                    frontend,
                    Message::CloseRsp {
                        error: "unknown connection".into(),
                        connect_id,
                    },
                )],
            },
            Message::CloseReq { connect_id } => match self.connection_of(frontend, connect_id) {
                // Forward; the mapping stays until the agent's CLOSE_RSP.
                Some(agent) => vec![Action::ToAgent(agent, Message::CloseReq { connect_id })],
                None => vec![Action::ToFrontend(
                    frontend,
                    Message::CloseRsp {
                        error: "unknown connection".into(),
                        connect_id,
                    },
                )],
            },
            // Not frontend messages: ignore, as upstream does.
            Message::DialRsp { .. } | Message::CloseRsp { .. } | Message::Drain => Vec::new(),
        }
    }

    /// A message from an agent stream.
    pub fn from_agent(&mut self, agent: AgentKey, message: Message, now: Instant) -> Vec<Action> {
        match message {
            Message::DialRsp {
                error,
                connect_id,
                random,
            } => {
                let mine = self.pending.get(&random).is_some_and(|p| p.agent == agent);
                if !mine {
                    // Abandoned (DIAL_CLS, timeout, frontend gone) or bogus:
                    // close what the agent opened so nothing leaks there.
                    return if error.is_empty() {
                        vec![Action::ToAgent(agent, Message::CloseReq { connect_id })]
                    } else {
                        Vec::new()
                    };
                }
                let pending = self.forget_pending(random).expect("checked above");
                let frontend = pending.frontend;
                if !error.is_empty() {
                    return vec![Action::DialFailed {
                        frontend,
                        random,
                        reason: DialFailure::Agent(error),
                    }];
                }
                if self.connections.contains_key(&(agent, connect_id)) {
                    // The agent reused a live connection id: refuse the new one.
                    return vec![Action::DialFailed {
                        frontend,
                        random,
                        reason: DialFailure::Agent("agent reused a connection id".into()),
                    }];
                }
                self.connections.insert((agent, connect_id), frontend);
                self.frontend_mut(frontend)
                    .connections
                    .insert((agent, connect_id));
                vec![
                    Action::Dialed {
                        frontend,
                        random,
                        elapsed: now - pending.started,
                    },
                    Action::ToFrontend(
                        frontend,
                        Message::DialRsp {
                            error: String::new(),
                            connect_id,
                            random,
                        },
                    ),
                ]
            }
            Message::Data {
                connect_id,
                error,
                data,
            } => match self.connections.get(&(agent, connect_id)) {
                Some(&frontend) => {
                    vec![Action::ToFrontend(
                        frontend,
                        Message::Data {
                            connect_id,
                            error,
                            data,
                        },
                    )]
                }
                None => vec![Action::ToAgent(agent, Message::CloseReq { connect_id })],
            },
            Message::CloseRsp { error, connect_id } => {
                match self.forget_connection(agent, connect_id) {
                    Some(frontend) => {
                        vec![Action::ToFrontend(
                            frontend,
                            Message::CloseRsp { error, connect_id },
                        )]
                    }
                    None => Vec::new(),
                }
            }
            Message::DialCls { random } => {
                // The agent gave up on a dial it was asked for.
                let mine = self.pending.get(&random).is_some_and(|p| p.agent == agent);
                if !mine {
                    return Vec::new();
                }
                let pending = self.forget_pending(random).expect("checked above");
                vec![Action::DialFailed {
                    frontend: pending.frontend,
                    random,
                    reason: DialFailure::AgentClosed,
                }]
            }
            Message::Drain => {
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.draining = true;
                }
                Vec::new()
            }
            // Not agent messages.
            Message::DialReq { .. } | Message::CloseReq { .. } => Vec::new(),
        }
    }

    /// An agent stream ended: its pending dials fail now, its connections'
    /// frontends get CLOSE_RSP.
    pub fn remove_agent(&mut self, agent: AgentKey) -> Vec<Action> {
        self.agents.remove(&agent);
        let mut actions = Vec::new();
        let randoms: Vec<i64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.agent == agent)
            .map(|(r, _)| *r)
            .collect();
        for random in randoms {
            if let Some(p) = self.forget_pending(random) {
                actions.push(Action::DialFailed {
                    frontend: p.frontend,
                    random,
                    reason: DialFailure::AgentGone,
                });
            }
        }
        let ids: Vec<i64> = self
            .connections
            .keys()
            .filter(|(a, _)| *a == agent)
            .map(|(_, c)| *c)
            .collect();
        for connect_id in ids {
            if let Some(frontend) = self.forget_connection(agent, connect_id) {
                actions.push(Action::ToFrontend(
                    frontend,
                    Message::CloseRsp {
                        error: "agent disconnected".into(),
                        connect_id,
                    },
                ));
            }
        }
        actions
    }

    /// A frontend ended: its pending dials are cancelled (DIAL_CLS) and its
    /// connections closed (CLOSE_REQ) at their agents.
    pub fn remove_frontend(&mut self, frontend: FrontendKey) -> Vec<Action> {
        let Some(state) = self.frontends.remove(&frontend) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        for random in state.pending {
            if let Some(p) = self.pending.remove(&random) {
                actions.push(Action::ToAgent(p.agent, Message::DialCls { random }));
            }
        }
        for (agent, connect_id) in state.connections {
            self.connections.remove(&(agent, connect_id));
            actions.push(Action::ToAgent(agent, Message::CloseReq { connect_id }));
        }
        actions
    }

    /// Fails the dials older than the dial timeout (DIAL_CLS to the agent).
    pub fn expire_dials(&mut self, now: Instant) -> Vec<Action> {
        let Some(timeout) = self.limits.dial_timeout else {
            return Vec::new();
        };
        let expired: Vec<i64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) >= timeout)
            .map(|(r, _)| *r)
            .collect();
        let mut actions = Vec::new();
        for random in expired {
            if let Some(p) = self.forget_pending(random) {
                actions.push(Action::ToAgent(p.agent, Message::DialCls { random }));
                actions.push(Action::DialFailed {
                    frontend: p.frontend,
                    random,
                    reason: DialFailure::Timeout,
                });
            }
        }
        actions
    }

    /// When the oldest pending dial times out, if there is a timeout.
    pub fn next_dial_deadline(&self) -> Option<Instant> {
        let timeout = self.limits.dial_timeout?;
        self.pending.values().map(|p| p.started + timeout).min()
    }

    fn frontend_mut(&mut self, frontend: FrontendKey) -> &mut Frontend {
        self.frontends.entry(frontend).or_default()
    }

    /// The agent that carries a frontend's connection, as a DATA message
    /// from that frontend would be routed (None: it would be answered
    /// with CLOSE_RSP).
    pub fn agent_for_data(&self, frontend: FrontendKey, connect_id: i64) -> Option<AgentKey> {
        self.connection_of(frontend, connect_id)
    }

    fn connection_of(&self, frontend: FrontendKey, connect_id: i64) -> Option<AgentKey> {
        let state = self.frontends.get(&frontend)?;
        state
            .connections
            .iter()
            .find(|(_, c)| *c == connect_id)
            .map(|(a, _)| *a)
    }

    fn forget_pending(&mut self, random: i64) -> Option<Pending> {
        let pending = self.pending.remove(&random)?;
        if let Some(f) = self.frontends.get_mut(&pending.frontend) {
            f.pending.remove(&random);
        }
        Some(pending)
    }

    fn forget_connection(&mut self, agent: AgentKey, connect_id: i64) -> Option<FrontendKey> {
        let frontend = self.connections.remove(&(agent, connect_id))?;
        if let Some(f) = self.frontends.get_mut(&frontend) {
            f.connections.remove(&(agent, connect_id));
        }
        Some(frontend)
    }

    /// Picks an agent stream by the strategies, in order. Within a strategy,
    /// only the first stream of each agent id counts (agents close their
    /// later duplicates), and a non-draining agent wins over a draining one.
    fn choose_agent(
        &self,
        address: &str,
        pick: &mut dyn FnMut(usize) -> usize,
    ) -> Option<AgentKey> {
        let host = split_host(address);
        let mut first_of_id: BTreeMap<&str, AgentKey> = BTreeMap::new();
        for (&key, agent) in &self.agents {
            first_of_id.entry(agent.id.as_str()).or_insert(key);
        }
        for strategy in &self.strategies {
            let candidates: Vec<(AgentKey, bool)> = first_of_id
                .values()
                .filter_map(|key| {
                    let agent = &self.agents[key];
                    let fits = match strategy {
                        Strategy::Default => true,
                        Strategy::DestHost => agent.identifiers.names(host),
                        Strategy::DefaultRoute => agent.identifiers.default_route,
                    };
                    fits.then_some((*key, agent.draining))
                })
                .collect();
            let ready: Vec<AgentKey> = candidates
                .iter()
                .filter(|(_, draining)| !draining)
                .map(|(k, _)| *k)
                .collect();
            if !ready.is_empty() {
                return Some(ready[pick(ready.len()).min(ready.len() - 1)]);
            }
            if let Some((key, _)) = candidates.first() {
                return Some(*key);
            }
        }
        None
    }
}

/// The host part of "host:port", "[v6]:port" or a bare host.
fn split_host(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(strategies: Vec<Strategy>) -> Router {
        Router::new(
            strategies,
            Limits {
                max_pending_dials: 3,
                dial_timeout: Some(Duration::from_secs(5)),
            },
        )
    }

    fn dial(address: &str, random: i64) -> Message {
        Message::DialReq {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        }
    }

    fn first(_: usize) -> usize {
        0
    }

    fn ok_rsp(connect_id: i64, random: i64) -> Message {
        Message::DialRsp {
            error: String::new(),
            connect_id,
            random,
        }
    }

    /// A router with agent 1 ("a1") and an established connection 7 of
    /// frontend 100, dialled with random 42.
    fn established() -> (Router, Instant) {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        r.from_frontend(100, dial("10.0.0.1:443", 42), t0, &mut first);
        let actions = r.from_agent(1, ok_rsp(7, 42), t0 + Duration::from_millis(3));
        assert_eq!(
            actions,
            vec![
                Action::Dialed {
                    frontend: 100,
                    random: 42,
                    elapsed: Duration::from_millis(3)
                },
                Action::ToFrontend(100, ok_rsp(7, 42)),
            ]
        );
        (r, t0)
    }

    #[test]
    fn dial_without_agents_fails_at_once() {
        let mut r = router(vec![Strategy::Default]);
        let actions = r.from_frontend(100, dial("x:1", 5), Instant::now(), &mut first);
        assert_eq!(
            actions,
            vec![Action::DialFailed {
                frontend: 100,
                random: 5,
                reason: DialFailure::NoAgent
            }]
        );
        assert_eq!(r.pending_dials(), 0);
    }

    #[test]
    fn dial_data_close_round_trip() {
        let (mut r, t0) = established();
        assert_eq!(r.established_connections(), 1);
        let data = Message::Data {
            connect_id: 7,
            error: String::new(),
            data: b"GET /".to_vec().into(),
        };
        assert_eq!(
            r.from_frontend(100, data.clone(), t0, &mut first),
            vec![Action::ToAgent(1, data.clone())]
        );
        assert_eq!(
            r.from_agent(1, data.clone(), t0),
            vec![Action::ToFrontend(100, data)]
        );
        assert_eq!(
            r.from_frontend(100, Message::CloseReq { connect_id: 7 }, t0, &mut first),
            vec![Action::ToAgent(1, Message::CloseReq { connect_id: 7 })]
        );
        let rsp = Message::CloseRsp {
            error: String::new(),
            connect_id: 7,
        };
        assert_eq!(
            r.from_agent(1, rsp.clone(), t0),
            vec![Action::ToFrontend(100, rsp)]
        );
        assert_eq!(r.established_connections(), 0);
    }

    #[test]
    fn agent_error_is_passed_on() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        r.from_frontend(100, dial("x:1", 9), t0, &mut first);
        let err = Message::DialRsp {
            error: "connection refused".into(),
            connect_id: 0,
            random: 9,
        };
        assert_eq!(
            r.from_agent(1, err, t0),
            vec![Action::DialFailed {
                frontend: 100,
                random: 9,
                reason: DialFailure::Agent("connection refused".into())
            }]
        );
        assert_eq!(r.pending_dials(), 0);
    }

    #[test]
    fn agent_gone_fails_pending_dials_and_closes_connections() {
        let (mut r, t0) = established();
        for random in [1, 2] {
            r.from_frontend(200 + random as u64, dial("x:1", random), t0, &mut first);
        }
        let mut actions = r.remove_agent(1);
        actions.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            actions,
            vec![
                Action::DialFailed {
                    frontend: 201,
                    random: 1,
                    reason: DialFailure::AgentGone
                },
                Action::DialFailed {
                    frontend: 202,
                    random: 2,
                    reason: DialFailure::AgentGone
                },
                Action::ToFrontend(
                    100,
                    Message::CloseRsp {
                        error: "agent disconnected".into(),
                        connect_id: 7
                    }
                ),
            ]
        );
        assert_eq!(
            (
                r.pending_dials(),
                r.established_connections(),
                r.ready_agents()
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn frontend_gone_cancels_dials_and_closes_connections() {
        let (mut r, t0) = established();
        r.from_frontend(100, dial("x:1", 43), t0, &mut first);
        let mut actions = r.remove_frontend(100);
        actions.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            actions,
            vec![
                Action::ToAgent(1, Message::CloseReq { connect_id: 7 }),
                Action::ToAgent(1, Message::DialCls { random: 43 }),
            ]
        );
        // The agent's late answers find nothing and open nothing.
        assert_eq!(
            r.from_agent(1, ok_rsp(8, 43), t0),
            vec![Action::ToAgent(1, Message::CloseReq { connect_id: 8 })]
        );
        assert!(
            r.from_agent(
                1,
                Message::CloseRsp {
                    error: String::new(),
                    connect_id: 7
                },
                t0
            )
            .is_empty()
        );
        assert_eq!((r.pending_dials(), r.established_connections()), (0, 0));
    }

    #[test]
    fn dial_cls_before_and_after_dial_rsp() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        // Before: the DIAL_CLS reaches the agent, the late DIAL_RSP is closed.
        r.from_frontend(100, dial("x:1", 1), t0, &mut first);
        assert_eq!(
            r.from_frontend(100, Message::DialCls { random: 1 }, t0, &mut first),
            vec![Action::ToAgent(1, Message::DialCls { random: 1 })]
        );
        assert_eq!(
            r.from_agent(1, ok_rsp(3, 1), t0),
            vec![Action::ToAgent(1, Message::CloseReq { connect_id: 3 })]
        );
        // After: the dial is done; DIAL_CLS is a no-op, the connection lives.
        r.from_frontend(100, dial("x:1", 2), t0, &mut first);
        r.from_agent(1, ok_rsp(4, 2), t0);
        assert!(
            r.from_frontend(100, Message::DialCls { random: 2 }, t0, &mut first)
                .is_empty()
        );
        assert_eq!(r.established_connections(), 1);
        // Another frontend cannot cancel someone else's dial.
        r.from_frontend(100, dial("x:1", 3), t0, &mut first);
        assert!(
            r.from_frontend(999, Message::DialCls { random: 3 }, t0, &mut first)
                .is_empty()
        );
        assert_eq!(r.pending_dials(), 1);
    }

    #[test]
    fn pending_dials_are_bounded_and_unique() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        for random in 0..3 {
            assert_eq!(
                r.from_frontend(100, dial("x:1", random), t0, &mut first)
                    .len(),
                1
            );
        }
        assert_eq!(
            r.from_frontend(100, dial("x:1", 0), t0, &mut first),
            vec![Action::DialFailed {
                frontend: 100,
                random: 0,
                reason: DialFailure::DuplicateDial
            }]
        );
        assert_eq!(
            r.from_frontend(100, dial("x:1", 3), t0, &mut first),
            vec![Action::DialFailed {
                frontend: 100,
                random: 3,
                reason: DialFailure::TooManyPending
            }]
        );
    }

    #[test]
    fn dials_time_out() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        r.from_frontend(100, dial("x:1", 1), t0, &mut first);
        assert_eq!(r.next_dial_deadline(), Some(t0 + Duration::from_secs(5)));
        assert!(r.expire_dials(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(
            r.expire_dials(t0 + Duration::from_secs(5)),
            vec![
                Action::ToAgent(1, Message::DialCls { random: 1 }),
                Action::DialFailed {
                    frontend: 100,
                    random: 1,
                    reason: DialFailure::Timeout
                },
            ]
        );
        assert_eq!(r.next_dial_deadline(), None);
    }

    #[test]
    fn unknown_connections_are_answered() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        let data = Message::Data {
            connect_id: 5,
            error: String::new(),
            data: vec![1].into(),
        };
        assert_eq!(
            r.from_agent(1, data.clone(), t0),
            vec![Action::ToAgent(1, Message::CloseReq { connect_id: 5 })]
        );
        assert_eq!(
            r.from_frontend(100, data, t0, &mut first),
            vec![Action::ToFrontend(
                100,
                Message::CloseRsp {
                    error: "unknown connection".into(),
                    connect_id: 5
                }
            )]
        );
        // Another agent's DIAL_RSP for my dial does not count.
        r.add_agent(2, "a2", Identifiers::default());
        r.from_frontend(100, dial("x:1", 8), t0, &mut |_| 0);
        assert_eq!(
            r.from_agent(2, ok_rsp(1, 8), t0),
            vec![Action::ToAgent(2, Message::CloseReq { connect_id: 1 })]
        );
        assert_eq!(r.pending_dials(), 1);
    }

    #[test]
    fn strategies_pick_in_order() {
        let mut r = router(vec![Strategy::DestHost, Strategy::DefaultRoute]);
        let t0 = Instant::now();
        let node = Identifiers {
            host: vec!["node-1".into()],
            ipv4: vec!["10.0.0.5".into()],
            ..Default::default()
        };
        let gateway = Identifiers {
            default_route: true,
            ..Default::default()
        };
        r.add_agent(1, "node-agent", node);
        r.add_agent(2, "gateway", gateway);
        let agent_of = |actions: Vec<Action>| match actions.as_slice() {
            [Action::ToAgent(a, _)] => Some(*a),
            _ => None,
        };
        assert_eq!(
            agent_of(r.from_frontend(1, dial("10.0.0.5:10250", 1), t0, &mut first)),
            Some(1)
        );
        assert_eq!(
            agent_of(r.from_frontend(1, dial("node-1:10250", 2), t0, &mut first)),
            Some(1)
        );
        assert_eq!(
            agent_of(r.from_frontend(1, dial("example.com:443", 3), t0, &mut first)),
            Some(2)
        );
        // destHost alone: no match means no agent.
        let mut only = router(vec![Strategy::DestHost]);
        only.add_agent(1, "a", Identifiers::default());
        assert!(matches!(
            only.from_frontend(1, dial("elsewhere:1", 1), t0, &mut first)
                .as_slice(),
            [Action::DialFailed {
                reason: DialFailure::NoAgent,
                ..
            }]
        ));
    }

    #[test]
    fn draining_agents_are_a_last_resort_and_duplicates_ignored() {
        let mut r = router(vec![Strategy::Default]);
        let t0 = Instant::now();
        r.add_agent(1, "a1", Identifiers::default());
        r.add_agent(2, "a2", Identifiers::default());
        r.add_agent(3, "a1", Identifiers::default()); // a duplicate stream of a1
        assert_eq!(r.ready_agents(), 2);
        r.from_agent(1, Message::Drain, t0);
        for random in 0..3 {
            // Whatever the pick, the non-draining a2 (key 2) wins.
            let actions = r.from_frontend(9, dial("x:1", random), t0, &mut |n| n - 1);
            assert!(
                matches!(actions.as_slice(), [Action::ToAgent(2, _)]),
                "{actions:?}"
            );
        }
        r.remove_agent(2);
        let actions = r.from_frontend(9, dial("x:1", 10), t0, &mut first);
        assert!(
            matches!(actions.as_slice(), [Action::ToAgent(1, _)]),
            "{actions:?}"
        );
    }

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(split_host("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(split_host("[fd00::1]:443"), "fd00::1");
        assert_eq!(split_host("node-1"), "node-1");
        assert_eq!(split_host("fd00::1"), "fd00::1");
    }
}
