#!/usr/bin/env bash
# Ray pool side by side (BENCHMARKS.md, "Pools: Ray"). The same N trivial
# jobs (`true`, 0.1 CPU and 64 MiB reserved for the entrypoint), in one run
# against one Ray head:
#   1. straight to Ray's Jobs REST API: N × `POST /api/jobs/` one after
#      another, then wait until Ray lists all N as ended;
#   2. through Tessera's Ray pool: `tessera up`, `tessera pool add ray`,
#      N × `tessera run --pool bench --cpu 0.1 --mem 64Mi -- true`, then
#      wait until Tessera lists all N as ended.
# Each time runs from the first submission to the moment the waiting loop
# (every 100 ms in both) sees the last job ended. Between the two, the
# jobs of step 1 are deleted from Ray, so both steps start with the same
# job table. Needs an idle Ray head (`ray start --head ...`, as .ci/run
# starts one) whose dashboard is at $RAY_ADDRESS.
# Usage: RAY_ADDRESS=http://127.0.0.1:8265 bash bench/pools-ray.sh [N] [OUT_DIR]   (default N = 200)
#   TESSERA_BIN=path  use this binary instead of building the release one
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
out="${2:-target/bench}"
ray="${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard URL, e.g. http://127.0.0.1:8265}"
ray="${ray%/}"
mkdir -p "$out"
if [ -z "${TESSERA_BIN:-}" ]; then
    cargo build --release --locked -p tessera-cli >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
else
    bin="$TESSERA_BIN"
fi
version=$(curl -fsS "$ray/api/version" | jq -r .ray_version) || {
    echo "no Ray dashboard answers at $ray" >&2
    exit 1
}
busy=$(curl -fsS "$ray/api/jobs/" | jq '[.[] | select(.status == "PENDING" or .status == "RUNNING")] | length')
if [ "$busy" != 0 ]; then
    echo "Ray has $busy jobs pending or running; the benchmark needs it idle" >&2
    exit 1
fi
cpus=$(curl -fsS "$ray/api/cluster_status?format=0" | jq '[.data.clusterStatus.loadMetricsReport.usageByNode[] | .CPU[1]] | add')
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); Ray $version, $cpus CPUs; $n jobs; binary $bin"

now() { date +%s.%N; }
scratch=$(mktemp -d)
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
    rm -rf "$scratch"
}
trap cleanup EXIT
run_tag="bench-$(date +%s)"

# Ray's view of the jobs whose submission id starts with $1: "<ended> <failed>".
ray_counts() {
    curl -fsS "$ray/api/jobs/" | jq -r --arg p "$1" '
        [.[] | select((.submission_id // "") | startswith($p))] as $js
        | "\([$js[] | select(.status == "SUCCEEDED" or .status == "FAILED" or .status == "STOPPED")] | length) \([$js[] | select(.status != "SUCCEEDED")] | length)"'
}

# ---- 1. straight to Ray's Jobs API
t0=$(now)
for i in $(seq "$n"); do
    curl -fsS -o /dev/null -H 'content-type: application/json' \
        -d "{\"entrypoint\": \"true\", \"submission_id\": \"$run_tag-$i\", \"entrypoint_num_cpus\": 0.1, \"entrypoint_memory\": 67108864}" \
        "$ray/api/jobs/"
done
t_submitted=$(now)
while true; do
    read -r ended failed < <(ray_counts "$run_tag-")
    [ "$ended" -ge "$n" ] && break
    sleep 0.1
done
t1=$(now)
ray_s=$(echo "$t1 - $t0" | bc -l)
ray_submit_s=$(echo "$t_submitted - $t0" | bc -l)
printf 'ray direct: %d jobs done in %.1f s (%.2f jobs/s; submitting took %.1f s; %s not SUCCEEDED)\n' \
    "$n" "$ray_s" "$(echo "$n / $ray_s" | bc -l)" "$ray_submit_s" "$failed"
for i in $(seq "$n"); do
    curl -fsS -o /dev/null -X DELETE "$ray/api/jobs/$run_tag-$i" 2>/dev/null || true
done

# ---- 2. through Tessera's Ray pool
before=$(curl -fsS "$ray/api/jobs/" | jq -c '[.[].submission_id]')
export TESSERA_HOME="$scratch/home"
mkdir -p "$TESSERA_HOME"
"$bin" up --listen 127.0.0.1:0 --no-cgroups >"$scratch/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 200); do
    [ -s "$TESSERA_HOME/config" ] && break
    sleep 0.05
done
[ -s "$TESSERA_HOME/config" ] || { cat "$scratch/up.log" >&2; exit 1; }
"$bin" pool add ray bench --address "$ray" >/dev/null
t0=$(now)
for _ in $(seq "$n"); do
    "$bin" run --pool bench --cpu 0.1 --mem 64Mi -- true >/dev/null
done
while true; do
    done_count=$("$bin" jobs --all -o json | jq '[.[] | select(.state == "succeeded" or .state == "failed" or .state == "lost" or .state == "cancelled")] | length')
    [ "$done_count" -ge "$n" ] && break
    sleep 0.1
done
t1=$(now)
pool_bad=$("$bin" jobs --all -o json | jq '[.[] | select(.state != "succeeded")] | length')
pool_s=$(echo "$t1 - $t0" | bc -l)
"$bin" pools
kill -TERM "$up_pid"
wait "$up_pid" 2>/dev/null || true
up_pid=""
# Leave Ray as found: delete the jobs this run's Tessera made.
for id in $(curl -fsS "$ray/api/jobs/" | jq -r --argjson before "$before" \
        '.[] | select(.metadata.tessera_key != null) | .submission_id | select(. as $s | $before | index($s) | not)'); do
    curl -fsS -o /dev/null -X DELETE "$ray/api/jobs/$id" 2>/dev/null || true
done
printf 'tessera ray pool: %d jobs done in %.1f s (%.2f jobs/s; %s not succeeded); %.3f× Ray direct (%+.1f%%)\n' \
    "$n" "$pool_s" "$(echo "$n / $pool_s" | bc -l)" "$pool_bad" \
    "$(echo "$pool_s / $ray_s" | bc -l)" "$(echo "($pool_s / $ray_s - 1) * 100" | bc -l)"

jq -n --argjson n "$n" --argjson ray "$ray_s" --argjson pool "$pool_s" \
    '{jobs: $n, ray_direct_s: $ray, tessera_ray_pool_s: $pool, pool_over_ray: ($pool / $ray)}' \
    | tee "$out/pools-ray.json"
