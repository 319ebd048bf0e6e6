//! What only the leader does: [`Leader`], its books and its handlers for joins, heartbeats,
//! certificate renewal, liveness, leaving, the manager API, the dispatcher's task requests and
//! gossip key rotation; the certificate side it hands to [`Security`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers};

use crate::model::{Command, GossipKey, NodeId, NodeRecord, NodeStatus, Role, now_ms};
use crate::pki::ClusterCa;
use crate::policy::{HeartbeatBook, even_warning};
use crate::token::{JoinToken, new_secret, role_of_secret};
use crate::wire::{
    Caller, JoinRequest, JoinResponse, ManageRequest, Request, Response, SessionInfo, TaskRequest,
};
use crate::{Error, NOT_MANAGER};

use super::errors::to_rpc;
use super::manager::ManagerParts;
use super::node::Node;
use super::security::{self, Security};
use super::{lock, random_key};

/// The status message of a node the leader marked Down for missed heartbeats.
const HEARTBEAT_FAILURE: &str = "heartbeat failure";

/// What this node keeps and does for when it leads: each node's heartbeats and keyring version,
/// the locks that let one membership change and one rotation (gossip key or CA) run at a time,
/// and the certificate side ([`Security`]). Its handlers answer requests the RPC edge routed to
/// this node while it leads; its liveness loop runs on every manager and acts while it leads.
#[derive(Debug)]
pub(super) struct Leader {
    node: Arc<Node>,
    heartbeats: Mutex<HeartbeatBook>,
    membership: tokio::sync::Mutex<()>,
    rotation: tokio::sync::Mutex<()>,
    security: Security,
}

impl Leader {
    pub(super) fn new(node: Arc<Node>) -> Leader {
        let security = Security::new(node.tuning.clone());
        Leader {
            node,
            heartbeats: Mutex::default(),
            membership: tokio::sync::Mutex::default(),
            rotation: tokio::sync::Mutex::default(),
            security,
        }
    }

