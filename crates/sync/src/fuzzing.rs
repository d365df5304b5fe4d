//! Per-input check shared by the `wire_decode` fuzz target
//! (`fuzz/fuzz_targets/`) and the corpus replay test
//! (`tests/fuzz_corpus_wire.rs`). Inputs for runs without libFuzzer come
//! from [`yunbian_api::fuzzing::Mutator`].
//!
//! [`check_wire_frame`] accepts any bytes. It returns normally for every
//! frame the codec handles correctly (decoded or refused) and panics only
//! when a property is violated: that panic is the bug a fuzzer reports.

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

fn assert_same<T: PartialEq + std::fmt::Debug>(before: &T, after: &T, bytes: &[u8]) {
    assert!(
        before == after,
        "message changed through encode/decode\n before: {before:?}\n  after: {after:?}\n  bytes: {}",
        String::from_utf8_lossy(bytes)
    );
}
