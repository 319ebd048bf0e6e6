//! shoal's control plane: what `swarm init/join/leave`, `join-token` and `node …` need.
//!
//! Layers, bottom up:
//! - [`base36`]: the text form of node ids and token parts, pure.
//! - [`token`]: join tokens (`SWMTKN-1-<CA digest>-<secret>`), pure.
//! - [`pki`]: the cluster CA (ECDSA P-256), CSRs, node certificates with the role in the OU and
//!   the node id in the CN, and the rustls configurations (mutual TLS; a pinned anonymous client
//!   for joiners).
//! - [`ca`]: certificate expiry (`--cert-expiry`), renewal and the steps of a CA rotation, pure.
//! - [`model`]: the replicated store's data model and its pure, validating apply logic.
//! - [`wire`]: RPC messages and length-limited framing (fuzzed).
//! - [`policy`]: the leader's decisions (missed heartbeats, keyring confirmations, quorum), pure.
//! - [`authz`]: who may send Raft messages and direct requests, and the refusal counters.
//! - [`watch`]: the per-node watch: a log of which entries each revision changed, the deltas a
//!   node receives (only what its role may see), and the node's mirror of them; pure.
//! - [`raft`]: openraft 0.9 storage on redb (log, vote, state machine, snapshots).
//! - [`failover`]: pre-vote and check-quorum on top of openraft's leader lease, pure.
//! - [`transport`]: QUIC (quinn) endpoint, RPC calls, and the Raft network over it.
//! - [`Cluster`]: the handle the agent drives. Inside it, owned parts over one shared node
//!   context: the leader's handlers and books, the RPC router (serving, authorization,
//!   forwarding to the leader), this node's session with the leader, and on managers Raft.
//!
//! ## How the agent drives it
//! - At start: [`Cluster::open`] with the data dir; `Some(cluster)` means this node is in a swarm
//!   (identity, role and, on managers, the Raft store are reloaded) and it is already serving.
//! - `swarm init`: [`Cluster::init`]; print [`Cluster::join_command`] for workers.
//! - `swarm join`: [`Cluster::join`] with the token and a manager's address.
//! - Feed gossip membership into [`Cluster::member_status`]; feed [`Cluster::gossip_keys`] (a
//!   watch of the keyring) into gossip; subscribe to [`Cluster::events`] for node changes.
//! - `node …`, `join-token`: the methods of the same names; each answers with typed data or an
//!   [`Error`] whose text is what the CLI prints.
//! - On agent exit: [`Cluster::shutdown`]. On `swarm leave`: [`Cluster::leave`].
//!
//! ## What it persists
//! Everything lives in `<data_dir>/swarm/` (the agent's data-dir lock covers it): `node.json`
//! (node id, host name, addresses, known managers, last keyring), `node-key.pem` (0600),
//! `node-cert.pem`, `ca.pem`, and on managers `raft.redb` (Raft log, vote, applied state machine,
//! snapshot). `leave` removes the directory. The agent persists nothing else for the control plane.
//!
//! ## Liveness
//! Every node holds a session with the leader (a heartbeat each [`Tuning::heartbeat`]); the leader
//! marks a node Down after 3 missed periods (6 right after a leader change) and Ready again when
//! it comes back. Gossip membership fed through [`Cluster::member_status`] also sets Ready/Down; a
//! Down set by gossip stays until gossip reports the member alive again.
//!
//! ## Handshake
//! Every node serves QUIC on its listen address with its node certificate, and presents the CA
//! after it in the chain. A client with a certificate must chain to the cluster CA (a foreign CA
//! fails the TLS handshake); a client without one (a joiner) is let in but may only call `Join`,
//! which the token's secret authorises; the joiner pins the CA by the token's digest, so it never
//! trusts on first use. Everything else is authorised by the node the caller's certificate names
//! and the role the store gives it now: a worker gets "This node is not a swarm manager…" from
//! every manager API. Managers that are not the leader forward to the leader. Raft messages and
//! direct requests are checked where they arrive (see [`authz`]). During a CA rotation a node
//! trusts both CAs (see [`ca`]); afterwards a certificate from the old one is refused.

#![forbid(unsafe_code)]

pub mod authz;
pub mod base36;
pub mod ca;
mod cluster;
pub mod failover;
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod pki;
pub mod policy;
pub mod raft;
#[doc(hidden)]
pub mod simulated;
pub mod token;
pub mod transport;
pub mod watch;
pub mod wire;

use std::path::PathBuf;
use std::time::Duration;

pub use cluster::{Cluster, InitOptions, JoinOptions, LocalInfo, NodeHandler, RaftStatus};
pub use model::{
    Availability, ClusterEvent, GossipKey, Keyring, NodeId, NodeRecord, NodeStatus, Role,
};
pub use token::{JoinToken, TokenError};
pub use wire::{ManagerStatus, NodeRequest, NodeUpdate, NodeView, TaskRequest};

