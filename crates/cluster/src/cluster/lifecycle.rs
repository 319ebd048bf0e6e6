//! Lifecycle of a node's membership: `swarm init`, `join`, reopening the swarm state at start,
//! shutdown and `leave`, and starting or stopping this node's Raft when it becomes or stops
//! being a manager.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::BasicNode;
use tokio::task::JoinHandle;

use crate::model::{
    ClusterInfo, Command, GossipKey, Keyring, NetworkSpec, NodeId, NodeRecord, NodeStatus, Role,
    now_ms,
};
use crate::pki::{ClusterCa, NodeIdentity, PinFailure, new_key_and_csr};
use crate::token::{JoinToken, new_secret};
use crate::transport::{CallError, Transport, call_pinned};
use crate::wire::{JoinRequest, JoinResponse, Request, Response};
use crate::{Error, Tuning};

use super::errors::{from_rpc, unexpected};
use super::files::{
    CA_FILE, CERT_FILE, KEY_FILE, NODE_FILE, RAFT_FILE, SWARM_DIR, create_private_dir, io_err,
    read_file, write_file,
};
use super::leader::Leader;
use super::node::{LocalState, Node};
use super::rpc::Router;
use super::sessions::{Session, probe_loop};
use super::{Cluster, InitOptions, Inner, JoinOptions, random_hex, random_key};

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
        crate::model::security::check_cert_expiry(opts.cert_expiry).map_err(Error::BadRequest)?;
        let ca = ClusterCa::generate()?;
        let node = NodeId::random();
        create_private_dir(&dir)?;
        let (key, csr) = new_key_and_csr()?;
        let cert = ca.sign_csr_for(&csr, node, Role::Manager, opts.cert_expiry)?;
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
            let m = cluster.inner.node.start_raft().await?;
            let mut members = BTreeMap::new();
            members.insert(node.0, BasicNode::new(opts.advertise_addr.to_string()));
            m.raft.initialize(members).await.map_err(|e| Error::Store(e.to_string()))?;
            m.raft
                .wait(Some(opts.tuning.rpc_timeout * 2))
                .current_leader(node.0, "init")
                .await
                .map_err(|e| Error::Store(format!("waiting to become leader: {e}")))?;
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
                security: crate::model::security::SecurityConfig {
                    cert_expiry_secs: opts.cert_expiry.as_secs(),
                    ..Default::default()
                },
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
            // The store cuts its subnet from the pool and gives it the first VNI, as for any
            // network.
            let ingress = NetworkSpec {
                id: random_hex(12),
                name: "ingress".into(),
                subnet: None,
                ingress: true,
                attachable: false,
                encrypted: false,
                labels: BTreeMap::new(),
            };
            m.write(Command::Init { info, node: record, keyring, ingress }).await
        }
        .await;
        if let Err(e) = result {
            cluster.shutdown().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        cluster.spawn_loops();
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
        cluster.inner.node.keyring.send_replace(jr.keyring);
        if jr.role == Role::Manager {
            // Becoming a voter can take a moment; the session loop retries if this fails.
            let _ = cluster.inner.session.reconcile_once().await;
        }
        cluster.spawn_loops();
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
        cluster.inner.node.keyring.send_replace(keyring);
        if has_raft && let Err(e) = cluster.inner.node.start_raft().await {
            cluster.shutdown().await;
            return Err(e);
        }
        cluster.spawn_loops();
        Ok(Some(cluster))
    }

    /// [`Cluster::start`] for a node entering a swarm: if it fails, the swarm directory it
    /// began to fill is removed, so the node stays outside any swarm.
    pub(super) fn start_fresh(
        dir: &Path,
        local: LocalState,
        identity: NodeIdentity,
        tuning: Tuning,
    ) -> Result<Cluster, Error> {
        Cluster::start(dir.to_owned(), local, identity, tuning).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(dir);
        })
    }

    pub(super) fn start(
        dir: PathBuf,
        local: LocalState,
        identity: NodeIdentity,
        tuning: Tuning,
    ) -> Result<Cluster, Error> {
        write_file(&dir.join(KEY_FILE), &identity.key_pem)?;
        write_file(&dir.join(CERT_FILE), &identity.cert_pem)?;
        write_file(&dir.join(CA_FILE), &identity.ca_pem)?;
        let transport = Arc::new(Transport::bind(local.listen_addr, &identity)?);
        let node = Arc::new(Node::new(dir, local, identity, transport, tuning));
        let leader = Arc::new(Leader::new(node.clone()));
        let router = Arc::new(Router::new(node.clone(), leader.clone()));
        let session = Arc::new(Session::new(node.clone(), router.clone()));
        node.save_local()?;
        let server = tokio::spawn(router.clone().serve());
        let inner = Inner { node, leader, router, session, tasks: Mutex::new(vec![server]) };
        Ok(Cluster { inner: Arc::new(inner) })
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
        self.inner.node.stop_raft().await;
        self.inner.node.transport.close().await;
    }

    /// `swarm leave [--force]`. A manager is refused without `force` when it is the last one or
    /// its leaving would lose quorum. The swarm state is removed from the data dir.
    pub async fn leave(&self, force: bool) -> Result<(), Error> {
        self.inner.session.leave(force).await?;
        self.shutdown().await;
        let dir = &self.inner.node.dir;
        std::fs::remove_dir_all(dir).map_err(io_err(format!("removing {}", dir.display())))
    }

    fn spawn_loops(&self) {
        let inner = &self.inner;
        let session = tokio::spawn(inner.session.clone().run());
        let liveness = tokio::spawn(inner.leader.clone().liveness_loop());
        let probes = tokio::spawn(probe_loop(inner.node.clone()));
        if let Ok(mut t) = inner.tasks.lock() {
            t.push(session);
            t.push(liveness);
            t.push(probes);
        }
    }
}
