"""A grpcio agent playing upstream's proxy-agent against our proxy-server
(tests/tunnel_interop.rs).

Usage: konn_agent.py GEN_DIR TARGET CERT_DIR AGENT_ID IDENTIFIERS
Opens AgentService/Connect on TARGET (127.0.0.1:PORT) over mTLS with
CERT_DIR in the upstream layout (agent/issued/ca.crt,
agent/issued/proxy-agent.crt, agent/private/proxy-agent.key) and metadata
agentid and agentidentifiers, then serves the stream as upstream's agent
does: dials with Python sockets, connectIDs from 1, DATA both ways,
CLOSE_REQ answered with CLOSE_RSP, an unsolicited CLOSE_RSP when the
destination closes, DIAL_CLS honoured. Runs until killed.

Events on stdout, one a line, for the test to check:
  SERVER id=<serverid> count=<servercount>
  DIAL <address> -> <connectID> | DIAL <address> failed: <error>
  CLOSE_REQ <connectID> | DEST_CLOSED <connectID> | DIAL_CLS <random>
"""
import socket
import sys
import threading

import grpc

from konn_common import END, Duplex, Packets, client_credentials, load, log

pb, pb_grpc = load(sys.argv[1])
target, cert_dir, agent_id, identifiers = sys.argv[2:6]
P = Packets(pb)


channel = grpc.secure_channel(target, client_credentials(cert_dir, "agent", "proxy-agent"))
stub = pb_grpc.AgentServiceStub(channel)
stream = Duplex.client(
    P, lambda requests: stub.Connect(requests, metadata=(("agentid", agent_id), ("agentidentifiers", identifiers)))
)
md = dict(stream.call.initial_metadata())
log(f"SERVER id={md.get('serverid')} count={md.get('servercount')}")

lock = threading.Lock()
next_id = 1
connections = {}  # connectID -> socket
cancelled = set()  # randoms of dials the server gave up


def pump(cid, sock):
    """Destination -> server; an unsolicited CLOSE_RSP when it closes."""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            break
        stream.send(P.data(cid, chunk))
    with lock:
        mine = connections.pop(cid, None) is not None
    if mine:  # not closed by a CLOSE_REQ meanwhile
        sock.close()
        log(f"DEST_CLOSED {cid}")
        stream.send(P.close_rsp(cid))


def dial(address, random):
    global next_id
    host, port = address.rsplit(":", 1)
    try:
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.settimeout(None)
    except OSError as e:
        with lock:
            gone = random in cancelled
        if not gone:
            log(f"DIAL {address} failed: {e}")
            stream.send(P.dial_rsp(random, error=f"dial tcp {address}: {e}"))
        return
    with lock:
        if random in cancelled:
            sock.close()
            return
        cid = next_id
        next_id += 1
        connections[cid] = sock
    log(f"DIAL {address} -> {cid}")
    stream.send(P.dial_rsp(random, connect_id=cid))
    threading.Thread(target=pump, args=(cid, sock), daemon=True).start()


while True:
    packet = stream.recv(timeout=None)
    if packet is END:
        log(f"END {stream.error!r}")
        break
    kind = packet.type
    if kind == pb.DIAL_REQ:
        req = packet.dialRequest
        threading.Thread(target=dial, args=(req.address, req.random), daemon=True).start()
    elif kind == pb.DATA:
        cid = packet.data.connectID
        with lock:
            sock = connections.get(cid)
        if sock is None:
            stream.send(P.close_rsp(cid, error=f"unknown connectID {cid}"))
            continue
        try:
            sock.sendall(packet.data.data)
        except OSError:
            pass  # the pump reports the close
    elif kind == pb.CLOSE_REQ:
        cid = packet.closeRequest.connectID
        with lock:
            sock = connections.pop(cid, None)
        log(f"CLOSE_REQ {cid}")
        if sock is None:
            stream.send(P.close_rsp(cid, error=f"unknown connectID {cid}"))
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        stream.send(P.close_rsp(cid))
    elif kind == pb.DIAL_CLS:
        with lock:
            cancelled.add(packet.closeDial.random)
        log(f"DIAL_CLS {packet.closeDial.random}")
    else:
        log(f"UNEXPECTED {P.name(packet)}")
