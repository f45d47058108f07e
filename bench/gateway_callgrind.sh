#!/usr/bin/env bash
# The gateway's user-space instructions per proxied request, counted by
# callgrind (repeatable on a loaded machine, unlike wall-clock figures;
# the kernel's share, most of a proxied request's CPU, is not counted).
# The gateway runs on one current-thread runtime under valgrind; after a
# warm-up the counters are zeroed, `proxy_bench load` sends RATE req/s for
# SECS seconds over CONNS connections, and the counters are dumped.
# BASE=path/to/another/proxy_bench counts that build too (e.g. an earlier
# commit's), in the same run.
# Usage: bash bench/gateway_callgrind.sh [OUT_DIR]   (RATE=400 SECS=5 CONNS=8 BASE=)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-gateway-callgrind}"
rate="${RATE:-400}"; secs="${SECS:-5}"; conns="${CONNS:-8}"
mkdir -p "$out"
cargo build --release --locked -p tessera-gateway --example proxy_bench >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/proxy_bench"
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
up=127.0.0.1:18090; port=18091
"$bin" upstream --listen "$up" 2>/dev/null & up_pid=$!
trap 'kill $up_pid 2>/dev/null || true' EXIT
count() {
    local name=$1 gwbin=$2 url="http://127.0.0.1:$port/s/bench/"
    rm -f "$out/callgrind-$name".*
    PROXY_BENCH_WORKERS=1 PROXY_BENCH_THREADS=0 valgrind --tool=callgrind \
        --callgrind-out-file="$out/callgrind-$name.out" \
        "$gwbin" gateway --listen "127.0.0.1:$port" --upstream "$up" 2>"$out/valgrind-$name.log" &
    local gw=$!
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    "$bin" load --url "$url" --rate 100 --secs 1 --conns "$conns" >/dev/null
    callgrind_control -z "$gw" >/dev/null 2>&1
    "$bin" load --url "$url" --rate "$rate" --secs "$secs" --conns "$conns" >"$out/load-$name.txt"
    callgrind_control -d "$gw" >/dev/null 2>&1
    kill "$gw"; wait "$gw" 2>/dev/null || true
    local n ir
    n=$(awk '{print $2}' "$out/load-$name.txt")
    ir=$(sed -n 's/^summary: //p' "$out/callgrind-$name.out.1")
    echo "$name requests=$n instructions=$ir per_request=$((ir / n))"
}
{
    [ -n "${BASE:-}" ] && count base "$BASE"
    count gateway "$bin"
} | tee "$out/summary.txt"