    /// A request for the leader, from `caller` (the origin of a forwarded one).
    pub(super) async fn handle(
        self: &Arc<Self>,
        m: &Arc<ManagerParts>,
        caller: Caller,
        req: Request,
    ) -> Response {
        if let Request::Join(j) = req {
            return self.join(m, j).await.unwrap_or_else(to_rpc);
        }
        let (n, role) = match m.authorize(caller) {
            Ok(who) => who,
            Err(e) => return to_rpc(e),
        };
        let r = match req {
            Request::Heartbeat { keyring_version, wg_public_key, ca } => {
                self.heartbeat(m, n, keyring_version, wg_public_key, ca).await
            }
            Request::RenewCert { csr_pem } => self.renew(m, n, &csr_pem),
            // Liveness moves tasks, so only managers (whose gossip sees every member) report it.
            Request::MemberStatus { .. } | Request::Manage(_) if role != Role::Manager => {
                Err(Error::NotManager(NOT_MANAGER.into()))
            }
            Request::MemberStatus { node, up } => self.member_status(m, node, up).await,
            Request::Leave => self.leave(m, n).await,
            Request::Manage(req) => self.manage(m, n, req).await,
            Request::Tasks(req) => self.tasks(m, n, role, req).await,
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

    async fn tasks(
        &self,
        m: &ManagerParts,
        node: NodeId,
        role: Role,
        req: TaskRequest,
    ) -> Result<Response, Error> {
        match req {
            TaskRequest::State => {
                let reader = crate::watch::Reader::new(node, role);
                Ok(Response::State(Box::new(crate::watch::view(m.sm.state(), reader))))
            }
            TaskRequest::Watch(pos) => {
                // Half the RPC timeout, so the answer always beats the caller's deadline.
                m.wait_applied(pos.revision, self.node.tuning.rpc_timeout / 2).await;
                Ok(Response::Delta(m.sm.delta(crate::watch::Reader::new(node, role), &pos)))
            }
            TaskRequest::Report(reports) => {
                let mut refused = Vec::new();
                for (key, report) in reports {
                    let cmd = Command::ReportTask { owner: node, key, report };
                    if let Err(e) = m.write(cmd).await {
                        refused.push(e.to_string());
                    }
                }
                Ok(Response::Done { warnings: refused })
            }
            TaskRequest::Standalone { key, value } => {
                m.write(Command::PutStandalone { owner: node, key, value }).await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
        }
    }

    async fn join(&self, m: &ManagerParts, j: JoinRequest) -> Result<Response, Error> {
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
        let cert_pem = security::sign_renewal(m, id, role, &j.csr_pem)?;
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
        m.write(Command::AddNode(record)).await?;
        if let Ok(mut b) = self.heartbeats.lock() {
            b.handle_join(Instant::now(), id);
        }
        let state = m.sm.state();
        Ok(Response::Joined(JoinResponse {
            node: id,
            role,
            cert_pem,
            ca_pem: security::bundle(&crate::ca::trusted_ca_pems(info)),
            keyring: state.keyring.clone(),
            managers: m.manager_addrs(),
            seeds: state
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Ready && n.id != id)
                .map(|n| n.data_addr)
                .collect(),
            data_path_port: info.data_path_port,
        }))
    }

    async fn heartbeat(
        &self,
        m: &ManagerParts,
        node: NodeId,
        version: u64,
        wg_public_key: Option<[u8; 32]>,
        ca: crate::ca::CaReport,
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
            m.write(Command::SetWgKey { id: node, key }).await?;
        }
        if let Ok(mut b) = self.heartbeats.lock() {
            b.handle_heartbeat(Instant::now(), node, version);
        }
        let back = rec.status == NodeStatus::Unknown
            || (rec.status == NodeStatus::Down && rec.status_message == HEARTBEAT_FAILURE);
        if back {
            m.write(Command::SetStatus {
                id: node,
                status: NodeStatus::Ready,
                message: "heartbeat".into(),
            })
            .await?;
        }
        let mut session = SessionInfo {
            desired_role: rec.role,
            voter: m.voters().contains(&node.0),
            managers: m.manager_addrs(),
            keyring: state.keyring.clone(),
            manager_ids: Vec::new(),
            ca_pems: Vec::new(),
            cert_expiry_secs: 0,
        };
        self.security.session(m, node, ca, &mut session);
        Ok(Response::Session(session))
    }

    fn renew(&self, m: &ManagerParts, node: NodeId, csr: &str) -> Result<Response, Error> {
        let role =
            m.sm.with_state(|s| s.nodes.get(&node).map(|n| n.role))
                .ok_or_else(|| Error::NotFound(format!("node {node} is not part of this swarm")))?;
        let cert_pem = security::sign_renewal(m, node, role, csr)?;
        Ok(Response::Cert { cert_pem })
    }

    async fn member_status(
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
            m.write(Command::SetStatus { id: node, status, message: message.into() }).await?;
        }
        Ok(Response::Done { warnings: Vec::new() })
    }

