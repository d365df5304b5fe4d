#!/usr/bin/env bash
# Artifact distribution over limited links (docs/benchmarks.md, "100 MB over
# limited links"). One machine, loopback, release binaries: a real cloud,
# N real agents, and every agent's traffic through proxies of the fault
# harness with shared bandwidth (crates/faults/examples/linkd.rs):
#
#   agent ──cloud proxy (node link, down)──▶ egress proxy (EGRESS, shared) ──▶ cloud
#   peer  ──peer proxy (node link, up)────▶ agent's peer server
#
# Each node has one SharedLink of NODE_RATE each way: its cloud proxy takes
# what the cloud sends it from the link's downlink, its peer proxy takes
# what it serves to peers from the same link's uplink (the agent advertises
# the peer proxy: --p2p-advertise). Every cloud connection of every node
# also crosses the one egress proxy, whose bucket all of them share.
# Not modelled: what a node downloads from peers is limited by the serving
# node's uplink, not by the receiver's downlink (the peer proxy sees every
# client as 127.0.0.1); no latency, no loss.
#
# For every run N:SITES:MODE, a fresh cloud and N fresh agents, labelled
# site=s1..sSITES (round robin) and bench=links, one NodeGroup per site
# ({selector: {site: sK}, site: sK}); the script waits until every node is
# Ready and (with P2P) announced its site to the tracker. Then:
#   1. the payload is pushed as an `executable` artifact: /bin/sleep with
#      SIZE MiB of seeded random bytes appended (runs as `sleep`);
#   2. an App with `replicas: N`, `placement.nodeSelector: {bench: links}`
#      is applied (spread by least load: normally one instance per node;
#      the summary names nodes that got more than one);
#   3. measured: seconds from the apply until every instance is Running,
#      the cloud's chunk bytes served to nodes (`GET /v1/p2p/status`,
#      admin token: `cloud.bytesServed`), chunks per node from peers (the
#      agents' debug line "chunk from a peer"; from another site by the
#      serving node's label), the proxies' counters, and CPU from the apply
#      until all Running: the machine's busy share (/proc/stat) and the
#      core-seconds of the cloud, linkd and the agents (the machine is
#      shared: the rest is other work).
#
# Modes: nop2p (agents --p2p-listen off: every chunk from the cloud), p2p
# (agents serve peers; cloud and agent defaults).
#
#   bench/p2p-links.sh
#   BENCH_LINKS_RUNS="1:1:p2p 10:1:nop2p 10:1:p2p 10:5:p2p 50:1:p2p 50:5:p2p 50:1:nop2p"
#   BENCH_LINKS_SIZE_MIB=100        random bytes appended to the executable
#   BENCH_LINKS_SEED=42
#   BENCH_LINKS_NODE_RATE=100M      each node's link, each way (bits/s)
#   BENCH_LINKS_EGRESS=200M         the cloud's egress, shared (bits/s)
#   BENCH_LINKS_TIMEOUT=900         give up waiting for Running after this (s)
#   BENCH_LINKS_RESULTS=FILE        append one TSV line per run: N, sites, mode,
#                                   all/first/median Running (s), cloud bytes,
#                                   ÷ artifact, cloud chunks, 429s, chunks from
#                                   peers, of them cross-site, nodes with an
#                                   instance, egress proxy bytes to nodes, peer
#                                   proxy bytes served, machine CPU busy %, our
#                                   core-seconds, tracker reports
#   BENCH_KEEP=1                    keep the work directory's logs and measurements
#   BENCH_KEEP=all                  keep the data directories too (~SIZE per node per run)
#   BENCH_LINKS_NO_BUILD=1          use the binaries as built
#   BENCH_LINKS_YUNBIAN=PATH        measure this yunbian binary (implies no build of it)
#
# One summary line per run. The default matrix takes about 15 min (the
# 50-node baseline alone ~4 min) on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
RUNS="${BENCH_LINKS_RUNS:-1:1:p2p 10:1:nop2p 10:1:p2p 10:5:p2p 50:1:p2p 50:5:p2p 50:1:nop2p}"
SIZE_MIB="${BENCH_LINKS_SIZE_MIB:-100}"
SEED="${BENCH_LINKS_SEED:-42}"
NODE_RATE="${BENCH_LINKS_NODE_RATE:-100M}"
EGRESS="${BENCH_LINKS_EGRESS:-200M}"
TIMEOUT="${BENCH_LINKS_TIMEOUT:-900}"
RESULTS="${BENCH_LINKS_RESULTS:-}"

