//! The control-plane frame decoder on hostile bytes (`shoal_cluster::fuzzing::control_frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_cluster::fuzzing::control_frame(data));
