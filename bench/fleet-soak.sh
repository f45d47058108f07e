#!/usr/bin/env bash
# Fleet soak: a server and three agents in Docker containers on a private
# network run many short jobs while agents and the server are killed and
# restarted at random. Every copy of every job records when it ran (in a
# directory shared by the agents); at the end the script reports, as JSON:
# jobs and how they ended, the kills and restarts done, jobs lost, copies of
# one job that overlapped in time, and re-runs after node loss.
#
# Not run by CI. Needs Docker, jq and python3; pulls no image (the host's
# /usr is bind-mounted into a tiny local image, as in
# crates/tessera-cli/tests/fleet.rs).
#
# Usage: bash bench/fleet-soak.sh [--duration SECONDS] [--jobs N]
#            [--job-seconds S] [--job-cpu C] [--bin PATH] [--out DIR] [--no-cuts]
#   --duration     how long the chaos lasts (default 300)
#   --jobs         how many jobs are submitted, spread over the chaos (default 1000)
#   --job-seconds  how long each job sleeps (default 2)
#   --job-cpu      CPU per job; each agent offers 2 (default 0.4, so jobs spread)
#   --bin          the tessera binary (default: build target/release/tessera)
#   --out          where the report and logs go (default target/fleet-soak)
#   --no-cuts      only kills and restarts; no network cuts
set -euo pipefail
cd "$(dirname "$0")/.."

duration=300 jobs=1000 job_seconds=2 job_cpu=0.4 bin="" out="target/fleet-soak" cuts=1
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --job-seconds) job_seconds="$2"; shift 2 ;;
        --job-cpu) job_cpu="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --no-cuts) cuts=0; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
docker info >/dev/null 2>&1 || { echo "fleet-soak needs Docker (docker info failed)" >&2; exit 1; }
command -v jq >/dev/null || { echo "fleet-soak needs jq" >&2; exit 1; }
if [ -z "$bin" ]; then
    cargo build --release --locked -p tessera-cli >&2
    bin="$PWD/target/release/tessera"
fi
bin="$(readlink -f "$bin")"
mkdir -p "$out"
out="$(readlink -f "$out")"

image=tessera-fleet-base:test
tag="tessera-soak-$$-$RANDOM"
work="$(mktemp -d)"
agents=(a1 a2 a3)
chaos_log="$out/chaos.jsonl"
: >"$chaos_log"

