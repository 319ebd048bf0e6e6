//! What only the leader does: writes through Raft, and its handlers for joins, heartbeats,
//! certificate renewal, liveness, leaving, the manager API, the dispatcher's task requests and
//! gossip key rotation.

use super::*;

/// Waits (at most `timeout`) until the manager's store has applied past log index `after`;
/// returns the applied index then.
pub(super) async fn wait_applied(m: &ManagerParts, after: u64, timeout: Duration) -> u64 {
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

impl Inner {
    pub(super) async fn write(&self, m: &ManagerParts, cmd: Command) -> Result<(), Error> {
        let Ok(res) = tokio::time::timeout(self.tuning.rpc_timeout, m.raft.client_write(cmd)).await
        else {
            return Err(Error::NoLeader(format!(
                "the change was not committed within {:?}: too few managers are reachable (it may still apply once they are back)",
                self.tuning.rpc_timeout
            )));
        };
        match res {
            Ok(resp) => match resp.data.error {
                Some(crate::model::Refusal::Conflict(e)) => Err(Error::Conflict(e)),
                Some(e) => Err(Error::Refused(e.to_string())),
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

    pub(super) async fn handle_leader(
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
            Request::Heartbeat { keyring_version, wg_public_key, ca } => {
                self.leader_heartbeat(m, n, keyring_version, wg_public_key, ca).await
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

    pub(super) async fn leader_tasks(
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
                wait_applied(m, pos.revision, self.tuning.rpc_timeout / 2).await;
                Ok(Response::Delta(m.sm.delta(crate::watch::Reader::new(node, role), &pos)))
            }
            TaskRequest::Report(reports) => {
                let mut refused = Vec::new();
                for (key, report) in reports {
                    let cmd = Command::ReportTask { owner: node, key, report };
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

    pub(super) fn voters(m: &ManagerParts) -> BTreeSet<u64> {
        m.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// Control addresses of the Raft voters (the managers that can answer).
    pub(super) fn manager_addrs(m: &ManagerParts) -> Vec<SocketAddr> {
        let metrics = m.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|v| membership.get_node(&v).and_then(crate::raft::node_addr))
            .collect()
    }

    pub(super) async fn leader_join(
        &self,
        m: &ManagerParts,
        j: JoinRequest,
    ) -> Result<Response, Error> {
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
        let cert_pem = self.sign_renewal(m, id, role, &j.csr_pem)?;
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
            ca_pem: security::bundle(&crate::ca::trusted_ca_pems(info)),
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

    pub(super) async fn leader_heartbeat(
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
        let mut session = SessionInfo {
            desired_role: rec.role,
            voter: Inner::voters(m).contains(&node.0),
            managers: Inner::manager_addrs(m),
            keyring: state.keyring.clone(),
            manager_ids: Vec::new(),
            ca_pems: Vec::new(),
            cert_expiry_secs: 0,
        };
        self.session_security(m, node, ca, &mut session);
        Ok(Response::Session(session))
    }

    pub(super) fn leader_renew(
        &self,
        m: &ManagerParts,
        node: NodeId,
        csr: &str,
    ) -> Result<Response, Error> {
        let role =
            m.sm.with_state(|s| s.nodes.get(&node).map(|n| n.role))
                .ok_or_else(|| Error::NotFound(format!("node {node} is not part of this swarm")))?;
        let cert_pem = self.sign_renewal(m, node, role, csr)?;
        Ok(Response::Cert { cert_pem })
    }

    pub(super) async fn leader_member_status(
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
    pub(super) fn check_quorum_after_removal(
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

    pub(super) async fn remove_voter(&self, m: &ManagerParts, id: u64) -> Result<(), Error> {
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

    pub(super) async fn leader_leave(
        &self,
        m: &ManagerParts,
        node: NodeId,
    ) -> Result<Response, Error> {
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

    pub(super) async fn leader_manage(
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
            ManageRequest::UpdateSwarm(update) => self.leader_update_swarm(m, update).await,
            ManageRequest::Ca { rotate } => self.leader_ca(m, rotate).await,
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
                let reader = crate::watch::Reader::Manager;
                Ok(Response::State(Box::new(crate::watch::view(m.sm.state(), reader))))
            }
        }
    }

    pub(super) fn view(&self, m: &ManagerParts, n: &NodeRecord) -> NodeView {
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
    pub(super) async fn wait_acks(&self, m: &ManagerParts, version: u64) -> Vec<String> {
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
    pub(super) fn rotate_after_leaving(self: &Arc<Self>, why: &'static str) {
        if let Some(m) = self.manager() {
            self.rotate_in_background(&m, why);
        }
    }

    /// Replaces the gossip key without holding up the caller (the rotation waits for every
    /// node to confirm each step).
    pub(super) fn rotate_in_background(self: &Arc<Self>, m: &Arc<ManagerParts>, why: &'static str) {
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

    pub(super) async fn leader_rotate(&self, m: &ManagerParts) -> Result<Response, Error> {
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
}