/// Default control-plane port (udp).
pub const DEFAULT_CONTROL_PORT: u16 = 2377;
/// Default VXLAN port.
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;
/// Docker's message when a worker is asked to do a manager's job.
pub const NOT_MANAGER: &str = "This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager.";

/// Timings. [`Tuning::default`] keeps Swarm's 5 s session heartbeat but elects faster than
/// Swarm's 10 s so that a new leader is there within 5 s (measured 2.4–3.6 s on loopback with
/// 0.75–1.6 s election timeouts); [`Tuning::fast`] also shortens the session heartbeat, for tests
/// and the lab.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Session heartbeat period of every node to the leader (Swarm: 5 s).
    pub heartbeat: Duration,
    /// Raft heartbeat.
    pub raft_heartbeat: Duration,
    /// Raft election timeout lower bound (upper = 2×).
    pub raft_election_min: Duration,
    /// Take a snapshot after this many applied entries (Swarm: 10000).
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for slow followers (Swarm: 500).
    pub snapshot_keep: u64,
    /// Timeout of one control RPC.
    pub rpc_timeout: Duration,
    /// The leader replaces the gossip key this often (Swarm rotates its data-plane keys every
    /// 12 h); it also does so at once when a node is removed or demoted.
    pub gossip_key_rotation: Duration,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            heartbeat: Duration::from_secs(5),
            raft_heartbeat: Duration::from_millis(200),
            raft_election_min: Duration::from_millis(750),
            snapshot_every: 10_000,
            snapshot_keep: 500,
            rpc_timeout: Duration::from_secs(10),
            gossip_key_rotation: Duration::from_secs(12 * 3600),
        }
    }
}

impl Tuning {
    /// Short periods for tests and the lab: a new leader within 2 s (openraft waits out its
    /// leader lease, the election timeout's upper bound, before its election timeout: 0.6 s +
    /// 0.3–0.6 s here; pre-vote keeps a loaded machine's late heartbeats from deposing the
    /// leader, see `failover`).
    pub fn fast() -> Tuning {
        Tuning {
            heartbeat: Duration::from_millis(500),
            // Also openraft's timeout of one append: shorter fails appends on a busy machine.
            raft_heartbeat: Duration::from_millis(150),
            raft_election_min: Duration::from_millis(300),
            snapshot_every: 10_000,
            snapshot_keep: 500,
            rpc_timeout: Duration::from_secs(5),
            gossip_key_rotation: Duration::from_secs(12 * 3600),
        }
    }

    /// How long a request waits out a leader election (retrying while there is no leader):
    /// the lease, the longest election timeout, and as much again for a split vote; at least
    /// one RPC timeout, for elections that repeat on a loaded machine.
    pub fn failover_window(&self) -> Duration {
        (self.raft_election_min * 8).max(self.rpc_timeout)
    }

    fn manager_window(&self) -> Duration {
        (self.raft_heartbeat * 6).max(Duration::from_secs(2))
    }
}

/// Everything the control plane can refuse or fail with. The text is what the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token did not parse.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token's secret is not this swarm's worker or manager secret.
    #[error("{0}")]
    WrongToken(String),
    /// The token was rotated out.
    #[error("{0}")]
    RotatedToken(String),
    /// The manager's CA does not match the token's digest.
    #[error(
        "the join token is for a different swarm: the manager's CA certificate does not match the token's CA digest (nothing was changed)"
    )]
    CaMismatch,
    /// A worker asked for a manager's job.
    #[error("{0}")]
    NotManager(String),
    /// The certificate does not allow this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No such node.
    #[error("{0}")]
    NotFound(String),
    /// Refused by a rule; nothing changed.
    #[error("{0}")]
    Refused(String),
    /// A name or published port another record has; nothing changed.
    #[error("{0}")]
    Conflict(String),
    /// No leader now (an election is running or quorum is lost); retrying can help.
    #[error("{0}")]
    NoLeader(String),
    /// `init`/`join` on a node already in a swarm.
    #[error("this node is already part of a swarm (state in {0}); use `shoal swarm leave` first")]
    AlreadyInSwarm(PathBuf),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Certificates or TLS.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// Raft or its storage failed.
    #[error("cluster store: {0}")]
    Store(String),
    /// A peer could not be reached or answered nonsense.
    #[error(transparent)]
    Transport(#[from] transport::CallError),
    /// A malformed request or answer.
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl Error {
    /// Whether trying again later can help (leader elections, unreachable peers).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NoLeader(_) | Error::Transport(_))
    }
}
