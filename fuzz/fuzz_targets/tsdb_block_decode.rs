//! Edge time-series store blocks read from disk: `parse_block` and every
//! entry's chunk decoding never panic on any bytes, and decoded timestamps
//! strictly increase. See `yunbian_tsdb::fuzzing::check_block`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_tsdb::fuzzing::check_block(data);
});
