#!/usr/bin/env bash
# Reliability and HA figures (docs/benchmarks.md, "Reliability and HA"):
#   1. leader failover: SIGKILL (and SIGINT) the leader -> the next leader's
#      "leading: controllers started"; an App applied right after the kill
#      -> all its instances Running;
#   2. reconnect: N simulated nodes on one replica, SIGKILL it -> all N
#      connected to the others (and Ready);
#   3. resync: simulated nodes cut off while 10,000 instances are placed on
#      them, then back -> every node acknowledged its whole desired view, and
#      every instance reported Running.
# Needs a binary built with `cargo build --release --features etcd`, etcd (/usr/bin/etcd or $YUNBIAN_ETCD_BIN) and curl.
# Usage: scripts/bench-ha.sh [path/to/yunbian]
#   BENCH_HA_NODES (1000), BENCH_HA_OBJECTS (10000), BENCH_HA_ROUNDS (3),
#   BENCH_HA_SECTIONS ("1 2 3"), BENCH_HA_ETCD_DIR (etcd data; default a
#   fresh directory under $TMPDIR, i.e. on disk: etcd fsyncs every write)
set -uo pipefail  # no -e: a poll that fails (a replica just killed) is retried
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/yunbian}
ETCD=${YUNBIAN_ETCD_BIN:-/usr/bin/etcd}
NODES=${BENCH_HA_NODES:-1000}
OBJECTS=${BENCH_HA_OBJECTS:-10000}
ROUNDS=${BENCH_HA_ROUNDS:-3}
SECTIONS=${BENCH_HA_SECTIONS:-1 2 3}
D=$(mktemp -d)
ETCD_DIR=${BENCH_HA_ETCD_DIR:-$D}/etcd-$$
declare -A PID PORT
cleanup() {
  for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  kill $(jobs -p) 2>/dev/null || true
  sleep 0.5
  rm -rf "$D" "$ETCD_DIR"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { echo "scale=2; ($(now) - $1) / 1" | bc; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

# ---------------------------------------------------------------- etcd
EP=$(free_port); PP=$(free_port)
"$ETCD" --name bench --data-dir "$ETCD_DIR" \
  --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "bench=http://127.0.0.1:$PP" --log-level warn >"$D/etcd.log" 2>&1 &
PID[etcd]=$!; disown "$!"
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$EP/health" 2>/dev/null | grep -q true && break; sleep 0.1; done

# ---------------------------------------------------------------- replicas
# start_replica ID PREFIX [extra cloud flags…]: on its old port after the first start.
start_replica() {
  local id=$1 prefix=$2; shift 2
  local port=${PORT[$id]:-0}
  NO_COLOR=1 YUNBIAN_LOG=info "$BIN" cloud --data-dir "$D/$id" --listen "127.0.0.1:$port" \
    --store "etcd://127.0.0.1:$EP" --etcd-prefix "$prefix" --replica-id "$id" "$@" >>"$D/$id.log" 2>&1 &
  PID[$id]=$!; disown "$!"
  for _ in $(seq 300); do [ -f "$D/$id/admin.yaml" ] && break; sleep 0.05; done
  PORT[$id]=$(sed -n 's/^server: https:\/\/127.0.0.1://p' "$D/$id/admin.yaml")
  for _ in $(seq 300); do cli "$id" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
  awk '/^ca: \|/{f=1;next} /^[^ ]/{f=0} f{sub(/^  /,"");print}' "$D/$id/admin.yaml" >"$D/ca.pem"
  TOKEN=$(sed -n 's/^token: //p' "$D/$id/admin.yaml")
}
gone() { for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done; }
kill_replica() { kill -9 "${PID[$1]}" 2>/dev/null; gone "${PID[$1]}"; unset "PID[$1]"; }
cli() { local id=$1; shift; "$BIN" --config "$D/$id/admin.yaml" "$@"; }
metric() { # metric ID NAME -> value (0 if unreachable)
  curl -fs --max-time 5 --cacert "$D/ca.pem" -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:${PORT[$1]}/metrics" 2>/dev/null \
    | awk -v m="$2" '$1==m {print $2; f=1} END {if (!f) print 0}'
}
leader() { for id in "$@"; do [ -n "${PID[$id]:-}" ] && [ "$(metric "$id" yunbian_cloud_leader)" = 1 ] && { echo "$id"; return; }; done; echo none; }
wait_leader() { local l; for _ in $(seq 600); do l=$(leader "$@"); [ "$l" != none ] && { echo "$l"; return; }; sleep 0.1; done; echo none; }
leading_lines() { grep -h "leading: controllers started" "$D"/r*.log 2>/dev/null | wc -l; }
log_time() { date -d "$(echo "$1" | cut -c1-26)Z" +%s.%N; } # RFC 3339 with µs -> epoch
app_field() { cli "$1" get app "$2" -o json 2>/dev/null | grep -o "\"$3\": *[0-9]*" | grep -o '[0-9]*$' || echo 0; }
ready_nodes() { cli "$1" get nodes 2>/dev/null | awk -v p="$2" 'index($1, p) == 1 && $2 == "Ready"' | wc -l; } # ready_nodes ID PREFIX
app() { # app NAME REPLICAS SELECTOR-VALUE
  printf 'apiVersion: yunbian.io/v1\nkind: App\nmetadata: {name: %s}\nspec: {replicas: %s, runtime: fake, placement: {nodeSelector: {pool: %s}}}\n' "$1" "$2" "$3" >"$D/$1.yaml"
  echo "$D/$1.yaml"
}
start_sim() { # start_sim NAME PREFIX N URLS LABEL-POOL
  local tok id
  for id in r1 r2 r3 s1 s2 s3; do [ -n "${PID[$id]:-}" ] && break; done
  tok=$(cli "$id" token create --ttl 2h)
  YUNBIAN_LOG=warn "$BIN" sim --cloud "$4" --token "$tok" --nodes "$3" --prefix "$2" --labels "pool=$5" >"$D/$1.log" 2>&1 &
  PID[$1]=$!; disown "$!"
}
url() { echo "https://127.0.0.1:${PORT[$1]}"; }

echo "# yunbian: $BIN ($("$BIN" --version))"
echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo) GiB; $("$ETCD" --version | head -1); etcd data on $(df -T "$ETCD_DIR" | awk 'NR==2 {print $2}')"
section() { [[ " $SECTIONS " == *" $1 "* ]]; }

for id in r1 r2 r3; do start_replica "$id" /bench-ha --heartbeat 5s --grace 20s; done

# ---------------------------------------------------------------- 1. leader failover
if section 1; then
start_sim sim-fo fo- 10 "$(url r1),$(url r2),$(url r3)" fo
for _ in $(seq 600); do [ "$(ready_nodes r1 fo-)" -ge 10 ] && break; sleep 0.2; done
echo
echo "## 1. leader failover (3 replicas, lease TTL 5 s; 10 simulated nodes; App of 100 instances applied right after the kill)"
for signal in kill int; do
  for round in $(seq "$ROUNDS"); do
    L=$(wait_leader r1 r2 r3)
    S=$(for id in r1 r2 r3; do [ "$id" != "$L" ] && echo "$id"; done | head -1)
    before=$(leading_lines)
    t0=$(now)
    kill -"${signal^^}" "${PID[$L]}"
    cli "$S" apply -f "$(app "fo-$signal-$round" 100 fo)" >/dev/null
    t_lead=""; t_ready=""
    for _ in $(seq 1200); do
      if [ -z "$t_lead" ] && [ "$(leading_lines)" -gt "$before" ]; then
        line=$(grep -h "leading: controllers started" "$D"/r*.log | sort | tail -1)
        t_lead=$(echo "$(log_time "$line") - $t0" | bc)
      fi
      if [ -z "$t_ready" ] && [ "$(app_field "$S" "fo-$signal-$round" readyReplicas)" = 100 ]; then t_ready=$(since "$t0"); fi
      [ -n "$t_lead" ] && [ -n "$t_ready" ] && break
      sleep 0.05
    done
    echo "SIG${signal^^} leader $L, round $round: new leader's controllers started after ${t_lead:-?} s; App of 100 Running after ${t_ready:-?} s"
    gone "${PID[$L]}"; kill -9 "${PID[$L]}" 2>/dev/null; unset "PID[$L]"
    start_replica "$L" /bench-ha --heartbeat 5s --grace 20s
    sleep 2
  done
done
kill -9 "${PID[sim-fo]}"; gone "${PID[sim-fo]}"; unset "PID[sim-fo]"
fi

# ---------------------------------------------------------------- 2. reconnect
if section 2; then
echo
echo "## 2. reconnect $NODES simulated nodes after the replica serving them dies (heartbeat 5 s, grace 20 s)"
L=$(wait_leader r1 r2 r3)
mapfile -t F < <(for id in r1 r2 r3; do [ "$id" != "$L" ] && echo "$id"; done)
V=${F[0]}; W=${F[1]}
# Nodes try the URLs in order: all start on V (a follower), fail over to L
# (the leader), then to W.
t0=$(now)
start_sim sim-rc rc- "$NODES" "$(url "$V"),$(url "$L"),$(url "$W")" rc
for _ in $(seq 1200); do [ "$(ready_nodes "$L" rc-)" -ge "$NODES" ] && break; sleep 0.5; done
echo "joined and Ready: $NODES nodes in $(since "$t0") s (on $V: $(metric "$V" yunbian_hub_connected_nodes))"
sleep 10
reconnect() { # reconnect VICTIM SURVIVOR… : kill the victim, time until the survivors serve all nodes
  local victim=$1; shift
  local t0 t_conn="" t_ready="" minready=$NODES c r
  t0=$(now)
  kill_replica "$victim"
  for _ in $(seq 3000); do
    c=0; for id in "$@"; do c=$((c + $(metric "$id" yunbian_hub_connected_nodes | cut -d. -f1))); done
    [ -z "$t_conn" ] && [ "$c" -ge "$NODES" ] && t_conn=$(since "$t0")
    if [ -n "$t_conn" ]; then
      r=$(ready_nodes "$1" rc-); [ "$r" -lt "$minready" ] && minready=$r
      [ "$r" -ge "$NODES" ] && { t_ready=$(since "$t0"); break; }
    fi
    sleep 0.1
  done
  echo "SIGKILL $victim ($( [ "$victim" = "$L" ] && echo leader || echo follower )): all $NODES connected to $* after ${t_conn:-?} s; all Ready after ${t_ready:-?} s (fewest Ready seen after reconnecting: $minready)"
}
reconnect "$V" "$L" "$W"
start_replica "$V" /bench-ha --heartbeat 5s --grace 20s
sleep 10
# Now every node is on L, the leader: kill it.
reconnect "$L" "$W" "$V"
start_replica "$L" /bench-ha --heartbeat 5s --grace 20s
kill -9 "${PID[sim-rc]}"; gone "${PID[sim-rc]}"; unset "PID[sim-rc]"
fi
for id in r1 r2 r3; do kill_replica "$id"; done

# ---------------------------------------------------------------- 3. resync
section 3 || exit 0
echo
echo "## 3. resync $OBJECTS instances placed on nodes while they were cut off"
# Replicas with a long grace, so cut-off nodes stay Ready (schedulable)
# while the instances are placed on them.
for id in s1 s2 s3; do start_replica "$id" /bench-resync --heartbeat 5s --grace 10m; done
resync() { # resync NAME NODES: NODES nodes on A, frozen, A killed, OBJECTS placed, resumed onto B
  local name=$1 k=$2 A B t0 t_conn="" t_sync="" t_run="" sent0 c q
  L=$(wait_leader s1 s2 s3)
  mapfile -t F < <(for id in s1 s2 s3; do [ "$id" != "$L" ] && echo "$id"; done)
  A=${F[0]}; B=${F[1]}
  start_sim "sim-$name" "$name-" "$k" "$(url "$A"),$(url "$B")" "$name"
  for _ in $(seq 600); do [ "$(metric "$A" yunbian_hub_connected_nodes | cut -d. -f1)" -ge "$k" ] && break; sleep 0.2; done
  sleep 6
  kill -STOP "${PID[sim-$name]}"
  kill_replica "$A"
  cli "$B" apply -f "$(app "$name" "$OBJECTS" "$name")" >/dev/null
  t0=$(now)
  for _ in $(seq 1200); do [ "$(app_field "$B" "$name" scheduledReplicas)" -ge "$OBJECTS" ] && break; sleep 0.2; done
  echo "$name: $OBJECTS instances created on $k cut-off node(s) in $(since "$t0") s"
  sleep 5
  sent0=$(metric "$B" yunbian_sync_messages_sent_total | cut -d. -f1)
  t0=$(now)
  kill -CONT "${PID[sim-$name]}"
  for _ in $(seq 6000); do
    c=$(metric "$B" yunbian_hub_connected_nodes | cut -d. -f1); q=$(metric "$B" yunbian_sync_queue_depth | cut -d. -f1)
    [ -z "$t_conn" ] && [ "$c" -ge "$k" ] && t_conn=$(since "$t0")
    [ -n "$t_conn" ] && [ -z "$t_sync" ] && [ "$q" = 0 ] && t_sync=$(since "$t0")
    [ -n "$t_sync" ] && [ "$(app_field "$B" "$name" readyReplicas)" -ge "$OBJECTS" ] && { t_run=$(since "$t0"); break; }
    sleep 0.1
  done
  echo "$name: resumed -> $k node(s) connected to $B after ${t_conn:-?} s; desired views acknowledged (sync queue 0) after ${t_sync:-?} s; all $OBJECTS reported Running after ${t_run:-?} s; $(( $(metric "$B" yunbian_sync_messages_sent_total | cut -d. -f1) - sent0 )) sync messages sent"
  kill -9 "${PID[sim-$name]}"; gone "${PID[sim-$name]}"; unset "PID[sim-$name]"
  cli "$B" delete app "$name" >/dev/null
  start_replica "$A" /bench-resync --heartbeat 5s --grace 10m
  sleep 5
}
# 10 nodes x 1,000 changes: within each node's delta log (1,024), resumed by deltas.
resync rsd 10
# 1 node x 10,000 changes: past the delta log, resumed by one snapshot.
resync rss 1
