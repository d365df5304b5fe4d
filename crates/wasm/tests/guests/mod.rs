//! Guests for the shim's tests, in the WebAssembly text format, and a
//! helper that writes one to a file as a binary.
//!
//! Core modules are WASI preview 1 commands (`_start`); components are WASI
//! preview 2 commands (`wasi:cli/run`), written against the 0.2.0 interface
//! names the first wasip2 toolchains used (the shim provides a later 0.2.x).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Compiles `wat` and writes it to `dir/name`.
pub fn write(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let binary = wat::parse_str(wat).expect("test guests are valid WAT");
    let path = dir.join(name);
    std::fs::write(&path, binary).expect("write the test guest");
    path
}

/// The committed sample app (examples/apps/wasm-hello), a component.
pub fn wasm_hello() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/apps/wasm-hello/wasm-hello.wasm")
}

/// Preview 1: prints its arguments, then its environment, one per line,
/// to stdout; writes `written by the guest\n` to `/data/hello.txt` (fd 3,
/// the first preopen); returns normally.
pub const ARGS_ENV_FILE: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; 0x10: file name, 0x20: file contents (21 bytes)
  (data (i32.const 0x10) "hello.txt")
  (data (i32.const 0x20) "written by the guest\n")

  ;; Turns the NULs of [ptr, ptr+len) into newlines and writes it to stdout.
  (func $print_strings (param $ptr i32) (param $len i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
          (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $write (i32.const 1) (local.get $ptr) (local.get $len)))

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0x80) (local.get $ptr))
    (i32.store (i32.const 0x84) (local.get $len))
    (if (call $fd_write (local.get $fd) (i32.const 0x80) (i32.const 1) (i32.const 0x88))
      (then (call $proc_exit (i32.const 90)))))

  (func (export "_start")
    ;; argv pointers at 0x1000, strings at 0x2000; sizes at 0x90/0x94.
    (drop (call $args_sizes_get (i32.const 0x90) (i32.const 0x94)))
    (drop (call $args_get (i32.const 0x1000) (i32.const 0x2000)))
    (call $print_strings (i32.const 0x2000) (i32.load (i32.const 0x94)))
    ;; environ pointers at 0x3000, strings at 0x4000.
    (drop (call $environ_sizes_get (i32.const 0x90) (i32.const 0x94)))
    (drop (call $environ_get (i32.const 0x3000) (i32.const 0x4000)))
    (call $print_strings (i32.const 0x4000) (i32.load (i32.const 0x94)))
    ;; path_open(fd 3, follow symlinks, "hello.txt", CREAT|TRUNC, all rights) -> fd at 0x98
    (if (call $path_open (i32.const 3) (i32.const 1) (i32.const 0x10) (i32.const 9)
          (i32.const 9) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 0x98))
      (then (call $proc_exit (i32.const 91))))
    (call $write (i32.load (i32.const 0x98)) (i32.const 0x20) (i32.const 21))
    (drop (call $fd_close (i32.load (i32.const 0x98))))))
"#;

/// Preview 1: exits with code 7 through `proc_exit`.
pub const EXIT_7: &str = r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $proc_exit (i32.const 7))))
"#;

/// Preview 1: writes `no newline` (no line end) to stdout, then exits 3.
pub const PARTIAL_LINE_EXIT_3: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0x10) "no newline")
  (func (export "_start")
    (i32.store (i32.const 0x80) (i32.const 0x10))
    (i32.store (i32.const 0x84) (i32.const 10))
    (drop (call $fd_write (i32.const 1) (i32.const 0x80) (i32.const 1) (i32.const 0x88)))
    (call $proc_exit (i32.const 3))))
"#;

/// Preview 1: traps on `unreachable` inside a named function.
pub const TRAP: &str = r#"
(module
  (memory (export "memory") 1)
  (func $explode unreachable)
  (func (export "_start") (call $explode)))
"#;

