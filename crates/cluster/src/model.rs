//! The replicated cluster store's data model and its pure apply logic (no I/O).
//!
//! Managers replicate [`Command`]s through Raft; every replica applies them to a [`ClusterState`]
//! with [`ClusterState::apply`] (in `apply`), which validates first and changes nothing on error.
//! Every record is typed: nodes, networks and the keyring here, services and tasks in the
//! `shoal-model` vocabulary. A record's JSON is its serde shape, on disk and on the wire.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

pub use apply::Refusal;
use serde::{Deserialize, Serialize};
pub use shoal_model::{Service, TaskRecord};
use shoal_scheduler::TaskState;

pub mod alloc;
mod apply;
mod held;
pub mod schema;
pub mod security;
#[cfg(test)]
mod tests;

/// A node's id: 64 random bits, shown as 13 base36 characters (also the certificate's CN and the
/// Raft node id of a manager).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::base36::encode_base36(&self.0.to_be_bytes(), 13))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for NodeId {
    type Err = ();
    fn from_str(s: &str) -> Result<NodeId, ()> {
        if s.len() != 13 {
            return Err(());
        }
        crate::base36::decode_base36::<8>(s).map(|b| NodeId(u64::from_be_bytes(b))).ok_or(())
    }
}

impl NodeId {
    /// A fresh random id.
    pub fn random() -> NodeId {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        NodeId(u64::from_be_bytes(b).max(1))
    }
}

/// A node's role; in the certificate as the OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs Raft and serves the control API.
    Manager,
    /// Runs tasks only.
    Worker,
}

impl Role {
    /// The certificate OU for this role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Manager => "swarm-manager",
            Role::Worker => "swarm-worker",
        }
    }

    /// The role an OU names.
    pub fn from_ou(ou: &str) -> Option<Role> {
        match ou {
            "swarm-manager" => Some(Role::Manager),
            "swarm-worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("invalid role {s:?}: expected worker or manager")),
        }
    }
}

/// Scheduling availability (`node update --availability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Schedulable.
    Active,
    /// No new tasks; running tasks stay.
    Pause,
    /// Tasks are moved off.
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Availability::Active => "Active",
            Availability::Pause => "Pause",
            Availability::Drain => "Drain",
        })
    }
}

impl FromStr for Availability {
    type Err = String;
    fn from_str(s: &str) -> Result<Availability, String> {
        match s.to_ascii_lowercase().as_str() {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            _ => Err(format!("invalid availability {s:?}: expected active, pause or drain")),
        }
    }
}

/// Node liveness (`node ls` STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Not yet seen.
    Unknown,
    /// Up (gossip member alive).
    Ready,
    /// Down (gossip member failed or left).
    Down,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Unknown => "Unknown",
            NodeStatus::Ready => "Ready",
            NodeStatus::Down => "Down",
        })
    }
}

/// A node as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: NodeId,
    /// Host name (`node ls` HOSTNAME).
    pub hostname: String,
    /// Desired role; the certificate follows it.
    pub role: Role,
    /// Scheduling availability.
    pub availability: Availability,
    /// `node update --label-add`.
    pub labels: BTreeMap<String, String>,
    /// The node's control-plane address (QUIC).
    pub addr: SocketAddr,
    /// The node's underlay address for the data path and gossip.
    pub data_addr: IpAddr,
    /// The node's WireGuard public key for encrypted overlays, as the node itself said over its
    /// authenticated session. Peers take it from here, never from gossip.
    #[serde(default)]
    pub wg_public_key: Option<[u8; 32]>,
    /// Liveness.
    pub status: NodeStatus,
    /// Why the status last changed.
    pub status_message: String,
    /// Version of the agent (`node ls` ENGINE VERSION).
    pub engine_version: String,
    /// Unix milliseconds of creation.
    pub created_ms: u64,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
}

