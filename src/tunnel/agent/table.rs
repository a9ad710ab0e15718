//! The agent's per-stream connection table, as a pure state machine: dials
//! in flight, connection ids, and the answers the protocol requires.
//!
//! Owns: the agent side of protocol.md's flows. Connection ids count from 1
//! per server stream; DIAL_CLS is honoured (a dial that finishes after it is
//! closed at once and never announced); CLOSE_REQ and unknown ids are always
//! answered with CLOSE_RSP. Must not: touch sockets. `C` is whatever handle
//! the I/O layer uses for a live connection; the table hands it back when
//! the connection must be closed.

use std::collections::HashMap;

use crate::tunnel::message::Message;

/// What the I/O layer must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<C> {
    /// Send this message to the server on this stream.
    Reply(Message),
    /// Start dialling `address` for dial `random`.
    Dial { random: i64, address: String },
    /// Hand these bytes to the connection.
    Deliver(i64, C, crate::tunnel::message::Bytes),
    /// Close the connection (its socket and threads) now, dropping what is
    /// still queued for the destination.
    Close(C),
    /// Close the connection once the data already queued for the
    /// destination is written (CLOSE_REQ: the client sent everything).
    CloseAfterFlush(C),
}

/// Why a dial was refused before it started.
pub const TOO_MANY: &str = "too many connections on this agent (--max-connections)";
/// Why a dial reusing the id of a cancelled dial still in flight was refused.
pub const STILL_CANCELLING: &str = "a cancelled dial with this id is still in flight";

struct DialState {
    cancelled: bool,
}

/// One server stream's table.
pub struct Table<C> {
    next_id: i64,
    max_connections: usize,
    dials: HashMap<i64, DialState>,
    connections: HashMap<i64, C>,
}

