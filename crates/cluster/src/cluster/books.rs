//! State two parts of the handle own apart from the rest: what a leader keeps about the
//! nodes' sessions ([`LeaderBooks`]) and what this node's own session keeps ([`SessionBook`]).

use std::sync::Mutex;

use crate::ca::CaBook;
use crate::model::NodeId;
use crate::policy::HeartbeatBook;

/// What this node keeps for when it leads: each node's heartbeats and keyring version, each
/// node's word on its certificate (CA rotation), and the locks that let one membership change
/// and one rotation (gossip key or CA) run at a time.
#[derive(Debug, Default)]
pub(super) struct LeaderBooks {
    pub(super) heartbeats: Mutex<HeartbeatBook>,
    pub(super) ca_reports: Mutex<CaBook>,
    pub(super) membership: tokio::sync::Mutex<()>,
    pub(super) rotation: tokio::sync::Mutex<()>,
}

/// What this node's session with the leader keeps: the lock that lets one round (or a leave)
/// run at a time, and the store's managers as the last round said (who may ask this node
/// directly).
#[derive(Debug, Default)]
pub(super) struct SessionBook {
    pub(super) round: tokio::sync::Mutex<()>,
    pub(super) manager_ids: Mutex<Vec<NodeId>>,
}
