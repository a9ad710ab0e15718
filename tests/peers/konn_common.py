"""Shared by the Konnectivity interop peers (konn_frontend.py, konn_agent.py,
konn_server.py): packet builders, a bidirectional-stream wrapper with
deadlines, TLS credentials in the upstream certificate layout, and small
TCP destinations. Only grpcio and protobuf beyond the standard library.

Every wait has a deadline; a failed check raises AssertionError, which the
peers turn into a non-zero exit (the Rust test prints their output).
"""
import os
import queue
import socket
import threading
import time
import urllib.request

import grpc

from interop_common import load

DEADLINE = 20.0
# Marks the end of a stream in Duplex's inbox, and of its outbound queue.
END = object()


def log(*parts):
    """One line on stdout, flushed: the Rust test reads these as events."""
    print(*parts, flush=True)


class Packets:
    """Builders for every packet type, over the compiled schema."""

    def __init__(self, pb):
        self.pb = pb

    def dial_req(self, address, random):
        pb = self.pb
        return pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address=address, random=random))

    def dial_rsp(self, random, connect_id=0, error=""):
        pb = self.pb
        return pb.Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(random=random, connectID=connect_id, error=error))

    def data(self, connect_id, data):
        pb = self.pb
        return pb.Packet(type=pb.DATA, data=pb.Data(connectID=connect_id, data=data))

    def close_req(self, connect_id):
        pb = self.pb
        return pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=connect_id))

    def close_rsp(self, connect_id, error=""):
        pb = self.pb
        return pb.Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(connectID=connect_id, error=error))

    def dial_cls(self, random):
        pb = self.pb
        return pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=random))

    def name(self, packet):
        return self.pb.PacketType.Name(packet.type)


class Duplex:
    """One side of a bidirectional stream: `send` queues a packet, `recv`
    returns the next one (or END) within a deadline. Works for a client call
    (`Duplex.client(start)`) and inside a server handler
    (`Duplex.server(request_iterator)`, then return `outgoing()`)."""

    def __init__(self, names):
        self.names = names
        self.outbound = queue.Queue()
        self.inbox = queue.Queue()
        self.error = None
        self.call = None
        self.watch = None
        self.on_end = None

    @classmethod
    def client(cls, names, start):
        """`start(request_iterator)` opens the call (e.g. stub.Proxy)."""
        duplex = cls(names)
        duplex.call = start(duplex.outgoing())
        threading.Thread(target=duplex._read, args=(duplex.call,), daemon=True).start()
        return duplex

    @classmethod
    def server(cls, names, request_iterator, watch=None, on_end=None):
        """`watch(packet)` sees every packet first and returns whether it
        goes to the inbox; `on_end()` runs once the peer's side has ended."""
        duplex = cls(names)
        duplex.watch, duplex.on_end = watch, on_end
        threading.Thread(target=duplex._read, args=(request_iterator,), daemon=True).start()
        return duplex

    def outgoing(self):
        while True:
            packet = self.outbound.get()
            if packet is END:
                return
            yield packet

    def _read(self, packets):
        try:
            for packet in packets:
                if self.watch is None or self.watch(packet):
                    self.inbox.put(packet)
        except grpc.RpcError as e:  # the call ended with a non-OK status
            self.error = e
        except Exception as e:  # noqa: BLE001 (server side: cancelled streams)
            self.error = e
        if self.on_end is not None:
            self.on_end()
        self.inbox.put(END)

    def send(self, packet):
        self.outbound.put(packet)

    def close_send(self):
        self.outbound.put(END)

    def recv(self, timeout=DEADLINE):
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no packet within {timeout}s") from None

    def expect(self, kind, timeout=DEADLINE, skip=()):
        """The next packet, which must be of type `kind`; packets whose type
        is in `skip` are passed over (returned in order by `skipped`)."""
        while True:
            packet = self.recv(timeout)
            assert packet is not END, f"stream ended while waiting for {self.names.pb.PacketType.Name(kind)}"
            if packet.type in skip:
                continue
            assert packet.type == kind, (
                f"expected {self.names.pb.PacketType.Name(kind)}, got {self.names.name(packet)}: {packet}"
            )
            return packet

    def expect_end(self, timeout=DEADLINE):
        packet = self.recv(timeout)
        assert packet is END, f"expected the stream to end, got {self.names.name(packet)}: {packet}"

    def read_data(self, connect_id, size, timeout=DEADLINE):
        """Collects exactly `size` bytes of DATA for `connect_id`."""
        got = bytearray()
        end = time.monotonic() + timeout
        while len(got) < size:
            packet = self.expect(self.names.pb.DATA, max(0.01, end - time.monotonic()))
            assert packet.data.connectID == connect_id, packet.data.connectID
            got += packet.data.data
        assert len(got) == size, (len(got), size)
        return bytes(got)


def cert(cert_dir, rel):
    with open(os.path.join(cert_dir, rel), "rb") as f:
        return f.read()


def client_credentials(cert_dir, pki, client):
    """mTLS as a client of the `pki` ("frontend" or "agent") in the upstream
    layout: {pki}/issued/ca.crt, {pki}/issued/{client}.crt and
    {pki}/private/{client}.key."""
    return grpc.ssl_channel_credentials(
        root_certificates=cert(cert_dir, f"{pki}/issued/ca.crt"),
        private_key=cert(cert_dir, f"{pki}/private/{client}.key"),
        certificate_chain=cert(cert_dir, f"{pki}/issued/{client}.crt"),
    )


def poll(what, check, timeout=DEADLINE):
    """Calls `check` until it returns a true value; fails after `timeout`."""
    end = time.monotonic() + timeout
    pause = 0.005
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def metric(url, name):
    """The value of an unlabelled metric on a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not on {url}")


# --- TCP destinations ---------------------------------------------------------


def listen():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def serve(sock, handler):
    """Accepts forever in a daemon thread, one daemon thread per connection."""

    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return sock.getsockname()[1]


def echo_handler(conn):
    with conn:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return
            conn.sendall(chunk)


def closed_port():
    """A port nothing listens on (bound, then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class Blackhole:
    """A listener whose accept queue is full, so new connects hang (Linux
    drops their SYNs) until `release` replaces it with an empty listener on
    the same port, where the next SYN retransmission gets through."""

    def __init__(self):
        self.sock = self._listener(0, 0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", self.port))
                self.fillers.append(filler)
            except OSError:
                filler.close()
        assert self.fillers, "could not fill the backlog"
        self.filler_ports = {f.getsockname()[1] for f in self.fillers}

    @staticmethod
    def _listener(port, backlog):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(backlog)
        return sock

    def release(self):
        self.sock.close()  # resets the queued fillers
        for filler in self.fillers:
            filler.close()
        self.sock = self._listener(self.port, 16)

    def accept_stranger(self, timeout=DEADLINE):
        """Accepts until a connection that is not one of the fillers."""
        self.sock.settimeout(timeout)
        while True:
            conn, peer = self.sock.accept()
            if peer[1] in self.filler_ports:
                conn.close()
                continue
            conn.settimeout(timeout)
            return conn
