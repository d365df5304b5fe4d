#!/usr/bin/env bash
# Agent memory with 10,000 active series (docs/benchmarks.md, "Agent memory
# with 10k series"). A release cloud and one joined agent on loopback; a
# Rule with a `tsdb` sink takes every MQTT message on gen/+ into the edge
# time-series store (series gen{topic="gen/<i>"}: MQTT records are tagged
# with their topic); scripts/peers/mqtt_series_gen.py publishes one reading
# per series per period to gen/0 … gen/<N-1> on the agent's broker. The
# agent's VmRSS/VmHWM and CPU are sampled every BENCH_SAMPLE seconds, with
# the store's figures from the agent's metrics endpoint (yunbian_edge_tsdb_*:
# accounted memory, WAL bytes, points appended) and its block files. A
# poller reads RSS and those metrics every second into poll.tsv; a flush is
# seen as the WAL shrinking (a flush before the 2 h mark and under the WAL
# limit is one forced by memory pressure).
#
#   scripts/bench-agent-series.sh
#   BENCH_SERIES=10000    distinct series
#   BENCH_PERIOD=1        seconds between readings of a series
#   BENCH_SECONDS=600     generator run time
#   BENCH_SHARDS=2        generator processes
#   BENCH_SAMPLE=30       sampling interval, seconds
#   BENCH_AGENT_ARGS=     extra `yunbian edge join` flags, e.g.
#                         "--tsdb-memory-cap 8Mi" (word-split)
#   BENCH_KEEP=1          keep the work directory
#
# Needs python3 with paho-mqtt 2.x.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
SERIES="${BENCH_SERIES:-10000}"
PERIOD="${BENCH_PERIOD:-1}"
RUN_SECONDS="${BENCH_SECONDS:-600}"
SHARDS="${BENCH_SHARDS:-2}"
SAMPLE="${BENCH_SAMPLE:-30}"
read -r -a AGENT_ARGS <<<"${BENCH_AGENT_ARGS:-}"

cargo build --release -q -p yunbian
Y="$CARGO_TARGET_DIR/release/yunbian"
W="$(mktemp -d /tmp/yunbian-series.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HZ="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
status_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

CLOUD_PORT="$(free_port)"
MQTT_PORT="$(free_port)"
API_PORT="$(free_port)"
METRICS_PORT="$(free_port)"
NO_COLOR=1 "$Y" cloud --data-dir "$W/cloud" --listen "127.0.0.1:$CLOUD_PORT" >"$W/cloud.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 200); do [ -f "$W/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$W/cloud/admin.yaml"
for _ in $(seq 100); do "$Y" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
NO_COLOR=1 "$Y" edge join --cloud "https://127.0.0.1:$CLOUD_PORT" --token "$("$Y" token create --ttl 1h)" --name series-1 \
  --data-dir "$W/edge" --metrics-listen "127.0.0.1:$METRICS_PORT" --mqtt-listen "127.0.0.1:$MQTT_PORT" \
  --device-api-listen "127.0.0.1:$API_PORT" --p2p-listen off ${AGENT_ARGS[@]+"${AGENT_ARGS[@]}"} >"$W/edge.log" 2>&1 &
EDGE=$!
PIDS+=("$EDGE")
for _ in $(seq 300); do "$Y" get nodes 2>/dev/null | grep -q 'series-1 *Ready' && break; sleep 0.1; done

echo "agent flags: ${BENCH_AGENT_ARGS:-(defaults)}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
sleep 10
IDLE="$(status_kib "$EDGE" VmRSS)"
echo "agent pid $EDGE: idle, connected, broker and local API on: VmRSS $(mib "$IDLE") MiB"

cat >"$W/rule.yaml" <<'EOF'
apiVersion: yunbian.io/v1
kind: Rule
metadata: {name: series}
spec:
  source: {mqtt: {topic: "gen/+", jsonPath: v, timestampPath: ts, metric: gen}}
  sinks: [{tsdb: {}}]
EOF
"$Y" apply -f "$W/rule.yaml" >/dev/null
for _ in $(seq 300); do
  "$Y" get rule series -o json 2>/dev/null | grep -q '"series-1"' && break
  sleep 0.2
done
sleep 2
RULE_RSS="$(status_kib "$EDGE" VmRSS)"
echo "rule running, no data yet: VmRSS $(mib "$RULE_RSS") MiB"

