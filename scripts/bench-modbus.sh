#!/usr/bin/env bash
# Modbus polling figures (docs/benchmarks.md, "Modbus polling"): the Modbus
# driver on a current-thread tokio runtime (one core) against pymodbus TCP
# servers (crates/devices/tests/peers/modbus_server.py).
#   1. throughput: devices polling as fast as they can -> property reads/s,
#      requests/s (packed: properties batched into one request; sparse: a
#      register gap between properties, one request each);
#   2. cycle: 100 devices polled every 1 s -> the driver process's CPU%.
# Needs python3 with pymodbus 3.x (pip install 'pymodbus>=3.8,<4').
# Usage: scripts/bench-modbus.sh   (BENCH_MODBUS_SECONDS, default 5; cycle runs 4x that)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
S=${BENCH_MODBUS_SECONDS:-5}
cargo build --release -q -p yunbian-devices --example modbus_poll_bench
B="$CARGO_TARGET_DIR/release/examples/modbus_poll_bench"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "pymodbus $(python3 -c 'import pymodbus; print(pymodbus.__version__)'), $(python3 --version)"
run() { echo "\$ modbus_poll_bench $*"; "$B" "$@"; echo; }
run throughput --devices 1 --props 20 --seconds "$S"
run throughput --devices 10 --props 20 --seconds "$S"
run throughput --devices 10 --props 20 --seconds "$S" --layout sparse
run throughput --devices 100 --props 20 --seconds "$S"
run cycle --devices 100 --props 20 --seconds "$((S * 4))" --period-ms 1000
