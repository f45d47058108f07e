#!/usr/bin/env bash
# Gateway overhead on loopback (BENCHMARKS.md, "Gateway"). One trivial
# upstream (hyper, 12-byte body) is reached three ways in the same run:
# directly, through the gateway (`proxy_bench gateway`, service "bench"), and
# through nginx as a keep-alive reverse proxy when nginx is installed
# (apt-get install -y nginx wrk). Each round measures, per target:
#   throughput: wrk -t2 -c64 for $DUR seconds (requests/s, closed loop);
#   cpu:        the proxy's own CPU time (user + system, from /proc) per
#               request during the wrk run: the fair figure on a small
#               machine where wrk, the upstream and the proxy share cores;
#   latency:    proxy_bench load at $RATE req/s over 32 connections
#               (p50/p99 from send to the end of the response body).
# Rounds alternate the targets so drift hits all of them alike.
# BASE=path/to/another/proxy_bench adds its gateway ("base", e.g. a build of
# an earlier commit) to the same rounds, against the same upstream.
# PIN=1 gives the proxies a core of their own: wrk, the latency load and the
# upstream run on CPU 0 in every case (direct too), each proxy on CPU 1 with
# one worker (gateway one thread, nginx one worker process). On a 2-core
# machine this is the fair reading of "throughput vs direct": the proxy's
# CPU is not taken from the client and the server it sits between, as in a
# deployment where the gateway has its own cores. Without PIN everything
# shares both cores, so throughput mostly measures CPU per request.
# On a larger machine the sides can be given cores of their own by hand:
# UP_CPUS, LOAD_CPUS and PROXY_CPUS are taskset CPU lists (e.g. 0-3), and
# PROXY_WORKERS the gateway's threads and nginx's workers; WRK_THREADS and
# WRK_CONNS set wrk's -t and -c (default 2 and 64). BIN, WRK and NGINX_BIN name
# prebuilt programs to use instead of building proxy_bench and of the wrk
# and nginx on PATH (for a machine without a toolchain).
# UPSTREAM_CMD replaces the trivial upstream with a real server, started by
# bash with PORT set (e.g. the embeddings model server of
# examples/serving/); REQ_PATH is then the path asked for, WRK_SCRIPT a wrk
# Lua script that shapes the request (bench/embeddings.lua), and RATE=0
# skips the fixed-rate latency load, which sends GETs.
# Usage: bash bench/gateway.sh [OUT_DIR]   (ROUNDS=3 DUR=10 RATE=5000 BASE= PIN=)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-gateway}"
rounds="${ROUNDS:-3}"; dur="${DUR:-10}"; rate="${RATE:-5000}"
mkdir -p "$out"
if [ -n "${BIN:-}" ]; then
    bin="$BIN"
else
    cargo build --release --locked -p tessera-gateway --example proxy_bench >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/proxy_bench"
fi
wrk="${WRK:-wrk}"; nginx="${NGINX_BIN:-nginx}"
command -v "$wrk" >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
wrk_args=(-t"${WRK_THREADS:-2}" -c"${WRK_CONNS:-64}")
{ git rev-parse HEAD && git status --short; } >"$out/commit.txt" 2>&1 || true

up=127.0.0.1:18080; gw=127.0.0.1:18081; ngx=127.0.0.1:18082; base=127.0.0.1:18083
# Where each side runs (PIN=1: load and upstream on CPU 0, proxies on CPU 1).
if [ "${PIN:-0}" = 1 ]; then
    UP_CPUS=0 LOAD_CPUS=0 PROXY_CPUS=1 PROXY_WORKERS=1
fi
up_on=(); load_on=(); proxy_on=(); workers=auto
if [ -n "${UP_CPUS:-}${LOAD_CPUS:-}${PROXY_CPUS:-}" ]; then
    command -v taskset >/dev/null || { echo "pinning needs taskset (util-linux)" >&2; exit 1; }
fi
[ -n "${UP_CPUS:-}" ] && up_on=(taskset -c "$UP_CPUS")
[ -n "${LOAD_CPUS:-}" ] && load_on=(taskset -c "$LOAD_CPUS")
[ -n "${PROXY_CPUS:-}" ] && proxy_on=(taskset -c "$PROXY_CPUS")
if [ -n "${PROXY_WORKERS:-}" ]; then
    workers=$PROXY_WORKERS
    export PROXY_BENCH_THREADS=$PROXY_WORKERS
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
if [ -n "${UPSTREAM_CMD:-}" ]; then
    PORT="${up#*:}" "${up_on[@]}" bash -c "exec $UPSTREAM_CMD" & pids+=($!)
else
    "${up_on[@]}" "$bin" upstream --listen "$up" & pids+=($!)
fi
req="${REQ_PATH:-}"; req="${req#/}"
[ -n "${WRK_SCRIPT:-}" ] && wrk_args+=(-s "$WRK_SCRIPT")
"${proxy_on[@]}" "$bin" gateway --listen "$gw" --upstream "$up" & pids+=($!)
gw_pid=$!
targets="direct=http://$up/$req"
if [ -n "${BASE:-}" ]; then
    "${proxy_on[@]}" "$BASE" gateway --listen "$base" --upstream "$up" & pids+=($!)
    base_pid=$!
    targets="$targets base=http://$base/s/bench/$req"
