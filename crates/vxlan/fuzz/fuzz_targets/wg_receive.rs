//! `shoal_vxlan::fuzzing::wg_receive` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_vxlan::fuzzing::wg_receive(data));