YUNBIAN_BIN="${BENCH_LINKS_YUNBIAN:-$CARGO_TARGET_DIR/release/yunbian}"
if [ -z "${BENCH_LINKS_NO_BUILD:-}" ]; then
  [ -n "${BENCH_LINKS_YUNBIAN:-}" ] || cargo build --release -q -p yunbian
  cargo build --release -q -p yunbian-faults --example linkd
fi
W="$(mktemp -d /tmp/yunbian-p2p-links.XXXXXX)"
# Copies, so that a rebuild by someone else does not change them mid-run.
Y="$W/bin/yunbian"
LINKD="$W/bin/linkd"
mkdir -p "$W/bin"
cp "$YUNBIAN_BIN" "$Y"
cp "$CARGO_TARGET_DIR/release/examples/linkd" "$LINKD"
PIDS=()

# Workloads live in their own session and outlive their agent: stop the
# ones started from this work directory (by pid), then the agents, the
# proxies and the cloud.
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

# CPU so far: "machine_busy machine_total ours" in clock ticks (all cores;
# ours = the cloud, linkd and the agents, from /proc/PID/stat).
cpu_snapshot() {
  python3 - "${PIDS[@]}" <<'EOF'
import sys
v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
idle = v[3] + v[4]
ours = 0
for pid in sys.argv[1:]:
    try:
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        ours += int(st[11]) + int(st[12])
    except OSError:
        pass
print(sum(v) - idle, sum(v), ours)
EOF
}

# N distinct free ports, below the kernel's ephemeral range: they are
# bound later (the agents' peer servers), and meanwhile linkd's listeners
# and every outgoing connection take ephemeral ports, which must not
# collide with them.
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
socks, ports = [], []
for port in random.sample(range(10000, low), low - 10000):
    if len(ports) == int(sys.argv[1]):
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    socks.append(s)
    ports.append(port)
print(" ".join(map(str, ports)))
EOF
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "yunbian: $("$Y" --version), $YUNBIAN_BIN built $(date -u -r "$YUNBIAN_BIN" +%FT%TZ); now HEAD $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (crates/ modified)')"
echo "links: node $NODE_RATE bit/s each way, cloud egress $EGRESS bit/s shared"

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

# run N SITES MODE
run() {
  local n=$1 sites=$2 mode=$3 i
  case "$mode" in nop2p | p2p) ;; *) echo "unknown mode $mode" >&2; return 1 ;; esac
  local R="$W/run-$n-$sites-$mode"
  mkdir -p "$R"
  local port
  port="$(free_ports 1)"
  NO_COLOR=1 "$Y" cloud --data-dir "$R/cloud" --listen "127.0.0.1:$port" >"$R/cloud.log" 2>&1 &
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

  local s
  for s in $(seq 1 "$sites"); do
    cat <<EOF
---
apiVersion: yunbian.io/v1
kind: NodeGroup
metadata: {name: site-s$s}
spec:
  selector: {site: s$s}
  site: s$s
