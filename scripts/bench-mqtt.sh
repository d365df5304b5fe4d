#!/usr/bin/env bash
# Edge MQTT broker vs Mosquitto (docs/benchmarks.md, "Edge MQTT broker vs Mosquitto").
# Builds the load generator (crates/bus/examples/mqtt_bench.rs) in release,
# starts our broker (`mqtt_bench serve`, its own process) and Debian's
# mosquitto (a temporary config, anonymous, on a free loopback port), and
# runs the same generator against both for QoS 0 and QoS 1.
# Usage: scripts/bench-mqtt.sh
#   BENCH_MQTT_CLIENTS (100), BENCH_MQTT_SUBSCRIBERS (10), BENCH_MQTT_PAYLOAD (64),
#   BENCH_MQTT_SECONDS (10), BENCH_MQTT_WINDOW (10), MOSQUITTO (/usr/sbin/mosquitto),
#   BENCH_MQTT_BROKER_WORKERS (1: our broker on one runtime thread, as in the
#   edge agent and like single-threaded mosquitto; 2 to let it use both cores)
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${BENCH_MQTT_CLIENTS:-100}
SUBS=${BENCH_MQTT_SUBSCRIBERS:-10}
PAYLOAD=${BENCH_MQTT_PAYLOAD:-64}
SECONDS_PER_CASE=${BENCH_MQTT_SECONDS:-10}
WINDOW=${BENCH_MQTT_WINDOW:-10}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release -p yunbian-bus --example mqtt_bench >&2
BENCH=$TARGET/release/examples/mqtt_bench
[ -x "$MOSQUITTO" ] || { echo "error: $MOSQUITTO not found (apt-get install -y mosquitto)" >&2; exit 1; }

D=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "error: nothing listening on $1" >&2; exit 1
}

OURS=$(free_port)
MQTT_BENCH_WORKERS=${BENCH_MQTT_BROKER_WORKERS:-1} "$BENCH" serve --port "$OURS" 2>"$D/ours.log" &
PIDS+=($!)
MOSQ=$(free_port)
cat >"$D/mosquitto.conf" <<CONF
listener $MOSQ 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
CONF
"$MOSQUITTO" -c "$D/mosquitto.conf" 2>"$D/mosq.log" &
PIDS+=($!)
wait_port "$OURS"
wait_port "$MOSQ"

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); $("$MOSQUITTO" -h | head -1)"
echo "broker workers=${BENCH_MQTT_BROKER_WORKERS:-1} clients=$CLIENTS subscribers=$SUBS payload=${PAYLOAD}B window=$WINDOW seconds=$SECONDS_PER_CASE"
RESULTS=$D/results
for qos in 0 1; do
  for target in "yunbian:$OURS" "mosquitto:$MOSQ"; do
    "$BENCH" run --label "${target%%:*}" --port "${target##*:}" --qos "$qos" --clients "$CLIENTS" \
      --subscribers "$SUBS" --payload "$PAYLOAD" --seconds "$SECONDS_PER_CASE" --window "$WINDOW" | tee -a "$RESULTS" >&2
  done
done

echo
echo "| QoS | broker | delivered msg/s | p50 latency | p99 latency | lost | ratio (msg/s, yunbian / mosquitto) |"
echo "|---|---|---|---|---|---|---|"
for qos in 0 1; do
  ours=$(awk -v q=$qos '$1=="yunbian" && $2==q {print $7}' "$RESULTS")
  theirs=$(awk -v q=$qos '$1=="mosquitto" && $2==q {print $7}' "$RESULTS")
  ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
  awk -v q=$qos -v r="$ratio" '$2==q {
    printf "| %s | %s | %d | %.2f ms | %.2f ms | %d | %s |\n", q, $1, $7, $8/1000, $9/1000, $6-$5, ($1=="yunbian" ? r : "")
  }' "$RESULTS"
done
