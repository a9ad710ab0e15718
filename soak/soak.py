#!/usr/bin/env python3
"""Soak test (`make soak`): mixed load on the release binaries for a while,
with process samples, then a verdict. Not part of `make test`.

Usage: soak/soak.py RELEASE_DIR
Environment: SOAK_SECONDS (default 600), SOAK_SAMPLE_SECONDS (default 2),
SOAK_WORKERS (load threads, default 8), SOAK_KEEP=1 (keep the work dir).

What runs (all on 127.0.0.1, fresh certificates from scripts/make-certs.sh):
  - proxy-server "connect": --mode=http-connect, mTLS TCP frontend, with two
    proxy-agents (a, b); agent a is restarted (SIGTERM, wait, start) every
    SOAK_RESTART_SECONDS (default 60) and the frontend certificate is
    rotated (same CA, new key) at 1/3 and 2/3 of the run;
  - proxy-server "grpc": --mode=grpc, mTLS TCP frontend, one agent (c);
    proxy-test-client runs batches of requests through it to http-test-server;
  - apiserver-proxy-pod-webhook with tests/data certificates, rotated at 1/2;
  - an echo server (a Python subprocess), the destination of the CONNECT
    tunnels.
Load (SOAK_WORKERS threads, random mix): short CONNECT tunnels (up to
256 KiB echoed), long ones (16-48 MiB, written and read at once), dials to a
closed port below the ephemeral range (502 expected), clients that close
mid-transfer, clients that stop reading (at most 4 at once, held 5-20 s),
valid and malformed reviews.
Every echoed byte is compared with the pattern sent (a random offset into
one random 1 MiB block, so a byte from another tunnel is caught).

Verdict (exit 1 when any rule breaks):
  - corruption: any echoed byte differs from what was sent;
  - failures: a request that should succeed fails. Tunnels whose life
    overlaps an agent restart (from SIGTERM until 3 s after the new agent
    is connected) may be cut or refused with 502/503/504: "disrupted", not
    failed. Nothing is tolerated around certificate rotations;
  - growth: per process, samples after the warm-up (the first 10% of the
    run, at least 10 s) are cut into thirds; the last third's peak must not
    exceed the first third's peak by more than 25% + 4 MiB (RSS), 8 threads,
    or 16 file descriptors. Processes with fewer than 9 samples after the
    warm-up (restarted agents) are not judged;
  - idle: after the load stops, every long-lived process must come back to
    its idle threads and descriptors (measured before the load, +2; for the
    webhook descriptors only: its HTTP pool keeps threads for reuse, at most
    --max-connections) and the servers' established_connections gauge to 0,
    within 60 s.
"""
import collections
import ctypes
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REL = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE = float(os.environ.get("SOAK_SAMPLE_SECONDS", "2"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "8"))
RESTART_EVERY = float(os.environ.get("SOAK_RESTART_SECONDS", "60"))
FQDN = "kubernetes.soak.example."
MiB = 1 << 20
PATTERN = os.urandom(MiB)
IO_TIMEOUT = 30.0

libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    # PR_SET_PDEATHSIG: children die with this process even on SIGKILL.
    # (Every child is started from the main thread, which lives longest.)
    libc.prctl(1, signal.SIGKILL)


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- processes ------------------------------------------------------------

class Proc:
    """One of our processes (or a restartable role): its Popen, log, samples."""

    def __init__(self, name, args, work):
        self.name, self.args, self.work = name, args, work
        self.instance = 0
        self.popen = None
        self.logfile = None
        self.samples = {}  # instance label -> [(t, rss_kib, threads, fds)]

    @property
    def label(self):
        return self.name if self.instance <= 1 else f"{self.name}#{self.instance}"

    def start(self):
        self.instance += 1
        path = os.path.join(self.work, f"{self.label}.log")
        self.logfile = open(path, "w+")
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                      stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.samples[self.label] = []
        return self

    def log_text(self):
        self.logfile.flush()
        with open(self.logfile.name) as f:
            return f.read()

    def port(self, what, deadline=30):
        end = time.time() + deadline
        while time.time() < end:
            m = re.search(re.escape(what) + r" listening on (?:https://)?\S*:(\d+)", self.log_text())
            if m:
                return int(m.group(1))
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.label}: no '{what}' port in its log:\n{self.log_text()[-2000:]}")

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout=30):
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return None

    def sample(self, t):
        if not self.alive():
            return None
        pid = self.popen.pid
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, AttributeError):
            return None  # exited between poll() and the read
        s = (t, rss, threads, fds)
        self.samples[self.label].append(s)
        return s


