//! Wire formats the data path looks at, as checked views over caller-owned bytes (smoltcp's
//! `wire` pattern): the VXLAN header (RFC 7348) and the outer IPv4/UDP headers that carry it.
//!
//! Everything here reads hostile input: constructors check lengths once, accessors never panic.

use std::net::Ipv4Addr;

/// Errors from the checked constructors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the header (or than the length the header claims).
    #[error("buffer too short")]
    Truncated,
    /// A field has a value this parser does not accept (wrong IP version, I flag clear, ...).
    #[error("malformed header")]
    Malformed,
}

/// Length of the VXLAN header.
pub const VXLAN_HEADER_LEN: usize = 8;
/// Largest VXLAN Network Identifier (24 bits).
pub const VNI_MAX: u32 = 0x00ff_ffff;
const FLAG_I: u8 = 0x08;

/// A read/write view of a VXLAN header followed by the inner Ethernet frame.
#[derive(Debug, Clone)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// Wraps `buffer` without checking it; use [`VxlanPacket::new_checked`] on input.
    pub fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }

    /// Wraps `buffer` after checking it holds at least a VXLAN header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < VXLAN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(VxlanPacket { buffer })
    }

    /// Whether the I flag (a valid VNI is present) is set.
    pub fn vni_valid(&self) -> bool {
        self.buffer.as_ref().first().is_some_and(|f| f & FLAG_I != 0)
    }

    /// The 24-bit VNI.
    pub fn vni(&self) -> u32 {
        let b = self.buffer.as_ref();
        match b.get(4..7) {
            Some(v) => u32::from_be_bytes([0, v[0], v[1], v[2]]),
            None => 0,
        }
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(VXLAN_HEADER_LEN..).unwrap_or(&[])
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Sets the flags byte to "I" and clears the reserved fields.
    pub fn set_flags_valid(&mut self) {
        let b = self.buffer.as_mut();
        if b.len() >= VXLAN_HEADER_LEN {
            b[0] = FLAG_I;
            b[1..4].fill(0);
            b[7] = 0;
        }
    }

    /// Writes the VNI (the low 24 bits of `vni`).
    pub fn set_vni(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        if b.len() >= VXLAN_HEADER_LEN {
            let v = vni.to_be_bytes();
            b[4..7].copy_from_slice(&v[1..4]);
        }
    }
}

/// The meaning of a VXLAN header: just its VNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    /// The VXLAN Network Identifier.
    pub vni: u32,
}

impl VxlanRepr {
    /// Parses a header; the I flag must be set (RFC 7348 §5: receivers drop it otherwise).
    pub fn parse<T: AsRef<[u8]>>(packet: &VxlanPacket<T>) -> Result<Self, WireError> {
        if !packet.vni_valid() {
            return Err(WireError::Malformed);
        }
        Ok(VxlanRepr { vni: packet.vni() })
    }

    /// Writes this header into `packet`; a VNI above 24 bits is an error.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut VxlanPacket<T>,
    ) -> Result<(), WireError> {
        if self.vni > VNI_MAX {
            return Err(WireError::Malformed);
        }
        packet.set_flags_valid();
        packet.set_vni(self.vni);
        Ok(())
    }
}

/// What an outer IPv4 + UDP + VXLAN packet says, as the WireGuard TUN sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanOverIpv4 {
    /// Outer source address.
    pub src: Ipv4Addr,
    /// Outer destination address.
    pub dst: Ipv4Addr,
    /// UDP destination port.
    pub dst_port: u16,
    /// The VNI in the VXLAN header.
    pub vni: u32,
}

/// Destination address of an IPv4 packet (for routing it to a peer), without further checks.
pub fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

