#!/usr/bin/env python3
"""`make bench`: every performance figure against a baseline of the same run.

Usage: bench/bench.py  (root; run by `make bench`, which builds and installs
what it needs). Environment:
  RELEASE_DIR  our static binaries (default target/x86_64-unknown-linux-musl/release)
  BENCH_LOAD   the load tool (examples/bench_load.rs, built by `make bench`)
  BENCH_QUICK  1: small sizes, one repetition (a development run, minutes);
               its table is printed, not written to bench/RESULTS.md
  BENCH_OUT    where to write the Markdown table (default bench/RESULTS.md)
  BENCH_KEEP   1: keep the work directory (the processes' logs) for a look
  BENCH_ONLY   comma list of sections to run (size, throughput, latency, hol,
               idle, webhook, sidecar); for development, writes nothing

The machine is shared and noisy, so every figure is compared with a
baseline measured in the same run on the same machine, interleaved with it
(each repetition measures every variant once; the median is reported).
Every process, namespace and sysctl change is undone at the end, also on
failure. Asserts nothing: an unmet target is a "no" in the table.
"""
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.abspath(os.environ.get("RELEASE_DIR", os.path.join(REPO, "target/x86_64-unknown-linux-musl/release")))
LOAD = os.path.abspath(os.environ.get("BENCH_LOAD", os.path.join(REPO, "target/bench-tool/release/examples/bench_load")))
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
OUT = os.environ.get("BENCH_OUT", "" if QUICK or os.environ.get("BENCH_ONLY") else os.path.join(REPO, "bench/RESULTS.md"))
BINARIES = ["apiserver-proxy-sidecar", "apiserver-proxy-pod-webhook", "proxy-server",
            "proxy-agent", "proxy-test-client", "http-test-server"]

MiB, GiB = 1 << 20, 1 << 30
ONE_BYTES = 256 * MiB if QUICK else GiB           # row 1, 3
PAR_BYTES = 16 * MiB if QUICK else 64 * MiB       # row 2: per connection (16 of them: 1 GiB in all)
HOL_BYTES = 16 * MiB if QUICK else 64 * MiB       # row 6: per connection (15 of them)
REPS = 1 if QUICK else 5
LAT_N = 200 if QUICK else 1000
IDLE_GRPC_N = 200 if QUICK else 1000
IDLE_N = 1000 if QUICK else 10000
WRK_SECS = 3 if QUICK else 10
SIDECAR_RSS_AFTER = 5 if QUICK else 60