cleanup() {
    docker rm -f "$tag-server" "${agents[@]/#/$tag-}" >/dev/null 2>&1 || true
    docker network rm "$tag" >/dev/null 2>&1 || true
    for n in server "${agents[@]}"; do
        cp "$work/$n/"*.log "$out/" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# ---- the base image: empty directories and the host's symlinks ----
host_dirs=(usr bin lib lib32 lib64 libx32)
if ! docker image inspect "$image" >/dev/null 2>&1; then
    root="$work/root"
    mkdir -p "$root"/{etc,proc,sys,dev,data,shared,opt/tessera,sbin,tmp}
    chmod 1777 "$root/tmp"
    for d in "${host_dirs[@]}"; do
        if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"
        elif [ -d "/$d" ]; then mkdir -p "$root/$d"; fi
    done
    tar --numeric-owner -C "$root" -cf "$work/base.tar" .
    docker import "$work/base.tar" "$image" >/dev/null
fi

now_ms() { date +%s%3N; }
log_chaos() { echo "{\"time\": $(now_ms), \"action\": \"$1\", \"target\": \"$2\"}" >>"$chaos_log"; }

mkdir -p "$work/shared" "$work/cli"
user="$(id -u):$(id -g)"
container() { # name [docker run args...]
    local name="$1"; shift
    mkdir -p "$work/$name"
    local mounts=()
    for d in "${host_dirs[@]}"; do
        if [ -d "/$d" ] && [ ! -L "/$d" ]; then mounts+=(-v "/$d:/$d:ro"); fi
    done
    for f in ld.so.cache passwd group nsswitch.conf; do
        if [ -f "/etc/$f" ]; then mounts+=(-v "/etc/$f:/etc/$f:ro"); fi
    done
    docker run -d --init --name "$tag-$name" --hostname "$name" --network "$tag" --user "$user" \
        -e TESSERA_HOME=/data -e RUST_LOG=info -e PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        "${mounts[@]}" -v "$bin:/opt/tessera/tessera:ro" -v "$work/$name:/data" -v "$work/shared:/shared" \
        "$@" "$image" /bin/sh -c 'while :; do sleep 3600; done' >/dev/null
}
spawn() { # container role args
    docker exec -d "$tag-$1" /bin/sh -c "echo \$\$ > /data/$2.pid; exec /opt/tessera/tessera $2 $3 >> /data/$2.log 2>&1"
}
kill9() { # container role
    local pid
    pid="$(cat "$work/$1/$2.pid")"
    docker exec "$tag-$1" /bin/sh -c "kill -9 $pid 2>/dev/null; while [ -e /proc/$pid ] && ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status 2>/dev/null; do sleep 0.05; done" || true
}
start_server() {
    rm -f "$work/server/config"
    spawn server server "--listen 0.0.0.0:7700 --heartbeat 500ms --node-lease 6s --kill-grace 500ms"
    for _ in $(seq 200); do [ -f "$work/server/config" ] && return; sleep 0.05; done
    echo "the server did not start" >&2; exit 1
}
start_agent() {
    spawn "$1" agent "--server http://$tag-server:7700 --join-token $join_token --name $1 --cpu 2 --memory 4Gi --no-cgroups --kill-grace 500ms"
}

docker network create "$tag" >/dev/null
container server -p 127.0.0.1::7700
start_server
export TESSERA_URL="http://$(docker port "$tag-server" 7700/tcp | head -1)"
export TESSERA_TOKEN="$(cat "$work/server/admin.token")"
export TESSERA_HOME="$work/cli"
t() { "$bin" "$@"; }
for _ in $(seq 100); do t nodes >/dev/null 2>&1 && break; sleep 0.1; done
join_token="$(t join-token create -o json | jq -r .token)"
for a in "${agents[@]}"; do container "$a"; start_agent "$a"; done
for _ in $(seq 100); do
    [ "$(t nodes -o json 2>/dev/null | jq '[.[] | select(.state == "ready")] | length')" = 3 ] && break
    sleep 0.2
done

# ---- the jobs: each copy records its interval ----
script='f=/shared/$TESSERA_JOB_ID.$TESSERA_ATTEMPT.$TESSERA_REPLICA.$(cat /etc/hostname)
trap '"'"'echo "term $(date +%s%N)" >> "$f"; exit 143'"'"' TERM
echo "start $(date +%s%N)" >> "$f"
sleep '"$job_seconds"' & wait $!
echo "end $(date +%s%N)" >> "$f"'
spec="$(jq -n --arg s "$script" --arg cpu "$job_cpu" '{script: $s, resources: {cpu: $cpu, memory: "16Mi"},
    retries: {on_failure: 0, on_node_loss: 10}}')"
submitted="$out/submitted.txt"
: >"$submitted"
submit_all() {
    # Spread over 70% of the chaos; a submission that fails (server down) is retried.
    local gap
    gap="$(python3 -c "print(max(0.0, $duration * 0.7 / $jobs))")"
    for i in $(seq "$jobs"); do
        local f="$work/job.json"
        echo "$spec" | jq --arg n "soak-$i" '.name = $n' >"$f"
        for _ in $(seq 600); do
            if id="$(t submit "$f" -o json 2>/dev/null | jq -r .id)" && [ -n "$id" ] && [ "$id" != null ]; then
                echo "$i $id" >>"$submitted"
                break
            fi
            sleep 0.2
        done
        sleep "$gap"
    done
}
submit_all &
submitter=$!

# ---- chaos ----
began=$(date +%s)
while [ $(( $(date +%s) - began )) -lt "$duration" ]; do
    sleep "$(python3 -c "import random; print(random.uniform(2, 6))")"
    r=$((RANDOM % 100))
    a="${agents[$((RANDOM % 3))]}"
    pause="$(python3 -c "import random; print(random.uniform(0, 2.5))")"
    if [ "$r" -lt 35 ]; then
        log_chaos agent_process_kill "$a"; kill9 "$a" agent
        sleep "$pause"; start_agent "$a"; log_chaos agent_restart "$a"
    elif [ "$r" -lt 60 ]; then
        docker kill "$tag-$a" >/dev/null
        while [ "$(docker inspect -f '{{.State.Running}}' "$tag-$a")" = true ]; do sleep 0.05; done
        log_chaos container_kill "$a"
        sleep "$pause"; docker start "$tag-$a" >/dev/null; start_agent "$a"; log_chaos agent_restart "$a"
    elif [ "$r" -lt 80 ]; then
        log_chaos server_kill server; kill9 server server
        sleep "$pause"; start_server; log_chaos server_restart server
    elif [ "$cuts" = 1 ]; then
        cut="$(python3 -c "import random; print(random.uniform(1, 10))")"
        docker network disconnect "$tag" "$tag-$a"; log_chaos network_cut "$a"
        sleep "$cut"; docker network connect "$tag" "$tag-$a"; log_chaos network_reconnect "$a"
    fi
