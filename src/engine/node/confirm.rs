//! Confirmations that a task's change reached every live node, in place of fixed waits.
//!
//! A task being started is announced (its endpoints enter gossip, not serving) and a task being
//! stopped is withdrawn (its endpoints are marked not serving); either change protects traffic only once
//! every node's data path has applied it. So each node keeps one record in the gossip table
//! [`APPLIED_TABLE`] (on the ingress network, which every node joins):
//!
//! - `waiting`: the changes of its own tasks it is waiting on, as [`Change`] tokens;
//! - `done`: the changes other nodes (and it itself) wait on that its last data-path pass has
//!   applied: an announced task is in its forwarding tables, a withdrawn one serves in none of
//!   its tables (mesh, DNS, VIPs) while its forwarding entries stay until it has stopped.
//!
//! The node making a change adds its token to `waiting` and waits until every live member of
//! the ingress network lists it in `done`, or until a timeout (a member that died a moment ago
//! still counts as live until gossip says otherwise). Each side judges the other's state by
//! what it applied, not by when messages came, so gossip's lack of ordering does no harm.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_gossip::{EntryKey, MemberState, Snapshot};

use super::{Inner, lock};

/// The gossip table of the per-node [`Applied`] records, keyed by node id.
pub(super) const APPLIED_TABLE: &str = "applied";

/// How often a waiting node looks at the others' records again.
const POLL: Duration = Duration::from_millis(20);

/// Most tokens one record carries: gossip values are small (the tokens past this limit are
/// left out, and those waits end at their timeout).
const MAX_TOKENS: usize = 40;

/// A change of one task that its node waits on the others to apply.
#[derive(Clone, Copy, Debug)]
pub(super) enum Change<'a> {
    /// Its endpoints are in gossip (not serving): forwarding tables must know them.
    Announced(&'a str),
    /// Its endpoints are marked not serving: no mesh, DNS or VIP rule may send it anything new.
    Withdrawn(&'a str),
}

impl Change<'_> {
    /// The short token that names the change in the records: a sign and the task id's head
    /// (task ids are random, so 12 characters do not collide among the few changes in flight).
    fn token(self) -> String {
        let (sign, id) = match self {
            Change::Announced(id) => ('+', id),
            Change::Withdrawn(id) => ('-', id),
        };
        let head: String = id.chars().take(12).collect();
        format!("{sign}{head}")
    }
}

/// One node's record in [`APPLIED_TABLE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Applied {
    /// Tokens of this node's own changes it waits on.
    pub waiting: Vec<String>,
    /// Tokens waited on anywhere that this node's data path has applied.
    pub done: Vec<String>,
}

/// Whether a data path applied with the endpoints of the tasks `known` (`serving` of them in
/// service) has applied the change `token` names.
fn applied(token: &str, known: &BTreeSet<String>, serving: &BTreeSet<String>) -> bool {
    let (sign, head) = token.split_at(1);
    let any = |set: &BTreeSet<String>| set.iter().any(|t| t.starts_with(head));
    match sign {
        "+" => any(known),
        "-" => !any(serving),
        _ => false,
    }
}

/// The records of every node in `network`, by owner.
fn records(snap: &Snapshot, network: &str) -> Vec<(shoal_gossip::NodeId, Applied)> {
    snap.table(APPLIED_TABLE, network)
        .into_iter()
        .filter_map(|(_, owner, v)| Some((owner, serde_json::from_slice(&v).ok()?)))
        .collect()
}

/// Called after each data-path pass that applied the endpoints of the tasks `known` (`serving`
/// of them in service): writes this node's record on the ingress network `network` when it
/// changed.
pub(super) async fn publish(
    inner: &Arc<Inner>,
    network: &str,
    known: &BTreeSet<String>,
    serving: &BTreeSet<String>,
) {
    let snap = inner.gossip.snapshot();
    let waiting: Vec<String> =
        lock(&inner.local).waiting.iter().take(MAX_TOKENS).cloned().collect();
    let mut asked: BTreeSet<String> =
        records(&snap, network).into_iter().flat_map(|(_, r)| r.waiting).collect();
    asked.extend(waiting.iter().cloned());
    let done: Vec<String> =
        asked.into_iter().filter(|t| applied(t, known, serving)).take(MAX_TOKENS).collect();
    let rec = Applied { waiting, done };
    {
        let l = lock(&inner.local);
        if l.applied.as_ref().is_some_and(|(n, r)| n == network && *r == rec) {
            return;
        }
    }
    let Ok(bytes) = serde_json::to_vec(&rec) else { return };
    let key = EntryKey::new(APPLIED_TABLE, network, &inner.me);
    match inner.gossip.write(key, bytes).await {
        Ok(()) => lock(&inner.local).applied = Some((network.to_owned(), rec)),
        Err(e) => tracing::debug!(error = %e, "publishing the applied record"),
    }
}

