//! Edge time-series store WAL segments read on open: the reader never
//! panics and its valid prefix reads back the same. See
//! `yunbian_tsdb::fuzzing::check_wal`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_tsdb::fuzzing::check_wal(data);
});
