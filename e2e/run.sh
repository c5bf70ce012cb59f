#!/usr/bin/env bash
# Runs the browser end-to-end test against a freshly started `credit-ledger serve`.
#
#   e2e/run.sh [path/to/credit-ledger]      (default: target/debug/credit-ledger)
#
# Starts the service in demo mode (no Stripe, Grsai or JWT secret: demo payments, the
# simulated video provider and POST /api/dev/token) on a free loopback port with its own
# database, waits for /healthz, runs e2e/test.mjs in Debian's headless Chromium, then stops
# the service and drops the database. Screenshots and the service log go to target/e2e/.
# Needs: node + npm, /usr/bin/chromium (apt-get install -y chromium), PostgreSQL on
# 127.0.0.1:5432 (user postgres, trust auth) and psql.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${1:-target/debug/credit-ledger}"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
out="$root/target/e2e"
pg_host="${E2E_PG_HOST:-127.0.0.1}"
pg_user="${E2E_PG_USER:-postgres}"

if [ ! -x "$bin" ]; then
  echo "e2e: no service binary at $bin (build it with: cargo build -p credit-ledger, or pass its path)" >&2
  exit 2
fi
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "e2e: installing Debian's chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "e2e: /usr/bin/chromium is missing (apt-get install -y chromium)" >&2
    exit 2
  fi
fi
if [ ! -d "$here/node_modules/playwright-core" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

rm -rf "$out"
mkdir -p "$out"

port="$(node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
db="credit_ledger_e2e_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base_url="http://127.0.0.1:$port"
workdir="$(mktemp -d)"   # the service reads .env from its working directory: start it in an empty one
pid=""

cleanup() {
  status=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  psql -h "$pg_host" -U "$pg_user" -d postgres -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 \
    || echo "e2e: could not drop database $db" >&2
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "e2e: starting $bin serve on $base_url (database $db, log $out/service.log)"
(
  cd "$workdir"
  exec env -u STRIPE_SECRET_KEY -u STRIPE_WEBHOOK_SECRET -u GRSAI_API_KEY -u AUTH_JWT_SECRET -u AUTH_JWT_AUDIENCE \
    -u AUTH_JWKS_URL -u ADMIN_TOKEN \
    -u CURRENCY -u CREDITS_PER_YUAN -u VIDEO_COST_CREDITS -u RECHARGE_MIN_YUAN -u RECHARGE_MAX_YUAN \
    LISTEN_ADDR="127.0.0.1:$port" \
    PUBLIC_BASE_URL="$base_url" \
    DATABASE_URL="postgres://$pg_user@$pg_host:5432/$db" \
    RUST_LOG="${RUST_LOG:-info}" \
    "$bin" serve
) >"$out/service.log" 2>&1 &
pid=$!

ready=""
for _ in $(seq 1 120); do   # 60 s: the service creates and migrates its database first
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "e2e: the service exited before it was ready; its log:" >&2
    tail -n 50 "$out/service.log" >&2
    exit 1
  fi
  if node -e "fetch('$base_url/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
if [ -z "$ready" ]; then
  echo "e2e: $base_url/healthz did not answer within 60 s; the service log:" >&2
  tail -n 50 "$out/service.log" >&2
  exit 1
fi

# Demo mode makes its admin token per process and prints it in the log.
admin_token="$(sed -n 's/.*DEMO MODE: admin token \([0-9a-f]\{64\}\).*/\1/p' "$out/service.log" | head -n 1)"
if [ -z "$admin_token" ]; then
  echo "e2e: no demo admin token in the service log" >&2
  exit 1
fi

set +e
BASE_URL="$base_url" ADMIN_TOKEN="$admin_token" SCREENSHOT_DIR="$out" node "$here/test.mjs"
result=$?
set -e
if [ "$result" -ne 0 ]; then
  echo "e2e: failed; the last lines of the service log ($out/service.log):"
  tail -n 30 "$out/service.log"
fi
exit "$result"
