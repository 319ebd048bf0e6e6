//! The [`Cluster`] side of the certificate settings (see `ca`) and of request authorization
//! (see `authz`): `swarm update`, `swarm ca [--rotate]` on the leader, a node following the
//! trust bundle and renewing its certificate, and the checks on Raft messages, direct requests
//! and connections whose CA is no longer trusted.

use std::time::{Duration, Instant};

use super::errors::{rpc_err, unexpected};
use super::files::write_file;
use super::manager::ManagerParts;
use super::{CA_FILE, Cluster, Inner};
use crate::Error;
use crate::ca::{self, CaAnswer, CaReport};
use crate::model::security::{self, CaRotation, CaStep, SwarmUpdate};
use crate::model::{Command, NodeId, Role, now_ms};
use crate::pki::{ClusterCa, NodeIdentity, certs_from_pem, issuer_index};
use crate::token::ca_digest;
use crate::wire::{
    Caller, ErrorKind, ManageRequest, NodeRequest, RaftRequest, Request, Response, SessionInfo,
};

impl Cluster {
    /// `swarm update`: changes the swarm's certificate expiry and gossip key rotation period.
    pub async fn update_swarm(&self, update: SwarmUpdate) -> Result<(), Error> {
        self.done(Request::Manage(ManageRequest::UpdateSwarm(update))).await.map(|_| ())
    }

    /// `swarm ca [--rotate]`: the swarm's CA certificate, after a rotation (see `ca`) when
    /// `rotate`; the warnings name nodes that did not follow a step in time.
    pub async fn ca(&self, rotate: bool) -> Result<CaAnswer, Error> {
        match self.inner.request(Request::Manage(ManageRequest::Ca { rotate })).await? {
            Response::Value(v) => serde_json::from_value(v)
                .map_err(|e| Error::BadRequest(format!("malformed CA answer: {e}"))),
            r => Err(unexpected(&r)),
        }
    }

    /// The swarm settings as this manager's store has them (`None` on a worker).
    pub fn security_config(&self) -> Option<security::SecurityConfig> {
        let m = self.inner.manager()?;
        m.sm.with_state(|s| s.cluster.as_ref().map(|c| c.security.clone()))
    }

    /// Requests this node refused since it started (see `authz`), for `/metrics`.
    pub fn refusals(&self) -> crate::authz::RefusalCounts {
        self.inner.refusals.counts()
    }
}

/// What a heartbeat says of this node's certificate.
pub(super) fn ca_report(id: &NodeIdentity) -> CaReport {
    CaReport { trusts: id.trusted_digests(), signed_by: id.ca_digest().ok() }
}

/// The CA that signed a connection's client certificate, by digest, among those `id` trusts.
pub(super) fn peer_ca(id: &NodeIdentity, cert: &[u8]) -> Option<[u8; 32]> {
    let cas = certs_from_pem(&id.ca_pem);
    issuer_index(cert, &cas).map(|i| ca_digest(&cas[i]))
}

impl Inner {
    /// `swarm update` on the leader: the state machine checks the values again.
    pub(super) async fn leader_update_swarm(
        &self,
        m: &ManagerParts,
        update: SwarmUpdate,
    ) -> Result<Response, Error> {
        if let Some(s) = update.cert_expiry_secs {
            security::check_cert_expiry(Duration::from_secs(s)).map_err(Error::BadRequest)?;
        }
        if let Some(s) = update.gossip_key_rotation_secs {
            security::check_gossip_key_rotation(Duration::from_secs(s))
                .map_err(Error::BadRequest)?;
        }
        m.write(Command::Security(CaStep::Update(update))).await?;
        Ok(Response::Done { warnings: Vec::new() })
    }

