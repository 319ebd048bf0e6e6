//! The DNS request path on arbitrary bytes (`shoal_dns::fuzzing::request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_dns::fuzzing::request(data));
