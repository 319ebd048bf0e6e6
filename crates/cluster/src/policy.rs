//! The leader's decisions, sans-I/O: who missed heartbeats, who has not confirmed a keyring
//! version, and whether removing a voter keeps quorum. Time comes in as arguments.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::model::{ClusterState, NodeId, NodeStatus};

/// Heartbeats missed before a node that was heard from is marked Down (Swarm: 3).
pub const MISSED_HEARTBEATS: u32 = 3;
/// Periods a node not yet heard from since this leader took over gets (Swarm: 6).
pub const GRACE_AFTER_ELECTION: u32 = 6;

/// What the leader knows about sessions: last heartbeat and keyring version per node.
#[derive(Debug, Default, Clone)]
pub struct HeartbeatBook {
    since: Option<Instant>,
    last_seen: HashMap<NodeId, Instant>,
    acks: HashMap<NodeId, u64>,
}

impl HeartbeatBook {
    /// Leadership as of `now`: the book starts when this node leads and is emptied when it stops,
    /// so a new leader gives every node the longer grace period.
    pub fn handle_leadership(&mut self, now: Instant, leading: bool) {
        if leading {
            self.since.get_or_insert(now);
        } else {
            *self = HeartbeatBook::default();
        }
    }

    /// A heartbeat from `node` carrying the keyring version it has installed.
    pub fn handle_heartbeat(&mut self, now: Instant, node: NodeId, keyring_version: u64) {
        self.last_seen.insert(node, now);
        self.acks.insert(node, keyring_version);
    }

    /// A node that just joined counts as heard from.
    pub fn handle_join(&mut self, now: Instant, node: NodeId) {
        self.last_seen.insert(node, now);
    }

    /// Ready nodes (other than `me`) whose heartbeats stopped: to be marked Down.
    pub fn poll_stale(
        &self,
        now: Instant,
        period: Duration,
        state: &ClusterState,
        me: NodeId,
    ) -> Vec<NodeId> {
        let Some(since) = self.since else { return Vec::new() };
        state
            .nodes
            .values()
            .filter(|n| n.id != me && n.status == NodeStatus::Ready)
            .filter(|n| match self.last_seen.get(&n.id) {
                Some(t) => now.saturating_duration_since(*t) > period * MISSED_HEARTBEATS,
                None => now.saturating_duration_since(since) > period * GRACE_AFTER_ELECTION,
            })
            .map(|n| n.id)
            .collect()
    }

    /// Host names of Ready nodes that have not confirmed keyring `version` yet.
    pub fn lagging(&self, state: &ClusterState, version: u64) -> Vec<String> {
        state
            .nodes
            .values()
            .filter(|n| {
                n.status == NodeStatus::Ready
                    && self.acks.get(&n.id).copied().unwrap_or(0) < version
            })
            .map(|n| n.hostname.clone())
            .collect()
    }
}

/// Why removing a voter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumShortfall {
    /// Reachable voters that would remain.
    pub reachable: usize,
    /// Voters that would remain.
    pub remaining: usize,
    /// Quorum of the remaining voters.
    pub need: usize,
}

/// Whether `target` can leave the voters with a reachable quorum of the rest still there.
/// `reachable(v)` says whether the leader reaches voter `v` (the leader counts itself).
pub fn quorum_after_removal(
    voters: &BTreeSet<u64>,
    target: u64,
    reachable: impl Fn(u64) -> bool,
) -> Result<(), QuorumShortfall> {
    if !voters.contains(&target) {
        return Ok(());
    }
    let remaining = voters.len() - 1;
    let up = voters.iter().filter(|v| **v != target && reachable(**v)).count();
    let need = remaining / 2 + 1;
    if remaining == 0 || up < need {
        return Err(QuorumShortfall { reachable: up, remaining, need });
    }
    Ok(())
}