PROCS = []
CHILDREN = []  # helper processes (echo server, test clients) to stop at the end


def cleanup():
    for p in PROCS:
        if p.alive():
            p.popen.send_signal(signal.SIGTERM)
    for c in CHILDREN:
        if c.poll() is None:
            c.terminate()
    for p in PROCS:
        if p.popen is not None:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
    for c in CHILDREN:
        try:
            c.wait(10)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def poll(what, fn, deadline=30.0, every=0.1):
    end = time.time() + deadline
    while True:
        v = fn()
        if v:
            return v
        if time.time() >= end:
            raise RuntimeError(f"timed out after {deadline:.0f}s waiting for {what}")
        time.sleep(every)


def metric(port, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^konnectivity_network_proxy_server_" + name + r"(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


# --- certificates ---------------------------------------------------------

def issue_server_cert(pki, cert_out, key_out):
    """A new frontend server pair from the same CA (as make-certs.sh issues it)."""
    ext = os.path.join(pki, "rotate.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    key, csr, crt = (os.path.join(pki, f"rotate.{x}") for x in ("key", "csr", "crt"))
    run = lambda *a: subprocess.run(a, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    run("openssl", "req", "-new", "-key", key, "-subj", "/CN=127.0.0.1", "-out", csr)
    run("openssl", "x509", "-req", "-in", csr, "-CA", f"{pki}/issued/ca.crt", "-CAkey", f"{pki}/private/ca.key",
        "-set_serial", str(random.getrandbits(63)), "-days", "30", "-sha256", "-extfile", ext, "-out", crt)
    replace_pair(crt, key, cert_out, key_out)


def replace_pair(crt, key, cert_out, key_out):
    """Atomic renames, key first then certificate (a handshake in between
    sees a mismatched pair; the reloader must keep the old one)."""
    for src, dst in ((key, key_out), (crt, cert_out)):
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def served_cert(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True)


# --- bookkeeping ----------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.errors = []  # (kind, outcome, message)
        self.bytes_checked = 0
        self.windows = []  # (start, end) of agent restarts; end None while open

    def disrupted(self, t0, t1):
        with self.lock:
            for start, end in self.windows:
                if t1 >= start - 1.0 and (end is None or t0 <= end):
                    return True
        return False

    def record(self, kind, outcome, message=""):
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if outcome != "ok" and len(self.errors) < 50:
                self.errors.append((kind, outcome, message))

    def checked(self, n):
        with self.lock:
            self.bytes_checked += n


class Corrupt(Exception):
    pass


class Expect:
    """Compares received bytes with the pattern from a start offset."""

    def __init__(self, start):
        self.pos = start
        self.got = 0

    def check(self, data):
        n = len(data)
        off = self.pos % MiB
        want = bytearray()
        while len(want) < n:
            take = min(n - len(want), MiB - off)
            want += PATTERN[off:off + take]
            off = 0
        if data != want:
            i = next(i for i in range(n) if data[i] != want[i])
            raise Corrupt(f"byte {self.got + i} differs (got {data[i]:#04x}, sent {want[i]:#04x})")
        self.pos += n
        self.got += n


def pattern_chunks(start, total, chunk=64 * 1024):
    pos, sent = start, 0
    while sent < total:
        off = pos % MiB
        take = min(chunk, total - sent, MiB - off)
        yield PATTERN[off:off + take]
        pos += take
        sent += take


# --- load -----------------------------------------------------------------

class Load:
    def __init__(self, stats, front_port, front_ctx, echo_port, closed_port, hook_port, hook_ctx, stop):
        self.stats, self.front_port, self.front_ctx = stats, front_port, front_ctx
        self.echo_port, self.closed_port = echo_port, closed_port
        self.hook_port, self.hook_ctx, self.stop = hook_port, hook_ctx, stop
        self.stalled = threading.Semaphore(4)
        self.reviews = []
        for name in ("admission.json", "admission-v1beta1.json", "pod-4k.json", "delete.json", "deployment.json"):
            with open(os.path.join(DATA, name), "rb") as f:
                self.reviews.append((name, f.read()))

    def tunnel(self, port):
        """A CONNECT tunnel to 127.0.0.1:port; returns (socket, status, early bytes)."""
        raw = socket.create_connection(("127.0.0.1", self.front_port), timeout=IO_TIMEOUT)
        s = self.front_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            more = s.recv(4096)
            if not more:
                raise ConnectionError(f"closed before the answer ({head[:60]!r})")
            head += more
            if len(head) > 16384:
                raise ConnectionError("answer head too long")
        head, early = head.split(b"\r\n\r\n", 1)
        status = int(head.split(b"\r\n", 1)[0].split()[1])
        return s, status, early

    def echo(self, size, abort_after=None):
        """A tunnel to the echo server: send `size` pattern bytes while reading
        them back and checking each (one thread, non-blocking: Python's TLS
        sockets must not be read and written from two threads). With
        abort_after, close once that many bytes came back (a client leaving
        mid-transfer; with RST half the time)."""
        start = random.randrange(MiB)
        s, status, early = self.tunnel(self.echo_port)
        expect = Expect(start)
        try:
            if status != 200:
                raise ConnectionError(f"status {status}")
            if early:
                expect.check(early)
            s.setblocking(False)
            chunks = pattern_chunks(start, size, 16 * 1024)
            pending, sent = b"", 0
            idle_until = time.time() + IO_TIMEOUT
            while expect.got < size:
                if abort_after is not None and expect.got >= abort_after:
                    if random.random() < 0.5:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                if not pending and sent < size:
                    pending = next(chunks)
                if not s.pending():
                    select.select([s], [s] if pending else [], [], 1.0)
                progressed = False
                if pending:
                    try:
                        n = s.send(pending)
                        pending, sent, progressed = pending[n:], sent + n, True
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        pass
                try:
                    data = s.recv(256 * 1024)
                    if not data:
                        raise ConnectionError(f"EOF after {expect.got} of {size} bytes")
                    expect.check(data)
                    progressed = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                if progressed:
                    idle_until = time.time() + IO_TIMEOUT
                elif time.time() > idle_until:
                    raise TimeoutError(f"no progress for {IO_TIMEOUT:.0f} s after {expect.got} of {size} bytes")
        finally:
            self.stats.checked(expect.got)
            s.close()

    def run_one(self):
        kind = random.choices(
            ["short", "long", "dial-fail", "abort", "stall", "review", "review-bad"],
            weights=[40, 4, 10, 10, 3, 15, 8])[0]
        t0 = time.time()
        try:
            getattr(self, "do_" + kind.replace("-", "_"))()
            self.stats.record(kind, "ok")
        except Corrupt as e:
            self.stats.record(kind, "CORRUPT", str(e))
        except Exception as e:  # noqa: BLE001 (every failure is counted, none kills a worker)
            if kind in ("review", "review-bad") or not self.stats.disrupted(t0, time.time()):
                self.stats.record(kind, "FAILED", f"{type(e).__name__}: {e}")
            else:
                self.stats.record(kind, "disrupted", f"{type(e).__name__}: {e}")

    def do_short(self):
        self.echo(random.randint(1, 256 * 1024))

    def do_long(self):
        self.echo(random.randint(16, 48) * MiB)

    def do_abort(self):
        size = random.randint(1, 8) * MiB
        self.echo(size, abort_after=random.randint(0, size // 2))

    def do_dial_fail(self):
        s, status, _ = self.tunnel(self.closed_port)
        s.close()
        if status != 502:
            raise AssertionError(f"dial to a closed port answered {status}, expected 502")

    def do_stall(self):
        if not self.stalled.acquire(blocking=False):
            return self.do_short()
        try:
            s, status, _ = self.tunnel(self.echo_port)
            with s:
                if status != 200:
                    raise ConnectionError(f"status {status}")
                s.settimeout(1.0)
                sent = 0
                end = time.time() + random.uniform(5, 20)
                start = random.randrange(MiB)
                # Write until the buffers are full, never read.
                for chunk in pattern_chunks(start, 4 * MiB):
                    if time.time() >= end or self.stop.is_set():
                        break
                    try:
                        s.sendall(chunk)
                        sent += len(chunk)
                    except socket.timeout:
                        break
                while time.time() < end and not self.stop.is_set():
                    self.stop.wait(0.5)
        finally:
            self.stalled.release()

    def post_review(self, body, content_type="application/json"):
        conn = http.client.HTTPSConnection("127.0.0.1", self.hook_port, context=self.hook_ctx, timeout=IO_TIMEOUT)
        try:
            conn.request("POST", "/webhook/pod-apiserver-env", body=body, headers={"Content-Type": content_type})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def do_review(self):
        name, body = random.choice(self.reviews)
        status, answer = self.post_review(body)
        if status != 200:
            raise AssertionError(f"{name}: status {status}: {answer[:200]!r}")
        review, response = json.loads(body), json.loads(answer)
        assert response["response"]["uid"] == review["request"]["uid"], f"{name}: uid"
        assert response["apiVersion"] == review["apiVersion"], f"{name}: apiVersion"
        patched = "patch" in response["response"]
        wants = review["request"].get("operation") in ("CREATE", "UPDATE") and review["request"]["kind"]["kind"] == "Pod"
        assert patched == wants, f"{name}: patched={patched}"

    def do_review_bad(self):
        name, body = random.choice(self.reviews)
        variants = [
            # Cut inside the document (not only its trailing newline).
            (body[:random.randrange(len(body.rstrip()))], "application/json", 400),
            (b"\xff\xfe" + os.urandom(64), "application/json", 400),
            (b"[]", "application/json", 400),
            (json.dumps({"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview"}).encode(), "application/json", 400),
            (body, "text/plain", 415),
        ]
        data, ctype, want = random.choice(variants)
        status, answer = self.post_review(data, ctype)
        if status != want:
            raise AssertionError(f"{name} variant: status {status}, expected {want}: {answer[:200]!r}")

    def worker(self):
        while not self.stop.is_set():
            self.run_one()


def grpc_worker(stats, stop, client_args):
    """proxy-test-client batches through the gRPC frontend. (Started from a
    worker thread: not under PDEATHSIG, so stopped explicitly at the end.)"""
    batch = 5
    while not stop.is_set():
        t0 = time.time()
        p = subprocess.Popen(client_args + [f"--test-requests={batch}"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        CHILDREN.append(p)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        CHILDREN.remove(p)
        if p.returncode == 0:
            for _ in range(batch):
                stats.record("grpc", "ok")
        else:
            stats.record("grpc", "FAILED", f"proxy-test-client exit {p.returncode}: {err.decode()[-300:]}")


# --- judging --------------------------------------------------------------

def judge_growth(label, samples, t_start, duration):
    warm = t_start + max(10.0, duration * 0.1)
    after = [s for s in samples if s[0] >= warm]
    if len(after) < 9:
        return None
    third = len(after) // 3
    first, last = after[:third], after[-third:]
    problems = []
    for idx, what, limit in ((1, "RSS", lambda m: m * 1.25 + 4096), (2, "threads", lambda m: m + 8),
                             (3, "fds", lambda m: m + 16)):
        a, b = max(s[idx] for s in first), max(s[idx] for s in last)
        if b > limit(a):
            problems.append(f"{label}: {what} grew: first third's peak {a}, last third's peak {b}")
    return problems


def interrupted(*_):
    raise KeyboardInterrupt()


def main():
    if not REL:
        sys.exit(__doc__)
    signal.signal(signal.SIGTERM, interrupted)
    work = tempfile.mkdtemp(prefix="soak-")
    ok = False
    stop = threading.Event()
    try:
        ok = soak(work, stop)
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        stop.set()
        cleanup()
        if ok and not os.environ.get("SOAK_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    sys.exit(0 if ok else 1)


def soak(work, stop):
    C = os.path.join(work, "certs")
    subprocess.run([os.path.join(REPO, "scripts", "make-certs.sh"), C], check=True, stdout=subprocess.DEVNULL)
    live = os.path.join(work, "live")
    os.makedirs(live)
    front_crt, front_key = os.path.join(live, "frontend.crt"), os.path.join(live, "frontend.key")
    replace_pair(f"{C}/frontend/issued/proxy-frontend.crt", f"{C}/frontend/private/proxy-frontend.key",
                 front_crt, front_key)
    hook_dir = os.path.join(work, "webhook")
    os.makedirs(hook_dir)
    replace_pair(f"{DATA}/server.crt", f"{DATA}/server.key", f"{hook_dir}/tls.crt", f"{hook_dir}/tls.key")

    # The echo destination, in its own process (its own GIL).
    echo_code = (
        "import socket,threading\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('127.0.0.1',0));s.listen(1024);print(s.getsockname()[1],flush=True)\n"
        "def e(c):\n"
        " try:\n"
        "  while True:\n"
        "   b=c.recv(262144)\n"
        "   if not b: break\n"
        "   c.sendall(b)\n"
        "  c.shutdown(socket.SHUT_WR)\n"
        " except OSError: pass\n"
        " c.close()\n"
        "while True:\n"
        " c,_=s.accept();threading.Thread(target=e,args=(c,),daemon=True).start()\n")
    echo = subprocess.Popen([sys.executable, "-c", echo_code], stdout=subprocess.PIPE, preexec_fn=die_with_parent)
    CHILDREN.append(echo)
    echo_port = int(echo.stdout.readline())
    closed_port = closed_port_outside_ephemeral_range()

    cluster = [f"--cluster-cert={C}/agent/issued/proxy-frontend.crt",
               f"--cluster-key={C}/agent/private/proxy-frontend.key",
               f"--cluster-ca-cert={C}/agent/issued/ca.crt",
               "--agent-port=0", "--agent-bind-address=127.0.0.1", "--health-port=0",
               "--health-bind-address=127.0.0.1", "--admin-port=0", "--backend-dial-timeout=10s"]
    frontend = ["--server-port=0", "--server-bind-address=127.0.0.1",
                f"--server-ca-cert={C}/frontend/issued/ca.crt"]
    server = Proc("proxy-server", [f"{REL}/proxy-server", "--mode=http-connect", f"--server-cert={front_crt}",
                                   f"--server-key={front_key}"] + frontend + cluster, work)
    PROCS.append(server.start())
    gserver = Proc("proxy-server-grpc", [f"{REL}/proxy-server", "--mode=grpc",
                                         f"--server-cert={C}/frontend/issued/proxy-frontend.crt",
                                         f"--server-key={C}/frontend/private/proxy-frontend.key"]
                   + frontend + cluster, work)
    PROCS.append(gserver.start())
    front_port, agent_port, admin_port = (server.port("frontend (http-connect)"), server.port("agent port"),
                                          server.port("admin port"))
    gfront_port, gagent_port, gadmin_port = (gserver.port("frontend (grpc)"), gserver.port("agent port"),
                                             gserver.port("admin port"))

    def agent(name, port):
        return Proc(name, [f"{REL}/proxy-agent", f"--ca-cert={C}/agent/issued/ca.crt",
                           f"--agent-cert={C}/agent/issued/proxy-agent.crt",
                           f"--agent-key={C}/agent/private/proxy-agent.key",
                           "--proxy-server-host=127.0.0.1", f"--proxy-server-port={port}",
                           f"--agent-id={name}", "--health-server-port=0", "--admin-server-port=0",
                           "--sync-interval=200ms", "--probe-interval=200ms"], work)

    agent_a, agent_b, agent_c = agent("agent-a", agent_port), agent("agent-b", agent_port), agent("agent-c", gagent_port)
    for a in (agent_a, agent_b, agent_c):
        PROCS.append(a.start())
    tserver = Proc("http-test-server", [f"{REL}/http-test-server", "--server-port=0"], work)
    PROCS.append(tserver.start())
    test_port = tserver.port("http-test-server")
    hook = Proc("webhook", [f"{REL}/apiserver-proxy-pod-webhook", f"--apiserver-fqdn={FQDN}",
                            f"--cert-dir={hook_dir}", "--host=127.0.0.1", "--port=0"], work)
    PROCS.append(hook.start())
    hook_port = hook_port_of(hook)

    poll("two agents on the CONNECT server", lambda: metric(admin_port, "ready_backends") == 2)
    poll("one agent on the gRPC server", lambda: metric(gadmin_port, "ready_backends") == 1)

    front_ctx = ssl.create_default_context(cafile=f"{C}/frontend/issued/ca.crt")
    front_ctx.load_cert_chain(f"{C}/frontend/issued/proxy-client.crt", f"{C}/frontend/private/proxy-client.key")
    hook_ctx = ssl.create_default_context(cafile=f"{DATA}/ca.crt")
    stats = Stats()
    load = Load(stats, front_port, front_ctx, echo_port, closed_port, hook_port, hook_ctx, stop)

    # Idle baselines (after start-up, before any load).
    t_start = time.time()
    longlived = [server, gserver, agent_b, agent_c, tserver, hook]
    baseline = {}
    for p in PROCS:
        s = p.sample(t_start)
        if p in longlived:
            baseline[p.name] = s
    log(f"started: CONNECT frontend :{front_port}, gRPC frontend :{gfront_port}, webhook :{hook_port}, "
        f"echo :{echo_port}; {SECONDS:.0f} s of load, {WORKERS} workers")

    threads = [threading.Thread(target=load.worker, daemon=True) for _ in range(WORKERS)]
    client_args = [f"{REL}/proxy-test-client", "--mode=grpc", "--proxy-host=127.0.0.1", f"--proxy-port={gfront_port}",
                   f"--ca-cert={C}/frontend/issued/ca.crt", f"--client-cert={C}/frontend/issued/proxy-client.crt",
                   f"--client-key={C}/frontend/private/proxy-client.key", "--request-host=127.0.0.1",
                   f"--request-port={test_port}", "--request-path=success"]
    threads.append(threading.Thread(target=grpc_worker, args=(stats, stop, client_args), daemon=True))
    for t in threads:
        t.start()

    events = []
    problems = []
    restart_every = min(RESTART_EVERY, SECONDS / 3)
    next_restart = t_start + restart_every
    rotations = [(t_start + SECONDS / 3, "frontend"), (t_start + SECONDS / 2, "webhook"),
                 (t_start + 2 * SECONDS / 3, "frontend")]
    end = t_start + SECONDS
    next_sample = t_start
    while time.time() < end:
        now = time.time()
        if now >= next_sample:
            for p in PROCS:
                p.sample(now)
            for p in longlived:
                if not p.alive():
                    raise RuntimeError(f"{p.label} exited ({p.popen.returncode}):\n{p.log_text()[-2000:]}")
            next_sample += SAMPLE
        if now >= next_restart:
            with stats.lock:
                stats.windows.append((now, None))
            t0 = time.time()
            code = agent_a.stop()
            if code != 0:
                problems.append(f"{agent_a.label} exited with {code} on SIGTERM")
            agent_a.start()
            poll("agent a back", lambda: metric(admin_port, "ready_backends") == 2, deadline=60)
            t1 = time.time()
            with stats.lock:
                stats.windows[-1] = (now, t1 + 3.0)
            events.append(f"{time.strftime('%H:%M:%S')} agent-a restarted (exit {code}, back after {t1 - t0:.1f} s)")
            next_restart += restart_every
        if rotations and now >= rotations[0][0]:
            _, what = rotations.pop(0)
            if what == "frontend":
                before = served_cert(front_port, front_ctx)
                issue_server_cert(f"{C}/frontend", front_crt, front_key)
                t0 = time.time()
                with open(front_crt) as f:
                    want = ssl.PEM_cert_to_DER_cert(f.read())
                poll("the rotated frontend certificate", lambda: served_cert(front_port, front_ctx) == want)
                assert want != before
            else:
                before = served_cert(hook_port, hook_ctx)
                assert before == der(f"{DATA}/server.crt")
                src = "server-rotated"
                t0 = time.time()
                replace_pair(f"{DATA}/{src}.crt", f"{DATA}/{src}.key", f"{hook_dir}/tls.crt", f"{hook_dir}/tls.key")
                want = der(f"{DATA}/{src}.crt")
                poll("the rotated webhook certificate", lambda: served_cert(hook_port, hook_ctx) == want)
            events.append(f"{time.strftime('%H:%M:%S')} {what} certificate rotated (served after {time.time() - t0:.1f} s)")
        time.sleep(min(0.2, max(0.0, min(next_sample, end) - time.time())))

    log("load stopping")
    stop.set()
    for t in threads:
        t.join(IO_TIMEOUT + 60)
        if t.is_alive():
            problems.append("a load thread did not finish")

    # Idle: back to the baseline.
    def idle():
        now = time.time()
        pending = []
        for p in longlived:
            s = p.sample(now)
            b = baseline[p.name]
            # The webhook's HTTP pool keeps its threads for reuse (at most
            # --max-connections): only its descriptors must come back.
            threads_back = p is hook or (s is not None and s[2] <= b[2] + 2)
            if s is None or not threads_back or s[3] > b[3] + 2:
                pending.append(f"{p.label}: threads {s and s[2]} (idle {b[2]}), fds {s and s[3]} (idle {b[3]})")
        for port, name in ((admin_port, "proxy-server"), (gadmin_port, "proxy-server-grpc")):
            v = metric(port, "established_connections")
            if v != 0:
                pending.append(f"{name}: established_connections {v}")
        idle.pending = pending
        return not pending
    try:
        poll("idle", idle, deadline=60, every=1)
    except RuntimeError:
        problems.extend(f"not back to idle after 60 s: {x}" for x in idle.pending)

    for p in PROCS:
        for label, samples in p.samples.items():
            if p.name == "agent-a" and label != agent_a.label:
                continue  # judged only while it lived long enough
            got = judge_growth(label, samples, t_start, SECONDS)
            if got:
                problems.extend(got)

    report(PROCS, stats, events, baseline)
    counts = stats.counts
    bad = {k: v for k, v in counts.items() if k[1] in ("FAILED", "CORRUPT")}
    if bad:
        problems.append(f"failed or corrupt requests: {dict(bad)}")
    for kind, outcome, msg in stats.errors[:20]:
        print(f"  {outcome} {kind}: {msg}")
    if sum(v for (k, o), v in counts.items() if o == "ok") == 0:
        problems.append("no request succeeded")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("SOAK " + ("PASSED" if not problems else "FAILED"))
    return not problems


def closed_port_outside_ephemeral_range():
    """A port nothing listens on, below the ephemeral range: a port from
    bind(0) is ephemeral, and under load an agent's outgoing connection to
    it occasionally gets the same port as its source and connects to itself
    (a TCP self-connect), which answers 200 instead of 502."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(1000):
        port = random.randrange(10000, low)
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    raise RuntimeError("no free port below the ephemeral range")


def der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def hook_port_of(hook):
    end = time.time() + 30
    while time.time() < end:
        m = re.search(r"listening on https://\S*:(\d+)", hook.log_text())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"webhook: no port in its log:\n{hook.log_text()[-2000:]}")


def report(procs, stats, events, baseline):
    print()
    print(f"{'process':<22}{'samples':>8}  {'RSS MiB start/peak/end':>24}  {'threads s/p/e':>14}  {'fds s/p/e':>14}")
    for p in procs:
        for label, ss in p.samples.items():
            if not ss:
                continue
            rss = "/".join(f"{x / 1024:.1f}" for x in (ss[0][1], max(s[1] for s in ss), ss[-1][1]))
            th = "/".join(str(x) for x in (ss[0][2], max(s[2] for s in ss), ss[-1][2]))
            fd = "/".join(str(x) for x in (ss[0][3], max(s[3] for s in ss), ss[-1][3]))
            print(f"{label:<22}{len(ss):>8}  {rss:>24}  {th:>14}  {fd:>14}")
    print()
    kinds = sorted({k for k, _ in stats.counts})
    outcomes = ["ok", "disrupted", "FAILED", "CORRUPT"]
    print(f"{'requests':<12}" + "".join(f"{o:>11}" for o in outcomes))
    for k in kinds:
        print(f"{k:<12}" + "".join(f"{stats.counts[(k, o)]:>11}" for o in outcomes))
    print(f"echoed bytes checked: {stats.bytes_checked / MiB:.0f} MiB")
    for e in events:
        print(e)
    print()


if __name__ == "__main__":
    main()