/// An overlay network record (the `ingress` network is created at init, the others by `network create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Network id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Driver, `overlay`.
    pub driver: String,
    /// Subnet.
    pub subnet: ipnet::IpNet,
    /// Gateway address inside the subnet.
    pub gateway: IpAddr,
    /// VXLAN network identifier.
    pub vni: u32,
    /// The routing-mesh network.
    pub ingress: bool,
    /// Standalone tasks may attach.
    pub attachable: bool,
    /// Encrypted between nodes.
    pub encrypted: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl NetworkRecord {
    /// The create that asks for this network, its subnet included.
    pub fn spec(&self) -> NetworkSpec {
        NetworkSpec {
            id: self.id.clone(),
            name: self.name.clone(),
            subnet: Some(self.subnet),
            ingress: self.ingress,
            attachable: self.attachable,
            encrypted: self.encrypted,
            labels: self.labels.clone(),
        }
    }
}

/// What a network create asks of the store (`network create`, and `swarm init` for the ingress
/// network): [`ClusterState::apply`] gives it the subnet, when none is asked for, the next free
/// VNI and the gateway (see `alloc`), so creates that race cannot pick the same ones.
///
/// An `Init` written before the store picked these carries a whole [`NetworkRecord`]; read as a
/// spec, its other fields are left out and its subnet is the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Network id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The subnet asked for; the store cuts one from the cluster's pool when `None`.
    #[serde(default)]
    pub subnet: Option<ipnet::IpNet>,
    /// The routing-mesh network.
    #[serde(default)]
    pub ingress: bool,
    /// Standalone tasks may attach.
    #[serde(default)]
    pub attachable: bool,
    /// Encrypted between nodes.
    #[serde(default)]
    pub encrypted: bool,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One gossip encryption key (AES-256-GCM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKey {
    /// Key id, rising.
    pub id: u32,
    /// The key bytes.
    pub key: [u8; 32],
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GossipKey({})", self.id)
    }
}

/// The cluster's gossip keyring: every key in it decrypts; the primary one encrypts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Keyring {
    /// Keys in id order.
    pub keys: Vec<GossipKey>,
    /// Id of the key used to encrypt.
    pub primary: u32,
    /// Bumped on every change.
    pub version: u64,
}

impl Keyring {
    /// The primary key, if the keyring is set.
    pub fn primary_key(&self) -> Option<&GossipKey> {
        self.keys.iter().find(|k| k.id == self.primary)
    }
}

/// Cluster-wide settings and secrets, fixed at init except the join secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Cluster id.
    pub id: String,
    /// CA certificate, PEM.
    pub ca_cert_pem: String,
    /// CA key, PEM (only managers hold the store).
    pub ca_key_pem: String,
    /// Current worker join secret.
    pub worker_secret: [u8; 16],
    /// Current manager join secret.
    pub manager_secret: [u8; 16],
    /// Secrets rotated out (newest last, at most 16), so a stale token gets a precise refusal.
    #[serde(default)]
    pub retired_secrets: Vec<[u8; 16]>,
    /// Pools overlay subnets are cut from.
    pub default_addr_pool: Vec<ipnet::IpNet>,
    /// Prefix length of each network's subnet.
    pub subnet_size: u8,
    /// VXLAN port.
    pub data_path_port: u16,
    /// Unix milliseconds of creation.
    pub created_ms: u64,
    /// Certificate expiry, gossip key rotation and any CA rotation under way (see `security` and `crate::ca`).
    #[serde(default)]
    pub security: security::SecurityConfig,
}

