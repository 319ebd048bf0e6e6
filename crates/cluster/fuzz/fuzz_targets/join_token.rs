//! Join-token parsing on hostile text (`shoal_cluster::fuzzing::join_token`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_cluster::fuzzing::join_token(data));
