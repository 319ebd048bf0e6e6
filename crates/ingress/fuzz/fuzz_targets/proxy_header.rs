//! The PROXY protocol parser on arbitrary bytes (`shoal_ingress::fuzzing::proxy_header`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_ingress::fuzzing::proxy_header(data));
