//! TUN offloads, both directions, as pure functions over byte slices (the data-path threads
//! drive them). The TUN runs with a 24-byte `virtio_net_hdr_v1_hash_tunnel` before every packet
//! ([`VNET_HDR_LEN`]).
//!
//! **Send side** ([`TxPlan`]): with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO` the kernel
//! hands the TUN whole VXLAN super-packets (outer IPv4/UDP/VXLAN around an inner TCP GSO packet
//! of up to 64 KB) instead of segmenting them first, and leaves checksums to us. We cut them
//! into MTU-sized packets ourselves (headers copied, lengths, IP IDs, sequence numbers, flags
//! and checksums fixed), since boringtun takes one IP packet at a time: one `read` per 64 KB
//! instead of one per 1.4 KB.
//!
//! **Receive side**: consecutive decrypted VXLAN datagrams between the same
//! two VTEPs are handed to the kernel as one UDP GSO super-packet (`IFF_VNET_HDR`,
//! `VIRTIO_NET_HDR_GSO_UDP_L4`): one `writev` and one trip through IP and UDP for up to 64
//! datagrams. The kernel splits it again at the VXLAN socket (which does not take UDP GSO) and
//! hands the frames to the VXLAN device's GRO cells in one go, where consecutive segments of an
//! inner TCP stream are coalesced before the bridge, veth and TCP receive path runs. Pure
//! functions over byte slices; the rx thread drives them.
//!
//! (A TCP GSO super-packet would skip the split, but kernels segment GSO packets without the
//! UDP-tunnel bits that reach a tunnel socket, and the legacy virtio-net header cannot carry
//! those bits.)
//!
//! The layout this accepts, and nothing else (everything else is written one packet at a time):
//! outer IPv4 without options, not fragmented, UDP to the data port. Datagrams join a train when
//! their outer addresses, ports, TOS and TTL equal the first one's, and all but the last have
//! the first one's size.

/// Size of the `struct virtio_net_hdr_v1_hash_tunnel` the TUN prefixes to every packet (set with
/// `TUNSETVNETHDRSZ`; the legacy 10-byte header is its start).
pub(crate) const VNET_HDR_LEN: usize = 24;

/// Outer IPv4 (20) + UDP (8): the headers a super-packet carries once.
pub(crate) const HDR_LEN: usize = 28;
/// Largest outer IPv4 packet (the total-length field).
const MAX_TOTAL: usize = 65535;
/// Most segments the kernel takes in one UDP GSO packet (`UDP_MAX_SEGMENTS` of older kernels).
pub(crate) const MAX_SEGMENTS: usize = 64;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// What the send side must do with one packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxPlan {
    /// Send it as it is.
    Whole,
    /// Finish the checksum at `start` (stored at `start + offset`), then send it.
    Checksum { start: usize, offset: usize },
    /// Cut it into `count` TCP segments of `mss` payload bytes (the last may be shorter).
    Segment(Segments),
}

/// Where the headers of a TCP GSO packet are, and how to cut it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segments {
    /// IPv4 headers to fix: the outer one at 0 and, in a tunnel, the inner one.
    ips: [usize; 2],
    nips: usize,
    /// The outer UDP header of a tunnel.
    udp: Option<usize>,
    /// The TCP header.
    tcp: usize,
    /// All headers (up to the TCP payload).
    hdrs: usize,
    /// Payload bytes per segment.
    mss: usize,
    /// Segments.
    pub count: usize,
}

fn ne16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_ne_bytes([b[at], b[at + 1]]))
}

