//! The cluster keyring: AES-256-GCM (ring) keys, one primary for sealing, all accepted for
//! opening, changed at runtime without a gap (add the new key everywhere, make it primary,
//! then remove the old one).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::wire::{Frame, FrameRepr, HEADER_LEN, Kind, TAG_LEN, WireError};

/// Most keys a keyring holds (Swarm keeps 3 per subsystem).
pub const MAX_KEYS: usize = 8;

/// The id of a key: the first four bytes of its SHA-256, as carried in every frame.
pub fn key_id(key: &[u8; 32]) -> u32 {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

struct Entry {
    id: u32,
    key: LessSafeKey,
}

/// Keys accepted for opening, the first being the primary used for sealing.
pub struct Keyring {
    keys: Vec<Entry>,
    /// Per-process random nonce prefix; with the counter it never repeats for a key.
    salt: u32,
    counter: u64,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.keys.iter().map(|k| format!("{:08x}", k.id)).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

/// Why a keyring operation or an open failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// The keyring already holds [`MAX_KEYS`].
    #[error("keyring is full ({MAX_KEYS} keys); remove one first")]
    Full,
    /// No key with that id.
    #[error("no key with id {0:08x} in the keyring")]
    UnknownKey(u32),
    /// The primary key cannot be removed; make another primary first.
    #[error("key {0:08x} is the primary key; make another key primary before removing it")]
    RemovePrimary(u32),
    /// A keyring needs at least one key.
    #[error("a keyring needs at least one key")]
    Empty,
}

/// Why a frame could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Sealed with a key we do not hold.
    #[error("sealed with unknown key {0:08x}")]
    UnknownKey(u32),
    /// The tag did not verify: tampered, or a key-id collision.
    #[error("authentication failed")]
    AuthFailed,
}

impl Keyring {
    /// A keyring whose primary is `keys[0]`; `salt` should come from a random source.
    pub fn new(keys: &[[u8; 32]], salt: u32) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut ring = Self { keys: Vec::new(), salt, counter: 0 };
        for k in keys {
            ring.add(k)?;
        }
        Ok(ring)
    }

    /// Adds a key accepted for opening (no-op if present); returns its id.
    pub fn add(&mut self, key: &[u8; 32]) -> Result<u32, KeyringError> {
        let id = key_id(key);
        if self.keys.iter().any(|e| e.id == id) {
            return Ok(id);
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyringError::Full);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| KeyringError::Empty)?;
        self.keys.push(Entry { id, key: LessSafeKey::new(unbound) });
        Ok(id)
    }

    /// Makes the key with `id` the sealing key.
    pub fn make_primary(&mut self, id: u32) -> Result<(), KeyringError> {
        let pos = self.keys.iter().position(|e| e.id == id).ok_or(KeyringError::UnknownKey(id))?;
        let e = self.keys.remove(pos);
        self.keys.insert(0, e);
        Ok(())
    }

    /// Removes a non-primary key.
    pub fn remove(&mut self, id: u32) -> Result<(), KeyringError> {
        let pos = self.keys.iter().position(|e| e.id == id).ok_or(KeyringError::UnknownKey(id))?;
        if pos == 0 {
            return Err(KeyringError::RemovePrimary(id));
        }
        self.keys.remove(pos);
        Ok(())
    }

    /// Ids of all keys, primary first.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.iter().map(|e| e.id).collect()
    }

    /// The primary key's id.
    pub fn primary(&self) -> u32 {
        self.keys.first().map_or(0, |e| e.id)
    }

    /// Seals `plaintext` as a frame of `kind` with the primary key.
    pub fn seal(&mut self, kind: Kind, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.salt.to_be_bytes());
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter = self.counter.wrapping_add(1);
        let Some(primary) = self.keys.first() else {
            return Vec::new();
        };
        let repr = FrameRepr { kind, key_id: primary.id, nonce };
        let mut out = vec![0u8; HEADER_LEN];
        repr.emit(&mut out);
        out.extend_from_slice(plaintext);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        // Sealing in place with a 96-bit nonce never fails for inputs below GCM's 64 GiB limit.
        let tag = primary
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&*header),
                body,
            )
            .map(|t| t.as_ref().to_vec())
            .unwrap_or_else(|_| vec![0u8; TAG_LEN]);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a frame: checks the header, finds the key by id, verifies and decrypts.
    pub fn open(&self, frame: &[u8]) -> Result<(Kind, Vec<u8>), OpenError> {
        let view = Frame::new_checked(frame)?;
        let repr = FrameRepr::parse(&view)?;
        let entry = self
            .keys
            .iter()
            .find(|e| e.id == repr.key_id)
            .ok_or(OpenError::UnknownKey(repr.key_id))?;
        let mut body = view.sealed().to_vec();
        let plain_len = entry
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(repr.nonce),
                Aad::from(view.header()),
                &mut body,
            )
            .map_err(|_| OpenError::AuthFailed)?
            .len();
        body.truncate(plain_len);
        Ok((repr.kind, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_rotation() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut tx = Keyring::new(&[a], 7).expect("one key");
        let mut rx = Keyring::new(&[a], 9).expect("one key");
        let f = tx.seal(Kind::Swim, b"hello");
        assert_eq!(rx.open(&f).expect("opens"), (Kind::Swim, b"hello".to_vec()));

        // Rotation: the receiver accepts b before the sender switches; no gap.
        rx.add(&b).expect("room");
        let id_b = tx.add(&b).expect("room");
        tx.make_primary(id_b).expect("present");
        let f = tx.seal(Kind::SyncReply, b"x");
        assert_eq!(rx.open(&f).expect("opens").0, Kind::SyncReply);
        assert_eq!(tx.remove(id_b), Err(KeyringError::RemovePrimary(id_b)));
        rx.make_primary(id_b).expect("present");
        rx.remove(key_id(&a)).expect("not primary");
        let old = Keyring::new(&[a], 1).expect("one key").seal(Kind::Swim, b"old");
        assert_eq!(rx.open(&old), Err(OpenError::UnknownKey(key_id(&a))));
    }

    #[test]
    fn tampering_and_truncation_fail() {
        let mut k = Keyring::new(&[[3u8; 32]], 1).expect("one key");
        let f = k.seal(Kind::Swim, b"payload");
        for i in 0..f.len() {
            let mut t = f.clone();
            t[i] ^= 0x40;
            assert!(k.open(&t).is_err(), "flip at {i} accepted");
        }
        assert_eq!(k.open(&f[..10]), Err(OpenError::Wire(WireError::Truncated)));
        assert!(k.open(&f[..f.len() - 1]).is_err());
    }

    #[test]
    fn nonces_never_repeat() {
        let mut k = Keyring::new(&[[3u8; 32]], 1).expect("one key");
        let a = k.seal(Kind::Swim, b"same");
        let b = k.seal(Kind::Swim, b"same");
        assert_ne!(a[8..20], b[8..20]);
        assert_ne!(a, b);
    }
}