done
log_chaos chaos_end -
wait "$submitter"

# ---- settle: every job ends ----
deadline=$(( $(date +%s) + 300 ))
while :; do
    active="$(t jobs -o json --all 2>/dev/null | jq '[.[] | select(.state | IN("succeeded","failed","cancelled","lost") | not)] | length' || echo '?')"
    [ "$active" = 0 ] && break
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "jobs still active after 300 s: $active" >&2; break; fi
    sleep 1
done
t jobs -o json --all >"$out/jobs.json"
mkdir -p "$out/events"
jq -r '.[].id' "$out/jobs.json" | while read -r id; do
    t job "$id" -o json | jq -c '.events' >"$out/events/$id.json"
done
rm -rf "$out/intervals"; cp -r "$work/shared" "$out/intervals"

python3 - "$out" "$duration" "$jobs" <<'PY'
import json, os, sys, collections
out, duration, wanted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jobs = json.load(open(f"{out}/jobs.json"))
chaos = [json.loads(l) for l in open(f"{out}/chaos.jsonl")]
killed = collections.defaultdict(list)  # host -> [ns]: every process in its container dead by then
for c in chaos:
    if c["action"] == "container_kill":
        killed[c["target"]].append(c["time"] * 1_000_000)
end_of_chaos = max(c["time"] for c in chaos) * 1_000_000
copies = collections.defaultdict(list)
bad_records = 0
for name in os.listdir(f"{out}/intervals"):
    parts = name.split(".", 3)
    if len(parts) != 4:
        continue
    job, attempt, _, host = int(parts[0]), int(parts[1]), parts[2], parts[3]
    start = end = None
    how = None
    for line in open(f"{out}/intervals/{name}"):
        w = line.split()
        if len(w) != 2 or not w[1].isdigit():
            bad_records += 1
            continue
        if w[0] == "start":
            if start is not None:
                bad_records += 1
            start = int(w[1])
        elif w[0] in ("end", "term") and end is None:
            end, how = int(w[1]), w[0]
    if start is None:
        continue
    unaccounted = False
    if end is None:
        after = [k for k in killed[host] if k >= start]
        if after:
            end, how = min(after), "container killed"
        else:
            # Nothing shows it stopped: count it as running to the end.
            end, how, unaccounted = 1 << 80, "unaccounted", True
    copies[job].append(dict(attempt=attempt, host=host, start=start, end=end, how=how,
                            unaccounted=unaccounted))
overlaps = []
for job, cs in copies.items():
    cs.sort(key=lambda c: c["start"])
    for i, a in enumerate(cs):
        for b in cs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                overlaps.append(dict(job=job, a=a, b=b))
states = collections.Counter(j["state"] for j in jobs)
terminal = ("succeeded", "failed", "cancelled")
lost_events = requeued_node_loss = multi_terminal = reruns_of_finished = 0
for j in jobs:
    ev = json.load(open(f"{out}/events/{j['id']}.json"))
    kinds = [e["kind"] for e in ev]
    lost_events += kinds.count("lost")
    requeued_node_loss += sum(1 for e in ev if e["kind"] == "requeued" and "node loss" in e["message"])
    if sum(1 for k in kinds if k in terminal) > 1:
        multi_terminal += 1
    # A copy that ran to its end, and yet the job ran again.
    cs = copies.get(j["id"], [])
    if any(c["how"] == "end" for c in cs[:-1]):
        reruns_of_finished += 1
count = lambda a: sum(1 for c in chaos if c["action"] == a)
report = {
    "duration_s": duration,
    "jobs_wanted": wanted,
    "jobs": len(jobs),
    "job_states": dict(states),
    "kills": {"agent_process": count("agent_process_kill"), "agent_container": count("container_kill"),
              "server": count("server_kill")},
    "restarts": {"agent": count("agent_restart"), "server": count("server_restart")},
    "network_cuts": count("network_cut"),
    "lost_events": lost_events,
    "jobs_ended_lost": states.get("lost", 0),
    "requeues_after_node_loss": requeued_node_loss,
    "jobs_run_more_than_once": sum(1 for cs in copies.values() if len(cs) > 1),
    "reruns_of_copies_that_had_finished": reruns_of_finished,
    "jobs_with_two_terminal_events": multi_terminal,
    "copies": sum(len(cs) for cs in copies.values()),
    "copies_unaccounted": sum(1 for cs in copies.values() for c in cs if c["unaccounted"]),
    "overlaps": len(overlaps),
    "overlap_examples": overlaps[:5],
    "bad_records": bad_records,
}
json.dump(report, open(f"{out}/report.json", "w"), indent=2)
print(json.dumps(report, indent=2))
PY
