"""A grpcio ProxyService that echoes Packets, for tests/h2_interop.rs.

Usage: echo_server.py GEN_DIR tls|uds ADDRESS CERT_DIR
Prints `PORT <n>` (tls) or `READY` (uds) once serving, then serves until killed.
Behaviour, by the first packets of a call:
- DIAL_REQ address "error": abort with INVALID_ARGUMENT and ERROR_MESSAGE.
- DIAL_REQ address "big": answer with one DATA packet of 5 MiB.
- DIAL_REQ address "cancelled?": DIAL_RSP error "yes" once an earlier call
  was cancelled by its client, "no" before.
- anything else is echoed. Response headers: serverid, servercount and
  x-agentid (the request's agentid).
"""
import sys
import threading
from concurrent import futures

import grpc

from interop_common import ERROR_MESSAGE, load, read

pb, pb_grpc = load(sys.argv[1])
mode, address, cert_dir = sys.argv[2], sys.argv[3], sys.argv[4]
cancelled = threading.Event()


class Echo(pb_grpc.ProxyServiceServicer):
    def Proxy(self, requests, context):
        state = {"ended": False}

        def on_done():
            if not state["ended"]:
                cancelled.set()

        context.add_callback(on_done)
        md = dict(context.invocation_metadata())
        context.send_initial_metadata(
            (("serverid", "py-server"), ("servercount", "1"), ("x-agentid", md.get("agentid", "")))
        )
        for packet in requests:
            if packet.WhichOneof("payload") == "dialRequest":
                address = packet.dialRequest.address
                if address == "error":
                    state["ended"] = True
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, ERROR_MESSAGE)
                if address == "big":
                    yield pb.Packet(type=pb.DATA, data=pb.Data(connectID=1, data=bytes(5 * 1024 * 1024)))
                    continue
                if address == "cancelled?":
                    answer = "yes" if cancelled.is_set() else "no"
                    yield pb.Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(error=answer))
                    continue
            yield packet
        state["ended"] = True


server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
pb_grpc.add_ProxyServiceServicer_to_server(Echo(), server)
if mode == "tls":
    creds = grpc.ssl_server_credentials(
        [(read(cert_dir, "server.key"), read(cert_dir, "server.crt"))],
        root_certificates=read(cert_dir, "ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port(address, creds)
    server.start()
    print(f"PORT {port}", flush=True)
else:
    server.add_insecure_port(address)
    server.start()
    print("READY", flush=True)
server.wait_for_termination()
