#!/usr/bin/env bash
# Fleet benchmarks for BENCHMARKS.md ("Fleet"). Builds the release binary,
# then:
#   1. `tessera bench agents`: a `tessera server` child holding N simulated
#      agents (each heartbeating every 5 s), its CPU and RSS over the window,
#      and the same server idle, measured first in the same run;
#   2. `tessera bench remote`: trivial jobs one at a time on a real
#      `tessera agent` child, against `tessera up` in the same run.
# Each benchmark starts its own server on a free loopback port and a scratch
# home; nothing else needs to run.
# Usage: bash bench/fleet.sh [OUT_DIR] [AGENTS...]   (default agents: 1000 500)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench}"
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1000 500)
mkdir -p "$out"
cargo build --release --locked -p tessera-cli >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

for n in "${counts[@]}"; do
    echo "== $n simulated agents, heartbeat 5s, 60 s window (idle server measured first)"
    "$bin" bench agents --agents "$n" --heartbeat 5s --duration 60s -o json | tee "$out/fleet-agents-$n.json"
done

echo "== remote placement: 200 trivial jobs on a real agent, then on tessera up"
"$bin" bench remote --jobs 200 -o json | tee "$out/fleet-remote.json"
