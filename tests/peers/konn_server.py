"""A grpcio AgentService playing upstream's proxy-server against our
proxy-agent (tests/tunnel_interop.rs).

Usage: konn_server.py GEN_DIR CERT_DIR MODE AGENT_ID IDENTIFIERS SERVER_IDS
Serves AgentService/Connect on 127.0.0.1 (a free port, printed as
`PORT <n>`) over TLS with client-certificate verification, CERT_DIR in the
upstream layout (agent/issued/{ca,proxy-frontend}.crt,
agent/private/proxy-frontend.key). Stream n gets serverid
SERVER_IDS[(n-1) % len] (a comma list) and servercount = the number of
distinct ids. Every stream must carry agentid AGENT_ID and agentidentifiers
equal (as a query) to IDENTIFIERS.

MODE drive: stream 1 is driven through the protocol's flows (see `drive`),
then `PASS drive` is printed and the stream stays open.
MODE ha: the first stream of each server id is probed with one dial, which
must get connectID 1 (`PROBE <n> <id> connectID=1`).

Events on stdout, one a line: `STREAM <n> <id>`, `DRAIN <n> <id>` when a
DRAIN packet arrives, `END <n> <id>` when the agent's side of the stream
ends (half-close or reset; the call is then ended), `FAIL <why>`.
"""
import itertools
import os
import sys
import threading
import traceback
import urllib.parse
from concurrent import futures

import grpc

from konn_common import (
    END,
    Blackhole,
    cert,
    Duplex,
    Packets,
    closed_port,
    echo_handler,
    listen,
    load,
    log,
    poll,
    serve,
)

pb, pb_grpc = load(sys.argv[1])
cert_dir, mode, agent_id, identifiers, server_ids = sys.argv[2:7]
server_ids = server_ids.split(",")
server_count = len(set(server_ids))
P = Packets(pb)
numbers = itertools.count(1)
lock = threading.Lock()
probed = set()  # server ids whose first stream was probed

# Destinations the agent is asked to dial.
echo_closes = []  # one entry per echo connection that saw the agent close


def counting_echo(conn):
    echo_handler(conn)
    echo_closes.append(1)


def greet_and_close(conn):
    with conn:
        conn.sendall(b"bye")


ECHO = f"127.0.0.1:{serve(listen(), counting_echo)}"
GREETER = f"127.0.0.1:{serve(listen(), greet_and_close)}"


def dial(stream, address, random):
    stream.send(P.dial_req(address, random))
    rsp = stream.expect(pb.DIAL_RSP).dialResponse
    assert rsp.random == random, (rsp.random, random)
    return rsp


def collect(stream, want):
    """Reads DATA until each connectID in `want` (id -> size) has its bytes;
    any other packet is a failure."""
    got = {cid: bytearray() for cid in want}
    while any(len(got[cid]) < size for cid, size in want.items()):
        packet = stream.expect(pb.DATA)
        cid = packet.data.connectID
        assert cid in got, f"DATA for connection {cid}"
        got[cid] += packet.data.data
        assert len(got[cid]) <= want[cid], f"connection {cid}: too many bytes"
    return {cid: bytes(b) for cid, b in got.items()}


def expect_close_rsp(stream, cid, error):
    rsp = stream.expect(pb.CLOSE_RSP).closeResponse
    assert rsp.connectID == cid, (rsp.connectID, cid)
    if error:
        assert rsp.error != "", f"CLOSE_RSP {cid} without an error"
    else:
        assert rsp.error == "", f"CLOSE_RSP {cid}: {rsp.error!r}"


