//! What this node runs as a manager: Raft, its state machine, the other managers' contacts and
//! the pre-vote book; the questions the rest of the handle asks of them (who leads, who votes,
//! is a caller still a member, how far the store has applied) and the Raft operations the
//! leader's handlers make (writes, voter removal, the quorum check before it).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::{broadcast, watch};

use crate::failover::{self, PreVote};
use crate::model::{ClusterEvent, Command, Keyring, NodeId, NodeRecord, Role};
use crate::policy::quorum_after_removal;
use crate::raft::{LogStore, PeerContacts, Raft, StateMachine, open_db, raft_config};
use crate::transport::{RaftNet, Transport};
use crate::wire::{Caller, ManagerStatus, NodeView, RaftRequest, RaftResponse};
use crate::{Error, Tuning};

/// Raft and what goes with it on a manager; shared (`Arc`) by the handle and its loops, and
/// dropped when the node stops being a manager.
pub(super) struct ManagerParts {
    pub(super) raft: Raft,
    pub(super) sm: StateMachine,
    pub(super) contacts: PeerContacts,
    /// The other voters' probe answers: whether this manager may campaign.
    pub(super) prevote: Mutex<PreVote>,
    /// When an append from a current leader last reached this manager (pre-vote answers).
    leader_seen: Mutex<Option<Instant>>,
    /// This node's Raft id.
    me: u64,
    tuning: Tuning,
}

