#!/usr/bin/env bash
# Serving benchmarks for BENCHMARKS.md ("Serving: scale from zero and
# autoscaling"). Not run by CI. Starts `tessera up` with a scratch
# TESSERA_HOME on a free loopback port and measures, in the same run:
#
#   baseline:   the replica's own start time T: the replica command (a Python
#               HTTP server that sleeps DELAY seconds before it listens) is
#               started directly with /bin/sh -c, N times per DELAY, and timed
#               until GET /health answers (polled every 5 ms);
#   zero:       scale from zero: for each DELAY, a service (min 0, max 1,
#               scale_to_zero_after 1s) is left to scale to zero, then one
#               request is sent through the gateway and timed to the end of
#               its response; the overhead is that latency minus T (the
#               baseline median of the same DELAY). Per repetition the
#               report splits the time along the service loop: demand seen
#               (scale event) -> job inserted (replica-started event, job
#               submitted_at) -> scheduled_at -> started_at -> ready event
#               (route published in the same pass) -> response;
#   autoscale:  a service (replicas min 1 max 8, target_inflight_per_replica
#               2, panic_window 6s, stable_window 60s) whose requests take
#               WORK=0.2 s gets 1 closed-loop client for PRE seconds, then a
#               step to 16 clients; the time from the step until the service
#               shows 8 ready replicas (polled every 50 ms from
#               GET /v1/services/NAME, what `tessera service NAME -o json`
#               prints) is compared with panic_window + T.
#
# Prints one JSON report on stdout (also written to OUT_DIR/serving.json).
# Usage: bash bench/serving.sh [OUT_DIR] [TESSERA_BINARY]
#   env: DELAYS="0 0.5 2" REPS=5 BASE_N=5 STEP_REPS=2 PRE=8 HOLD=45
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-serving}"
bin="${2:-}"
mkdir -p "$out"
if [ -z "$bin" ]; then
    cargo build --release --locked -p tessera-cli >&2
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release/tessera"
fi
{ git rev-parse HEAD && git status --short; } >"$out/commit.txt" 2>&1 || true

work="$(mktemp -d)"
home="$work/home"
mkdir -p "$home"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then
        kill -TERM "$up_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$up_pid" 2>/dev/null || true
    fi
    cp "$work/up.log" "$out/up.log" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
