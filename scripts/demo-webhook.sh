#!/usr/bin/env bash
# Demo of apiserver-proxy-pod-webhook: fresh certificates (openssl), the
# webhook on 127.0.0.1, upstream's sample review through curl | jq | base64,
# a certificate rotation without restart, and the metrics.
#   RELEASE_DIR=target/x86_64-unknown-linux-musl/release scripts/demo-webhook.sh
set -euo pipefail

RELEASE_DIR=${RELEASE_DIR:?set RELEASE_DIR to the directory of the release binaries}
BIN=$RELEASE_DIR/apiserver-proxy-pod-webhook
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/webhook-demo.XXXXXX)
PID=""

cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# make_cert NAME SERIAL: an EC P-256 server certificate for localhost/127.0.0.1.
make_cert() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/$1.key" 2>/dev/null
  openssl req -new -key "$WORK/$1.key" -subj "/CN=localhost" -out "$WORK/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$WORK/$1.ext"
  openssl x509 -req -in "$WORK/$1.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
    -set_serial "$2" -days 1 -extfile "$WORK/$1.ext" -out "$WORK/$1.crt" 2>/dev/null
}

step "certificates (openssl): a CA and a server certificate with serial 0x01"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/ca.key" -out "$WORK/ca.crt" \
  -subj "/CN=demo CA" -days 1 2>/dev/null
make_cert first 0x01
make_cert second 0x02
mkdir "$WORK/certs"
cp "$WORK/first.crt" "$WORK/certs/tls.crt"
cp "$WORK/first.key" "$WORK/certs/tls.key"
ls -l "$WORK/certs"

step "start the webhook on 127.0.0.1 (port 0: any free port)"
"$BIN" --apiserver-fqdn=foo.bar. --cert-dir "$WORK/certs" --host 127.0.0.1 --port 0 \
  2> >(tee "$WORK/webhook.log" >&2) &
PID=$!
for _ in $(seq 100); do
  grep -q 'listening on https://' "$WORK/webhook.log" 2>/dev/null && break
  sleep 0.1
done
ADDR=$(grep -o 'listening on https://[^ ]*' "$WORK/webhook.log" | head -1 | sed 's|.*https://||')
[ -n "$ADDR" ] || { echo "the webhook did not start" >&2; exit 1; }
PORT=${ADDR##*:}
URL=https://localhost:$PORT
CURL=(curl --silent --show-error --cacert "$WORK/ca.crt" --resolve "localhost:$PORT:127.0.0.1")

step "upstream's example review: the patch (curl | jq -r .response.patch | base64 -d | jq)"
echo "curl -XPOST -H 'Content-Type: application/json' -d @tests/data/admission.json $URL/webhook/pod-apiserver-env"
"${CURL[@]}" -XPOST -H "Content-Type: application/json" -H "Accept: application/json" \
  -d "@$REPO/tests/data/admission.json" "$URL/webhook/pod-apiserver-env" \
  | jq -r '.response.patch' | base64 -d | jq .

step "the whole answer for a pod that already has the variable: no patch"
jq '.request.object.spec = {containers: [.request.object.spec.containers[1]]}' \
  "$REPO/tests/data/admission.json" \
  | "${CURL[@]}" -XPOST -H "Content-Type: application/json" --data-binary @- \
    "$URL/webhook/pod-apiserver-env" | jq .

step "hostile input: wrong content type, wrong method, malformed JSON"
printf 'text/plain -> '; "${CURL[@]}" -o /dev/null -w '%{http_code}\n' -H 'Content-Type: text/plain' \
  -d '{}' "$URL/webhook/pod-apiserver-env"
printf 'GET        -> '; "${CURL[@]}" -o /dev/null -w '%{http_code}\n' "$URL/webhook/pod-apiserver-env"
printf 'bad JSON   -> '; "${CURL[@]}" -w ' %{http_code}\n' -H 'Content-Type: application/json' \
  -d '{"apiVersion":' "$URL/webhook/pod-apiserver-env"

step "rotate the certificate on disk: new connections see serial 0x02, no restart"
echo -n "before: "; openssl s_client -connect "127.0.0.1:$PORT" -servername localhost </dev/null 2>/dev/null \
  | openssl x509 -noout -serial
cp "$WORK/second.crt" "$WORK/certs/tls.crt"
cp "$WORK/second.key" "$WORK/certs/tls.key"
echo -n "after:  "; openssl s_client -connect "127.0.0.1:$PORT" -servername localhost </dev/null 2>/dev/null \
  | openssl x509 -noout -serial

step "metrics"
"${CURL[@]}" "$URL/metrics" | grep -E '^apiserver_proxy_webhook_(requests_total|patches_total|certificate_reloads_total|reviews_total)'

step "SIGTERM: graceful stop"
kill -TERM "$PID"
wait "$PID" && echo "exit status 0"
PID=""
