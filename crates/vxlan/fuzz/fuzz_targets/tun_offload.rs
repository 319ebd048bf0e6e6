//! Fuzzes the TUN offload code of the WireGuard data path: the virtio-net header parser and
//! the GSO segmenter of the tx thread (kernel input), and the UDP GSO train of the rx thread
//! (decrypted peer input). No input may panic or write past a buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_vxlan::wg::fuzz_offload(data);
});
