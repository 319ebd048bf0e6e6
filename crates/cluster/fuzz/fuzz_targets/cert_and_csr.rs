//! Certificate and CSR handling on hostile bytes (`shoal_cluster::fuzzing::cert_and_csr`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_cluster::fuzzing::cert_and_csr(data));
