#!/usr/bin/env bash
# Store-and-forward drain after an outage (docs/benchmarks.md,
# "Store-and-forward"). Release cloud and agent on loopback.
#
#   1. A node is joined (`edge join --no-run`), and its outbox is filled by
#      crates/edge/examples/outbox_fill.rs with what an hour at 10,000
#      points/s produces (1,000 series x 10 points/s, 3,600 batches of
#      10,000 points, written by the agent's own Shipper).
#   2. The agent starts and drains it into the cloud's data store. Measured:
#      time until the cloud stored every point and the agent's backlog is
#      0, points/s, bytes on disk and on the wire (the agent's TCP socket,
#      `ss`), CPU (utime+stime from /proc, also per thread) and peak RSS of
#      both processes.
#   3. A second node with a shorter backlog drains with --data-bandwidth:
#      measured wire rate against the limit.
#
#   scripts/bench-data-drain.sh
#   BENCH_DRAIN_SECONDS=3600          seconds of backlog for run 1
#   BENCH_DRAIN_BW_SECONDS=300        seconds of backlog for the limited run (0: skip)
#   BENCH_DRAIN_BANDWIDTH=1Mi         --data-bandwidth of the limited run
#   BENCH_DRAIN_TIMEOUT=420           give up on a drain after this many seconds
#                                     (reported as not drained, with what arrived)
#   BENCH_KEEP=1                      keep the work directory
#   BENCH_DRAIN_PERF=1                perf-record cloud and agent during run 1
#                                     (use with BENCH_DRAIN_PROFILE=profiling:
#                                     the release build has no symbols)
#   BENCH_DRAIN_PROFILE=release       cargo profile of both binaries
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
FILL_SECONDS="${BENCH_DRAIN_SECONDS:-3600}"
BW_SECONDS="${BENCH_DRAIN_BW_SECONDS:-300}"
BANDWIDTH="${BENCH_DRAIN_BANDWIDTH:-1Mi}"
TIMEOUT="${BENCH_DRAIN_TIMEOUT:-420}"