/// Reads the virtio-net header `h` of the packet `pkt` the TUN gave us; `None` for a request we
/// do not serve (the TUN only offers IPv4 TCP, UDP-tunnelled IPv4 TCP and checksums).
pub(crate) fn tx_plan(h: &[u8; VNET_HDR_LEN], pkt: &[u8], max_segment: usize) -> Option<TxPlan> {
    let (flags, gso) = (h[0], h[1]);
    let (csum_start, csum_offset) = (ne16(h, 6), ne16(h, 8));
    if gso == VIRTIO_NET_HDR_GSO_NONE {
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
            return Some(TxPlan::Whole);
        }
        if csum_start + csum_offset + 2 > pkt.len() {
            return None;
        }
        return Some(TxPlan::Checksum { start: csum_start, offset: csum_offset });
    }
    let tunnel = gso & VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 != 0;
    if gso & !(VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 | VIRTIO_NET_HDR_GSO_ECN)
        != VIRTIO_NET_HDR_GSO_TCPV4
    {
        return None;
    }
    let mss = ne16(h, 4);
    if pkt.len() < 20 || pkt[0] != 0x45 || mss == 0 {
        return None;
    }
    let (ips, nips, udp, tcp) = if tunnel {
        // The tunnel offsets (little-endian, bytes 20..24) only mean something for tunnel
        // GSO; the outer transport header follows the option-less outer IPv4 header.
        let inner_nh = usize::from(u16::from_le_bytes([h[22], h[23]]));
        if pkt[9] != 17 || inner_nh + 20 > pkt.len() || inner_nh < 28 || pkt[inner_nh] != 0x45 {
            return None;
        }
        if pkt[inner_nh + 9] != 6 {
            return None;
        }
        ([0, inner_nh], 2, Some(20), inner_nh + 20)
    } else {
        if pkt[9] != 6 {
            return None;
        }
        ([0, 0], 1, None, 20)
    };
    if tcp + 20 > pkt.len() {
        return None;
    }
    let thlen = usize::from(pkt[tcp + 12] >> 4) * 4;
    let hdrs = tcp + thlen;
    if thlen < 20 || hdrs >= pkt.len() || hdrs + mss > max_segment {
        return None;
    }
    let count = (pkt.len() - hdrs).div_ceil(mss);
    Some(TxPlan::Segment(Segments { ips, nips, udp, tcp, hdrs, mss, count }))
}

