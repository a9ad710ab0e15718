#!/usr/bin/env python3
"""Quick tunnel figures (issue 5's note; `make bench` will supersede it).

Usage: bench/tunnel_quick.py RELEASE_DIR
Starts proxy-server (HTTP CONNECT over mTLS TCP, and over a Unix socket)
and proxy-agent with fresh certificates, then measures, on loopback:
  1. a direct TCP transfer of 1 GiB (the limit),
  2. the same through the mTLS CONNECT frontend and the TLS agent link,
  3. 16 parallel tunnels of 128 MiB each (total throughput),
  4. CONNECT-to-answer latency over the Unix socket, 1000 sequential tunnels.
Every process it starts is stopped at the end.
"""
import os, socket, ssl, statistics, subprocess, sys, tempfile, threading, time, re

REL = sys.argv[1]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp(prefix="tunnel-bench-")
procs = []

def start(args):
    log = open(os.path.join(work, os.path.basename(args[0]) + f"-{len(procs)}.log"), "w+")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    procs.append(p)
    return log

def port_of(log, what):
    for _ in range(1000):
        log.seek(0)
        m = re.search(re.escape(what) + r" listening on \S*:(\d+)", log.read())
        if m:
            return int(m.group(1))
        time.sleep(0.01)
    raise SystemExit(f"no {what} port")

def sink_server():
    """A sink in its own process: reads and discards; prints its port."""
    code = ("import socket,threading\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind(('127.0.0.1',0));s.listen(1024);print(s.getsockname()[1],flush=True)\n"
            "def d(c):\n"
            " b=bytearray(1<<20)\n"
            " while c.recv_into(b):pass\n"
            " c.close()\n"
            "while True:\n"
            " c,_=s.accept();threading.Thread(target=d,args=(c,),daemon=True).start()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    procs.append(p)
    return int(p.stdout.readline())

def send(sock, total):
    buf = b"\0" * (1 << 20)
    sent = 0
    while sent < total:
        sock.sendall(buf)
        sent += len(buf)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the far end to finish (EOF)

try:
    subprocess.run([os.path.join(REPO, "scripts/make-certs.sh"), os.path.join(work, "certs")],
                   check=True, stdout=subprocess.DEVNULL)
    C = os.path.join(work, "certs")
    cluster = [f"--cluster-cert={C}/agent/issued/proxy-frontend.crt",
               f"--cluster-key={C}/agent/private/proxy-frontend.key",
               f"--cluster-ca-cert={C}/agent/issued/ca.crt",
               "--agent-port=0", "--health-port=0", "--admin-port=0"]
    tcp = start([f"{REL}/proxy-server", "--mode=http-connect", "--server-port=0",
                 "--server-bind-address=127.0.0.1",
                 f"--server-ca-cert={C}/frontend/issued/ca.crt",
                 f"--server-cert={C}/frontend/issued/proxy-frontend.crt",
                 f"--server-key={C}/frontend/private/proxy-frontend.key"] + cluster)
    uds_path = os.path.join(work, "k.sock")
    uds = start([f"{REL}/proxy-server", "--mode=http-connect", f"--uds-name={uds_path}",
                 "--server-port=0"] + cluster)
    front = port_of(tcp, "frontend (http-connect)")
    for log in (tcp, uds):
        start([f"{REL}/proxy-agent", f"--ca-cert={C}/agent/issued/ca.crt",
               f"--agent-cert={C}/agent/issued/proxy-agent.crt",
               f"--agent-key={C}/agent/private/proxy-agent.key",
               f"--proxy-server-port={port_of(log, 'agent port')}",
               "--health-server-port=0", "--admin-server-port=0"])
    time.sleep(1.5)  # agents connect (a benchmark script, not a test)
    sink = sink_server()

    ctx = ssl.create_default_context(cafile=f"{C}/frontend/issued/ca.crt")
    ctx.load_cert_chain(f"{C}/frontend/issued/proxy-client.crt", f"{C}/frontend/private/proxy-client.key")
    def tunnel():
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", front)), server_hostname="127.0.0.1")
        s.sendall(f"CONNECT 127.0.0.1:{sink} HTTP/1.1\r\n\r\n".encode())
        head = s.recv(64)
        assert head.startswith(b"HTTP/1.1 200"), head
        return s

    GiB = int(os.environ.get("BENCH_BYTES", 1 << 30))
    t = time.time(); send(socket.create_connection(("127.0.0.1", sink)), GiB); direct = time.time() - t
    print(f"direct loopback TCP, 1 GiB:        {GiB / direct / 1e6:8.0f} MB/s")
    t = time.time(); send(tunnel(), GiB); one = time.time() - t
    print(f"CONNECT over mTLS + agent TLS:     {GiB / one / 1e6:8.0f} MB/s  ({100 * direct / one:.0f}% of direct)")
    per = 128 << 20
    socks = [tunnel() for _ in range(16)]
    threads = [threading.Thread(target=send, args=(s, per)) for s in socks]
    t = time.time()
    for th in threads: th.start()
    for th in threads: th.join()
    par = time.time() - t
    print(f"16 parallel tunnels, total:        {16 * per / par / 1e6:8.0f} MB/s")
    lat = []
    for _ in range(1000):
        s = socket.socket(socket.AF_UNIX); s.connect(uds_path)
        t = time.perf_counter()
        s.sendall(f"CONNECT 127.0.0.1:{sink} HTTP/1.1\r\n\r\n".encode())
        s.recv(64)
        lat.append(time.perf_counter() - t)
        s.close()
    lat.sort()
    print(f"CONNECT to answer (UDS), 1000:     median {statistics.median(lat) * 1e3:.3f} ms, p99 {lat[989] * 1e3:.3f} ms")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try: p.wait(10)
        except Exception: p.kill()
    subprocess.run(["rm", "-rf", work])