PROFILE="${BENCH_DRAIN_PROFILE:-release}"
cargo build --profile "$PROFILE" -q -p yunbian
cargo build --profile "$PROFILE" -q -p yunbian-edge --example outbox_fill
Y="$CARGO_TARGET_DIR/$PROFILE/yunbian"
FILL="$CARGO_TARGET_DIR/$PROFILE/examples/outbox_fill"
W="$(mktemp -d /tmp/yunbian-drain.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
HZ="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
status_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
# CPU seconds per thread name (tokio workers summed), largest first.
threads() {
  for t in /proc/"$1"/task/*; do
    printf '%s\t%s\n' "$(cat "$t/comm")" "$(awk '{print $14 + $15}' "$t/stat")"
  done | awk -F'\t' -v hz="$HZ" '{s[$1]+=$2} END {for (k in s) if (s[k] > 0) printf "%.1f s %s\n", s[k]/hz, k}' | sort -rn | head -8 | paste -sd, -
}

CLOUD_PORT="$(free_port)"
NO_COLOR=1 "$Y" cloud --data-dir "$W/cloud" --listen "127.0.0.1:$CLOUD_PORT" >"$W/cloud.log" 2>&1 &
CLOUD_PID=$!
PIDS+=("$CLOUD_PID")
for _ in $(seq 200); do [ -f "$W/cloud/admin.yaml" ] && break; sleep 0.1; done
export YUNBIAN_CONFIG="$W/cloud/admin.yaml"
for _ in $(seq 100); do "$Y" get nodes >/dev/null 2>&1 && break; sleep 0.1; done
awk '/^ca: \|/{f=1;next} /^[^ ]/{f=0} f{sub(/^  /,"");print}' "$W/cloud/admin.yaml" >"$W/ca.pem"
ADMIN="$(sed -n 's/^token: //p' "$W/cloud/admin.yaml")"
cloud_metric() {
  curl -fs --max-time 5 --cacert "$W/ca.pem" -H "Authorization: Bearer $ADMIN" "https://127.0.0.1:$CLOUD_PORT/metrics" 2>/dev/null \
    | awk -v m="$1" '$1==m {print $2; f=1} END {if (!f) print 0}'
}
agent_metric() {
  curl -fs --max-time 5 "http://127.0.0.1:$2/metrics" 2>/dev/null | awk -v m="$1" '$1==m {print $2; f=1} END {if (!f) print -1}'
}
# Bytes the agent's TCP connection(s) to the cloud port had acknowledged
# (TLS records: WebSocket frames, JSON, base64 and all).
wire_bytes() {
  ss -tinpH state established "( dport = :$CLOUD_PORT )" 2>/dev/null | awk -v pid="pid=$1," '
    index($0, pid) {f=1} f && match($0, /bytes_acked:[0-9]+/) {s += substr($0, RSTART + 12, RLENGTH - 12); f=0}
    END {print s + 0}'
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "cloud pid $CLOUD_PID on 127.0.0.1:$CLOUD_PORT, idle RSS $(status_kib "$CLOUD_PID" VmRSS) KiB"

# drain NAME SECONDS BANDWIDTH
drain() {
  local name=$1 seconds=$2 bw=$3
  local dir="$W/$name" mport
  mport="$(free_port)"
  "$Y" edge join --no-run --cloud "https://127.0.0.1:$CLOUD_PORT" --token "$("$Y" token create --ttl 1h)" \
    --name "$name" --data-dir "$dir" >"$W/$name-join.log" 2>&1
  echo
  echo "== $name: $seconds s of backlog at 10,000 points/s, --data-bandwidth $bw"
  "$FILL" "$dir/outbox" --seconds "$seconds" --series 1000 --rate 10 | tee "$W/$name-fill.out"
  local batches points bytes
  read -r _ batches _ points _ bytes < <(grep '^batches' "$W/$name-fill.out")
  echo "outbox on disk: $batches files, $(du -sb "$dir/outbox" | cut -f1) bytes (du), $bytes bytes of batch files," \
    "$(awk -v b="$bytes" -v p="$points" 'BEGIN {printf "%.3f", b / p}') B/point"
  local stored0 dup0 rej0 c0
  stored0="$(cloud_metric yunbian_data_points_stored_total)"
  dup0="$(cloud_metric yunbian_data_batches_duplicate_total)"
  rej0="$(cloud_metric yunbian_data_points_rejected_total)"
  c0="$(ticks "$CLOUD_PID")"
  sync
  local t0 tfirst="" tdone="" edge stored queued cr=0 ar=0 wire=0 wire_first=0 t_wire_first="" last_print
  t0="$(now)"
  NO_COLOR=1 "$Y" edge --data-dir "$dir" --metrics-listen "127.0.0.1:$mport" --mqtt-listen off \
    --device-api-listen off --data-bandwidth "$bw" >"$W/$name.log" 2>&1 &
  edge=$!
  PIDS+=("$edge")
  local perfs=()
  if [ -n "${BENCH_DRAIN_PERF:-}" ] && [ "$bw" = 0 ]; then
    perf record -q -F 299 --call-graph dwarf,16384 -o "$W/cloud.perf" -p "$CLOUD_PID" >/dev/null 2>&1 &
    perfs+=("$!")
    perf record -q -F 299 --call-graph dwarf,16384 -o "$W/agent.perf" -p "$edge" >/dev/null 2>&1 &
    perfs+=("$!")
  fi
  last_print="$t0"
  : >"$W/$name-samples.tsv"
  while :; do
    sleep 0.2
    kill -0 "$edge" 2>/dev/null || { echo "agent died; log:"; tail -20 "$W/$name.log"; return 1; }
    stored=$(($(cloud_metric yunbian_data_points_stored_total) - stored0))
    queued="$(agent_metric yunbian_edge_data_queued_batches "$mport")"
    cr="$(awk -v a="$cr" -v b="$(status_kib "$CLOUD_PID" VmRSS)" 'BEGIN {print (b > a ? b : a)}')"
    ar="$(awk -v a="$ar" -v b="$(status_kib "$edge" VmRSS)" 'BEGIN {print (b > a ? b : a)}')"
    wire="$(wire_bytes "$edge")"
    local t
    t="$(now)"
    printf '%s\t%s\t%s\t%s\n' "$(awk -v a="$t0" -v b="$t" 'BEGIN {printf "%.2f", b - a}')" "$stored" "$queued" "$wire" >>"$W/$name-samples.tsv"
    if [ -z "$tfirst" ] && [ "$stored" -gt 0 ]; then tfirst="$t"; wire_first="$wire"; t_wire_first="$t"; fi
    if awk -v a="$last_print" -v b="$t" 'BEGIN {exit !(b - a >= 10)}'; then
      last_print="$t"
      echo "  $(awk -v a="$t0" -v b="$t" 'BEGIN {printf "%5.1f", b - a}') s: cloud stored $stored points, agent queue $queued batches, wire $wire B"
    fi
    if [ "$stored" -ge "$points" ] && [ "$queued" = 0 ]; then tdone="$t"; break; fi
    if awk -v a="$t0" -v b="$t" -v m="$TIMEOUT" 'BEGIN {exit !(b - a >= m)}'; then tdone="$t"; break; fi
  done
  if [ "${#perfs[@]}" -gt 0 ]; then
    kill -INT "${perfs[@]}"
    wait "${perfs[@]}" || true
    for p in cloud agent; do
      perf report -i "$W/$p.perf" --no-children --sort dso,symbol --percent-limit 1.5 --stdio 2>/dev/null \
        | grep -v '^#' | grep '%' | head -25 >"$W/$p-self.txt" || true
      perf report -i "$W/$p.perf" --children --sort symbol --percent-limit 4 --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep '%' | head -40 >"$W/$p-children.txt" || true
      echo "perf, $p, self time:"; sed 's/^/    /' "$W/$p-self.txt"
    done
  fi
  local c1 a1 cloud_hwm agent_hwm
  c1="$(ticks "$CLOUD_PID")"
  a1="$(ticks "$edge")"
  cloud_hwm="$(status_kib "$CLOUD_PID" VmHWM)"
  agent_hwm="$(status_kib "$edge" VmHWM)"
  local cloud_threads agent_threads
  cloud_threads="$(threads "$CLOUD_PID")"
  agent_threads="$(threads "$edge")"
  local acked dup rej
  acked="$(agent_metric yunbian_edge_data_acked_points_total "$mport")"
  dup=$(($(cloud_metric yunbian_data_batches_duplicate_total) - dup0))
  rej=$(($(cloud_metric yunbian_data_points_rejected_total) - rej0))
  local series
  series="$("$Y" series --match "gen{node=\"$name\"}" -o json 2>/dev/null | grep -o '"topic"' | wc -l || true)"
  [ -n "$tfirst" ] || { tfirst="$tdone"; wire_first="$wire"; }
  awk -v t0="$t0" -v tf="$tfirst" -v td="$tdone" -v p="$points" -v got="$stored" -v b="$bytes" -v w0="$wire_first" -v w="$wire" \
    -v c0="$c0" -v c1="$c1" -v a1="$a1" -v hz="$HZ" -v bw="$bw" -v name="$name" 'BEGIN {
      d = td - t0; s = td - tf; if (s <= 0) s = 1e-9
      if (got >= p) printf "%s: drained %d points in %.1f s from agent start (first point stored after %.1f s; %.1f s from first to last)\n", name, p, d, tf - t0, s
      else printf "%s: NOT drained: after %.1f s the cloud had stored %d of %d points (%.1f %%; first point stored after %.1f s)\n", name, d, got, p, 100 * got / p, tf - t0
      printf "rate: %.0f points/s over the whole drain, %.0f points/s from first to last stored\n", got / d, got / s
      printf "wire (agent socket, bytes acked): %d B = %.2f B/point stored, %.0f KiB/s over the drain (limit %s)\n", w, w / (got > 0 ? got : 1), w / d / 1024, bw
      printf "CPU over the drain: cloud %.2f cores (%.1f s), agent %.2f cores (%.1f s)\n", (c1 - c0) / hz / d, (c1 - c0) / hz, a1 / hz / d, a1 / hz
    }' | tee -a "$W/summary.txt"
  echo "peak RSS: cloud VmHWM $cloud_hwm KiB (max sampled VmRSS $cr KiB), agent VmHWM $agent_hwm KiB (max sampled VmRSS $ar KiB)" | tee -a "$W/summary.txt"
  echo "cloud threads (CPU s): $cloud_threads"
  echo "agent threads (CPU s): $agent_threads"
  echo "check: agent acked $acked points, cloud duplicates $dup batches, rejected $rej points, $series series of gen{node=$name}"
  echo "cloud data store on disk: $(du -sb "$W/cloud/tsdb" | cut -f1) B ($(du -sb "$W/cloud/tsdb/wal" 2>/dev/null | cut -f1 || echo ?) B WAL)"
  # Steady-state wire rate (the middle 80 % of the run) and the longest
  # time the cloud stored nothing while a backlog remained, from the samples.
  awk -F'\t' -v bw="$bw" '{t[NR]=$1; s[NR]=$2; w[NR]=$4}
    END {
      a = int(NR * 0.1) + 1; b = int(NR * 0.9)
      if (b > a) printf "wire rate, middle 80%% of samples (%.1f-%.1f s): %.0f KiB/s (limit %s)\n", t[a], t[b], (w[b]-w[a])/(t[b]-t[a])/1024, bw
      last = 1; gap = 0
      for (i = 2; i <= NR; i++) if (s[i] != s[last]) { if (t[i] - t[last] > gap) { gap = t[i] - t[last]; at = t[last] } last = i }
      if (t[NR] - t[last] > gap) { gap = t[NR] - t[last]; at = t[last] }
      printf "longest stretch without a stored batch: %.1f s (from %.1f s)\n", gap, at
      for (k = 1; k <= 2; k++) {
        win = (k == 1) ? 1 : 5; m = 0
        for (i = 1; i <= NR; i++) { for (j = i; j <= NR && t[j] - t[i] < win; j++); if (j <= NR && (w[j] - w[i]) / (t[j] - t[i]) > m) m = (w[j] - w[i]) / (t[j] - t[i]) }
        printf "highest wire rate over any %d s: %.0f KiB/s\n", win, m / 1024
      }
    }' "$W/$name-samples.tsv" | tee -a "$W/summary.txt"
  kill "$edge"
  for _ in $(seq 100); do kill -0 "$edge" 2>/dev/null || break; sleep 0.1; done
}

drain drain-1 "$FILL_SECONDS" 0
if [ "$BW_SECONDS" -gt 0 ]; then
  drain drain-2 "$BW_SECONDS" "$BANDWIDTH"
fi
echo
echo "== summary"
cat "$W/summary.txt"
