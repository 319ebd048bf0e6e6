//! CA rotation, pure: the three steps of `swarm ca --rotate`, the CAs every node trusts at each,
//! and what the leader hears from each node. The settings and the steps as store data, and how
//! the store applies them, are `model::security`.
//!
//! A CA rotation never leaves two nodes unable to talk:
//! 1. **trust**: the new CA is added to every node's trust bundle; the old CA still signs.
//! 2. **renew**: once every Ready node trusts both, the new CA signs; every node's session sees
//!    its certificate is from the old one and renews it.
//! 3. **finish**: once every Ready node holds a certificate from the new CA, the old one leaves
//!    the bundle, and a certificate it signed is refused at the handshake (and on connections
//!    opened before).
//!
//! The leader drives the steps (`Cluster::rotate_ca`) and learns where each node is from its
//! heartbeats ([`CaBook`]); the steps themselves are store commands ([`CaStep`](crate::model::security::CaStep)), so a new
//! leader picks a rotation up where the old one left it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::security::CaRotation;
use crate::model::{ClusterInfo, ClusterState, NodeId, NodeStatus};
use crate::pki::{ClusterCa, PkiError, cert_der_from_pem};
use crate::token::ca_digest;

/// The answer to `swarm ca [--rotate]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAnswer {
    /// The swarm's CA certificate, PEM (the new one after a rotation).
    pub cert_pem: String,
    /// Nodes that did not confirm a rotation step in time, and the like.
    pub warnings: Vec<String>,
}

/// The CA certificates every node must trust now, PEM, the one that signs first.
pub fn trusted_ca_pems(info: &ClusterInfo) -> Vec<String> {
    let mut v = vec![info.ca_cert_pem.clone()];
    match &info.security.ca_rotation {
        Some(CaRotation::Trust { cert_pem, .. }) => v.push(cert_pem.clone()),
        Some(CaRotation::Renew { old_cert_pem }) => v.push(old_cert_pem.clone()),
        None => {}
    }
    v
}

/// The CA that signs node certificates now.
pub fn signer(info: &ClusterInfo) -> Result<ClusterCa, PkiError> {
    ClusterCa::from_pem(&info.ca_cert_pem, &info.ca_key_pem)
}

/// SHA-256 of a CA certificate PEM (what join tokens and heartbeats name a CA by).
pub fn pem_digest(pem: &str) -> Result<[u8; 32], PkiError> {
    Ok(ca_digest(&cert_der_from_pem(pem)?))
}

/// What the leader last heard from each node about its certificate: the CAs it trusts and
/// the CA that signed its certificate (both by digest), from its heartbeats.
#[derive(Debug, Default)]
pub struct CaBook {
    nodes: BTreeMap<NodeId, CaReport>,
}

/// One node's word on its certificate, carried by every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaReport {
    /// Digests of the CAs the node trusts.
    pub trusts: Vec<[u8; 32]>,
    /// Digest of the CA that signed its certificate.
    pub signed_by: Option<[u8; 32]>,
}

impl CaBook {
    /// Records a heartbeat's report.
    pub fn handle_report(&mut self, node: NodeId, report: CaReport) {
        self.nodes.insert(node, report);
    }

    /// Host names of the Ready nodes whose last report does not satisfy `done`.
    pub fn lagging(&self, state: &ClusterState, done: impl Fn(&CaReport) -> bool) -> Vec<String> {
        state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Ready)
            .filter(|n| !self.nodes.get(&n.id).is_some_and(&done))
            .map(|n| n.hostname.clone())
            .collect()
    }
}