for s in $(seq 0 $((SHARDS - 1))); do
  python3 -u scripts/peers/mqtt_series_gen.py 127.0.0.1 "$MQTT_PORT" --series "$SERIES" --period "$PERIOD" \
    --seconds "$RUN_SECONDS" --shard "$s" --shards "$SHARDS" >"$W/gen-$s.out" 2>&1 &
  PIDS+=("$!")
done
GENS=("${PIDS[@]:2}")
# t, VmRSS KiB, VmHWM KiB, then the tsdb metrics (- when a scrape found the
# store busy): accounted bytes, WAL bytes, block bytes, points appended.
T0="$(date +%s.%N)"
(
  while kill -0 "$EDGE" 2>/dev/null; do
    m="$(curl -fs --max-time 1 "http://127.0.0.1:$METRICS_PORT/metrics" | awk '
      $1 == "yunbian_edge_tsdb_memory_bytes" {m = $2} $1 == "yunbian_edge_tsdb_wal_bytes" {w = $2}
      $1 == "yunbian_edge_tsdb_disk_bytes" {d = $2} $1 == "yunbian_edge_tsdb_points_appended_total" {p = $2}
      END {if (m == "") print "- - - -"; else print m, w, d, p}' || echo '- - - -')"
    echo "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') $(status_kib "$EDGE" VmRSS) $(status_kib "$EDGE" VmHWM) $m"
    sleep 1
  done
) >"$W/poll.tsv" 2>/dev/null &
POLLER=$!
PIDS+=("$POLLER")
# Flushes so far: the WAL shrinking between two scrapes.
flushes() { awk '$4 != "-" {if (w != "" && $5 < w) n++; w = $5} END {print n + 0}' "$W/poll.tsv"; }
last_tsdb() { awk '$4 != "-" {l = $4 " " $5 " " $7} END {print l}' "$W/poll.tsv"; }
echo "generators: ${#GENS[@]} processes, $SERIES series, one reading each every $PERIOD s ($(awk -v n="$SERIES" -v p="$PERIOD" 'BEGIN {printf "%.0f", n / p}') msg/s), $RUN_SECONDS s"
printf '%6s %9s %9s %8s %9s %10s %7s %9s %8s %9s\n' "t/s" "RSS/MiB" "HWM/MiB" "CPU" "acct/MiB" "WAL/KiB" "blocks" "blk/KiB" "flushes" "points/s"
PREV_PTS=0
sample() {
  local t=$1 c0=$2 c1=$3
  local blocks blk acct wal pts rate
  blocks="$(find "$W/edge/tsdb/blocks" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
  blk="$(du -sk "$W/edge/tsdb/blocks" 2>/dev/null | cut -f1)"
  read -r acct wal pts <<<"$(last_tsdb)"
  rate="$(awk -v a="$PREV_PTS" -v b="${pts:-0}" -v s="$SAMPLE" 'BEGIN {printf "%.0f", (b - a) / s}')"
  PREV_PTS="${pts:-0}"
  printf '%6s %9s %9s %7s%% %9s %10s %7s %9s %8s %9s\n' "$t" "$(mib "$(status_kib "$EDGE" VmRSS)")" "$(mib "$(status_kib "$EDGE" VmHWM)")" \
    "$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" -v s="$SAMPLE" 'BEGIN {printf "%.1f", 100 * (b - a) / hz / s}')" \
    "$(mib "$(( ${acct:-0} / 1024 ))")" "$(( ${wal:-0} / 1024 ))" "$blocks" "$blk" "$(flushes)" "$rate"
}
START_TICKS="$(ticks "$EDGE")"
T=0
prev="$START_TICKS"
while :; do
  sleep "$SAMPLE"
  T=$((T + SAMPLE))
  cur="$(ticks "$EDGE")"
  sample "$T" "$prev" "$cur"
  prev="$cur"
  running=0
  for g in "${GENS[@]}"; do kill -0 "$g" 2>/dev/null && running=1; done
  [ "$running" = 0 ] && break