    /// `swarm ca [--rotate]` on the leader. A rotation walks the steps of `ca` from wherever
    /// the store says it is, so one that a former leader left half-done is carried on.
    pub(super) async fn leader_ca(
        &self,
        m: &ManagerParts,
        rotate: bool,
    ) -> Result<Response, Error> {
        let mut warnings = Vec::new();
        if rotate {
            let _g = self.leader.rotation.lock().await;
            if info_of(m)?.security.ca_rotation.is_some() {
                warnings.push("a CA rotation was under way; it was carried on".into());
            } else {
                let new = ClusterCa::generate()?;
                let step = CaStep::Trust { cert_pem: new.cert_pem, key_pem: new.key_pem };
                m.write(Command::Security(step)).await?;
            }
            if let Some(CaRotation::Trust { cert_pem, .. }) = info_of(m)?.security.ca_rotation {
                let new = ca::pem_digest(&cert_pem)?;
                let lag = self.wait_ca(m, |r| r.trusts.contains(&new)).await;
                note(&mut warnings, "new CA trusted", lag);
                m.write(Command::Security(CaStep::Renew)).await?;
            }
            let info = info_of(m)?;
            if let Some(CaRotation::Renew { .. }) = info.security.ca_rotation {
                let new = ca::pem_digest(&info.ca_cert_pem)?;
                let lag = self.wait_ca(m, |r| r.signed_by == Some(new)).await;
                note(&mut warnings, "certificate from the new CA", lag);
                m.write(Command::Security(CaStep::Finish)).await?;
            }
        }
        let answer = CaAnswer { cert_pem: info_of(m)?.ca_cert_pem, warnings };
        serde_json::to_value(answer).map(Response::Value).map_err(|e| Error::Store(e.to_string()))
    }

    /// Waits until every Ready node's heartbeat satisfies `done`; returns the ones that did not.
    async fn wait_ca(&self, m: &ManagerParts, done: impl Fn(&CaReport) -> bool) -> Vec<String> {
        let deadline = Instant::now() + self.tuning.heartbeat * 10 + Duration::from_secs(2);
        loop {
            let lagging =
                m.sm.with_state(|s| super::lock(&self.leader.ca_reports).lagging(s, &done));
            if lagging.is_empty() || Instant::now() >= deadline {
                return lagging;
            }
            tokio::time::sleep(self.tuning.heartbeat / 3).await;
        }
    }

    /// A heartbeat's word on the caller's certificate, and what the session tells it back: the
    /// managers, the CAs to trust and the certificate expiry.
    pub(super) fn session_security(
        &self,
        m: &ManagerParts,
        node: NodeId,
        report: CaReport,
        session: &mut SessionInfo,
    ) {
        super::lock(&self.leader.ca_reports).handle_report(node, report);
        m.sm.with_state(|s| {
            session.manager_ids = s.managers().map(|n| n.id).collect();
            if let Some(info) = &s.cluster {
                session.ca_pems = ca::trusted_ca_pems(info);
                session.cert_expiry_secs = info.security.cert_expiry_secs;
            }
        });
    }

    /// On every node, after a heartbeat: trusts the CAs the session names, keeps the manager
    /// list for direct requests, and says whether the certificate must be renewed (expiring,
    /// issued for longer than the swarm's expiry now allows, or from a CA that no longer signs).
    pub(super) fn follow_session(&self, s: &SessionInfo) -> Result<bool, Error> {
        if !s.manager_ids.is_empty() {
            *super::lock(&self.session.manager_ids) = s.manager_ids.clone();
        }
        let id = self.identity.read().map(|i| i.clone()).map_err(|_| poisoned())?;
        let wanted: Vec<[u8; 32]> =
            s.ca_pems.iter().map(|p| ca::pem_digest(p)).collect::<Result<_, _>>()?;
        let id = if wanted.is_empty() || wanted == id.trusted_digests() {
            id
        } else {
            let next = id.with_cas(bundle(&s.ca_pems))?;
            write_file(&self.dir.join(CA_FILE), &next.ca_pem)?;
            self.transport.set_identity(&next)?;
            *self.identity.write().map_err(|_| poisoned())? = next.clone();
            tracing::info!(cas = s.ca_pems.len(), "trusting the swarm's CA certificates");
            next
        };
        let expiry = match s.cert_expiry_secs {
            0 => security::DEFAULT_CERT_EXPIRY,
            secs => Duration::from_secs(secs),
        };
        let stale = wanted.first().is_some_and(|d| id.ca_digest().ok().as_ref() != Some(d));
        Ok(stale || id.needs_renewal((now_ms() / 1000) as i64, expiry))
    }

