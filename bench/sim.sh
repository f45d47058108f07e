#!/usr/bin/env bash
# Trace-replay benchmarks for BENCHMARKS.md (`tessera sim`, release build).
#   (a) the full Philly trace (82,247 jobs) on 64 nodes x 8 GPUs under every
#       policy, one process per policy so each gets its own wall time (the
#       table's WALL s column; SCHED s is the part spent in the scheduler);
#   (b) Alibaba openb packing (the FGD experiment): pods arrive and never
#       leave, 10 seeds (42..51), fragmentation-aware packing (tessera)
#       against best fit (drf, fifo).
# The traces are read in place from ../shared/traces (never copied here).
# Usage: bash bench/sim.sh [OUT_DIR]   (POLICIES="fifo drf" to run fewer;
#   OPENB=0 to skip (b); BASELINE=/path/to/an/older/tessera to replay each
#   Philly policy with that binary too, right after this build's run, so
#   the two wall times come from the same conditions and the results can
#   be compared: philly-P.base.json beside philly-P.json; BIN=/path/to/a/binary
#   to replay with it instead of building tessera: the tessera-sim example
#   `sim` takes the same arguments and is a much smaller build:
#   cargo build --release -p tessera-sim --example sim; REPEAT=3 to replay
#   each policy three times and print the fastest wall of each build)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-sim}"
traces="${TRACES:-$PWD/../shared/traces}"
policies="${POLICIES:-fifo fifo-backfill sjf-oracle srtf-oracle las tiresias drf tessera}"
mkdir -p "$out"
if [ -n "${BIN:-}" ]; then
    bin="$BIN"
else
    cargo build --release --locked -p tessera-cli >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
fi
{ git rev-parse HEAD && git status --short; } >"$out/commit.txt" 2>&1 || true

# wall SAVED: the replay's own wall time (sim_wall_s) from a saved report.
wall() { grep -o '"sim_wall_s": *[0-9.]*' "$1" | grep -o '[0-9.]*$'; }
min() { awk 'NR == 1 || $1 < m { m = $1 } END { print m }'; }

echo "== (a) Philly, 64 nodes x 8 GPUs"
for p in $policies; do
    # REPEAT=N replays each policy N times (alternating with the baseline),
    # keeps the last reports and prints the fastest wall of each build: on
    # a shared machine the fastest run is the one least disturbed.
    walls="" base_walls=""
    for _ in $(seq "${REPEAT:-1}"); do
        "$bin" sim --trace "$traces/philly/philly.csv" --format philly --nodes 64 --gpus-per-node 8 \
            --policy "$p" --save "$out/philly-$p.json" | tee "$out/philly-$p.txt"
        walls="$walls $(wall "$out/philly-$p.json")"
        if [ -n "${BASELINE:-}" ]; then
            echo "-- baseline: $BASELINE"
            "$BASELINE" sim --trace "$traces/philly/philly.csv" --format philly --nodes 64 --gpus-per-node 8 \
                --policy "$p" --save "$out/philly-$p.base.json" | tee "$out/philly-$p.base.txt"
            base_walls="$base_walls $(wall "$out/philly-$p.base.json")"
        fi
    done
    if [ "${REPEAT:-1}" -gt 1 ]; then
        line="-- $p: fastest wall of ${REPEAT} runs: $(echo $walls | tr ' ' '\n' | min) s"
        [ -n "${BASELINE:-}" ] && line="$line (baseline $(echo $base_walls | tr ' ' '\n' | min) s)"
        echo "$line" | tee -a "$out/fastest.txt"
    fi
done
[ "${OPENB:-1}" = 0 ] && exit 0

echo "== (b) openb packing, 1,213 nodes / 6,212 GPUs, seeds 42..51"
"$bin" sim --trace "$traces/alibaba-openb/openb_pod_list_default.csv" --format openb \
    --node-file "$traces/alibaba-openb/openb_node_list_gpu_node.csv" \
    --policy tessera,drf,fifo --seeds 10 --save "$out/openb.json" | tee "$out/openb.txt"
