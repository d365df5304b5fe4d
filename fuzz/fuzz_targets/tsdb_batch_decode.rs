//! Store-and-forward batches as the cloud reads them from edges: the batch
//! decoder never panics, with or without a valid checksum, and what it
//! accepts round-trips. See `yunbian_tsdb::fuzzing::check_batch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_tsdb::fuzzing::check_batch(data);
});
