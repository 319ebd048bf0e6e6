//! Who may send a manager Raft's messages, and a node its direct requests, beyond holding a
//! certificate from the swarm's CA. The certificate names the caller; what the caller may do
//! comes from the cluster as it is now:
//! - Raft messages (AppendEntries, Vote, InstallSnapshot) come only from nodes in Raft's own
//!   membership, the voters and learners of the log: the configuration in effect (the newest
//!   in the log) or the last one applied, so a leader that removes itself still commits that
//!   removal. A manager whose log is still empty (it was just added and has received nothing)
//!   has no membership to check against, and takes the leader's first append on the
//!   certificate alone.
//! - Direct requests (a task's logs, diagnostics) come only from the store's managers, as the
//!   leader last told this node (each heartbeat), or as a manager's own store says.
//!
//! Every refusal is counted ([`Refusals`]) and answered with a message that says why.

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::{BasicNode, Membership};

use crate::model::NodeId;

/// Refusals counted since the agent started, for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    raft: AtomicU64,
    node_requests: AtomicU64,
    untrusted_ca: AtomicU64,
}

/// A snapshot of [`Refusals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    /// Raft messages from nodes outside the Raft membership.
    pub raft: u64,
    /// Direct requests from nodes that are not managers in the store.
    pub node_requests: u64,
    /// Requests over a connection whose certificate a CA this node no longer trusts signed.
    pub untrusted_ca: u64,
}

impl Refusals {
    /// Counts a refused Raft message.
    pub fn raft(&self) {
        self.raft.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused direct request.
    pub fn node_request(&self) {
        self.node_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused for its certificate's CA.
    pub fn untrusted_ca(&self) {
        self.untrusted_ca.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> RefusalCounts {
        RefusalCounts {
            raft: self.raft.load(Ordering::Relaxed),
            node_requests: self.node_requests.load(Ordering::Relaxed),
            untrusted_ca: self.untrusted_ca.load(Ordering::Relaxed),
        }
    }
}

/// Whether `sender` may send this manager Raft messages, given the membership in effect (the
/// newest in its log) and the last applied one; the error is the refusal's text.
pub fn check_raft_sender(
    sender: NodeId,
    what: &str,
    effective: &Membership<u64, BasicNode>,
    applied: &Membership<u64, BasicNode>,
) -> Result<(), String> {
    let member = |m: &Membership<u64, BasicNode>| m.get_node(&sender.0).is_some();
    let empty = effective.nodes().next().is_none() && applied.nodes().next().is_none();
    if empty || member(effective) || member(applied) {
        return Ok(());
    }
    Err(format!(
        "{what} refused: node {sender} is not a voter or learner in this manager's Raft membership"
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn membership(voters: &[u64], learners: &[u64]) -> Membership<u64, BasicNode> {
        let mut nodes = BTreeMap::new();
        for id in voters.iter().chain(learners) {
            nodes.insert(*id, BasicNode::new(format!("10.0.0.{id}:2377")));
        }
        let config: BTreeSet<u64> = voters.iter().copied().collect();
        Membership::new(vec![config], nodes)
    }

    #[test]
    fn voters_and_learners_pass_others_are_refused() {
        let m = membership(&[1, 2, 3], &[4]);
        for id in [1, 2, 3, 4] {
            assert_eq!(check_raft_sender(NodeId(id), "AppendEntries", &m, &m), Ok(()));
        }
        let e = check_raft_sender(NodeId(5), "Vote", &m, &m).expect_err("outsider");
        assert!(e.starts_with("Vote refused: node"), "{e}");
        assert!(e.contains("not a voter or learner"), "{e}");
    }

    #[test]
    fn a_removed_voter_is_refused_once_removal_is_applied() {
        let before = membership(&[1, 2, 3], &[]);
        let after = membership(&[1, 2], &[]);
        // Appended but not applied yet: the old configuration still counts, so a leader that
        // removes itself can still commit its removal.
        assert!(check_raft_sender(NodeId(3), "AppendEntries", &after, &before).is_ok());
        assert!(check_raft_sender(NodeId(3), "Vote", &after, &after).is_err());
    }

    #[test]
    fn an_empty_log_takes_the_first_append() {
        let empty = Membership::<u64, BasicNode>::default();
        assert!(check_raft_sender(NodeId(9), "AppendEntries", &empty, &empty).is_ok());
    }

    #[test]
    fn refusals_are_counted() {
        let r = Refusals::default();
        r.raft();
        r.raft();
        r.node_request();
        assert_eq!(r.counts(), RefusalCounts { raft: 2, node_requests: 1, untrusted_ca: 0 });
    }
}