impl<C: Clone> Table<C> {
    pub fn new(max_connections: usize) -> Self {
        Table {
            next_id: 1,
            max_connections,
            dials: HashMap::new(),
            connections: HashMap::new(),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    pub fn dials(&self) -> usize {
        self.dials.len()
    }

    /// A message from the server.
    pub fn from_server(&mut self, message: Message) -> Vec<Action<C>> {
        match message {
            Message::DialReq {
                protocol,
                address,
                random,
            } => {
                if let Some(dial) = self.dials.get(&random) {
                    // Reused after DIAL_CLS while the cancelled dial still
                    // runs: the new dial must be answered (it is a new
                    // pending dial at the server). A duplicate of a live
                    // dial gets its one answer when that dial ends.
                    return if dial.cancelled {
                        vec![Action::Reply(dial_error(random, STILL_CANCELLING))]
                    } else {
                        Vec::new()
                    };
                }
                if protocol != "tcp" && !protocol.is_empty() {
                    return vec![Action::Reply(dial_error(
                        random,
                        &format!("protocol {protocol:?} is not supported"),
                    ))];
                }
                if self.dials.len() + self.connections.len() >= self.max_connections {
                    return vec![Action::Reply(dial_error(random, TOO_MANY))];
                }
                self.dials.insert(random, DialState { cancelled: false });
                vec![Action::Dial { random, address }]
            }
            Message::DialCls { random } => {
                if let Some(dial) = self.dials.get_mut(&random) {
                    dial.cancelled = true;
                }
                Vec::new()
            }
            Message::Data {
                connect_id, data, ..
            } => match self.connections.get(&connect_id) {
                Some(c) => vec![Action::Deliver(connect_id, c.clone(), data)],
                None => vec![Action::Reply(unknown(connect_id))],
            },
            Message::CloseReq { connect_id } => match self.connections.remove(&connect_id) {
                Some(c) => vec![
                    Action::CloseAfterFlush(c),
                    Action::Reply(Message::CloseRsp {
                        error: String::new(),
                        connect_id,
                    }),
                ],
                None => vec![Action::Reply(unknown(connect_id))],
            },
            // Server-bound messages, or DRAIN, which only agents send.
            Message::DialRsp { .. } | Message::CloseRsp { .. } | Message::Drain => Vec::new(),
        }
    }

    /// A dial finished. On success `connection` is the live handle; the
    /// returned id is the one announced (None when the dial was cancelled
    /// or failed, and then the handle comes back in `Close`).
    pub fn dialled(
        &mut self,
        random: i64,
        outcome: Result<C, String>,
    ) -> (Option<i64>, Vec<Action<C>>) {
        let cancelled = self.dials.remove(&random).is_none_or(|d| d.cancelled);
        match outcome {
            Ok(c) if cancelled => (None, vec![Action::Close(c)]),
            Ok(c) => {
                let connect_id = self.next_id;
                self.next_id += 1;
                self.connections.insert(connect_id, c);
                let rsp = Message::DialRsp {
                    error: String::new(),
                    connect_id,
                    random,
                };
                (Some(connect_id), vec![Action::Reply(rsp)])
            }
            Err(_) if cancelled => (None, Vec::new()),
            Err(error) => (None, vec![Action::Reply(dial_error(random, &error))]),
        }
    }

    /// The destination side of a connection ended (EOF, error, or its queue
    /// overflowed): tell the server with an unsolicited CLOSE_RSP.
    pub fn destination_closed(&mut self, connect_id: i64, error: &str) -> Vec<Action<C>> {
        match self.connections.remove(&connect_id) {
            Some(c) => vec![
                Action::Close(c),
                Action::Reply(Message::CloseRsp {
                    error: error.to_string(),
                    connect_id,
                }),
            ],
            None => Vec::new(), // already closed by a CLOSE_REQ
        }
    }

    /// The server stream ended: every connection and dial goes.
    pub fn close_all(&mut self) -> Vec<Action<C>> {
        for dial in self.dials.values_mut() {
            dial.cancelled = true;
        }
        self.connections
            .drain()
            .map(|(_, c)| Action::Close(c))
            .collect()
    }
}

fn dial_error(random: i64, error: &str) -> Message {
    Message::DialRsp {
        error: error.to_string(),
        connect_id: 0,
        random,
    }
}

fn unknown(connect_id: i64) -> Message {
    Message::CloseRsp {
        error: format!("unknown connectID {connect_id}"),
        connect_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial(random: i64) -> Message {
        Message::DialReq {
            protocol: "tcp".into(),
            address: "10.0.0.1:80".into(),
            random,
        }
    }

    #[test]
    fn ids_count_from_one_and_data_flows() {
        let mut t: Table<&str> = Table::new(10);
        assert_eq!(
            t.from_server(dial(5)),
            vec![Action::Dial {
                random: 5,
                address: "10.0.0.1:80".into()
            }]
        );
        let (id, actions) = t.dialled(5, Ok("sock-a"));
        assert_eq!(id, Some(1));
        assert_eq!(
            actions,
            vec![Action::Reply(Message::DialRsp {
                error: String::new(),
                connect_id: 1,
                random: 5
            })]
        );
        t.from_server(dial(6));
        assert_eq!(t.dialled(6, Ok("sock-b")).0, Some(2));
        let data = Message::Data {
            connect_id: 2,
            error: String::new(),
            data: b"x".to_vec().into(),
        };
        assert_eq!(
            t.from_server(data),
            vec![Action::Deliver(2, "sock-b", b"x".to_vec().into())]
        );
    }

    #[test]
    fn dial_cls_before_the_dial_finishes_closes_it_silently() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        assert!(t.from_server(Message::DialCls { random: 5 }).is_empty());
        assert_eq!(
            t.dialled(5, Ok("sock")),
            (None, vec![Action::Close("sock")])
        );
        assert_eq!((t.dials(), t.connections()), (0, 0));
        // A failed dial after DIAL_CLS: nothing to say either.
        t.from_server(dial(6));
        t.from_server(Message::DialCls { random: 6 });
        assert_eq!(t.dialled(6, Err("refused".into())), (None, vec![]));
    }

    #[test]
    fn a_dial_id_reused_after_dial_cls_is_answered() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        // A duplicate of a live dial: its one answer comes when it ends.
        assert!(t.from_server(dial(5)).is_empty());
        t.from_server(Message::DialCls { random: 5 });
        // Reused while the cancelled dial still runs: refused at once, so
        // the server's new pending dial gets an answer.
        assert_eq!(
            t.from_server(dial(5)),
            vec![Action::Reply(dial_error(5, STILL_CANCELLING))]
        );
        // The old dial ends silently; the id is free again.
        assert_eq!(t.dialled(5, Ok("old")), (None, vec![Action::Close("old")]));
        assert_eq!(
            t.from_server(dial(5)),
            vec![Action::Dial {
                random: 5,
                address: "10.0.0.1:80".into()
            }]
        );
    }

    #[test]
    fn dial_cls_after_the_dial_rsp_is_ignored() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        t.dialled(5, Ok("sock"));
        assert!(t.from_server(Message::DialCls { random: 5 }).is_empty());
        assert_eq!(t.connections(), 1);
    }

