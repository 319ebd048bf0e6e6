//! This node's session with the leader, [`Session`]: heartbeats, role changes, certificate
//! renewal and the CAs to trust, the keyring, and the mirror of the store the leader's deltas
//! build; and, on managers, the pre-vote probe loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::ca;
use crate::model::security::DEFAULT_CERT_EXPIRY;
use crate::model::{ClusterState, Role, now_ms};
use crate::pki::{NodeIdentity, new_key_and_csr};
use crate::watch::Mirror;
use crate::wire::{ManageRequest, Request, Response, SessionInfo, TaskRequest};

use super::errors::{from_rpc, unexpected};
use super::files::{CA_FILE, CERT_FILE, KEY_FILE, RAFT_FILE, io_err, write_file};
use super::node::Node;
use super::rpc::Router;
use super::{lock, security};

/// What this node's session with the leader keeps: the lock that lets one round (or a leave)
/// run at a time, and this node's copy of the store, as the leader's deltas build it. It asks
/// through the [`Router`], like the node API.
#[derive(Debug)]
pub(super) struct Session {
    node: Arc<Node>,
    router: Arc<Router>,
    round: tokio::sync::Mutex<()>,
    mirror: tokio::sync::Mutex<Mirror>,
}

impl Session {
    pub(super) fn new(node: Arc<Node>, router: Arc<Router>) -> Session {
        Session {
            node,
            router,
            round: tokio::sync::Mutex::default(),
            mirror: tokio::sync::Mutex::default(),
        }
    }

