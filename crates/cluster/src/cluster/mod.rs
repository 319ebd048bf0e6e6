//! The [`Cluster`] handle: init, join, restart, leave, the node API, liveness input and gossip
//! key rotation, over the transport, the identity and (on managers) Raft.
//!
//! This file holds the shared types (the handle, its inner state, a manager's Raft parts, the
//! persisted local state) and small helpers; the rest is in rooms:
//! - [`lifecycle`]: init, join, reopen, shutdown, leave; starting and stopping Raft;
//! - [`handle`]: what the agent asks of the handle (node API, store, watch, task reports);
//! - [`rpc`]: serving and authorizing calls, routing them, sending this node's own requests;
//! - [`leader`]: the leader's handlers and its writes through Raft;
//! - [`sessions`]: the session, pre-vote and liveness loops.

mod books;
mod errors;
mod files;
mod handle;
mod leader;
mod lifecycle;
mod manager;
mod rpc;
mod sessions;

use self::books::{LeaderBooks, SessionBook};
use self::manager::ManagerParts;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::Tuning;
use crate::model::{ClusterEvent, Keyring, NodeId, Role};
use crate::pki::NodeIdentity;
use crate::transport::Transport;
use crate::wire::NodeRequest;

// Certificate settings, CA rotation and request authorization (see `ca`, `authz`).
mod security;

const SWARM_DIR: &str = "swarm";
const NODE_FILE: &str = "node.json";
const KEY_FILE: &str = "node-key.pem";
const CERT_FILE: &str = "node-cert.pem";
const CA_FILE: &str = "ca.pem";
const RAFT_FILE: &str = "raft.redb";
const HEARTBEAT_FAILURE: &str = "heartbeat failure";
const NO_LEADER: &str = "The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online.";

/// `swarm init` options.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The agent's data directory; the swarm state goes in `<data_dir>/swarm`.
    pub data_dir: PathBuf,
    /// This node's host name.
    pub hostname: String,
    /// Where the control plane listens (`--listen-addr`, default `0.0.0.0:2377`).
    pub listen_addr: SocketAddr,
    /// The control address other nodes use (`--advertise-addr`, port 2377 unless given).
    pub advertise_addr: SocketAddr,
    /// Underlay address for gossip and VXLAN (default: the advertise address's IP).
    pub data_addr: Option<IpAddr>,
    /// `--data-path-port` (default 4789).
    pub data_path_port: u16,
    /// `--default-addr-pool` (default 10.0.0.0/8).
    pub default_addr_pool: Vec<ipnet::IpNet>,
    /// `--default-addr-pool-mask-length` (default 24).
    pub subnet_size: u8,
    /// The agent's version, for `node ls` ENGINE VERSION.
    pub engine_version: String,
    /// `--cert-expiry`: validity of node certificates (default 90 days).
    pub cert_expiry: Duration,
    /// Timings.
    pub tuning: Tuning,
}

impl InitOptions {
    /// Options with Docker's defaults for everything but the data dir, host name and address.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        hostname: impl Into<String>,
        advertise_addr: SocketAddr,
    ) -> InitOptions {
        InitOptions {
            data_dir: data_dir.into(),
            hostname: hostname.into(),
            listen_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), advertise_addr.port()),
            advertise_addr,
            data_addr: None,
            data_path_port: crate::DEFAULT_DATA_PATH_PORT,
            default_addr_pool: vec![ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default(),
            )],
            subnet_size: 24,
            engine_version: env!("CARGO_PKG_VERSION").to_owned(),
            cert_expiry: crate::model::security::DEFAULT_CERT_EXPIRY,
            tuning: Tuning::default(),
        }
    }
}

/// `swarm join` options.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// This node's host name.
    pub hostname: String,
    /// Where this node's control plane listens.
    pub listen_addr: SocketAddr,
    /// This node's control address as others reach it.
    pub advertise_addr: SocketAddr,
    /// Underlay address (default: the advertise address's IP).
    pub data_addr: Option<IpAddr>,
    /// The agent's version.
    pub engine_version: String,
    /// The join token.
    pub token: String,
    /// A manager's control address (`HOST:2377`).
    pub remote: SocketAddr,
    /// Timings.
    pub tuning: Tuning,
}

