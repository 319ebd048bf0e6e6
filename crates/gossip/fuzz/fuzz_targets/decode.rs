//! Hostile bytes into every decoder of the gossip core (`shoal_gossip::fuzzing::decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_gossip::fuzzing::decode(data));