/// The whole replicated state.
///
/// Every table is typed; `raft` applies each batch to it in place (a refused command changes
/// nothing, so no copy is needed to roll back). The tables change through `apply` only, which
/// keeps an index of the addresses they hold beside them. Records sit behind [`Arc`], so a copy of the
/// state (a read of the store, a node's resync) shares them and costs a pointer per record;
/// apply changes a shared record through [`Arc::make_mut`], which copies that one record only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Settings; `None` before init has been applied.
    pub cluster: Option<ClusterInfo>,
    /// Nodes by id.
    pub nodes: BTreeMap<NodeId, Arc<NodeRecord>>,
    /// Networks by id.
    pub networks: BTreeMap<String, Arc<NetworkRecord>>,
    /// Gossip keyring.
    pub keyring: Keyring,
    /// Services by id.
    #[serde(default)]
    pub services: BTreeMap<String, Arc<Service>>,
    /// Tasks by id: the service tasks the leader schedules and the nodes' standalone tasks.
    #[serde(default)]
    pub tasks: BTreeMap<String, Arc<TaskRecord>>,
    /// The addresses no task holds (service VIPs, node sandboxes), keyed as
    /// [`shoal_model::vip_key`] and [`shoal_model::sandbox_key`] say.
    #[serde(default)]
    pub ipam: BTreeMap<String, HeldAddress>,
    /// Which addresses `tasks` and `ipam` name, per network, kept by apply (see `held`): the
    /// tables change through [`ClusterState::apply`] only, or the index goes stale.
    #[serde(skip)]
    held: held::AddressIndex,
}

/// An address held in the `ipam` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAddress {
    /// The address.
    pub ip: Ipv4Addr,
}

/// A change to the store; the Raft log's payload.
// `Init` is big but written once; boxing it would only add noise to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// First entry of a new cluster.
    Init {
        /// Settings and secrets.
        info: ClusterInfo,
        /// The first manager.
        node: NodeRecord,
        /// Initial gossip keyring.
        keyring: Keyring,
        /// The `ingress` network, created as [`Command::CreateNetwork`] creates one.
        ingress: NetworkSpec,
    },
    /// A node joined (or rejoined with a new certificate).
    AddNode(NodeRecord),
    /// `node update`.
    UpdateNode {
        /// Which node.
        id: NodeId,
        /// New availability.
        availability: Option<Availability>,
        /// Labels to set.
        label_add: BTreeMap<String, String>,
        /// Labels to remove.
        label_rm: Vec<String>,
    },
    /// Desired role change (promote/demote).
    SetRole {
        /// Which node.
        id: NodeId,
        /// The role.
        role: Role,
    },
    /// Liveness change.
    SetStatus {
        /// Which node.
        id: NodeId,
        /// New status.
        status: NodeStatus,
        /// Why.
        message: String,
    },
    /// Node address change (a restarted node that moved).
    SetAddr {
        /// Which node.
        id: NodeId,
        /// Control address.
        addr: SocketAddr,
    },
    /// The node's WireGuard public key (what it said in its session with the leader).
    SetWgKey {
        /// Which node.
        id: NodeId,
        /// Its public key.
        key: [u8; 32],
    },
    /// `node rm` / leave.
    RemoveNode(NodeId),
    /// `join-token --rotate`.
    SetJoinSecret {
        /// For which role.
        role: Role,
        /// New secret.
        secret: [u8; 16],
    },
    /// Gossip rotation step 1: distribute a new key.
    AddGossipKey(GossipKey),
    /// Step 2: encrypt with it.
    SetPrimaryGossipKey(u32),
    /// Step 3: retire an old key.
    RetireGossipKey(u32),
    /// Create or replace a network as given (what `network create` wrote before the store
    /// picked subnets and VNIs; logs that hold it still apply).
    PutNetwork(NetworkRecord),
    /// Create a network with the subnet and VNI the store picks; applied again (a write retried
    /// after its answer was lost), it leaves the network it created.
    CreateNetwork(NetworkSpec),
    /// Remove a network.
    RemoveNetwork(String),
    /// Create or replace a service; its name and published ports must be its own.
    PutService(Box<Service>),
    /// Remove a service.
    RemoveService(String),
    /// Create or replace a task (the leader's scheduling); a task to run gets an address on each
    /// of its networks it has none on (see `alloc`).
    PutTask(Box<TaskRecord>),
    /// Remove a task.
    RemoveTask(String),
    /// Hold an address that belongs to no task, picked by the store (see `alloc`).
    AllocateAddress {
        /// Key in [`ClusterState::ipam`].
        key: String,
        /// The network the address is on.
        network: String,
    },
    /// Hold a given address that belongs to no task (as agents before `AllocateAddress` wrote).
    PutAddress {
        /// Key in [`ClusterState::ipam`].
        key: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// Release a held address.
    RemoveAddress(String),
    /// A node reports on a task it hosts; the task must exist and be assigned to `owner`.
    ReportTask {
        /// The reporting node.
        owner: NodeId,
        /// Task id.
        key: String,
        /// What it observed.
        report: TaskReport,
    },
    /// `swarm update` and the steps of `swarm ca --rotate` (see `security` and `crate::ca`).
    Security(security::CaStep),
    /// A node creates or removes one of its standalone tasks (`shoal run`): the task (if any)
    /// must be assigned to `owner` and belong to no service; an existing one must be `owner`'s.
    /// A new name must be free; the store picks the addresses.
    PutStandalone {
        /// The node that runs it.
        owner: NodeId,
        /// Task id.
        key: String,
        /// The task, or `None` to remove it.
        value: Option<Box<TaskRecord>>,
    },
}

