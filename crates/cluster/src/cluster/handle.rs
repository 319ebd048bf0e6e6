//! What the agent asks of the [`Cluster`] handle once it is in a swarm: the node API, join
//! tokens, raw store writes and reads, the per-node watch of the store, task reports, the swarm's
//! certificate settings (`swarm update`, `swarm ca`), and what this node knows of itself, of
//! Raft and of the requests it refused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use crate::Error;
use crate::ca::CaAnswer;
use crate::model::security::{SecurityConfig, SwarmUpdate};
use crate::model::{ClusterEvent, ClusterState, Command, Keyring, NodeId, Role};
use crate::wire::{
    ManageRequest, NodeRequest, NodeUpdate, NodeView, Request, Response, TaskRequest,
};

use super::errors::{from_rpc, unexpected};
use super::{Cluster, LocalInfo, NodeHandler, RaftStatus};

impl Cluster {
    /// `swarm join-token [--rotate] worker|manager`: the current token (after rotating it).
    pub async fn join_token(&self, role: Role, rotate: bool) -> Result<String, Error> {
        match self
            .inner
            .router
            .request(Request::Manage(ManageRequest::JoinToken { role, rotate }))
            .await?
        {
            Response::Token(t) => Ok(t),
            r => Err(unexpected(&r)),
        }
    }

    /// The command `swarm init`/`join-token` print: `shoal swarm join --token T ADDR`.
    pub async fn join_command(&self, role: Role) -> Result<String, Error> {
        let token = self.join_token(role, false).await?;
        let addr = self.inner.node.local().advertise_addr;
        Ok(format!("shoal swarm join --token {token} {addr}"))
    }

