//! The [`Cluster`] handle: init, join, restart, leave, the node API, liveness input and gossip
//! key rotation, over the transport, the identity and (on managers) Raft.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::failover::{self, PreVote};
use crate::model::{
    ClusterEvent, ClusterInfo, ClusterState, Command, GossipKey, Keyring, NetworkRecord, NodeId,
    NodeRecord, NodeStatus, Role, now_ms,
};
use crate::pki::{ClusterCa, NodeIdentity, PinFailure, new_key_and_csr};
use crate::policy::{HeartbeatBook, even_warning, quorum_after_removal};
use crate::raft::{LogStore, PeerContacts, Raft, StateMachine, open_db, raft_config};
use crate::token::{JoinToken, new_secret, role_of_secret};
use crate::transport::{CallError, RaftNet, Transport, call_pinned};
use crate::wire::{
    Caller, ErrorKind, FrameError, JoinRequest, JoinResponse, MAX_ANON_FRAME, MAX_FRAME,
    ManageRequest, ManagerStatus, NodeRequest, NodeUpdate, NodeView, RaftRequest, RaftResponse,
    Request, Response, RpcError, SessionInfo, TaskRequest, decode_frame, encode_frame,
};
use crate::{Error, NOT_MANAGER, Tuning};

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

struct ManagerParts {
    raft: Raft,
    sm: StateMachine,
    contacts: PeerContacts,
    /// When an append from a current leader last reached this manager (pre-vote answers).
    leader_seen: Mutex<Option<Instant>>,
    /// The other voters' probe answers: whether this manager may campaign.
    prevote: Mutex<PreVote>,
}

impl std::fmt::Debug for ManagerParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagerParts")
    }
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
    book: Mutex<HeartbeatBook>,
    membership_lock: tokio::sync::Mutex<()>,
    rotation_lock: tokio::sync::Mutex<()>,
    reconcile_lock: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A handle on this node's membership in a swarm. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Writes a file of the swarm directory atomically. Every one of them is the node's own
/// (keys, certificates, the keyring in the node file), so all are 0600, in a 0700 directory.
fn write_file(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        f.write_all(data.as_bytes()).map_err(io_err(format!("writing {}", tmp.display())))?;
        f.sync_all().map_err(io_err(format!("syncing {}", tmp.display())))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", path.display())))
}

/// Creates the swarm directory (and the data dir above it) readable by root alone, and makes
/// an existing one so.
fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod 0700 {}", dir.display())))
}

fn read_file(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))
}

