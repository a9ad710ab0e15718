//! The Konnectivity tunnel packets (protocol.md), as hand-written prost
//! messages: no protoc, no build script.
//!
//! Owns: the message layout, byte for byte as upstream's `konnectivity.proto`
//! (field numbers, proto3 defaults not emitted, unknown fields skipped).
//! Must not: do I/O or hold connection state. The schema for other
//! implementations lives in tests/proto/konnectivity.proto; the unit tests
//! pin golden bytes that the Python protobuf runtime produced from it
//! (tests/peers/golden_packets.py, cross-checked again by tests/h2_interop.rs).

/// The packet kind. Unknown values decode into `Packet::type` as the
/// raw number; [`Packet::kind`] reports them as `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PacketType {
    DialReq = 0,
    DialRsp = 1,
    CloseReq = 2,
    CloseRsp = 3,
    Data = 4,
    DialCls = 5,
    Drain = 6,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Packet {
    #[prost(enumeration = "PacketType", tag = "1")]
    pub r#type: i32,
    #[prost(oneof = "Payload", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(message, tag = "2")]
    DialRequest(DialRequest),
    #[prost(message, tag = "3")]
    DialResponse(DialResponse),
    #[prost(message, tag = "4")]
    Data(Data),
    #[prost(message, tag = "5")]
    CloseRequest(CloseRequest),
    #[prost(message, tag = "6")]
    CloseResponse(CloseResponse),
    #[prost(message, tag = "7")]
    CloseDial(CloseDial),
    #[prost(message, tag = "8")]
    Drain(Drain),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DialRequest {
    #[prost(string, tag = "1")]
    pub protocol: String,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(int64, tag = "3")]
    pub random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DialResponse {
    #[prost(string, tag = "1")]
    pub error: String,
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
    #[prost(int64, tag = "3")]
    pub random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseRequest {
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseResponse {
    #[prost(string, tag = "1")]
    pub error: String,
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseDial {
    #[prost(int64, tag = "1")]
    pub random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Drain {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Data {
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
    #[prost(string, tag = "2")]
    pub error: String,
    /// `Bytes`: decoded from a gRPC message as a slice of it (no copy).
    #[prost(bytes = "bytes", tag = "3")]
    pub data: prost::bytes::Bytes,
}

impl Packet {
    fn with(kind: PacketType, payload: Payload) -> Packet {
        Packet {
            r#type: kind as i32,
            payload: Some(payload),
        }
    }

    /// The packet type, `None` for a number this version does not know.
    pub fn kind(&self) -> Option<PacketType> {
        PacketType::try_from(self.r#type).ok()
    }

    pub fn dial_request(protocol: &str, address: &str, random: i64) -> Packet {
        let p = DialRequest {
            protocol: protocol.into(),
            address: address.into(),
            random,
        };
        Packet::with(PacketType::DialReq, Payload::DialRequest(p))
    }

    pub fn dial_response(random: i64, connect_id: i64, error: &str) -> Packet {
        let p = DialResponse {
            error: error.into(),
            connect_id,
            random,
        };
        Packet::with(PacketType::DialRsp, Payload::DialResponse(p))
    }

    pub fn data(connect_id: i64, data: impl Into<prost::bytes::Bytes>) -> Packet {
        Packet::with(
            PacketType::Data,
            Payload::Data(Data {
                connect_id,
                error: String::new(),
                data: data.into(),
            }),
        )
    }

    pub fn close_request(connect_id: i64) -> Packet {
        Packet::with(
            PacketType::CloseReq,
            Payload::CloseRequest(CloseRequest { connect_id }),
        )
    }

    pub fn close_response(connect_id: i64, error: &str) -> Packet {
        let p = CloseResponse {
            error: error.into(),
            connect_id,
        };
        Packet::with(PacketType::CloseRsp, Payload::CloseResponse(p))
    }

    pub fn close_dial(random: i64) -> Packet {
        Packet::with(
            PacketType::DialCls,
            Payload::CloseDial(CloseDial { random }),
        )
    }

    pub fn drain() -> Packet {
        Packet::with(PacketType::Drain, Payload::Drain(Drain {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Golden encodings, produced by the Python protobuf runtime from
    /// tests/proto/konnectivity.proto (tests/peers/golden_packets.py prints
    /// this table; tests/h2_interop.rs re-runs it against this code).
    pub(crate) fn golden() -> Vec<(&'static str, Packet)> {
        vec![
            ("dial_req", Packet::dial_request("tcp", "10.0.0.1:443", 42)),
            (
                "dial_req_negative",
                Packet::dial_request("tcp", "[::1]:6443", -1),
            ),
            ("dial_rsp_ok", Packet::dial_response(42, 7, "")),
            (
                "dial_rsp_err",
                Packet::dial_response(-5, 0, "connection refused"),
            ),
            ("data", Packet::data(7, b"\x00\x01hello\xff".to_vec())),
            ("data_empty", Packet::data(0, Vec::new())),
            ("close_req", Packet::close_request(9_000_000_000)),
            ("close_rsp", Packet::close_response(3, "unknown connectID")),
            ("dial_cls", Packet::close_dial(i64::MAX)),
            ("drain", Packet::drain()),
            ("empty", Packet::default()),
        ]
    }

    const GOLDEN_HEX: &[(&str, &str)] = &[
        ("dial_req", "12150a03746370120c31302e302e302e313a343433182a"),
        (
            "dial_req_negative",
            "121c0a03746370120a5b3a3a315d3a3634343318ffffffffffffffffff01",
        ),
        ("dial_rsp_ok", "08011a041007182a"),
        (
            "dial_rsp_err",
            "08011a1f0a12636f6e6e656374696f6e207265667573656418fbffffffffffffffff01",
        ),
        ("data", "0804220c08071a08000168656c6c6fff"),
        ("data_empty", "08042200"),
        ("close_req", "08022a060880b4c4c321"),
        (
            "close_rsp",
            "080332150a11756e6b6e6f776e20636f6e6e65637449441003",
        ),
        ("dial_cls", "08053a0a08ffffffffffffffff7f"),
        ("drain", "08064200"),
        ("empty", ""),
    ];

    #[test]
    fn packets_round_trip() {
        for (name, packet) in golden() {
            let bytes = packet.encode_to_vec();
            let back = Packet::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back, packet, "{name}");
        }
    }

    #[test]
    fn golden_bytes_match_python_protobuf() {
        let golden = golden();
        for (name, want) in GOLDEN_HEX {
            let packet = &golden
                .iter()
                .find(|(n, _)| n == name)
                .expect("golden name")
                .1;
            assert_eq!(hex(&packet.encode_to_vec()), *want, "{name}");
            assert_eq!(
                &Packet::decode(unhex(want).as_slice()).unwrap(),
                packet,
                "{name}"
            );
        }
    }

    #[test]
    fn proto3_rules() {
        // A missing type reads as DIAL_REQ; defaults are not emitted.
        assert_eq!(Packet::default().encode_to_vec(), b"");
        assert_eq!(
            Packet::decode(&b""[..]).unwrap().kind(),
            Some(PacketType::DialReq)
        );
        // Unknown fields (here field 15, varint) are skipped.
        let mut bytes = Packet::close_request(5).encode_to_vec();
        bytes.extend([0x78, 0x01]);
        assert_eq!(
            Packet::decode(bytes.as_slice()).unwrap(),
            Packet::close_request(5)
        );
        // An unknown enum value survives as a number.
        let p = Packet::decode(&[0x08, 0x63][..]).unwrap();
        assert_eq!((p.r#type, p.kind()), (99, None));
        // Truncated input is an error, not a panic.
        let bytes = Packet::data(1, vec![1; 100]).encode_to_vec();
        for cut in 0..bytes.len() {
            let _ = Packet::decode(&bytes[..cut]);
        }
        assert!(Packet::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
