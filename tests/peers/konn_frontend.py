"""A grpcio frontend playing kube-apiserver's konnectivity client against our
proxy-server (tests/tunnel_interop.rs).

Usage: konn_frontend.py GEN_DIR TARGET CERT_DIR|- ECHO_PORT HOLE_PORT METRICS_URL
TARGET is `unix:/path` (h2c, insecure channel) or `127.0.0.1:PORT` (mTLS
with CERT_DIR in the upstream layout: frontend/issued/ca.crt,
frontend/issued/proxy-client.crt, frontend/private/proxy-client.key).
ECHO_PORT is a TCP echo server, HOLE_PORT a listener that never accepts,
METRICS_URL the server's /metrics. Prints PASS and exits 0 when every check
holds.
"""
import os
import sys
import threading

import grpc

from konn_common import DEADLINE, Duplex, Packets, client_credentials, closed_port, load, log, metric, poll

pb, pb_grpc = load(sys.argv[1])
target, cert_dir = sys.argv[2], sys.argv[3]
echo_port, hole_port, metrics_url = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
P = Packets(pb)
PENDING = "konnectivity_network_proxy_server_pending_backend_dials"

if cert_dir == "-":
    channel = grpc.insecure_channel(target)
else:
    channel = grpc.secure_channel(target, client_credentials(cert_dir, "frontend", "proxy-client"))
grpc.channel_ready_future(channel).result(timeout=DEADLINE)
stub = pb_grpc.ProxyServiceStub(channel)


def proxy():
    return Duplex.client(P, stub.Proxy)


def dial(stream, address, random):
    """DIAL_REQ; returns the DIAL_RSP, which must carry our random."""
    stream.send(P.dial_req(address, random))
    rsp = stream.expect(pb.DIAL_RSP).dialResponse
    assert rsp.random == random, (rsp.random, random)
    return rsp


def tunnel(random, sizes):
    """One connection on its own stream: dial the echo server, echo each
    size byte for byte, close with CLOSE_REQ/CLOSE_RSP, end the call OK."""
    stream = proxy()
    rsp = dial(stream, f"127.0.0.1:{echo_port}", random)
    assert rsp.error == "", rsp.error
    cid = rsp.connectID
    assert cid > 0, cid
    for size in sizes:
        payload = os.urandom(size)
        stream.send(P.data(cid, payload))
        assert stream.read_data(cid, size) == payload, f"connection {cid}: {size} bytes came back different"
    stream.send(P.close_req(cid))
    close = stream.expect(pb.CLOSE_RSP).closeResponse
    assert close.connectID == cid, (close.connectID, cid)
    stream.close_send()
    stream.expect_end()
    assert stream.call.code() == grpc.StatusCode.OK, stream.call.code()
    log(f"tunnel {random}: connectID {cid}, {sum(sizes)} bytes echoed in {len(sizes)} writes")


# 1. Several tunnels at once on one channel, DATA from 1 byte to 1 MiB.
errors = []


def run(random, sizes):
    try:
        tunnel(random, sizes)
    except Exception as e:  # noqa: BLE001
        errors.append(f"tunnel {random}: {e!r}")


plans = [
    (1001, [1, 7, 100, 16384, 16385, 1 << 20]),
    (-1002, [1 << 20, 65536 + 3, 1]),
    (2**62, [1000] * 20 + [300_000]),
]
threads = [threading.Thread(target=run, args=plan) for plan in plans]
for t in threads:
    t.start()
for t in threads:
    t.join(2 * DEADLINE)
assert not any(t.is_alive() for t in threads), "a tunnel hung"
assert not errors, errors

# 2. A dial to a closed port: DIAL_RSP with the agent's error, no connection.
stream = proxy()
rsp = dial(stream, f"127.0.0.1:{closed_port()}", 77)
assert rsp.error != "", "a refused dial came back without an error"
assert rsp.connectID == 0, rsp.connectID
log(f"refused dial: {rsp.error!r}")
stream.close_send()
stream.expect_end()

# 3. DIAL_CLS for a dial that is still pending: nothing is left pending and
# no answer comes for it.
stream = proxy()
stream.send(P.dial_req(f"127.0.0.1:{hole_port}", 88))
poll("the dial to be pending", lambda: metric(metrics_url, PENDING) == 1)
stream.send(P.dial_cls(88))
poll("no pending dial after DIAL_CLS", lambda: metric(metrics_url, PENDING) == 0)
stream.close_send()
stream.expect_end()  # in particular, no DIAL_RSP for the cancelled dial
assert stream.call.code() == grpc.StatusCode.OK, stream.call.code()
log("DIAL_CLS: pending dial withdrawn")

channel.close()
log("PASS")