/// Waits (at most `timeout`) until the manager's store has applied past log index `after`;
/// returns the applied index then.
async fn wait_applied(m: &ManagerParts, after: u64, timeout: Duration) -> u64 {
    let mut metrics = m.raft.metrics();
    let applied = |m: &openraft::RaftMetrics<u64, BasicNode>| m.last_applied.map_or(0, |l| l.index);
    let _ = tokio::time::timeout(timeout, async {
        while applied(&metrics.borrow_and_update()) <= after {
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    applied(&metrics.borrow())
}

/// The store as `node` in `role` may read it: without the secrets only managers hold, and for a
/// worker without how other nodes' tasks run.
fn readable(s: ClusterState, node: NodeId, role: Role) -> ClusterState {
    match role {
        Role::Manager => crate::worker_view::without_secrets(s),
        Role::Worker => crate::worker_view::for_worker(s, node),
    }
}

fn rpc_err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(RpcError { kind, message: message.into() })
}

fn to_rpc(e: Error) -> Response {
    let kind = match &e {
        Error::Token(_) | Error::WrongToken(_) | Error::CaMismatch => ErrorKind::WrongToken,
        Error::RotatedToken(_) => ErrorKind::RotatedToken,
        Error::NotManager(_) => ErrorKind::NotManager,
        Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
        Error::NotFound(_) => ErrorKind::NotFound,
        Error::Refused(_) | Error::AlreadyInSwarm(_) => ErrorKind::Refused,
        Error::NoLeader(_) | Error::Transport(_) => ErrorKind::NoLeader,
        Error::BadRequest(_) | Error::Pki(_) => ErrorKind::BadRequest,
        Error::Io { .. } | Error::Store(_) => ErrorKind::Internal,
    };
    let message = match e {
        Error::PermissionDenied(m) => m,
        other => other.to_string(),
    };
    Response::Error(RpcError { kind, message })
}

fn from_rpc(e: RpcError) -> Error {
    match e.kind {
        ErrorKind::NotManager => Error::NotManager(e.message),
        ErrorKind::PermissionDenied => Error::PermissionDenied(e.message),
        ErrorKind::WrongToken => Error::WrongToken(e.message),
        ErrorKind::RotatedToken => Error::RotatedToken(e.message),
        ErrorKind::NotFound => Error::NotFound(e.message),
        ErrorKind::Refused => Error::Refused(e.message),
        ErrorKind::NoLeader => Error::NoLeader(e.message),
        ErrorKind::BadRequest => Error::BadRequest(e.message),
        ErrorKind::Internal => Error::Store(e.message),
    }
}

fn unexpected(r: &Response) -> Error {
    Error::BadRequest(format!(
        "unexpected answer: {}",
        match r {
            Response::Joined(_) => "Joined",
            Response::Session(_) => "Session",
            Response::Cert { .. } => "Cert",
            Response::Nodes(_) => "Nodes",
            Response::Node(_) => "Node",
            Response::Token(_) => "Token",
            Response::Done { .. } => "Done",
            Response::State(_) => "State",
            Response::StateAt { .. } => "StateAt",
            Response::Raft(_) => "Raft",
            Response::Value(_) => "Value",
            Response::Probe { .. } => "Probe",
            Response::Error(_) => "Error",
        }
    ))
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

impl Cluster {
    /// `swarm init`: creates the CA, this node's manager certificate, a Raft group of one, the
    /// gossip keyring and the `ingress` network, and starts serving.
    pub async fn init(opts: InitOptions) -> Result<Cluster, Error> {
        let dir = opts.data_dir.join(SWARM_DIR);
        if dir.join(NODE_FILE).exists() {
            return Err(Error::AlreadyInSwarm(dir));
        }
        let pool = opts
            .default_addr_pool
            .first()
            .copied()
            .ok_or_else(|| Error::BadRequest("--default-addr-pool is empty".into()))?;
        if opts.subnet_size < pool.prefix_len() || opts.subnet_size > pool.max_prefix_len() - 2 {
            return Err(Error::BadRequest(format!(
                "subnet size /{} does not fit the pool {pool}",
                opts.subnet_size
            )));
        }
        let ca = ClusterCa::generate()?;
        let node = NodeId::random();
        create_private_dir(&dir)?;
        let (key, csr) = new_key_and_csr()?;
        let cert = ca.sign_csr(&csr, node, Role::Manager)?;
        let identity = NodeIdentity::from_pem(key, cert, ca.cert_pem.clone())?;
        let keyring =
            Keyring { keys: vec![GossipKey { id: 1, key: random_key() }], primary: 1, version: 1 };
        let data_addr = opts.data_addr.unwrap_or(opts.advertise_addr.ip());
        let local = LocalState {
            node,
            hostname: opts.hostname.clone(),
            listen_addr: opts.listen_addr,
            advertise_addr: opts.advertise_addr,
            data_addr,
            engine_version: opts.engine_version.clone(),
            data_path_port: opts.data_path_port,
            managers: vec![opts.advertise_addr],
            keyring: keyring.clone(),
            wg_public_key: None,
        };
        let cluster = Cluster::start_fresh(&dir, local, identity, opts.tuning.clone())?;
        let result = async {
            let m = cluster.inner.start_raft().await?;
            let mut members = BTreeMap::new();
            members.insert(node.0, BasicNode::new(opts.advertise_addr.to_string()));
            m.raft.initialize(members).await.map_err(|e| Error::Store(e.to_string()))?;
            m.raft
                .wait(Some(opts.tuning.rpc_timeout * 2))
                .current_leader(node.0, "init")
                .await
                .map_err(|e| Error::Store(format!("waiting to become leader: {e}")))?;
            let subnet = ipnet::IpNet::new(pool.network(), opts.subnet_size)
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            let gateway = subnet.hosts().next().unwrap_or(subnet.network());
            let now = now_ms();
            let info = ClusterInfo {
                id: random_hex(12),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                worker_secret: new_secret(),
                manager_secret: new_secret(),
                retired_secrets: Vec::new(),
                default_addr_pool: opts.default_addr_pool.clone(),
                subnet_size: opts.subnet_size,
                data_path_port: opts.data_path_port,
                created_ms: now,
            };
            let record = NodeRecord {
                id: node,
                hostname: opts.hostname.clone(),
                role: Role::Manager,
                availability: crate::Availability::Active,
                labels: BTreeMap::new(),
                addr: opts.advertise_addr,
                data_addr,
                wg_public_key: None,
                status: NodeStatus::Ready,
                status_message: String::new(),
                engine_version: opts.engine_version.clone(),
                created_ms: now,
                updated_ms: now,
            };
            let ingress = NetworkRecord {
                id: random_hex(12),
                name: "ingress".into(),
                driver: "overlay".into(),
                subnet,
                gateway,
                vni: 4096,
                ingress: true,
                attachable: false,
                encrypted: false,
                labels: BTreeMap::new(),
            };
            cluster.inner.write(&m, Command::Init { info, node: record, keyring, ingress }).await
        }
        .await;
        if let Err(e) = result {
            cluster.shutdown().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        cluster.inner.spawn_loops();
        Ok(cluster)
    }

    /// `swarm join`: gets a certificate for a new key from a manager (authorised by the token,
    /// with the manager's CA pinned by the token's digest) and starts serving; a manager token
    /// also makes this node a Raft voter.
    pub async fn join(opts: JoinOptions) -> Result<Cluster, Error> {
        let dir = opts.data_dir.join(SWARM_DIR);
        if dir.join(NODE_FILE).exists() {
            return Err(Error::AlreadyInSwarm(dir));
        }
        let token = JoinToken::parse(&opts.token)?;
        let (key, csr) = new_key_and_csr()?;
        let data_addr = opts.data_addr.unwrap_or(opts.advertise_addr.ip());
        let req = Request::Join(JoinRequest {
            token: opts.token.trim().to_owned(),
            csr_pem: csr,
            hostname: opts.hostname.clone(),
            addr: opts.advertise_addr,
            data_addr,
            engine_version: opts.engine_version.clone(),
        });
        let jr: JoinResponse =
            match call_pinned(opts.remote, token.ca_digest, &req, opts.tuning.rpc_timeout).await {
                Ok(Response::Joined(j)) => j,
                Ok(Response::Error(e)) => return Err(from_rpc(e)),
                Ok(other) => return Err(unexpected(&other)),
                Err(CallError::Pin(PinFailure::DigestMismatch)) => return Err(Error::CaMismatch),
                Err(e) => return Err(e.into()),
            };
        let identity = NodeIdentity::from_pem(key, jr.cert_pem, jr.ca_pem)?;
        if identity.ca_digest()? != token.ca_digest {
            return Err(Error::CaMismatch);
        }
        create_private_dir(&dir)?;
        let local = LocalState {
            node: jr.node,
            hostname: opts.hostname,
            listen_addr: opts.listen_addr,
            advertise_addr: opts.advertise_addr,
            data_addr,
            engine_version: opts.engine_version,
            data_path_port: jr.data_path_port,
            managers: jr.managers,
            keyring: jr.keyring.clone(),
            wg_public_key: None,
        };
        let cluster = Cluster::start_fresh(&dir, local, identity, opts.tuning)?;
        cluster.inner.keyring.send_replace(jr.keyring);
        if jr.role == Role::Manager {
            // Becoming a voter can take a moment; the session loop retries if this fails.
            let _ = cluster.inner.reconcile_once().await;
        }
        cluster.inner.spawn_loops();
        Ok(cluster)
    }

    /// Restart: reloads this node's identity (and its Raft store on a manager) from the data dir
    /// and starts serving. `Ok(None)` when the node is not in a swarm.
    pub async fn open(data_dir: &Path, tuning: Tuning) -> Result<Option<Cluster>, Error> {
        let dir = data_dir.join(SWARM_DIR);
        let node_file = dir.join(NODE_FILE);
        if !node_file.exists() {
            return Ok(None);
        }
        let local: LocalState = serde_json::from_str(&read_file(&node_file)?)
            .map_err(|e| Error::Store(format!("{}: {e}", node_file.display())))?;
        let identity = NodeIdentity::from_pem(
            read_file(&dir.join(KEY_FILE))?,
            read_file(&dir.join(CERT_FILE))?,
            read_file(&dir.join(CA_FILE))?,
        )?;
        let keyring = local.keyring.clone();
        let has_raft = dir.join(RAFT_FILE).exists();
        let cluster = Cluster::start(dir, local, identity, tuning)?;
        cluster.inner.keyring.send_replace(keyring);
        if has_raft && let Err(e) = cluster.inner.start_raft().await {
            cluster.shutdown().await;
            return Err(e);
        }
        cluster.inner.spawn_loops();
        Ok(Some(cluster))
    }

    /// [`Cluster::start`] for a node entering a swarm: if it fails, the swarm directory it
    /// began to fill is removed, so the node stays outside any swarm.
    fn start_fresh(
        dir: &Path,
        local: LocalState,
        identity: NodeIdentity,
        tuning: Tuning,
    ) -> Result<Cluster, Error> {
        Cluster::start(dir.to_owned(), local, identity, tuning).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(dir);
        })
    }

    fn start(
        dir: PathBuf,
        local: LocalState,
        identity: NodeIdentity,
        tuning: Tuning,
    ) -> Result<Cluster, Error> {
        write_file(&dir.join(KEY_FILE), &identity.key_pem)?;
        write_file(&dir.join(CERT_FILE), &identity.cert_pem)?;
        write_file(&dir.join(CA_FILE), &identity.ca_pem)?;
        let transport = Arc::new(Transport::bind(local.listen_addr, &identity)?);
        let (events, _) = broadcast::channel(256);
        let (keyring, _) = watch::channel(Keyring::default());
        let inner = Arc::new(Inner {
            dir,
            tuning,
            local: Mutex::new(local),
            identity: RwLock::new(identity),
            transport,
            manager: RwLock::new(None),
            events,
            keyring,
            book: Mutex::new(HeartbeatBook::default()),
            membership_lock: tokio::sync::Mutex::new(()),
            rotation_lock: tokio::sync::Mutex::new(()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            node_handler: RwLock::new(HandlerSlot::default()),
            tasks: Mutex::new(Vec::new()),
        });
        inner.save_local()?;
        let server = tokio::spawn(serve(inner.clone()));
        if let Ok(mut t) = inner.tasks.lock() {
            t.push(server);
        }
        Ok(Cluster { inner })
    }

    /// Stops serving, Raft and the loops; the state stays on disk for [`Cluster::open`].
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> =
            self.inner.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.inner.stop_raft().await;
        self.inner.transport.close().await;
    }

    /// `swarm leave [--force]`. A manager is refused without `force` when it is the last one or
    /// its leaving would lose quorum. The swarm state is removed from the data dir.
    pub async fn leave(&self, force: bool) -> Result<(), Error> {
        // Hold the session off: it would otherwise renew this node's certificate for its new
        // role while the leave is in flight.
        let session = self.inner.reconcile_lock.lock().await;
        let r = self.inner.request(Request::Leave).await;
        match r {
            Err(e) if !force && self.inner.manager().is_some() => return Err(e),
            _ => {}
        }
        drop(session);
        self.shutdown().await;
        std::fs::remove_dir_all(&self.inner.dir)
            .map_err(io_err(format!("removing {}", self.inner.dir.display())))
    }

    /// `swarm join-token [--rotate] worker|manager`: the current token (after rotating it).
    pub async fn join_token(&self, role: Role, rotate: bool) -> Result<String, Error> {
        match self.inner.request(Request::Manage(ManageRequest::JoinToken { role, rotate })).await?
        {
            Response::Token(t) => Ok(t),
            r => Err(unexpected(&r)),
        }
    }

    /// The command `swarm init`/`join-token` print: `shoal swarm join --token T ADDR`.
    pub async fn join_command(&self, role: Role) -> Result<String, Error> {
        let token = self.join_token(role, false).await?;
        let addr = self.inner.local().advertise_addr;
        Ok(format!("shoal swarm join --token {token} {addr}"))
    }

    /// `node ls`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, Error> {
        match self.inner.request(Request::Manage(ManageRequest::NodeList)).await? {
            Response::Nodes(n) => Ok(n),
            r => Err(unexpected(&r)),
        }
    }

    /// `node inspect` (id, unique id prefix or host name).
    pub async fn node(&self, node: &str) -> Result<NodeView, Error> {
        match self
            .inner
            .request(Request::Manage(ManageRequest::NodeInspect(node.to_owned())))
            .await?
        {
            Response::Node(n) => Ok(n),
            r => Err(unexpected(&r)),
        }
    }

    /// `node update`.
    pub async fn node_update(&self, node: &str, update: NodeUpdate) -> Result<(), Error> {
        self.done(Request::Manage(ManageRequest::NodeUpdate { node: node.to_owned(), update }))
            .await
            .map(|_| ())
    }

    /// `node promote`; the answer holds warnings to print (e.g. an even number of managers).
    pub async fn promote(&self, node: &str) -> Result<Vec<String>, Error> {
        self.done(Request::Manage(ManageRequest::Promote(node.to_owned()))).await
    }

    /// `node demote`; refused for the last manager or when quorum would be lost.
    pub async fn demote(&self, node: &str) -> Result<Vec<String>, Error> {
        self.done(Request::Manage(ManageRequest::Demote(node.to_owned()))).await
    }

    /// `node rm [--force]`.
    pub async fn node_rm(&self, node: &str, force: bool) -> Result<(), Error> {
        self.done(Request::Manage(ManageRequest::NodeRm { node: node.to_owned(), force }))
            .await
            .map(|_| ())
    }

    /// Leader-driven gossip key rotation: a new key is distributed, made primary once every
    /// Ready node has it, and the old keys retired once every Ready node encrypts with it.
    /// Warnings name nodes that did not confirm in time.
    pub async fn rotate_gossip_key(&self) -> Result<Vec<String>, Error> {
        self.done(Request::Manage(ManageRequest::RotateGossipKey)).await
    }

    /// Liveness from gossip: `up` false marks the node Down (event `NodeStatus`), true Ready.
    pub async fn member_status(&self, node: NodeId, up: bool) -> Result<(), Error> {
        self.done(Request::MemberStatus { node, up }).await.map(|_| ())
    }

    /// A raw store write (services, tasks, networks, IP allocations).
    pub async fn write(&self, cmd: Command) -> Result<(), Error> {
        self.done(Request::Manage(ManageRequest::Write(cmd))).await.map(|_| ())
    }

    /// The whole store as the leader has it.
    pub async fn store(&self) -> Result<ClusterState, Error> {
        match self.inner.request(Request::Manage(ManageRequest::State)).await? {
            Response::State(s) => Ok(*s),
            r => Err(unexpected(&r)),
        }
    }

    /// Sets this node's WireGuard public key: the leader records it in the node's store record
    /// at the next heartbeat (sent at once when the key is new), and peers take it from there.
    pub async fn set_wg_public_key(&self, key: [u8; 32]) -> Result<(), Error> {
        let changed = match self.inner.local.lock() {
            Ok(mut l) => l.wg_public_key.replace(key) != Some(key),
            Err(p) => p.into_inner().wg_public_key.replace(key) != Some(key),
        };
        if changed {
            self.inner.save_local()?;
        }
        self.inner.reconcile_once().await
    }

    /// Registers what answers [`NodeRequest`]s from managers on this node.
    pub fn set_node_handler(&self, handler: Option<NodeHandler>) {
        *self.inner.node_handler.write().unwrap_or_else(|e| e.into_inner()) = HandlerSlot(handler);
    }

    /// Asks the node at control address `addr` (this node too) a [`NodeRequest`]; managers only.
    pub async fn ask_node(
        &self,
        addr: SocketAddr,
        req: NodeRequest,
    ) -> Result<serde_json::Value, Error> {
        if addr == self.inner.local().advertise_addr {
            return match self.inner.node_request(req).await? {
                Response::Value(v) => Ok(v),
                r => Err(unexpected(&r)),
            };
        }
        let timeout = self.inner.tuning.rpc_timeout;
        match self.inner.transport.call(addr, &Request::Node(req), timeout).await {
            Ok(Response::Value(v)) => Ok(v),
            Ok(Response::Error(e)) => Err(from_rpc(e)),
            Ok(r) => Err(unexpected(&r)),
            Err(e) => Err(Error::NoLeader(format!("cannot reach the node at {addr}: {e}"))),
        }
    }

    /// The store as the leader has it, secrets blanked: any node may read it (the dispatcher).
    pub async fn task_state(&self) -> Result<ClusterState, Error> {
        match self.inner.request(Request::Tasks(TaskRequest::State)).await? {
            Response::State(s) => Ok(*s),
            r => Err(unexpected(&r)),
        }
    }

    /// The store once the leader has applied more than `index`, with the index it reflects: a
    /// long poll (it may also come back unchanged after a while).
    pub async fn task_state_after(&self, index: u64) -> Result<(u64, ClusterState), Error> {
        match self.inner.request(Request::Tasks(TaskRequest::StateAfter { index })).await? {
            Response::StateAt { index, state } => Ok((index, *state)),
            r => Err(unexpected(&r)),
        }
    }

    /// Reports the observed state of tasks this node hosts; each is one store write, and a
    /// refused one (a task reassigned meanwhile) does not stop the others.
    pub async fn report_tasks(
        &self,
        reports: Vec<(String, serde_json::Map<String, serde_json::Value>)>,
    ) -> Result<(), Error> {
        self.done(Request::Tasks(TaskRequest::Report(reports))).await.map(|_| ())
    }

    /// Creates, replaces or (with `None`) removes a standalone task of this node.
    pub async fn put_standalone(
        &self,
        key: &str,
        value: Option<serde_json::Value>,
    ) -> Result<(), Error> {
        let req = TaskRequest::Standalone { key: key.to_owned(), value };
        self.done(Request::Tasks(req)).await.map(|_| ())
    }

    async fn done(&self, req: Request) -> Result<Vec<String>, Error> {
        match self.inner.request(req).await? {
            Response::Done { warnings } => Ok(warnings),
            r => Err(unexpected(&r)),
        }
    }

    /// The gossip keyring as a watch: feed it into gossip (every key decrypts, the primary encrypts).
    pub fn gossip_keys(&self) -> watch::Receiver<Keyring> {
        self.inner.keyring.subscribe()
    }

    /// Node events applied by this manager's store (none on workers).
    pub fn events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.events.subscribe()
    }

    /// This node's view of itself.
    pub fn info(&self) -> LocalInfo {
        let local = self.inner.local();
        let (role, digest) = match self.inner.identity.read() {
            Ok(i) => (
                i.info.role,
                i.ca_digest().map(|d| crate::token::encode_base36(&d, 50)).unwrap_or_default(),
            ),
            Err(_) => (Role::Worker, String::new()),
        };
        let m = self.inner.manager();
        LocalInfo {
            node: local.node,
            hostname: local.hostname,
            role,
            raft: m.is_some(),
            leader: m.and_then(|m| Inner::leader_of(&m)).map(|l| NodeId(l.0)),
            managers: local.managers,
            ca_digest: digest,
            advertise_addr: local.advertise_addr,
            listen_addr: local.listen_addr,
            data_addr: local.data_addr,
            data_path_port: local.data_path_port,
        }
    }

    /// Waits (at most `timeout`) until this manager's store has applied past log index `after`;
    /// returns the applied index then. On a worker it just waits and returns `after`.
    pub async fn applied_after(&self, after: u64, timeout: Duration) -> u64 {
        let Some(m) = self.inner.manager() else {
            tokio::time::sleep(timeout).await;
            return after;
        };
        wait_applied(&m, after, timeout).await
    }

    /// Raft's view on this node (`None` on a worker): for metrics and tests.
    pub fn raft_status(&self) -> Option<RaftStatus> {
        let m = self.inner.manager()?;
        let metrics = m.raft.metrics().borrow().clone();
        Some(RaftStatus {
            leader: Inner::leader_of(&m).map(|l| NodeId(l.0)),
            term: metrics.current_term,
            voters: metrics.membership_config.membership().voter_ids().map(NodeId).collect(),
            last_applied: metrics.last_applied.map(|l| l.index),
            last_log: metrics.last_log_index,
            snapshot: metrics.snapshot.map(|l| l.index),
            purged: metrics.purged.map(|l| l.index),
        })
    }

    /// The control-plane socket's bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.transport.local_addr()
    }

    /// Waits until this node runs Raft as a voter with a known leader (after init, a manager
    /// join or a promotion), up to `timeout`.
    pub async fn wait_voter(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.inner.manager() {
                let me = self.inner.local().node.0;
                let metrics = m.raft.metrics().borrow().clone();
                if metrics.current_leader.is_some()
                    && metrics.membership_config.membership().voter_ids().any(|v| v == me)
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader(format!(
                    "this node did not become a Raft voter within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve(inner: Arc<Inner>) {
    let Some(endpoint) = inner.transport.endpoint() else { return };
    while let Some(incoming) = endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "control handshake failed");
                    return;
                }
            };
            let caller = caller_of(&conn);
            while let Ok((send, recv)) = conn.accept_bi().await {
                let inner = inner.clone();
                tokio::spawn(async move { handle_stream(inner, caller, send, recv).await });
            }
        });
    }
}

