#!/usr/bin/env bash
# WebAssembly and process start (docs/benchmarks.md, "WebAssembly and
# process start"): through the process runtime, as the edge agent launches
# workloads (crates/runtime/examples/wasm_start.rs),
#   1. a trivial program's spawn until exit: /bin/true, `yunbian --version`,
#      `yunbian shim wasm` of an empty core module (empty cache, cached, no cache);
#   2. `ensure` until the first HTTP answer of the wasm sample app
#      (examples/apps/wasm-hello) with an empty compiled-code cache, with the
#      module already compiled in the cache, and of the same service built
#      natively (crates/runtime/examples/native_hello.rs);
#   3. RSS and PSS per running instance with K = 1, 10, 50 instances of each.
# Usage: scripts/bench-wasm.sh [wasm_start flags, e.g. --reps 5 --counts 1,10]
# (defaults: --reps 15 --counts 1,10,50). Run as root to include cgroup setup
# as the agent does; --no-cgroups leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/yunbian/target}"
cargo build --release -q -p yunbian
cargo build --release -q -p yunbian-runtime --example wasm_start --example native_hello
R="$CARGO_TARGET_DIR/release"
W="$(mktemp -d)"
cleanup() {
  # The benchmark removes its instances itself; if it was killed, stop the
  # workloads still running in its directory (found by their working
  # directory, one pid at a time), then delete it.
  for p in /proc/[0-9]*; do
    case "$(readlink "$p/cwd" 2>/dev/null || true)" in
    "$W"/*) kill -KILL "${p#/proc/}" 2>/dev/null || true ;;
    esac
  done
  rm -rf "$W"
}
trap cleanup EXIT
# Run copies: a rebuild of the shared target directory during the run
# would otherwise swap the executables (and their page cache) underneath.
mkdir "$W/bin"
cp "$R/yunbian" "$R/examples/wasm_start" "$R/examples/native_hello" "$W/bin/"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem/ {print $2}') GiB"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' (crates/ modified in the working tree)')"
"$W/bin/wasm_start" --shim "$W/bin/yunbian" --module examples/apps/wasm-hello/wasm-hello.wasm \
  --native "$W/bin/native_hello" --dir "$W/run" "$@"
