//! Manifests: `parse_one` / `parse_manifests` never panic, and every
//! accepted resource re-serializes (`to_value`) into one that
//! `Resource::from_value` accepts and validates again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_api::fuzzing::check_manifest(data);
});
