#!/usr/bin/env bash
# Pools side by side (BENCHMARKS.md, "Pools: Slurm"). The same N trivial
# jobs (`true`, 1 CPU, 64 MiB each), in one run:
#   1. straight to Slurm: N × `sbatch` submitted one after another, then
#      wait until Slurm lists all N as ended;
#   2. through Tessera's Slurm pool: `tessera up`, `tessera pool add slurm`,
#      N × `tessera run --pool ... -- true`, then wait until Tessera lists
#      all N as succeeded (the default pool: up to 2 jobs beyond Slurm's
#      capacity wait in Slurm's queue, `queue_ahead`); then again with
#      `--option queue_ahead=0` (Tessera hands Slurm only its capacity, as
#      before queue_ahead) and with `--option backlog=2` (up to twice its
#      capacity, the rest waits in Slurm's queue);
#   3. through Tessera's own nodes pool: `tessera up --cpu C` (C = the
#      Slurm node's CPUs), the same N jobs on its local agent.
# Each time runs from the first submission to the moment the waiting loop
# (every 500 ms, the same in all three) sees the last job ended. Needs a
# Slurm answering `sinfo` (bash .ci/slurm-up.sh) with no other work queued.
# Tessera's `squeue` calls are counted (through a one-line wrapper put first
# on the PATH of `tessera up`) and reported per second of each pool run.
# Usage: bash bench/pools.sh [N] [OUT_DIR]     (default N = 200)
#   TESSERA_BIN=path  use this binary instead of building the release one
#   SKIP_BACKLOG=1    leave out the backlog=2 run
#   SKIP_NO_AHEAD=1   leave out the queue_ahead=0 run
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
out="${2:-target/bench}"
mkdir -p "$out"
if [ -z "${TESSERA_BIN:-}" ]; then
    cargo build --release --locked -p tessera-cli >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
else
    bin="$TESSERA_BIN"
fi
sinfo -h -o %T >/dev/null || { echo "no Slurm answers sinfo; run: bash .ci/slurm-up.sh" >&2; exit 1; }
if [ -n "$(squeue -h -t pending,running -o %i)" ]; then
    echo "Slurm has jobs queued or running; the benchmark needs it idle" >&2
    exit 1
fi
cpus=$(sinfo -h -o %c | head -1)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); Slurm $(sinfo -V | cut -d' ' -f2), one node of $cpus CPUs; $n jobs; binary $bin"

now() { date +%s.%N; }
scratch=$(mktemp -d)
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# ---- 1. straight to Slurm
ids=()
t0=$(now)
for _ in $(seq "$n"); do
    ids+=("$(sbatch --parsable --job-name=bench-direct --cpus-per-task=1 --mem=64M --output=/dev/null --wrap true)")
done
t_submitted=$(now)
list=$(IFS=,; echo "${ids[*]}")
while true; do
    left=$(squeue --jobs="$list" --states=all -h -o %T | grep -cvE '^(COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL)$' || true)
    [ "$left" = 0 ] && break
    sleep 0.5
done
t1=$(now)
failed=$(squeue --jobs="$list" --states=all -h -o %T | grep -cv '^COMPLETED$' || true)
slurm_s=$(echo "$t1 - $t0" | bc -l)
slurm_submit_s=$(echo "$t_submitted - $t0" | bc -l)
printf 'slurm direct: %d jobs done in %.1f s (%.2f jobs/s; submitting took %.1f s; %s not COMPLETED)\n' \
    "$n" "$slurm_s" "$(echo "$n / $slurm_s" | bc -l)" "$slurm_submit_s" "$failed"

# Counts the server's squeue calls: one line per call in $scratch/squeue.calls.
mkdir -p "$scratch/shim"
real_squeue=$(command -v squeue)
printf '#!/bin/sh\necho >> %s/squeue.calls\nexec %s "$@"\n' "$scratch" "$real_squeue" >"$scratch/shim/squeue"
chmod +x "$scratch/shim/squeue"
squeue_calls() { if [ -f "$scratch/squeue.calls" ]; then wc -l <"$scratch/squeue.calls"; else echo 0; fi; }

# Starts `tessera up` on a fresh home with extra flags; sets TESSERA_HOME.
start_up() {
    export TESSERA_HOME="$scratch/home-$1"
    shift
    mkdir -p "$TESSERA_HOME"
    : >"$scratch/squeue.calls"
    PATH="$scratch/shim:$PATH" "$bin" up --listen 127.0.0.1:0 --no-cgroups "$@" >"$TESSERA_HOME.log" 2>&1 &
    up_pid=$!
    for _ in $(seq 200); do
        [ -s "$TESSERA_HOME/config" ] && return 0
        sleep 0.05
    done
    echo "tessera up did not start:" >&2
    cat "$TESSERA_HOME.log" >&2
    exit 1
}
stop_up() {
    kill -TERM "$up_pid"
    wait "$up_pid" 2>/dev/null || true
    up_pid=""
}
# Runs N jobs through `tessera run` with extra flags; prints seconds.
through_tessera() {
    local t0 t1 done_count
    t0=$(now)
    for _ in $(seq "$n"); do
        "$bin" run "$@" --cpu 1 --mem 64Mi -- true >/dev/null
    done
    while true; do
        done_count=$("$bin" jobs --all -o json | jq '[.[] | select(.state == "succeeded" or .state == "failed" or .state == "lost" or .state == "cancelled")] | length')
        [ "$done_count" -ge "$n" ] && break
        sleep 0.5
    done
    t1=$(now)
    local bad
    bad=$("$bin" jobs --all -o json | jq '[.[] | select(.state != "succeeded")] | length')
    echo "$(echo "$t1 - $t0" | bc -l) $bad"
}

