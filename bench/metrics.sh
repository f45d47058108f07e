#!/usr/bin/env bash
# Scrape and accounting cost at scale, for BENCHMARKS.md ("Metrics and
# usage"). Builds the release binary, starts `tessera up` on a scratch home,
# fills it with DONE finished jobs (real processes, one attempt each) and
# QUEUED more jobs submitted then cancelled, and times, with wrk on one
# connection, in the same run:
#   GET /healthz                 the floor: the HTTP stack alone
#   GET /v1/jobs?limit=100       the baseline: an existing list call
#   GET /metrics                 every series, recomputed from state
#   GET /v1/usage                per team over 30 days (default)
#   GET /v1/usage?by=pool
#   GET /v1/usage?by=job&team=admin&since=10m   one row per finished job
# Usage: DONE=20000 QUEUED=80000 DUR=5 bash bench/metrics.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-metrics}"
DONE="${DONE:-20000}"
QUEUED="${QUEUED:-80000}"
DUR="${DUR:-5}"
mkdir -p "$out"
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
cargo build --release --locked -p tessera-cli >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
home="$(mktemp -d)"
export TESSERA_HOME="$home/home"
"$bin" up --listen 127.0.0.1:0 --no-cgroups --cpu 4 --memory 8Gi >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$home"' EXIT
for _ in $(seq 200); do [ -f "$TESSERA_HOME/config" ] && break; sleep 0.05; done
url="$(sed -n 's/^url = //p' "$TESSERA_HOME/config")"
token="$(cat "$TESSERA_HOME/admin.token")"

echo "== filling: $DONE finished jobs, $QUEUED submitted and cancelled"
"$bin" bench e2e --jobs "$DONE" --serial 1 --concurrency 32 --timeout 30m | tail -3
"$bin" bench submit --jobs "$QUEUED" --concurrency 64 | tail -2
total="$(curl -fsS "$url/metrics" | awk '/^tessera_jobs\{/ {s += $2} END {print s}')"
echo "jobs in state: $total"
curl -fsS -H "Authorization: Bearer $token" "$url/v1/usage" >"$out/usage.json"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("usage total:", r["total"])' "$out/usage.json"

echo "== latency, wrk -t1 -c1 -d${DUR}s (one request at a time)"
printf '| endpoint | bytes | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n' | tee "$out/latency.md"
for path in /healthz "/v1/jobs?limit=100" /metrics /v1/usage "/v1/usage?by=pool" \
    "/v1/usage?by=job&team=admin&since=10m"; do
  bytes="$(curl -fsS -H "Authorization: Bearer $token" "$url$path" | wc -c)"
  wrk -t1 -c1 -d"${DUR}s" --latency -H "Authorization: Bearer $token" "$url$path" >"$out/wrk.txt"
  rps="$(awk '/^Requests\/sec/ {print $2}' "$out/wrk.txt")"
  p50="$(awk '$1 == "50%" {print $2}' "$out/wrk.txt")"
  p99="$(awk '$1 == "99%" {print $2}' "$out/wrk.txt")"
  to_ms() { case "$1" in *us) echo "${1%us}" | awk '{printf "%.3f", $1/1000}';; *ms) echo "${1%ms}";; *s) echo "${1%s}" | awk '{printf "%.1f", $1*1000}';; esac; }
  printf '| `%s` | %s | %s | %s | %s |\n' "$path" "$bytes" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" | tee -a "$out/latency.md"
done