/// Parses an IPv4 packet that carries UDP carrying VXLAN. Fragments, other protocols, bad
/// lengths and VXLAN headers without the I flag are errors.
pub fn parse_vxlan_over_ipv4(packet: &[u8]) -> Result<VxlanOverIpv4, WireError> {
    if packet.len() < 20 {
        return Err(WireError::Truncated);
    }
    if packet[0] >> 4 != 4 {
        return Err(WireError::Malformed);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(WireError::Malformed);
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total < ihl || total > packet.len() {
        return Err(WireError::Truncated);
    }
    let frag = u16::from_be_bytes([packet[6], packet[7]]);
    if frag & 0x3fff != 0 {
        // More-fragments set or a non-zero offset: not a whole datagram.
        return Err(WireError::Malformed);
    }
    if packet[9] != 17 {
        return Err(WireError::Malformed);
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let udp = &packet[ihl..total];
    if udp.len() < 8 {
        return Err(WireError::Truncated);
    }
    let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 || udp_len > udp.len() {
        return Err(WireError::Truncated);
    }
    let vx = VxlanPacket::new_checked(&udp[8..udp_len])?;
    let repr = VxlanRepr::parse(&vx)?;
    Ok(VxlanOverIpv4 { src, dst, dst_port, vni: repr.vni })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A VXLAN header for VNI 4097 (0x001001) as RFC 7348 lays it out.
    const HDR_4097: [u8; 8] = [0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0];

    #[test]
    fn parses_hand_written_header() {
        let p = VxlanPacket::new_checked(&HDR_4097[..]).expect("8 bytes");
        assert!(p.vni_valid());
        assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni: 4097 }));
        assert!(p.payload().is_empty());
    }

    #[test]
    fn rejects_short_and_unflagged() {
        assert_eq!(VxlanPacket::new_checked(&HDR_4097[..7]).err(), Some(WireError::Truncated));
        let mut h = HDR_4097;
        h[0] = 0;
        let p = VxlanPacket::new_checked(&h[..]).expect("8 bytes");
        assert_eq!(VxlanRepr::parse(&p), Err(WireError::Malformed));
    }

    #[test]
    fn emit_writes_rfc_layout() {
        let mut buf = [0xffu8; 8];
        let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
        VxlanRepr { vni: 4097 }.emit(&mut p).expect("valid vni");
        assert_eq!(buf, HDR_4097);
        let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
        assert_eq!(VxlanRepr { vni: VNI_MAX + 1 }.emit(&mut p), Err(WireError::Malformed));
    }

    fn outer(vni: u32, inner: &[u8]) -> Vec<u8> {
        let udp_len = 8 + 8 + inner.len();
        let total = 20 + udp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&4789u16.to_be_bytes());
        p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
        let mut vx = VxlanPacket::new_unchecked(&mut p[28..36]);
        VxlanRepr { vni }.emit(&mut vx).expect("vni fits");
        p[36..].copy_from_slice(inner);
        p
    }

    #[test]
    fn parses_outer_headers() {
        let p = outer(4242, &[1, 2, 3]);
        let v = parse_vxlan_over_ipv4(&p).expect("valid");
        assert_eq!(v.vni, 4242);
        assert_eq!(v.dst_port, 4789);
        assert_eq!(v.src, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(v.dst, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(ipv4_destination(&p), Some(v.dst));
    }

    #[test]
    fn rejects_fragments_and_other_protocols() {
        let mut p = outer(4242, &[]);
        p[6] = 0x20; // more fragments
        assert_eq!(parse_vxlan_over_ipv4(&p), Err(WireError::Malformed));
        let mut p = outer(4242, &[]);
        p[9] = 6;
        assert_eq!(parse_vxlan_over_ipv4(&p), Err(WireError::Malformed));
        let p = outer(4242, &[]);
        assert_eq!(parse_vxlan_over_ipv4(&p[..p.len() - 1]), Err(WireError::Truncated));
    }

    proptest! {
        #[test]
        fn vni_round_trips(vni in 0u32..=VNI_MAX, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = vec![0u8; 8 + tail.len()];
            buf[8..].copy_from_slice(&tail);
            let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
            VxlanRepr { vni }.emit(&mut p).expect("vni fits");
            let p = VxlanPacket::new_checked(&buf[..]).expect("long enough");
            prop_assert_eq!(VxlanRepr::parse(&p), Ok(VxlanRepr { vni }));
            prop_assert_eq!(p.payload(), &tail[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_vxlan_over_ipv4(&bytes);
            let _ = ipv4_destination(&bytes);
            if let Ok(p) = VxlanPacket::new_checked(&bytes[..]) {
                let _ = VxlanRepr::parse(&p);
                prop_assert!(p.vni() <= VNI_MAX);
            }
        }

        #[test]
        fn outer_round_trips(vni in 0u32..=VNI_MAX, inner in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = outer(vni, &inner);
            let v = parse_vxlan_over_ipv4(&p).expect("built valid");
            prop_assert_eq!(v.vni, vni);
        }
    }
}