    /// `node ls`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, Error> {
        match self.inner.router.request(Request::Manage(ManageRequest::NodeList)).await? {
            Response::Nodes(n) => Ok(n),
            r => Err(unexpected(&r)),
        }
    }

    /// `node inspect` (id, unique id prefix or host name).
    pub async fn node(&self, node: &str) -> Result<NodeView, Error> {
        match self
            .inner
            .router
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
        match self.inner.router.request(Request::Manage(ManageRequest::State)).await? {
            Response::State(s) => Ok(*s),
            r => Err(unexpected(&r)),
        }
    }

    /// Sets this node's WireGuard public key: the leader records it in the node's store record
    /// at the next heartbeat (sent at once when the key is new), and peers take it from there.
    pub async fn set_wg_public_key(&self, key: [u8; 32]) -> Result<(), Error> {
        let changed = match self.inner.node.local.lock() {
            Ok(mut l) => l.wg_public_key.replace(key) != Some(key),
            Err(p) => p.into_inner().wg_public_key.replace(key) != Some(key),
        };
        if changed {
            self.inner.node.save_local()?;
        }
        self.inner.session.reconcile_once().await
    }

    /// Registers what answers [`NodeRequest`]s from managers on this node.
    pub fn set_node_handler(&self, handler: Option<NodeHandler>) {
        self.inner.router.set_handler(handler);
    }

    /// Asks the node at control address `addr` (this node too) a [`NodeRequest`]; managers only.
    pub async fn ask_node(
        &self,
        addr: SocketAddr,
        req: NodeRequest,
    ) -> Result<serde_json::Value, Error> {
        if addr == self.inner.node.local().advertise_addr {
            return match self.inner.router.node_request(req).await? {
                Response::Value(v) => Ok(v),
                r => Err(unexpected(&r)),
            };
        }
        let timeout = self.inner.node.tuning.rpc_timeout;
        match self.inner.node.transport.call(addr, &Request::Node(req), timeout).await {
            Ok(Response::Value(v)) => Ok(v),
            Ok(Response::Error(e)) => Err(from_rpc(e)),
            Ok(r) => Err(unexpected(&r)),
            Err(e) => Err(Error::NoLeader(format!("cannot reach the node at {addr}: {e}"))),
        }
    }

    /// The store as the leader has it, secrets blanked: any node may read it (the dispatcher).
    pub async fn task_state(&self) -> Result<ClusterState, Error> {
        match self.inner.router.request(Request::Tasks(TaskRequest::State)).await? {
            Response::State(s) => Ok(*s),
            r => Err(unexpected(&r)),
        }
    }

    /// The store once the leader has applied more than `index`, with the revision it reflects:
    /// a long poll (it may also come back unchanged after a while). This node keeps a copy that
    /// follows the leader's deltas, so each answer carries only what changed (see
    /// [`crate::watch`]); a caller behind the copy gets the copy at once.
    pub async fn task_state_after(&self, index: u64) -> Result<(u64, ClusterState), Error> {
        self.inner.session.state_after(index).await
    }

    /// Reports the observed state of tasks this node hosts; each is one store write, and a
    /// refused one (a task reassigned meanwhile) does not stop the others.
    pub async fn report_tasks(
        &self,
        reports: Vec<(String, crate::model::TaskReport)>,
    ) -> Result<(), Error> {
        self.done(Request::Tasks(TaskRequest::Report(reports))).await.map(|_| ())
    }

    /// Creates, replaces or (with `None`) removes a standalone task of this node.
    pub async fn put_standalone(
        &self,
        key: &str,
        value: Option<crate::model::TaskRecord>,
    ) -> Result<(), Error> {
        let req = TaskRequest::Standalone { key: key.to_owned(), value: value.map(Box::new) };
        self.done(Request::Tasks(req)).await.map(|_| ())
    }

    /// `swarm update`: changes the swarm's certificate expiry and gossip key rotation period.
    pub async fn update_swarm(&self, update: SwarmUpdate) -> Result<(), Error> {
        self.done(Request::Manage(ManageRequest::UpdateSwarm(update))).await.map(|_| ())
    }

    /// `swarm ca [--rotate]`: the swarm's CA certificate, after a rotation (see `ca`) when
    /// `rotate`; the warnings name nodes that did not follow a step in time.
    pub async fn ca(&self, rotate: bool) -> Result<CaAnswer, Error> {
        match self.inner.router.request(Request::Manage(ManageRequest::Ca { rotate })).await? {
            Response::Value(v) => serde_json::from_value(v)
                .map_err(|e| Error::BadRequest(format!("malformed CA answer: {e}"))),
            r => Err(unexpected(&r)),
        }
    }

    /// The swarm settings as this manager's store has them (`None` on a worker).
    pub fn security_config(&self) -> Option<SecurityConfig> {
        let m = self.inner.node.manager()?;
        m.sm.with_state(|s| s.cluster.as_ref().map(|c| c.security.clone()))
    }

    /// Requests this node refused since it started (see `authz`), for `/metrics`.
    pub fn refusals(&self) -> crate::authz::RefusalCounts {
        self.inner.router.refusals()
    }

    async fn done(&self, req: Request) -> Result<Vec<String>, Error> {
        match self.inner.router.request(req).await? {
            Response::Done { warnings } => Ok(warnings),
            r => Err(unexpected(&r)),
        }
    }

    /// The gossip keyring as a watch: feed it into gossip (every key decrypts, the primary encrypts).
    pub fn gossip_keys(&self) -> watch::Receiver<Keyring> {
        self.inner.node.keyring.subscribe()
    }

    /// Node events applied by this manager's store (none on workers).
    pub fn events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.node.events.subscribe()
    }

    /// This node's view of itself.
    pub fn info(&self) -> LocalInfo {
        let local = self.inner.node.local();
        let (role, digest) = match self.inner.node.identity.read() {
            Ok(i) => (
                i.info.role,
                i.ca_digest().map(|d| crate::base36::encode_base36(&d, 50)).unwrap_or_default(),
            ),
            Err(_) => (Role::Worker, String::new()),
        };
        let m = self.inner.node.manager();
        LocalInfo {
            node: local.node,
            hostname: local.hostname,
            role,
            raft: m.is_some(),
            leader: m.and_then(|m| m.leader()).map(|l| NodeId(l.0)),
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
        let Some(m) = self.inner.node.manager() else {
            tokio::time::sleep(timeout).await;
            return after;
        };
        m.wait_applied(after, timeout).await
    }

    /// Raft's view on this node (`None` on a worker): for metrics and tests.
    pub fn raft_status(&self) -> Option<RaftStatus> {
        let m = self.inner.node.manager()?;
        let metrics = m.raft.metrics().borrow().clone();
        Some(RaftStatus {
            leader: m.leader().map(|l| NodeId(l.0)),
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
        self.inner.node.transport.local_addr()
    }

    /// Waits until this node runs Raft as a voter with a known leader (after init, a manager
    /// join or a promotion), up to `timeout`.
    pub async fn wait_voter(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.inner.node.manager() {
                let me = self.inner.node.local().node.0;
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
