//! Vocabulary: node ids, identities, metadata, entry keys and versions.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A node's stable gossip id (the agent derives it from the node's cluster id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// A stable id from a name (FNV-1a), for agents whose cluster ids are strings.
    pub fn from_name(name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        NodeId(h)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What SWIM knows a member by: where it is, which node, which process start (`generation`)
/// and how often it renewed itself after being declared down (`bump`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// UDP/TCP gossip address.
    pub addr: SocketAddr,
    /// Stable node id.
    pub node: NodeId,
    /// Process start; a restart uses a larger one (the driver takes wall-clock milliseconds).
    pub generation: u64,
    /// Renewals within one process after a (false) death.
    pub bump: u16,
}

impl foca::Identity for Identity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.bump) > (adversary.generation, adversary.bump)
    }
}

/// A node's role in the control plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Runs tasks only.
    #[default]
    Worker,
    /// Also a Raft manager.
    Manager,
}

/// Whether the scheduler may place tasks on a node (Swarm's `--availability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Availability {
    /// Takes new tasks.
    #[default]
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Tasks move elsewhere.
    Drain,
}

/// Metadata every node announces with its membership.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node's cluster id (e.g. its 25-character Swarm node id; [`NodeId::from_name`] of it
    /// is a good gossip id).
    pub id: String,
    /// Host name.
    pub name: String,
    /// Control-plane role.
    pub role: Role,
    /// Scheduling availability.
    pub availability: Availability,
    /// Underlay address used for VXLAN (None until known).
    pub underlay: Option<IpAddr>,
    /// VXLAN data-path UDP port.
    pub data_port: u16,
    /// WireGuard public key for encrypted overlays.
    pub wg_public_key: Option<[u8; 32]>,
}

impl Default for NodeMeta {
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            role: Role::Worker,
            availability: Availability::Active,
            underlay: None,
            data_port: 4789,
            wg_public_key: None,
        }
    }
}

/// Where an entry lives: `(table, network, key)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryKey {
    /// Table name, e.g. `endpoint_table`.
    pub table: String,
    /// Network the entry belongs to; only nodes in that network hold it.
    pub network: String,
    /// Key within the table.
    pub key: String,
}

impl EntryKey {
    /// Builds a key from its three parts.
    pub fn new(table: &str, network: &str, key: &str) -> Self {
        Self { table: table.to_owned(), network: network.to_owned(), key: key.to_owned() }
    }
}

/// The Lamport version of a write: a total order, larger wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Lamport time of the write.
    pub ltime: u64,
    /// Writing (owning) node.
    pub owner: NodeId,
    /// The owner's process generation.
    pub generation: u64,
}
