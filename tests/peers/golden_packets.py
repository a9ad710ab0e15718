"""Prints golden encodings of tunnel packets, one `name hex` per line.

Usage: golden_packets.py GENERATED_DIR, where GENERATED_DIR holds
konnectivity_pb2.py compiled from tests/proto/konnectivity.proto with
`python -m grpc_tools.protoc`. The packets mirror `golden()` in
src/tunnel/proto.rs.
"""
import sys

sys.path.insert(0, sys.argv[1])
import konnectivity_pb2 as pb  # noqa: E402

P = pb.Packet
GOLDEN = [
    ("dial_req", P(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address="10.0.0.1:443", random=42))),
    ("dial_req_negative", P(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address="[::1]:6443", random=-1))),
    ("dial_rsp_ok", P(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(random=42, connectID=7))),
    ("dial_rsp_err", P(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(random=-5, error="connection refused"))),
    ("data", P(type=pb.DATA, data=pb.Data(connectID=7, data=b"\x00\x01hello\xff"))),
    ("data_empty", P(type=pb.DATA, data=pb.Data())),
    ("close_req", P(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=9_000_000_000))),
    ("close_rsp", P(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(connectID=3, error="unknown connectID"))),
    ("dial_cls", P(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=2**63 - 1))),
    ("drain", P(type=pb.DRAIN, drain=pb.Drain())),
    ("empty", P()),
]

for name, packet in GOLDEN:
    print(name, packet.SerializeToString().hex())
