"""A grpcio client for tests/h2_interop.rs: drives our ProxyService server.

Usage: echo_client.py GEN_DIR TARGET CERT_DIR|- STREAMS MIB
Runs STREAMS concurrent echo calls on one channel, each sending MIB MiB in
packets of SIZES bytes and checking every echoed byte; then an error status,
an oversized message and a cancelled call. Prints PASS and exits 0.
"""
import hashlib
import os
import sys
import threading
import time

import grpc

from interop_common import ERROR_MESSAGE, SIZES, load, read

pb, pb_grpc = load(sys.argv[1])
target, cert_dir, streams, mib = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
options = [("grpc.max_send_message_length", -1)]
if cert_dir != "-":
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(cert_dir, "ca.crt"),
        private_key=read(cert_dir, "client.key"),
        certificate_chain=read(cert_dir, "client.crt"),
    )
    channel = grpc.secure_channel(target, creds, options)
else:
    channel = grpc.insecure_channel(target, options)
stub = pb_grpc.ProxyServiceStub(channel)
POOL = os.urandom(max(SIZES) + 4096)


def echo(index, errors):
    total = mib * 1024 * 1024
    sent = hashlib.sha256()
    plan = []
    n = 0
    while n < total:
        size = min(SIZES[len(plan) % len(SIZES)], total - n)
        plan.append(size)
        n += size

    def requests():
        for i, size in enumerate(plan):
            off = (i * 977 + index) % 4096
            chunk = POOL[off : off + size]
            sent.update(chunk)
            yield pb.Packet(type=pb.DATA, data=pb.Data(connectID=index, data=chunk))

    try:
        call = stub.Proxy(requests(), metadata=(("agentid", f"agent-{index}"), ("agentidentifiers", "host=n1&ipv4=1.2.3.4")))
        md = dict(call.initial_metadata())
        assert md.get("serverid") == "rust-server", md
        assert md.get("servercount") == "3", md
        assert md.get("x-agentid") == f"agent-{index}", md
        got = hashlib.sha256()
        received = 0
        for packet in call:
            assert packet.data.connectID == index
            got.update(packet.data.data)
            received += len(packet.data.data)
        assert call.code() == grpc.StatusCode.OK, call.code()
        assert received == total, (received, total)
        assert got.digest() == sent.digest(), "echoed bytes differ"
    except Exception as e:  # noqa: BLE001
        errors.append(f"stream {index}: {e!r}")


def single(packet):
    return stub.Proxy(iter([packet]))


def dial(address):
    return pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address=address))


start = time.monotonic()
errors = []
threads = [threading.Thread(target=echo, args=(i, errors)) for i in range(1, streams + 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
print(f"echo: {streams} x {mib} MiB each way in {time.monotonic() - start:.1f}s", file=sys.stderr)

try:
    list(single(dial("error")))
    raise AssertionError("expected an error status")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
    assert e.details() == ERROR_MESSAGE, repr(e.details())

try:
    list(single(pb.Packet(type=pb.DATA, data=pb.Data(data=bytes(5 * 1024 * 1024)))))
    raise AssertionError("expected RESOURCE_EXHAUSTED")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.code()

# A cancelled call: the server must see CANCELLED.
gate = threading.Event()


def slow():
    yield pb.Packet(type=pb.DATA, data=pb.Data(connectID=9, data=b"x"))
    gate.wait(30)


call = stub.Proxy(slow())
assert next(call).data.data == b"x"
call.cancel()
gate.set()
deadline = time.monotonic() + 20
while True:
    answer = list(single(dial("cancelled?")))[0].dialResponse.error
    if answer == "yes":
        break
    assert time.monotonic() < deadline, "server never saw the cancellation"
    time.sleep(0.05)
channel.close()
print("PASS", flush=True)