fi
targets="$targets gateway=http://$gw/s/bench/$req"
if command -v "$nginx" >/dev/null; then
    ndir="$(mktemp -d)"
    cat >"$ndir/nginx.conf" <<NGINX
daemon off;
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes $workers;
pid $ndir/nginx.pid;
error_log $ndir/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $ndir/body;
    proxy_temp_path $ndir/proxy;
    fastcgi_temp_path $ndir/fastcgi;
    uwsgi_temp_path $ndir/uwsgi;
    scgi_temp_path $ndir/scgi;
    upstream u { server $up; keepalive 128; }
    server {
        listen $ngx;
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
NGINX
    "${proxy_on[@]}" "$nginx" -p "$ndir" -c "$ndir/nginx.conf" & pids+=($!)
    nginx_pid=$!
    targets="$targets nginx=http://$ngx/$req"
else
    echo "nginx is not installed: skipping it (apt-get install -y nginx)" >&2
fi
for a in $up $gw $([ -n "${ndir:-}" ] && echo $ngx) $([ -n "${BASE:-}" ] && echo $base); do
    # A model server loads its weights before it listens: up to a minute.
    for _ in $(seq 1200); do (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null && break; sleep 0.05; done
done
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
proxy_pids() {
    case "$1" in
        gateway) echo "$gw_pid" ;;
        base) echo "$base_pid" ;;
        nginx) pgrep -P "$nginx_pid" | tr '\n' ' ' ;;
        *) echo "" ;;
    esac
}
hz=$(getconf CLK_TCK)
{ nproc; uname -a; grep -m1 "model name" /proc/cpuinfo || true
  echo "upstream on ${UP_CPUS:-any}, load on ${LOAD_CPUS:-any}, proxies on ${PROXY_CPUS:-any} (workers $workers); wrk ${wrk_args[*]}"; } >"$out/machine.txt"

: >"$out/results.txt"
for r in $(seq "$rounds"); do
    for t in $targets; do
        name="${t%%=*}"; url="${t#*=}"
        pp=$(proxy_pids "$name"); t0=$([ -n "$pp" ] && ticks $pp || echo 0)
        rps=$("${load_on[@]}" "$wrk" "${wrk_args[@]}" -d"${dur}s" "$url" | tee "$out/wrk-$name-$r.txt" | awk '/Requests\/sec/ {print $2}')
        n=$(awk '/requests in/ {print $1}' "$out/wrk-$name-$r.txt")
        bad=$(awk '/Non-2xx/ {print $NF}' "$out/wrk-$name-$r.txt")
        [ -n "$bad" ] && echo "warning: $name answered $bad requests with a status other than 2xx/3xx" >&2
        cpu=$([ -n "$pp" ] && awk -v d=$(( $(ticks $pp) - t0 )) -v hz="$hz" -v n="$n" 'BEGIN {printf "%.1f", d * 1e6 / hz / n}' || echo 0)
        if [ "$rate" = 0 ]; then
            lat="p50 0 p99 0"
        else
            lat=$("${load_on[@]}" "$bin" load --url "$url" --rate "$rate" --secs "$dur" --conns 32 | tee "$out/load-$name-$r.txt")
        fi
        p50=$(echo "$lat" | awk '{for(i=1;i<=NF;i++) if($i=="p50") print $(i+1)}')
        p99=$(echo "$lat" | awk '{for(i=1;i<=NF;i++) if($i=="p99") print $(i+1)}')
        echo "$r $name rps=$rps cpu_us_per_req=$cpu p50_ms=$p50 p99_ms=$p99" | tee -a "$out/results.txt"
    done
done

echo "== medians over $rounds rounds (throughput: wrk ${wrk_args[*]}; latency at $rate req/s)"
for t in $targets; do
    name="${t%%=*}"
    med() { grep " $name " "$out/results.txt" | sed -n "s/.*$1=\([0-9.]*\).*/\1/p" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    echo "$name rps=$(med rps) p50_ms=$(med p50_ms) p99_ms=$(med p99_ms) cpu_us_per_req=$(med cpu_us_per_req)"
done | tee "$out/summary.txt"
awk '{split($2,a,"="); split($3,b,"="); split($4,c,"="); split($5,d,"="); rps[$1]=a[2]; p50[$1]=b[2]; p99[$1]=c[2]; cpu[$1]=d[2]}
     END {
       printf "gateway/direct throughput %.2fx; added latency p50 %.3f ms, p99 %.3f ms\n", rps["gateway"]/rps["direct"], p50["gateway"]-p50["direct"], p99["gateway"]-p99["direct"];
       if ("base" in rps) printf "gateway/base throughput %.2fx; proxy CPU per request: gateway %s us, base %s us; base/direct %.2fx\n", rps["gateway"]/rps["base"], cpu["gateway"], cpu["base"], rps["base"]/rps["direct"];
       if ("nginx" in rps) printf "gateway/nginx throughput %.2fx; nginx added p50 %.3f ms, p99 %.3f ms; proxy CPU per request: gateway %s us, nginx %s us\n", rps["gateway"]/rps["nginx"], p50["nginx"]-p50["direct"], p99["nginx"]-p99["direct"], cpu["gateway"], cpu["nginx"];
     }' "$out/summary.txt" | tee -a "$out/summary.txt"