/// What a node may say about a task it hosts: the observed state, never the desired one. The
/// field names are those of [`TaskRecord`], which the report overwrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    /// The state the node sees.
    pub state: TaskState,
    /// When that state began; set when the state changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since_ms: Option<u64>,
    /// The exit code of a task that ended.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The health check's verdict (`starting`, `healthy`, `unhealthy`).
    #[serde(default)]
    pub health: Option<String>,
    /// What happened, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TaskReport {
    /// Longest message a node may report.
    pub const MAX_MESSAGE: usize = 4096;

    /// A health verdict is a short lower-case word, a message at most [`Self::MAX_MESSAGE`]
    /// bytes: what a node says is shown by `service ps` and must stay small.
    pub fn check(&self) -> Result<(), String> {
        if let Some(h) = &self.health
            && !(!h.is_empty()
                && h.len() <= 32
                && h.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
        {
            return Err(format!("task report has a malformed health {h:?}"));
        }
        if self.message.as_ref().is_some_and(|m| m.len() > Self::MAX_MESSAGE) {
            return Err(format!(
                "task report has a message longer than {} bytes",
                Self::MAX_MESSAGE
            ));
        }
        Ok(())
    }

    /// Writes the report into `t`.
    pub fn apply_to(&self, t: &mut TaskRecord) {
        t.task.state = self.state;
        if let Some(since) = self.state_since_ms {
            t.task.state_since_ms = since;
        }
        t.exit_code = self.exit_code;
        t.health = self.health.clone();
        if let Some(m) = &self.message {
            t.message = m.clone();
        }
    }
}

/// Largest standalone task record a node may write (its command line and environment), as JSON.
pub const MAX_STANDALONE: usize = 64 * 1024;

/// What the state machine answers for one command.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandResponse {
    /// `Some(reason)` when the command was refused (and changed nothing).
    pub error: Option<Refusal>,
}

/// Something that changed, for the agent (and the scheduler later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterEvent {
    /// A node joined.
    NodeAdded {
        /// Node id.
        id: NodeId,
        /// Host name.
        hostname: String,
    },
    /// A node's status changed (Ready ↔ Down): tasks on a Down node are to be rescheduled.
    NodeStatus {
        /// Node id.
        id: NodeId,
        /// Host name.
        hostname: String,
        /// Old status.
        from: NodeStatus,
        /// New status.
        to: NodeStatus,
    },
    /// A node's availability changed.
    NodeAvailability {
        /// Node id.
        id: NodeId,
        /// New availability.
        availability: Availability,
    },
    /// A node's desired role changed.
    NodeRole {
        /// Node id.
        id: NodeId,
        /// New role.
        role: Role,
    },
    /// A node was removed.
    NodeRemoved {
        /// Node id.
        id: NodeId,
    },
    /// The gossip keyring changed.
    Keyring {
        /// New version.
        version: u64,
    },
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