EOF
  done >"$R/groups.yaml"
  "$Y" apply -f "$R/groups.yaml" >/dev/null

  # The links: one proxy daemon for the run.
  local p2p_ports=() node_args=()
  read -r -a p2p_ports <<<"$(free_ports "$n")"
  for i in $(seq 1 "$n"); do
    if [ "$mode" = p2p ]; then node_args+=(--node "edge-$i:${p2p_ports[$((i - 1))]}"); else node_args+=(--node "edge-$i"); fi
  done
  "$LINKD" --cloud "127.0.0.1:$port" --egress "$EGRESS" --node-rate "$NODE_RATE" --stats "$R/links.txt" \
    "${node_args[@]}" >"$R/linkd.out" 2>"$R/linkd.err" &
  PIDS+=("$!")
  for _ in $(seq 100); do grep -qx ready "$R/linkd.out" 2>/dev/null && break; sleep 0.1; done
  grep -qx ready "$R/linkd.out" || { echo "linkd did not start: $(cat "$R/linkd.err")" >&2; stop_all; return 1; }

  for i in $(seq 1 "$n"); do
    local cloud_proxy peer_proxy p2p_args=(--p2p-listen off)
    cloud_proxy="$(awk -v n="edge-$i" '$1 == "node" && $2 == n {print $4}' "$R/linkd.out")"
    peer_proxy="$(awk -v n="edge-$i" '$1 == "node" && $2 == n {print $6}' "$R/linkd.out")"
    [ "$mode" = p2p ] && p2p_args=(--p2p-listen "127.0.0.1:${p2p_ports[$((i - 1))]}" --p2p-advertise "$peer_proxy")
    NO_COLOR=1 YUNBIAN_LOG="info,yunbian_edge::p2p=debug" "$Y" edge join --cloud "https://$cloud_proxy" \
      --token "$("$Y" token create --ttl 1h)" --name "edge-$i" --data-dir "$R/edge-$i" \
      --labels "site=s$(((i - 1) % sites + 1)),bench=links,node=edge-$i" \
      --mqtt-listen off --device-api-listen off --metrics-listen off "${p2p_args[@]}" \
      >"$R/edge-$i.log" 2>&1 &
    PIDS+=("$!")
  done
  # Every node Ready; with P2P, every node announced its label's site.
  local ok=""
  for _ in $(seq 1500); do
    if "$Y" get nodes -o json 2>/dev/null | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
sys.exit(0 if sum(1 for i in items if i.get("status", {}).get("phase") == "Ready") >= int(sys.argv[1]) else 1)' "$n"; then
      if [ "$mode" = nop2p ] || tracker | python3 -c '
import json, sys
n, sites = int(sys.argv[1]), int(sys.argv[2])
want = {f"edge-{i}": f"s{(i - 1) % sites + 1}" for i in range(1, n + 1)}
got = {x.get("node"): x.get("site") for x in json.load(sys.stdin)["nodes"]}
sys.exit(0 if all(got.get(k) == v for k, v in want.items()) else 1)' "$n" "$sites"; then
        ok=1
        break
      fi
    fi
    sleep 0.2
  done
  if [ -z "$ok" ]; then
    echo "N=$n sites=$sites mode=$mode: nodes not ready/announced in time; tracker has:" \
      "$(tracker | python3 -c 'import json, sys; print(sorted((x["node"], x.get("site")) for x in json.load(sys.stdin)["nodes"]))')" >&2
    grep -h "WARN\|ERROR" "$R"/edge-*.log | head -5 >&2
    stop_all
    return 1
  fi
  tracker >"$R/tracker-before.json" || true

  cat >"$R/app.yaml" <<EOF
apiVersion: yunbian.io/v1
kind: App
metadata: {name: payload}
spec:
  replicas: $n
  artifact: {name: payload, version: "1"}
  process: {args: ["3600"]}
  placement: {nodeSelector: {bench: links}}
EOF
  local t0
  cpu_snapshot >"$R/cpu.txt"
  t0="$(date +%s.%N)"
  "$Y" apply -f "$R/app.yaml" >/dev/null
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
  cpu_snapshot >>"$R/cpu.txt"
  sleep 2
  tracker >"$R/tracker.json" || echo '{}' >"$R/tracker.json"
  # The App's status (why each instance is where it is) and the nodes.
  "$Y" get app payload -o json >"$R/app.json" 2>/dev/null || true
  "$Y" get nodes -o json >"$R/nodes.json" 2>/dev/null || true
  # Per node: chunks from peers, of them from another site, cloud 429s/503s.
  for i in $(seq 1 "$n"); do
    printf 'edge-%s %s %s %s\n' "$i" "$(grep -c 'chunk from a peer' "$R/edge-$i.log" || true)" \
      "$(grep -c 'cloud busy' "$R/edge-$i.log" || true)" \
      "$(sed -n 's/.*chunk from a peer.* peer=edge-\([0-9]*\).*/\1/p' "$R/edge-$i.log" |
        awk -v me="$i" -v s="$sites" '($1 - 1) % s != (me - 1) % s {c++} END {print c + 0}')"
  done >"$R/peers.txt"
  python3 - "$n" "$sites" "$mode" "$PAYLOAD_BYTES" "$R" "$RESULTS" <<'EOF'
