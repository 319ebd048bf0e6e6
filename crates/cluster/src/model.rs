//! The replicated cluster store's data model and its pure apply logic (no I/O).
//!
//! Managers replicate [`Command`]s through Raft; every replica applies them to a [`ClusterState`]
//! with [`ClusterState::apply`], which validates first and changes nothing on error. Nodes and the
//! gossip keyring are typed; services, tasks and IP allocations have typed homes in
//! [`ClusterState::entries`] keyed by table name, so the store's format does not change when they
//! arrive.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
    /// Certificate expiry, gossip key rotation and any CA rotation under way (see `ca`).
    #[serde(default)]
    pub security: crate::ca::SecurityConfig,
}

/// Table names of the generic entries (services, tasks, IP allocations).
pub mod tables {
    /// Services by id.
    pub const SERVICES: &str = "services";
    /// Tasks by id.
    pub const TASKS: &str = "tasks";
    /// IP allocations, key `<network id>/<address>`.
    pub const IPAM: &str = "ipam";
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Settings; `None` before init has been applied.
    pub cluster: Option<ClusterInfo>,
    /// Nodes by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Networks by id.
    pub networks: BTreeMap<String, NetworkRecord>,
    /// Gossip keyring.
    pub keyring: Keyring,
    /// Generic entries: table → key → JSON value (services, tasks, IP allocations, …).
    pub entries: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
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
        /// The `ingress` network.
        ingress: NetworkRecord,
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
    /// Create or replace a network.
    PutNetwork(NetworkRecord),
    /// Remove a network.
    RemoveNetwork(String),
    /// Create or replace a generic entry.
    PutEntry {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Value.
        value: serde_json::Value,
    },
    /// Remove a generic entry.
    DeleteEntry {
        /// Table.
        table: String,
        /// Key.
        key: String,
    },
    /// A node reports on a task it hosts: sets some of [`tasks::REPORTED`]'s fields of the
    /// entry, which must exist and name `owner` as its `node_id`.
    ReportTask {
        /// The reporting node.
        owner: NodeId,
        /// Task id (key in [`tables::TASKS`]).
        key: String,
        /// Fields to set.
        fields: serde_json::Map<String, serde_json::Value>,
    },
    /// `swarm update` and the steps of `swarm ca --rotate` (see `ca`).
    Security(crate::ca::CaStep),
    /// A node creates or removes one of its standalone tasks (`shoal run`): the value (if any)
    /// must name `owner` as its `node_id` and no service; an existing entry must be `owner`'s.
    PutStandalone {
        /// The node that runs it.
        owner: NodeId,
        /// Task id.
        key: String,
        /// The task, or `None` to remove it.
        value: Option<serde_json::Value>,
    },
}

/// What nodes may say about the tasks they host.
pub mod tasks {
    /// Fields a [`super::Command::ReportTask`] may set: the observed state, never the desired one.
    pub const REPORTED: &[&str] = &["state", "state_since_ms", "message", "exit_code", "health"];

    /// Largest standalone task record a node may write (its command line and environment).
    pub const MAX_STANDALONE: usize = 64 * 1024;

    /// The shape each reported field must have: a state or health is a short lower-case word,
    /// a time a number, an exit code a number or null, a message at most 4 KiB of text.
    pub fn check_reported(field: &str, v: &serde_json::Value) -> Result<(), String> {
        let word = |v: &serde_json::Value| {
            v.as_str().is_some_and(|s| {
                !s.is_empty()
                    && s.len() <= 32
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            })
        };
        let ok = match field {
            "state" => word(v),
            "health" => v.is_null() || word(v),
            "state_since_ms" => v.is_u64(),
            "exit_code" => v.is_null() || v.is_i64(),
            "message" => v.as_str().is_some_and(|s| s.len() <= 4096),
            _ => false,
        };
        if ok { Ok(()) } else { Err(format!("task field {field:?} has a malformed value {v}")) }
    }
}

/// What the state machine answers for one command.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandResponse {
    /// `Some(reason)` when the command was refused (and changed nothing).
    pub error: Option<String>,
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

fn owned_by(v: &serde_json::Value, node: NodeId) -> bool {
    v.get("node_id").and_then(|n| n.as_str()) == Some(node.to_string().as_str())
}

fn is_standalone(v: &serde_json::Value) -> bool {
    v.get("service_id").and_then(|s| s.as_str()).is_some_and(str::is_empty)
}

