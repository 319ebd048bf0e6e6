//! What every part of the handle shares: this node's identity, its persisted local state, the
//! transport, the channels the agent watches, and (on a manager) its Raft parts, with starting
//! and stopping them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::model::{ClusterEvent, Keyring, NodeId, Role};
use crate::pki::NodeIdentity;
use crate::transport::Transport;
use crate::{Error, Tuning};

use super::files::{NODE_FILE, RAFT_FILE, write_file};
use super::manager::ManagerParts;

/// The node's persisted local state (`<data_dir>/swarm/node.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LocalState {
    pub(super) node: NodeId,
    pub(super) hostname: String,
    pub(super) listen_addr: SocketAddr,
    pub(super) advertise_addr: SocketAddr,
    pub(super) data_addr: IpAddr,
    pub(super) engine_version: String,
    pub(super) data_path_port: u16,
    pub(super) managers: Vec<SocketAddr>,
    pub(super) keyring: Keyring,
    /// The data path's WireGuard public key, sent with every heartbeat so the leader's node
    /// record (which peers believe) follows it.
    #[serde(default)]
    pub(super) wg_public_key: Option<[u8; 32]>,
}

/// This node as the leader's handlers, the RPC edge and the session all see it; shared (`Arc`)
/// by them and their loops.
#[derive(Debug)]
pub(super) struct Node {
    /// The swarm directory, `<data_dir>/swarm`.
    pub(super) dir: PathBuf,
    pub(super) tuning: Tuning,
    pub(super) local: Mutex<LocalState>,
    pub(super) identity: RwLock<NodeIdentity>,
    pub(super) transport: Arc<Transport>,
    pub(super) events: broadcast::Sender<ClusterEvent>,
    pub(super) keyring: watch::Sender<Keyring>,
    /// Raft and its parts while this node is a manager.
    manager: RwLock<Option<Arc<ManagerParts>>>,
}

impl Node {
    pub(super) fn new(
        dir: PathBuf,
        local: LocalState,
        identity: NodeIdentity,
        transport: Arc<Transport>,
        tuning: Tuning,
    ) -> Node {
        let (events, _) = broadcast::channel(256);
        let (keyring, _) = watch::channel(Keyring::default());
        Node {
            dir,
            tuning,
            local: Mutex::new(local),
            identity: RwLock::new(identity),
            transport,
            events,
            keyring,
            manager: RwLock::new(None),
        }
    }

    pub(super) fn local(&self) -> LocalState {
        match self.local.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(super) fn me(&self) -> NodeId {
        self.local().node
    }

    pub(super) fn cert_role(&self) -> Role {
        self.identity.read().map(|i| i.info.role).unwrap_or(Role::Worker)
    }

    pub(super) fn manager(&self) -> Option<Arc<ManagerParts>> {
        self.manager.read().ok().and_then(|m| m.clone())
    }

    /// Whether this node runs Raft as a voter.
    pub(super) fn is_voter(&self) -> bool {
        let me = self.me().0;
        self.manager().is_some_and(|m| m.voters().contains(&me))
    }

    pub(super) fn save_local(&self) -> Result<(), Error> {
        let l = self.local();
        let text = serde_json::to_string_pretty(&l).map_err(|e| Error::Store(e.to_string()))?;
        write_file(&self.dir.join(NODE_FILE), &text)
    }

    pub(super) async fn start_raft(&self) -> Result<Arc<ManagerParts>, Error> {
        if let Some(m) = self.manager() {
            return Ok(m);
        }
        let path = self.dir.join(RAFT_FILE);
        let parts = ManagerParts::open(
            &path,
            self.me(),
            &self.tuning,
            self.transport.clone(),
            self.events.clone(),
            self.keyring.clone(),
        )
        .await?;
        let parts = Arc::new(parts);
        if let Ok(mut m) = self.manager.write() {
            *m = Some(parts.clone());
        }
        Ok(parts)
    }

    pub(super) async fn stop_raft(&self) {
        let parts = self.manager.write().ok().and_then(|mut m| m.take());
        if let Some(p) = parts {
            p.shutdown().await;
        }
    }
}
