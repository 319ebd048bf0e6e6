//! What an upstream resolver sends back to a forwarded query (`shoal_dns::fuzzing::forward_reply`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_dns::fuzzing::forward_reply(data));
