//! Control-plane messages and their framing.
//!
//! One RPC is one QUIC bidirectional stream: the client writes one frame and finishes its side,
//! the server answers with one frame. A frame is a 4-byte big-endian body length followed by the
//! JSON body. Frames are length-limited (64 KiB from a client without a certificate, 32 MiB
//! otherwise); a short, long or malformed frame is a [`FrameError`] and is never acted on.

use std::net::{IpAddr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Availability, Command, Keyring, NodeId, NodeRecord, Role};
use crate::raft::TypeConfig;

/// Largest frame body accepted from a client that has no certificate (a joiner).
pub const MAX_ANON_FRAME: usize = 64 * 1024;
/// Largest frame body accepted from a cluster member (Raft snapshot chunks are the big ones).
pub const MAX_FRAME: usize = 32 * 1024 * 1024;

/// Why a frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than the 4 header bytes.
    #[error("control frame truncated: {0} bytes, the header alone is 4")]
    Truncated(usize),
    /// The header's length does not match the bytes that came.
    #[error("control frame length mismatch: header says {declared} bytes, got {actual}")]
    LengthMismatch {
        /// From the header.
        declared: usize,
        /// Received.
        actual: usize,
    },
    /// Over the limit.
    #[error("control frame too large: {len} bytes, limit {limit}")]
    TooLarge {
        /// Declared or received length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// Encodes a message as one frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our own types always serialise; an error here would be a bug, answered with an empty body
    // that the peer rejects as malformed.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes one complete frame, checking the header against the data and the limit first.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8], limit: usize) -> Result<T, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Truncated(buf.len()));
    }
    let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if declared > limit {
        return Err(FrameError::TooLarge { len: declared, limit });
    }
    let body = &buf[4..];
    if body.len() != declared {
        return Err(FrameError::LengthMismatch { declared, actual: body.len() });
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Who made a request, from its TLS client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    /// No certificate: only `Join` is allowed.
    Anonymous,
    /// A cluster member.
    Member {
        /// From the certificate's CN.
        node: NodeId,
        /// From the certificate's OU.
        role: Role,
    },
}

/// A request to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token (its secret picks the role).
    pub token: String,
    /// CSR for the joiner's key, PEM.
    pub csr_pem: String,
    /// Host name.
    pub hostname: String,
    /// The joiner's control address.
    pub addr: SocketAddr,
    /// The joiner's underlay address.
    pub data_addr: IpAddr,
    /// Agent version.
    pub engine_version: String,
}

/// What a joiner receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The id the cluster gave it.
    pub node: NodeId,
    /// The role its token granted.
    pub role: Role,
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The current gossip keyring.
    pub keyring: Keyring,
    /// Managers' control addresses.
    pub managers: Vec<SocketAddr>,
    /// Gossip seeds: underlay addresses of the nodes that are Ready.
    pub seeds: Vec<IpAddr>,
    /// VXLAN port of the cluster.
    pub data_path_port: u16,
}

/// A worker's (or manager's) periodic session with the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The role the store wants this node in.
    pub desired_role: Role,
    /// Whether this node is a Raft voter.
    pub voter: bool,
    /// Managers' control addresses.
    pub managers: Vec<SocketAddr>,
    /// The keyring.
    pub keyring: Keyring,
    /// The store's managers now: the only nodes whose direct requests this node answers.
    #[serde(default)]
    pub manager_ids: Vec<NodeId>,
    /// The CA certificates to trust, PEM, the one that signs first (two during a CA rotation).
    #[serde(default)]
    pub ca_pems: Vec<String>,
    /// The swarm's `--cert-expiry`, seconds.
    #[serde(default)]
    pub cert_expiry_secs: u64,
}

/// `node update`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUpdate {
    /// `--availability`.
    pub availability: Option<Availability>,
    /// `--label-add k=v`.
    pub label_add: Vec<(String, String)>,
    /// `--label-rm k`.
    pub label_rm: Vec<String>,
}

/// `MANAGER STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerStatus {
    /// The Raft leader.
    Leader,
    /// A voter the leader reaches.
    Reachable,
    /// A voter the leader does not reach (or a manager not yet in Raft).
    Unreachable,
}

impl std::fmt::Display for ManagerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ManagerStatus::Leader => "Leader",
            ManagerStatus::Reachable => "Reachable",
            ManagerStatus::Unreachable => "Unreachable",
        })
    }
}

