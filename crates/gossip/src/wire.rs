//! The sealed gossip frame: a checked view over bytes, its `Repr`, and the size limits.
//!
//! ```text
//!  0      2   3    4          8                20                 len-16     len
//!  +------+---+----+----------+-----------------+------------------+----------+
//!  | "SG" | v | kd |  key id  |  nonce (96 bit) |  ciphertext      | GCM tag  |
//!  +------+---+----+----------+-----------------+------------------+----------+
//! ```
//!
//! `v` is the format version (2), `kd` the kind of the sealed message (SWIM datagram, sync
//! request, sync reply, suspicion check), `key id` the first four bytes of SHA-256 of the AES-256 key that sealed
//! it. The nonce is the sender stream's 64-bit epoch and 32-bit counter (version 1 had a 32-bit
//! salt and a 64-bit counter, with no replay window; see `keyring`). The 20 header bytes are the
//! AEAD's additional data, so none of them can be altered.
//! Over TCP every frame is preceded by its length as a big-endian `u32`.

use std::fmt;

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"SG";
/// Frame format version.
pub const VERSION: u8 = 2;
/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = 20;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed frame adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

mod field {
    use std::ops::Range;
    pub(super) const MAGIC: Range<usize> = 0..2;
    pub(super) const VERSION: usize = 2;
    pub(super) const KIND: usize = 3;
    pub(super) const KEY_ID: Range<usize> = 4..8;
    pub(super) const NONCE: Range<usize> = 8..20;
}

/// What a sealed frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A foca SWIM packet (UDP).
    Swim,
    /// A full-state push over TCP, answered by a [`Kind::SyncReply`].
    SyncRequest,
    /// The answer to a full-state push.
    SyncReply,
    /// A suspicion check or its answer (UDP).
    Check,
}

impl Kind {
    /// The kind's byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Kind::Swim => 1,
            Kind::SyncRequest => 2,
            Kind::SyncReply => 3,
            Kind::Check => 4,
        }
    }

    /// The kind for a byte, if any.
    pub const fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Swim),
            2 => Some(Kind::SyncRequest),
            3 => Some(Kind::SyncReply),
            4 => Some(Kind::Check),
            _ => None,
        }
    }
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header plus a tag.
    #[error("truncated frame")]
    Truncated,
    /// Wrong magic bytes.
    #[error("bad magic")]
    BadMagic,
    /// A format version we do not speak.
    #[error("unsupported frame version")]
    BadVersion,
    /// An unknown message kind.
    #[error("unknown frame kind")]
    BadKind,
}

/// A checked view of a sealed frame.
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps `buffer` without checks; accessors may panic on short input. Prefer [`Self::new_checked`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps `buffer` after checking its length, magic, version and kind.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let f = Self::new_unchecked(buffer);
        f.check()?;
        Ok(f)
    }

    /// Checks that every accessor is safe to call and the header is one we accept.
    pub fn check(&self) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < OVERHEAD {
            return Err(WireError::Truncated);
        }
        if b[field::MAGIC] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[field::VERSION] != VERSION {
            return Err(WireError::BadVersion);
        }
        if Kind::from_byte(b[field::KIND]).is_none() {
            return Err(WireError::BadKind);
        }
        Ok(())
    }

    /// The message kind (a checked frame always has one).
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_byte(self.buffer.as_ref()[field::KIND])
    }

    /// The id of the key that sealed this frame.
    pub fn key_id(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::KEY_ID];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The 96-bit nonce.
    pub fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n.copy_from_slice(&self.buffer.as_ref()[field::NONCE]);
        n
    }

    /// The header bytes (the AEAD's additional data).
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..HEADER_LEN]
    }

    /// Ciphertext followed by the tag.
    pub fn sealed(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// The whole frame.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]>> fmt::Debug for Frame<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.check() {
            Ok(()) => f
                .debug_struct("Frame")
                .field("kind", &self.kind())
                .field("key_id", &format_args!("{:08x}", self.key_id()))
                .field("len", &self.buffer.as_ref().len())
                .finish(),
            Err(e) => write!(f, "Frame({e})"),
        }
    }
}

/// The header of a frame, parsed or to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRepr {
    /// Message kind.
    pub kind: Kind,
    /// Sealing key id.
    pub key_id: u32,
    /// AEAD nonce.
    pub nonce: [u8; 12],
}

impl FrameRepr {
    /// Parses the header of a checked frame.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Self, WireError> {
        frame.check()?;
        Ok(Self {
            kind: frame.kind().ok_or(WireError::BadKind)?,
            key_id: frame.key_id(),
            nonce: frame.nonce(),
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf` (which must be that long).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[field::MAGIC].copy_from_slice(&MAGIC);
        buf[field::VERSION] = VERSION;
        buf[field::KIND] = self.kind.to_byte();
        buf[field::KEY_ID].copy_from_slice(&self.key_id.to_be_bytes());
        buf[field::NONCE].copy_from_slice(&self.nonce);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: [u8; 38] = [
        b'S', b'G', 2, 2, // magic, version, kind = sync request
        0xde, 0xad, 0xbe, 0xef, // key id
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // nonce
        0xaa, 0xbb, // ciphertext
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // tag
    ];

    #[test]
    fn parses_hand_written_bytes() {
        let f = Frame::new_checked(&SAMPLE[..]).expect("valid");
        let r = FrameRepr::parse(&f).expect("valid");
        assert_eq!(r.kind, Kind::SyncRequest);
        assert_eq!(r.key_id, 0xdead_beef);
        assert_eq!(r.nonce, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(f.sealed().len(), 18);
        let mut out = [0u8; HEADER_LEN];
        r.emit(&mut out);
        assert_eq!(out, SAMPLE[..HEADER_LEN]);
    }

    proptest::proptest! {
        #[test]
        fn checked_view_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            if let Ok(f) = Frame::new_checked(&bytes[..]) {
                let r = FrameRepr::parse(&f).expect("checked frames parse");
                proptest::prop_assert_eq!(f.sealed().len() + HEADER_LEN, bytes.len());
                let mut out = [0u8; HEADER_LEN];
                r.emit(&mut out);
                proptest::prop_assert_eq!(&out[..], f.header());
            }
        }

        #[test]
        fn seal_then_open_is_identity(plain in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let mut k = crate::Keyring::new(&[[5; 32]], 3).expect("key");
            let f = k.seal(Kind::SyncRequest, &plain);
            proptest::prop_assert_eq!(f.len(), plain.len() + OVERHEAD);
            proptest::prop_assert_eq!(k.open(&f).expect("opens"), (Kind::SyncRequest, plain));
        }
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(Frame::new_checked(&SAMPLE[..35]).unwrap_err(), WireError::Truncated);
        let mut b = SAMPLE;
        b[0] = b'X';
        assert_eq!(Frame::new_checked(&b[..]).unwrap_err(), WireError::BadMagic);
        let mut b = SAMPLE;
        b[2] = 9;
        assert_eq!(Frame::new_checked(&b[..]).unwrap_err(), WireError::BadVersion);
        let mut b = SAMPLE;
        b[3] = 0;
        assert_eq!(Frame::new_checked(&b[..]).unwrap_err(), WireError::BadKind);
    }
}
