//! Cloud↔edge wire frames: `decode_up` / `decode_down` never panic, and
//! every decoded message survives `encode` + decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_sync::fuzzing::check_wire_frame(data);
});
