#!/usr/bin/env bash
# Builds wasm-hello.wasm, a WASI 0.2 component, next to this script.
#
#   ./build.sh            # whichever toolchain below is available
#   ./build.sh wasip2     # rustup with the wasm32-wasip2 target
#   ./build.sh debian     # Debian bookworm packages, no wasm32 target
#
# wasip2: `rustup target add wasm32-wasip2`, then a plain cargo build; rustc
#   links the component itself (wasm-component-ld).
#
# debian: for machines where rustup cannot download a wasm32 standard
#   library. Needs `apt-get install rustc-web rust-web-src lld-19 wasi-libc`
#   (bookworm-security has rustc-web 1.96 and its std sources). The standard
#   library is built from those sources (-Zbuild-std) for wasm32-wasip1
#   against Debian's wasi-libc (preview 1), and linked by wasm-component-ld,
#   which turns the module into a component with the preview-1 command
#   adapter. Sockets do not go through preview 1: the app calls
#   wasi:sockets directly (the `wasip2` crate), so the component imports
#   them as a wasm32-wasip2 build would. wasm-component-ld comes with rustup's
#   toolchains since 1.82; without one it is installed from crates.io into
#   ./.tools.
#
# The committed wasm-hello.wasm was built with `./build.sh wasip2` (rustup
# stable 1.95.0; see README.md for its sha256).
set -euo pipefail
cd "$(dirname "$0")"
here="$PWD"
mode="${1:-auto}"
export CARGO_TARGET_DIR="${WASM_HELLO_TARGET_DIR:-$here/target}"
# Paths inside the module do not depend on where the repository lives.
remap="--remap-path-prefix=$here=wasm-hello --remap-path-prefix=$HOME=~"

if [ "$mode" = auto ]; then
  if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    mode=wasip2
  else
    mode=debian
  fi
fi

case "$mode" in
wasip2)
  RUSTFLAGS="$remap" cargo build --locked --release --target wasm32-wasip2
  out="$CARGO_TARGET_DIR/wasm32-wasip2/release/wasm-hello.wasm"
  ;;
debian)
  for tool in /usr/bin/rustc /usr/bin/wasm-ld-19 /usr/lib/wasm32-wasi/libc.a /usr/lib/rustlib/src/rust/library/Cargo.lock; do
    if [ ! -e "$tool" ]; then
      echo "build.sh: $tool is missing; apt-get install rustc-web rust-web-src lld-19 wasi-libc" >&2
      exit 1
    fi
  done
  # Debian's rustc-web is /usr/bin/rustc, with its sources in /usr/lib/rustlib/src.
  rustc=/usr/bin/rustc
  cargo=/usr/bin/cargo
  [ -x "$cargo" ] || cargo=cargo
  wcl=""
  if command -v rustc >/dev/null 2>&1; then
    for candidate in "$(rustc --print sysroot)"/lib/rustlib/*/bin/wasm-component-ld; do
      [ -x "$candidate" ] && wcl="$candidate"
    done
  fi
  if [ -z "$wcl" ]; then
    cargo install --locked --root "$here/.tools" wasm-component-ld
    wcl="$here/.tools/bin/wasm-component-ld"
  fi
  libc=/usr/lib/wasm32-wasi
  RUSTC="$rustc" RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="$remap -C linker=$wcl -C link-arg=--wasm-ld-path=/usr/bin/wasm-ld-19 -C link-arg=--wasi-adapter=command -C link-self-contained=no -L $libc -C link-arg=$libc/crt1-command.o" \
    "$cargo" build --locked --release -Zbuild-std=std,panic_abort --target wasm32-wasip1
  out="$CARGO_TARGET_DIR/wasm32-wasip1/release/wasm-hello.wasm"
  ;;
*)
  echo "usage: $0 [auto|wasip2|debian]" >&2
  exit 2
  ;;
esac

cp "$out" "$here/wasm-hello.wasm"
echo "built $here/wasm-hello.wasm ($(wc -c <"$here/wasm-hello.wasm") bytes, sha256 $(sha256sum "$here/wasm-hello.wasm" | cut -d' ' -f1))"
