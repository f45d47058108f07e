#!/usr/bin/env bash
# One fair-share ledger across a mixed fleet (BENCHMARKS.md, "Pools: fair
# share across Slurm and own nodes"). `tessera up` (its local agent offers
# LOCAL_CPUS CPUs) plus a Slurm pool (`tessera pool add slurm`), two teams
# with fair-share weights W1 and W2, and both teams' queues kept full of
# short jobs (`sleep JOB_S`, 1 CPU, 64 MiB, no pool pinned, so each may run
# on the own node or in Slurm). After WARMUP_S seconds, each team's share of
# CPU-time over the next WINDOW_S seconds is read from Tessera's accounting
# (`tessera usage --by team --since ... --until ...`) and compared with its
# weight's share.
#
# Usage: bash bench/fairshare-mixed.sh [WINDOW_S] [OUT_DIR]   (default 240 s)
#   W1, W2        the teams' weights (default 1 and 2)
#   LOCAL_CPUS    CPUs of the own node (default 2; with Slurm's 2: 4 slots)
#   JOB_S         seconds each job sleeps (default 3)
#   WARMUP_S      seconds before the window opens (default 60)
#   QUEUE         queued jobs kept per team (default 6)
#   POOL_OPTS     extra `tessera pool add` flags, e.g. "--option queue_ahead=0"
#   TESSERA_BIN   use this binary instead of building the release one
# Needs a Slurm answering `sinfo` (bash .ci/slurm-up.sh) with no other work.
set -euo pipefail
cd "$(dirname "$0")/.."
window="${1:-240}"
out="${2:-target/bench}"
w1="${W1:-1}"
w2="${W2:-2}"
local_cpus="${LOCAL_CPUS:-2}"
job_s="${JOB_S:-3}"
warmup="${WARMUP_S:-60}"
queue="${QUEUE:-6}"
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
slurm_cpus=$(sinfo -h -o %c | head -1)
echo "machine: $(nproc) cores; Slurm $(sinfo -V | cut -d' ' -f2), one node of $slurm_cpus CPUs; own node $local_cpus CPUs;" \
    "weights $w1:$w2; jobs sleep $job_s s, 1 CPU each; warm-up $warmup s, window $window s; pool flags: ${POOL_OPTS:-none}; binary $bin"

scratch=$(mktemp -d)
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then
        # Queued and running jobs first, so nothing is left in Slurm.
        "$bin" jobs --all -o json 2>/dev/null |
            jq -r '.[] | select(.state == "queued" or .state == "scheduled" or .state == "running") | .id' |
            xargs -r -n 50 "$bin" cancel >/dev/null 2>&1 || true
        sleep 2
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

export TESSERA_HOME="$scratch/home"
mkdir -p "$TESSERA_HOME"
"$bin" up --listen 127.0.0.1:0 --no-cgroups --cpu "$local_cpus" --kill-grace 1s >"$scratch/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 200); do
    [ -s "$TESSERA_HOME/config" ] && break
    sleep 0.05
done
[ -s "$TESSERA_HOME/config" ] || { echo "tessera up did not start:" >&2; cat "$scratch/up.log" >&2; exit 1; }
# shellcheck disable=SC2086  # POOL_OPTS is a list of flags
"$bin" pool add slurm hpc ${POOL_OPTS:-} >/dev/null
"$bin" team create light --weight "$w1" >/dev/null
"$bin" team create heavy --weight "$w2" >/dev/null
"$bin" nodes

now_ms() { date +%s%3N; }
t_start=$(now_ms)
t_open=$((t_start + warmup * 1000))
t_close=$((t_open + window * 1000))
submitted=0
# Keep both queues full until the window closes.
while [ "$(now_ms)" -lt "$t_close" ]; do
    counts=$("$bin" jobs --state queued --all -o json | jq -r '[.[] | .spec.team] | "\(map(select(. == "light")) | length) \(map(select(. == "heavy")) | length)"')
    read -r q_light q_heavy <<<"$counts"
    for _ in $(seq $((queue - q_light))); do
        "$bin" run --team light --name fs-light --cpu 1 --mem 64Mi -- sleep "$job_s" >/dev/null
        submitted=$((submitted + 1))
    done
    for _ in $(seq $((queue - q_heavy))); do
        "$bin" run --team heavy --name fs-heavy --cpu 1 --mem 64Mi -- sleep "$job_s" >/dev/null
        submitted=$((submitted + 1))
    done
    sleep 0.3
done

"$bin" usage --by team --since "$t_open" --until "$t_close" -o json >"$scratch/by-team.json"
"$bin" usage --by pool --since "$t_open" --until "$t_close" -o json >"$scratch/by-pool.json"
for team in light heavy; do
    "$bin" usage --team "$team" --by pool --since "$t_open" --until "$t_close" -o json >"$scratch/$team-by-pool.json"
done
failed=$("$bin" jobs --all -o json | jq '[.[] | select(.state == "failed" or .state == "lost")] | length')

jq -n \
    --argjson w1 "$w1" --argjson w2 "$w2" --argjson window "$window" --argjson warmup "$warmup" \
    --argjson local_cpus "$local_cpus" --argjson slurm_cpus "$slurm_cpus" --argjson job_s "$job_s" \
    --argjson submitted "$submitted" --argjson failed "$failed" \
    --slurpfile team "$scratch/by-team.json" --slurpfile pool "$scratch/by-pool.json" \
    --slurpfile light "$scratch/light-by-pool.json" --slurpfile heavy "$scratch/heavy-by-pool.json" '
    def cpu(t): ($team[0].rows[] | select(.team == t) | .cpu_hours) // 0;
    def pools(r): [r[0].rows[] | {(.pool): .cpu_hours}] | add;
    (cpu("light") + cpu("heavy")) as $all
    | {weights: [$w1, $w2], own_node_cpus: $local_cpus, slurm_cpus: $slurm_cpus, job_s: $job_s,
       warmup_s: $warmup, window_s: $window, jobs_submitted: $submitted, jobs_failed_or_lost: $failed,
       cpu_hours: {light: cpu("light"), heavy: cpu("heavy")},
       share: {light: (cpu("light") / $all), heavy: (cpu("heavy") / $all)},
       target: {light: ($w1 / ($w1 + $w2)), heavy: ($w2 / ($w1 + $w2))},
       error_points: (100 * ((cpu("heavy") / $all) - ($w2 / ($w1 + $w2)))),
       relative_error: (((cpu("heavy") / $all) / ($w2 / ($w1 + $w2))) - 1),
       utilisation: ($all * 3600 / $window / ($local_cpus + $slurm_cpus)),
       by_pool: pools($pool), light_by_pool: pools($light), heavy_by_pool: pools($heavy)}' |
    tee "$out/fairshare-mixed.json"
jq -r '"light: \(.share.light * 100 | floor)% of CPU-time (target \(.target.light * 100 | . * 10 | round / 10)%), heavy: \(.share.heavy * 1000 | round / 10)% (target \(.target.heavy * 1000 | round / 10)%): heavy off by \(.error_points * 10 | round / 10) points (\(.relative_error * 1000 | round / 10)% of its target); slots busy \(.utilisation * 1000 | round / 10)%"' "$out/fairshare-mixed.json"