done
END_TICKS="$prev"
LOAD_HWM="$(status_kib "$EDGE" VmHWM)"
LOAD_SECONDS="$T"
echo "generators done: $(cat "$W"/gen-*.out | paste -sd';' -)"
sleep 30
SETTLED="$(status_kib "$EDGE" VmRSS)"
kill "$POLLER" 2>/dev/null || true
echo "30 s after the load: VmRSS $(mib "$SETTLED") MiB"
N_SERIES="$(curl -fs "http://127.0.0.1:$API_PORT/v1/series?match=gen" | grep -o '"topic"' | wc -l || true)"
SENT="$(cat "$W"/gen-*.out | awk '{s += $2} END {print s}')"
sleep 5
RULE_JSON="$("$Y" get rule series -o json)"
field() { echo "$RULE_JSON" | grep -o "\"$1\": *[0-9.e+]*" | head -1 | grep -o '[0-9.e+]*$' || echo '?'; }
echo
echo "== summary (series-1, $SERIES series)"
echo "messages published: $SENT; rule records in $(field recordsIn), out $(field recordsOut), errors $(field errors)"
echo "series in the edge store (local API /v1/series?match=gen): $N_SERIES"
echo "agent VmRSS: idle $(mib "$IDLE") MiB, rule running $(mib "$RULE_RSS") MiB, after the load $(mib "$SETTLED") MiB; VmHWM during the load $(mib "$LOAD_HWM") MiB"
awk -v a="$START_TICKS" -v b="$END_TICKS" -v hz="$HZ" -v s="$LOAD_SECONDS" -v n="$SENT" \
  'BEGIN {printf "agent CPU during the load: %.1f %% of one core (%.1f µs per message)\n", 100 * (b - a) / hz / s, 1e6 * (b - a) / hz / n}'
echo "edge tsdb on disk: $(du -sk "$W/edge/tsdb" | cut -f1) KiB (WAL $(du -sk "$W/edge/tsdb/wal" | cut -f1) KiB, $(find "$W/edge/tsdb/blocks" -mindepth 1 -maxdepth 1 | wc -l) blocks)"
# Steady state: the poller's samples from the first flush to the end of the
# load (or from 120 s if nothing was flushed).
FLUSH_TIMES="$(awk '$4 != "-" {if (w != "" && $5 < w) printf "%ss ", $1; w = $5}' "$W/poll.tsv")"
FROM="$(echo "$FLUSH_TIMES" | awk '{print ($1 == "") ? 120 : $1 + 0}')"
span() { awk -v f="$FROM" -v e="$LOAD_SECONDS" -v c="$1" '$1 >= f && $1 <= e && $c != "-" {print $c}' "$W/poll.tsv" | sort -n |
  awk -v d="$2" '{a[NR] = $1} END {printf "min %.2f / median %.2f / max %.2f (%d samples)", a[1] / d, a[int((NR + 1) / 2)] / d, a[NR] / d, NR}'; }
echo "flushes during the run (WAL shrank): $(echo $FLUSH_TIMES | wc -w), first at t = ${FROM}s; $(echo $FLUSH_TIMES | tr -d s | tr ' ' '\n' |
  awk 'NR > 1 {print $1 - p} {p = $1}' | sort -n | awk '{a[NR] = $1} END {if (NR) printf "interval min %.1f / median %.1f / max %.1f s", a[1], a[int((NR + 1) / 2)], a[NR]}')"
echo "scrapes that found the store busy (flush or compaction holding it): $(awk -v f="$FROM" '$1 >= f {n++; if ($4 == "-") b++} END {printf "%d of %d", b, n}' "$W/poll.tsv")"
echo "steady state, t = ${FROM}s to ${LOAD_SECONDS}s: VmRSS $(span 2 1024) MiB; VmHWM at the end of the load $(mib "$LOAD_HWM") MiB"
echo "tsdb accounted memory (yunbian_edge_tsdb_memory_bytes), steady state: $(span 4 1048576) MiB"
echo "tsdb WAL (yunbian_edge_tsdb_wal_bytes), steady state: $(span 5 1048576) MiB"
# Points/s between the first and the last scrape that saw the count move.
awk '$4 != "-" {if (p0 == "") p0 = $7; else if ($7 > p) {if (t0 == "") {t0 = tp; q0 = p} p1 = $7; t1 = $1} p = $7; tp = $1}
  END {if (t1 > t0) printf "points appended during the load: %d in %.0f s = %.0f points/s\n", p1 - q0, t1 - t0, (p1 - q0) / (t1 - t0); else print "points appended during the load: too few scrapes to tell"}' "$W/poll.tsv"
echo "points refused by the store: $(curl -fs "http://127.0.0.1:$METRICS_PORT/metrics" | awk '$1 == "yunbian_edge_tsdb_points_rejected_total" {print $2}')"
