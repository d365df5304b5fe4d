#!/usr/bin/env bash
# Artifact distribution with and without P2P (docs/benchmarks.md,
# "Artifact distribution (P2P)"). One machine, loopback, release binary.
#
# For every (N, mode) a fresh cloud and N fresh agents (all labelled
# site=a, one NodeGroup {selector: {site: a}, site: a}), then:
#   1. a random payload is pushed as an `executable` artifact: /bin/sleep
#      with SIZE MiB of seeded random bytes appended (the ELF loader ignores
#      what follows the segments, so it runs as `sleep`; no unpacking on the
#      nodes, so the time is transfer + checks + start);
#   2. an App with `replicas: N`, `placement.nodeSelector: {site: a}` (the
#      scheduler spreads an App's instances, one per node) is applied;
#   3. measured: seconds from the apply until each instance is Running
#      (polling `get instances` every 0.5 s), the bytes and chunks the cloud
#      served to nodes and the 429s it answered (tracker status
#      `GET /v1/p2p/status`, admin token: `cloud.bytesServed`,
#      `cloud.perNode`, `cloud.refused`), and per node the chunks that came
#      from peers (the agent's debug line "chunk from a peer",
#      YUNBIAN_LOG=info,yunbian_edge::p2p=debug).
#
# Modes:
#   nop2p   every agent --p2p-listen off: nobody announces, every chunk
#           comes from the cloud (the baseline)
#   p2p     agents serve peers (--p2p-listen 127.0.0.1:0), cloud unlimited
#   p2p-kK  as p2p, cloud --cloud-pulls-per-site K (0: no limit; the default is 2 since 11ceed5)
#   Append @RATE to any mode for the cloud's --chunk-egress, e.g. p2p@50Mi.
#
#   bench/p2p.sh
#   BENCH_P2P_NODES="4 8"            node counts
#   BENCH_P2P_MODES="nop2p p2p p2p-k1 p2p-k2 nop2p@32Mi p2p@32Mi p2p-k1@32Mi"
#   BENCH_P2P_SIZE_MIB=256           random bytes appended to the executable
#   BENCH_P2P_SEED=42                seed of the payload
#   BENCH_P2P_TIMEOUT=180            give up waiting for Running after this (s)
#   BENCH_KEEP=1                     keep the work directory (logs and data:
#                                    about SIZE MiB per node and per cloud per
#                                    run, 23 GB for the default matrix)
#   BENCH_P2P_NO_BUILD=1             use the binary as built (no cargo build)
#
# One summary line per run. Takes ~10 min for the default matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
NODES="${BENCH_P2P_NODES:-4 8}"
MODES="${BENCH_P2P_MODES:-nop2p p2p p2p-k1 p2p-k2 nop2p@32Mi p2p@32Mi p2p-k1@32Mi}"
SIZE_MIB="${BENCH_P2P_SIZE_MIB:-256}"
SEED="${BENCH_P2P_SEED:-42}"
TIMEOUT="${BENCH_P2P_TIMEOUT:-180}"

[ -n "${BENCH_P2P_NO_BUILD:-}" ] || cargo build --release -q -p yunbian
W="$(mktemp -d /tmp/yunbian-p2p.XXXXXX)"
# A copy, so that a rebuild by someone else does not change the binary mid-run.
Y="$W/bin/yunbian"
mkdir -p "$W/bin" && cp "$CARGO_TARGET_DIR/release/yunbian" "$Y"
PIDS=()