/// A node as `node ls`/`node inspect` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// The stored record.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// `None` for workers.
    pub manager_status: Option<ManagerStatus>,
}

/// Requests only managers serve.
// Messages are built once per RPC and moved rarely; boxing the big variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ManageRequest {
    /// `node ls`.
    NodeList,
    /// `node inspect`.
    NodeInspect(String),
    /// `node update`.
    NodeUpdate {
        /// Node id, prefix or host name.
        node: String,
        /// The change.
        update: NodeUpdate,
    },
    /// `node promote`.
    Promote(String),
    /// `node demote`.
    Demote(String),
    /// `node rm`.
    NodeRm {
        /// Node.
        node: String,
        /// `--force`.
        force: bool,
    },
    /// `swarm join-token`.
    JoinToken {
        /// Which token.
        role: Role,
        /// `--rotate`.
        rotate: bool,
    },
    /// Leader-driven gossip key rotation.
    RotateGossipKey,
    /// `swarm update`.
    UpdateSwarm(crate::model::security::SwarmUpdate),
    /// `swarm ca [--rotate]`: the CA certificate (after rotating the CA), as a
    /// [`crate::ca::CaAnswer`] in a `Value`.
    Ca {
        /// `--rotate`.
        rotate: bool,
    },
    /// A promoted node with its manager certificate asks to become a Raft voter.
    JoinRaft,
    /// A raw store write (services, tasks, networks).
    Write(Command),
    /// The whole store (until there are finer reads).
    State,
}

/// The dispatcher: every node follows the store (as much of it as its role may see) to learn
/// its tasks and the networks and services around them, reports on the tasks it hosts, and keeps its standalone
/// (`shoal run`) tasks. Each write is checked against the caller's node id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskRequest {
    /// The store as the caller may see it (see [`crate::watch`]).
    State,
    /// The changes after the caller's position, as it may see them (a long poll: answered at
    /// once if the store has moved past the position, else as soon as it does or after a while
    /// with no changes).
    Watch(crate::watch::Position),
    /// Observed state of tasks the caller hosts, by task id.
    Report(Vec<(String, crate::model::TaskReport)>),
    /// Create, replace (`Some`) or remove (`None`) a standalone task on the caller.
    Standalone {
        /// Task id.
        key: String,
        /// The task record.
        value: Option<Box<crate::model::TaskRecord>>,
    },
}

/// Questions for one node, answered by the handler its agent registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// The output of a task this node runs, from position `since` on.
    TaskLogs {
        /// Task id.
        task: String,
        /// First position wanted (0: from the start of what is kept).
        since: u64,
    },
    /// What the node's data path looks like from inside: gossip view, WireGuard peers, the
    /// forwarding entries it programmed, mesh backends, DNS names (`node inspect --pretty`).
    Diagnostics,
}

/// Raft's own messages between managers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Append entries / heartbeat.
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    /// Vote.
    Vote(openraft::raft::VoteRequest<u64>),
    /// A snapshot chunk.
    Snapshot(openraft::raft::InstallSnapshotRequest<TypeConfig>),
}

/// Any request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Join with a token (the only request a client without a certificate may make).
    Join(JoinRequest),
    /// Periodic session: reports the keyring version held, gets role, managers and keyring.
    Heartbeat {
        /// The keyring version this node has installed.
        keyring_version: u64,
        /// This node's WireGuard public key, which the leader keeps in its node record.
        #[serde(default)]
        wg_public_key: Option<[u8; 32]>,
        /// The CAs this node trusts and the one that signed its certificate (CA rotation).
        #[serde(default)]
        ca: crate::ca::CaReport,
    },
    /// A new certificate for the caller's current desired role.
    RenewCert {
        /// CSR, PEM.
        csr_pem: String,
    },
    /// Gossip saw a member go up or down.
    MemberStatus {
        /// Which node.
        node: NodeId,
        /// Alive?
        up: bool,
    },
    /// The caller leaves the swarm.
    Leave,
    /// What any node (worker or manager) asks about tasks: the dispatcher's half of the API.
    Tasks(TaskRequest),
    /// What a manager asks one node directly (not the leader): things only that node has.
    Node(NodeRequest),
    /// Manager API.
    Manage(ManageRequest),
    /// Raft traffic.
    Raft(RaftRequest),
    /// A manager asks another whether it still has a live leader (pre-vote, see `failover`).
    Probe,
    /// A manager relays a request to the leader on behalf of `origin`.
    Forwarded {
        /// Who asked.
        origin: Caller,
        /// What.
        request: Box<Request>,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The caller or the serving node is not a manager.
    NotManager,
    /// The caller's certificate does not allow this.
    PermissionDenied,
    /// The token's secret is unknown.
    WrongToken,
    /// The token was valid before a rotation.
    RotatedToken,
    /// No such node.
    NotFound,
    /// Refused by a rule (quorum, last manager, …); nothing changed.
    Refused,
    /// A name or published port another record has; nothing changed.
    Conflict,
    /// There is no leader right now; retry.
    NoLeader,
    /// A malformed request.
    BadRequest,
    /// Something failed on the server.
    Internal,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    /// Category.
    pub kind: ErrorKind,
    /// Human-readable message.
    pub message: String,
}

