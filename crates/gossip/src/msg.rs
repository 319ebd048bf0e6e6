//! The messages inside sealed frames (postcard-encoded): broadcast items piggybacked on SWIM
//! packets, and the full-state sync exchanged over TCP. Decoders take hostile bytes and return
//! errors; they never panic.

use serde::{Deserialize, Serialize};

use crate::types::{EntryKey, Identity, NodeId, NodeMeta, Version};

/// One table write or delete as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Where.
    pub key: EntryKey,
    /// Lamport version.
    pub version: Version,
    /// Value, `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// A node's metadata and networks, versioned by its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Whose.
    pub node: NodeId,
    /// Owner's process generation.
    pub generation: u64,
    /// Bumped by the owner at each change.
    pub version: u64,
    /// Metadata.
    pub meta: NodeMeta,
    /// Networks the node participates in.
    pub networks: Vec<String>,
}

impl MemberRecord {
    /// Order of records of one node: newer generation, then newer version.
    pub fn order(&self) -> (u64, u64) {
        (self.generation, self.version)
    }
}

/// One member's accusation that another did not answer its probe or check (Lifeguard's
/// suspect message with its `From`): independent accusations of the same suspect at the same
/// incarnation shorten the suspicion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspect {
    /// Who is suspected.
    pub subject: Identity,
    /// Its incarnation when suspected; a refutation raises it and ends the suspicion.
    pub incarnation: u16,
    /// Who accuses it.
    pub accuser: NodeId,
}

/// A custom broadcast item (foca carries these on its packets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    /// A table event.
    Entry(WireEntry),
    /// A node's metadata.
    Node(MemberRecord),
    /// An accusation.
    Suspect(Suspect),
}

/// A suspicion check, sealed as [`crate::wire::Kind::Check`] datagrams: a member that hears
/// of a suspicion asks the suspect directly; the ask also tells the suspect so it can refute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Check {
    /// "Are you there? You are suspected at `incarnation`."
    Ping {
        /// Matches the answer to the ask.
        nonce: u32,
        /// The suspect as the asker knows it.
        target: Identity,
        /// The suspected incarnation.
        incarnation: u16,
    },
    /// "I am": the suspect's identity and its incarnation after refuting.
    Ack {
        /// The ask's nonce.
        nonce: u32,
        /// The answering member.
        from: Identity,
        /// Its current incarnation.
        incarnation: u16,
    },
}

/// A full-state sync (push, or the reply to one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// The sender.
    pub from: Identity,
    /// The sender's membership view.
    pub members: Vec<foca::Member<Identity>>,
    /// The member records the sender knows.
    pub nodes: Vec<MemberRecord>,
    /// The sender's networks (the reply carries only entries of these).
    pub networks: Vec<String>,
    /// Entries (live and tombstones) of the sender's networks.
    pub entries: Vec<WireEntry>,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid postcard for the type, or trailing bytes.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Larger than allowed.
    #[error("message of {len} bytes exceeds {max}")]
    TooBig {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooBig { len: bytes.len(), max });
    }
    let (v, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(v)
}

/// Decodes a broadcast item of at most `max` bytes.
pub fn decode_item(bytes: &[u8], max: usize) -> Result<Item, DecodeError> {
    decode(bytes, max)
}

/// Decodes a suspicion check of at most `max` bytes.
pub fn decode_check(bytes: &[u8], max: usize) -> Result<Check, DecodeError> {
    decode(bytes, max)
}

/// Decodes a sync message of at most `max` bytes.
pub fn decode_sync(bytes: &[u8], max: usize) -> Result<Sync, DecodeError> {
    decode(bytes, max)
}

/// Encodes any message (postcard never fails on these types).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn item_round_trip_and_trailing_bytes() {
        let item = Item::Entry(WireEntry {
            key: EntryKey::new("t", "n", "k"),
            version: Version { ltime: 5, owner: NodeId(9), generation: 3 },
            value: Some(vec![1, 2, 3]),
        });
        let mut b = encode(&item);
        assert_eq!(decode_item(&b, 1400), Ok(item));
        b.push(0);
        assert!(matches!(decode_item(&b, 1400), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode_item(&b, 3), Err(DecodeError::TooBig { .. })));
    }

    #[test]
    fn suspect_and_check_round_trip() {
        let subject = Identity {
            addr: "10.0.0.9:7946".parse().expect("literal"),
            node: NodeId(9),
            generation: 4,
            bump: 1,
        };
        let item =
            Item::Suspect(Suspect { subject: subject.clone(), incarnation: 7, accuser: NodeId(2) });
        assert_eq!(decode_item(&encode(&item), 1400), Ok(item));
        let ping = Check::Ping { nonce: 0xdead_beef, target: subject.clone(), incarnation: 7 };
        assert_eq!(decode_check(&encode(&ping), 256), Ok(ping));
        let ack = Check::Ack { nonce: 1, from: subject, incarnation: 8 };
        let mut b = encode(&ack);
        assert_eq!(decode_check(&b, 256), Ok(ack));
        b.push(0);
        assert!(matches!(decode_check(&b, 256), Err(DecodeError::Malformed(_))));
        // Hand-written bytes: variant 1 (Ack), nonce 5, 127.0.0.1:1 (V4 = 0), node 3,
        // generation 2, bump 0, incarnation 300 (varint ac 02).
        let hand = [1, 5, 0, 127, 0, 0, 1, 1, 3, 2, 0, 0xac, 0x02];
        let want = Check::Ack {
            nonce: 5,
            from: Identity {
                addr: "127.0.0.1:1".parse().expect("literal"),
                node: NodeId(3),
                generation: 2,
                bump: 0,
            },
            incarnation: 300,
        };
        assert_eq!(decode_check(&hand, 256), Ok(want));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_item(&bytes, 1400);
            let _ = decode_sync(&bytes, 1 << 20);
            let _ = decode_check(&bytes, 1400);
        }
    }
}
