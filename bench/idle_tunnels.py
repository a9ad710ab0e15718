#!/usr/bin/env python3
"""Idle tunnels: RSS and threads per tunnel of proxy-server and proxy-agent.

Usage: bench/idle_tunnels.py N   (after `make build`; raise `ulimit -n` for large N)
Holds N idle HTTP CONNECT tunnels over the Unix-socket frontend and prints
the growth of RSS and thread count of both processes; stops what it started.
"""
import re, socket, subprocess, sys, tempfile, threading, time

REL="target/x86_64-unknown-linux-musl/release"; N=int(sys.argv[1])
work=tempfile.mkdtemp(); procs=[]
subprocess.run(["scripts/make-certs.sh", work+"/c"], check=True, stdout=subprocess.DEVNULL)
C=work+"/c"
def start(a):
    log=open(work+f"/{len(procs)}.log","w+"); p=subprocess.Popen(a,stdout=subprocess.DEVNULL,stderr=log); procs.append(p); return log,p
def port(log,what):
    for _ in range(500):
        log.seek(0); m=re.search(re.escape(what)+r" listening on \S*:(\d+)",log.read())
        if m: return int(m.group(1))
        time.sleep(0.01)
cl=[f"--cluster-cert={C}/agent/issued/proxy-frontend.crt",f"--cluster-key={C}/agent/private/proxy-frontend.key",f"--cluster-ca-cert={C}/agent/issued/ca.crt","--agent-port=0","--health-port=0","--admin-port=0"]
uds=work+"/k.sock"
slog,sp=start([REL+"/proxy-server","--mode=http-connect","--uds-name="+uds,"--server-port=0"]+cl)
alog,ap=start([REL+"/proxy-agent",f"--ca-cert={C}/agent/issued/ca.crt",f"--agent-cert={C}/agent/issued/proxy-agent.crt",f"--agent-key={C}/agent/private/proxy-agent.key",f"--proxy-server-port={port(slog,'agent port')}","--health-server-port=0","--admin-server-port=0"])
time.sleep(1.5)
srv=socket.socket(); srv.bind(("127.0.0.1",0)); srv.listen(4096); dport=srv.getsockname()[1]
held=[]
threading.Thread(target=lambda: [held.append(srv.accept()[0]) for _ in range(N)], daemon=True).start()
def rss(p):
    st=open(f"/proc/{p.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)",st).group(1)), int(re.search(r"Threads:\s+(\d+)",st).group(1))
base_s, base_a = rss(sp), rss(ap)
clients=[]
for i in range(N):
    s=socket.socket(socket.AF_UNIX); s.connect(uds); s.sendall(f"CONNECT 127.0.0.1:{dport} HTTP/1.1\r\n\r\n".encode())
    assert s.recv(64).startswith(b"HTTP/1.1 200"); clients.append(s)
time.sleep(1)
s_, a_ = rss(sp), rss(ap)
print(f"{N} idle tunnels: server RSS {base_s[0]}->{s_[0]} kB ({(s_[0]-base_s[0])/N:.1f} kB/tunnel), threads {base_s[1]}->{s_[1]}; agent RSS {base_a[0]}->{a_[0]} kB ({(a_[0]-base_a[0])/N:.1f} kB/tunnel), threads {base_a[1]}->{a_[1]}")
for p in procs: p.terminate()
for p in procs: p.wait(10)
subprocess.run(["rm","-rf",work])