/// Preview 1: prints `stuck\n` to stderr, then loops forever.
pub const SPIN: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0x10) "stuck\n")
  (func (export "_start")
    (i32.store (i32.const 0x80) (i32.const 0x10))
    (i32.store (i32.const 0x84) (i32.const 6))
    (drop (call $fd_write (i32.const 2) (i32.const 0x80) (i32.const 1) (i32.const 0x88)))
    (loop $forever (br $forever))))
"#;

/// Preview 1: grows its memory one 64 KiB page at a time up to 1024 pages
/// (64 MiB), exiting 3 if a `memory.grow` returns -1.
pub const GROW_64_MIB: &str = r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (block $done
      (loop $more
        (br_if $done (i32.ge_u (memory.size) (i32.const 1024)))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
          (then (call $proc_exit (i32.const 3))))
        (br $more)))))
"#;

/// Preview 1: a CPU-bound loop of `iterations` steps of a 32-bit LCG
/// (x = x * 1664525 + 1013904223, from x = 0), exiting with the low byte of
/// the final value. [`lcg_exit_code`] computes the expected code.
pub fn spin_lcg(iterations: u32) -> String {
    format!(
        r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i32) (local $x i32)
    (local.set $n (i32.const {iterations}))
    (block $done
      (loop $step
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 1664525)) (i32.const 1013904223)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $step)))
    (call $proc_exit (i32.and (local.get $x) (i32.const 255)))))
"#
    )
}

/// The exit code [`spin_lcg`] ends with, by composing the step with
/// itself (square and multiply) rather than looping in an unoptimised test.
pub fn lcg_exit_code(iterations: u32) -> i32 {
    // (a, c) is the affine map x -> a*x + c (mod 2^32).
    let compose =
        |(a1, c1): (u32, u32), (a2, c2): (u32, u32)| (a1.wrapping_mul(a2), a2.wrapping_mul(c1).wrapping_add(c2));
    let (mut step, mut total, mut n) = ((1664525u32, 1013904223u32), (1u32, 0u32), iterations);
    while n > 0 {
        if n & 1 == 1 {
            total = compose(total, step);
        }
        step = compose(step, step);
        n >>= 1;
    }
    (total.1 & 255) as i32
}

/// Preview 2 component: `wasi:cli/run.run` calls `wasi:cli/exit.exit` with
/// `err` (status 1) when `fail` is true, otherwise returns `ok`.
pub fn component_run(fail: bool) -> String {
    let body = if fail { "(call $exit (i32.const 1)) unreachable" } else { "(i32.const 0)" };
    format!(
        r#"
(component
  (import "wasi:cli/exit@0.2.0" (instance $exit
    (export "exit" (func (param "status" (result))))))
  (core module $m
    (import "host" "exit" (func $exit (param i32)))
    (func (export "run") (result i32) {body}))
  (core func $exit_lowered (canon lower (func $exit "exit")))
  (core instance $host (export "exit" (func $exit_lowered)))
  (core instance $i (instantiate $m (with "host" (instance $host))))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))
"#
    )
}

/// Preview 2 component: `run` traps on `unreachable`.
pub const COMPONENT_TRAP: &str = r#"
(component
  (core module $m (func (export "run") (result i32) unreachable))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))
"#;

/// Preview 2 component whose core module asks for 2 MiB (32 pages) of
/// memory up front.
pub const COMPONENT_BIG_MEMORY: &str = r#"
(component
  (core module $m
    (memory (export "memory") 32)
    (func (export "run") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))
"#;

/// Preview 2 component importing an interface the shim does not provide.
pub const COMPONENT_NEEDS_HTTP: &str = r#"
(component
  (import "wasi:http/outgoing-handler@0.2.0" (instance $http
    (export "nothing" (func))))
  (core module $m (func (export "run") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))
"#;

/// Preview 1 library module: no `_start`.
pub const NO_START: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1))))
"#;
