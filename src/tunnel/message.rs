//! The tunnel's messages as the routing code sees them: one enum with a
//! variant per packet type and plain fields, free of protobuf's optional
//! payloads and integer enums. The wire codec converts to and from it.
//!
//! Owns: the vocabulary of the protocol (protocol.md, "Messages"). Must not:
//! know how messages are framed or carried.

/// One packet of the Konnectivity protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// DIAL_REQ: open a connection to `address` ("host:port"); `random`
    /// identifies the dial until the answer.
    DialReq {
        protocol: String,
        address: String,
        random: i64,
    },
    /// DIAL_RSP: the dial's outcome; an empty `error` means success and
    /// `connect_id` names the connection from then on.
    DialRsp {
        error: String,
        connect_id: i64,
        random: i64,
    },
    /// CLOSE_REQ: close connection `connect_id`.
    CloseReq { connect_id: i64 },
    /// CLOSE_RSP: connection `connect_id` is closed (answer to CLOSE_REQ, or
    /// unsolicited when the destination closed).
    CloseRsp { error: String, connect_id: i64 },
    /// DATA: bytes of connection `connect_id`.
    Data {
        connect_id: i64,
        error: String,
        data: Vec<u8>,
    },
    /// DIAL_CLS: give up on the pending dial `random`.
    DialCls { random: i64 },
    /// DRAIN: the agent is about to stop; prefer other agents.
    Drain,
}

impl Message {
    /// The packet type's name as upstream logs it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::DialReq { .. } => "DIAL_REQ",
            Message::DialRsp { .. } => "DIAL_RSP",
            Message::CloseReq { .. } => "CLOSE_REQ",
            Message::CloseRsp { .. } => "CLOSE_RSP",
            Message::Data { .. } => "DATA",
            Message::DialCls { .. } => "DIAL_CLS",
            Message::Drain => "DRAIN",
        }
    }
}
