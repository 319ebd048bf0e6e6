//! PROXY protocol (HAProxy, "The PROXY protocol", versions 1 and 2): the header a proxy sends
//! before the client's bytes so the backend learns the client's address.
//!
//! Like the other wire formats here: [`Packet`] is a checked view over v2 bytes, [`Header`] the
//! high-level representation with `parse`/`emit`, [`parse`] reads either version from the front
//! of a buffer (hostile input: every length is checked, nothing panics), and
//! [`Header::to_v1`]/[`Header::emit_v2`] write the header into a caller-owned buffer so the
//! forwarder sends it in one write.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Fixed part of a v2 header: signature, version/command, family/transport, length.
pub const V2_FIXED_LEN: usize = 16;
/// Longest v1 header the spec allows, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// Largest header this crate emits (v2 with IPv6 addresses).
pub const MAX_EMIT_LEN: usize = V2_FIXED_LEN + 36;

/// Why a header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More bytes are needed; the prefix seen so far is valid.
    #[error("incomplete PROXY header")]
    Incomplete,
    /// Not a PROXY header (neither signature matches).
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// v2 version nibble is not 2.
    #[error("unsupported PROXY protocol version {0}")]
    Version(u8),
    /// v2 command is neither LOCAL nor PROXY.
    #[error("unknown PROXY v2 command {0}")]
    Command(u8),
    /// v2 family/transport byte is not a defined combination.
    #[error("unknown PROXY v2 family/transport 0x{0:02x}")]
    Family(u8),
    /// v2 length is too short for the declared family.
    #[error("PROXY v2 length {0} too short for its address family")]
    Length(u16),
    /// v1 line is malformed (bad token, address, port, or too long).
    #[error("malformed PROXY v1 line")]
    V1Syntax,
}

/// v2 command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Connection made by the proxy itself (health check); addresses are to be ignored.
    Local,
    /// Relayed connection on behalf of a client.
    Proxy,
}

/// The transport protocol of the relayed connection, as the header gives it: stream or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketType {
    /// TCP.
    Stream,
    /// UDP.
    Dgram,
}

/// A PROXY header, either version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// LOCAL or PROXY (v1 has only PROXY; its UNKNOWN maps to PROXY without addresses).
    pub command: Command,
    /// Stream or datagram.
    pub transport: SocketType,
    /// Client (source) and proxy-side destination addresses, if known.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Checked view over the bytes of a v2 header.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const VER_CMD: usize = 12;
    pub const FAM: usize = 13;
    pub const LEN: std::ops::Range<usize> = 14..16;
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps bytes without checks; accessors may panic on short input. Use [`Packet::new_checked`].
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps bytes after checking the signature, version and that the whole declared length is
    /// present. The buffer may hold more (the client's payload follows).
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        let sig = b.len().min(V2_SIGNATURE.len());
        if b[..sig] != V2_SIGNATURE[..sig] {
            return Err(ParseError::NotProxy);
        }
        if b.len() < V2_FIXED_LEN {
            return Err(ParseError::Incomplete);
        }
        let p = Packet { buffer };
        if p.version() != 2 {
            return Err(ParseError::Version(p.version()));
        }
        if p.total_len() > p.buffer.as_ref().len() {
            return Err(ParseError::Incomplete);
        }
        Ok(p)
    }

    /// Protocol version (high nibble of byte 12).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_CMD] >> 4
    }
    /// Command nibble (0 LOCAL, 1 PROXY).
    pub fn command(&self) -> u8 {
        self.buffer.as_ref()[field::VER_CMD] & 0x0f
    }
    /// Family/transport byte (e.g. 0x11 TCP over IPv4, 0x21 TCP over IPv6).
    pub fn family(&self) -> u8 {
        self.buffer.as_ref()[field::FAM]
    }
    /// Length of the address block plus TLVs.
    pub fn len_field(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::LEN];
        u16::from_be_bytes([b[0], b[1]])
    }
    /// Whole header length: fixed part plus `len_field`.
    pub fn total_len(&self) -> usize {
        V2_FIXED_LEN + usize::from(self.len_field())
    }
    /// The address block and TLVs.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[V2_FIXED_LEN..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_fixed(&mut self, ver_cmd: u8, fam: u8, len: u16) {
        let b = self.buffer.as_mut();
        b[..12].copy_from_slice(&V2_SIGNATURE);
        b[field::VER_CMD] = ver_cmd;
        b[field::FAM] = fam;
        b[field::LEN].copy_from_slice(&len.to_be_bytes());
    }
    /// Mutable address block.
    fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        &mut self.buffer.as_mut()[V2_FIXED_LEN..end]
    }
}

