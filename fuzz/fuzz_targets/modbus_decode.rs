//! Modbus register decoding: `decode_registers` / `decode_bit` never panic
//! on any registers, data type, byte/word order, scale or offset; decoded
//! values have the model's type; plain values encode back to the same
//! registers. The input layout is described in
//! `yunbian_devices::modbus::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_devices::modbus::fuzzing::check_decode(data);
});