impl JoinOptions {
    /// Options with defaults for the rest.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        hostname: impl Into<String>,
        advertise_addr: SocketAddr,
        token: impl Into<String>,
        remote: SocketAddr,
    ) -> JoinOptions {
        JoinOptions {
            data_dir: data_dir.into(),
            hostname: hostname.into(),
            listen_addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), advertise_addr.port()),
            advertise_addr,
            data_addr: None,
            engine_version: env!("CARGO_PKG_VERSION").to_owned(),
            token: token.into(),
            remote,
            tuning: Tuning::default(),
        }
    }
}

/// What this node knows about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalInfo {
    /// Node id.
    pub node: NodeId,
    /// Host name.
    pub hostname: String,
    /// Role in this node's certificate.
    pub role: Role,
    /// Whether this node runs Raft now.
    pub raft: bool,
    /// Raft leader as this node sees it (managers only).
    pub leader: Option<NodeId>,
    /// Known managers' control addresses.
    pub managers: Vec<SocketAddr>,
    /// The CA digest (base36), as in the join tokens.
    pub ca_digest: String,
    /// Control address.
    pub advertise_addr: SocketAddr,
    /// Where the control plane listens (`--listen-addr`).
    pub listen_addr: SocketAddr,
    /// Underlay address.
    pub data_addr: IpAddr,
    /// VXLAN port.
    pub data_path_port: u16,
}

/// Raft's state on a manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RaftStatus {
    /// Current leader (none while a leader has lost its quorum, see `failover`).
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Last applied log index.
    pub last_applied: Option<u64>,
    /// Last log index appended on this manager (applied lags it while entries commit).
    pub last_log: Option<u64>,
    /// Last snapshot's log index.
    pub snapshot: Option<u64>,
    /// Last purged log index (compaction).
    pub purged: Option<u64>,
}

/// The node's persisted local state (`<data_dir>/swarm/node.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalState {
    node: NodeId,
    hostname: String,
    listen_addr: SocketAddr,
    advertise_addr: SocketAddr,
    data_addr: IpAddr,
    engine_version: String,
    data_path_port: u16,
    managers: Vec<SocketAddr>,
    keyring: Keyring,
    /// The data path's WireGuard public key, sent with every heartbeat so the leader's node
    /// record (which peers believe) follows it.
    #[serde(default)]
    wg_public_key: Option<[u8; 32]>,
}

/// Answers [`NodeRequest`]s for the agent (e.g. a task's logs from its runtime).
pub type NodeHandler = Arc<
    dyn Fn(
            NodeRequest,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send>,
        > + Send
        + Sync,
>;

#[derive(Clone, Default)]
struct HandlerSlot(Option<NodeHandler>);

impl std::fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "NodeHandler" } else { "NoNodeHandler" })
    }
}

#[derive(Debug)]
struct Inner {
    node_handler: RwLock<HandlerSlot>,
    dir: PathBuf,
    tuning: Tuning,
    local: Mutex<LocalState>,
    identity: RwLock<NodeIdentity>,
    transport: Arc<Transport>,
    manager: RwLock<Option<Arc<ManagerParts>>>,
    events: broadcast::Sender<ClusterEvent>,
    keyring: watch::Sender<Keyring>,
    /// What this node keeps for when it leads (`leader`).
    leader: LeaderBooks,
    /// What this node's session with the leader keeps (`sessions`).
    session: SessionBook,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    refusals: crate::authz::Refusals,
    /// This node's copy of the store, as the leader's deltas build it.
    mirror: tokio::sync::Mutex<crate::watch::Mirror>,
}

/// A handle on this node's membership in a swarm. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn random_key() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut k = [0u8; 32];
    let _ = ring::rand::SystemRandom::new().fill(&mut k);
    k
}

fn random_hex(n: usize) -> String {
    let k = random_key();
    k.iter().take(n).map(|b| format!("{b:02x}")).collect()
}

impl Inner {
    fn local(&self) -> LocalState {
        match self.local.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn me(&self) -> NodeId {
        self.local().node
    }

    fn cert_role(&self) -> Role {
        self.identity.read().map(|i| i.info.role).unwrap_or(Role::Worker)
    }

    fn manager(&self) -> Option<Arc<ManagerParts>> {
        self.manager.read().ok().and_then(|m| m.clone())
    }

    /// Whether this node runs Raft as a voter.
    fn is_voter(&self) -> bool {
        let me = self.me().0;
        self.manager().is_some_and(|m| m.voters().contains(&me))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