/// Puts both addresses in one family: IPv4 when both are IPv4 (or v4-mapped), else IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    match (s.ip(), d.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (s, d),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(s), v6(d))
        }
    }
}

impl Header {
    /// A PROXY-command TCP header for a relayed client connection.
    pub fn tcp(client: SocketAddr, local: SocketAddr) -> Header {
        Header {
            command: Command::Proxy,
            transport: SocketType::Stream,
            addrs: Some(same_family(client, local)),
        }
    }

    /// Reads a v2 header from a checked packet. TLVs are skipped.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Header, ParseError> {
        let command = match p.command() {
            0 => Command::Local,
            1 => Command::Proxy,
            c => return Err(ParseError::Command(c)),
        };
        let fam = p.family();
        let transport = match fam & 0x0f {
            0 => SocketType::Stream,
            1 => SocketType::Stream,
            2 => SocketType::Dgram,
            _ => return Err(ParseError::Family(fam)),
        };
        let a = p.payload();
        let addrs = match fam >> 4 {
            0 => None,
            1 => {
                if a.len() < 12 {
                    return Err(ParseError::Length(p.len_field()));
                }
                let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
            }
            2 => {
                if a.len() < 36 {
                    return Err(ParseError::Length(p.len_field()));
                }
                let ip = |o: usize| {
                    let mut x = [0u8; 16];
                    x.copy_from_slice(&a[o..o + 16]);
                    IpAddr::V6(Ipv6Addr::from(x))
                };
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
            }
            3 => {
                if a.len() < 216 {
                    return Err(ParseError::Length(p.len_field()));
                }
                None
            }
            _ => return Err(ParseError::Family(fam)),
        };
        // UNSPEC transport with a real family (or the reverse) is not a defined combination.
        if (fam & 0x0f == 0) != (fam >> 4 == 0) && fam >> 4 != 3 {
            return Err(ParseError::Family(fam));
        }
        // LOCAL headers carry no meaningful addresses.
        let addrs = if command == Command::Local { None } else { addrs };
        Ok(Header { command, transport, addrs })
    }

    /// Bytes [`Header::emit_v2`] writes.
    pub fn v2_len(&self) -> usize {
        V2_FIXED_LEN
            + match self.addrs {
                None => 0,
                Some((s, _)) if s.is_ipv4() => 12,
                Some(_) => 36,
            }
    }

    /// Writes the v2 header to the front of `buf`, returning its length, or `None` if `buf` is
    /// shorter than [`Header::v2_len`].
    pub fn emit_v2(&self, buf: &mut [u8]) -> Option<usize> {
        let len = self.v2_len();
        let out = buf.get_mut(..len)?;
        let mut p = Packet::new_unchecked(out);
        let cmd = match self.command {
            Command::Local => 0x20,
            Command::Proxy => 0x21,
        };
        let tr = match self.transport {
            SocketType::Stream => 1,
            SocketType::Dgram => 2,
        };
        let addrs = self.addrs.map(|(s, d)| same_family(s, d));
        let fam = match addrs {
            None => 0,
            Some((s, _)) if s.is_ipv4() => 0x10 | tr,
            Some(_) => 0x20 | tr,
        };
        p.set_fixed(cmd, fam, (len - V2_FIXED_LEN) as u16);
        if let Some((s, d)) = addrs {
            let a = p.payload_mut();
            match (s.ip(), d.ip()) {
                (IpAddr::V4(si), IpAddr::V4(di)) => {
                    a[0..4].copy_from_slice(&si.octets());
                    a[4..8].copy_from_slice(&di.octets());
                    a[8..10].copy_from_slice(&s.port().to_be_bytes());
                    a[10..12].copy_from_slice(&d.port().to_be_bytes());
                }
                (IpAddr::V6(si), IpAddr::V6(di)) => {
                    a[0..16].copy_from_slice(&si.octets());
                    a[16..32].copy_from_slice(&di.octets());
                    a[32..34].copy_from_slice(&s.port().to_be_bytes());
                    a[34..36].copy_from_slice(&d.port().to_be_bytes());
                }
                _ => return None,
            }
        }
        Some(len)
    }

    /// The v1 text line (with CRLF). Datagram transport has no v1 form and yields `UNKNOWN`.
    pub fn to_v1(&self) -> String {
        match (self.transport, self.addrs.map(|(s, d)| same_family(s, d))) {
            (SocketType::Stream, Some((s, d))) => {
                let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                format!("PROXY {fam} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port())
            }
            _ => "PROXY UNKNOWN\r\n".to_owned(),
        }
    }
}

