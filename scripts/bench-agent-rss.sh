#!/usr/bin/env bash
# Edge agent RSS: idle, and managing 10 running instances.
# Usage: scripts/bench-agent-rss.sh [path/to/yunbian]   (default: release build)
set -euo pipefail
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/yunbian}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; rm -rf "$D"' EXIT
YUNBIAN_LOG=warn "$BIN" cloud --data-dir "$D/cloud" --listen 127.0.0.1:0 --heartbeat 1s >"$D/cloud.log" 2>&1 &
for _ in $(seq 100); do [ -f "$D/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$D/cloud/admin.yaml"
for _ in $(seq 100); do "$BIN" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
URL=$(sed -n 's/^server: //p' "$YUNBIAN_CONFIG")
TOKEN=$("$BIN" token create --ttl 1h)
YUNBIAN_LOG=warn "$BIN" edge join --cloud "$URL" --token "$TOKEN" --name bench-edge --data-dir "$D/edge" --heartbeat 1s >"$D/edge.log" 2>&1 &
AGENT=$!
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
for _ in $(seq 100); do "$BIN" get nodes 2>/dev/null | grep -q Ready && break; sleep 0.2; done
sleep 10
echo "agent idle RSS: $(rss) KiB"
cat >"$D/app.yaml" <<YAML
apiVersion: yunbian.io/v1
kind: App
metadata: {name: ten}
spec:
  replicas: 10
  runtime: process
  process: {command: ["/bin/sh", "-c", "while true; do echo tick; sleep 1; done"]}
  health:
    liveness: {tcp: {port: 1}, periodSeconds: 3600, initialDelaySeconds: 3600}
YAML
"$BIN" apply -f "$D/app.yaml" >/dev/null
for _ in $(seq 300); do "$BIN" get app ten 2>/dev/null | grep -q '10/10' && break; sleep 0.2; done
"$BIN" get app ten
sleep 10
echo "agent RSS with 10 running instances: $(rss) KiB"
"$BIN" delete app ten >/dev/null
for _ in $(seq 100); do [ -z "$("$BIN" get instances -o json | grep -o '"name"' || true)" ] && break; sleep 0.2; done
sleep 2
