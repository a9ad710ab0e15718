"""Shared by the interop peers: loading the compiled schema and TLS files."""
import os
import sys


def load(gen_dir):
    sys.path.insert(0, gen_dir)
    import konnectivity_pb2
    import konnectivity_pb2_grpc

    return konnectivity_pb2, konnectivity_pb2_grpc


def read(cert_dir, name):
    with open(os.path.join(cert_dir, name), "rb") as f:
        return f.read()


# Message sizes from 1 byte to 4 MiB minus the Packet and gRPC framing.
MAX_PAYLOAD = 4 * 1024 * 1024 - 64
SIZES = [1, 7, 100, 1000, 16384, 16385, 65536, 1 << 20, MAX_PAYLOAD]
ERROR_MESSAGE = "boom: 100% \u00fcn\u00efcode\nline two"
