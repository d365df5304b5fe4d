//! RFC 3339 times and CPU / memory quantities: the parsers never panic and
//! accepted values survive formatting and parsing again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    yunbian_api::fuzzing::check_quantities(data);
});
