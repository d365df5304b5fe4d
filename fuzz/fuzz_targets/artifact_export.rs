//! Artifact export files (`yunbian edge import` at air-gapped sites): the
//! reader never panics on raw bytes, hands out only listed chunks that
//! match their digests, and refuses every truncation or bit flip of a
//! well-formed file built from the input. See
//! `yunbian_artifacts::fuzzing::check_export`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = yunbian_artifacts::fuzzing::check_export(data);
});