fn caller_of(conn: &quinn::Connection) -> Caller {
    let Some(any) = conn.peer_identity() else { return Caller::Anonymous };
    let Ok(chain) = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>() else {
        return Caller::Anonymous;
    };
    match chain.first().map(|c| crate::pki::cert_info(c)) {
        Some(Ok(info)) => Caller::Member { node: info.node, role: info.role },
        // A certificate from our CA that is not a node certificate gets no rights.
        _ => Caller::Anonymous,
    }
}

/// The caller as the store knows it now: a node of the swarm, with the role the store gives it.
/// The certificate names the node, but its role is only what the node was when the certificate
/// was issued, and it outlives a removal or a demotion.
fn authorize(m: &ManagerParts, caller: Caller) -> Result<(NodeId, Role), Error> {
    let Caller::Member { node, .. } = caller else {
        return Err(Error::PermissionDenied("this request needs a cluster certificate".into()));
    };
    m.sm.with_state(|s| s.nodes.get(&node).map(|n| n.role)).map(|role| (node, role)).ok_or_else(
        || {
            Error::PermissionDenied(format!(
                "node {node} is not a member of this swarm (it was removed); join again"
            ))
        },
    )
}

async fn handle_stream(
    inner: Arc<Inner>,
    caller: Caller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limit = if caller == Caller::Anonymous { MAX_ANON_FRAME } else { MAX_FRAME };
    let resp = match recv.read_to_end(limit + 4).await {
        Ok(buf) => match decode_frame::<Request>(&buf, limit) {
            Ok(req) => inner.dispatch(caller, req).await,
            Err(e) => rpc_err(ErrorKind::BadRequest, e.to_string()),
        },
        Err(quinn::ReadToEndError::TooLong) => rpc_err(
            ErrorKind::BadRequest,
            FrameError::TooLarge { len: limit + 5, limit }.to_string(),
        ),
        Err(_) => return,
    };
    let _ = send.write_all(&encode_frame(&resp)).await;
    let _ = send.finish();
    let _ = send.stopped().await;
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

    fn save_local(&self) -> Result<(), Error> {
        let l = self.local();
        let text = serde_json::to_string_pretty(&l).map_err(|e| Error::Store(e.to_string()))?;
        write_file(&self.dir.join(NODE_FILE), &text)
    }

    fn manager(&self) -> Option<Arc<ManagerParts>> {
        self.manager.read().ok().and_then(|m| m.clone())
    }

    async fn start_raft(self: &Arc<Self>) -> Result<Arc<ManagerParts>, Error> {
        if let Some(m) = self.manager() {
            return Ok(m);
        }
        let path = self.dir.join(RAFT_FILE);
        // A previous instance in this process may still be letting go of the file.
        let mut tries = 0;
        let db = loop {
            match open_db(&path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(Error::Store(format!("opening {}: {e}", path.display()))),
            }
        };
        let sm = StateMachine::open(db.clone(), self.events.clone(), self.keyring.clone())
            .map_err(|e| Error::Store(e.to_string()))?;
        let contacts = PeerContacts::default();
        let net = RaftNet { transport: self.transport.clone(), contacts: contacts.clone() };
        let cfg = raft_config(&self.tuning).map_err(|e| Error::Store(e.to_string()))?;
        let raft = Raft::new(self.me().0, cfg, net, LogStore::new(db), sm.clone())
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        let parts = Arc::new(ManagerParts {
            raft,
            sm,
            contacts,
            leader_seen: Mutex::new(None),
            prevote: Mutex::new(PreVote::default()),
        });
        if let Ok(mut m) = self.manager.write() {
            *m = Some(parts.clone());
        }
        Ok(parts)
    }

    async fn stop_raft(&self) {
        let parts = self.manager.write().ok().and_then(|mut m| m.take());
        if let Some(p) = parts {
            let _ = p.raft.shutdown().await;
        }
    }

    fn spawn_loops(self: &Arc<Self>) {
        let session = tokio::spawn(session_loop(self.clone()));
        let liveness = tokio::spawn(liveness_loop(self.clone()));
        let probes = tokio::spawn(probe_loop(self.clone()));
        if let Ok(mut t) = self.tasks.lock() {
            t.push(session);
            t.push(liveness);
            t.push(probes);
        }
    }

    /// Whether this node runs Raft as a voter.
    fn is_voter(&self) -> bool {
        let me = self.me().0;
        self.manager().is_some_and(|m| {
            m.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == me)
        })
    }

    /// The Raft leader as this manager sees it; `None` while there is none, and on a leader that
    /// lost its quorum (check-quorum, see `failover`).
    fn leader_of(m: &ManagerParts) -> Option<(u64, Option<SocketAddr>)> {
        let metrics = m.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let voters = metrics.membership_config.membership().voter_ids().count();
        if leader == metrics.id
            && failover::deposed(voters, metrics.millis_since_quorum_ack, lease(&m.raft))
        {
            return None;
        }
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .and_then(crate::raft::node_addr);
        Some((leader, addr))
    }

    fn timeout_for(&self, req: &Request) -> Duration {
        match req {
            Request::Manage(ManageRequest::RotateGossipKey) => {
                self.tuning.rpc_timeout * 2 + self.tuning.heartbeat * 24
            }
            Request::Manage(ManageRequest::JoinRaft)
            | Request::Manage(ManageRequest::Demote(_))
            | Request::Leave => self.tuning.rpc_timeout * 5,
            Request::Forwarded { request, .. } => self.timeout_for(request),
            _ => self.tuning.rpc_timeout,
        }
    }

    /// A request from this node's own API: handled locally on a manager (which forwards to the
    /// leader), otherwise sent to a known manager.
    ///
    /// A leader election is ridden out: while there is no leader (or it cannot be reached), the
    /// request is tried again for up to [`Tuning::failover_window`]. Requests are reads or
    /// writes that set state, so sending one again after a dying leader took it is harmless (at
    /// worst a repeated `node rm` says the node is gone).
    async fn request(self: &Arc<Self>, req: Request) -> Result<Response, Error> {
        let deadline = Instant::now() + self.tuning.failover_window();
        loop {
            let r = match self.call_leader(req.clone()).await {
                Ok(Response::Error(e)) => Err(from_rpc(e)),
                r => r,
            };
            match r {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no leader; trying again");
                    tokio::time::sleep(self.tuning.raft_heartbeat).await;
                }
                r => return r,
            }
        }
    }

    async fn call_leader(self: &Arc<Self>, req: Request) -> Result<Response, Error> {
        // A node just demoted still runs Raft until its session notices, but its worker
        // certificate may no longer forward: it asks the managers as the worker it is.
        if self.manager().is_some() && self.cert_role() == Role::Manager {
            let caller = Caller::Member { node: self.me(), role: self.cert_role() };
            let r = self.dispatch(caller, req.clone()).await;
            // A manager that lost track of the leader (e.g. just demoted) asks the others; a
            // voter learns of the next leader itself (and `request` tries again), where asking
            // the others could mean waiting on the one that just died.
            // And a manager demoted in the store but not told yet may no longer forward: the
            // leader refuses it, and the others relay for it as for a worker.
            match &r {
                Response::Error(RpcError { kind: ErrorKind::NoLeader, .. }) if !self.is_voter() => {
                }
                Response::Error(RpcError { kind: ErrorKind::PermissionDenied, .. }) => {}
                _ => return Ok(r),
            }
        }
        let managers = self.local().managers;
        let own = self.local().advertise_addr;
        let mut last = Error::NoLeader("no manager is known to this node".into());
        let managers = self.transport.suspects_last(managers);
        for addr in managers.into_iter().filter(|a| *a != own) {
            match self.transport.call(addr, &req, self.timeout_for(&req)).await {
                // A manager still starting Raft (or just demoted) says it is not a manager; with a
                // manager certificate that is about the peer, not us: ask the next one.
                Ok(Response::Error(e))
                    if e.kind == ErrorKind::NoLeader
                        || (e.kind == ErrorKind::NotManager
                            && self.cert_role() == Role::Manager) =>
                {
                    last = from_rpc(e)
                }
                Ok(r) => return Ok(r),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    async fn dispatch(self: &Arc<Self>, caller: Caller, req: Request) -> Response {
        match (caller, req) {
            (Caller::Anonymous, Request::Join(j)) => self.route(caller, Request::Join(j)).await,
            (Caller::Anonymous, _) => rpc_err(
                ErrorKind::PermissionDenied,
                "a client without a cluster certificate may only join",
            ),
            (Caller::Member { role, .. }, Request::Raft(r)) => {
                if role != Role::Manager {
                    return rpc_err(
                        ErrorKind::PermissionDenied,
                        format!("a {role} certificate cannot take part in Raft"),
                    );
                }
                self.handle_raft(r).await
            }
            (
                Caller::Member { role: Role::Manager, .. },
                Request::Forwarded { origin, request },
            ) => {
                if matches!(*request, Request::Forwarded { .. } | Request::Raft(_)) {
                    return rpc_err(ErrorKind::BadRequest, "nested forwarding");
                }
                match self.manager() {
                    Some(m) if Inner::leader_of(&m).map(|l| l.0) == Some(self.me().0) => {
                        // The origin is the forwarder's word: only a current manager's counts.
                        match authorize(&m, caller) {
                            Ok((_, Role::Manager)) => {}
                            Ok(_) => {
                                return rpc_err(
                                    ErrorKind::PermissionDenied,
                                    "only managers forward requests",
                                );
                            }
                            Err(e) => return to_rpc(e),
                        }
                        self.handle_leader(&m, origin, *request).await
                    }
                    _ => rpc_err(
                        ErrorKind::NoLeader,
                        "leadership moved while the request was forwarded; retry",
                    ),
                }
            }
            (Caller::Member { role: Role::Manager, .. }, Request::Probe) => match self.manager() {
                Some(m) => Response::Probe { leader_alive: leader_alive(&m) },
                None => rpc_err(ErrorKind::NotManager, NOT_MANAGER),
            },
            (Caller::Member { .. }, Request::Probe) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers probe managers")
            }
            (Caller::Member { role: Role::Manager, .. }, Request::Node(r)) => {
                self.node_request(r).await.unwrap_or_else(to_rpc)
            }
            (Caller::Member { .. }, Request::Node(_)) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers ask nodes directly")
            }
            (Caller::Member { .. }, Request::Forwarded { .. }) => {
                rpc_err(ErrorKind::PermissionDenied, "only managers forward requests")
            }
            (Caller::Member { role, .. }, req) => {
                if role == Role::Worker && matches!(req, Request::Manage(_)) {
                    return rpc_err(ErrorKind::NotManager, NOT_MANAGER);
                }
                self.route(caller, req).await
            }
        }
    }

    async fn route(self: &Arc<Self>, caller: Caller, req: Request) -> Response {
        let Some(m) = self.manager() else {
            // Only a peer gets here (a node's own requests go straight to the managers when it
            // runs no Raft): the caller should ask another manager.
            return rpc_err(
                ErrorKind::NoLeader,
                "this node does not run Raft (yet); ask another manager",
            );
        };
        match Inner::leader_of(&m) {
            Some((l, _)) if l == self.me().0 => self.handle_leader(&m, caller, req).await,
            Some((leader, Some(addr))) => {
                let timeout = self.timeout_for(&req);
                let fwd = Request::Forwarded { origin: caller, request: Box::new(req) };
                // A leader that dies holds a forwarded request until its timeout; give up on it
                // as soon as Raft has moved on, so the caller can retry with the new leader.
                let mut metrics = m.raft.metrics();
                let moved = async {
                    loop {
                        if metrics.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        if metrics.borrow().current_leader != Some(leader) {
                            return;
                        }
                    }
                };
                tokio::select! {
                    r = self.transport.call(addr, &fwd, timeout) => match r {
                        Ok(r) => r,
                        Err(e) => {
                            rpc_err(ErrorKind::NoLeader, format!("cannot reach the leader: {e}"))
                        }
                    },
                    () = moved => rpc_err(
                        ErrorKind::NoLeader,
                        "the leader changed while the request was forwarded; retry",
                    ),
                }
            }
            _ => rpc_err(ErrorKind::NoLeader, NO_LEADER),
        }
    }

    async fn node_request(&self, r: NodeRequest) -> Result<Response, Error> {
        let handler = self.node_handler.read().unwrap_or_else(|e| e.into_inner()).0.clone();
        let Some(h) = handler else {
            return Err(Error::BadRequest("this node answers no node requests".into()));
        };
        h(r).await.map(Response::Value).map_err(Error::BadRequest)
    }

    async fn handle_raft(&self, r: RaftRequest) -> Response {
        let Some(m) = self.manager() else { return rpc_err(ErrorKind::NotManager, NOT_MANAGER) };
        Response::Raft(match r {
            RaftRequest::Append(a) => {
                let r = m.raft.append_entries(a).await;
                // Anything but a higher vote means the sender is the current leader.
                if matches!(&r, Ok(resp) if !matches!(resp, AppendEntriesResponse::HigherVote(_))) {
                    *lock(&m.leader_seen) = Some(Instant::now());
                }
                RaftResponse::Append(r)
            }
            RaftRequest::Vote(v) => RaftResponse::Vote(m.raft.vote(v).await),
            RaftRequest::Snapshot(s) => RaftResponse::Snapshot(m.raft.install_snapshot(s).await),
        })
    }

    async fn write(&self, m: &ManagerParts, cmd: Command) -> Result<(), Error> {
        let Ok(res) = tokio::time::timeout(self.tuning.rpc_timeout, m.raft.client_write(cmd)).await
        else {
            return Err(Error::NoLeader(format!(
                "the change was not committed within {:?}: too few managers are reachable (it may still apply once they are back)",
                self.tuning.rpc_timeout
            )));
        };
        match res {
            Ok(resp) => match resp.data.error {
                Some(e) => Err(Error::Refused(e)),
                None => Ok(()),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Error::NoLeader("leadership changed; retry".into()))
            }
            // A leader shutting down (agent restart): the next leader takes the retry.
            Err(RaftError::Fatal(openraft::error::Fatal::Stopped)) => {
                Err(Error::NoLeader("the leader is shutting down; retry".into()))
            }
            Err(e) => Err(Error::Store(e.to_string())),
        }
    }

    async fn handle_leader(
        self: &Arc<Self>,
        m: &Arc<ManagerParts>,
        caller: Caller,
        req: Request,
    ) -> Response {
        if let Request::Join(j) = req {
            return self.leader_join(m, j).await.unwrap_or_else(to_rpc);
        }
        let (n, role) = match authorize(m, caller) {
            Ok(who) => who,
            Err(e) => return to_rpc(e),
        };
        let r = match req {
            Request::Heartbeat { keyring_version, wg_public_key } => {
                self.leader_heartbeat(m, n, keyring_version, wg_public_key).await
            }
            Request::RenewCert { csr_pem } => self.leader_renew(m, n, &csr_pem),
            // Liveness moves tasks, so only managers (whose gossip sees every member) report it.
            Request::MemberStatus { .. } | Request::Manage(_) if role != Role::Manager => {
                Err(Error::NotManager(NOT_MANAGER.into()))
            }
            Request::MemberStatus { node, up } => self.leader_member_status(m, node, up).await,
            Request::Leave => self.leader_leave(m, n).await,
            Request::Manage(req) => self.leader_manage(m, n, req).await,
            Request::Tasks(req) => self.leader_tasks(m, n, role, req).await,
            Request::Join(_)
            | Request::Node(_)
            | Request::Raft(_)
            | Request::Probe
            | Request::Forwarded { .. } => {
                Err(Error::BadRequest("this request is not for the leader".into()))
            }
        };
        r.unwrap_or_else(to_rpc)
    }

    async fn leader_tasks(
        &self,
        m: &ManagerParts,
        node: NodeId,
        role: Role,
        req: TaskRequest,
    ) -> Result<Response, Error> {
        match req {
            TaskRequest::State => Ok(Response::State(Box::new(readable(m.sm.state(), node, role)))),
            TaskRequest::StateAfter { index } => {
                // Half the RPC timeout, so the answer always beats the caller's deadline; the
                // state is read after the index, so it is at least as new as the index says.
                let index = wait_applied(m, index, self.tuning.rpc_timeout / 2).await;
                let state = readable(m.sm.state(), node, role);
                Ok(Response::StateAt { index, state: Box::new(state) })
            }
            TaskRequest::Report(reports) => {
                let mut refused = Vec::new();
                for (key, fields) in reports {
                    let cmd = Command::ReportTask { owner: node, key, fields };
                    if let Err(e) = self.write(m, cmd).await {
                        refused.push(e.to_string());
                    }
                }
                Ok(Response::Done { warnings: refused })
            }
            TaskRequest::Standalone { key, value } => {
                self.write(m, Command::PutStandalone { owner: node, key, value }).await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
        }
    }

    fn voters(m: &ManagerParts) -> BTreeSet<u64> {
        m.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// Control addresses of the Raft voters (the managers that can answer).
    fn manager_addrs(m: &ManagerParts) -> Vec<SocketAddr> {
        let metrics = m.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|v| membership.get_node(&v).and_then(crate::raft::node_addr))
            .collect()
    }

    async fn leader_join(&self, m: &ManagerParts, j: JoinRequest) -> Result<Response, Error> {
        let token = JoinToken::parse(&j.token)?;
        let state = m.sm.state();
        let info = state
            .cluster
            .as_ref()
            .ok_or_else(|| Error::NoLeader("the swarm is still initialising".into()))?;
        let ca = ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)?;
        if token.ca_digest != ca.digest() {
            return Err(Error::WrongToken(
                "invalid join token: it names a different swarm's CA (digest mismatch)".into(),
            ));
        }
        let role = match role_of_secret(&token.secret, &info.worker_secret, &info.manager_secret) {
            Some(r) => r,
            None if info.retired_secrets.contains(&token.secret) => {
                return Err(Error::RotatedToken(
                    "the join token has been rotated out and is no longer valid; get the current one with `shoal swarm join-token worker|manager` on a manager".into(),
                ));
            }
            None => return Err(Error::WrongToken("invalid join token: its secret matches neither this swarm's worker nor manager token".into())),
        };
        if j.hostname.is_empty() || j.hostname.len() > 253 {
            return Err(Error::BadRequest("the host name must be 1 to 253 characters".into()));
        }
        let id = NodeId::random();
        let cert_pem = ca
            .sign_csr(&j.csr_pem, id, role)
            .map_err(|e| Error::BadRequest(format!("certificate signing request refused: {e}")))?;
        let now = now_ms();
        let record = NodeRecord {
            id,
            hostname: j.hostname,
            role,
            availability: crate::Availability::Active,
            labels: BTreeMap::new(),
            addr: j.addr,
            data_addr: j.data_addr,
            wg_public_key: None,
            status: NodeStatus::Ready,
            status_message: "joined".into(),
            engine_version: j.engine_version,
            created_ms: now,
            updated_ms: now,
        };
        self.write(m, Command::AddNode(record)).await?;
        if let Ok(mut b) = self.book.lock() {
            b.handle_join(Instant::now(), id);
        }
        let state = m.sm.state();
        Ok(Response::Joined(JoinResponse {
            node: id,
            role,
            cert_pem,
            ca_pem: info.ca_cert_pem.clone(),
            keyring: state.keyring.clone(),
            managers: Inner::manager_addrs(m),
            seeds: state
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Ready && n.id != id)
                .map(|n| n.data_addr)
                .collect(),
            data_path_port: info.data_path_port,
        }))
    }

    async fn leader_heartbeat(
        &self,
        m: &ManagerParts,
        node: NodeId,
        version: u64,
        wg_public_key: Option<[u8; 32]>,
    ) -> Result<Response, Error> {
        let state = m.sm.state();
        let rec = state.nodes.get(&node).ok_or_else(|| {
            Error::NotFound(format!("node {node} is not part of this swarm (it was removed)"))
        })?;
        // The caller is the node the record is about (its certificate says so, `authorize`
        // checked it is still a member): its own word on its own key is what peers trust.
        if let Some(key) = wg_public_key
            && rec.wg_public_key != Some(key)
        {
            self.write(m, Command::SetWgKey { id: node, key }).await?;
        }
        if let Ok(mut b) = self.book.lock() {
            b.handle_heartbeat(Instant::now(), node, version);
        }
        let back = rec.status == NodeStatus::Unknown
            || (rec.status == NodeStatus::Down && rec.status_message == HEARTBEAT_FAILURE);
        if back {
            self.write(
                m,
                Command::SetStatus {
                    id: node,
                    status: NodeStatus::Ready,
                    message: "heartbeat".into(),
                },
            )
            .await?;
        }
        Ok(Response::Session(SessionInfo {
            desired_role: rec.role,
            voter: Inner::voters(m).contains(&node.0),
            managers: Inner::manager_addrs(m),
            keyring: state.keyring.clone(),
        }))
    }

    fn leader_renew(&self, m: &ManagerParts, node: NodeId, csr: &str) -> Result<Response, Error> {
        let state = m.sm.state();
        let rec = state
            .nodes
            .get(&node)
            .ok_or_else(|| Error::NotFound(format!("node {node} is not part of this swarm")))?;
        let info = state
            .cluster
            .as_ref()
            .ok_or_else(|| Error::NoLeader("the swarm is still initialising".into()))?;
        let ca = ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)?;
        let cert_pem = ca
            .sign_csr(csr, node, rec.role)
            .map_err(|e| Error::BadRequest(format!("certificate signing request refused: {e}")))?;
        Ok(Response::Cert { cert_pem })
    }

    async fn leader_member_status(
        &self,
        m: &ManagerParts,
        node: NodeId,
        up: bool,
    ) -> Result<Response, Error> {
        let state = m.sm.state();
        let rec = state
            .nodes
            .get(&node)
            .ok_or_else(|| Error::NotFound(format!("node {node} not found")))?;
        let status = if up { NodeStatus::Ready } else { NodeStatus::Down };
        if rec.status != status {
            let message = if up { "gossip: member alive" } else { "gossip: member down" };
            self.write(m, Command::SetStatus { id: node, status, message: message.into() }).await?;
        }
        Ok(Response::Done { warnings: Vec::new() })
    }

    /// Refuses removing `target` from the voters when that would lose quorum.
    fn check_quorum_after_removal(
        &self,
        m: &ManagerParts,
        target: u64,
        what: &str,
    ) -> Result<(), Error> {
        let voters = Inner::voters(m);
        let me = self.me().0;
        let now = Instant::now();
        let window = self.tuning.manager_window();
        quorum_after_removal(&voters, target, |v| v == me || m.contacts.reachable(v, now, window)).map_err(|q| {
            Error::Refused(format!(
                "{what} would result in a loss of quorum: {} of the {} remaining managers are reachable, {} needed (nothing was changed)",
                q.reachable, q.remaining, q.need
            ))
        })
    }

    async fn remove_voter(&self, m: &ManagerParts, id: u64) -> Result<(), Error> {
        if !Inner::voters(m).contains(&id) {
            return Ok(());
        }
        let mut set = BTreeSet::new();
        set.insert(id);
        let change = m.raft.change_membership(ChangeMembers::RemoveVoters(set), false);
        match tokio::time::timeout(self.tuning.rpc_timeout * 2, change).await {
            Ok(r) => r.map(|_| ()).map_err(|e| Error::Store(format!("removing a Raft voter: {e}"))),
            Err(_) => Err(Error::NoLeader(
                "removing the Raft voter was not committed in time: too few managers are reachable"
                    .into(),
            )),
        }
    }

    async fn leader_leave(&self, m: &ManagerParts, node: NodeId) -> Result<Response, Error> {
        let _g = self.membership_lock.lock().await;
        let state = m.sm.state();
        let rec = state
            .nodes
            .get(&node)
            .ok_or_else(|| Error::NotFound(format!("node {node} not found")))?
            .clone();
        if rec.role == Role::Manager {
            if state.managers().count() <= 1 {
                return Err(Error::Refused("You are attempting to leave the swarm on a node that is participating as a manager. Removing the last manager erases all current state of the swarm. Use `--force` to ignore this message.".into()));
            }
            self.check_quorum_after_removal(m, node.0, "leaving the swarm")?;
            self.write(m, Command::SetRole { id: node, role: Role::Worker }).await?;
            if let Err(e) = self.remove_voter(m, node.0).await {
                let _ = self.write(m, Command::SetRole { id: node, role: Role::Manager }).await;
                return Err(e);
            }
        }
        // The leader may have just removed itself; a follower would refuse this write.
        if let Err(e) = self
            .write(
                m,
                Command::SetStatus {
                    id: node,
                    status: NodeStatus::Down,
                    message: "node left the swarm".into(),
                },
            )
            .await
        {
            tracing::debug!(error = %e, "marking a leaving node down");
        }
        Ok(Response::Done { warnings: Vec::new() })
    }

    async fn leader_manage(
        self: &Arc<Self>,
        m: &ManagerParts,
        caller: NodeId,
        req: ManageRequest,
    ) -> Result<Response, Error> {
        match req {
            ManageRequest::NodeList => {
                let state = m.sm.state();
                Ok(Response::Nodes(state.nodes.values().map(|n| self.view(m, n)).collect()))
            }
            ManageRequest::NodeInspect(what) => {
                let state = m.sm.state();
                let n = state.find_node(&what).map_err(Error::NotFound)?;
                Ok(Response::Node(self.view(m, n)))
            }
            ManageRequest::NodeUpdate { node, update } => {
                let state = m.sm.state();
                let n = state.find_node(&node).map_err(Error::NotFound)?;
                for (k, _) in &update.label_add {
                    if k.is_empty() {
                        return Err(Error::BadRequest("a label key must not be empty".into()));
                    }
                }
                self.write(
                    m,
                    Command::UpdateNode {
                        id: n.id,
                        availability: update.availability,
                        label_add: update.label_add.into_iter().collect(),
                        label_rm: update.label_rm,
                    },
                )
                .await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::Promote(what) => {
                let _g = self.membership_lock.lock().await;
                let state = m.sm.state();
                let n = state.find_node(&what).map_err(Error::NotFound)?;
                if n.role == Role::Manager {
                    return Ok(Response::Done {
                        warnings: vec![format!("Node {} is already a manager.", n.hostname)],
                    });
                }
                self.write(m, Command::SetRole { id: n.id, role: Role::Manager }).await?;
                let count = state.managers().count() + 1;
                Ok(Response::Done { warnings: even_warning(count).into_iter().collect() })
            }
            ManageRequest::Demote(what) => {
                let _g = self.membership_lock.lock().await;
                let state = m.sm.state();
                let n = state.find_node(&what).map_err(Error::NotFound)?.clone();
                if n.role == Role::Worker {
                    return Ok(Response::Done {
                        warnings: vec![format!("Node {} is already a worker.", n.hostname)],
                    });
                }
                let count = state.managers().count();
                if count <= 1 {
                    return Err(Error::Refused(format!(
                        "can't demote {}: attempting to demote the last manager of the swarm (nothing was changed)",
                        n.hostname
                    )));
                }
                self.check_quorum_after_removal(m, n.id.0, &format!("demoting {}", n.hostname))?;
                self.write(m, Command::SetRole { id: n.id, role: Role::Worker }).await?;
                if let Err(e) = self.remove_voter(m, n.id.0).await {
                    let _ = self.write(m, Command::SetRole { id: n.id, role: Role::Manager }).await;
                    return Err(e);
                }
                self.rotate_after_leaving("node demoted");
                Ok(Response::Done { warnings: even_warning(count - 1).into_iter().collect() })
            }
            ManageRequest::NodeRm { node, force } => {
                let state = m.sm.state();
                let n = state.find_node(&node).map_err(Error::NotFound)?;
                if n.role == Role::Manager || Inner::voters(m).contains(&n.id.0) {
                    return Err(Error::Refused(format!(
                        "node {} is a cluster manager and is a member of the raft cluster. It must be demoted to worker before removal",
                        n.hostname
                    )));
                }
                if n.status != NodeStatus::Down && !force {
                    return Err(Error::Refused(format!(
                        "node {} is not down and can't be removed (use --force)",
                        n.hostname
                    )));
                }
                self.write(m, Command::RemoveNode(n.id)).await?;
                self.rotate_after_leaving("node removed");
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::JoinToken { role, rotate } => {
                if rotate {
                    self.write(m, Command::SetJoinSecret { role, secret: new_secret() }).await?;
                }
                let state = m.sm.state();
                let info = state
                    .cluster
                    .as_ref()
                    .ok_or_else(|| Error::NoLeader("the swarm is still initialising".into()))?;
                let ca = ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)?;
                let secret = match role {
                    Role::Worker => info.worker_secret,
                    Role::Manager => info.manager_secret,
                };
                Ok(Response::Token(JoinToken { ca_digest: ca.digest(), secret }.to_string()))
            }
            ManageRequest::RotateGossipKey => self.leader_rotate(m).await,
            ManageRequest::JoinRaft => {
                let _g = self.membership_lock.lock().await;
                let state = m.sm.state();
                let n = state
                    .nodes
                    .get(&caller)
                    .ok_or_else(|| Error::NotFound(format!("node {caller} not found")))?;
                if n.role != Role::Manager {
                    return Err(Error::PermissionDenied(format!(
                        "node {} is not a manager in the store",
                        n.hostname
                    )));
                }
                if Inner::voters(m).contains(&caller.0) {
                    return Ok(Response::Done { warnings: Vec::new() });
                }
                let limit = self.tuning.rpc_timeout * 2;
                let late = || {
                    Error::NoLeader(format!(
                        "{} did not catch up with the Raft log in time; it will retry",
                        n.hostname
                    ))
                };
                tokio::time::timeout(
                    limit,
                    m.raft.add_learner(caller.0, BasicNode::new(n.addr.to_string()), true),
                )
                .await
                .map_err(|_| late())?
                .map_err(|e| {
                    Error::NoLeader(format!("adding {} as a Raft learner: {e}", n.hostname))
                })?;
                let mut set = BTreeSet::new();
                set.insert(caller.0);
                tokio::time::timeout(
                    limit,
                    m.raft.change_membership(ChangeMembers::AddVoterIds(set), false),
                )
                .await
                .map_err(|_| late())?
                .map_err(|e| Error::NoLeader(format!("making {} a Raft voter: {e}", n.hostname)))?;
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::Write(cmd) => {
                if matches!(cmd, Command::Init { .. }) {
                    return Err(Error::BadRequest("the cluster is already initialised".into()));
                }
                self.write(m, cmd).await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::State => {
                Ok(Response::State(Box::new(crate::worker_view::without_secrets(m.sm.state()))))
            }
        }
    }

    fn view(&self, m: &ManagerParts, n: &NodeRecord) -> NodeView {
        let metrics = m.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        let status = if n.role == Role::Manager || voters.contains(&n.id.0) {
            Some(if metrics.current_leader == Some(n.id.0) {
                ManagerStatus::Leader
            } else if voters.contains(&n.id.0)
                && m.contacts.reachable(n.id.0, Instant::now(), self.tuning.manager_window())
            {
                ManagerStatus::Reachable
            } else {
                ManagerStatus::Unreachable
            })
        } else {
            None
        };
        NodeView { record: n.clone(), manager_status: status }
    }

    /// Waits until every Ready node reports keyring `version`; returns the ones that did not.
    async fn wait_acks(&self, m: &ManagerParts, version: u64) -> Vec<String> {
        let deadline = Instant::now() + self.tuning.heartbeat * 10 + Duration::from_secs(2);
        loop {
            let state = m.sm.state();
            let lagging = match self.book.lock() {
                Ok(b) => b.lagging(&state, version),
                Err(p) => p.into_inner().lagging(&state, version),
            };
            if lagging.is_empty() || Instant::now() >= deadline {
                return lagging;
            }
            tokio::time::sleep(self.tuning.heartbeat / 3).await;
        }
    }

    /// A node lost its place (removed) or its manager rights (demoted): what it knew of the
    /// gossip key must stop opening the cluster's gossip. It cannot fetch the new key, since
    /// the store no longer lets it in (see `authorize`).
    fn rotate_after_leaving(self: &Arc<Self>, why: &'static str) {
        if let Some(m) = self.manager() {
            self.rotate_in_background(&m, why);
        }
    }

    /// Replaces the gossip key without holding up the caller (the rotation waits for every
    /// node to confirm each step).
    fn rotate_in_background(self: &Arc<Self>, m: &Arc<ManagerParts>, why: &'static str) {
        let (inner, m) = (self.clone(), m.clone());
        tokio::spawn(async move {
            match inner.leader_rotate(&m).await {
                Ok(Response::Done { warnings }) if !warnings.is_empty() => {
                    tracing::warn!(why, ?warnings, "gossip key rotated, with warnings");
                }
                Ok(_) => tracing::info!(why, "gossip key rotated"),
                Err(e) => tracing::warn!(why, error = %e, "rotating the gossip key"),
            }
        });
    }

    async fn leader_rotate(&self, m: &ManagerParts) -> Result<Response, Error> {
        let _g = self.rotation_lock.lock().await;
        let state = m.sm.state();
        let new_id = state.keyring.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        let old: Vec<u32> = state.keyring.keys.iter().map(|k| k.id).collect();
        let mut warnings = Vec::new();
        let mut note = |step: &str, lag: Vec<String>| {
            if !lag.is_empty() {
                warnings.push(format!("{step}: no confirmation in time from {}", lag.join(", ")));
            }
        };
        self.write(m, Command::AddGossipKey(GossipKey { id: new_id, key: random_key() })).await?;
        note("new gossip key distributed", self.wait_acks(m, m.sm.state().keyring.version).await);
        self.write(m, Command::SetPrimaryGossipKey(new_id)).await?;
        note("new gossip key made primary", self.wait_acks(m, m.sm.state().keyring.version).await);
        for id in old {
            self.write(m, Command::RetireGossipKey(id)).await?;
        }
        Ok(Response::Done { warnings })
    }

    /// One round of the session: heartbeat, then bring the certificate and Raft in line with the
    /// role the store wants.
    async fn reconcile_once(self: &Arc<Self>) -> Result<(), Error> {
        let _g = self.reconcile_lock.lock().await;
        let version = self.keyring.borrow().version;
        let wg_public_key = self.local().wg_public_key;
        let s = match self
            .request(Request::Heartbeat { keyring_version: version, wg_public_key })
            .await?
        {
            Response::Session(s) => s,
            r => return Err(unexpected(&r)),
        };
        let changed = {
            let mut l = match self.local.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            let mut changed = false;
            if !s.managers.is_empty() && l.managers != s.managers {
                l.managers = s.managers.clone();
                changed = true;
            }
            if self.manager().is_none() && l.keyring != s.keyring {
                l.keyring = s.keyring.clone();
                changed = true;
            }
            changed
        };
        if self.manager().is_none() {
            self.keyring.send_if_modified(|k| {
                if *k != s.keyring {
                    *k = s.keyring.clone();
                    true
                } else {
                    false
                }
            });
        }
        if changed {
            self.save_local()?;
        }
        let now = (now_ms() / 1000) as i64;
        let expiring = self.identity.read().map(|i| i.needs_renewal(now)).unwrap_or(false);
        if self.cert_role() != s.desired_role || expiring {
            self.renew(s.desired_role).await?;
        }
        match (s.desired_role, self.cert_role(), s.voter) {
            (Role::Manager, Role::Manager, false) => {
                self.start_raft().await?;
                self.request(Request::Manage(ManageRequest::JoinRaft)).await?;
            }
            (Role::Worker, Role::Worker, false) if self.manager().is_some() => {
                self.stop_raft().await;
                let path = self.dir.join(RAFT_FILE);
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("removing {}", path.display())))?;
            }
            _ => {}
        }
        if s.desired_role == Role::Manager && self.manager().is_some() {
            // Keep the local keyring file current on managers too, for a restart.
            let kr = self.keyring.borrow().clone();
            let save = self.local.lock().map(|mut l| {
                let differs = l.keyring != kr;
                l.keyring = kr;
                differs
            });
            if save.unwrap_or(false) {
                self.save_local()?;
            }
        }
        Ok(())
    }

    async fn renew(self: &Arc<Self>, role: Role) -> Result<(), Error> {
        let (key, csr) = new_key_and_csr()?;
        let cert_pem = match self.call_leader_plain(Request::RenewCert { csr_pem: csr }).await? {
            Response::Cert { cert_pem } => cert_pem,
            Response::Error(e) => return Err(from_rpc(e)),
            r => return Err(unexpected(&r)),
        };
        let ca = self
            .identity
            .read()
            .map(|i| i.ca_pem.clone())
            .map_err(|_| Error::Store("identity lock poisoned".into()))?;
        let id = NodeIdentity::from_pem(key, cert_pem, ca)?;
        if id.info.role != role || id.info.node != self.me() {
            return Err(Error::Refused(format!(
                "the renewed certificate is for {} as {}, expected {role}",
                id.info.node, id.info.role
            )));
        }
        write_file(&self.dir.join(KEY_FILE), &id.key_pem)?;
        write_file(&self.dir.join(CERT_FILE), &id.cert_pem)?;
        self.transport.set_identity(&id)?;
        if let Ok(mut i) = self.identity.write() {
            *i = id;
        }
        tracing::info!(role = %role, "node certificate renewed for a new role");
        Ok(())
    }

    // Boxed to break the async recursion through `call_leader` → `dispatch`.
    fn call_leader_plain(
        self: &Arc<Self>,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Error>> + Send + '_>>
    {
        Box::pin(self.call_leader(req))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// openraft's leader lease: how long a voter that heard from a leader refuses to vote.
fn lease(raft: &Raft) -> Duration {
    Duration::from_millis(raft.config().election_timeout_max)
}

/// This manager's answer to a pre-vote probe: it leads with a quorum, or an append from the
/// leader reached it within the lease.
fn leader_alive(m: &ManagerParts) -> bool {
    let metrics = m.raft.metrics().borrow().clone();
    if metrics.current_leader == Some(metrics.id) {
        let voters = metrics.membership_config.membership().voter_ids().count();
        return !failover::deposed(voters, metrics.millis_since_quorum_ack, lease(&m.raft));
    }
    lock(&m.leader_seen).is_some_and(|t| t.elapsed() <= lease(&m.raft))
}

/// On managers: probes the other voters every Raft heartbeat and lets this one campaign only
/// while a majority has no live leader (pre-vote, see `failover`).
async fn probe_loop(inner: Arc<Inner>) {
    let mut allowed = true;
    loop {
        tokio::time::sleep(inner.tuning.raft_heartbeat).await;
        let Some(m) = inner.manager() else { continue };
        let metrics = m.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let me = metrics.id;
        let peers: Vec<(u64, SocketAddr)> = voters
            .iter()
            .filter(|v| **v != me)
            .filter_map(|v| Some((*v, membership.get_node(v).and_then(crate::raft::node_addr)?)))
            .collect();
        // A probe that takes longer than the answers stay valid is as good as none.
        let window = inner.tuning.raft_election_min;
        let mut calls = tokio::task::JoinSet::new();
        for (id, addr) in peers {
            let transport = inner.transport.clone();
            calls.spawn(async move { (id, transport.call(addr, &Request::Probe, window).await) });
        }
        let mut answers = Vec::new();
        while let Some(a) = calls.join_next().await {
            answers.extend(a.ok());
        }
        let now = Instant::now();
        let may = {
            let mut book = lock(&m.prevote);
            book.retain_voters(&voters);
            for (id, r) in answers {
                if let Ok(Response::Probe { leader_alive }) = r {
                    m.contacts.touch(id, now);
                    book.handle_answer(now, id, leader_alive);
                }
            }
            book.may_campaign(now, me, &voters, window)
        };
        if may != allowed {
            tracing::info!(node = %inner.local().hostname, may_campaign = may, "pre-vote");
            m.raft.runtime_config().elect(may);
            allowed = may;
        }
    }
}

async fn session_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.tuning.heartbeat).await;
        if let Err(e) = inner.reconcile_once().await {
            tracing::debug!(node = %inner.local().hostname, error = %e, "session with the managers");
        }
    }
}

