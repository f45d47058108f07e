#!/usr/bin/env bash
# Data lake: ingest and query speed against DuckDB on the same machine, in
# one run.
#
#   1. A CSV of about SIZE_MIB MiB (default 1024) is generated in a temp
#      directory (never kept): id, user_id, country, amount, day, active —
#      about 42 bytes a row, so 1 GiB is about 26 million rows.
#   2. Baseline: DuckDB (Python package) converts it to Parquet
#      (`COPY (SELECT * FROM read_csv(...)) TO ... (FORMAT parquet)`).
#   3. Tessera: `tessera data upload` streams it to `tessera up` (release
#      build), which ingests it as a Delta table version — the transfer,
#      CSV parsing, Parquet encoding and the commit included.
#   4. Query: a group-by over the whole table (checked to hold at least
#      10 million rows), `tessera data query` — the CLI process, HTTP and
#      the table's log included — against DuckDB (in process, its start not
#      counted) reading the same Parquet files the table is made of.
#
# With BASE_BIN set to another `tessera` binary (say, a build of the
# commit before a change), that binary runs the same uploads and queries
# in the same run, alternating with BIN, each on its own `tessera up`.
#
# Prints one JSON object with the seconds of each and the ratios
# (ingest: DuckDB's time / Tessera's, higher is better for Tessera; query:
# Tessera's time / DuckDB's, lower is better). Each timing is the best of
# REPS (default 3).
#
# Usage: PYTHON=/path/to/python-with-duckdb SIZE_MIB=1024 REPS=3 \
#        [BIN=path/to/tessera] [BASE_BIN=path/to/other/tessera] bash bench/lake.sh
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${SIZE_MIB:-1024}"
reps="${REPS:-3}"
py="${PYTHON:-python3}"
"$py" -c "import duckdb" 2>/dev/null || { echo "bench/lake.sh needs a Python with duckdb (set PYTHON)" >&2; exit 1; }

bin="${BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release -q -p tessera-cli
    bin="${CARGO_TARGET_DIR:-target}/release/tessera"
fi
base_bin="${BASE_BIN:-}"

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

csv="$work/events.csv"
rows=$(( size_mib * 1024 * 1024 / 42 ))
"$py" - "$csv" "$rows" <<'EOF'
import sys, duckdb
path, rows = sys.argv[1], int(sys.argv[2])
duckdb.sql(f"""
COPY (
  SELECT i AS id,
         (i * 7919) % 1000003 AS user_id,
         ['fr','de','it','es','nl','pl','se','pt'][1 + (i % 8)] AS country,
         round(((i * 31) % 100000) / 100.0, 2) AS amount,
         DATE '2024-01-01' + CAST(i % 366 AS INTEGER) AS day,
         (i % 3 = 0) AS active
  FROM range({rows}) t(i)
) TO '{path}' (FORMAT csv, HEADER true)
""")
EOF
bytes=$(stat -c %s "$csv")

now() { date +%s.%N; }
best() { sort -g | head -1; }
sql_for() { echo "SELECT country, count(*) AS n, sum(amount) AS total FROM $1 GROUP BY country ORDER BY country"; }

# Baseline: DuckDB, CSV to Parquet.
duck_ingest=$(for _ in $(seq "$reps"); do
    rm -f "$work/duck.parquet"
    "$py" - "$csv" "$work/duck.parquet" <<'EOF'
import sys, time, duckdb
t = time.perf_counter()
duckdb.sql(f"COPY (SELECT * FROM read_csv('{sys.argv[1]}')) TO '{sys.argv[2]}' (FORMAT parquet)")
print(time.perf_counter() - t)
EOF
done | best)
rm -f "$work/duck.parquet"

# One `tessera up` per binary, each on its own home.
start() { # label binary
    local home="$work/$1"
    mkdir -p "$home"
    TESSERA_HOME="$home" "$2" up --listen 127.0.0.1:0 --no-cgroups >"$work/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do [ -f "$home/config" ] && break; sleep 0.05; done
}
labels=(new)
bins=("$bin")
if [ -n "$base_bin" ]; then labels=(base new); bins=("$base_bin" "$bin"); fi
for i in "${!labels[@]}"; do start "${labels[$i]}" "${bins[$i]}"; done

# Uploads, the binaries alternating: one dataset per upload.
for r in $(seq "$reps"); do
    for i in "${!labels[@]}"; do
        l="${labels[$i]}"
        t0=$(now)
        TESSERA_HOME="$work/$l" "${bins[$i]}" data upload "events$r" "$csv" --output json >"$work/$l.up$r.json"
        t1=$(now)
        echo "$t1 - $t0" | bc -l >>"$work/$l.ingest"
    done
done
for l in "${labels[@]}"; do
    n=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['rows'])" "$work/$l.up1.json")
    [ "$n" = "$rows" ] || { echo "$l: the table holds $n rows, not $rows" >&2; exit 1; }
done
[ "$rows" -ge 10000000 ] || echo "note: $rows rows, fewer than the 10 million the query target names (raise SIZE_MIB)" >&2

# Query: the same group-by, Tessera over the table and DuckDB over its files.
for r in $(seq "$reps"); do
    for i in "${!labels[@]}"; do
        l="${labels[$i]}"
        t0=$(now)
        TESSERA_HOME="$work/$l" "${bins[$i]}" data query "$(sql_for events1)" --format csv >"$work/$l.q$r.csv"
        t1=$(now)
        echo "$t1 - $t0" | bc -l >>"$work/$l.query"
        "$py" - "$work/$l/lake/datasets/admin/events1/table" "$(sql_for "read_parquet('$work/$l/lake/datasets/admin/events1/table/*.parquet')")" <<'EOF' >>"$work/$l.duckq"
import sys, time, duckdb
t = time.perf_counter()
duckdb.sql(sys.argv[2]).fetchall()
print(time.perf_counter() - t)
EOF
    done
done

"$py" - "$work" "$bytes" "$rows" "$(nproc)" "$duck_ingest" "${labels[@]}" <<'EOF'
import json, os, re, sys
work, nbytes, rows, cores, di = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
best = lambda name: min(float(x) for x in open(os.path.join(work, name)).read().split())
out = {"csv_bytes": nbytes, "rows": rows, "cores": cores, "duckdb_csv_to_parquet_s": round(di, 2)}
for l in sys.argv[6:]:
    ti, tq, dq = best(f"{l}.ingest"), best(f"{l}.query"), best(f"{l}.duckq")
    table = os.path.join(work, l, "lake/datasets/admin/events1/table")
    files = [f for f in os.listdir(table) if f.endswith(".parquet")]
    out[l] = {
        "tessera_upload_s": round(ti, 2),
        "ingest_ratio_duckdb_over_tessera": round(di / ti, 2),
        "tessera_upload_mib_s": round(nbytes / 1048576 / ti, 1),
        "parquet_files": len(files),
        "parquet_mib": round(sum(os.path.getsize(os.path.join(table, f)) for f in files) / 1048576, 1),
        "duckdb_groupby_s": round(dq, 3), "tessera_groupby_s": round(tq, 3),
        "query_ratio_tessera_over_duckdb": round(tq / dq, 2),
    }
    # Where the upload's time went, from the server's log (when it says).
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(work, f"{l}.log")).read())
    for what, key in (("received", "server_receive_s"), ("ingested", "server_ingest_s")):
        xs = [float(x) for x in re.findall(rf"upload {what}.*?seconds=([0-9.]+)", log)]
        if xs:
            out[l][key] = round(min(xs), 2)
print(json.dumps(out, indent=1))
EOF
