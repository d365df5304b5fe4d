//! Per-input check shared by the `wire_decode` fuzz target
//! (`fuzz/fuzz_targets/`) and the corpus replay test
//! (`tests/fuzz_corpus_wire.rs`). Inputs for runs without libFuzzer come
//! from [`yunbian_api::fuzzing::Mutator`].
//!
//! [`check_wire_frame`] accepts any bytes. It returns normally for every
//! frame the codec handles correctly (decoded or refused) and panics only
//! when a property is violated: that panic is the bug a fuzzer reports.

use serde::Serialize;
use serde_json::Value;

use crate::wire::{decode_down, decode_up, encode};

/// Which directions a frame decoded in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCheck {
    /// [`decode_up`] accepted it (edge → cloud).
    pub up: bool,
    /// [`decode_down`] accepted it (cloud → edge).
    pub down: bool,
}

/// Decodes `frame` as both an [`Up`](crate::Up) and a [`Down`](crate::Down)
/// message. Each message decoded is re-encoded with [`encode`] and decoded
/// again, which must succeed and yield an equal message.
///
/// Floats inside a [`DesiredObject`](crate::DesiredObject) value must survive
/// exactly: the workspace enables serde_json's `float_roundtrip` (its default
/// parser is not correctly rounded; fuzzing found values moving by 1–2 ulps).
pub fn check_wire_frame(frame: &[u8]) -> FrameCheck {
    let mut out = FrameCheck::default();
    if let Ok(msg) = decode_up(frame) {
        out.up = true;
        let bytes = encode(&msg);
        match decode_up(&bytes) {
            Ok(again) => assert_same(&msg, &again, &bytes),
            Err(e) => panic!("encoded Up does not decode: {e}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    if let Ok(msg) = decode_down(frame) {
        out.down = true;
        let bytes = encode(&msg);
        match decode_down(&bytes) {
            Ok(again) => assert_same(&msg, &again, &bytes),
            Err(e) => panic!("encoded Down does not decode: {e}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    out
}

/// How far (in units in the last place) a float may move through one
/// encode/decode round trip: not at all, with `float_roundtrip` enabled.
pub const FLOAT_ULPS: u64 = 0;

fn assert_same<T: PartialEq + std::fmt::Debug + Serialize>(before: &T, after: &T, bytes: &[u8]) {
    if before == after {
        return;
    }
    let (a, b) = (serde_json::to_value(before), serde_json::to_value(after));
    let close = matches!((&a, &b), (Ok(a), Ok(b)) if same_up_to_float_rounding(a, b));
    assert!(
        close,
        "message changed through encode/decode\n before: {before:?}\n  after: {after:?}\n  bytes: {}",
        String::from_utf8_lossy(bytes)
    );
}

/// Structural equality, except that two floats within [`FLOAT_ULPS`] match.
fn same_up_to_float_rounding(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => ulps_apart(x, y) <= FLOAT_ULPS,
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_up_to_float_rounding(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|((kx, vx), (ky, vy))| kx == ky && same_up_to_float_rounding(vx, vy))
        }
        _ => a == b,
    }
}

fn ulps_apart(x: f64, y: f64) -> u64 {
    if x == y {
        0
    } else if !x.is_finite() || !y.is_finite() || x.is_sign_negative() != y.is_sign_negative() {
        u64::MAX
    } else {
        x.to_bits().abs_diff(y.to_bits())
    }
}
