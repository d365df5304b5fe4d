#!/usr/bin/env bash
# One App rolled out across N simulated nodes in G NodeGroups: the time from
# applying the new revision until every instance runs it and the rollout is
# Complete. Usage: scripts/bench-rollout.sh N G [bench rollout flags…]
# e.g. scripts/bench-rollout.sh 1000 10 --by group --max-unavailable 1 --max-surge 0
set -euo pipefail
N=${1:-1000}
G=${2:-10}
shift 2 || true
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/yunbian}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 1; rm -rf "$D"' EXIT
YUNBIAN_LOG=warn "$BIN" cloud --data-dir "$D/cloud" --listen 127.0.0.1:0 >"$D/cloud.log" 2>&1 &
for _ in $(seq 100); do [ -f "$D/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$D/cloud/admin.yaml"
for _ in $(seq 100); do "$BIN" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
URL=$(sed -n 's/^server: //p' "$YUNBIAN_CONFIG")
TOKEN=$("$BIN" token create --ttl 1h)
YUNBIAN_LOG=warn "$BIN" sim --cloud "$URL" --token "$TOKEN" --nodes "$N" --groups "$G" >"$D/sim.log" 2>&1 &
ready() { "$BIN" get nodes -o json | grep -o '"phase": *"Ready"' | wc -l; }
for _ in $(seq 1200); do [ "$(ready)" -ge "$N" ] && break; sleep 1; done
echo "nodes Ready: $(ready)/$N"
"$BIN" bench rollout --groups "$G" --per-group $((N / G)) "$@"