def drive(stream):
    """The protocol's flows against the agent, checking every answer."""
    # Two connections, connectIDs 1 and 2 on this stream, DATA interleaved.
    assert dial(stream, ECHO, 11).connectID == 1
    rsp = dial(stream, ECHO, -12)
    assert (rsp.connectID, rsp.error) == (2, ""), rsp
    sizes = {1: [1, 16385, 1 << 20], 2: [7, 300_000, 65536]}
    for round_ in range(3):
        payloads = {cid: os.urandom(plan[round_]) for cid, plan in sizes.items()}
        for cid, payload in payloads.items():
            stream.send(P.data(cid, payload))
        echoed = collect(stream, {cid: len(p) for cid, p in payloads.items()})
        assert echoed == payloads, f"round {round_}: echoed bytes differ"
    log("echo: connections 1 and 2 byte-exact")

    # CLOSE_REQ is answered with CLOSE_RSP and closes the destination.
    stream.send(P.close_req(1))
    expect_close_rsp(stream, 1, error=False)
    poll("the echo destination to see the close", lambda: len(echo_closes) >= 1)
    # Unknown connections: CLOSE_RSP with an error, for CLOSE_REQ and DATA.
    stream.send(P.close_req(999))
    expect_close_rsp(stream, 999, error=True)
    stream.send(P.data(998, b"x"))
    expect_close_rsp(stream, 998, error=True)
    # DATA on the closed connection 1 is unknown now too.
    stream.send(P.data(1, b"late"))
    expect_close_rsp(stream, 1, error=True)
    log("close: CLOSE_RSP for CLOSE_REQ and for unknown connectIDs")

    # A refused dial: DIAL_RSP with an error and no connectID.
    rsp = dial(stream, f"127.0.0.1:{closed_port()}", 13)
    assert rsp.error != "" and rsp.connectID == 0, rsp
    log(f"refused dial: {rsp.error!r}")

    # A destination that speaks first and closes: DIAL_RSP, then its bytes,
    # then an unsolicited CLOSE_RSP. Many at once, so that the order on the
    # stream is tested under load, not by luck.
    randoms = list(range(1000, 1100))
    for random in randoms:
        stream.send(P.dial_req(GREETER, random))
    announced = {}  # connectID -> random
    greeted = set()
    closed = set()
    while len(closed) < len(randoms):
        packet = stream.recv()
        assert packet is not END, "stream ended"
        if packet.type == pb.DIAL_RSP:
            rsp = packet.dialResponse
            assert rsp.error == "" and rsp.random in randoms, rsp
            assert rsp.connectID not in announced, f"connectID {rsp.connectID} announced twice"
            announced[rsp.connectID] = rsp.random
        elif packet.type == pb.DATA:
            cid = packet.data.connectID
            assert cid in announced, f"DATA for connection {cid} before its DIAL_RSP"
            assert packet.data.data == b"bye" and cid not in greeted, packet
            greeted.add(cid)
        elif packet.type == pb.CLOSE_RSP:
            cid = packet.closeResponse.connectID
            assert cid in announced, f"CLOSE_RSP for connection {cid} before its DIAL_RSP"
            assert cid in greeted, f"connection {cid} closed before its bytes arrived"
            closed.add(cid)
        else:
            raise AssertionError(f"unexpected {P.name(packet)}")
    assert sorted(announced) == list(range(3, 3 + len(randoms))), sorted(announced)
    log(f"greeters: {len(randoms)} x DIAL_RSP, DATA, unsolicited CLOSE_RSP, in order")
    next_id = 3 + len(randoms)

    # DIAL_CLS for a dial still in progress: the agent closes the connection
    # once it completes and never announces it.
    hole = Blackhole()
    stream.send(P.dial_req(f"127.0.0.1:{hole.port}", 14))
    stream.send(P.dial_cls(14))
    # A barrier: once this is answered, the agent has read the DIAL_CLS.
    stream.send(P.close_req(4242))
    expect_close_rsp(stream, 4242, error=True)
    hole.release()
    conn = hole.accept_stranger()
    try:
        leftover = conn.recv(16)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b"", leftover
    conn.close()
    # Anything the agent had said about dial 14 would come before this.
    rsp = dial(stream, ECHO, 15)
    assert (rsp.connectID, rsp.error) == (next_id, ""), rsp
    log("DIAL_CLS: the cancelled dial was closed and never announced")

    stream.send(P.close_req(2))
    expect_close_rsp(stream, 2, error=False)
    stream.send(P.close_req(next_id))
    expect_close_rsp(stream, next_id, error=False)


class Agents(pb_grpc.AgentServiceServicer):
    def Connect(self, request_iterator, context):
        # Numbering and "first of its id" are decided together, before the
        # agent sees this stream's metadata: the agent may open its next
        # stream (a duplicate of this id) as soon as it has, and that
        # stream's handler must not be taken for the first.
        with lock:
            n = next(numbers)
            sid = server_ids[(n - 1) % len(server_ids)]
            first_of_id = sid not in probed
            probed.add(sid)
        md = dict(context.invocation_metadata())
        context.send_initial_metadata((("serverid", sid), ("servercount", str(server_count))))
        log(f"STREAM {n} {sid}")
        try:
            assert md.get("agentid") == agent_id, md
            got = urllib.parse.parse_qs(md.get("agentidentifiers", ""))
            assert got == urllib.parse.parse_qs(identifiers), (got, identifiers)
        except AssertionError as e:
            log(f"FAIL metadata: {e}")

        def watch(packet):
            if packet.type == pb.DRAIN:
                log(f"DRAIN {n} {sid}")
                return False  # not for the inbox
            return True

        def on_end():
            # The agent half-closed or reset the stream: end the call, as
            # upstream's server does when Recv returns.
            log(f"END {n} {sid}")
            stream.close_send()

        stream = Duplex.server(P, request_iterator, watch=watch, on_end=on_end)
        context.add_callback(stream.close_send)
        task = None
        if mode == "drive" and n == 1:
            task = (drive, "PASS drive")
        elif mode == "ha" and first_of_id:
            task = (probe, f"PROBE {n} {sid} connectID=1")
        if task:
            threading.Thread(target=run_checked, args=(task, stream), daemon=True).start()
        return stream.outgoing()


def probe(stream):
    rsp = dial(stream, ECHO, 21)
    assert (rsp.connectID, rsp.error) == (1, ""), rsp
    stream.send(P.close_req(1))
    expect_close_rsp(stream, 1, error=False)


def run_checked(task, stream):
    check, success = task
    try:
        check(stream)
        log(success)
    except Exception:  # noqa: BLE001
        log("FAIL " + traceback.format_exc().replace("\n", " | "))


server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
pb_grpc.add_AgentServiceServicer_to_server(Agents(), server)
creds = grpc.ssl_server_credentials(
    [(cert(cert_dir, "agent/private/proxy-frontend.key"), cert(cert_dir, "agent/issued/proxy-frontend.crt"))],
    root_certificates=cert(cert_dir, "agent/issued/ca.crt"),
    require_client_auth=True,
)
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
log(f"PORT {port}")
server.wait_for_termination()
