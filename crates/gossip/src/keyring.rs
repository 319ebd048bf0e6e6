//! The cluster keyring: AES-256-GCM (ring) keys, one primary for sealing, all accepted for
//! opening, changed at runtime without a gap (add the new key everywhere, make it primary,
//! then remove the old one).
//!
//! # Nonces
//!
//! A frame's 96-bit nonce is a sender stream's 64-bit epoch followed by the stream's 32-bit
//! counter. A keyring seals on two streams, one for datagrams (SWIM, suspicion checks) and one
//! for the TCP sync frames, so that a slow sync exchange does not fall behind the datagram
//! counter in a receiver's [`ReplayWindow`]. Each stream's epoch is drawn at random when the
//! keyring is made and again whenever its counter would wrap, so a nonce never repeats within a
//! process, and across processes (restarts, other nodes) two epochs collide with probability
//! 2^-64 per pair. Nothing depends on a clock or on state kept across restarts.
//!
//! Opening checks the frame against the replay window after it authenticates: a frame opened
//! before is refused with [`OpenError::Replayed`].

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::replay::ReplayWindow;
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

/// One sealing stream: its epoch and the counter of the next frame.
#[derive(Debug, Clone, Copy)]
struct Stream {
    epoch: u64,
    next: u32,
}

/// Keys accepted for opening, the first being the primary used for sealing.
pub struct Keyring {
    keys: Vec<Entry>,
    /// Draws the streams' epochs.
    rng: SmallRng,
    datagrams: Stream,
    syncs: Stream,
    window: ReplayWindow,
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
    /// Authentic, but opened before (or too old for the replay window).
    #[error("replayed frame")]
    Replayed,
}

impl Keyring {
    /// A keyring whose primary is `keys[0]`; `seed` must come from a random source, since the
    /// nonces' epochs are drawn from it.
    pub fn new(keys: &[[u8; 32]], seed: u64) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let datagrams = Stream { epoch: rng.random(), next: 0 };
        let syncs = Stream { epoch: rng.random(), next: 0 };
        let mut ring =
            Self { keys: Vec::new(), rng, datagrams, syncs, window: ReplayWindow::default() };
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
        self.window.forget_key(id);
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

    /// The next nonce of the stream that carries `kind`.
    fn next_nonce(&mut self, kind: Kind) -> [u8; 12] {
        let stream = match kind {
            Kind::Swim | Kind::Check => &mut self.datagrams,
            Kind::SyncRequest | Kind::SyncReply => &mut self.syncs,
        };
        if stream.next == u32::MAX {
            *stream = Stream { epoch: self.rng.random(), next: 0 };
        }
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&stream.epoch.to_be_bytes());
        nonce[8..].copy_from_slice(&stream.next.to_be_bytes());
        stream.next += 1;
        nonce
    }

    /// Seals `plaintext` as a frame of `kind` with the primary key.
    pub fn seal(&mut self, kind: Kind, plaintext: &[u8]) -> Vec<u8> {
        let nonce = self.next_nonce(kind);
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

    /// Opens a frame: checks the header, finds the key by id, verifies and decrypts, then
    /// refuses it if the replay window has seen it.
    pub fn open(&mut self, frame: &[u8]) -> Result<(Kind, Vec<u8>), OpenError> {
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
        let (epoch, counter) = repr.nonce.split_at(8);
        let epoch = u64::from_be_bytes(epoch.try_into().map_err(|_| OpenError::AuthFailed)?);
        let counter = u32::from_be_bytes(counter.try_into().map_err(|_| OpenError::AuthFailed)?);
        if !self.window.accept(repr.key_id, epoch, counter) {
            return Err(OpenError::Replayed);
        }
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

    #[test]
    fn a_frame_opens_once() {
        let mut tx = Keyring::new(&[[4u8; 32]], 11).expect("one key");
        let mut rx = Keyring::new(&[[4u8; 32]], 12).expect("one key");
        let first = tx.seal(Kind::Swim, b"a");
        let second = tx.seal(Kind::Swim, b"b");
        let sync = tx.seal(Kind::SyncReply, b"c");
        assert!(rx.open(&second).is_ok());
        assert!(rx.open(&first).is_ok(), "reordered, inside the window");
        assert!(rx.open(&sync).is_ok(), "the sync stream has its own counter");
        for f in [&first, &second, &sync] {
            assert_eq!(rx.open(f), Err(OpenError::Replayed));
        }
        // A receiver that restarted (a new keyring) has no memory of them.
        let mut fresh = Keyring::new(&[[4u8; 32]], 13).expect("one key");
        assert!(fresh.open(&first).is_ok());
    }

    #[test]
    fn a_wrapping_counter_draws_a_new_epoch() {
        let mut k = Keyring::new(&[[6u8; 32]], 5).expect("one key");
        let before = k.seal(Kind::Swim, b"x");
        k.datagrams.next = u32::MAX;
        let after = k.seal(Kind::Swim, b"x");
        assert_ne!(before[8..16], after[8..16], "epoch changed");
        assert_eq!(after[16..20], [0, 0, 0, 0], "counter restarted");
    }

    proptest::proptest! {
        /// Restarts are new keyrings from new random seeds (as the driver seeds them): no nonce
        /// repeats across any of them or within one, on either stream.
        #[test]
        fn nonces_are_unique_across_restarts(seeds in proptest::collection::hash_set(proptest::prelude::any::<u64>(), 1..40)) {
            let mut seen = std::collections::HashSet::new();
            for seed in seeds {
                let mut k = Keyring::new(&[[8u8; 32]], seed).expect("one key");
                for i in 0..50u32 {
                    let kind = if i % 3 == 0 { Kind::SyncRequest } else { Kind::Swim };
                    let f = k.seal(kind, b"n");
                    let nonce: [u8; 12] = f[8..20].try_into().expect("12 bytes");
                    proptest::prop_assert!(seen.insert(nonce), "nonce repeated: {:?}", nonce);
                }
            }
        }
    }
}
