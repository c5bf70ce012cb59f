#!/usr/bin/env bash
# HTTP benchmark: the release service against a local fake Grsai that answers at once,
# 10,000 users, wrk as the load generator; then, in the same run, the plain-SQL baseline
# of the core benchmark for the ratio (BENCH_BASELINE=0 skips it). Usage: bash bench/http.sh
set -euo pipefail
cd "$(dirname "$0")/.."

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p credit-ledger -p credit-testkit --bin credit-ledger --bin fake-grsai
# BENCH_SERVICE: another build of the service to measure (e.g. a copy of an earlier commit's
# target/release/credit-ledger, to compare two builds run after run on the same machine).
service="${BENCH_SERVICE:-target/release/credit-ledger}"

out=target/bench; mkdir -p "$out"
db="credit_ledger_httpbench_$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret="bench-jwt-secret-$(head -c8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
admin="bench-admin-$(head -c8 /dev/urandom | od -An -tx1 | tr -d ' \n')"

target/release/fake-grsai > "$out/fake-grsai.url" &
fake_pid=$!
cleanup() {
  kill "${svc_pid:-}" "$fake_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 50); do [ -s "$out/fake-grsai.url" ] && break; sleep 0.1; done

# Every credential is set (a partly configured service refuses to start). The benchmark makes
# no recharge, so Stripe's API base points at a closed local port.
DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" LISTEN_ADDR="127.0.0.1:$port" \
AUTH_JWT_SECRET="$secret" ADMIN_TOKEN="$admin" GRSAI_API_KEY=bench-key \
STRIPE_SECRET_KEY=sk_test_bench STRIPE_WEBHOOK_SECRET=whsec_bench STRIPE_API_BASE=http://127.0.0.1:9 \
RATE_LIMIT_GENERATE=off RATE_LIMIT_RECHARGE=off \
GRSAI_API_BASE="$(cat "$out/fake-grsai.url")" RUST_LOG=warn \
  "$service" serve > "$out/service.log" 2>&1 &
svc_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

echo "== HTTP benchmark ($(nproc) cores, wrk -t2 -c${BENCH_CONNECTIONS:-32} -d${BENCH_DURATION:-15s}) =="
BENCH_BASE="http://127.0.0.1:$port" BENCH_JWT_SECRET="$secret" BENCH_ADMIN_TOKEN="$admin" \
BENCH_PID="$svc_pid" python3 bench/http_bench.py

[ "${BENCH_BASELINE:-1}" = 0 ] && exit 0
echo "== plain-SQL baseline, same run =="
cargo run --release -q -p credit-bench --bin ledger-bench -- --audit-events 0 --history-tasks 0 --workers 16 --seconds 8 | grep -E "^(scenario|spread|hot)" | head -3
