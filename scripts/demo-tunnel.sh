#!/usr/bin/env bash
# Demo of the Konnectivity binaries, as in upstream's README: certificates
# in upstream's layout (scripts/make-certs.sh), http-test-server as the
# destination, proxy-server (gRPC frontend on a Unix socket, as
# kube-apiserver uses it, and an HTTP CONNECT frontend with mTLS), two
# proxy-agents, requests through proxy-test-client and curl, an agent
# drained with SIGTERM, the metrics. All on loopback, ports chosen by the
# kernel.
#   RELEASE_DIR=target/x86_64-unknown-linux-musl/release scripts/demo-tunnel.sh
set -euo pipefail

RELEASE_DIR=${RELEASE_DIR:?set RELEASE_DIR to the directory of the release binaries}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/tunnel-demo.XXXXXX)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# start NAME BINARY ARGS...: runs it in the background, stderr to $WORK/NAME.log.
start() {
  local name=$1 bin=$2; shift 2
  "$RELEASE_DIR/$bin" "$@" 2>"$WORK/$name.log" &
  PIDS+=("$!")
}

# port_of NAME WHAT: the port NAME logged as "WHAT listening on ADDR".
port_of() {
  for _ in $(seq 500); do
    local line
    line=$(grep -m1 "$2 listening on" "$WORK/$1.log" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "${line##*:}" | awk '{print $1}'; return 0; fi
    sleep 0.01
  done
  echo "no '$2 listening on' in $WORK/$1.log" >&2; cat "$WORK/$1.log" >&2; return 1
}

wait_for_log() {
  for _ in $(seq 500); do grep -q "$2" "$WORK/$1.log" 2>/dev/null && return 0; sleep 0.01; done
  echo "no '$2' in $WORK/$1.log" >&2; return 1
}

step "certificates in upstream's layout (make certs)"
"$REPO/scripts/make-certs.sh" "$WORK/certs" >/dev/null
C=$WORK/certs
(cd "$C" && find . -type f | sort | sed 's/^\.\//  /')

step "http-test-server (the destination)"
start dest http-test-server --server-port=0
DEST=$(port_of dest http-test-server)
echo "http-test-server on 127.0.0.1:$DEST"

CLUSTER=(--cluster-cert="$C/agent/issued/proxy-frontend.crt" --cluster-key="$C/agent/private/proxy-frontend.key"
  --cluster-ca-cert="$C/agent/issued/ca.crt" --agent-port=0 --health-port=0 --admin-port=0
  --agent-bind-address=127.0.0.1 --health-bind-address=127.0.0.1)

step "proxy-server, gRPC frontend on a Unix socket (kube-apiserver's mode)"
start grpc-server proxy-server --uds-name="$WORK/konnectivity.sock" --server-port=0 "${CLUSTER[@]}"
GRPC_AGENT_PORT=$(port_of grpc-server "agent port")
GRPC_HEALTH=$(port_of grpc-server "health port")
echo "readyz before any agent: $(curl -s -w ' (%{http_code})' "http://127.0.0.1:$GRPC_HEALTH/readyz")"

step "proxy-server, HTTP CONNECT frontend over mTLS"
start connect-server proxy-server --mode=http-connect --server-port=0 --server-bind-address=127.0.0.1 \
  --server-ca-cert="$C/frontend/issued/ca.crt" --server-cert="$C/frontend/issued/proxy-frontend.crt" \
  --server-key="$C/frontend/private/proxy-frontend.key" "${CLUSTER[@]}"
CONNECT_AGENT_PORT=$(port_of connect-server "agent port")
CONNECT_PORT=$(port_of connect-server "frontend (http-connect)")

AGENT=(--ca-cert="$C/agent/issued/ca.crt" --agent-cert="$C/agent/issued/proxy-agent.crt"
  --agent-key="$C/agent/private/proxy-agent.key" --health-server-port=0 --admin-server-port=0)
step "two proxy-agents dial back"
start agent1 proxy-agent "${AGENT[@]}" --proxy-server-port="$GRPC_AGENT_PORT" --agent-id=agent-1
start agent2 proxy-agent "${AGENT[@]}" --proxy-server-port="$CONNECT_AGENT_PORT" --agent-id=agent-2
wait_for_log agent1 "connected to server"
wait_for_log agent2 "connected to server"
grep -h "connected" "$WORK/grpc-server.log" "$WORK/connect-server.log" | sed 's/^\[[^]]*\] /  /'
echo "readyz now: $(curl -s -w ' (%{http_code})' "http://127.0.0.1:$GRPC_HEALTH/readyz")"

step "proxy-test-client --mode=grpc over the Unix socket: 3 requests"
"$RELEASE_DIR/proxy-test-client" --proxy-port=0 --proxy-uds="$WORK/konnectivity.sock" --proxy-host="" \
  --request-port="$DEST" --test-requests=3 | grep -c "The success test page" | sed 's/$/ success pages/'

step "curl through the HTTP CONNECT frontend with a client certificate (upstream's example)"
curl -s -p --proxy-key "$C/frontend/private/proxy-client.key" --proxy-cert "$C/frontend/issued/proxy-client.crt" \
  --proxy-cacert "$C/frontend/issued/ca.crt" -x "https://127.0.0.1:$CONNECT_PORT" "http://localhost:$DEST/success"
echo
step "the same without a client certificate: refused"
curl -s -p --proxy-cacert "$C/frontend/issued/ca.crt" -x "https://127.0.0.1:$CONNECT_PORT" \
  "http://localhost:$DEST/success" || echo "curl exit code $? (TLS handshake refused)"

step "a destination that refuses: 502 with the agent's error"
curl -s -o /dev/null -w 'CONNECT answered %{http_connect}\n' -p --proxy-key "$C/frontend/private/proxy-client.key" \
  --proxy-cert "$C/frontend/issued/proxy-client.crt" --proxy-cacert "$C/frontend/issued/ca.crt" \
  -x "https://127.0.0.1:$CONNECT_PORT" "http://127.0.0.1:1/" || true

step "SIGTERM to agent-1: it sends DRAIN and leaves"
kill -TERM "${PIDS[3]}"; wait "${PIDS[3]}" || true
wait_for_log grpc-server "is draining"
grep -h "draining\|disconnected" "$WORK/grpc-server.log" | sed 's/^\[[^]]*\] /  /'
echo "readyz: $(curl -s -w ' (%{http_code})' "http://127.0.0.1:$GRPC_HEALTH/readyz")"

step "metrics of the gRPC server (upstream names)"
curl -s "http://127.0.0.1:$GRPC_HEALTH/metrics" | grep -E '^konnectivity_network_proxy_server_(dial_duration_seconds_count|established_connections|pending_backend_dials|ready_backends|grpc_connections)'