/// The warning Docker prints for an even number of managers.
pub fn even_warning(managers: usize) -> Option<String> {
    (managers > 0 && managers.is_multiple_of(2)).then(|| {
        format!(
            "the swarm now has an even number of managers ({managers}); this adds no fault tolerance over {}: an odd number is recommended",
            managers - 1
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Availability, NodeRecord, Role};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn state(nodes: &[(u64, NodeStatus)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, status) in nodes {
            s.nodes.insert(
                NodeId(*id),
                Arc::new(NodeRecord {
                    id: NodeId(*id),
                    hostname: format!("n{id}"),
                    role: Role::Worker,
                    availability: Availability::Active,
                    labels: BTreeMap::new(),
                    addr: "127.0.0.1:2377".parse().expect("addr"),
                    data_addr: "127.0.0.1".parse().expect("ip"),
                    wg_public_key: None,
                    status: *status,
                    status_message: String::new(),
                    engine_version: String::new(),
                    created_ms: 0,
                    updated_ms: 0,
                }),
            );
        }
        s
    }

    #[test]
    fn missed_heartbeats_and_grace_after_election() {
        let p = Duration::from_secs(5);
        let t0 = Instant::now();
        let s = state(&[
            (1, NodeStatus::Ready),
            (2, NodeStatus::Ready),
            (3, NodeStatus::Ready),
            (4, NodeStatus::Down),
        ]);
        let mut b = HeartbeatBook::default();
        // Not leading: nothing is ever stale.
        assert!(b.poll_stale(t0 + p * 100, p, &s, NodeId(1)).is_empty());
        b.handle_leadership(t0, true);
        b.handle_heartbeat(t0, NodeId(2), 1);
        // 3 periods: fine; just over: node 2 is stale. Node 3 (never heard) has 6 periods.
        assert!(b.poll_stale(t0 + p * 3, p, &s, NodeId(1)).is_empty());
        assert_eq!(
            b.poll_stale(t0 + p * 3 + Duration::from_millis(1), p, &s, NodeId(1)),
            vec![NodeId(2)]
        );
        assert_eq!(
            b.poll_stale(t0 + p * 6 + Duration::from_millis(1), p, &s, NodeId(1)),
            vec![NodeId(2), NodeId(3)]
        );
        // A fresh heartbeat clears it; losing leadership forgets everything.
        b.handle_heartbeat(t0 + p * 6, NodeId(2), 1);
        b.handle_heartbeat(t0 + p * 6, NodeId(3), 1);
        assert!(b.poll_stale(t0 + p * 7, p, &s, NodeId(1)).is_empty());
        b.handle_leadership(t0 + p * 7, false);
        assert!(b.poll_stale(t0 + p * 100, p, &s, NodeId(1)).is_empty());
    }

    #[test]
    fn keyring_laggards_are_ready_nodes_below_the_version() {
        let s = state(&[(1, NodeStatus::Ready), (2, NodeStatus::Ready), (3, NodeStatus::Down)]);
        let mut b = HeartbeatBook::default();
        let now = Instant::now();
        b.handle_heartbeat(now, NodeId(1), 5);
        b.handle_heartbeat(now, NodeId(2), 4);
        assert_eq!(b.lagging(&s, 5), vec!["n2".to_string()]);
        b.handle_heartbeat(now, NodeId(2), 5);
        assert!(b.lagging(&s, 5).is_empty());
    }

    #[test]
    fn quorum_rules() {
        let three: BTreeSet<u64> = [1, 2, 3].into();
        assert_eq!(quorum_after_removal(&three, 3, |_| true), Ok(()));
        // Voter 2 down: removing 3 leaves {1, 2} with one reachable, two needed.
        assert_eq!(
            quorum_after_removal(&three, 3, |v| v != 2),
            Err(QuorumShortfall { reachable: 1, remaining: 2, need: 2 })
        );
        let one: BTreeSet<u64> = [1].into();
        assert!(quorum_after_removal(&one, 1, |_| true).is_err());
        // Not a voter: nothing to lose.
        assert_eq!(quorum_after_removal(&one, 9, |_| false), Ok(()));
    }

    #[test]
    fn even_numbers_warn() {
        assert!(even_warning(2).is_some_and(|w| w.contains("(2)")));
        assert!(even_warning(3).is_none());
        assert!(even_warning(0).is_none());
    }
}
