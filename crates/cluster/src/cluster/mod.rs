//! The [`Cluster`] handle: init, join, restart, leave, the node API, liveness input and gossip
//! key rotation, over the transport, the identity and (on managers) Raft.
//!
//! The handle holds a set of owned parts; each owns its state and borrows what all share, the
//! [`Node`] (identity, local state, transport, the agent's channels, the manager's Raft parts):
//! - [`Leader`] (`leader`): the books a leader keeps and its handlers, with its certificate
//!   side [`Security`](security::Security) (`security`);
//! - [`Router`] (`rpc`): serving, the checks on who asks what, dispatching, routing to the
//!   leader, and this node's own requests;
//! - [`Session`] (`sessions`): the session with the leader and the mirror of the store (the
//!   managers' pre-vote probe loop lives beside it);
//! - [`ManagerParts`](manager::ManagerParts) (`manager`): Raft, the state machine and the
//!   pre-vote book while this node is a manager.
//!
//! `lifecycle` builds them (init, join, reopen, shutdown, leave) and runs their loops; `handle`
//! is what the agent asks of the handle, through them. Rooms import one way, down this list:
//! `lifecycle`, `sessions`, `rpc`, `leader`, `security`, `node`, `manager`, then `errors` and
//! `files`; `handle` imports only `errors`.

mod errors;
mod files;
mod handle;
mod leader;
mod lifecycle;
mod manager;
mod node;
mod rpc;
mod security;
mod sessions;

use self::leader::Leader;
use self::node::Node;
use self::rpc::Router;
use self::sessions::Session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::Tuning;
use crate::model::{NodeId, Role};
use crate::wire::NodeRequest;

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

/// Answers [`NodeRequest`]s for the agent (e.g. a task's logs from its runtime).
pub type NodeHandler = Arc<
    dyn Fn(
            NodeRequest,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send>,
        > + Send
        + Sync,
>;

/// The handle's parts; every loop holds the part it runs (see the module docs).
#[derive(Debug)]
struct Inner {
    node: Arc<Node>,
    leader: Arc<Leader>,
    router: Arc<Router>,
    session: Arc<Session>,
    /// The server and the loops, aborted at shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