fn parse_v1(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(ParseError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ParseError::V1Syntax)
        } else {
            Err(ParseError::Incomplete)
        };
    };
    let line =
        std::str::from_utf8(&buf[PREFIX.len().min(cr)..cr]).map_err(|_| ParseError::V1Syntax)?;
    let used = cr + 2;
    let mut it = line.split(' ');
    let proto = it.next().ok_or(ParseError::V1Syntax)?;
    if proto == "UNKNOWN" {
        // The rest of an UNKNOWN line is to be ignored.
        return Ok((
            Header { command: Command::Proxy, transport: SocketType::Stream, addrs: None },
            used,
        ));
    }
    let fields: Vec<&str> = it.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ParseError::V1Syntax);
    };
    let ip = |s: &str| -> Result<IpAddr, ParseError> {
        match proto {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => return Err(ParseError::V1Syntax),
        }
        .map_err(|_| ParseError::V1Syntax)
    };
    // Ports are decimal without sign or leading zeros.
    let port = |s: &str| -> Result<u16, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 5
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !ok {
            return Err(ParseError::V1Syntax);
        }
        s.parse().map_err(|_| ParseError::V1Syntax)
    };
    Ok((
        Header {
            command: Command::Proxy,
            transport: SocketType::Stream,
            addrs: Some((
                SocketAddr::new(ip(src)?, port(sport)?),
                SocketAddr::new(ip(dst)?, port(dport)?),
            )),
        },
        used,
    ))
}