# Workloads live in their own session and outlive their agent: stop the
# ones started from this work directory (by pid), then the agents and cloud.
kill_workloads() {
  local p exe
  for p in /proc/[0-9]*; do
    exe="$(readlink "$p/exe" 2>/dev/null || true)"
    case "$exe" in "$W"/run-*) kill "${p#/proc/}" 2>/dev/null || true ;; esac
  done
}
stop_all() {
  local p
  kill_workloads
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  kill_workloads
  PIDS=()
}
cleanup() {
  stop_all
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "yunbian: $("$Y" --version), built $(date -u -r "$CARGO_TARGET_DIR/release/yunbian" +%FT%TZ), HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (crates/ modified)')"

# The payload: /bin/sleep + SIZE MiB of seeded random bytes.
PAYLOAD="$W/payload"
python3 - "$PAYLOAD" "$SIZE_MIB" "$SEED" <<'EOF'
import random, shutil, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shutil.copyfile("/bin/sleep", path)
r = random.Random(seed)
with open(path, "ab") as f:
    for _ in range(mib):
        f.write(r.randbytes(1 << 20))
EOF
chmod +x "$PAYLOAD"
PAYLOAD_BYTES="$(stat -c %s "$PAYLOAD")"
"$PAYLOAD" 0 || { echo "the payload does not run" >&2; exit 1; }
echo "payload: /bin/sleep + $SIZE_MIB MiB random (seed $SEED) = $PAYLOAD_BYTES bytes, sha256 $(sha256sum "$PAYLOAD" | cut -c1-16)…"
echo

# run N MODE
run() {
  local n=$1 mode=$2 kind egress="" k="" i
  kind="${mode%%@*}"
  [ "$kind" != "$mode" ] && egress="${mode#*@}"
  case "$kind" in
    nop2p | p2p) ;;
    p2p-k*) k="${kind#p2p-k}" ;;
    *) echo "unknown mode $mode" >&2; return 1 ;;
  esac
  local R="$W/run-$n-$mode"
  mkdir -p "$R"
  local port cloud_args=()
  port="$(free_port)"
  [ -n "$k" ] && cloud_args+=(--cloud-pulls-per-site "$k")
  [ -n "$egress" ] && cloud_args+=(--chunk-egress "$egress")
  NO_COLOR=1 "$Y" cloud --data-dir "$R/cloud" --listen "127.0.0.1:$port" "${cloud_args[@]}" >"$R/cloud.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 300); do [ -f "$R/cloud/admin.yaml" ] && break; sleep 0.1; done
  export YUNBIAN_CONFIG="$R/cloud/admin.yaml"
  for _ in $(seq 100); do "$Y" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
  awk '/^ca: \|/{f=1;next} /^[^ ]/{f=0} f{sub(/^  /,"");print}' "$YUNBIAN_CONFIG" >"$R/ca.pem"
  local admin
  admin="$(sed -n 's/^token: //p' "$YUNBIAN_CONFIG")"
  local status_url="https://127.0.0.1:$port/v1/p2p/status"
  tracker() { curl -fs --max-time 5 --cacert "$R/ca.pem" -H "Authorization: Bearer $admin" "$status_url"; }

  "$Y" artifact push "$PAYLOAD" --name payload --version 1 >"$R/push.log" 2>&1

  cat >"$R/group.yaml" <<EOF
apiVersion: yunbian.io/v1
kind: NodeGroup
metadata: {name: site-a}
spec:
  selector: {site: a}
  site: a
EOF
  "$Y" apply -f "$R/group.yaml" >/dev/null

  local p2p_listen=127.0.0.1:0
  [ "$kind" = nop2p ] && p2p_listen=off
  for i in $(seq 1 "$n"); do
    NO_COLOR=1 YUNBIAN_LOG="info,yunbian_edge::p2p=debug" "$Y" edge join --cloud "https://127.0.0.1:$port" \
      --token "$("$Y" token create --ttl 1h)" --name "edge-$i" --data-dir "$R/edge-$i" --labels "site=a,node=edge-$i" \
      --mqtt-listen off --device-api-listen off --metrics-listen off --p2p-listen "$p2p_listen" \
      >"$R/edge-$i.log" 2>&1 &
    PIDS+=("$!")
  done
  # Every node Ready; with P2P, every node announced site a to the tracker.
  local ok=""
  for _ in $(seq 600); do
    if "$Y" get nodes -o json 2>/dev/null | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
sys.exit(0 if sum(1 for i in items if i.get("status", {}).get("phase") == "Ready") >= int(sys.argv[1]) else 1)' "$n"; then
      if [ "$kind" = nop2p ] || tracker | python3 -c '
import json, sys
nodes = json.load(sys.stdin)["nodes"]
sys.exit(0 if sum(1 for x in nodes if x.get("site") == "a") >= int(sys.argv[1]) else 1)' "$n"; then
        ok=1
        break
      fi
    fi
    sleep 0.2
  done
  if [ -z "$ok" ]; then
    echo "N=$n mode=$mode: nodes not ready/announced in 120 s; tracker: $(tracker | head -c 2000)" >&2
    stop_all
    return 1
  fi

  cat >"$R/app.yaml" <<EOF