    #[test]
    fn failed_dials_are_answered_with_the_error() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        assert_eq!(
            t.dialled(5, Err("dial tcp 10.0.0.1:80: connection refused".into()))
                .1,
            vec![Action::Reply(Message::DialRsp {
                error: "dial tcp 10.0.0.1:80: connection refused".into(),
                connect_id: 0,
                random: 5
            })]
        );
        let udp = Message::DialReq {
            protocol: "udp".into(),
            address: "x:1".into(),
            random: 7,
        };
        assert!(matches!(
            t.from_server(udp).as_slice(),
            [Action::Reply(Message::DialRsp { .. })]
        ));
    }

    #[test]
    fn close_req_and_unknown_ids_are_always_answered() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        t.dialled(5, Ok("sock"));
        assert_eq!(
            t.from_server(Message::CloseReq { connect_id: 1 }),
            vec![
                Action::CloseAfterFlush("sock"),
                Action::Reply(Message::CloseRsp {
                    error: String::new(),
                    connect_id: 1
                })
            ]
        );
        assert!(matches!(
            t.from_server(Message::CloseReq { connect_id: 1 })
                .as_slice(),
            [Action::Reply(Message::CloseRsp { connect_id: 1, .. })]
        ));
        let data = Message::Data {
            connect_id: 9,
            error: String::new(),
            data: vec![].into(),
        };
        assert!(matches!(
            t.from_server(data).as_slice(),
            [Action::Reply(Message::CloseRsp { connect_id: 9, .. })]
        ));
        // The destination closing after CLOSE_REQ says nothing more.
        assert!(t.destination_closed(1, "").is_empty());
    }

    #[test]
    fn destination_close_is_announced_once() {
        let mut t: Table<&str> = Table::new(10);
        t.from_server(dial(5));
        t.dialled(5, Ok("sock"));
        assert_eq!(
            t.destination_closed(1, "EOF"),
            vec![
                Action::Close("sock"),
                Action::Reply(Message::CloseRsp {
                    error: "EOF".into(),
                    connect_id: 1
                })
            ]
        );
        assert!(t.destination_closed(1, "EOF").is_empty());
    }

    #[test]
    fn connections_are_bounded_and_released_when_the_stream_ends() {
        let mut t: Table<u32> = Table::new(2);
        t.from_server(dial(1));
        t.from_server(dial(2));
        assert_eq!(
            t.from_server(dial(3)),
            vec![Action::Reply(Message::DialRsp {
                error: TOO_MANY.into(),
                connect_id: 0,
                random: 3
            })]
        );
        t.dialled(1, Ok(10));
        let mut closed = t.close_all();
        closed.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(closed, vec![Action::Close(10)]);
        // The dial still in flight finishes after the stream ended: closed.
        assert_eq!(t.dialled(2, Ok(20)), (None, vec![Action::Close(20)]));
    }
}
