#!/bin/bash
# usage: unshare -n soak/self_connect.sh BINDIR (as root; a throwaway network namespace) — in a fresh netns whose only ephemeral port is 40000,
# a CONNECT to 127.0.0.1:40000 (nothing listens) must be refused, not connected to itself.
set -e
B=$1; W=$(mktemp -d)
ip link set lo up
"$(dirname "$0")"/../scripts/make-certs.sh $W/c >/dev/null
C=$W/c
$B/proxy-server --mode=http-connect --uds-name=$W/s.sock --server-port=0 --agent-port=0 --health-port=0 --admin-port=0 \
  --cluster-cert=$C/agent/issued/proxy-frontend.crt --cluster-key=$C/agent/private/proxy-frontend.key \
  --cluster-ca-cert=$C/agent/issued/ca.crt --agent-bind-address=127.0.0.1 2>$W/server.log &
for i in $(seq 100); do grep -q 'agent port listening' $W/server.log && break; sleep 0.1; done
AP=$(grep -o 'agent port listening on [0-9.]*:[0-9]*' $W/server.log | sed 's/.*://')
sysctl -qw net.ipv4.ip_local_port_range="40000 40000"
$B/proxy-agent --ca-cert=$C/agent/issued/ca.crt --agent-cert=$C/agent/issued/proxy-agent.crt \
  --agent-key=$C/agent/private/proxy-agent.key --proxy-server-host=127.0.0.1 --proxy-server-port=$AP \
  --health-server-port=20001 --admin-server-port=20002 2>$W/agent.log &
for i in $(seq 100); do grep -q 'agent .* connected' $W/server.log && break; sleep 0.1; done
python3 -c "
import socket
s=socket.socket(socket.AF_UNIX); s.connect('$W/s.sock'); s.sendall(b'CONNECT 127.0.0.1:40000 HTTP/1.1\r\n\r\n')
print('answer:', s.recv(200).split(b'\r\n')[0].decode())"
kill %1 %2; wait 2>/dev/null; for f in $W/server.log $W/agent.log; do tail -n 4 $f; done; rm -rf $W