    /// A round every [`crate::Tuning::heartbeat`], for as long as the node runs.
    pub(super) async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.node.tuning.heartbeat).await;
            if let Err(e) = self.reconcile_once().await {
                tracing::debug!(node = %self.node.local().hostname, error = %e, "session with the managers");
            }
        }
    }

    /// `swarm leave`: tells the leader, holding the session off meanwhile (it would otherwise
    /// renew this node's certificate for its new role while the leave is in flight). A refusal
    /// stands only for a manager without `force`.
    pub(super) async fn leave(&self, force: bool) -> Result<(), Error> {
        let _g = self.round.lock().await;
        match self.router.request(Request::Leave).await {
            Err(e) if !force && self.node.manager().is_some() => Err(e),
            _ => Ok(()),
        }
    }

    /// The store once the leader has applied more than `index` (see [`crate::Cluster`]'s
    /// `task_state_after`), from the mirror, asking the leader for a delta when it is not past.
    pub(super) async fn state_after(&self, index: u64) -> Result<(u64, ClusterState), Error> {
        let mut mirror = self.mirror.lock().await;
        if mirror.revision() <= index {
            let pos = mirror.position(self.node.me());
            match self.router.request(Request::Tasks(TaskRequest::Watch(pos))).await? {
                Response::Delta(d) => {
                    mirror.apply(d).map_err(|e| Error::BadRequest(e.to_string()))?;
                }
                r => return Err(unexpected(&r)),
            }
        }
        Ok((mirror.revision(), mirror.state().clone()))
    }

    /// One round of the session: heartbeat, then bring the certificate and Raft in line with the
    /// role the store wants.
    pub(super) async fn reconcile_once(&self) -> Result<(), Error> {
        let _g = self.round.lock().await;
        let version = self.node.keyring.borrow().version;
        let wg_public_key = self.node.local().wg_public_key;
        let ca = self.node.identity.read().map(|i| security::ca_report(&i)).unwrap_or_default();
        let s = match self
            .router
            .request(Request::Heartbeat { keyring_version: version, wg_public_key, ca })
            .await?
        {
            Response::Session(s) => s,
            r => return Err(unexpected(&r)),
        };
        let changed = {
            let mut l = match self.node.local.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            let mut changed = false;
            if !s.managers.is_empty() && l.managers != s.managers {
                l.managers = s.managers.clone();
                changed = true;
            }
            if self.node.manager().is_none() && l.keyring != s.keyring {
                l.keyring = s.keyring.clone();
                changed = true;
            }
            changed
        };
        if self.node.manager().is_none() {
            self.node.keyring.send_if_modified(|k| {
                if *k != s.keyring {
                    *k = s.keyring.clone();
                    true
                } else {
                    false
                }
            });
        }
        if changed {
            self.node.save_local()?;
        }
        self.router.set_managers(&s.manager_ids);
        let expiring = self.follow_session(&s)?;
        if self.node.cert_role() != s.desired_role || expiring {
            self.renew(s.desired_role).await?;
        }
        match (s.desired_role, self.node.cert_role(), s.voter) {
            (Role::Manager, Role::Manager, false) => {
                self.node.start_raft().await?;
                self.router.request(Request::Manage(ManageRequest::JoinRaft)).await?;
            }
            (Role::Worker, Role::Worker, false) if self.node.manager().is_some() => {
                self.node.stop_raft().await;
                let path = self.node.dir.join(RAFT_FILE);
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("removing {}", path.display())))?;
            }
            _ => {}
        }
        if s.desired_role == Role::Manager && self.node.manager().is_some() {
            // Keep the local keyring file current on managers too, for a restart.
            let kr = self.node.keyring.borrow().clone();
            let save = self.node.local.lock().map(|mut l| {
                let differs = l.keyring != kr;
                l.keyring = kr;
                differs
            });
            if save.unwrap_or(false) {
                self.node.save_local()?;
            }
        }
        Ok(())
    }

    async fn renew(&self, role: Role) -> Result<(), Error> {
        let (key, csr) = new_key_and_csr()?;
        let cert_pem = match self.router.call_leader(Request::RenewCert { csr_pem: csr }).await? {
            Response::Cert { cert_pem } => cert_pem,
            Response::Error(e) => return Err(from_rpc(e)),
            r => return Err(unexpected(&r)),
        };
        let ca = self.node.identity.read().map(|i| i.ca_pem.clone()).map_err(|_| poisoned())?;
        let id = NodeIdentity::from_pem(key, cert_pem, ca)?;
        if id.info.role != role || id.info.node != self.node.me() {
            return Err(Error::Refused(format!(
                "the renewed certificate is for {} as {}, expected {role}",
                id.info.node, id.info.role
            )));
        }
        write_file(&self.node.dir.join(KEY_FILE), &id.key_pem)?;
        write_file(&self.node.dir.join(CERT_FILE), &id.cert_pem)?;
        self.node.transport.set_identity(&id)?;
        if let Ok(mut i) = self.node.identity.write() {
            *i = id;
        }
        tracing::info!(role = %role, "node certificate renewed");
        Ok(())
    }

    /// After a heartbeat: trusts the CAs the session names, and says whether the certificate
    /// must be renewed (expiring, issued for longer than the swarm's expiry now allows, or from a
    /// CA that no longer signs).
    fn follow_session(&self, s: &SessionInfo) -> Result<bool, Error> {
        let id = self.node.identity.read().map(|i| i.clone()).map_err(|_| poisoned())?;
        let wanted: Vec<[u8; 32]> =
            s.ca_pems.iter().map(|p| ca::pem_digest(p)).collect::<Result<_, _>>()?;
        let id = if wanted.is_empty() || wanted == id.trusted_digests() {
            id
        } else {
            let next = id.with_cas(security::bundle(&s.ca_pems))?;
            write_file(&self.node.dir.join(CA_FILE), &next.ca_pem)?;
            self.node.transport.set_identity(&next)?;
            *self.node.identity.write().map_err(|_| poisoned())? = next.clone();
            tracing::info!(cas = s.ca_pems.len(), "trusting the swarm's CA certificates");
            next
        };
        let expiry = match s.cert_expiry_secs {
            0 => DEFAULT_CERT_EXPIRY,
            secs => Duration::from_secs(secs),
        };
        let stale = wanted.first().is_some_and(|d| id.ca_digest().ok().as_ref() != Some(d));
        Ok(stale || id.needs_renewal((now_ms() / 1000) as i64, expiry))
    }
}

/// On managers: probes the other voters every Raft heartbeat and lets this one campaign only
/// while a majority has no live leader (pre-vote, see `failover`).
pub(super) async fn probe_loop(node: Arc<Node>) {
    let mut allowed = true;
    loop {
        tokio::time::sleep(node.tuning.raft_heartbeat).await;
        let Some(m) = node.manager() else { continue };
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
        let window = node.tuning.raft_election_min;
        let mut calls = tokio::task::JoinSet::new();
        for (id, addr) in peers {
            let transport = node.transport.clone();
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
            tracing::info!(node = %node.local().hostname, may_campaign = may, "pre-vote");
            m.raft.runtime_config().elect(may);
            allowed = may;
        }
    }
}

fn poisoned() -> Error {
    Error::Store("identity lock poisoned".into())
}
