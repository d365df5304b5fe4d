//! MQTT 3.1.1 / 5 packets (the edge broker's decoder): `decode` never
//! panics on any stream of bytes, before CONNECT or in either protocol, and
//! every decoded packet survives `encode` + decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_bus::fuzzing::check_mqtt_stream(data);
});
