//! What the driver publishes after every change, read by the agent and by the Prometheus
//! collector without blocking the driver.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::core::{MemberState, MemberView};
use crate::metrics::Metrics;
use crate::types::{EntryKey, Identity, NodeId};

/// What the driver publishes after every change: members, visible entries, metrics.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Our identity (changes generation on restart, bump on a renewed rejoin).
    pub identity: Option<Identity>,
    /// All known members, ourselves first.
    pub members: Vec<MemberView>,
    /// Visible entries (live, owner alive) with their owner, in key order.
    pub entries: Vec<(EntryKey, NodeId, Bytes)>,
    /// Networks we participate in.
    pub networks: Vec<String>,
    /// Keyring ids, primary first.
    pub key_ids: Vec<u32>,
    /// Counters and members by state.
    pub metrics: Metrics,
}

impl Snapshot {
    /// The members suspected now: alive to gossip (their entries are visible) but failing
    /// their probes, down soon unless they refute.
    pub fn suspected(&self) -> BTreeSet<NodeId> {
        self.members.iter().filter(|m| m.state == MemberState::Suspect).map(|m| m.id.node).collect()
    }

    /// Visible entries of one table in one network: (key, owner, value).
    pub fn table(&self, table: &str, network: &str) -> Vec<(String, NodeId, Bytes)> {
        self.entries
            .iter()
            .filter(|(k, _, _)| k.table == table && k.network == network)
            .map(|(k, o, v)| (k.key.clone(), *o, v.clone()))
            .collect()
    }
}
