#!/usr/bin/env bash
# `make certs`: the certificate layout upstream's `make certs` writes, made
# with the openssl CLI. Two independent CAs:
#   certs/frontend: the server's frontend port (8090) and its client (kube-apiserver)
#   certs/agent:    the server's agent port (8091) and the agents
#   certs/{frontend,agent}/issued/{ca,proxy-frontend,proxy-client|proxy-agent}.crt
#   certs/{frontend,agent}/private/{ca,proxy-frontend,proxy-client|proxy-agent}.key
# Usage: scripts/make-certs.sh [DIR] (default: certs). Extra server names:
# CERT_SANS="DNS:konnectivity.example,IP:10.0.0.5".
set -euo pipefail
DIR=${1:-certs}
SANS="DNS:localhost,DNS:kubernetes,IP:127.0.0.1,IP:::1${CERT_SANS:+,$CERT_SANS}"
DAYS=${CERT_DAYS:-3650}

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# issue PKI NAME CN USAGE [SANS]
issue() {
  local pki=$1 name=$2 cn=$3 usage=$4 sans=${5:-}
  local ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$ext"
  key "$pki/private/$name.key"
  openssl req -new -key "$pki/private/$name.key" -subj "/CN=$cn" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/issued/ca.crt" -CAkey "$pki/private/ca.key" \
    -CAcreateserial -days "$DAYS" -sha256 -extfile "$ext" -out "$pki/issued/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

for pki in frontend agent; do
  mkdir -p "$DIR/$pki/issued" "$DIR/$pki/private"
  key "$DIR/$pki/private/ca.key"
  openssl req -x509 -new -key "$DIR/$pki/private/ca.key" -subj "/CN=konnectivity-$pki-ca" \
    -days "$DAYS" -sha256 -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$DIR/$pki/issued/ca.crt" 2>/dev/null
  issue "$DIR/$pki" proxy-frontend 127.0.0.1 serverAuth "$SANS"
done
issue "$DIR/frontend" proxy-client proxy-client clientAuth
issue "$DIR/agent" proxy-agent proxy-agent clientAuth
rm -f "$DIR"/*/issued/ca.srl
chmod 600 "$DIR"/*/private/*.key
echo "certificates written to $DIR/"
