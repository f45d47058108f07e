#!/usr/bin/env bash
# Dashboard page times (BENCHMARKS.md, "Dashboard"). `tessera bench ui`
# builds a synthetic cluster in memory — 1,000 nodes with 8 GPUs each and
# live usage, 9 teams with quotas, 100,000 jobs (about 6,000 running, 4,000
# queued with reasons, the rest finished over 30 days, each with events) —
# and times every page through the server's real router (authentication,
# the state lock, building the view, rendering the HTML), with the JSON API
# for the same data timed the same way in the same run as the baseline.
# Usage: bash bench/ui.sh [OUT_DIR]   (NODES=1000 JOBS=100000 RUNS=20)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-ui}"
mkdir -p "$out"
cargo build --release --locked -p tessera-cli >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
{ git rev-parse HEAD && git status --short; } >"$out/commit.txt" 2>&1 || true
"$bin" bench ui --nodes "${NODES:-1000}" --jobs "${JOBS:-100000}" --runs "${RUNS:-20}" | tee "$out/ui.txt"
