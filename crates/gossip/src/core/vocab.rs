//! What the core takes and gives: its options, the messages it sends, the events consumers
//! see, and its errors.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::config::CoreConfig;
use crate::keyring::KeyringError;
use crate::types::{EntryKey, Identity, NodeId, NodeMeta};

/// Who this core is and how it starts.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Address the others reach us at.
    pub addr: SocketAddr,
    /// Stable node id.
    pub node: NodeId,
    /// Process generation: larger than any previous run of this node (wall-clock ms works).
    pub generation: u64,
    /// Initial metadata.
    pub meta: NodeMeta,
    /// Cluster keys, primary first.
    pub keys: Vec<[u8; 32]>,
    /// Seed of every random choice (and of the nonce prefix): use a random one in production.
    pub seed: u64,
    /// Protocol figures.
    pub config: CoreConfig,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A sealed SWIM datagram for UDP.
    Udp {
        /// Destination.
        to: SocketAddr,
        /// Sealed frame.
        data: Vec<u8>,
    },
    /// A sealed full-state push for TCP: connect, send it length-prefixed, read the
    /// length-prefixed reply and feed it to
    /// [`Core::handle_sync`](super::Core::handle_sync).
    Sync {
        /// Destination (same port as UDP).
        to: SocketAddr,
        /// Sealed frame.
        data: Vec<u8>,
    },
}

/// SWIM state of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe cycle; will be declared down unless it refutes.
    Suspect,
    /// Declared down (or left).
    Down,
}

/// A member as consumers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Its SWIM identity (address, node id, generation).
    pub id: Identity,
    /// SWIM state.
    pub state: MemberState,
    /// SWIM incarnation (refutation counter).
    pub incarnation: u16,
    /// Metadata, once its record arrived.
    pub meta: Option<NodeMeta>,
    /// Networks it participates in.
    pub networks: Vec<String>,
}

/// A change of a visible table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryChange {
    /// Created, updated, or visible again (its owner came back).
    Upserted {
        /// Owning node.
        owner: NodeId,
        /// New value.
        value: Bytes,
    },
    /// Deleted, or withdrawn because its owner is down or restarted.
    Deleted {
        /// Owning node.
        owner: NodeId,
    },
}

/// What consumers are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member joined or came back.
    MemberUp(MemberView),
    /// A member was declared down or left.
    MemberDown(MemberView),
    /// A live member failed its probes and is suspected: it is declared down unless it refutes
    /// in time. Its entries stay visible meanwhile.
    MemberSuspected(MemberView),
    /// A suspected member refuted the suspicion and is alive again.
    MemberRefuted(MemberView),
    /// A live member's metadata or networks changed.
    MemberUpdated(MemberView),
    /// A visible entry changed.
    Entry {
        /// Which entry.
        key: EntryKey,
        /// How.
        change: EntryChange,
    },
}

/// A table operation that was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The node has not joined the entry's network.
    #[error("not a participant of network `{0}`; join it first")]
    NotInNetwork(String),
    /// A name or value over its limit.
    #[error("{field} is {len} bytes, limit {max}")]
    TooLarge {
        /// Which part.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No live entry under that key.
    #[error("no entry {0:?}")]
    NotFound(EntryKey),
    /// Entries are deleted by their owner only.
    #[error("entry {key:?} is owned by node {owner}")]
    NotOwner {
        /// The entry.
        key: EntryKey,
        /// Its owner.
        owner: NodeId,
    },
    /// This node owns as many entries as a member may.
    #[error("this node owns {max} table entries already, the most a member may")]
    TooMany {
        /// The limit (`max_entries_per_owner`).
        max: usize,
    },
    /// foca refused the broadcast (should not happen within the limits).
    #[error("broadcast refused: {0}")]
    Broadcast(String),
}

/// Why a core could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A config field is out of range.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The keyring is unusable.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}
