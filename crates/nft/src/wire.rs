//! The netlink framing nftables speaks: `nlmsghdr` + `nfgenmsg`, then type-length-value
//! attributes, nested where a value has parts. Written into one growing buffer (a batch is one
//! `send`) and read back from the kernel's replies without trusting any length in them.

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nftables message type.
pub const SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` / `NFNL_MSG_BATCH_END`: brackets of one transaction.
pub const MSG_BATCH_BEGIN: u16 = 0x10;
pub const MSG_BATCH_END: u16 = 0x11;
/// `NLMSG_ERROR` / `NLMSG_DONE`: the kernel's ack (errno 0) or error, and the end of a dump.
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

/// `nlmsg_flags` bits.
pub const F_REQUEST: u16 = 0x1;
pub const F_ACK: u16 = 0x4;
pub const F_DUMP: u16 = 0x300;
pub const F_CREATE: u16 = 0x400;

/// Attribute type bit that marks a nested attribute.
const NLA_F_NESTED: u16 = 0x8000;
/// Bits of an attribute type that are flags, not the type.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

/// Size of `nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages to one buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writer {
    buf: Vec<u8>,
    /// Start of the message being written.
    msg: usize,
    /// Starts of the open nested attributes.
    nests: Vec<usize>,
}

impl Writer {
    /// Starts a message: `nlmsghdr` (its length is patched by [`Writer::end_msg`]) and `nfgenmsg`.
    pub fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.msg = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version NFNETLINK_V0, res_id in network order.
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    /// Ends the message begun last: writes its length.
    pub fn end_msg(&mut self) {
        debug_assert!(self.nests.is_empty(), "a nested attribute was left open");
        let len = u32::try_from(self.buf.len() - self.msg).unwrap_or(u32::MAX);
        self.buf[self.msg..self.msg + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends an attribute holding `data`, padded to 4 bytes.
    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    /// A 32-bit attribute in network order (nftables' integers on the wire).
    pub fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; close it with [`Writer::end_nest`].
    pub fn begin_nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the nested attribute opened last.
    pub fn end_nest(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// Sets `flags` on the message that starts at byte `at`.
    pub fn add_flags(&mut self, at: usize, flags: u16) {
        if let Some(b) = self.buf.get_mut(at + 6..at + 8) {
            let old = u16::from_ne_bytes([b[0], b[1]]);
            b.copy_from_slice(&(old | flags).to_ne_bytes());
        }
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// One netlink message of a datagram from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub ty: u16,
    pub seq: u32,
    /// What follows the `nlmsghdr` (possibly cut short if the datagram was truncated).
    pub payload: &'a [u8],
}

/// The messages of a datagram. A length that runs past the end ends the walk after yielding
/// what is there (a truncated error reply still carries its errno first).
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < NLMSG_HDRLEN {
            buf = &[];
            return None;
        }
        let end = len.min(buf.len());
        let msg = Message { ty, seq, payload: &buf[NLMSG_HDRLEN..end] };
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some(msg)
    })
}

/// The errno of an `NLMSG_ERROR` payload: 0 for an ack, else a positive errno.
pub fn error_code(payload: &[u8]) -> Option<i32> {
    let b = payload.get(..4)?;
    Some(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The attributes in `buf` as (type without flag bits, value); stops at the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return None;
        }
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some((ty, value))
    })
}

/// The value of the first attribute of type `ty`.
pub fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// A string attribute value without its NUL.
pub fn string(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// A 64-bit network-order value.
pub fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_with_a_nested_attribute_is_framed_and_padded() {
        let mut w = Writer::default();
        w.begin_msg((SUBSYS_NFTABLES << 8) | 2, F_REQUEST | F_ACK, 7, 1, 0);
        w.str(1, "t");
        w.begin_nest(4);
        w.u32(1, 0x0102_0304);
        w.end_nest();
        w.end_msg();
        let mut want = Vec::new();
        want.extend_from_slice(&40u32.to_ne_bytes());
        want.extend_from_slice(&0x0a02u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]);
        // "t\0" padded to 4 bytes.
        want.extend_from_slice(&6u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&[b't', 0, 0, 0]);
        // A nested attribute holding one u32 in network order.
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&(4u16 | 0x8000).to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(w.bytes(), want.as_slice());

        let msgs: Vec<_> = messages(w.bytes()).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].ty, msgs[0].seq), (0x0a02, 7));
        let body = &msgs[0].payload[4..];
        assert_eq!(attr(body, 1).map(string), Some("t".to_owned()));
        let nest = attr(body, 4).expect("nested attribute");
        assert_eq!(attr(nest, 1), Some(&[1u8, 2, 3, 4][..]));
    }

    #[test]
    fn hostile_lengths_end_the_walk() {
        // An attribute claiming 200 bytes in a 8-byte buffer, and one claiming less than its header.
        assert_eq!(attrs(&[200, 0, 1, 0, 0, 0, 0, 0]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0, 0, 0, 0, 0]).count(), 0);
        // A message whose length runs past the datagram yields what is there, once.
        let mut m = Vec::new();
        m.extend_from_slice(&100u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-17i32).to_ne_bytes());
        let msgs: Vec<_> = messages(&m).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(error_code(msgs[0].payload), Some(17));
        assert_eq!(messages(&[0; 15]).count(), 0);
    }

    #[test]
    fn arbitrary_replies_never_panic() {
        // A fixed-seed xorshift stream: many lengths, many shapes of garbage.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 96) as usize;
            let buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for m in messages(&buf) {
                let _ = error_code(m.payload);
                for (_, v) in attrs(m.payload.get(4..).unwrap_or(&[])) {
                    let _ = (string(v), be64(v), attrs(v).count());
                }
            }
        }
    }
}