    async fn leave(&self, m: &ManagerParts, node: NodeId) -> Result<Response, Error> {
        let _g = self.membership.lock().await;
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
            m.check_quorum_after_removal(node.0, "leaving the swarm")?;
            m.write(Command::SetRole { id: node, role: Role::Worker }).await?;
            if let Err(e) = m.remove_voter(node.0).await {
                let _ = m.write(Command::SetRole { id: node, role: Role::Manager }).await;
                return Err(e);
            }
        }
        // The leader may have just removed itself; a follower would refuse this write.
        let down = Command::SetStatus {
            id: node,
            status: NodeStatus::Down,
            message: "node left the swarm".into(),
        };
        if let Err(e) = m.write(down).await {
            tracing::debug!(error = %e, "marking a leaving node down");
        }
        Ok(Response::Done { warnings: Vec::new() })
    }

    async fn manage(
        self: &Arc<Self>,
        m: &ManagerParts,
        caller: NodeId,
        req: ManageRequest,
    ) -> Result<Response, Error> {
        match req {
            ManageRequest::NodeList => {
                let state = m.sm.state();
                Ok(Response::Nodes(state.nodes.values().map(|n| m.view(n)).collect()))
            }
            ManageRequest::NodeInspect(what) => {
                let state = m.sm.state();
                let n = state.find_node(&what).map_err(Error::NotFound)?;
                Ok(Response::Node(m.view(n)))
            }
            ManageRequest::NodeUpdate { node, update } => {
                let state = m.sm.state();
                let n = state.find_node(&node).map_err(Error::NotFound)?;
                for (k, _) in &update.label_add {
                    if k.is_empty() {
                        return Err(Error::BadRequest("a label key must not be empty".into()));
                    }
                }
                m.write(Command::UpdateNode {
                    id: n.id,
                    availability: update.availability,
                    label_add: update.label_add.into_iter().collect(),
                    label_rm: update.label_rm,
                })
                .await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::Promote(what) => {
                let _g = self.membership.lock().await;
                let state = m.sm.state();
                let n = state.find_node(&what).map_err(Error::NotFound)?;
                if n.role == Role::Manager {
                    return Ok(Response::Done {
                        warnings: vec![format!("Node {} is already a manager.", n.hostname)],
                    });
                }
                m.write(Command::SetRole { id: n.id, role: Role::Manager }).await?;
                let count = state.managers().count() + 1;
                Ok(Response::Done { warnings: even_warning(count).into_iter().collect() })
            }
            ManageRequest::Demote(what) => {
                let _g = self.membership.lock().await;
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
                m.check_quorum_after_removal(n.id.0, &format!("demoting {}", n.hostname))?;
                m.write(Command::SetRole { id: n.id, role: Role::Worker }).await?;
                if let Err(e) = m.remove_voter(n.id.0).await {
                    let _ = m.write(Command::SetRole { id: n.id, role: Role::Manager }).await;
                    return Err(e);
                }
                self.rotate_after_leaving("node demoted");
                Ok(Response::Done { warnings: even_warning(count - 1).into_iter().collect() })
            }
            ManageRequest::NodeRm { node, force } => {
                let state = m.sm.state();
                let n = state.find_node(&node).map_err(Error::NotFound)?;
                if n.role == Role::Manager || m.voters().contains(&n.id.0) {
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
                m.write(Command::RemoveNode(n.id)).await?;
                self.rotate_after_leaving("node removed");
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::JoinToken { role, rotate } => {
                if rotate {
                    m.write(Command::SetJoinSecret { role, secret: new_secret() }).await?;
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
            ManageRequest::RotateGossipKey => self.rotate(m).await,
            ManageRequest::UpdateSwarm(update) => self.security.update_swarm(m, update).await,
            ManageRequest::Ca { rotate } => {
                let mut warnings = Vec::new();
                if rotate {
                    let _g = self.rotation.lock().await;
                    warnings = self.security.rotate_ca(m).await?;
                }
                security::ca_answer(m, warnings)
            }
            ManageRequest::JoinRaft => {
                let _g = self.membership.lock().await;
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
                if m.voters().contains(&caller.0) {
                    return Ok(Response::Done { warnings: Vec::new() });
                }
                let limit = self.node.tuning.rpc_timeout * 2;
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
                m.write(cmd).await?;
                Ok(Response::Done { warnings: Vec::new() })
            }
            ManageRequest::State => {
                let reader = crate::watch::Reader::Manager;
                Ok(Response::State(Box::new(crate::watch::view(m.sm.state(), reader))))
            }
        }
    }

    /// Waits until every Ready node reports keyring `version`; returns the ones that did not.
    async fn wait_acks(&self, m: &ManagerParts, version: u64) -> Vec<String> {
        let deadline = Instant::now() + self.node.tuning.heartbeat * 10 + Duration::from_secs(2);
        loop {
            let state = m.sm.state();
            let lagging = lock(&self.heartbeats).lagging(&state, version);
            if lagging.is_empty() || Instant::now() >= deadline {
                return lagging;
            }
            tokio::time::sleep(self.node.tuning.heartbeat / 3).await;
        }
    }

    /// A node lost its place (removed) or its manager rights (demoted): what it knew of the
    /// gossip key must stop opening the cluster's gossip. It cannot fetch the new key, since
    /// the store no longer lets it in (see `authorize`).
    fn rotate_after_leaving(self: &Arc<Self>, why: &'static str) {
        if let Some(m) = self.node.manager() {
            self.rotate_in_background(&m, why);
        }
    }

    /// Replaces the gossip key without holding up the caller (the rotation waits for every
    /// node to confirm each step).
    pub(super) fn rotate_in_background(self: &Arc<Self>, m: &Arc<ManagerParts>, why: &'static str) {
        let (leader, m) = (self.clone(), m.clone());
        tokio::spawn(async move {
            match leader.rotate(&m).await {
                Ok(Response::Done { warnings }) if !warnings.is_empty() => {
                    tracing::warn!(why, ?warnings, "gossip key rotated, with warnings");
                }
                Ok(_) => tracing::info!(why, "gossip key rotated"),
                Err(e) => tracing::warn!(why, error = %e, "rotating the gossip key"),
            }
        });
    }

    async fn rotate(&self, m: &ManagerParts) -> Result<Response, Error> {
        let _g = self.rotation.lock().await;
        let state = m.sm.state();
        let new_id = state.keyring.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        let old: Vec<u32> = state.keyring.keys.iter().map(|k| k.id).collect();
        let mut warnings = Vec::new();
        let mut note = |step: &str, lag: Vec<String>| {
            if !lag.is_empty() {
                warnings.push(format!("{step}: no confirmation in time from {}", lag.join(", ")));
            }
        };
        m.write(Command::AddGossipKey(GossipKey { id: new_id, key: random_key() })).await?;
        note("new gossip key distributed", self.wait_acks(m, m.sm.state().keyring.version).await);
        m.write(Command::SetPrimaryGossipKey(new_id)).await?;
        note("new gossip key made primary", self.wait_acks(m, m.sm.state().keyring.version).await);
        for id in old {
            m.write(Command::RetireGossipKey(id)).await?;
        }
        Ok(Response::Done { warnings })
    }

    /// On the leader: nodes that stop heartbeating are marked Down (3 periods; 6 for nodes not yet
    /// heard from since this node became leader).
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        // When this node, as leader, last replaced the gossip key or began to lead (None while it
        // does not lead: a new leader waits one whole period). The period is read each round, so a
        // `swarm update --gossip-key-rotation` takes effect at once.
        let mut rotated: Option<Instant> = None;
        loop {
            tokio::time::sleep(self.node.tuning.heartbeat).await;
            let Some(m) = self.node.manager() else { continue };
            let me = self.node.me();
            let leading = m.leads();
            let now = Instant::now();
            // `swarm update --gossip-key-rotation` overrides the agent's setting.
            let period =
                m.sm.with_state(|s| {
                    s.cluster.as_ref().and_then(|c| c.security.gossip_key_rotation_secs)
                })
                .map_or(self.node.tuning.gossip_key_rotation, Duration::from_secs);
            match rotated {
                _ if !leading => rotated = None,
                None => rotated = Some(now),
                Some(last) if now >= last + period => {
                    rotated = Some(now);
                    self.rotate_in_background(&m, "scheduled");
                }
                Some(_) => {}
            }
            let stale: Vec<NodeId> = {
                let mut b = lock(&self.heartbeats);
                b.handle_leadership(now, leading);
                m.sm.with_state(|s| b.poll_stale(now, self.node.tuning.heartbeat, s, me))
            };
            for id in stale {
                let cmd = Command::SetStatus {
                    id,
                    status: NodeStatus::Down,
                    message: HEARTBEAT_FAILURE.into(),
                };
                if let Err(e) = m.write(cmd).await {
                    tracing::debug!(error = %e, "marking a node down");
                }
            }
        }
    }
}