impl std::fmt::Debug for ManagerParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagerParts")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ManagerParts {
    /// Opens the Raft database at `path` (waiting for a previous instance in this process to
    /// let go of it) and starts Raft as node `me`.
    pub(super) async fn open(
        path: &Path,
        me: NodeId,
        tuning: &Tuning,
        transport: Arc<Transport>,
        events: broadcast::Sender<ClusterEvent>,
        keyring: watch::Sender<Keyring>,
    ) -> Result<ManagerParts, Error> {
        let mut tries = 0;
        let db = loop {
            match open_db(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(Error::Store(format!("opening {}: {e}", path.display()))),
            }
        };
        let sm = StateMachine::open(db.clone(), events, keyring)
            .map_err(|e| Error::Store(e.to_string()))?;
        let contacts = PeerContacts::default();
        let net = RaftNet { transport, contacts: contacts.clone() };
        let cfg = raft_config(tuning).map_err(|e| Error::Store(e.to_string()))?;
        let raft = Raft::new(me.0, cfg, net, LogStore::new(db), sm.clone())
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        Ok(ManagerParts {
            raft,
            sm,
            contacts,
            prevote: Mutex::new(PreVote::default()),
            leader_seen: Mutex::new(None),
            me: me.0,
            tuning: tuning.clone(),
        })
    }

    /// Stops Raft.
    pub(super) async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// openraft's leader lease: how long a voter that heard from a leader refuses to vote.
    pub(super) fn lease(&self) -> Duration {
        Duration::from_millis(self.raft.config().election_timeout_max)
    }

    /// The Raft leader as this manager sees it; `None` while there is none, and on a leader that
    /// lost its quorum (check-quorum, see `failover`).
    pub(super) fn leader(&self) -> Option<(u64, Option<SocketAddr>)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let voters = metrics.membership_config.membership().voter_ids().count();
        if leader == metrics.id
            && failover::deposed(voters, metrics.millis_since_quorum_ack, self.lease())
        {
            return None;
        }
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .and_then(crate::raft::node_addr);
        Some((leader, addr))
    }

    /// Whether this manager leads now.
    pub(super) fn leads(&self) -> bool {
        self.leader().map(|l| l.0) == Some(self.me)
    }

    /// This manager's answer to a pre-vote probe: it leads with a quorum, or an append from the
    /// leader reached it within the lease.
    pub(super) fn leader_alive(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader == Some(metrics.id) {
            let voters = metrics.membership_config.membership().voter_ids().count();
            return !failover::deposed(voters, metrics.millis_since_quorum_ack, self.lease());
        }
        lock(&self.leader_seen).is_some_and(|t| t.elapsed() <= self.lease())
    }

    /// The Raft voters' ids.
    pub(super) fn voters(&self) -> BTreeSet<u64> {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }

    /// Control addresses of the Raft voters (the managers that can answer).
    pub(super) fn manager_addrs(&self) -> Vec<SocketAddr> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|v| membership.get_node(&v).and_then(crate::raft::node_addr))
            .collect()
    }

    /// The caller as the store knows it now: a node of the swarm, with the role the store gives
    /// it. The certificate names the node, but its role is only what the node was when the
    /// certificate was issued, and it outlives a removal or a demotion.
    pub(super) fn authorize(&self, caller: Caller) -> Result<(NodeId, Role), Error> {
        let Caller::Member { node, .. } = caller else {
            return Err(Error::PermissionDenied("this request needs a cluster certificate".into()));
        };
        self.sm
            .with_state(|s| s.nodes.get(&node).map(|n| n.role))
            .map(|role| (node, role))
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "node {node} is not a member of this swarm (it was removed); join again"
                ))
            })
    }

    /// Waits (at most `timeout`) until the store has applied past log index `after`; returns
    /// the applied index then.
    pub(super) async fn wait_applied(&self, after: u64, timeout: Duration) -> u64 {
        let mut metrics = self.raft.metrics();
        let applied =
            |m: &openraft::RaftMetrics<u64, BasicNode>| m.last_applied.map_or(0, |l| l.index);
        let _ = tokio::time::timeout(timeout, async {
            while applied(&metrics.borrow_and_update()) <= after {
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        applied(&metrics.borrow())
    }

    /// Writes `cmd` through Raft (on the leader), within the RPC timeout.
    pub(super) async fn write(&self, cmd: Command) -> Result<(), Error> {
        let limit = self.tuning.rpc_timeout;
        let Ok(res) = tokio::time::timeout(limit, self.raft.client_write(cmd)).await else {
            return Err(Error::NoLeader(format!(
                "the change was not committed within {limit:?}: too few managers are reachable (it may still apply once they are back)"
            )));
        };
        match res {
            Ok(resp) => match resp.data.error {
                Some(crate::model::Refusal::Conflict(e)) => Err(Error::Conflict(e)),
                Some(e) => Err(Error::Refused(e.to_string())),
                None => Ok(()),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Error::NoLeader("leadership changed; retry".into()))
            }
            // A leader shutting down (agent restart): the next leader takes the retry.
            Err(RaftError::Fatal(openraft::error::Fatal::Stopped)) => {
                Err(Error::NoLeader("the leader is shutting down; retry".into()))
            }
            Err(e) => Err(Error::Store(e.to_string())),
        }
    }

    /// Refuses removing `target` from the voters when that would lose quorum.
    pub(super) fn check_quorum_after_removal(&self, target: u64, what: &str) -> Result<(), Error> {
        let voters = self.voters();
        let now = Instant::now();
        let window = self.tuning.manager_window();
        let reachable = |v: u64| v == self.me || self.contacts.reachable(v, now, window);
        quorum_after_removal(&voters, target, reachable).map_err(|q| {
            Error::Refused(format!(
                "{what} would result in a loss of quorum: {} of the {} remaining managers are reachable, {} needed (nothing was changed)",
                q.reachable, q.remaining, q.need
            ))
        })
    }

    /// Removes `id` from the Raft voters (nothing if it is not one).
    pub(super) async fn remove_voter(&self, id: u64) -> Result<(), Error> {
        if !self.voters().contains(&id) {
            return Ok(());
        }
        let mut set = BTreeSet::new();
        set.insert(id);
        let change = self.raft.change_membership(ChangeMembers::RemoveVoters(set), false);
        match tokio::time::timeout(self.tuning.rpc_timeout * 2, change).await {
            Ok(r) => r.map(|_| ()).map_err(|e| Error::Store(format!("removing a Raft voter: {e}"))),
            Err(_) => Err(Error::NoLeader(
                "removing the Raft voter was not committed in time: too few managers are reachable"
                    .into(),
            )),
        }
    }

    /// A node record as `node ls` shows it, with its manager status.
    pub(super) fn view(&self, n: &NodeRecord) -> NodeView {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        let status = if n.role == Role::Manager || voters.contains(&n.id.0) {
            Some(if metrics.current_leader == Some(n.id.0) {
                ManagerStatus::Leader
            } else if voters.contains(&n.id.0)
                && self.contacts.reachable(n.id.0, Instant::now(), self.tuning.manager_window())
            {
                ManagerStatus::Reachable
            } else {
                ManagerStatus::Unreachable
            })
        } else {
            None
        };
        NodeView { record: n.clone(), manager_status: status }
    }

    /// A Raft message from another manager (already authorized by the RPC edge).
    pub(super) async fn handle_raft(&self, r: RaftRequest) -> RaftResponse {
        match r {
            RaftRequest::Append(a) => {
                let r = self.raft.append_entries(a).await;
                // Anything but a higher vote means the sender is the current leader.
                if matches!(&r, Ok(resp) if !matches!(resp, AppendEntriesResponse::HigherVote(_))) {
                    *lock(&self.leader_seen) = Some(Instant::now());
                }
                RaftResponse::Append(r)
            }
            RaftRequest::Vote(v) => RaftResponse::Vote(self.raft.vote(v).await),
            RaftRequest::Snapshot(s) => RaftResponse::Snapshot(self.raft.install_snapshot(s).await),
        }
    }
}