/// Raft answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    /// To `Append`.
    Append(Result<openraft::raft::AppendEntriesResponse<u64>, openraft::error::RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>>),
    /// To `Snapshot`.
    Snapshot(
        Result<
            openraft::raft::InstallSnapshotResponse<u64>,
            openraft::error::RaftError<u64, openraft::error::InstallSnapshotError>,
        >,
    ),
}

/// Any answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// To `Join`.
    Joined(JoinResponse),
    /// To `Heartbeat`.
    Session(SessionInfo),
    /// To `RenewCert`.
    Cert {
        /// The new certificate, PEM.
        cert_pem: String,
    },
    /// To `NodeList`.
    Nodes(Vec<NodeView>),
    /// To `NodeInspect`.
    Node(NodeView),
    /// To `JoinToken`.
    Token(String),
    /// Done, with warnings to print (e.g. an even number of managers).
    Done {
        /// Warnings.
        warnings: Vec<String>,
    },
    /// To `State`.
    State(Box<crate::model::ClusterState>),
    /// To `Watch`.
    Delta(crate::watch::Delta),
    /// Raft.
    Raft(RaftResponse),
    /// To `Probe`: whether the answering manager has a live leader (or is one).
    Probe {
        /// It leads with a quorum, or an append from the leader reached it within the lease.
        leader_alive: bool,
    },
    /// To `Node`: whatever the node's handler answered.
    Value(serde_json::Value),
    /// Refused or failed.
    Error(RpcError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_errors() {
        let req = Request::MemberStatus { node: NodeId(5), up: true };
        let f = encode_frame(&req);
        let back: Request = decode_frame(&f, MAX_ANON_FRAME).expect("decode");
        assert!(matches!(back, Request::MemberStatus { node: NodeId(5), up: true }));
        assert_eq!(
            decode_frame::<Request>(&f[..3], MAX_FRAME).unwrap_err(),
            FrameError::Truncated(3)
        );
        assert!(matches!(
            decode_frame::<Request>(&f[..f.len() - 1], MAX_FRAME),
            Err(FrameError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode_frame::<Request>(&f, 4),
            Err(FrameError::TooLarge { limit: 4, .. })
        ));
        let mut bad = vec![0, 0, 0, 2];
        bad.extend_from_slice(b"{}");
        assert!(matches!(decode_frame::<Request>(&bad, MAX_FRAME), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn oversized_header_is_refused_before_reading_the_body() {
        let f = [0xff, 0xff, 0xff, 0xff, b'{'];
        assert_eq!(
            decode_frame::<Request>(&f, MAX_ANON_FRAME).unwrap_err(),
            FrameError::TooLarge { len: u32::MAX as usize, limit: MAX_ANON_FRAME }
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&bytes, MAX_ANON_FRAME);
            let _ = decode_frame::<Response>(&bytes, MAX_ANON_FRAME);
        }

        #[test]
        fn framed_json_garbage_is_malformed(body in "[ -~]{0,200}") {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body.as_bytes());
            if let Err(e) = decode_frame::<Request>(&f, MAX_ANON_FRAME) {
                prop_assert!(matches!(e, FrameError::Malformed(_)));
            }
        }

        #[test]
        fn member_status_roundtrips(id in any::<u64>(), up in any::<bool>()) {
            let f = encode_frame(&Request::MemberStatus { node: NodeId(id), up });
            let back: Request = decode_frame(&f, MAX_ANON_FRAME).expect("decode");
            let ok = matches!(back, Request::MemberStatus { node, up: u } if node == NodeId(id) && u == up);
            prop_assert!(ok);
        }
    }
}
