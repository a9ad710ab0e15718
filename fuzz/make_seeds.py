#!/usr/bin/env python3
"""Writes the hand-made seeds of the structured fuzz targets into
fuzz/corpus/<target>/ (run from anywhere; `make fuzz` uses them with what
the fuzzer found and `make fuzz-cmin` kept). Sources: RFC 7541 appendix C
(HPACK), CONNECT heads as kube-apiserver sends them, the AdmissionReviews of
tests/data, the flag lines of examples/kubernetes."""
import os

FUZZ = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(FUZZ)


def write(target, name, data):
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- hpack: [limit pick] then blocks of [u16 length | 0x8000 trailers] ---
def blocks(pick, *parts):
    out = bytes([pick])
    for part in parts:
        trailers = 0
        if isinstance(part, tuple):
            part, trailers = part[0], 0x8000
        out += (len(part) | trailers).to_bytes(2, "big") + part
    return out


def literal(name, value):  # literal without indexing, new name
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


h = bytes.fromhex
rfc_c3 = [h("828684410f7777772e6578616d706c652e636f6d"), h("828684be58086e6f2d6361636865"),
          h("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565")]
rfc_c4 = [h("828684418cf1e3c2e5f23a6ba0ab90f4ff"), h("828684be5886a8eb10649cbf"),
          h("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")]
rfc_c6 = [h("488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3")]
grpc = (b"\x83\x86" + literal(b":path", b"/ProxyService/Proxy") + literal(b":authority", b"127.0.0.1:8090")
        + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
        + literal(b"grpc-timeout", b"10S"))
trailer = literal(b"grpc-status", b"0") + literal(b"grpc-message", b"")
write("hpack", "rfc7541-c3", blocks(0, *rfc_c3))
write("hpack", "rfc7541-c4-huffman", blocks(1, *rfc_c4))
write("hpack", "rfc7541-c6-eviction", blocks(2, *rfc_c6, *rfc_c6))
write("hpack", "grpc-request-trailers", blocks(0, grpc, (trailer,)))
write("hpack", "table-size-update", blocks(3, h("3fe11f") + rfc_c3[0], h("20") + rfc_c3[1]))

# --- connect_parser -------------------------------------------------------
for name, head in {
    "kube-apiserver": b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 10.0.0.1:10250\r\nUser-Agent: kube-apiserver\r\n\r\n",
    "ipv6": b"CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n",
    "early-data": b"CONNECT node-1.example:22 HTTP/1.1\r\nHost: node-1.example:22\r\n\r\nSSH-2.0-OpenSSH\r\n",
    "partial": b"CONNECT 10.0.0.1:1 HTTP/1.1\r\nHost",
    "get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare-lf": b"CONNECT 127.0.0.1:8080 HTTP/1.1\nProxy-Authorization: Basic eDp5\n\n",
}.items():
    write("connect_parser", name, head)

# --- review -----------------------------------------------------------------
for name in ("admission.json", "admission-v1beta1.json", "pod-4k.json", "delete.json", "deployment.json"):
    with open(os.path.join(REPO, "tests", "data", name), "rb") as f:
        write("review", name, f.read())
write("review", "env-null-and-defined", (
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","kind":"Pod"},'
    b'"operation":"CREATE","object":{"spec":{"initContainers":[{"env":null}],"containers":[{"env":[{"name":"A","value":"1"}]},'
    b'{"env":[{"name":"KUBERNETES_SERVICE_HOST","value":"x"}]},{}]}}}}'))

# --- flags: [binary pick] then arguments joined by NUL --------------------
FLAGS = {
    0: [["--ip-address=10.96.0.2", "--kubernetes-service-ip-address=10.96.0.1", "--interface=lo", "--port=443", "--daemon=false"],
        ["--ip-address=10.96.0.2", "--kubernetes-service-ip-address=10.96.0.1", "--interface=lo", "--port=443",
         "--sync-interval=1m", "--health-port=16911", "--v=1"],
        ["--ip-address", "fd00::2", "--setup-iptables", "--cleanup=true", "-v", "3"]],
    1: [["--apiserver-fqdn=api.example.com.", "--cert-dir=/etc/apiserver-proxy-pod-webhook/certs", "--cert-name=tls.crt",
         "--key-name=tls.key", "--port=9443", "--v=1"],
        ["--apiserver-fqdn", "kubernetes.default.svc", "--cert-dir", "tests/data", "--cert-name=server.crt",
         "--key-name=server.key", "--host=127.0.0.1", "--port=0", "--header-timeout=10s"]],
    2: [["--logtostderr=true", "--uds-name=/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
         "--delete-existing-uds-file", "--mode=grpc", "--server-port=0", "--agent-port=8132",
         "--cluster-cert=/etc/kubernetes/pki/konnectivity/server.crt", "--cluster-key=/etc/kubernetes/pki/konnectivity/server.key",
         "--cluster-ca-cert=/etc/kubernetes/pki/konnectivity/agent-ca.crt", "--admin-port=8133", "--health-port=8134",
         "--server-count=1", "--proxy-strategies=destHost,default", "--backend-dial-timeout=10s",
         "--graceful-shutdown-timeout=10s"],
        ["--mode=http-connect", "--server-port=0", "--server-bind-address=127.0.0.1", "--server-ca-cert=tests/data/ca.crt",
         "--server-cert=tests/data/server.crt", "--server-key=tests/data/server.key", "--cluster-cert=tests/data/server.crt",
         "--cluster-key=tests/data/server.key", "--agent-port=0", "--xfr-channel-size=10", "--header-timeout=5s"]],
    4: [["--logtostderr=true", "--proxy-server-host=konnectivity.example.com", "--proxy-server-port=8132",
         "--ca-cert=/etc/konnectivity-agent/certs/ca.crt", "--agent-cert=/etc/konnectivity-agent/certs/tls.crt",
         "--agent-key=/etc/konnectivity-agent/certs/tls.key", "--agent-identifiers=host=$(NODE_NAME)&ipv4=$(HOST_IP)",
         "--agent-id=$(POD_NAME)", "--health-server-port=8093", "--admin-server-port=8094"]],
    5: [["--mode=grpc", "--proxy-host=127.0.0.1", "--proxy-port=8090", "--ca-cert=ca.crt", "--client-cert=c.crt",
         "--client-key=c.key", "--request-host=127.0.0.1", "--request-port=8000", "--request-path=success",
         "--test-requests=5", "--server-port=0", "--bind-address=127.0.0.1"]],
}
FLAGS[3] = FLAGS[2][:1]
for pick, lines in FLAGS.items():
    for i, args in enumerate(lines):
        write("flags", f"{pick}-{i}", bytes([pick]) + b"\0".join(a.encode() for a in args))
write("flags", "help", b"\x02--help")

# tls_records: record count, flags (1: KeyUpdate after the first, 2:
# close_notify), then length-prefixed records, then raw bytes.
write("tls_records", "records-keyupdate-close", bytes([3, 3, 5]) + b"hello" + bytes([2]) + b"hi" + bytes([3]) + b"end")
write("tls_records", "forged-after", bytes([2, 1, 4]) + b"data" + bytes([1]) + b"x" + bytes([23, 3, 3, 0, 20]) + bytes([7] * 20))
write("tls_records", "garbage-only", bytes([0, 0, 22, 3, 1, 0, 0]))
write("tls_records", "big-header", bytes([1, 0, 3]) + b"abc" + bytes([23, 3, 3, 0xFF, 0xFF]))