apiVersion: yunbian.io/v1
kind: App
metadata: {name: payload}
spec:
  replicas: $n
  artifact: {name: payload, version: "1"}
  process: {args: ["900"]}
  placement: {nodeSelector: {site: a}}
EOF
  local t0
  t0="$(date +%s.%N)"
  "$Y" apply -f "$R/app.yaml" >/dev/null
  # Poll until every instance is Running (or the timeout); prints per-instance times.
  python3 - "$Y" "$n" "$t0" "$TIMEOUT" >"$R/times.txt" <<'EOF' || true
import json, subprocess, sys, time
y, n, t0, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
running = {}
last = {}
while time.time() - t0 < timeout:
    try:
        out = subprocess.run([y, "get", "instances", "-o", "json"], capture_output=True, text=True, timeout=10).stdout
        items = json.loads(out)["items"]
    except Exception:
        items = []
    now = time.time() - t0
    for it in items:
        name = it["metadata"]["name"]
        node = it.get("spec", {}).get("node", "")
        st = it.get("status", {})
        last[name] = (node, st.get("phase", ""), st.get("message", ""))
        if st.get("phase") == "Running" and name not in running:
            running[name] = (node, now)
    if len(running) >= n:
        break
    time.sleep(0.5)
for name, (node, t) in sorted(running.items(), key=lambda x: x[1][1]):
    print(f"running {name} {node} {t:.1f}")
for name, (node, phase, msg) in sorted(last.items()):
    if name not in running:
        print(f"stuck {name} {node} {phase} {msg}")
EOF
  sleep 1
  tracker >"$R/tracker.json" || echo '{}' >"$R/tracker.json"
  for i in $(seq 1 "$n"); do
    printf 'edge-%s %s %s\n' "$i" "$(grep -c 'chunk from a peer' "$R/edge-$i.log" || true)" \
      "$(grep -c 'cloud busy' "$R/edge-$i.log" || true)"
  done >"$R/peers.txt"
  python3 - "$n" "$mode" "$PAYLOAD_BYTES" "$R" <<'EOF'
import json, statistics, sys
n, mode, size, r = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
times = [l.split() for l in open(f"{r}/times.txt")]
run = [float(t[3]) for t in times if t[0] == "running"]
nodes = {t[2] for t in times if t[0] == "running"}
stuck = [" ".join(t[1:]) for t in times if t[0] == "stuck"]
tr = json.load(open(f"{r}/tracker.json"))
cloud = tr.get("cloud", {})
served = cloud.get("bytesServed", 0)
per_node = cloud.get("perNode", {})
peers = {l.split()[0]: (int(l.split()[1]), int(l.split()[2])) for l in open(f"{r}/peers.txt")}
detail = " ".join(
    f"{name}:{per_node.get(name, {}).get('chunks', 0)}c/{peers[name][0]}p" for name in sorted(peers, key=lambda s: int(s.split('-')[1]))
)
all_t = f"{max(run):.1f}s" if len(run) == n else f"timeout ({len(run)}/{n} Running)"
first = f"{min(run):.1f}s" if run else "-"
median = f"{statistics.median(run):.1f}s" if run else "-"
print(
    f"N={n} mode={mode} origin={served} B = {served / size:.2f} x artifact = {100 * served / (n * size):.1f} % of N x size;"
    f" cloud chunks {cloud.get('chunksServed', 0)}, 429s {cloud.get('refused', 0)};"
    f" Running first {first} median {median} all {all_t} on {len(nodes)} nodes;"
    f" per node cloud/peer chunks {detail}"
)
for s in stuck:
    print(f"  stuck: {s}")
EOF
  "$Y" delete app payload >/dev/null 2>&1 || true
  sleep 2
  stop_all
  unset YUNBIAN_CONFIG
  if [ -z "${BENCH_KEEP:-}" ]; then
    # keep the logs and measurements, drop the data directories
    rm -rf "$R/cloud" "$R"/edge-*/
  fi
}

for n in $NODES; do
  for mode in $MODES; do
    run "$n" "$mode" || echo "N=$n mode=$mode failed"
  done
done
