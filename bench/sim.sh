#!/usr/bin/env bash
# Trace-replay benchmarks for BENCHMARKS.md (`tessera sim`, release build).
#   (a) the full Philly trace (82,247 jobs) on 64 nodes x 8 GPUs under every
#       policy, side by side (each row has its own wall time);
#   (b) Alibaba openb packing (the FGD experiment): pods arrive and never
#       leave, 10 seeds (42..51), fragmentation-aware packing (tessera)
#       against best fit (drf, fifo).
# The traces are read in place from ../shared/traces (never copied here).
# Usage: bash bench/sim.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-sim}"
traces="${TRACES:-$PWD/../shared/traces}"
mkdir -p "$out"
cargo build --release --locked -p tessera-cli >&2
bin="$PWD/target/release/tessera"
git rev-parse HEAD >"$out/commit.txt"
git status --short >>"$out/commit.txt"

echo "== (a) Philly, 64 x 8 GPUs, every policy"
/usr/bin/time -f "total wall %e s" "$bin" sim --trace "$traces/philly/philly.csv" --format philly \
    --nodes 64 --gpus-per-node 8 --policy all | tee "$out/philly.txt"
"$bin" sim --trace "$traces/philly/philly.csv" --format philly --nodes 64 --gpus-per-node 8 \
    --policy all -o json >"$out/philly.json"

echo "== (b) openb packing, 1,213 nodes / 6,212 GPUs, 10 seeds"
/usr/bin/time -f "total wall %e s" "$bin" sim --trace "$traces/alibaba-openb/openb_pod_list_default.csv" \
    --format openb --node-file "$traces/alibaba-openb/openb_node_list_gpu_node.csv" \
    --policy tessera,drf,fifo --seeds 10 | tee "$out/openb.txt"
"$bin" sim --trace "$traces/alibaba-openb/openb_pod_list_default.csv" --format openb \
    --policy tessera,drf --seeds 10 -o json >"$out/openb.json"
