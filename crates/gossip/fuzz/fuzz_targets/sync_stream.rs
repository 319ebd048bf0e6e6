//! What a peer sends on a gossip TCP sync connection (`shoal_gossip::fuzzing::sync_stream`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_gossip::fuzzing::sync_stream(data));