    /// Signs a renewal for `node` with the CA that signs now, for the swarm's expiry.
    pub(super) fn sign_renewal(
        &self,
        m: &ManagerParts,
        node: NodeId,
        role: Role,
        csr: &str,
    ) -> Result<String, Error> {
        let info = info_of(m)?;
        let ca = ca::signer(&info)?;
        ca.sign_csr_for(csr, node, role, info.security.cert_expiry())
            .map_err(|e| Error::BadRequest(format!("certificate signing request refused: {e}")))
    }

    /// Raft messages only from Raft's own membership (see `authz`).
    pub(super) fn check_raft(
        &self,
        m: &ManagerParts,
        caller: NodeId,
        r: &RaftRequest,
    ) -> Option<Response> {
        let what = match r {
            RaftRequest::Append(_) => "AppendEntries",
            RaftRequest::Vote(_) => "Vote",
            RaftRequest::Snapshot(_) => "InstallSnapshot",
        };
        let effective = m.raft.metrics().borrow().membership_config.membership().clone();
        let applied = m.sm.applied_membership();
        let e = crate::authz::check_raft_sender(caller, what, &effective, &applied).err()?;
        self.refusals.raft();
        tracing::warn!(node = %caller, "{e}");
        Some(rpc_err(ErrorKind::PermissionDenied, e))
    }

    /// Direct requests only from the store's managers: this manager's store, or on a worker the
    /// list its last session brought (before the first one, the certificate's role stands).
    pub(super) fn check_node_request(&self, caller: NodeId, r: &NodeRequest) -> Option<Response> {
        let manager = match self.manager() {
            Some(m) => {
                m.sm.with_state(|s| s.nodes.get(&caller).map(|n| n.role)) == Some(Role::Manager)
            }
            None => {
                let ids = super::lock(&self.session.manager_ids);
                ids.is_empty() || ids.contains(&caller)
            }
        };
        if manager {
            return None;
        }
        self.refusals.node_request();
        tracing::warn!(node = %caller, request = ?r, "a direct request from a node that is not a manager");
        Some(rpc_err(
            ErrorKind::PermissionDenied,
            format!(
                "node {caller} is not a manager of this swarm; only managers ask nodes directly"
            ),
        ))
    }

    /// A request over a connection whose client certificate a CA this node no longer trusts
    /// signed (opened before a CA rotation finished) is refused: `Some` answer.
    pub(super) fn check_peer_ca(
        &self,
        caller: Caller,
        peer_ca: Option<[u8; 32]>,
    ) -> Option<Response> {
        let Caller::Member { node, .. } = caller else { return None };
        let trusted = self.identity.read().map(|i| i.trusted_digests()).unwrap_or_default();
        if peer_ca.is_some_and(|d| trusted.contains(&d)) {
            return None;
        }
        self.refusals.untrusted_ca();
        Some(rpc_err(
            ErrorKind::PermissionDenied,
            format!(
                "node {node}'s certificate is from a CA this swarm no longer trusts; join the swarm again"
            ),
        ))
    }
}

fn info_of(m: &ManagerParts) -> Result<crate::model::ClusterInfo, Error> {
    m.sm.with_state(|s| s.cluster.clone())
        .ok_or_else(|| Error::NoLeader("the swarm is still initialising".into()))
}

fn note(warnings: &mut Vec<String>, step: &str, lag: Vec<String>) {
    if !lag.is_empty() {
        warnings.push(format!(
            "{step}: no confirmation in time from {} (a node that missed the rotation must join again)",
            lag.join(", ")
        ));
    }
}

/// A trust bundle's PEM: the certificates one after another.
pub(super) fn bundle(pems: &[String]) -> String {
    pems.iter().map(|p| p.trim_end()).collect::<Vec<_>>().join("\n") + "\n"
}

fn poisoned() -> Error {
    Error::Store("identity lock poisoned".into())
}
