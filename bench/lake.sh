#!/usr/bin/env bash
# Data lake: ingest and query speed against DuckDB on the same machine, in
# one run.
#
#   1. A CSV of about SIZE_MIB MiB (default 1024) is generated in a temp
#      directory (never kept): id, user, country, amount, day, active.
#   2. Baseline: DuckDB (Python package) converts it to Parquet
#      (`COPY (SELECT * FROM read_csv(...)) TO ... (FORMAT parquet)`).
#   3. Tessera: `tessera data upload` streams it to `tessera up` (release
#      build), which ingests it as a Delta table version — CSV parsing,
#      Parquet encoding and the commit included.
#   4. Query: a group-by over the table, `tessera data query` against
#      DuckDB reading the same Parquet files the table is made of.
#
# Prints one JSON object with the seconds of each and the ratios
# (ingest: DuckDB's time / Tessera's, higher is better for Tessera; query:
# Tessera's time / DuckDB's, lower is better). Each timing is the best of
# REPS (default 2).
#
# Usage: PYTHON=/path/to/python-with-duckdb SIZE_MIB=1024 REPS=2 bash bench/lake.sh
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${SIZE_MIB:-1024}"
reps="${REPS:-2}"
py="${PYTHON:-python3}"
"$py" -c "import duckdb" 2>/dev/null || { echo "bench/lake.sh needs a Python with duckdb (set PYTHON)" >&2; exit 1; }

bin="${BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release -q -p tessera-cli
    bin="${CARGO_TARGET_DIR:-target}/release/tessera"
fi

work="$(mktemp -d)"
up_pid=""
cleanup() {
    if [ -n "$up_pid" ]; then kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

csv="$work/events.csv"
rows=$(( size_mib * 1024 * 1024 / 40 ))
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

# Tessera: tessera up, then upload.
export TESSERA_HOME="$work/home"
mkdir -p "$TESSERA_HOME"
"$bin" up --listen 127.0.0.1:0 --no-cgroups >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 200); do [ -f "$TESSERA_HOME/config" ] && break; sleep 0.05; done
tessera_ingest=$(for i in $(seq "$reps"); do
    t0=$(now)
    "$bin" data upload "events$i" "$csv" >/dev/null
    t1=$(now)
    echo "$t1 - $t0" | bc -l
done | best)

# Query: the same group-by, Tessera over the table and DuckDB over its files.
sql="SELECT country, count(*) AS n, sum(amount) AS total FROM events1 GROUP BY country ORDER BY country"
tessera_query=$(for _ in $(seq "$reps"); do
    t0=$(now)
    "$bin" data query "$sql" --format csv >/dev/null
    t1=$(now)
    echo "$t1 - $t0" | bc -l
done | best)
table="$TESSERA_HOME/lake/datasets/admin/events1/table"
duck_query=$(for _ in $(seq "$reps"); do
    "$py" - "$table" <<'EOF'
import sys, time, duckdb
t = time.perf_counter()
duckdb.sql(f"SELECT country, count(*) AS n, sum(amount) AS total FROM read_parquet('{sys.argv[1]}/*.parquet') GROUP BY country ORDER BY country").fetchall()
print(time.perf_counter() - t)
EOF
done | best)

"$py" - <<EOF
import json
ti, di, tq, dq = $tessera_ingest, $duck_ingest, $tessera_query, $duck_query
print(json.dumps({
  "csv_bytes": $bytes, "rows": $rows, "cores": $(nproc),
  "duckdb_csv_to_parquet_s": round(di, 2), "tessera_upload_s": round(ti, 2),
  "ingest_ratio_duckdb_over_tessera": round(di / ti, 2),
  "tessera_upload_mib_s": round($bytes / 1048576 / ti, 1),
  "duckdb_groupby_s": round(dq, 3), "tessera_groupby_s": round(tq, 3),
  "query_ratio_tessera_over_duckdb": round(tq / dq, 2),
}, indent=1))
EOF
