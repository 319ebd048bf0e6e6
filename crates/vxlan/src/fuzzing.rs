//! Fuzzing entry points (not for the agent): each function is one fuzz target's body, called
//! both by the cargo-fuzz binary in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable. Each panics if an invariant breaks.

use crate::wire::{VNI_MAX, VxlanPacket, VxlanRepr, ipv4_destination, parse_vxlan_over_ipv4};

/// The VXLAN header view and the outer IPv4/UDP/VXLAN parser the WireGuard data path runs on
/// every decrypted packet: no input may panic, and whatever parses must re-emit to the same
/// header.
pub fn vxlan_wire(data: &[u8]) {
    let _ = ipv4_destination(data);
    if let Ok(v) = parse_vxlan_over_ipv4(data) {
        assert!(v.vni <= VNI_MAX);
    }
    if let Ok(p) = VxlanPacket::new_checked(data)
        && let Ok(repr) = VxlanRepr::parse(&p)
    {
        let mut buf = [0u8; 8];
        let mut out = VxlanPacket::new_unchecked(&mut buf[..]);
        repr.emit(&mut out).expect("parsed VNI fits");
        let back = VxlanPacket::new_checked(&buf[..]).expect("8 bytes");
        assert_eq!(VxlanRepr::parse(&back), Ok(repr));
    }
}

/// The TUN offload code of the WireGuard data path: the virtio-net header parser and the GSO
/// segmenter of the tx thread (kernel input), and the UDP GSO train of the rx thread.
pub fn tun_offload(data: &[u8]) {
    crate::wg::fuzz_offload(data);
}

/// A receive buffer from a WireGuard peer through the rx thread's steps (see
/// `wg::fuzz_receive`).
pub fn wg_receive(data: &[u8]) {
    crate::wg::fuzz_receive(data);
}
