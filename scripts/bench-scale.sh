#!/usr/bin/env bash
# Cloud with N simulated nodes: cloud RSS/CPU once connected and idle, and
# apply -> every instance Running (one instance per node), p50/p99.
# Usage: scripts/bench-scale.sh N [path/to/yunbian]
set -euo pipefail
N=${1:-1000}
BIN=${2:-${CARGO_TARGET_DIR:-target}/release/yunbian}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; rm -rf "$D"' EXIT
YUNBIAN_LOG=warn "$BIN" cloud --data-dir "$D/cloud" --listen 127.0.0.1:0 >"$D/cloud.log" 2>&1 &
CLOUD=$!
for _ in $(seq 100); do [ -f "$D/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$D/cloud/admin.yaml"
for _ in $(seq 100); do "$BIN" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
URL=$(sed -n 's/^server: //p' "$YUNBIAN_CONFIG")
TOKEN=$("$BIN" token create --ttl 1h)
start=$(date +%s.%N)
YUNBIAN_LOG=warn "$BIN" sim --cloud "$URL" --token "$TOKEN" --nodes "$N" >"$D/sim.log" 2>&1 &
SIM=$!
ready() { "$BIN" get nodes -o json | grep -o '"phase": *"Ready"' | wc -l; }
for _ in $(seq 1200); do [ "$(ready)" -ge "$N" ] && break; sleep 1; done
echo "nodes Ready: $(ready)/$N after $(echo "$(date +%s.%N) - $start" | bc) s"
sleep 20
cpu0=$(awk '{print $14+$15}' /proc/$CLOUD/stat); t0=$(date +%s.%N)
sleep 30
cpu1=$(awk '{print $14+$15}' /proc/$CLOUD/stat); t1=$(date +%s.%N)
echo "cloud RSS with $N nodes connected (idle): $(awk '/VmRSS/ {print int($2/1024)}' /proc/$CLOUD/status) MiB"
echo "cloud CPU with $N nodes connected (idle, heartbeats every 5 s): $(echo "scale=3; ($cpu1-$cpu0)/100/($t1-$t0)" | bc) cores"
echo "sim process RSS: $(awk '/VmRSS/ {print int($2/1024)}' /proc/$SIM/status) MiB"
"$BIN" bench apply --replicas "$N"
echo "cloud RSS after the apply: $(awk '/VmRSS/ {print int($2/1024)}' /proc/$CLOUD/status) MiB"
