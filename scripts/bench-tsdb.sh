#!/usr/bin/env bash
# Edge time-series store (docs/benchmarks.md, "Edge time-series store").
# Builds crates/tsdb/examples/tsdb_bench.rs in release, scrapes Debian's
# prometheus-node-exporter (a free loopback port) BENCH_TSDB_SCRAPES times,
# then measures bytes/point and single-thread ingest for sensor, counter and
# node-exporter data, and loads the very same points into SQLite (a plain
# table, sqlite3 CLI `.import`) and Prometheus's TSDB (`promtool tsdb
# create-blocks-from openmetrics`). Then query latency (24 h, 1 min steps,
# 1,000 series) and RSS with 10k active series under a 16 MiB cap.
# Usage: scripts/bench-tsdb.sh
#   BENCH_TSDB_WORK (/tmp/yunbian-tsdb-bench), BENCH_TSDB_SCRAPES (300),
#   BENCH_TSDB_SCRAPE_INTERVAL (0.2 s; samples are stamped 15 s apart)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${BENCH_TSDB_WORK:-/tmp/yunbian-tsdb-bench}
SCRAPES=${BENCH_TSDB_SCRAPES:-300}
INTERVAL=${BENCH_TSDB_SCRAPE_INTERVAL:-0.2}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release -p yunbian-tsdb --example tsdb_bench >&2
BENCH=$TARGET/release/examples/tsdb_bench
rm -rf "$WORK" && mkdir -p "$WORK"

NODE_FILE=""
if command -v prometheus-node-exporter >/dev/null; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  prometheus-node-exporter --web.listen-address=127.0.0.1:$PORT >/dev/null 2>&1 &
  NE_PID=$!
  trap 'kill $NE_PID 2>/dev/null || true' EXIT
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/metrics" >/dev/null && break; sleep 0.1; done
  NODE_FILE=$WORK/node-scrapes.txt
  for i in $(seq 1 "$SCRAPES"); do
    echo "# SCRAPE $i" >>"$NODE_FILE"
    curl -sf "http://127.0.0.1:$PORT/metrics" >>"$NODE_FILE"
    sleep "$INTERVAL"
  done
  kill $NE_PID 2>/dev/null || true
  echo "node exporter: $SCRAPES scrapes, $(wc -l <"$NODE_FILE") lines" >&2
else
  echo "prometheus-node-exporter not installed: node dataset skipped" >&2
fi

echo "== yunbian-tsdb (one thread, WAL on, fsync every 1 s / never)"
$BENCH ingest "$WORK" $NODE_FILE | tee "$WORK/ours.csv"

echo "== same points in SQLite (plain table: series INTEGER, ts INTEGER, value REAL) and promtool"
printf "dataset,engine,bytes,bytes_per_point,load_seconds,points_per_s\n"
tail -n +2 "$WORK/ours.csv" | while IFS=, read -r name series points _rest; do
  db=$WORK/$name.sqlite
  rm -f "$db"
  start=$(date +%s.%N)
  sqlite3 "$db" "CREATE TABLE points(series INTEGER, ts INTEGER, value REAL);" ".mode csv" ".import $WORK/$name.csv points"
  end=$(date +%s.%N)
  bytes=$(stat -c %s "$db")
  python3 -c "p=$points; b=$bytes; s=$end-$start; print(f'$name,sqlite,{b},{b/p:.3f},{s:.2f},{p/s:.0f}')"
  if command -v promtool >/dev/null; then
    out=$WORK/prom-$name
    rm -rf "$out"
    start=$(date +%s.%N)
    promtool tsdb create-blocks-from openmetrics "$WORK/$name.om" "$out" >/dev/null 2>&1
    end=$(date +%s.%N)
    # chunks + index + meta of every block (no WAL: promtool writes blocks only)
    bytes=$(du -sb "$out" | cut -f1)
    python3 -c "p=$points; b=$bytes; s=$end-$start; print(f'$name,promtool,{b},{b/p:.3f},{s:.2f},{p/s:.0f}')"
  fi
done

echo "== query"
$BENCH query "$WORK"
echo "== rss"
$BENCH rss "$WORK"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
