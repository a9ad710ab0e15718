#!/usr/bin/env bash
# `make demo`: runs the binaries locally, in throw-away network namespaces,
# and shows what they do. Needs root (network namespaces, iptables).
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE_DIR=${RELEASE_DIR:-target/x86_64-unknown-linux-musl/release}
SIDECAR=$RELEASE_DIR/apiserver-proxy-sidecar
NS=apxdemo-$$
PID=

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

# wait_for DESCRIPTION COMMAND...: polls COMMAND for up to 5 s.
wait_for() {
  local what=$1; shift
  for _ in $(seq 500); do "$@" >/dev/null 2>&1 && return 0; sleep 0.01; done
  echo "timed out waiting for $what" >&2; return 1
}
has_addr() { ip netns exec "$NS" ip -o addr show dev lo | grep -q " $1 "; }

step "apiserver-proxy-sidecar in network namespace $NS"
ip netns add "$NS"
ip netns exec "$NS" "$SIDECAR" --ip-address=10.96.0.2 --kubernetes-service-ip-address=10.96.0.1 \
  --port=443 --setup-iptables --cleanup &
PID=$!
wait_for "the addresses" has_addr 10.96.0.2/32
rule_count() { ip netns exec "$NS" iptables-save | grep -c -- '^-A' || true; }
five_rules() { [ "$(rule_count)" -eq 5 ]; }
wait_for "the five rules" five_rules

step "addresses on lo"
ip netns exec "$NS" ip -brief addr show dev lo
step "iptables rules (raw and filter)"
ip netns exec "$NS" iptables-save -t raw | grep -- '^-A' || true
ip netns exec "$NS" iptables-save -t filter | grep -- '^-A' || true

step "deleting 10.96.0.2/32: the sidecar puts it back (netlink event, not the 1m poll)"
start=$(date +%s%N)
ip netns exec "$NS" ip addr del 10.96.0.2/32 dev lo
wait_for "the address to come back" has_addr 10.96.0.2/32
echo "back after $(( ($(date +%s%N) - start) / 1000 )) µs (including this script's polling)"
ip netns exec "$NS" ip -brief addr show dev lo

step "SIGTERM with --cleanup: what the sidecar added goes away"
kill -TERM "$PID"; wait "$PID"; PID=
ip netns exec "$NS" ip -brief addr show dev lo
echo "rules left: $(ip netns exec "$NS" iptables-save | grep -c -- '^-A' || true)"

for extra in scripts/demo-webhook.sh scripts/demo-tunnel.sh; do
  if [ -x "$extra" ]; then RELEASE_DIR=$RELEASE_DIR "$extra"; fi
done