# ---- 2. through Tessera's Slurm pool
start_up slurm
"$bin" pool add slurm bench >/dev/null
read -r pool_s pool_bad < <(through_tessera --pool bench)
pool_squeue=$(squeue_calls)
"$bin" jobs --all -o json >"$out/pools-slurm-jobs.json"
"$bin" pools
stop_up
printf 'tessera slurm pool: %d jobs done in %.1f s (%.2f jobs/s; %s not succeeded); %.3f× Slurm direct (%+.1f%%); %d squeue calls (%.1f/s)\n' \
    "$n" "$pool_s" "$(echo "$n / $pool_s" | bc -l)" "$pool_bad" \
    "$(echo "$pool_s / $slurm_s" | bc -l)" "$(echo "($pool_s / $slurm_s - 1) * 100" | bc -l)" \
    "$pool_squeue" "$(echo "$pool_squeue / $pool_s" | bc -l)"

# ---- 2a. the same, the pool handing Slurm only its capacity (queue_ahead=0)
no_ahead_s=null
if [ -z "${SKIP_NO_AHEAD:-}" ]; then
    start_up no-ahead
    "$bin" pool add slurm bench --option queue_ahead=0 >/dev/null
    read -r no_ahead_s no_ahead_bad < <(through_tessera --pool bench)
    stop_up
    printf 'tessera slurm pool, queue_ahead=0: %d jobs done in %.1f s (%.2f jobs/s; %s not succeeded); %.3f× Slurm direct (%+.1f%%)\n' \
        "$n" "$no_ahead_s" "$(echo "$n / $no_ahead_s" | bc -l)" "$no_ahead_bad" \
        "$(echo "$no_ahead_s / $slurm_s" | bc -l)" "$(echo "($no_ahead_s / $slurm_s - 1) * 100" | bc -l)"
fi

# ---- 2b. the same, the pool handing Slurm up to twice its capacity (backlog=2)
backlog_s=null
if [ -z "${SKIP_BACKLOG:-}" ]; then
    start_up backlog
    "$bin" pool add slurm bench --option backlog=2 >/dev/null
    read -r backlog_s backlog_bad < <(through_tessera --pool bench)
    stop_up
    printf 'tessera slurm pool, backlog=2: %d jobs done in %.1f s (%.2f jobs/s; %s not succeeded); %.3f× Slurm direct (%+.1f%%)\n' \
        "$n" "$backlog_s" "$(echo "$n / $backlog_s" | bc -l)" "$backlog_bad" \
        "$(echo "$backlog_s / $slurm_s" | bc -l)" "$(echo "($backlog_s / $slurm_s - 1) * 100" | bc -l)"
fi

# ---- 3. through Tessera's own nodes pool (the local agent), as many CPUs as the Slurm node
start_up nodes --cpu "$cpus"
read -r nodes_s nodes_bad < <(through_tessera)
stop_up
printf 'tessera own nodes: %d jobs done in %.1f s (%.2f jobs/s; %s not succeeded); %.3f× Slurm direct\n' \
    "$n" "$nodes_s" "$(echo "$n / $nodes_s" | bc -l)" "$nodes_bad" "$(echo "$nodes_s / $slurm_s" | bc -l)"

jq -n --argjson n "$n" --argjson slurm "$slurm_s" --argjson pool "$pool_s" --argjson backlog "$backlog_s" \
    --argjson no_ahead "$no_ahead_s" --argjson nodes "$nodes_s" --argjson squeue "$pool_squeue" \
    '{jobs: $n, slurm_direct_s: $slurm, tessera_slurm_pool_s: $pool, tessera_slurm_pool_no_ahead_s: $no_ahead,
      tessera_slurm_pool_backlog2_s: $backlog,
      tessera_nodes_s: $nodes, pool_over_slurm: ($pool / $slurm),
      no_ahead_over_slurm: (if $no_ahead == null then null else $no_ahead / $slurm end),
      backlog2_over_slurm: (if $backlog == null then null else $backlog / $slurm end),
      nodes_over_slurm: ($nodes / $slurm), pool_squeue_calls: $squeue, pool_squeue_per_s: ($squeue / $pool)}' | tee "$out/pools.json"