/// Reads a v1 or v2 header from the front of `buf`; returns it and the bytes it used.
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    match buf.first() {
        None => Err(ParseError::Incomplete),
        Some(b'\r') => {
            let p = Packet::new_checked(buf)?;
            Ok((Header::parse(&p)?, p.total_len()))
        }
        Some(b'P') => parse_v1(buf),
        Some(_) => Err(ParseError::NotProxy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// Bytes written out by hand from the spec (section 2.2): signature, 0x21 (v2, PROXY),
    /// 0x11 (AF_INET, STREAM), length 12, src, dst, sport, dport.
    #[test]
    fn v2_ipv4_matches_the_spec() {
        let h = Header::tcp(sa("198.19.0.7:51234"), sa("198.19.0.1:8100"));
        let mut buf = [0u8; MAX_EMIT_LEN];
        let n = h.emit_v2(&mut buf).unwrap();
        let expect: [u8; 28] = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54,
            0x0a, // signature
            0x21, 0x11, 0x00, 0x0c, // v2 PROXY, TCP4, len 12
            198, 19, 0, 7, 198, 19, 0, 1, // src, dst
            0xc8, 0x22, 0x1f, 0xa4, // 51234, 8100
        ];
        assert_eq!(&buf[..n], &expect[..]);
        assert_eq!(parse(&expect), Ok((h, 28)));
    }

    #[test]
    fn v2_ipv6_matches_the_spec() {
        let h = Header::tcp(sa("[2001:db8::7]:443"), sa("[2001:db8::1]:8100"));
        let mut buf = [0u8; MAX_EMIT_LEN];
        let n = h.emit_v2(&mut buf).unwrap();
        let mut expect = vec![
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x21,
            0x00, 0x24,
        ];
        expect.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        expect.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expect.extend([0x01, 0xbb, 0x1f, 0xa4]);
        assert_eq!(&buf[..n], &expect[..]);
        assert_eq!(n, 52);
        assert_eq!(parse(&expect), Ok((h, 52)));
    }

    #[test]
    fn mapped_v4_is_sent_as_v4_and_mixed_as_v6() {
        let h = Header::tcp(sa("[::ffff:198.19.0.7]:1"), sa("[::ffff:198.19.0.1]:2"));
        assert_eq!(h.v2_len(), 28);
        assert_eq!(h.to_v1(), "PROXY TCP4 198.19.0.7 198.19.0.1 1 2\r\n");
        let m = Header::tcp(sa("198.19.0.7:1"), sa("[2001:db8::1]:2"));
        assert_eq!(m.v2_len(), 52);
        assert_eq!(m.to_v1(), "PROXY TCP6 ::ffff:198.19.0.7 2001:db8::1 1 2\r\n");
    }

    #[test]
    fn v1_lines() {
        let h = Header::tcp(sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        let line = h.to_v1();
        assert_eq!(line, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let mut with_payload = line.clone().into_bytes();
        with_payload.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&with_payload), Ok((h, line.len())));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").map(|(h, n)| (h.addrs, n)), Ok((None, 15)));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Err(ParseError::Incomplete));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        ] {
            assert_eq!(parse(bad), Err(ParseError::V1Syntax), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 200]), Err(ParseError::NotProxy));
        let mut long = b"PROXY ".to_vec();
        long.extend([b'x'; 150]);
        assert_eq!(parse(&long), Err(ParseError::V1Syntax));
    }

    #[test]
    fn v2_rejects_bad_headers() {
        let h = Header::tcp(sa("198.19.0.7:1"), sa("198.19.0.1:2"));
        let mut buf = [0u8; 28];
        h.emit_v2(&mut buf).unwrap();
        for cut in 0..28 {
            assert_eq!(parse(&buf[..cut]).err(), Some(ParseError::Incomplete), "cut {cut}");
        }
        let mut b = buf;
        b[12] = 0x11;
        assert_eq!(parse(&b), Err(ParseError::Version(1)));
        let mut b = buf;
        b[12] = 0x22;
        assert_eq!(parse(&b), Err(ParseError::Command(2)));
        let mut b = buf;
        b[13] = 0x41;
        assert_eq!(parse(&b), Err(ParseError::Family(0x41)));
        let mut b = buf;
        b[15] = 4;
        assert_eq!(parse(&b), Err(ParseError::Length(4)));
        let mut b = buf;
        b[3] = 0;
        assert_eq!(parse(&b), Err(ParseError::NotProxy));
        // LOCAL (health checks from a proxy) carries no addresses.
        let local = [&V2_SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00]].concat();
        assert_eq!(
            parse(&local).map(|(h, n)| (h.command, h.addrs, n)),
            Ok((Command::Local, None, 16))
        );
    }

    fn any_sockaddr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        ]
    }

    proptest! {
        /// emit → parse is the identity (after family normalisation) for both versions, and
        /// trailing payload is left alone.
        #[test]
        fn roundtrip(s in any_sockaddr(), d in any_sockaddr(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = Header::tcp(s, d);
            let mut buf = vec![0u8; MAX_EMIT_LEN];
            let n = h.emit_v2(&mut buf).unwrap();
            buf.truncate(n);
            buf.extend(&tail);
            prop_assert_eq!(parse(&buf), Ok((h, n)));
            let mut v1 = h.to_v1().into_bytes();
            prop_assert!(v1.len() <= V1_MAX_LEN);
            let n1 = v1.len();
            v1.extend(&tail);
            prop_assert_eq!(parse(&v1), Ok((h, n1)));
        }

        /// Arbitrary bytes never panic, and a success never claims more bytes than given.
        #[test]
        fn arbitrary_input_is_safe(mut bytes in proptest::collection::vec(any::<u8>(), 0..300), v2 in any::<bool>()) {
            if v2 && bytes.len() >= 12 {
                bytes[..12].copy_from_slice(&V2_SIGNATURE);
            }
            if let Ok((_, n)) = parse(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }
    }
}
