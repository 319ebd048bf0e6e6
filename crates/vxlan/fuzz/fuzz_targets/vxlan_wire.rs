//! Fuzzes the VXLAN header view and the outer IPv4/UDP/VXLAN parser the WireGuard data path
//! runs on every decrypted packet: no input may panic, and whatever parses must re-emit to the
//! same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vxlan::wire::{VxlanPacket, VxlanRepr, ipv4_destination, parse_vxlan_over_ipv4};

fuzz_target!(|data: &[u8]| {
    let _ = ipv4_destination(data);
    if let Ok(v) = parse_vxlan_over_ipv4(data) {
        assert!(v.vni <= shoal_vxlan::wire::VNI_MAX);
    }
    if let Ok(p) = VxlanPacket::new_checked(data) {
        if let Ok(repr) = VxlanRepr::parse(&p) {
            let mut buf = [0u8; 8];
            let mut out = VxlanPacket::new_unchecked(&mut buf[..]);
            repr.emit(&mut out).expect("parsed VNI fits");
            let back = VxlanPacket::new_checked(&buf[..]).expect("8 bytes");
            assert_eq!(VxlanRepr::parse(&back), Ok(repr));
        }
    }
});
