//! The UDP fast path's wire view: the one shape of query that dominates a task's traffic (one
//! A or AAAA question, class IN, no EDNS, nothing else) read straight from the datagram, and its
//! address answer written into a buffer the caller owns. Anything else (EDNS, other types,
//! misses, odd flags) is left to the hickory path, which handles every case.

use std::net::IpAddr;

/// The DNS header is 12 bytes.
const HEADER: usize = 12;
/// Largest UDP reply without EDNS (RFC 1035).
pub const UDP_MAX: usize = 512;

/// A plain query, borrowed from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleQuery<'a> {
    datagram: &'a [u8],
    /// End of the name in `datagram` (after its zero label).
    name_end: usize,
    /// Query type (1 = A, 28 = AAAA).
    pub qtype: u16,
}

impl<'a> SimpleQuery<'a> {
    /// Reads `datagram` as a plain query; `None` for anything else.
    pub fn parse(datagram: &'a [u8]) -> Option<SimpleQuery<'a>> {
        if datagram.len() < HEADER + 5 {
            return None;
        }
        let (flags, rest) = (datagram[2], datagram[3]);
        // QR=0, opcode QUERY, not truncated; Z clear.
        if flags & 0xFA != 0 || rest & 0x40 != 0 {
            return None;
        }
        // QDCOUNT 1, ANCOUNT, NSCOUNT, ARCOUNT 0.
        if datagram[4..12] != [0, 1, 0, 0, 0, 0, 0, 0] {
            return None;
        }
        let mut i = HEADER;
        loop {
            let len = usize::from(*datagram.get(i)?);
            if len == 0 {
                i += 1;
                break;
            }
            // No compression in a question, labels up to 63 bytes, names up to 255.
            if len > 63 || i + 1 + len - HEADER > 255 {
                return None;
            }
            i += 1 + len;
        }
        let name_end = i;
        if datagram.len() != name_end + 4 {
            return None;
        }
        let qtype = u16::from_be_bytes([datagram[name_end], datagram[name_end + 1]]);
        let qclass = u16::from_be_bytes([datagram[name_end + 2], datagram[name_end + 3]]);
        if qclass != 1 || !(qtype == 1 || qtype == 28) {
            return None;
        }
        Some(SimpleQuery { datagram, name_end, qtype })
    }

    /// The name in presentation form (labels joined by dots, no trailing dot) in `buf`; `None`
    /// when a label holds a dot or is not UTF-8 (such a name cannot be one of ours).
    pub fn name<'b>(&self, buf: &'b mut [u8; 256]) -> Option<&'b str> {
        let mut i = HEADER;
        let mut len = 0;
        while i < self.name_end - 1 {
            let l = usize::from(self.datagram[i]);
            let label = &self.datagram[i + 1..i + 1 + l];
            if label.contains(&b'.') {
                return None;
            }
            if len > 0 {
                buf[len] = b'.';
                len += 1;
            }
            buf[len..len + l].copy_from_slice(label);
            len += l;
            i += 1 + l;
        }
        std::str::from_utf8(&buf[..len]).ok()
    }

    /// Writes the authoritative answer with `addrs` (those of the asked family) into `out`:
    /// the question as asked (case kept), then one record per address pointing back at it. What
    /// does not fit in 512 bytes is left out and the reply is flagged TC, so the client asks
    /// again over TCP. Returns how many records went in.
    pub fn answer(&self, addrs: &[IpAddr], ttl: u32, out: &mut Vec<u8>) -> usize {
        let d = self.datagram;
        out.clear();
        out.extend_from_slice(&d[..2]);
        // QR, AA, the request's RD; RA, the request's CD, rcode NOERROR.
        out.push(0x80 | 0x04 | (d[2] & 0x01));
        out.push(0x80 | (d[3] & 0x10));
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&d[HEADER..self.name_end + 4]);
        let mut n: u16 = 0;
        let mut truncated = false;
        for ip in addrs {
            let (rtype, rdata): (u16, &[u8]) = match ip {
                IpAddr::V4(v4) if self.qtype == 1 => (1, &v4.octets()[..]),
                IpAddr::V6(v6) if self.qtype == 28 => (28, &v6.octets()[..]),
                _ => continue,
            };
            if out.len() + 12 + rdata.len() > UDP_MAX {
                truncated = true;
                break;
            }
            out.extend_from_slice(&[0xC0, 0x0C]);
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(rdata);
            n += 1;
        }
        out[6..8].copy_from_slice(&n.to_be_bytes());
        if truncated {
            out[2] |= 0x02;
        }
        usize::from(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `id 0x1234, RD, one question WeB A IN`, written by hand.
    const WEB_A: [u8; 20] =
        [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'W', b'e', b'B', 0, 0, 1, 0];

    fn web_a() -> Vec<u8> {
        let mut v = WEB_A.to_vec();
        v.push(1);
        v
    }

    #[test]
    fn parses_a_plain_query() {
        let d = web_a();
        let q = SimpleQuery::parse(&d).expect("plain query");
        assert_eq!(q.qtype, 1);
        let mut buf = [0u8; 256];
        assert_eq!(q.name(&mut buf), Some("WeB"));
    }

    #[test]
    fn rejects_everything_else() {
        let base = web_a();
        let mut cases = Vec::new();
        let mut resp = base.clone();
        resp[2] |= 0x80; // a response
        cases.push(resp);
        let mut op = base.clone();
        op[2] |= 0x10; // opcode 2
        cases.push(op);
        let mut ar = base.clone();
        ar[11] = 1; // an additional record (EDNS)
        cases.push(ar);
        let mut two = base.clone();
        two[5] = 2; // two questions
        cases.push(two);
        let mut ptr = base.clone();
        ptr[18] = 12; // PTR
        cases.push(ptr);
        let mut ch = base.clone();
        ch[20] = 3; // class CH
        cases.push(ch);
        let mut trailing = base.clone();
        trailing.push(0);
        cases.push(trailing);
        let mut comp = base.clone();
        comp[12] = 0xC0; // a compression pointer
        cases.push(comp);
        cases.push(base[..15].to_vec());
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(SimpleQuery::parse(c), None, "case {i}");
        }
    }

    #[test]
    fn answer_layout_and_truncation() {
        let d = web_a();
        let q = SimpleQuery::parse(&d).expect("plain query");
        let mut out = Vec::new();
        let addrs: Vec<IpAddr> =
            vec!["10.0.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")];
        assert_eq!(q.answer(&addrs, 5, &mut out), 1);
        let want: Vec<u8> = [
            &[0x12, 0x34, 0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0][..],
            &d[12..],
            &[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1][..],
        ]
        .concat();
        assert_eq!(out, want);

        let many: Vec<IpAddr> = (0..60u8).map(|i| IpAddr::from([10, 0, 2, i])).collect();
        let n = q.answer(&many, 5, &mut out);
        assert!(n < 60 && out.len() <= UDP_MAX);
        assert_eq!(out[2] & 0x02, 0x02, "TC set");
        assert_eq!(u16::from_be_bytes([out[6], out[7]]) as usize, n);
    }
}
