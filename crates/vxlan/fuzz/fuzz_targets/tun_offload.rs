//! `shoal_vxlan::fuzzing::tun_offload` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vxlan::fuzzing::tun_offload(data));
