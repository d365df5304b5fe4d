#!/usr/bin/env bash
# Agent footprint with the edge broker running and 100 Modbus devices
# attached, each polled every second (20 registers as 4 properties) against
# pymodbus TCP servers: RSS and CPU of the `yunbian edge` process, and MQTT
# readings seen on its bus.
#
#   scripts/bench-agent-devices.sh            # BENCH_SECONDS=60 DEVICES=100
#
# Needs python3 with pymodbus 3.x and mosquitto_sub (Debian mosquitto-clients).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
SECONDS_TO_RUN="${BENCH_SECONDS:-60}"
DEVICES="${DEVICES:-100}"
cargo build --release -q -p yunbian
Y="$CARGO_TARGET_DIR/release/yunbian"
W="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; sleep 1; rm -rf "$W"' EXIT

python3 -u crates/devices/tests/peers/modbus_server.py tcp --ports 10 --quiet >"$W/modbus.out" 2>&1 &
for _ in $(seq 100); do [ "$(grep -c '^PORT' "$W/modbus.out" || true)" -ge 10 ] && break; sleep 0.1; done
mapfile -t PORTS < <(grep '^PORT' "$W/modbus.out" | awk '{print $2}')

CLOUD_PORT=$((20000 + RANDOM % 20000))
MQTT_PORT=$((40000 + RANDOM % 10000))
"$Y" cloud --data-dir "$W/cloud" --listen "127.0.0.1:$CLOUD_PORT" >"$W/cloud.log" 2>&1 &
for _ in $(seq 100); do [ -f "$W/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$W/cloud/admin.yaml"
TOKEN="$("$Y" token create --ttl 1h)"
"$Y" edge join --cloud "https://127.0.0.1:$CLOUD_PORT" --token "$TOKEN" --name bench-1 --data-dir "$W/edge" \
  --metrics-listen off --device-api-listen off --mqtt-listen "127.0.0.1:$MQTT_PORT" >"$W/edge.log" 2>&1 &
for _ in $(seq 200); do "$Y" get nodes 2>/dev/null | grep -q 'bench-1.*Ready' && break; sleep 0.1; done
EDGE_PID="$(pgrep -f "edge join --cloud https://127.0.0.1:$CLOUD_PORT" | head -1)"

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "agent pid $EDGE_PID, RSS before devices: $(rss "$EDGE_PID") KiB"

{
  cat <<'EOF'
apiVersion: yunbian.io/v1
kind: DeviceModel
metadata: {name: bench-plc}
spec:
  properties:
    - {name: a, type: int}
    - {name: b, type: int}
    - {name: c, type: float}
    - {name: d, type: float}
EOF
  for i in $(seq 1 "$DEVICES"); do
    port="${PORTS[$(( (i - 1) % ${#PORTS[@]} ))]}"
    cat <<EOF
---
apiVersion: yunbian.io/v1
kind: Device
metadata: {name: plc-$i}
spec:
  model: bench-plc
  node: bench-1
  protocol: {modbusTcp: {host: 127.0.0.1, port: $port, unitId: 1}}
  collectCycle: 1s
  reportCycle: 10s
  properties:
    - {name: a, modbus: {register: holding, address: 0, dataType: uint16}}
    - {name: b, modbus: {register: holding, address: 1, dataType: int16}}
    - {name: c, modbus: {register: holding, address: 6, dataType: float32}}
    - {name: d, modbus: {register: input, address: 1, dataType: float32}}
EOF
  done
} >"$W/devices.yaml"
"$Y" apply -f "$W/devices.yaml" >/dev/null
for _ in $(seq 300); do
  n="$("$Y" get devices 2>/dev/null | grep -c ' online ' || true)"
  [ "$n" -ge "$DEVICES" ] && break
  sleep 0.2
done
echo "devices online: $("$Y" get devices | grep -c ' online ' || true) of $DEVICES"
sleep 5
timeout "$((SECONDS_TO_RUN + 2))" mosquitto_sub -p "$MQTT_PORT" -t 'yunbian/devices/+/properties/+' >"$W/bus.out" 2>/dev/null &
t0="$(cpu_ticks "$EDGE_PID")"
sleep "$SECONDS_TO_RUN"
t1="$(cpu_ticks "$EDGE_PID")"
hz="$(getconf CLK_TCK)"
sleep 2
echo "agent RSS with broker and $DEVICES devices: $(rss "$EDGE_PID") KiB"
awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$SECONDS_TO_RUN" 'BEGIN { printf "agent CPU over %ds: %.1f %% of one core\n", s, 100 * (b - a) / hz / s }'
echo "bus messages seen by one subscriber in ${SECONDS_TO_RUN}s: $(wc -l <"$W/bus.out")"
