#!/usr/bin/env bash
# Scripted benchmarks for BENCHMARKS.md. Builds the release binary, starts
# `tessera up` on a scratch home, runs the benchmarks and, in the same run,
# the machine's floors (process spawn, fsync) to compare against.
# Usage: bash bench/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench}"
mkdir -p "$out"
cargo build --release --locked -p tessera-cli >&2
bin="$PWD/target/release/tessera"
home="$(mktemp -d)"
export TESSERA_HOME="$home/home"
"$bin" up --listen 127.0.0.1:0 >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$home"' EXIT
for _ in $(seq 200); do [ -f "$TESSERA_HOME/config" ] && break; sleep 0.05; done

echo "== machine floors (same run)"
python3 - <<'PY' | tee "$out/floors.txt"
import os, subprocess, tempfile, time, statistics as st
def pct(xs, p): xs = sorted(xs); return xs[min(len(xs)-1, int(p/100*len(xs)))]
spawn = []
for _ in range(200):
    t = time.perf_counter(); subprocess.run(["/bin/true"]); spawn.append((time.perf_counter()-t)*1e3)
fd, path = tempfile.mkstemp(); fs = []
for _ in range(200):
    os.write(fd, b"x"*100); t = time.perf_counter(); os.fsync(fd); fs.append((time.perf_counter()-t)*1e3)
os.close(fd); os.unlink(path)
print(f"spawn+reap /bin/true: p50 {pct(spawn,50):.2f} ms, p99 {pct(spawn,99):.2f} ms")
print(f"fsync of a small write: p50 {pct(fs,50):.2f} ms, p99 {pct(fs,99):.2f} ms")
PY

echo "== scheduler (pure, 1000 nodes x 8 GPUs, 100000 queued)"
"$bin" bench scheduler --nodes 1000 --gpus-per-node 8 --jobs 100000 | tee "$out/scheduler.txt"

echo "== durable submissions through the REST API"
"$bin" bench submit --jobs 20000 --concurrency 64 | tee "$out/submit.txt"

echo "== trivial jobs end to end"
"$bin" bench e2e --jobs 1000 --serial 50 --concurrency 32 | tee "$out/e2e.txt"

echo "== CLI included: tessera run -f -- true, one at a time"
python3 - "$bin" <<'PY' | tee "$out/cli.txt"
import subprocess, sys, time
bin = sys.argv[1]; xs = []
for _ in range(20):
    t = time.perf_counter()
    subprocess.run([bin, "run", "-f", "--cpu", "100m", "--mem", "16Mi", "--", "true"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    xs.append((time.perf_counter()-t)*1e3)
xs.sort()
print(f"tessera run -f -- true (CLI process, submit, run, logs, exit): p50 {xs[len(xs)//2]:.1f} ms, min {xs[0]:.1f} ms (20 runs)")
PY
