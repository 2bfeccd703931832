#!/usr/bin/env bash
# System packages the stack and the tests need: PostgreSQL 15 server binaries,
# redis-server, prometheus (its promtool checks the alert rules, and the
# monitoring test runs a real Prometheus), and for the ACME issuer Knot DNS
# (knotd, the authoritative server taking DNS-01 records) and pebble (Let's
# Encrypt's test CA), lego (an ACME client the ACME server's tests run), and
# SoftHSM2 (softhsm2: the PKCS#11 token holding the development CA's key);
# with the argument `bench`, also h2load for the benchmarks.
# Installed with apt when we are root; otherwise we say what to install.
set -euo pipefail

missing=()
[ -x "${PG_BIN:-/usr/lib/postgresql/15/bin}/postgres" ] || missing+=(postgresql-15)
command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
# knotd is in /usr/sbin, not on every user's PATH.
{ command -v knotd || [ -x /usr/sbin/knotd ]; } >/dev/null || missing+=(knot)
command -v pebble >/dev/null || missing+=(pebble)
# lego: a real ACME client of the ACME server's tests (certbot comes from PyPI).
command -v lego >/dev/null || missing+=(lego)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
if [ "${1:-}" = bench ]; then
  command -v h2load >/dev/null || missing+=(nghttp2-client)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages' own services are not wanted: the stack runs its own servers.
  for unit in redis-server postgresql prometheus prometheus-node-exporter knot; do
    service "$unit" stop >/dev/null 2>&1 || true
  done
else
  echo "missing system packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
