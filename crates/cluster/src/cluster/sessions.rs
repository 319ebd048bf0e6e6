//! The loops every node runs: its session with the leader (heartbeats, role changes,
//! certificate renewal, keyring), the managers' pre-vote probe, and the leader's liveness check.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::model::{Command, NodeId, NodeStatus, Role};
use crate::pki::{NodeIdentity, new_key_and_csr};
use crate::wire::{ManageRequest, Request, Response};

use super::errors::{from_rpc, unexpected};
use super::files::{io_err, write_file};
use super::security;
use super::{CERT_FILE, HEARTBEAT_FAILURE, Inner, KEY_FILE, RAFT_FILE, lock};

/// On managers: probes the other voters every Raft heartbeat and lets this one campaign only
/// while a majority has no live leader (pre-vote, see `failover`).
pub(super) async fn probe_loop(inner: Arc<Inner>) {
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

pub(super) async fn session_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.tuning.heartbeat).await;
        if let Err(e) = inner.reconcile_once().await {
            tracing::debug!(node = %inner.local().hostname, error = %e, "session with the managers");
        }
    }
}

/// On the leader: nodes that stop heartbeating are marked Down (3 periods; 6 for nodes not yet
/// heard from since this node became leader).
pub(super) async fn liveness_loop(inner: Arc<Inner>) {
    // When this node, as leader, last replaced the gossip key or began to lead (None while it
    // does not lead: a new leader waits one whole period). The period is read each round, so a
    // `swarm update --gossip-key-rotation` takes effect at once.
    let mut rotated: Option<Instant> = None;
    loop {
        tokio::time::sleep(inner.tuning.heartbeat).await;
        let Some(m) = inner.manager() else { continue };
        let me = inner.me();
        let leading = m.leads();
        let now = Instant::now();
        // `swarm update --gossip-key-rotation` overrides the agent's setting.
        let period = m
            .sm
            .with_state(|s| s.cluster.as_ref().and_then(|c| c.security.gossip_key_rotation_secs))
            .map_or(inner.tuning.gossip_key_rotation, Duration::from_secs);
        match rotated {
            _ if !leading => rotated = None,
            None => rotated = Some(now),
            Some(last) if now >= last + period => {
                rotated = Some(now);
                inner.rotate_in_background(&m, "scheduled");
            }
            Some(_) => {}
        }
        let stale: Vec<NodeId> = {
            let mut b = match inner.leader.heartbeats.lock() {
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
            if let Err(e) = m.write(cmd).await {
                tracing::debug!(error = %e, "marking a node down");
            }
        }
    }
}

impl Inner {
    /// One round of the session: heartbeat, then bring the certificate and Raft in line with the
    /// role the store wants.
    pub(super) async fn reconcile_once(self: &Arc<Self>) -> Result<(), Error> {
        let _g = self.session.round.lock().await;
        let version = self.keyring.borrow().version;
        let wg_public_key = self.local().wg_public_key;
        let ca = self.identity.read().map(|i| security::ca_report(&i)).unwrap_or_default();
        let s = match self
            .request(Request::Heartbeat { keyring_version: version, wg_public_key, ca })
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
        let expiring = self.follow_session(&s)?;
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

    pub(super) async fn renew(self: &Arc<Self>, role: Role) -> Result<(), Error> {
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
        tracing::info!(role = %role, "node certificate renewed");
        Ok(())
    }
}
