//! The leader's side of the certificate settings (see `ca`): [`Security`], which keeps each
//! node's word on its certificate and runs `swarm update` and `swarm ca [--rotate]`; and what
//! the rest of the handle needs of certificates (what a heartbeat reports, which CA signed a
//! peer, a trust bundle, signing a renewal).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;
use super::manager::ManagerParts;
use crate::ca::{self, CaAnswer, CaBook, CaReport};
use crate::model::security::{self, CaRotation, CaStep, SwarmUpdate};
use crate::model::{Command, NodeId, Role};
use crate::pki::{ClusterCa, NodeIdentity, certs_from_pem, issuer_index};
use crate::token::ca_digest;
use crate::wire::{Response, SessionInfo};
use crate::{Error, Tuning};

/// What the leader keeps for the swarm's certificates: each node's last word on its own (which
/// CAs it trusts, which one signed it), that a CA rotation waits on.
#[derive(Debug)]
pub(super) struct Security {
    tuning: Tuning,
    reports: Mutex<CaBook>,
}

impl Security {
    pub(super) fn new(tuning: Tuning) -> Security {
        Security { tuning, reports: Mutex::default() }
    }

    /// `swarm update` on the leader: the state machine checks the values again.
    pub(super) async fn update_swarm(
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

    /// `swarm ca --rotate` on the leader, under the leader's rotation lock; the warnings name
    /// nodes that did not follow a step in time. The rotation walks the steps of `ca` from
    /// wherever the store says it is, so one that a former leader left half-done is carried on.
    pub(super) async fn rotate_ca(&self, m: &ManagerParts) -> Result<Vec<String>, Error> {
        let mut warnings = Vec::new();
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
        Ok(warnings)
    }

    /// Waits until every Ready node's heartbeat satisfies `done`; returns the ones that did not.
    async fn wait_ca(&self, m: &ManagerParts, done: impl Fn(&CaReport) -> bool) -> Vec<String> {
        let deadline = Instant::now() + self.tuning.heartbeat * 10 + Duration::from_secs(2);
        loop {
            let lagging = m.sm.with_state(|s| lock(&self.reports).lagging(s, &done));
            if lagging.is_empty() || Instant::now() >= deadline {
                return lagging;
            }
            tokio::time::sleep(self.tuning.heartbeat / 3).await;
        }
    }

    /// A heartbeat's word on the caller's certificate, and what the session tells it back: the
    /// managers, the CAs to trust and the certificate expiry.
    pub(super) fn session(
        &self,
        m: &ManagerParts,
        node: NodeId,
        report: CaReport,
        session: &mut SessionInfo,
    ) {
        lock(&self.reports).handle_report(node, report);
        m.sm.with_state(|s| {
            session.manager_ids = s.managers().map(|n| n.id).collect();
            if let Some(info) = &s.cluster {
                session.ca_pems = ca::trusted_ca_pems(info);
                session.cert_expiry_secs = info.security.cert_expiry_secs;
            }
        });
    }
}

/// The answer to `swarm ca`: the CA certificate that signs now, with a rotation's warnings.
pub(super) fn ca_answer(m: &ManagerParts, warnings: Vec<String>) -> Result<Response, Error> {
    let answer = CaAnswer { cert_pem: info_of(m)?.ca_cert_pem, warnings };
    serde_json::to_value(answer).map(Response::Value).map_err(|e| Error::Store(e.to_string()))
}

/// Signs a renewal for `node` with the CA that signs now, for the swarm's expiry.
pub(super) fn sign_renewal(
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

/// What a heartbeat says of this node's certificate.
pub(super) fn ca_report(id: &NodeIdentity) -> CaReport {
    CaReport { trusts: id.trusted_digests(), signed_by: id.ca_digest().ok() }
}

/// The CA that signed a connection's client certificate, by digest, among those `id` trusts.
pub(super) fn peer_ca(id: &NodeIdentity, cert: &[u8]) -> Option<[u8; 32]> {
    let cas = certs_from_pem(&id.ca_pem);
    issuer_index(cert, &cas).map(|i| ca_digest(&cas[i]))
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
