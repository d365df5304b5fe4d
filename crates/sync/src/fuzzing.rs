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
/// again, which must succeed and yield an equal message whose encoding is
/// the same bytes (the codec round-trips and is stable).
pub fn check_wire_frame(frame: &[u8]) -> FrameCheck {
    let mut out = FrameCheck::default();
    if let Ok(msg) = decode_up(frame) {
        out.up = true;
        let bytes = encode(&msg);
        match decode_up(&bytes) {
            Ok(again) => {
                assert_eq!(again, msg, "Up changed through encode/decode: {}", String::from_utf8_lossy(&bytes));
                assert_eq!(encode(&again), bytes, "Up encoding is not stable");
            }
            Err(e) => panic!("encoded Up does not decode: {e}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    if let Ok(msg) = decode_down(frame) {
        out.down = true;
        let bytes = encode(&msg);
        match decode_down(&bytes) {
            Ok(again) => {
                assert_eq!(again, msg, "Down changed through encode/decode: {}", String::from_utf8_lossy(&bytes));
                assert_eq!(encode(&again), bytes, "Down encoding is not stable");
            }
            Err(e) => panic!("encoded Down does not decode: {e}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    out
}