impl ClusterState {
    /// A service's name is its DNS name and a published port belongs to one service: both are
    /// decided here, so two concurrent creates that each checked first cannot both land.
    fn check_service_unique(&self, key: &str, value: &serde_json::Value) -> Result<(), String> {
        let Some(others) = self.entries.get(tables::SERVICES) else { return Ok(()) };
        // (port, protocol, whether host-mode): two host-mode ports of one number may both
        // exist (the scheduler keeps their tasks on different nodes); an ingress port is
        // every node's.
        let ports = |v: &serde_json::Value| -> Vec<(u64, String, bool)> {
            v.get("ports")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let host = p.get("host_mode").and_then(|h| h.as_bool()).unwrap_or(false);
                    let proto = p.get("protocol")?.as_str()?.to_owned();
                    Some((p.get("published")?.as_u64()?, proto, host))
                })
                .collect()
        };
        let clash = |a: &(u64, String, bool), b: &(u64, String, bool)| {
            a.0 == b.0 && a.1 == b.1 && !(a.2 && b.2)
        };
        let name = value.get("name").and_then(|v| v.as_str());
        let mine = ports(value);
        for (k, other) in others.iter().filter(|(k, _)| k.as_str() != key) {
            let other_name = other.get("name").and_then(|v| v.as_str()).unwrap_or(k);
            if name.is_some() && name == Some(other_name) {
                return Err(format!("service with name {other_name} already exists"));
            }
            if let Some((port, ..)) =
                ports(other).into_iter().find(|p| mine.iter().any(|m| clash(m, p)))
            {
                return Err(format!(
                    "port '{port}' is already in use by service '{other_name}' ({k})"
                ));
            }
        }
        Ok(())
    }

    /// Applies a command: validates, then changes; on error nothing changed.
    pub fn apply(&mut self, cmd: &Command, now_ms: u64) -> Result<Vec<ClusterEvent>, String> {
        if self.cluster.is_none() && !matches!(cmd, Command::Init { .. }) {
            return Err("the cluster is not initialised".into());
        }
        let mut ev = Vec::new();
        match cmd {
            Command::Init { info, node, keyring, ingress } => {
                if self.cluster.is_some() {
                    return Err("the cluster is already initialised".into());
                }
                self.cluster = Some(info.clone());
                self.nodes.insert(node.id, node.clone());
                self.keyring = keyring.clone();
                self.networks.insert(ingress.id.clone(), ingress.clone());
                ev.push(ClusterEvent::NodeAdded { id: node.id, hostname: node.hostname.clone() });
                ev.push(ClusterEvent::Keyring { version: keyring.version });
            }
            Command::AddNode(n) => {
                self.nodes.insert(n.id, n.clone());
                ev.push(ClusterEvent::NodeAdded { id: n.id, hostname: n.hostname.clone() });
            }
            Command::UpdateNode { id, availability, label_add, label_rm } => {
                let n = self.node_mut(*id)?;
                if let Some(a) = availability {
                    if n.availability != *a {
                        ev.push(ClusterEvent::NodeAvailability { id: *id, availability: *a });
                    }
                    n.availability = *a;
                }
                for k in label_rm {
                    n.labels.remove(k);
                }
                n.labels.extend(label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
                n.updated_ms = now_ms;
            }
            Command::SetRole { id, role } => {
                let n = self.node_mut(*id)?;
                if n.role != *role {
                    ev.push(ClusterEvent::NodeRole { id: *id, role: *role });
                }
                n.role = *role;
                n.updated_ms = now_ms;
            }
            Command::SetStatus { id, status, message } => {
                let n = self.node_mut(*id)?;
                if n.status != *status {
                    ev.push(ClusterEvent::NodeStatus {
                        id: *id,
                        hostname: n.hostname.clone(),
                        from: n.status,
                        to: *status,
                    });
                }
                n.status = *status;
                n.status_message = message.clone();
                n.updated_ms = now_ms;
            }
            Command::SetAddr { id, addr } => {
                let n = self.node_mut(*id)?;
                n.addr = *addr;
                n.updated_ms = now_ms;
            }
            Command::SetWgKey { id, key } => {
                let n = self.node_mut(*id)?;
                n.wg_public_key = Some(*key);
                n.updated_ms = now_ms;
            }
            Command::RemoveNode(id) => {
                if self.nodes.remove(id).is_none() {
                    return Err(format!("node {id} not found"));
                }
                ev.push(ClusterEvent::NodeRemoved { id: *id });
            }
            Command::SetJoinSecret { role, secret } => {
                let c = self.cluster.as_mut().ok_or("the cluster is not initialised")?;
                let old = match role {
                    Role::Worker => std::mem::replace(&mut c.worker_secret, *secret),
                    Role::Manager => std::mem::replace(&mut c.manager_secret, *secret),
                };
                c.retired_secrets.push(old);
                if c.retired_secrets.len() > 16 {
                    c.retired_secrets.remove(0);
                }
            }
            Command::Security(step) => {
                let c = self.cluster.as_mut().ok_or("the cluster is not initialised")?;
                crate::ca::apply(c, step)?;
            }
            Command::AddGossipKey(k) => {
                if self.keyring.keys.iter().any(|x| x.id == k.id) {
                    return Err(format!("gossip key {} already exists", k.id));
                }
                self.keyring.keys.push(k.clone());
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::SetPrimaryGossipKey(id) => {
                if !self.keyring.keys.iter().any(|x| x.id == *id) {
                    return Err(format!("gossip key {id} is not in the keyring"));
                }
                self.keyring.primary = *id;
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::RetireGossipKey(id) => {
                if self.keyring.primary == *id {
                    return Err(format!(
                        "gossip key {id} is the primary key and cannot be retired"
                    ));
                }
                let before = self.keyring.keys.len();
                self.keyring.keys.retain(|k| k.id != *id);
                if self.keyring.keys.len() == before {
                    return Err(format!("gossip key {id} is not in the keyring"));
                }
                self.keyring.version += 1;
                ev.push(ClusterEvent::Keyring { version: self.keyring.version });
            }
            Command::PutNetwork(n) => {
                // Decided here, not by the writer: two creates that read the same store and
                // picked the same subnet or VNI must not both land.
                for x in self.networks.values().filter(|x| x.id != n.id) {
                    if x.name == n.name {
                        return Err(format!("network with name {} already exists", n.name));
                    }
                    if x.vni == n.vni {
                        return Err(format!("VNI {} is already used by network {}", n.vni, x.name));
                    }
                    if x.subnet.contains(&n.subnet.network())
                        || n.subnet.contains(&x.subnet.network())
                    {
                        return Err(format!(
                            "subnet {} overlaps {} of network {}",
                            n.subnet, x.subnet, x.name
                        ));
                    }
                }
                self.networks.insert(n.id.clone(), n.clone());
            }
            Command::RemoveNetwork(id) => {
                if self.networks.remove(id).is_none() {
                    return Err(format!("network {id} not found"));
                }
            }
            Command::PutEntry { table, key, value } => {
                if table == tables::SERVICES {
                    self.check_service_unique(key, value)?;
                }
                self.entries.entry(table.clone()).or_default().insert(key.clone(), value.clone());
            }
            Command::ReportTask { owner, key, fields } => {
                if let Some(bad) = fields.keys().find(|f| !tasks::REPORTED.contains(&f.as_str())) {
                    return Err(format!("task field {bad:?} is not reported by nodes"));
                }
                for (k, v) in fields {
                    tasks::check_reported(k, v)?;
                }
                let entry = self
                    .entries
                    .get_mut(tables::TASKS)
                    .and_then(|t| t.get_mut(key))
                    .ok_or_else(|| format!("task {key} not found"))?;
                if !owned_by(entry, *owner) {
                    return Err(format!("task {key} is not assigned to node {owner}"));
                }
                let obj =
                    entry.as_object_mut().ok_or_else(|| format!("task {key} is malformed"))?;
                for (k, v) in fields {
                    obj.insert(k.clone(), v.clone());
                }
            }
            Command::PutStandalone { owner, key, value } => {
                if let Some(old) = self.entries.get(tables::TASKS).and_then(|t| t.get(key)) {
                    if !(owned_by(old, *owner) && is_standalone(old)) {
                        return Err(format!("task {key} is not a standalone task of node {owner}"));
                    }
                } else if value.is_none() {
                    return Err(format!("task {key} not found"));
                }
                if let Some(v) = value
                    && v.to_string().len() > tasks::MAX_STANDALONE
                {
                    return Err(format!(
                        "standalone task {key} is larger than {} bytes",
                        tasks::MAX_STANDALONE
                    ));
                }
                if let Some(v) = value
                    && !(owned_by(v, *owner) && is_standalone(v))
                {
                    return Err(format!(
                        "standalone task {key} must name node {owner} and no service"
                    ));
                }
                let table = self.entries.entry(tables::TASKS.to_owned()).or_default();
                match value {
                    Some(v) => {
                        table.insert(key.clone(), v.clone());
                    }
                    None => {
                        table.remove(key);
                    }
                }
                if table.is_empty() {
                    self.entries.remove(tables::TASKS);
                }
            }
            Command::DeleteEntry { table, key } => {
                let removed = self.entries.get_mut(table).and_then(|t| t.remove(key));
                if removed.is_none() {
                    return Err(format!("entry {table}/{key} not found"));
                }
                if self.entries.get(table).is_some_and(|t| t.is_empty()) {
                    self.entries.remove(table);
                }
            }
        }
        Ok(ev)
    }

    /// The entries of a table (empty if it has none).
    pub fn table(&self, table: &str) -> impl Iterator<Item = (&String, &serde_json::Value)> {
        self.entries.get(table).into_iter().flat_map(|t| t.iter())
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut NodeRecord, String> {
        self.nodes.get_mut(&id).ok_or_else(|| format!("node {id} not found"))
    }

    /// Finds a node by full id, unique id prefix or host name (as `docker node inspect` does).
    pub fn find_node(&self, what: &str) -> Result<&NodeRecord, String> {
        if let Ok(id) = what.parse::<NodeId>()
            && let Some(n) = self.nodes.get(&id)
        {
            return Ok(n);
        }
        let by_name: Vec<&NodeRecord> =
            self.nodes.values().filter(|n| n.hostname == what).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0]);
        }
        if by_name.len() > 1 {
            return Err(format!("node {what} is ambiguous ({} matches)", by_name.len()));
        }
        let by_prefix: Vec<&NodeRecord> = self
            .nodes
            .values()
            .filter(|n| !what.is_empty() && n.id.to_string().starts_with(what))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(format!("No such node: {what}")),
            k => Err(format!("node {what} is ambiguous ({k} matches)")),
        }
    }

    /// The managers (desired role).
    pub fn managers(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().filter(|n| n.role == Role::Manager)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn node(id: u64, name: &str, role: Role) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            hostname: name.into(),
            role,
            availability: Availability::Active,
            labels: BTreeMap::new(),
            addr: "127.0.0.1:2377".parse().expect("addr"),
            data_addr: "127.0.0.1".parse().expect("ip"),
            wg_public_key: None,
            status: NodeStatus::Ready,
            status_message: String::new(),
            engine_version: "0".into(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn init_state() -> ClusterState {
        let mut s = ClusterState::default();
        let info = ClusterInfo {
            id: "c".into(),
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            worker_secret: [1; 16],
            manager_secret: [2; 16],
            retired_secrets: vec![],
            default_addr_pool: vec!["10.0.0.0/8".parse().expect("net")],
            subnet_size: 24,
            data_path_port: 4789,
            created_ms: 0,
            security: Default::default(),
        };
        let ingress = NetworkRecord {
            id: "ing".into(),
            name: "ingress".into(),
            driver: "overlay".into(),
            subnet: "10.0.0.0/24".parse().expect("net"),
            gateway: "10.0.0.1".parse().expect("ip"),
            vni: 4096,
            ingress: true,
            attachable: false,
            encrypted: false,
            labels: BTreeMap::new(),
        };
        let keyring =
            Keyring { keys: vec![GossipKey { id: 1, key: [9; 32] }], primary: 1, version: 1 };
        s.apply(
            &Command::Init { info, node: node(1, "node1", Role::Manager), keyring, ingress },
            0,
        )
        .expect("init");
        s
    }

    #[test]
    fn node_ids_print_and_parse() {
        for v in [1u64, 42, u64::MAX] {
            let id = NodeId(v);
            assert_eq!(id.to_string().len(), 13);
            assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        }
        assert!("short".parse::<NodeId>().is_err());
    }

    #[test]
    fn subnets_vnis_and_service_names_are_decided_by_the_store() {
        let mut s = init_state();
        let net = |id: &str, name: &str, subnet: &str, vni: u32| NetworkRecord {
            id: id.into(),
            name: name.into(),
            driver: "overlay".into(),
            subnet: subnet.parse().expect("net"),
            gateway: "10.0.1.1".parse().expect("ip"),
            vni,
            ingress: false,
            attachable: true,
            encrypted: false,
            labels: BTreeMap::new(),
        };
        s.apply(&Command::PutNetwork(net("a", "a", "10.0.1.0/24", 4097)), 1).expect("first");
        let before = s.clone();
        // Two creates that read the same store: the second one's picks are refused.
        let same_subnet = s.apply(&Command::PutNetwork(net("b", "b", "10.0.1.0/24", 4098)), 2);
        assert!(same_subnet.unwrap_err().contains("overlaps"));
        let wider = s.apply(&Command::PutNetwork(net("b", "b", "10.0.0.0/16", 4098)), 2);
        assert!(wider.unwrap_err().contains("overlaps"));
        let same_vni = s.apply(&Command::PutNetwork(net("b", "b", "10.0.2.0/24", 4097)), 2);
        assert!(same_vni.unwrap_err().contains("VNI 4097"));
        assert_eq!(s, before);
        // Updating a network in place is no conflict with itself.
        s.apply(&Command::PutNetwork(net("a", "a", "10.0.1.0/24", 4097)), 3).expect("same id");

        let svc = |id: &str, name: &str| Command::PutEntry {
            table: tables::SERVICES.into(),
            key: id.into(),
            value: serde_json::json!({ "id": id, "name": name }),
        };
        s.apply(&svc("s1", "web"), 4).expect("first web");
        s.apply(&svc("s1", "web"), 5).expect("the same service again");
        let before = s.clone();
        assert!(s.apply(&svc("s2", "web"), 6).unwrap_err().contains("already exists"));
        assert_eq!(s, before);
        s.apply(&svc("s2", "api"), 7).expect("another name");
        let published = |id: &str, name: &str, port: u16| Command::PutEntry {
            table: tables::SERVICES.into(),
            key: id.into(),
            value: serde_json::json!({ "id": id, "name": name,
                "ports": [{ "published": port, "target": 80, "protocol": "tcp" }] }),
        };
        s.apply(&published("s3", "front", 8100), 8).expect("first on 8100");
        let e = s.apply(&published("s4", "other", 8100), 9).unwrap_err();
        assert!(e.contains("port '8100' is already in use by service 'front'"), "{e}");
        s.apply(&published("s3", "front", 8100), 10).expect("its own port again");
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = init_state();
        let before = s.clone();
        assert!(s.apply(&Command::RemoveNode(NodeId(99)), 1).is_err());
        assert!(s.apply(&Command::RetireGossipKey(1), 1).unwrap_err().contains("primary"));
        assert!(s.apply(&Command::SetPrimaryGossipKey(7), 1).is_err());
        assert!(
            s.apply(&Command::DeleteEntry { table: "services".into(), key: "x".into() }, 1)
                .is_err()
        );
        assert_eq!(s, before);
        let mut fresh = ClusterState::default();
        assert!(fresh.apply(&Command::AddNode(node(2, "n", Role::Worker)), 0).is_err());
        assert!(
            s.apply(
                &Command::Init {
                    info: before.cluster.clone().expect("info"),
                    node: node(3, "x", Role::Manager),
                    keyring: Keyring::default(),
                    ingress: before.networks["ing"].clone()
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn nodes_write_only_their_own_tasks() {
        let mut s = init_state();
        let (me, other) = (NodeId(1), NodeId(2));
        let task = |node: NodeId, service: &str| serde_json::json!({"node_id": node.to_string(), "service_id": service, "state": "new"});
        let put =
            |key: &str, value| PutEntry { table: tables::TASKS.into(), key: key.into(), value };
        use Command::PutEntry;
        s.apply(&put("svc-task", task(me, "svc1")), 1).expect("leader writes a service task");
        s.apply(&put("theirs", task(other, "svc1")), 1).expect("leader writes a service task");
        let before = s.clone();
        let fields = |k: &str, v: serde_json::Value| {
            let mut m = serde_json::Map::new();
            m.insert(k.into(), v);
            m
        };
        let report = |key: &str, fields| Command::ReportTask { owner: me, key: key.into(), fields };
        // Refused: another node's task, a missing task, a field nodes do not own.
        assert!(s.apply(&report("theirs", fields("state", "running".into())), 2).is_err());
        assert!(s.apply(&report("nope", fields("state", "running".into())), 2).is_err());
        let e = s.apply(&report("svc-task", fields("desired", "shutdown".into())), 2).unwrap_err();
        assert!(e.contains("desired"), "{e}");
        for (k, v) in [
            ("state", serde_json::json!("RUNNING; drop")),
            ("state", serde_json::json!(7)),
            ("state_since_ms", serde_json::json!("soon")),
            ("exit_code", serde_json::json!("x")),
            ("message", serde_json::json!("x".repeat(5000))),
        ] {
            let e = s.apply(&report("svc-task", fields(k, v)), 2).unwrap_err();
            assert!(e.contains("malformed"), "{k}: {e}");
        }
        // Standalone: only with no service, only for oneself, only over one's own standalone.
        let standalone =
            |owner, key: &str, value| Command::PutStandalone { owner, key: key.into(), value };
        assert!(s.apply(&standalone(me, "x", Some(task(me, "svc1"))), 2).is_err());
        assert!(s.apply(&standalone(me, "x", Some(task(other, ""))), 2).is_err());
        assert!(s.apply(&standalone(me, "svc-task", Some(task(me, ""))), 2).is_err());
        assert!(s.apply(&standalone(me, "absent", None), 2).is_err());
        let mut huge = task(me, "");
        huge["argv"] = serde_json::json!(["x".repeat(70_000)]);
        assert!(s.apply(&standalone(me, "big", Some(huge)), 2).unwrap_err().contains("larger"));
        assert_eq!(s, before, "refused writes changed the store");

        s.apply(&report("svc-task", fields("state", "running".into())), 3).expect("report");
        assert_eq!(s.entries[tables::TASKS]["svc-task"]["state"], "running");
        s.apply(&standalone(me, "run1", Some(task(me, ""))), 3).expect("run");
        assert!(s.apply(&standalone(other, "run1", None), 3).is_err(), "not theirs to remove");
        s.apply(&standalone(me, "run1", None), 3).expect("rm");
        assert!(!s.entries[tables::TASKS].contains_key("run1"));
    }

    #[test]
    fn status_change_emits_an_event_once() {
        let mut s = init_state();
        s.apply(&Command::AddNode(node(2, "node2", Role::Worker)), 1).expect("add");
        let ev = s
            .apply(
                &Command::SetStatus {
                    id: NodeId(2),
                    status: NodeStatus::Down,
                    message: "gossip".into(),
                },
                2,
            )
            .expect("down");
        assert_eq!(
            ev,
            vec![ClusterEvent::NodeStatus {
                id: NodeId(2),
                hostname: "node2".into(),
                from: NodeStatus::Ready,
                to: NodeStatus::Down
            }]
        );
        let ev = s
            .apply(
                &Command::SetStatus {
                    id: NodeId(2),
                    status: NodeStatus::Down,
                    message: "gossip".into(),
                },
                3,
            )
            .expect("down");
        assert!(ev.is_empty());
    }

    #[test]
    fn keyring_rotation_steps() {
        let mut s = init_state();
        s.apply(&Command::AddGossipKey(GossipKey { id: 2, key: [3; 32] }), 1).expect("add");
        s.apply(&Command::SetPrimaryGossipKey(2), 1).expect("primary");
        s.apply(&Command::RetireGossipKey(1), 1).expect("retire");
        assert_eq!(s.keyring.primary, 2);
        assert_eq!(s.keyring.keys.len(), 1);
        assert_eq!(s.keyring.version, 4);
    }

    #[test]
    fn find_node_by_name_id_and_prefix() {
        let mut s = init_state();
        s.apply(&Command::AddNode(node(2, "node2", Role::Worker)), 1).expect("add");
        assert_eq!(s.find_node("node2").expect("name").id, NodeId(2));
        assert_eq!(s.find_node(&NodeId(1).to_string()).expect("id").id, NodeId(1));
        assert_eq!(s.find_node("nope").unwrap_err(), "No such node: nope");
        // Both ids start with zeros: a short prefix is ambiguous.
        assert!(s.find_node("0").unwrap_err().contains("ambiguous"));
    }

    #[test]
    fn entries_and_labels() {
        let mut s = init_state();
        s.apply(
            &Command::PutEntry {
                table: tables::SERVICES.into(),
                key: "web".into(),
                value: serde_json::json!({"replicas": 3}),
            },
            1,
        )
        .expect("put");
        assert_eq!(s.entries[tables::SERVICES]["web"]["replicas"], 3);
        let mut add = BTreeMap::new();
        add.insert("zone".to_string(), "a".to_string());
        s.apply(
            &Command::UpdateNode {
                id: NodeId(1),
                availability: Some(Availability::Drain),
                label_add: add,
                label_rm: vec![],
            },
            1,
        )
        .expect("upd");
        assert_eq!(s.nodes[&NodeId(1)].labels["zone"], "a");
        assert_eq!(s.nodes[&NodeId(1)].availability, Availability::Drain);
    }
}
