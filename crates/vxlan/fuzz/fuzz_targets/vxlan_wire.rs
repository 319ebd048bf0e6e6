//! `shoal_vxlan::fuzzing::vxlan_wire` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vxlan::fuzzing::vxlan_wire(data));
