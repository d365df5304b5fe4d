//! Artifact chunk lists (what an edge turns into a `BlobManifest` before
//! pulling): JSON of an Artifact blob or spec never panics the check, an
//! accepted list is exactly the fixed chunking of its size, and the edge's
//! check agrees with the API's validation. See
//! `yunbian_artifacts::fuzzing::check_chunk_manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = yunbian_artifacts::fuzzing::check_chunk_manifest(data);
});