/// Ones'-complement sum of `b` (big-endian 16-bit words, odd tail padded), not yet folded.
fn csum_add(mut acc: u64, b: &[u8]) -> u64 {
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    for c in chunks.remainder().chunks(2) {
        let w = u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    acc
}

/// Folds a 64-bit ones'-complement accumulator to 16 bits.
fn fold_hi(acc: u64) -> u16 {
    let mut s = (acc & 0xffff) + ((acc >> 16) & 0xffff) + ((acc >> 32) & 0xffff) + (acc >> 48);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Finishes a partial checksum: sums `pkt[start..]` (the field at `start + offset` holds the
/// pseudo-header sum the kernel left there) and stores the complement in that field.
pub(crate) fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) {
    let c = !fold_hi(csum_add(0, &pkt[start..]));
    pkt[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
}

impl Segments {
    /// Writes segment `i` (of [`Segments::count`]) of the GSO packet `pkt` into `out` as a
    /// finished packet; returns its length. `out` must hold `hdrs + mss` bytes (checked when
    /// the plan was made).
    pub fn write(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> usize {
        let start = self.hdrs + i * self.mss;
        let chunk = self.mss.min(pkt.len() - start);
        let len = self.hdrs + chunk;
        out[..self.hdrs].copy_from_slice(&pkt[..self.hdrs]);
        out[self.hdrs..len].copy_from_slice(&pkt[start..start + chunk]);
        for &ip in &self.ips[..self.nips] {
            let h = &mut out[ip..ip + 20];
            h[2..4].copy_from_slice(&((len - ip) as u16).to_be_bytes());
            let id = (be16(h, 4) as u16).wrapping_add(i as u16);
            h[4..6].copy_from_slice(&id.to_be_bytes());
            set_ipv4_checksum(h);
        }
        if let Some(u) = self.udp {
            out[u + 4..u + 6].copy_from_slice(&((len - u) as u16).to_be_bytes());
            // No outer UDP checksum (VXLAN over IPv4 sends none).
            out[u + 6] = 0;
            out[u + 7] = 0;
        }
        let t = self.tcp;
        let seq = u32::from_be_bytes([out[t + 4], out[t + 5], out[t + 6], out[t + 7]])
            .wrapping_add((i * self.mss) as u32);
        out[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < self.count {
            // FIN and PSH only on the last segment.
            out[t + 13] &= !0x09;
        }
        if i > 0 {
            // CWR only on the first.
            out[t + 13] &= !0x80;
        }
        out[t + 16] = 0;
        out[t + 17] = 0;
        let ip = self.ips[self.nips - 1];
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&out[ip + 12..ip + 20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&((len - t) as u16).to_be_bytes());
        let c = !fold_hi(csum_add(csum_add(0, &pseudo), &out[t..len]));
        out[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        len
    }
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// The UDP payload size of `pkt` (a whole decrypted packet) if it is a datagram that may be
/// batched; `None` for anything else.
pub(crate) fn segment(pkt: &[u8], data_port: u16) -> Option<usize> {
    if pkt.len() <= HDR_LEN || pkt.len() > MAX_TOTAL {
        return None;
    }
    // Version 4, IHL 5, UDP, not a fragment, length = packet, UDP length = rest.
    if pkt[0] != 0x45 || pkt[9] != 17 || be16(pkt, 6) & 0x3fff != 0 || be16(pkt, 2) != pkt.len() {
        return None;
    }
    if be16(pkt, 22) != usize::from(data_port) || be16(pkt, 24) != pkt.len() - 20 {
        return None;
    }
    Some(pkt.len() - HDR_LEN)
}

/// Whether `pkt` travels between the same VTEPs and ports as the train's first packet `head`
/// (both accepted by [`segment`]), with the same TOS and TTL.
pub(crate) fn same_flow(head: &[u8], pkt: &[u8]) -> bool {
    head[1] == pkt[1] && head[8] == pkt[8] && head[12..24] == pkt[12..24]
}

/// A train of datagrams being built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Train {
    /// UDP payload size of each datagram (the first one's).
    pub seg: usize,
    /// Total bytes of the super-packet so far (headers once, payloads of all).
    pub total: usize,
    /// Datagrams in the train.
    pub count: usize,
    /// Whether another datagram may still join (the last one was full-sized).
    pub open: bool,
}

impl Train {
    /// A train starting with a datagram of `seg` payload bytes.
    pub fn start(seg: usize) -> Train {
        Train { seg, total: HDR_LEN + seg, count: 1, open: true }
    }

    /// Adds a datagram of `seg` payload bytes if it fits (the caller checked [`same_flow`]):
    /// not larger than the first, the train still open, below the count and size limits.
    pub fn push(&mut self, seg: usize) -> bool {
        if !self.open
            || self.count >= MAX_SEGMENTS
            || seg > self.seg
            || self.total + seg > MAX_TOTAL
        {
            return false;
        }
        self.total += seg;
        self.count += 1;
        self.open = seg == self.seg;
        true
    }
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn set_ipv4_checksum(ip: &mut [u8]) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !checksum_fold(sum16(&ip[..20]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Rewrites the first packet's headers (`head`, at least [`HDR_LEN`] bytes) to describe the
/// whole super-packet and returns the virtio-net header to write before it: UDP GSO with
/// segment size = the first payload and the UDP checksum left to the kernel (the field holds
/// the pseudo-header sum, as `CHECKSUM_PARTIAL` wants).
pub(crate) fn finish(head: &mut [u8], train: &Train) -> [u8; VNET_HDR_LEN] {
    let total = train.total;
    head[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    set_ipv4_checksum(&mut head[..20]);
    let udp_len = (total - 20) as u16;
    head[24..26].copy_from_slice(&udp_len.to_be_bytes());
    let pseudo = sum16(&head[12..20]) + 17 + u32::from(udp_len);
    head[26..28].copy_from_slice(&checksum_fold(pseudo).to_be_bytes());
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
    // The legacy header is in the host's byte order.
    h[2..4].copy_from_slice(&(HDR_LEN as u16).to_ne_bytes());
    h[4..6].copy_from_slice(&(train.seg as u16).to_ne_bytes());
    h[6..8].copy_from_slice(&20u16.to_ne_bytes());
    h[8..10].copy_from_slice(&6u16.to_ne_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A VXLAN datagram as the peer's kernel emits it (inner frame: `payload` bytes).
    fn packet(src_port: u16, payload: usize) -> Vec<u8> {
        let total = HDR_LEN + 8 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        set_ipv4_checksum(&mut p[..20]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&4789u16.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[28] = 0x08;
        p
    }

    #[test]
    fn datagrams_of_one_flow_form_one_super_packet() {
        let a = packet(50000, 1400);
        let b = packet(50000, 1400);
        let c = packet(50000, 300);
        let sa = segment(&a, 4789).unwrap();
        assert_eq!(sa, 1408);
        assert!(same_flow(&a, &b) && same_flow(&a, &c));
        let mut t = Train::start(sa);
        assert!(t.push(segment(&b, 4789).unwrap()));
        assert!(t.push(segment(&c, 4789).unwrap()));
        assert!(!t.open, "a short datagram ends the train");
        assert!(!t.push(sa));
        let mut head = a.clone();
        let h = finish(&mut head, &t);
        assert_eq!(t.total, HDR_LEN + 1408 * 2 + 308);
        assert_eq!(be16(&head, 2), t.total);
        assert_eq!(be16(&head, 24), t.total - 20);
        assert_eq!(checksum_fold(sum16(&head[..20])), 0xffff, "IPv4 header checksum");
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1408);
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 20);
        assert_eq!(u16::from_ne_bytes([h[8], h[9]]), 6);
    }

    #[test]
    fn other_flows_sizes_and_odd_packets_do_not_join() {
        let a = packet(50000, 1400);
        let sa = segment(&a, 4789).unwrap();
        assert!(!same_flow(&a, &packet(50001, 1400)), "other source port");
        let mut tos = packet(50000, 1400);
        tos[1] = 2;
        assert!(!same_flow(&a, &tos), "other TOS");
        let mut t = Train::start(sa);
        assert!(!t.push(sa + 1), "larger than the first");
        assert!(segment(&a, 4790).is_none(), "not the data port");
        let mut frag = a.clone();
        frag[6] = 0x20;
        assert!(segment(&frag, 4789).is_none(), "fragment");
        let mut opts = a.clone();
        opts[0] = 0x46;
        assert!(segment(&opts, 4789).is_none(), "IP options");
        assert!(segment(&a[..a.len() - 1], 4789).is_none(), "length mismatch");
        let mut t = Train::start(100);
        for _ in 1..MAX_SEGMENTS {
            assert!(t.push(100));
        }
        assert!(!t.push(100), "segment limit");
        let mut t = Train::start(1400);
        while t.push(1400) {}
        assert!(t.total <= MAX_TOTAL && t.total + 1400 > MAX_TOTAL, "size limit");
    }

    /// A VXLAN-over-TCP GSO packet as the kernel hands it to the TUN with tunnel offloads:
    /// the inner TCP checksum holds only the pseudo-header sum, the outer UDP checksum is set.
    fn gso_packet(payload: &[u8], mss: usize, tcp_flags: u8) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let inner_nh = HDR_LEN + 8 + 14;
        let tcp = inner_nh + 20;
        let total = tcp + 20 + payload.len();
        let mut p = packet(50000, total - HDR_LEN - 8);
        p[26..28].copy_from_slice(&0x1234u16.to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        let i = &mut p[inner_nh..];
        i[0] = 0x45;
        i[2..4].copy_from_slice(&((total - inner_nh) as u16).to_be_bytes());
        i[4..6].copy_from_slice(&100u16.to_be_bytes());
        i[6] = 0x40;
        i[8] = 64;
        i[9] = 6;
        i[12..16].copy_from_slice(&[10, 0, 0, 11]);
        i[16..20].copy_from_slice(&[10, 0, 0, 12]);
        let t = &mut p[tcp..];
        t[4..8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = tcp_flags;
        t[20..].copy_from_slice(payload);
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h[1] = VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4;
        h[2..4].copy_from_slice(&((tcp + 20) as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(mss as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(tcp as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        h[20..22].copy_from_slice(&20u16.to_le_bytes());
        h[22..24].copy_from_slice(&(inner_nh as u16).to_le_bytes());
        (h, p)
    }

    fn verifies(b: &[u8]) -> bool {
        fold_hi(csum_add(0, b)) == 0xffff
    }

    #[test]
    fn vxlan_gso_packet_is_cut_into_valid_segments() {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let (h, p) = gso_packet(&payload, 1000, 0x18 | 0x01);
        let Some(TxPlan::Segment(segs)) = tx_plan(&h, &p, 2048) else { panic!("no plan") };
        assert_eq!(segs.count, 3);
        let (inner, tcp) = (HDR_LEN + 22, HDR_LEN + 42);
        let mut out = [0u8; 2048];
        let mut joined = Vec::new();
        for i in 0..3 {
            let len = segs.write(&p, i, &mut out);
            let s = &out[..len];
            let chunk = if i < 2 { 1000 } else { 500 };
            assert_eq!(len, tcp + 20 + chunk);
            assert_eq!(be16(s, 2), len, "outer length");
            assert!(verifies(&s[..20]), "outer IPv4 checksum");
            assert_eq!(be16(s, 4), 7 + i, "outer IP ID");
            assert_eq!(be16(s, 24), len - 20, "UDP length");
            assert_eq!(be16(s, 26), 0, "no outer UDP checksum");
            assert_eq!(be16(s, inner + 2), len - inner, "inner length");
            assert!(verifies(&s[inner..inner + 20]), "inner IPv4 checksum");
            let seq = u32::from_be_bytes([s[tcp + 4], s[tcp + 5], s[tcp + 6], s[tcp + 7]]);
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(1000 * i as u32), "sequence wraps");
            assert_eq!(s[tcp + 13], if i == 2 { 0x19 } else { 0x10 }, "PSH/FIN only last");
            let mut pseudo = Vec::from(&s[inner + 12..inner + 20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&((len - tcp) as u16).to_be_bytes());
            pseudo.extend_from_slice(&s[tcp..]);
            assert!(verifies(&pseudo), "TCP checksum");
            joined.extend_from_slice(&s[tcp + 20..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn tx_plans_refuse_what_they_cannot_serve() {
        let (h, p) = gso_packet(&[1; 3000], 1000, 0x10);
        assert!(tx_plan(&h, &p, 1000).is_none(), "segment larger than the buffer");
        let mut udp = h;
        udp[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
        assert!(tx_plan(&udp, &p, 2048).is_none(), "UDP GSO is not offered");
        let mut zero = h;
        zero[4] = 0;
        zero[5] = 0;
        assert!(tx_plan(&zero, &p, 2048).is_none(), "mss 0");
        let mut bad = h;
        bad[22..24].copy_from_slice(&4000u16.to_le_bytes());
        assert!(tx_plan(&bad, &p, 2048).is_none(), "inner header past the end");
        let plain = [0u8; VNET_HDR_LEN];
        assert_eq!(tx_plan(&plain, &p, 2048), Some(TxPlan::Whole));
        let mut csum = plain;
        csum[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        csum[6..8].copy_from_slice(&(p.len() as u16).to_ne_bytes());
        assert!(tx_plan(&csum, &p, 2048).is_none(), "checksum start past the end");
    }

    #[test]
    fn partial_checksum_is_completed() {
        // A UDP datagram whose checksum field holds the pseudo-header sum.
        let mut p = packet(50000, 101);
        let len = p.len() - 20;
        let mut pseudo = Vec::from(&p[12..20]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
        let partial = fold_hi(csum_add(0, &pseudo));
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(&mut p, 20, 6);
        pseudo.extend_from_slice(&p[20..]);
        assert!(verifies(&pseudo));
    }

    proptest! {
        #[test]
        fn hostile_vnet_headers_never_panic(
            h in proptest::array::uniform24(any::<u8>()),
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut p = bytes;
            let mut out = [0u8; 512];
            match tx_plan(&h, &p, out.len()) {
                Some(TxPlan::Checksum { start, offset }) => complete_checksum(&mut p, start, offset),
                Some(TxPlan::Segment(segs)) => {
                    prop_assert!(segs.count >= 1);
                    for i in 0..segs.count {
                        let len = segs.write(&p, i, &mut out);
                        prop_assert!(len <= out.len());
                    }
                }
                _ => {}
            }
        }

        #[test]
        fn parsing_hostile_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(s) = segment(&bytes, 4789) {
                prop_assert_eq!(s + HDR_LEN, bytes.len());
                prop_assert!(same_flow(&bytes, &bytes));
            }
        }

        #[test]
        fn a_train_carries_every_byte_once(
            seg in 1usize..1500, n in 1usize..100, last in 1usize..1500
        ) {
            let last = last.min(seg);
            let mut t = Train::start(seg);
            let mut carried = seg;
            for i in 1..n {
                let len = if i + 1 == n { last } else { seg };
                if !t.push(len) {
                    break;
                }
                carried += len;
            }
            prop_assert_eq!(t.total, HDR_LEN + carried);
            prop_assert!(t.total <= MAX_TOTAL && t.count <= MAX_SEGMENTS);
        }
    }
}
