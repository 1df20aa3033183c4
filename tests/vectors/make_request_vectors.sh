#!/bin/sh
# Regenerate the cmp_openssl_* and csr_openssl_* vectors (see README.md) with the openssl CLI only.
# Usage: sh tests/vectors/make_request_vectors.sh OUTDIR   (OpenSSL 3.0; -use_mock_srv: no network)
set -eu
out=$(cd "${1:?give an output folder}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out p256.key
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out p384.key
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa2048.key 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -subj /CN=mockca \
    -days 1 -out ca.pem 2>/dev/null
for kt in p256 rsa2048; do openssl pkey -in $kt.key -pubout -out "$out/cmp_openssl_$kt.pub.pem"; done
openssl pkey -in p384.key -pubout -out "$out/csr_openssl_p384.pub.pem"

mock="-use_mock_srv -srv_ref srv -srv_secret pass:test -rsp_cert ca.pem -recipient /CN=mockca"
mock="$mock -unprotected_errors -certout issued.pem"
mac="-ref cli -secret pass:test"
# -reqout saves the request openssl sends; the mock server then refuses or accepts, which is irrelevant
cmp() { name=$1; shift; openssl cmp $mock "$@" -reqout "$out/$name" >/dev/null 2>&1 || true; test -s "$out/$name"; }
cmp cmp_openssl_ir_p256.der -cmd ir $mac -newkey p256.key -subject "/CN=dev-cmp/O=Example"
cmp cmp_openssl_cr_unprotected.der -cmd cr -unprotected_requests -newkey p256.key -subject "/CN=dev-cr/O=Example"
cmp cmp_openssl_kur_p256.der -cmd kur $mac -oldcert ca.pem -newkey p256.key -subject "/CN=dev-kur/O=Example"
openssl req -new -key p256.key -subj "/CN=dev-p10/O=Example" -out p10.csr
cmp cmp_openssl_p10cr.der -cmd p10cr $mac -csr p10.csr
cmp cmp_openssl_genm.der -cmd genm $mac
cmp cmp_openssl_ir_rsa2048_sha384.der -cmd ir $mac -newkey rsa2048.key -digest sha384 \
    -subject "/CN=dev-rsa-sha384/O=Example"
cmp cmp_openssl_ir_p256_sha1.der -cmd ir $mac -newkey p256.key -digest sha1 -subject "/CN=dev-sha1/O=Example"
cmp cmp_openssl_ir_san.der -cmd ir $mac -newkey p256.key -subject "/CN=dev-san/O=Example/OU=Line 4" \
    -sans "dev-san.example.com 192.0.2.7"

openssl req -new -key p384.key -subj "/CN=dev-p384/O=Example" -outform DER -out "$out/csr_openssl_p384_sha256.der"
openssl req -new -key rsa2048.key -sha384 -subj "/CN=dev-rsa/O=Example" -outform DER \
    -out "$out/csr_openssl_rsa2048_sha384.der"
openssl req -new -key p256.key -sha1 -subj "/CN=dev-sha1/O=Example" -outform DER -out "$out/csr_openssl_p256_sha1.der"
openssl req -new -key p256.key -subj "/CN=dev-ext/O=Example/L=Plant 4" \
    -addext "subjectAltName=DNS:dev-ext.example.com,IP:192.0.2.9" -addext "keyUsage=critical,keyEncipherment" \
    -addext "basicConstraints=critical,CA:TRUE" -outform DER -out "$out/csr_openssl_ext.der"
