//! A backend's answer to the mesh's HTTP health check (`shoal_ingress::fuzzing::health_response`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_ingress::fuzzing::health_response(data));
