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
    /// DATA: bytes of connection `connect_id` (a slice of the received
    /// gRPC message, or of the read that produced it: no copy).
    Data {
        connect_id: i64,
        error: String,
        data: Bytes,
    },
    /// DIAL_CLS: give up on the pending dial `random`.
    DialCls { random: i64 },
    /// DRAIN: the agent is about to stop; prefer other agents.
    Drain,
}

impl Message {
    /// The payload bytes of DATA, 0 for the other kinds (what a queue's
    /// byte bound counts).
    pub fn data_len(&self) -> usize {
        match self {
            Message::Data { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Whether this is about established connection `id` (its DATA, or its
    /// close either way).
    pub fn is_for(&self, id: i64) -> bool {
        match self {
            Message::Data { connect_id, .. }
            | Message::CloseReq { connect_id }
            | Message::CloseRsp { connect_id, .. } => *connect_id == id,
            _ => false,
        }
    }

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

use super::proto::{self, Packet, PacketType, Payload};
pub use prost::bytes::Bytes;

impl From<Message> for Packet {
    fn from(message: Message) -> Packet {
        match message {
            Message::DialReq {
                protocol,
                address,
                random,
            } => Packet::dial_request(&protocol, &address, random),
            Message::DialRsp {
                error,
                connect_id,
                random,
            } => Packet::dial_response(random, connect_id, &error),
            Message::CloseReq { connect_id } => Packet::close_request(connect_id),
            Message::CloseRsp { error, connect_id } => Packet::close_response(connect_id, &error),
            Message::Data {
                connect_id,
                error,
                data,
            } => {
                let mut packet = Packet::data(connect_id, data);
                if let Some(Payload::Data(d)) = &mut packet.payload {
                    d.error = error;
                }
                packet
            }
            Message::DialCls { random } => Packet::close_dial(random),
            Message::Drain => Packet::drain(),
        }
    }
}

impl Message {
    /// The packet's protobuf encoding in two parts: everything before a
    /// DATA packet's payload bytes, then those bytes (empty for the other
    /// kinds). Sent one after the other they are exactly
    /// `Packet::from(self).encode_to_vec()`, without copying the payload
    /// into a second buffer first.
    pub fn encode_parts(self) -> (Vec<u8>, Bytes) {
        use prost::Message as _;
        let Message::Data {
            connect_id,
            error,
            data,
        } = self
        else {
            return (Packet::from(self).encode_to_vec(), Bytes::new());
        };
        (data_head(connect_id, error, data.len()), data)
    }
}

/// The encoded DATA packet up to its payload: followed by the payload's
/// `len` bytes, the whole packet (as [`Message::encode_parts`] splits it).
pub fn data_head(connect_id: i64, error: String, len: usize) -> Vec<u8> {
    use prost::Message as _;
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut inner = proto::Data {
        connect_id,
        error,
        data: Bytes::new(),
    }
    .encode_to_vec();
    if len > 0 {
        encode_key(3, WireType::LengthDelimited, &mut inner);
        encode_varint(len as u64, &mut inner);
    }
    let mut head = Vec::with_capacity(inner.len() + 16);
    encode_key(1, WireType::Varint, &mut head);
    encode_varint(PacketType::Data as u64, &mut head);
    encode_key(4, WireType::LengthDelimited, &mut head);
    encode_varint((inner.len() + len) as u64, &mut head);
    head.extend_from_slice(&inner);
    head
}

impl TryFrom<Packet> for Message {
    type Error = String;

    /// The packet's `type` decides, as in upstream (`GetDialRequest()` and
    /// friends): a missing or mismatched payload reads as all defaults.
    fn try_from(packet: Packet) -> Result<Message, String> {
        let kind = packet
            .kind()
            .ok_or_else(|| format!("unknown packet type {}", packet.r#type))?;
        let payload = packet.payload;
        Ok(match kind {
            PacketType::DialReq => {
                let p = match payload {
                    Some(Payload::DialRequest(p)) => p,
                    _ => proto::DialRequest::default(),
                };
                Message::DialReq {
                    protocol: p.protocol,
                    address: p.address,
                    random: p.random,
                }
            }
            PacketType::DialRsp => {
                let p = match payload {
                    Some(Payload::DialResponse(p)) => p,
                    _ => proto::DialResponse::default(),
                };
                Message::DialRsp {
                    error: p.error,
                    connect_id: p.connect_id,
                    random: p.random,
                }
            }
            PacketType::CloseReq => {
                let p = match payload {
                    Some(Payload::CloseRequest(p)) => p,
                    _ => proto::CloseRequest::default(),
                };
                Message::CloseReq {
                    connect_id: p.connect_id,
                }
            }
            PacketType::CloseRsp => {
                let p = match payload {
                    Some(Payload::CloseResponse(p)) => p,
                    _ => proto::CloseResponse::default(),
                };
                Message::CloseRsp {
                    error: p.error,
                    connect_id: p.connect_id,
                }
            }
            PacketType::Data => {
                let p = match payload {
                    Some(Payload::Data(p)) => p,
                    _ => proto::Data::default(),
                };
                Message::Data {
                    connect_id: p.connect_id,
                    error: p.error,
                    data: p.data,
                }
            }
            PacketType::DialCls => {
                let p = match payload {
                    Some(Payload::CloseDial(p)) => p,
                    _ => proto::CloseDial::default(),
                };
                Message::DialCls { random: p.random }
            }
            PacketType::Drain => Message::Drain,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_message_is_for_its_established_connection() {
        let data = Message::Data {
            connect_id: 7,
            error: String::new(),
            data: Bytes::from_static(b"x"),
        };
        assert!(data.is_for(7) && !data.is_for(8));
        assert!(Message::CloseReq { connect_id: 7 }.is_for(7));
        let close = Message::CloseRsp {
            error: String::new(),
            connect_id: 7,
        };
        assert!(close.is_for(7));
        let dial = Message::DialRsp {
            error: String::new(),
            connect_id: 7,
            random: 1,
        };
        assert!(!dial.is_for(7), "a dial's answer is not the connection's");
    }

    use super::*;
    use prost::Message as _;

    #[test]
    fn parts_join_into_the_packet_encoding() {
        let mut cases = vec![Message::Drain, Message::CloseReq { connect_id: 7 }];
        for (connect_id, error, len) in [
            (0, "", 0),
            (1, "", 1),
            (i64::MAX, "", 127),
            (-1, "eof", 128),
            (300, "", 16_383),
            (5, "x", 16_384),
            (9, "", 32 * 1024),
            (9, "", 2_097_152),
        ] {
            cases.push(Message::Data {
                connect_id,
                error: error.into(),
                data: (0..len).map(|i| i as u8).collect(),
            });
        }
        for message in cases {
            let want = Packet::from(message.clone()).encode_to_vec();
            let (head, body) = message.clone().encode_parts();
            assert_eq!([head, body.to_vec()].concat(), want, "{message:?}");
        }
    }

    #[test]
    fn every_message_survives_the_packet_form() {
        let all = vec![
            Message::DialReq {
                protocol: "tcp".into(),
                address: "10.0.0.1:443".into(),
                random: -3,
            },
            Message::DialRsp {
                error: "refused".into(),
                connect_id: 0,
                random: 9,
            },
            Message::DialRsp {
                error: String::new(),
                connect_id: 4,
                random: 9,
            },
            Message::CloseReq { connect_id: 4 },
            Message::CloseRsp {
                error: String::new(),
                connect_id: 4,
            },
            Message::Data {
                connect_id: 4,
                error: "x".into(),
                data: vec![0, 1, 2].into(),
            },
            Message::DialCls { random: 9 },
            Message::Drain,
        ];
        for message in all {
            let packet = Packet::from(message.clone());
            assert_eq!(Message::try_from(packet), Ok(message));
        }
    }

    #[test]
    fn the_type_field_decides() {
        // A missing type reads as DIAL_REQ with default fields (proto3).
        assert_eq!(
            Message::try_from(Packet::default()),
            Ok(Message::DialReq {
                protocol: String::new(),
                address: String::new(),
                random: 0
            })
        );
        let mut mismatched = Packet::close_request(5);
        mismatched.r#type = PacketType::Data as i32;
        assert_eq!(
            Message::try_from(mismatched),
            Ok(Message::Data {
                connect_id: 0,
                error: String::new(),
                data: vec![].into()
            })
        );
        let unknown = Packet {
            r#type: 99,
            payload: None,
        };
        assert!(Message::try_from(unknown).is_err());
    }
}