import json, os, statistics, sys
n, sites, mode, size, r, results = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
times = [l.split() for l in open(f"{r}/times.txt")]
run = sorted(float(t[3]) for t in times if t[0] == "running")
nodes = {t[2] for t in times if t[0] == "running"}
stuck = [" ".join(t[1:]) for t in times if t[0] == "stuck"]
tr = json.load(open(f"{r}/tracker.json"))
cloud = tr.get("cloud", {})
served = cloud.get("bytesServed", 0)
per_node = cloud.get("perNode", {})
peers = {l.split()[0]: tuple(int(x) for x in l.split()[1:4]) for l in open(f"{r}/peers.txt")}
peer_chunks = sum(p[0] for p in peers.values())
cross_site = sum(p[2] for p in peers.values())
instances_per_node = {}
for t in times:
    if t[0] == "running":
        instances_per_node[t[2]] = instances_per_node.get(t[2], 0) + 1
doubled = sorted(k for k, v in instances_per_node.items() if v > 1)
cloud_chunks = cloud.get("chunksServed", 0)
links = {}
egress = (0, 0)
try:
    for l in open(f"{r}/links.txt"):
        f = l.split()
        if f[0] == "egress":
            egress = (int(f[1]), int(f[2]))
        elif f[0] == "node":
            links[f[1]] = [int(x) for x in f[2:]]
except OSError:
    pass
served_to_peers = sum(v[3] for v in links.values())
reports = tr.get("reports", {})
# CPU from the apply until the poller stopped (all Running or timeout).
(b0, t0, o0), (b1, t1, o1) = [[int(x) for x in l.split()] for l in open(f"{r}/cpu.txt")][:2]
cores, ticks = os.cpu_count(), os.sysconf("SC_CLK_TCK")
wall = (t1 - t0) / ticks / cores
busy = (b1 - b0) / max(1, t1 - t0)
ours = (o1 - o0) / ticks
all_t = f"{run[-1]:.1f}" if len(run) == n else f"timeout({len(run)}/{n})"
first = f"{run[0]:.1f}" if run else "-"
median = f"{statistics.median(run):.1f}" if run else "-"
print(
    f"N={n} sites={sites} mode={mode}: all Running {all_t} s (first {first}, median {median}) on {len(nodes)} nodes;"
    f" cloud served {served} B = {served / size:.2f} x artifact ({cloud_chunks} chunks, 429s {cloud.get('refused', 0)});"
    f" chunks from peers {peer_chunks} ({cross_site} from another site); egress proxy to nodes {egress[1]} B; peer proxies served {served_to_peers} B;"
    f" CPU {100 * busy:.0f} % busy over {wall:.0f} s, ours {ours:.0f} core-s ({100 * ours / max(wall * cores, 1):.0f} % of {cores} cores)"
)
print("  per node cloud/peer chunks: " + " ".join(
    f"{k}:{per_node.get(k, {}).get('chunks', 0)}c/{peers[k][0]}p" for k in sorted(peers, key=lambda s: int(s.split('-')[1]))))
for s in stuck:
    print(f"  stuck: {s}")
if doubled:
    print(f"  more than one instance on: {' '.join(doubled)}; none on: {' '.join(sorted(set(peers) - set(instances_per_node)))}")
if results:
    with open(results, "a") as f:
        f.write("\t".join(str(x) for x in [n, sites, mode, all_t, first, median, served, f"{served / size:.3f}",
                                           cloud_chunks, cloud.get("refused", 0), peer_chunks, cross_site, len(instances_per_node), egress[1], served_to_peers,
                                           f"{100 * busy:.0f}", f"{ours:.0f}",
                                           "corrupt=%s,unreachable=%s" % (reports.get("corrupt", 0), reports.get("unreachable", 0))]) + "\n")
EOF
  "$Y" delete app payload >/dev/null 2>&1 || true
  sleep 1
  stop_all
  unset YUNBIAN_CONFIG
  if [ "${BENCH_KEEP:-}" != all ]; then
    # keep the logs and measurements, drop the data directories
    rm -rf "$R/cloud" "$R"/edge-*/
  fi
}

for spec in $RUNS; do
  IFS=: read -r n sites mode <<<"$spec"
  run "$n" "$sites" "$mode" || echo "N=$n sites=$sites mode=$mode failed"
done
