#!/usr/bin/env bash
# Regenerates the test certificates of this directory with the openssl CLI.
# Every certificate is valid for 100 years (36500 days) so the tests never
# expire; serials are fixed so tests can tell the certificates apart.
set -euo pipefail
cd "$(dirname "$0")"
days=36500

# Test CA (RSA 2048) and a second, unrelated CA.
for ca in ca other-ca; do
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out $ca.key
  openssl req -x509 -new -key $ca.key -sha256 -days $days -set_serial 0x0100 \
    -subj "/CN=apiserver-proxy test $ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out $ca.crt
done

# issue NAME CA SERIAL CN EKU SAN: signs NAME.key (already made) into NAME.crt.
issue() {
  local name=$1 ca=$2 serial=$3 cn=$4 eku=$5 san=${6:-}
  openssl req -new -key $name.key -subj "/CN=$cn" -out $name.csr.tmp
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    echo "authorityKeyIdentifier=keyid"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > $name.ext.tmp
  openssl x509 -req -in $name.csr.tmp -CA $ca.crt -CAkey $ca.key -set_serial $serial \
    -days $days -sha256 -extfile $name.ext.tmp -out $name.crt
  rm -f $name.csr.tmp $name.ext.tmp
}

# Server, RSA 2048: PKCS#8 (server.key) and the same key as PKCS#1 (server-pkcs1.key).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key
openssl pkey -in server.key -traditional -out server-pkcs1.key
issue server ca 0x1001 localhost serverAuth "DNS:localhost,IP:127.0.0.1"

# Server, EC P-256 in SEC1 form ("EC PRIVATE KEY").
openssl ecparam -name prime256v1 -genkey -noout -out server-ec.key
issue server-ec ca 0x1002 localhost serverAuth "DNS:localhost,IP:127.0.0.1"

# A second server pair, for the rotation tests.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server-rotated.key
issue server-rotated ca 0x1003 localhost serverAuth "DNS:localhost,IP:127.0.0.1"

# Client (EC P-256, PKCS#8) signed by the test CA, and one signed by the other CA.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out client.key
issue client ca 0x2001 test-client clientAuth
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out stranger.key
issue stranger other-ca 0x2002 stranger clientAuth

rm -f other-ca.key *.srl
