#!/usr/bin/env bash
# Measures apiserver-proxy-sidecar: time from `ip addr del` to the address
# being back (median and max of 20, from the kernel's own event timestamps
# via `ip -ts monitor`), the daemon's RSS after RSS_AFTER seconds (default
# 60), and the stripped binary size. Root only; cleans up its namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE_DIR=${RELEASE_DIR:-target/x86_64-unknown-linux-musl/release}
SIDECAR=$RELEASE_DIR/apiserver-proxy-sidecar
RSS_AFTER=${RSS_AFTER:-60}
NS=apxbench-$$
LOG=$(mktemp)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -f "$LOG"
}
trap cleanup EXIT
has_addr() { ip netns exec "$NS" ip -o addr show dev lo | grep -q ' 10.96.0.2/32 '; }
wait_addr() { for _ in $(seq 1000); do has_addr && return 0; sleep 0.005; done; echo "address never came back" >&2; exit 1; }

ip netns add "$NS"
ip netns exec "$NS" "$SIDECAR" --ip-address=10.96.0.2 --sync-interval=1h 2>/dev/null &
SIDECAR_PID=$!; PIDS+=("$SIDECAR_PID")
wait_addr
ip netns exec "$NS" ip -ts monitor address >"$LOG" &
PIDS+=("$!")
sleep 0.2 # let the monitor subscribe; it has no readiness signal
for _ in $(seq 20); do
  ip netns exec "$NS" ip addr del 10.96.0.2/32 dev lo
  wait_addr
done
sleep 0.2
python3 - "$LOG" <<'PY'
import re, statistics, sys
from datetime import datetime
deleted, gaps = None, []
for line in open(sys.argv[1]):
    m = re.match(r'\[(\S+)\] (Deleted )?\d+: lo\s+inet 10\.96\.0\.2/32', line)
    if not m:
        continue
    t = datetime.fromisoformat(m.group(1))
    if m.group(2):
        deleted = t
    elif deleted is not None:
        gaps.append((t - deleted).total_seconds() * 1000)
        deleted = None
print(f"repair after ip addr del: median {statistics.median(gaps):.3f} ms, max {max(gaps):.3f} ms over {len(gaps)} deletions")
PY
sleep "$RSS_AFTER"
echo "RSS after ${RSS_AFTER}s: $(awk '/VmRSS/ {print $2, $3}' /proc/$SIDECAR_PID/status)"
echo "binary: $(stat -c %s "$SIDECAR") bytes ($(file -b "$SIDECAR" | cut -d, -f4 | xargs))"