/// Waits until every live member of `network` has applied `change`, or `timeout`; returns how
/// long it waited. The change itself (a gossip write or delete) must be made already.
pub(super) async fn wait(
    inner: &Arc<Inner>,
    network: &str,
    change: Change<'_>,
    timeout: Duration,
) -> Duration {
    let t0 = Instant::now();
    let token = change.token();
    lock(&inner.local).waiting.insert(token.clone());
    // Our own pass writes the token into our record (and applies the change here).
    inner.kick.notify_one();
    loop {
        let snap = inner.gossip.snapshot();
        if confirmed(&snap, network, &token) {
            break;
        }
        if t0.elapsed() >= timeout {
            tracing::debug!(change = ?change, "not every node confirmed a task change in time");
            break;
        }
        tokio::time::sleep(POLL.min(timeout.saturating_sub(t0.elapsed()))).await;
    }
    lock(&inner.local).waiting.remove(&token);
    t0.elapsed()
}

/// Whether every live member of `network` lists `token` as done.
fn confirmed(snap: &Snapshot, network: &str, token: &str) -> bool {
    let recs = records(snap, network);
    snap.members
        .iter()
        .filter(|m| m.state == MemberState::Alive && m.networks.iter().any(|n| n == network))
        .all(|m| {
            recs.iter().any(|(owner, r)| *owner == m.id.node && r.done.iter().any(|t| t == token))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_what_was_applied() {
        let tasks: BTreeSet<String> = ["abcdefghijklmnop".to_owned()].into();
        let none = BTreeSet::new();
        let new = Change::Announced("abcdefghijklmnop").token();
        let gone = Change::Withdrawn("abcdefghijklmnop").token();
        assert_eq!(new, "+abcdefghijkl");
        assert!(applied(&new, &tasks, &none), "known, not serving yet");
        assert!(!applied(&new, &none, &none));
        assert!(!applied(&gone, &tasks, &tasks), "still serving");
        assert!(applied(&gone, &tasks, &none), "known (still reachable), not serving");
        assert!(applied(&gone, &none, &none));
        assert!(!applied("xabc", &tasks, &tasks), "an unknown sign is never done");
    }

    fn member(n: u64, state: MemberState, networks: &[&str]) -> shoal_gossip::MemberView {
        shoal_gossip::MemberView {
            id: shoal_gossip::Identity {
                addr: ([192, 0, 2, n as u8], 7946).into(),
                node: shoal_gossip::NodeId(n),
                generation: 1,
                bump: 0,
            },
            state,
            incarnation: 0,
            meta: None,
            networks: networks.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Sets node `n`'s record, saying `done`.
    fn record(snap: &mut Snapshot, n: u64, done: &[&str]) {
        let rec =
            Applied { waiting: Vec::new(), done: done.iter().map(|s| s.to_string()).collect() };
        let key = EntryKey::new(APPLIED_TABLE, "ing", &format!("node{n}"));
        snap.entries.retain(|(k, _, _)| *k != key);
        snap.entries.push((key, shoal_gossip::NodeId(n), serde_json::to_vec(&rec).unwrap().into()));
    }

    #[test]
    fn confirmed_once_every_live_member_of_the_network_applied_it() {
        let mut snap = Snapshot {
            members: vec![
                member(1, MemberState::Alive, &["ing"]),
                member(2, MemberState::Alive, &["ing"]),
                // Neither a dead member nor one outside the network is waited for.
                member(3, MemberState::Down, &["ing"]),
                member(4, MemberState::Alive, &[]),
            ],
            ..Snapshot::default()
        };
        record(&mut snap, 1, &["-t1"]);
        record(&mut snap, 2, &["+t2"]);
        assert!(!confirmed(&snap, "ing", "-t1"), "node2 has not applied it");
        record(&mut snap, 2, &["+t2", "-t1"]);
        assert!(confirmed(&snap, "ing", "-t1"));
        // Node1's record under node2's key does not stand in for node2's own.
        record(&mut snap, 2, &[]);
        let mut forged = snap.entries[0].clone();
        forged.0.key = "node2".into();
        snap.entries.retain(|(k, _, _)| k.key != "node2");
        snap.entries.push(forged);
        assert!(!confirmed(&snap, "ing", "-t1"));
    }
}