TESSERA_HOME="$home" "$bin" up --listen "127.0.0.1:$port" --no-cgroups --kill-grace 1s \
    </dev/null >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 400); do
    [ -s "$home/admin.token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
done

cat >"$work/replica.py" <<'PY'
import os, time
d = float(os.environ.get("DELAY", "0"))
if d:
    time.sleep(d)
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
W = float(os.environ.get("WORK", "0"))
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path != "/health" and W:
            time.sleep(W)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class S(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
S(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
PY

cat >"$work/driver.py" <<'PY'
import http.client, json, os, socket, statistics, subprocess, sys, threading, time

BIN, HOME, ADDR, WORK = sys.argv[1:5]
HOST, PORT = ADDR.split(":")
TOKEN = open(os.path.join(HOME, "admin.token")).read().strip()
REPLICA = os.path.join(WORK, "replica.py")
SCRIPT = "exec python3 " + REPLICA
DELAYS = [float(x) for x in os.environ.get("DELAYS", "0 0.5 2").split()]
REPS = int(os.environ.get("REPS", "5"))
BASE_N = int(os.environ.get("BASE_N", "5"))
STEP_REPS = int(os.environ.get("STEP_REPS", "2"))
PRE = float(os.environ.get("PRE", "8"))
HOLD = float(os.environ.get("HOLD", "45"))

def log(*a):
    print(*a, file=sys.stderr, flush=True)

def now_ms():
    return time.time() * 1000.0

def api(path):
    c = http.client.HTTPConnection(HOST, int(PORT), timeout=10)
    c.request("GET", path, headers={"Authorization": "Bearer " + TOKEN})
    r = c.getresponse()
    body = r.read()
    c.close()
    return json.loads(body)

def detail(name):
    return api("/v1/services/" + name)

def job(i):
    j = api("/v1/jobs/%d" % i)
    return j.get("job", j)

def serve(yaml, name):
    path = os.path.join(WORK, name + ".yaml")
    open(path, "w").write(yaml)
    out = subprocess.run([BIN, "-o", "json", "serve", path], env=dict(os.environ, TESSERA_HOME=HOME),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("serve failed: " + out.stderr)

def delete(name):
    subprocess.run([BIN, "serve", "--delete", name], env=dict(os.environ, TESSERA_HOME=HOME),
                   capture_output=True)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def health(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/health")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

def summary(xs):
    return {"p50": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1), "n": len(xs)}

# ---- baseline: the replica command started directly -------------------
def baseline(delay):
    times = []
    for _ in range(BASE_N):
        port = free_port()
        t0 = time.monotonic()
        p = subprocess.Popen(["/bin/sh", "-c", SCRIPT], env=dict(os.environ, PORT=str(port), DELAY=str(delay)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not health(port):
            if time.monotonic() - t0 > 30:
                raise SystemExit("replica never answered")
            time.sleep(0.005)
        times.append((time.monotonic() - t0) * 1000)
        p.kill(); p.wait()
    return times

# ---- scale from zero -----------------------------------------------------
def wait_zero(name, limit=60):
    t0 = time.monotonic()
    while True:
        d = detail(name)
        if d["summary"]["desired"] == 0 and not d["replicas"]:
            return
        if time.monotonic() - t0 > limit:
            raise SystemExit("%s never scaled to zero: %s" % (name, json.dumps(d)[:2000]))
        time.sleep(0.1)

def request(path):
    c = http.client.HTTPConnection(HOST, int(PORT), timeout=60)
    c.request("GET", path, headers={"Authorization": "Bearer " + TOKEN})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status

def scale_from_zero(delay, base_ms):
    name = "zero%d" % int(delay * 1000)
    serve("name: %s\nscript: %s\nenv: {DELAY: \"%s\"}\nresources: {cpu: 0.1, memory: 64Mi}\n"
          "replicas: {min: 0, max: 1}\nreadiness: {path: /health, interval: 1s}\n"
          "autoscale: {scale_to_zero_after: 1s}\n" % (name, SCRIPT, delay), name)
    reps = []
    for i in range(REPS):
        wait_zero(name)
        time.sleep(0.5)
        t0 = now_ms()
        status = request("/s/%s/x" % name)
        t1 = now_ms()
        if status != 200:
            raise SystemExit("status %d" % status)
        time.sleep(0.3)
        ev = [e for e in detail(name)["events"] if e["time"] >= t0 - 1]
        def first(kind, contains=""):
            for e in ev:
                if e["kind"] == kind and contains in e["message"]:
                    return e
            return None
        started = first("replica-started")
        jid = int(started["message"].split()[2]) if started else None
        j = job(jid) if jid else {}
        scale = first("scale", "scale from zero")
        ready = first("ready")
        rel = lambda t: None if t is None else round(t - t0, 1)
        r = {
            "latency_ms": round(t1 - t0, 1),
            "overhead_ms": round(t1 - t0 - base_ms, 1),
            "demand_scale_event": rel(scale and scale["time"]),
            "job_submitted": rel(j.get("submitted_at")),
            "replica_started_event": rel(started and started["time"]),
            "job_scheduled": rel(j.get("scheduled_at")),
            "job_started": rel(j.get("started_at")),
            "ready_event": rel(ready and ready["time"]),
            "response": round(t1 - t0, 1),
        }
        log("  zero delay=%s rep=%d %s" % (delay, i, json.dumps(r)))
        reps.append(r)
    delete(name)
    return reps

# ---- autoscaler step -----------------------------------------------------
class Client(threading.Thread):
    def __init__(self, path, stop, counts):
        super().__init__(daemon=True)
        self.path, self.stop, self.counts = path, stop, counts
    def run(self):
        c = None
        while not self.stop.is_set():
            try:
                if c is None:
                    c = http.client.HTTPConnection(HOST, int(PORT), timeout=60)
                c.request("GET", self.path, headers={"Authorization": "Bearer " + TOKEN})
                r = c.getresponse(); r.read()
                self.counts[r.status] = self.counts.get(r.status, 0) + 1
            except (OSError, http.client.HTTPException):
                self.counts["error"] = self.counts.get("error", 0) + 1
                c = None
                time.sleep(0.05)

def step(rep, base_ms):
    name = "auto%d" % rep
    serve("name: %s\nscript: %s\nenv: {WORK: \"0.2\"}\nresources: {cpu: 0.1, memory: 64Mi}\n"
          "replicas: {min: 1, max: 8}\nreadiness: {path: /health, interval: 1s}\n"
          "autoscale: {target_inflight_per_replica: 2, panic_window: 6s, stable_window: 60s}\n"
          % (name, SCRIPT), name)
    t0 = time.monotonic()
    while detail(name)["summary"]["ready"] < 1:
        if time.monotonic() - t0 > 30:
            raise SystemExit("no first replica")
        time.sleep(0.05)
    stop = threading.Event(); counts = {}
    clients = [Client("/s/%s/x" % name, stop, counts)]
    clients[0].start()
    time.sleep(PRE)
    ts_wall = now_ms(); ts = time.monotonic()
    for _ in range(15):
        c = Client("/s/%s/x" % name, stop, counts); c.start(); clients.append(c)
    timeline = []; last = None; reached = None; desired_reached = None
    while time.monotonic() - ts < HOLD:
        s = detail(name)["summary"]
        at = round((time.monotonic() - ts) * 1000)
        if (s["desired"], s["ready"]) != last:
            last = (s["desired"], s["ready"])
            timeline.append([at, s["desired"], s["ready"]])
        if desired_reached is None and s["desired"] >= 8:
            desired_reached = at
        if reached is None and s["ready"] >= 8:
            reached = at
            break
        time.sleep(0.05)
    time.sleep(1)
    stop.set()
    for c in clients:
        c.join(timeout=5)
    ev = [{"t_ms": round(e["time"] - ts_wall), "kind": e["kind"], "message": e["message"]}
          for e in detail(name)["events"] if e["kind"] == "scale" and e["time"] >= ts_wall - 2000]
    delete(name)
    r = {"ready_8_after_ms": reached, "desired_8_after_ms": desired_reached,
         "timeline_ms_desired_ready": timeline, "scale_events": ev, "responses": counts}
    log("  step rep=%d %s" % (rep, json.dumps(r)))
    return r

report = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "baseline": {}, "zero": {}}
base = {}
for d in DELAYS:
    ts = baseline(d)
    base[d] = statistics.median(ts)
    report["baseline"][str(d)] = {"start_ms": summary(ts)}
    log("baseline delay=%s %s" % (d, report["baseline"][str(d)]))
for d in DELAYS if REPS > 0 else []:
    reps = scale_from_zero(d, base[d])
    lat = [r["latency_ms"] for r in reps]
    over = [r["overhead_ms"] for r in reps]
    phases = {}
    keys = ["demand_scale_event", "job_submitted", "replica_started_event", "job_scheduled", "job_started", "ready_event", "response"]
    for k in keys:
        xs = [r[k] for r in reps if r[k] is not None]
        if xs:
            phases[k] = round(statistics.median(xs), 1)
    report["zero"][str(d)] = {
        "T_ms": round(base[d], 1),
        "first_request_ms": summary(lat),
        "overhead_ms": summary(over),
        "target_met": max(over) <= 100,
        "phases_p50_ms_after_request": phases,
        "reps": reps,
    }
if STEP_REPS > 0:
    t_ms = base.get(0.0, statistics.median(baseline(0.0)))
    steps = [step(i, t_ms) for i in range(STEP_REPS)]
    bound = 6000 + t_ms
    reached = [s["ready_8_after_ms"] for s in steps]
    report["autoscale"] = {
        "bound_ms": round(bound, 1),
        "ready_8_after_ms": reached,
        "target_met": all(r is not None and r <= bound for r in reached),
        "steps": steps,
    }
print(json.dumps(report, indent=1))
PY

python3 "$work/driver.py" "$bin" "$home" "127.0.0.1:$port" "$work" | tee "$out/serving.json"