work = tempfile.mkdtemp(prefix="apxbench-")
procs = []          # every process we started (each in its own process group)
restore = []        # (path, old value) of sysctls we changed
netns = []          # network namespaces that may exist because of us


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(args, name, stdout=subprocess.DEVNULL):
    # One log per process (a name may start twice); the child appends
    # (O_APPEND), so our reads cannot move its write offset.
    path = os.path.join(work, f"{name}.log")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(work, f"{name}-{n}.log")
    with open(path, "ab") as err:
        p = subprocess.Popen(args, stdout=stdout, stderr=err, start_new_session=True, cwd=work)
    p.name, p.errlog = name, path
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in procs:
        procs.remove(p)


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def log_port(p, what):
    def check():
        if p.poll() is not None:
            raise RuntimeError(f"{p.name} exited: {read(p.errlog)[-2000:]}")
        m = re.search(re.escape(what) + r" listening on \S*:(\d+)", read(p.errlog))
        return m and int(m.group(1))
    return wait_for(f"{p.name}: {what}", check)


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_up(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def load(*args, timeout=600):
    """Runs the load tool; returns its JSON line."""
    r = subprocess.run([LOAD, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"bench_load {' '.join(map(str, args))}: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def sh(*args):
    return subprocess.run(args, capture_output=True, text=True).stdout.strip()


def sysctl_set(path, value):
    old = open(path).read().strip()
    if int(old) < value:
        restore.append((path, old))
        with open(path, "w") as f:
            f.write(str(value))


# --- the components --------------------------------------------------------

C = os.path.join(work, "certs")
CLIENT_TLS = ["--ca", f"{C}/frontend/issued/ca.crt", "--cert", f"{C}/frontend/issued/proxy-client.crt",
              "--key", f"{C}/frontend/private/proxy-client.key"]


class Tunnel:
    """proxy-server (one frontend) and its proxy-agent (TLS agent link)."""

    def __init__(self, mode, uds):
        name = f"{mode}-{'uds' if uds else 'tls'}"
        cluster = [f"--cluster-cert={C}/agent/issued/proxy-frontend.crt",
                   f"--cluster-key={C}/agent/private/proxy-frontend.key",
                   f"--cluster-ca-cert={C}/agent/issued/ca.crt", "--agent-port=0",
                   "--agent-bind-address=127.0.0.1", "--health-port=0",
                   "--health-bind-address=127.0.0.1", "--admin-port=0"]
        if uds:
            self.proxy = os.path.join(work, f"{name}.sock")
            front = [f"--uds-name={self.proxy}", "--server-port=0"]
        else:
            front = ["--server-port=0", "--server-bind-address=127.0.0.1",
                     f"--server-ca-cert={C}/frontend/issued/ca.crt",
                     f"--server-cert={C}/frontend/issued/proxy-frontend.crt",
                     f"--server-key={C}/frontend/private/proxy-frontend.key"]
        self.server = start([f"{REL}/proxy-server", f"--mode={mode}", *front, *cluster], f"server-{name}")
        if not uds:
            self.proxy = f"127.0.0.1:{log_port(self.server, f'frontend ({mode})')}"
        health = log_port(self.server, "health port")
        self.agent = start([f"{REL}/proxy-agent", f"--ca-cert={C}/agent/issued/ca.crt",
                            f"--agent-cert={C}/agent/issued/proxy-agent.crt",
                            f"--agent-key={C}/agent/private/proxy-agent.key",
                            f"--proxy-server-port={log_port(self.server, 'agent port')}",
                            "--health-server-port=0", "--admin-server-port=0"], f"agent-{name}")

        def ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=1).status == 200
            except OSError:
                return False
        wait_for(f"{name}: an agent connected", ready)
        self.via = ["--via", "connect-uds", "--proxy", self.proxy] if uds else \
            ["--via", "connect-tls", "--proxy", self.proxy, *CLIENT_TLS]

    def close(self):
        stop(self.agent)
        stop(self.server)


def start_squid():
    """squid with a plain HTTP port and a TLS one (https_port: the client
    speaks TLS to squid, as to our mTLS frontend); returns (process, port,
    TLS port). Debian's squid is built with GnuTLS, whose https_port cannot
    ask for client certificates: its TLS port authenticates the server
    only (which changes the handshake, not the cost per byte)."""
    d = tempfile.mkdtemp(prefix="squid-", dir=work)
    port, tls_port = free_port(), free_port()
    # squid drops to the proxy user: its own copy of the frontend's key.
    for src, name in ((f"{C}/frontend/issued/proxy-frontend.crt", "cert.pem"),
                      (f"{C}/frontend/private/proxy-frontend.key", "key.pem")):
        shutil.copy(src, os.path.join(d, name))
    with open(os.path.join(d, "squid.conf"), "w") as f:
        f.write(f"""http_port 127.0.0.1:{port}
https_port 127.0.0.1:{tls_port} tls-cert={d}/cert.pem tls-key={d}/key.pem
acl CONNECT method CONNECT
acl bench_dst dst 127.0.0.1
http_access allow CONNECT bench_dst
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
netdb_filename none
shutdown_lifetime 1 seconds
max_filedescriptors 65536
""")
    if os.getuid() == 0:
        for name in ("", "cert.pem", "key.pem"):
            shutil.chown(os.path.join(d, name), "proxy", "proxy")
    p = start(["squid", "-N", "-f", os.path.join(d, "squid.conf")], "squid")
    wait_for("squid", lambda: p.poll() is None and tcp_up(port) and tcp_up(tls_port))
    return p, port, tls_port


def start_socat(sink):
    port = free_port()
    p = start(["socat", "-b", "65536", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
               f"TCP:127.0.0.1:{sink}"], "socat")
    wait_for("socat", lambda: p.poll() is None and tcp_up(port))
    return p, port


# --- the rows ----------------------------------------------------------------

rows = []   # (scenario, ours, baseline, ratio, target, met)
notes = []  # printed under the table
raw = []    # (group, variant, [GB/s per repetition]), printed after the notes


def row(scenario, ours, baseline, ratio, target="", met=None):
    rows.append((scenario, ours, baseline, "" if ratio is None else f"{ratio:.2f}",
                 target, "" if met is None else ("yes" if met else "**no**")))


def gbs(r):
    return r["bytes"] / r["secs"] / 1e9


class Medians(dict):
    """{variant: median GB/s}, with every repetition's figure in `runs`."""

    def ratio(self, a, b):
        """The median of a/b over the repetitions: each pair ran back to back,
        so drift in the machine's load cancels out better than in a ratio of
        medians."""
        return statistics.median(x / y for x, y in zip(self.runs[a], self.runs[b]))


def cpu_secs(pid):
    """User plus system CPU seconds of a process (all its threads)."""
    fields = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(group, variants, reps, relays=None):
    """Medians of GB/s; each repetition runs every variant once. `relays`
    ({variant: [pid, ...]}): also the median CPU seconds per GiB moved that
    each of those processes spent, in m.cpu[variant]."""
    relays = relays or {}
    got = {k: [] for k in variants}
    cpu = {k: [] for k in relays}
    for i in range(reps):
        # Alternate the order, so that no variant always runs first.
        for k, args in (list(variants.items())[::-1] if i % 2 else variants.items()):
            before = [cpu_secs(p) for p in relays.get(k, [])]
            r = load(*args)
            got[k].append(gbs(r))
            if k in relays:
                cpu[k].append([(cpu_secs(p) - b) / (r["bytes"] / GiB) for p, b in zip(relays[k], before)])
            log(f"  {k} #{i + 1}: {got[k][-1]:.3f} GB/s")
    raw.extend((group, k, v) for k, v in got.items())
    m = Medians((k, statistics.median(v)) for k, v in got.items())
    m.runs = got
    m.cpu = {k: [statistics.median(rep[j] for rep in v) for j in range(len(relays[k]))] for k, v in cpu.items()}
    return m


def fmt_gbs(v):
    return f"{v:.2f} GB/s"


def squid_tls_via(port):
    """The load tool's way through squid's TLS port (the same client TLS
    setup as to our mTLS frontend; squid does not ask for the certificate)."""
    return ["--via", "connect-tls", "--proxy", f"127.0.0.1:{port}", *CLIENT_TLS]


def throughput(sink, squid, squid_tls, squid_pid, socat, uds, tls, grpc_uds, grpc_tls):
    target = ["--target", f"127.0.0.1:{sink}"]
    relays = {"squid": [squid_pid], "squid-tls": [squid_pid], "uds": [uds.server.pid, uds.agent.pid],
              "tls": [tls.server.pid, tls.agent.pid]}
    for conns, per, label in ((1, ONE_BYTES, f"1 connection, {ONE_BYTES // MiB} MiB"),
                              (16, PAR_BYTES, f"16 connections x {PAR_BYTES // MiB} MiB")):
        log(f"throughput: {label}")
        n = ["--conns", conns, "--bytes", per]
        r = "1" if conns == 1 else "2"
        v = interleaved(f"{r}. {label}", {
            "direct": ["send", "--via", "direct", *target, *n],
            "socat": ["send", "--via", "direct", "--target", f"127.0.0.1:{socat}", *n],
            "squid": ["send", "--via", "connect-tcp", "--proxy", f"127.0.0.1:{squid}", *target, *n],
            "squid-tls": ["send", *squid_tls_via(squid_tls), *target, *n],
            "uds": ["send", *uds.via, *target, *n],
            "tls": ["send", *tls.via, *target, *n],
        }, REPS, relays)
        row(f"{r}. Tunnel throughput, {label}: socat TCP relay (a user-space relay's limit)",
            "", f"direct {fmt_gbs(v['direct'])}; socat {fmt_gbs(v['socat'])}", v.ratio("socat", "direct"))
        row(f"{r}. ... squid HTTP CONNECT proxy", "", f"direct {fmt_gbs(v['direct'])}; squid {fmt_gbs(v['squid'])}",
            v.ratio("squid", "direct"))
        row(f"{r}. ... squid HTTP CONNECT proxy over TLS (https_port)", "",
            f"direct {fmt_gbs(v['direct'])}; squid TLS {fmt_gbs(v['squid-tls'])}", v.ratio("squid-tls", "direct"))
        for k, name in (("uds", "HTTP CONNECT over UDS (plain)"), ("tls", "HTTP CONNECT over mTLS TCP")):
            if conns == 1:
                row(f"1. ... ours, {name}, vs direct", fmt_gbs(v[k]), f"direct {fmt_gbs(v['direct'])}",
                    v.ratio(k, "direct"), ">= 0.40", v.ratio(k, "direct") >= 0.40)
            else:
                row(f"2. ... ours, {name}, vs direct", fmt_gbs(v[k]), f"direct {fmt_gbs(v['direct'])}",
                    v.ratio(k, "direct"))
            row(f"{r}. ... ours, {name}, vs squid", fmt_gbs(v[k]), f"squid {fmt_gbs(v['squid'])}",
                v.ratio(k, "squid"), ">= 1.00", v.ratio(k, "squid") >= 1)
        row(f"{r}. ... ours, HTTP CONNECT over mTLS TCP, vs squid over TLS (the same TLS work at the proxy)",
            fmt_gbs(v["tls"]), f"squid TLS {fmt_gbs(v['squid-tls'])}", v.ratio("tls", "squid-tls"), ">= 1.00",
            v.ratio("tls", "squid-tls") >= 1)
        for k, name, peer in (("uds", "HTTP CONNECT over UDS", "squid"),
                              ("tls", "HTTP CONNECT over mTLS TCP", "squid-tls")):
            server, agent = v.cpu[k]
            (sq,) = v.cpu[peer]
            row(f"{r}. ... CPU per GiB relayed, {name}: proxy-server; proxy-agent (each a relay hop, "
                f"the agent link TLS)", f"{server:.2f} s; {agent:.2f} s",
                f"{peer.replace('-tls', ' TLS')} {sq:.2f} s", max(server, agent) / sq)

    notes.append("Rows 1 and 2, CPU per GiB relayed: the CPU seconds each relay process spent per GiB it "
                 "moved (median over the repetitions; the ratio is our costlier hop against squid). Here all "
                 "four processes of a tunnel (client, proxy-server, proxy-agent, sink) share the machine's "
                 "cores, so a chain of two relays moves less than one relay does, however lean each hop is "
                 "(with two hops that each cost what squid costs, and a client and sink that together cost about "
                 "as much as one hop, about two thirds); in a cluster the server and the agent run on "
                 "different machines, and what each of them costs per byte is what limits a tunnel there.")
    log(f"throughput: gRPC, 1 stream, {ONE_BYTES // MiB} MiB")
    g = interleaved("3. gRPC", {
        "direct": ["send", "--via", "direct", *target, "--bytes", ONE_BYTES],
        "grpc-uds": ["grpc", "--proxy", grpc_uds.proxy, *target, "--bytes", ONE_BYTES],
        "grpc-tls": ["grpc", "--proxy", grpc_tls.proxy, *CLIENT_TLS, *target, "--bytes", ONE_BYTES],
    }, REPS, {"grpc-uds": [grpc_uds.server.pid, grpc_uds.agent.pid],
              "grpc-tls": [grpc_tls.server.pid, grpc_tls.agent.pid]})
    for k, name in (("grpc-uds", "over UDS (h2c)"), ("grpc-tls", "over mTLS TCP")):
        row(f"3. gRPC frontend throughput, 1 Proxy stream {name}, 32 KiB DATA packets, {ONE_BYTES // MiB} MiB",
            fmt_gbs(g[k]), f"direct {fmt_gbs(g['direct'])}", g.ratio(k, "direct"), ">= 0.35", g.ratio(k, "direct") >= 0.35)
    for k, name in (("grpc-uds", "over UDS (h2c)"), ("grpc-tls", "over mTLS TCP")):
        server, agent = g.cpu[k]
        row(f"3. ... CPU per GiB relayed {name}: proxy-server; proxy-agent", f"{server:.2f} s; {agent:.2f} s",
            "", None)


def latency(sink, squid, squid_tls, uds, tls, grpc_uds, grpc_tls):
    log(f"latency: {REPS} x {LAT_N} sequential tunnels per variant, interleaved")
    target = ["--target", f"127.0.0.1:{sink}", "--n", LAT_N]
    variants = {"squid": ["latency", "--via", "connect-tcp", "--proxy", f"127.0.0.1:{squid}"],
                "squid-tls": ["latency", *squid_tls_via(squid_tls)],
                "uds": ["latency", *uds.via], "tls": ["latency", *tls.via],
                "grpc-uds": ["grpc-latency", "--proxy", grpc_uds.proxy],
                "grpc-tls": ["grpc-latency", "--proxy", grpc_tls.proxy, *CLIENT_TLS]}
    runs = {k: [] for k in variants}
    for i in range(REPS):
        # Alternate the order, so that no variant always runs first.
        for k, via in (list(variants.items())[::-1] if i % 2 else variants.items()):
            runs[k].append(load(*via, *target))
            log(f"  {k} #{i + 1}: median {runs[k][-1]['median_us']:.1f} us")
    med = {k: statistics.median(r["median_us"] for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r["p99_us"] for r in v) for k, v in runs.items()}

    def pair(scenario, k, peer, target=None):
        name = peer.replace("-tls", " TLS")
        met = None if target is None else med[k] < med[peer]
        row(scenario, f"{med[k] / 1e3:.3f} ms", f"{name} {med[peer] / 1e3:.3f} ms", med[k] / med[peer], target or "", met)
        row("4. ... p99", f"{p99[k] / 1e3:.3f} ms", f"{name} {p99[peer] / 1e3:.3f} ms", p99[k] / p99[peer])

    for k, name in (("uds", "over UDS"), ("tls", "over mTLS TCP (after the handshake)")):
        pair(f"4. Dial latency, CONNECT to first answer byte, {name}: median of {LAT_N}", k, "squid", "< 1.00")
    pair("4. ... over mTLS TCP, vs squid over TLS (after the handshake): median", "tls", "squid-tls", "< 1.00")
    for k, name in (("grpc-uds", "over UDS (h2c)"), ("grpc-tls", "over mTLS TCP")):
        pair(f"4. ... gRPC frontend (kube-apiserver's path), DIAL_REQ to DIAL_RSP, {name}, new connection "
             f"each (not timed): median", k, "squid")
    notes.append(f"Row 4: {REPS} interleaved runs of {LAT_N} dials per variant; the figures are the medians of "
                 "the runs' medians and p99s. squid does not speak gRPC: the gRPC rows compare the same step "
                 "(asking for a tunnel until it is there) with squid's CONNECT, and have no target. Each run's "
                 "median (us), " + " / ".join(variants) + ": "
                 + ", ".join(" / ".join(f"{runs[k][i]['median_us']:.0f}" for k in variants)
                             for i in range(REPS)) + ".")


def head_of_line(sink, uds):
    log("head-of-line: 15 downloads, with and without a stalled tunnel")
    n = ["send", *uds.via, "--target", f"127.0.0.1:{sink}", "--conns", 15, "--bytes", HOL_BYTES, "--download"]
    v = interleaved("6. head-of-line", {"clean": n, "stalled": [*n, "--stalled", 1],
                                        "stalled-with": [*n, "--stalled", 1, "--stall-ms", 0]}, REPS)
    row(f"6. Head-of-line: 15 downloads of {HOL_BYTES // MiB} MiB (UDS) while a 16th tunnel's client stops reading",
        fmt_gbs(v["stalled"]), f"without it {fmt_gbs(v['clean'])}", v.ratio("stalled", "clean"), ">= 0.90",
        v.ratio("stalled", "clean") >= 0.90)
    row("6. ... the 16th tunnel opened with the 15 (its stall begins as they start)",
        fmt_gbs(v["stalled-with"]), f"without it {fmt_gbs(v['clean'])}", v.ratio("stalled-with", "clean"), ">= 0.90",
        v.ratio("stalled-with", "clean") >= 0.90)
    notes.append("Row 6: in the first row the stalled tunnel is opened 500 ms before the fifteen, so that its "
                 "stall is in place when they start (what upstream blocks behind for good); in the second it "
                 "is opened right before them, so the server's grace for it (SLOW_GRACE) falls inside their "
                 "transfer.")


def idle_run(n, squid=False, uds=True, mode="http-connect"):
    """n idle tunnels through a fresh proxy-server and proxy-agent (or a fresh squid)."""
    hold = start([LOAD, "sink", "--hold"], "hold", stdout=subprocess.PIPE)
    port = int(hold.stdout.readline())
    target = ["--target", f"127.0.0.1:{port}", "--n", n]
    try:
        if squid:
            p, sport, _ = start_squid()
            try:
                return load("idle", "--via", "connect-tcp", "--proxy", f"127.0.0.1:{sport}", *target,
                            "--pids", p.pid)
            finally:
                stop(p)
        t = Tunnel(mode, uds=uds)
        via = ["--via", "grpc", "--proxy", t.proxy] if mode == "grpc" else t.via
        try:
            return load("idle", *via, *target, "--pids", f"{t.server.pid},{t.agent.pid}")
        finally:
            t.close()
    finally:
        stop(hold)


def idle():
    # Each idle tunnel costs threads today: make room for them (restored at the end).
    sysctl_set("/proc/sys/kernel/pid_max", 4 * IDLE_N + 65536)
    sysctl_set("/proc/sys/kernel/threads-max", 8 * IDLE_N + 65536)
    sysctl_set("/proc/sys/vm/max_map_count", 16 * IDLE_N + 65530)
    # Descriptors: every process here inherits our limit, raised to its hard
    # maximum in main(); without CAP_SYS_RESOURCE that maximum may be too low
    # for IDLE_N tunnels, so measure the cost per tunnel first and hold as
    # many as fit (RSS per tunnel is what the row reports).
    probe = idle_run(200)
    per_fd = max((p["fds"] - p["fds_before"]) / 200 for p in probe["procs"])
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fit = lambda per: min(IDLE_N, int((limit - 1000) / max(per, 1.0)) // 100 * 100)
    n = fit(per_fd)
    if n < IDLE_N:
        notes.append(f"Row 5: {IDLE_N} idle tunnels do not fit here: proxy-server uses {per_fd:.0f} descriptors "
                     f"per tunnel, the open-file limit is {limit}, and the harness lacks CAP_SYS_RESOURCE to "
                     f"raise it; it holds {n} and reports the cost per tunnel.")
    log(f"idle: {n} tunnels ({per_fd:.1f} descriptors per tunnel, limit {limit})")
    r = idle_run(n)
    log(f"idle: {n} tunnels over mTLS TCP")
    tls = idle_run(n, uds=False)["procs"][0]
    # squid holds two descriptors per tunnel (client and server side).
    n_sq = fit(2.0)
    if n_sq < n:
        notes.append(f"Row 5: squid holds two descriptors per tunnel, so under the open-file limit of {limit} "
                     f"it holds {n_sq} idle tunnels (ours {n}); the figures compared are per tunnel.")
    log(f"idle: {n_sq} tunnels through squid")
    sq = idle_run(n_sq, squid=True)["procs"][0]
    sq_per = (sq["rss_kib"] - sq["rss_kib_before"]) / n_sq
    for p, name in zip(r["procs"], ("proxy-server", "proxy-agent")):
        per = (p["rss_kib"] - p["rss_kib_before"]) / n
        row(f"5. Scale: {n} idle tunnels (UDS), {name} RSS per tunnel", f"{per:.1f} KiB",
            f"squid {sq_per:.1f} KiB", per / sq_per if sq_per > 0 else None, "< 20 KiB", per < 20)
        row(f"5. ... {name} threads; descriptors", f"{p['threads_before']} -> {p['threads']}; "
            f"{p['fds_before']} -> {p['fds']}", f"squid {sq['threads_before']} -> {sq['threads']}; "
            f"{sq['fds_before']} -> {sq['fds']}", None,
            f"(ours: {(p['threads'] - p['threads_before']) / n:.2f} threads, "
            f"{(p['fds'] - p['fds_before']) / n:.2f} descriptors per tunnel)")
    per = (tls["rss_kib"] - tls["rss_kib_before"]) / n
    row(f"5. ... proxy-server RSS per tunnel over mTLS TCP (each client's TLS handshake on its tunnel's thread)",
        f"{per:.1f} KiB", f"squid {sq_per:.1f} KiB (plain)", per / sq_per if sq_per > 0 else None, "", None)
    # kube-apiserver's path: an HTTP/2 connection and a Proxy call per
    # tunnel (the load tool holds two threads per connection, so fewer).
    m = min(n, IDLE_GRPC_N)
    log(f"idle: {m} tunnels through the gRPC frontend")
    g = idle_run(m, mode="grpc")["procs"][0]
    per = (g["rss_kib"] - g["rss_kib_before"]) / m
    row(f"5. ... gRPC frontend (UDS, a connection per tunnel, as kube-apiserver): {m} idle tunnels, "
        f"proxy-server RSS per tunnel; threads per tunnel", f"{per:.1f} KiB; "
        f"{(g['threads'] - g['threads_before']) / m:.2f}", f"squid {sq_per:.1f} KiB (CONNECT)",
        per / sq_per if sq_per > 0 else None, "< 20 KiB", per < 20)


WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
"""


def wrk(url, body):
    script = os.path.join(work, "post.lua")
    open(script, "w").write(WRK_LUA)
    r = subprocess.run(["wrk", "-t2", "-c50", f"-d{WRK_SECS}s", "--latency", "-s", script, url],
                       capture_output=True, text=True, env={**os.environ, "BENCH_BODY": body}, timeout=WRK_SECS + 60)
    out = r.stdout
    if r.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {url}: {out} {r.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    v, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()
    p99_ms = float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    return rps, p99_ms


def webhook():
    log("webhook: wrk -t2 -c50, keep-alive TLS")
    d = os.path.join(work, "webhook")
    os.makedirs(d)
    shutil.copy(f"{C}/frontend/issued/proxy-frontend.crt", f"{d}/tls.crt")
    shutil.copy(f"{C}/frontend/private/proxy-frontend.key", f"{d}/tls.key")
    body = os.path.join(REPO, "tests/data/pod-4k.json")
    wh = start([f"{REL}/apiserver-proxy-pod-webhook", "--apiserver-fqdn=apiserver.example.com",
                f"--cert-dir={d}", "--host=127.0.0.1", "--port=0"], "webhook")

    def addr():
        m = re.search(r"listening on https://(\S+)", read(wh.errlog))
        return m and m.group(1)
    url = f"https://{wait_for('webhook', addr)}/webhook/pod-apiserver-env"
    answer = subprocess.run(["curl", "-sk", "--fail", "-H", "Content-Type: application/json",
                             "--data-binary", f"@{body}", url], capture_output=True, check=True).stdout
    # nginx: the same answer, as a fixed string, over TLS with the same key.
    literal = answer.decode().replace("\\", "\\\\").replace("'", "\\'")
    if "$" in literal:
        raise RuntimeError("our answer has a '$': nginx would read it as a variable")
    port = free_port()
    conf = os.path.join(d, "nginx.conf")
    open(conf, "w").write(f"""worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/tls.crt;
    ssl_certificate_key {d}/tls.key;
    location / {{
      default_type application/json;
      return 200 '{literal}';
    }}
  }}
}}
""")
    try:
        ng = start(["nginx", "-c", conf, "-p", d], "nginx")
        wait_for("nginx", lambda: ng.poll() is None and tcp_up(port))
        check = subprocess.run(["curl", "-sk", "--fail", "--data-binary", f"@{body}",
                                f"https://127.0.0.1:{port}/webhook/pod-apiserver-env"],
                               capture_output=True, check=True).stdout
        if check != answer:
            raise RuntimeError(f"nginx answers {len(check)} bytes, not our {len(answer)}")
        # Both serve at once; the runs alternate, as for throughput, so a
        # burst of load elsewhere on the machine hits both.
        nginx_url = f"https://127.0.0.1:{port}/webhook/pod-apiserver-env"
        runs = []
        for rep in range(REPS):
            pair = {}
            for who in (("ours", "nginx") if rep % 2 == 0 else ("nginx", "ours")):
                pair[who] = wrk(url if who == "ours" else nginx_url, body)
            runs.append((pair["ours"], pair["nginx"]))
        stop(ng)
    finally:
        stop(wh)
    med = lambda xs: statistics.median(xs)
    ours = (med(o[0] for o, _ in runs), med(o[1] for o, _ in runs))
    theirs = (med(t[0] for _, t in runs), med(t[1] for _, t in runs))
    ratio = med(o[0] / t[0] for o, t in runs)
    row(f"7. Webhook: reviews/s, 4 KiB pod, TLS keep-alive, wrk -t2 -c50 {WRK_SECS}s (answer {len(answer)} B)",
        f"{ours[0]:.0f}/s", f"nginx static {theirs[0]:.0f}/s", ratio, ">= 0.50", ratio >= 0.5)
    row("7. ... p99 latency", f"{ours[1]:.2f} ms", f"nginx {theirs[1]:.2f} ms", ours[1] / theirs[1])
    notes.append("Row 7, each repetition (reviews/s, ours / nginx): "
                 + ", ".join(f"{o[0]:.0f} / {t[0]:.0f}" for o, t in runs) + ".")


def sidecar():
    log(f"sidecar: 20 repairs, RSS after {SIDECAR_RSS_AFTER}s")
    env = {**os.environ, "RELEASE_DIR": REL, "RSS_AFTER": str(SIDECAR_RSS_AFTER)}
    # Its namespace is apxbench-<its pid>; the script deletes it on exit, and
    # so does our clean-up if the script was killed first.
    path = os.path.join(work, "sidecar.log")
    with open(path, "ab") as out:
        p = subprocess.Popen([os.path.join(REPO, "scripts/bench-sidecar.sh")], stdout=out,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    p.name, p.errlog = "bench-sidecar.sh", path
    procs.append(p)
    netns.append(f"apxbench-{p.pid}")
    rc = p.wait(SIDECAR_RSS_AFTER + 120)
    text = read(path)
    if rc != 0:
        raise RuntimeError(f"bench-sidecar.sh: {text}")
    med, mx = map(float, re.search(r"median ([\d.]+) ms, max ([\d.]+) ms", text).groups())
    rss = int(re.search(r"RSS after \d+s: (\d+) kB", text).group(1))
    row("8. Sidecar: `ip addr del` to the address back (netns), median of 20", f"{med:.2f} ms",
        f"max {mx:.2f} ms", None, "< 50 ms", med < 50)
    row(f"8. ... sidecar RSS after {SIDECAR_RSS_AFTER}s", f"{rss / 1024:.2f} MiB", "", None, "< 4 MiB", rss < 4096)


def sizes():
    for b in BINARIES:
        path = os.path.join(REL, b)
        size = os.path.getsize(path)
        root = os.path.join(work, "image-" + b)
        os.makedirs(root)
        shutil.copy2(path, os.path.join(root, b))
        os.symlink(b, os.path.join(root, "entrypoint"))
        tar = subprocess.run(["tar", "-C", root, "--owner=0", "--group=0", "-cf", "-", "."],
                             capture_output=True, check=True).stdout
        row(f"9. Size: {b} (stripped, static)", f"{size / MiB:.2f} MiB",
            f"scratch image (tar of its root) {len(tar) / MiB:.2f} MiB", None, "< 3 MiB", size < 3 * MiB)


def commit():
    c = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD")
    # The table this run replaces does not count as a change to what runs.
    changed = [line for line in sh("git", "-C", REPO, "status", "--porcelain", "--untracked-files=no").splitlines()
               if not line.endswith("bench/RESULTS.md")]
    if changed:
        c += " (with uncommitted changes)"
    return c


def environment(commit):
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    versions = "; ".join(x for x in (
        sh("squid", "-v").splitlines()[0] if shutil.which("squid") else "",
        subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        sh("socat", "-V").splitlines()[1] if shutil.which("socat") else "",
        sh("wrk", "-v").splitlines()[0] if shutil.which("wrk") else "") if x)
    return (f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- Machine: `nproc` = {os.cpu_count()}, {cpu.group(1) if cpu else 'unknown CPU'}, "
            f"kernel {os.uname().release}\n"
            f"- Commit: {commit}, as the run began\n"
            f"- Peers: {versions}\n"
            f"- Run: {'BENCH_QUICK=1 ' if QUICK else ''}make bench "
            f"({REPS} interleaved repetition(s) per throughput figure, median)\n")


notes.append("Rows 1 and 2 have no plain-TCP HTTP CONNECT variant: like upstream, proxy-server's TCP "
             "frontend requires mTLS (plaintext only over its Unix socket).")


def table():
    head = ["Scenario", "Ours", "Baseline", "Ratio", "Target", "Met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    if raw:
        text += "\nEach repetition, in GB/s (how noisy the run was):\n\n"
        text += "".join(f"- {g}, {k}: {', '.join(f'{x:.3f}' for x in v)}\n" for g, k, v in raw)
    return text


def main():
    if os.getuid() != 0:
        sys.exit("make bench runs as root (network namespaces for the sidecar, sysctls for idle tunnels)")
    for tool in (LOAD, f"{REL}/proxy-server"):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} is missing: run `make bench`")
    # Room for 10,000 tunnels: the processes we start inherit the limit.
    # (Raised to the hard limit: 10,000 tunnels need about 10,000 descriptors in
    # each of the holder, the client, proxy-server and proxy-agent.)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    began, began_at = time.monotonic(), commit()
    subprocess.run([os.path.join(REPO, "scripts/make-certs.sh"), C], check=True, stdout=subprocess.DEVNULL)
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
    want = lambda name: not only or name in only
    if want("size"):
        sizes()
    tunnels = []
    if only & {"throughput", "latency", "hol"} or not only:
        sink_p = start([LOAD, "sink"], "sink", stdout=subprocess.PIPE)
        sink = int(sink_p.stdout.readline())
        squid_p, squid, squid_tls = start_squid()
        _, socat = start_socat(sink)
        tunnels = uds, tls, grpc_uds, grpc_tls = (Tunnel("http-connect", True), Tunnel("http-connect", False),
                                                  Tunnel("grpc", True), Tunnel("grpc", False))
    if want("throughput"):
        throughput(sink, squid, squid_tls, squid_p.pid, socat, uds, tls, grpc_uds, grpc_tls)
    if want("latency"):
        latency(sink, squid, squid_tls, uds, tls, grpc_uds, grpc_tls)
    if want("hol"):
        head_of_line(sink, uds)
    for t in tunnels:
        t.close()
    # The idle row goes last: tearing down ~20,000 threads and sockets
    # keeps the kernel busy for a while after its processes have exited,
    # which showed up as a webhook p99 of half a second when it ran first.
    if want("webhook"):
        webhook()
    if want("sidecar"):
        sidecar()
    if want("idle"):
        idle()
    rows.sort(key=lambda r: int(r[0].split(".")[0]))
    text = (f"# Benchmark results\n\nWritten by `make bench` (bench/bench.py); how to read it: "
            f"README.md, section Benchmarks.\n\n{environment(began_at)}- Took: {time.monotonic() - began:.0f} s\n\n"
            f"{table()}")
    print(text)
    if OUT:
        open(OUT, "w").write(text)
        log(f"written to {OUT}")


if __name__ == "__main__":
    # SIGTERM (a CI timeout, `kill`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except BaseException:
        # What the processes said, for the failure's cause.
        for name in sorted(os.listdir(work)):
            if name.endswith(".log"):
                tail = open(os.path.join(work, name), errors="replace").read().splitlines()[-5:]
                if tail:
                    print(f"--- {name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        for p in reversed(list(procs)):
            stop(p)
        for ns in netns:
            if os.path.exists(f"/run/netns/{ns}"):
                subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        for path, old in reversed(restore):
            with open(path, "w") as f:
                f.write(old)
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