/// On the leader: nodes that stop heartbeating are marked Down (3 periods; 6 for nodes not yet
/// heard from since this node became leader).
async fn liveness_loop(inner: Arc<Inner>) {
    // When this node, as leader, next replaces the gossip key (None while it does not lead: a new
    // leader waits one whole period).
    let mut rotation_due: Option<Instant> = None;
    loop {
        tokio::time::sleep(inner.tuning.heartbeat).await;
        let Some(m) = inner.manager() else { continue };
        let me = inner.me();
        let leading = Inner::leader_of(&m).map(|l| l.0) == Some(me.0);
        let now = Instant::now();
        match rotation_due {
            _ if !leading => rotation_due = None,
            None => rotation_due = Some(now + inner.tuning.gossip_key_rotation),
            Some(due) if now >= due => {
                rotation_due = Some(now + inner.tuning.gossip_key_rotation);
                inner.rotate_in_background(&m, "scheduled");
            }
            Some(_) => {}
        }
        let stale: Vec<NodeId> = {
            let mut b = match inner.book.lock() {
                Ok(b) => b,
                Err(p) => p.into_inner(),
            };
            b.handle_leadership(now, leading);
            m.sm.with_state(|s| b.poll_stale(now, inner.tuning.heartbeat, s, me))
        };
        for id in stale {
            let cmd = Command::SetStatus {
                id,
                status: NodeStatus::Down,
                message: HEARTBEAT_FAILURE.into(),
            };
            if let Err(e) = inner.write(&m, cmd).await {
                tracing::debug!(error = %e, "marking a node down");
            }
        }
    }
}
