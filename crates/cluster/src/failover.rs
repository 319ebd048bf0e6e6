//! Pre-vote and check-quorum for the managers, sans-I/O, on top of openraft 0.9.
//!
//! openraft 0.9 has neither. What it has is a leader lease: a voter that heard from a leader
//! within `election_timeout_max` refuses to vote, and a follower waits that lease plus its
//! election timeout before it campaigns. That keeps a healthy leader in place, but a node cut
//! off from the others still campaigns on its own, raising its term each round, and when it
//! rejoins that higher term makes the leader step down: one needless election per heal. And a
//! leader cut off from the others stays leader (it cannot commit) until it hears of a newer
//! term, so requests sent to it wait out their timeouts.
//!
//! What shoal adds:
//! - **Pre-vote** ([`PreVote`]): every manager probes the other voters every Raft heartbeat and
//!   each answers whether it still has a live leader (it is one, not [`deposed`], or an append
//!   from one reached it within the lease). A manager may campaign (openraft's `enable_elect`)
//!   only while a majority of voters, itself included, answered recently that they have none.
//!   A node that is cut off hears no answers, so it never campaigns and keeps its term; when it
//!   comes back the others say their leader is alive, and it simply follows. After a leader
//!   dies the survivors' answers turn within one lease, before their election timers fire, so
//!   failover is not slowed.
//! - **Check-quorum** ([`deposed`]): a leader whose last quorum acknowledgement is older than
//!   two leases treats itself as no leader: requests get "no leader" at once (and callers retry
//!   elsewhere), and leader-only work (liveness, scheduling) pauses. Raft's own step-down
//!   follows as soon as it hears the new leader's term.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Whether a leader has lost its quorum: more than two leases since a majority acknowledged
/// it, the earliest the others can have elected a successor (their lease, then an election
/// timeout of at most one lease). A single voter is its own quorum; an ack openraft has not
/// measured yet (just elected) counts as fresh.
pub fn deposed(voters: usize, millis_since_quorum_ack: Option<u64>, lease: Duration) -> bool {
    voters > 1 && millis_since_quorum_ack.is_some_and(|ms| ms > 2 * lease.as_millis() as u64)
}

/// Probe answers from the other voters: whether each has a live leader, and when it said so.
#[derive(Debug, Default, Clone)]
pub struct PreVote {
    answers: HashMap<u64, (Instant, bool)>,
}

impl PreVote {
    /// Voter `peer` answered a probe at `now`: it has a live leader or not.
    pub fn handle_answer(&mut self, now: Instant, peer: u64, leader_alive: bool) {
        self.answers.insert(peer, (now, leader_alive));
    }

    /// Whether `me` may campaign: itself plus the voters that answered within `window` that
    /// they have no live leader make a majority of `voters`. A non-voter never campaigns.
    pub fn may_campaign(&self, now: Instant, me: u64, voters: &[u64], window: Duration) -> bool {
        if !voters.contains(&me) {
            return false;
        }
        let willing = voters
            .iter()
            .filter(|v| {
                **v == me
                    || self.answers.get(v).is_some_and(|(at, alive)| {
                        !alive && now.saturating_duration_since(*at) <= window
                    })
            })
            .count();
        willing > voters.len() / 2
    }

    /// Forgets the answers of nodes that are no longer voters.
    pub fn retain_voters(&mut self, voters: &[u64]) {
        self.answers.retain(|p, _| voters.contains(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(400);

    #[test]
    fn a_lone_voter_always_may_campaign() {
        let b = PreVote::default();
        assert!(b.may_campaign(Instant::now(), 1, &[1], W));
        assert!(!b.may_campaign(Instant::now(), 4, &[1], W), "not a voter");
    }

    #[test]
    fn a_majority_without_a_leader_opens_the_vote() {
        let t = Instant::now();
        let mut b = PreVote::default();
        // Nobody answered: cut off.
        assert!(!b.may_campaign(t, 1, &[1, 2, 3], W));
        // Node 2 still hears the leader: no.
        b.handle_answer(t, 2, true);
        assert!(!b.may_campaign(t, 1, &[1, 2, 3], W));
        // Node 2 lost it too: 1 and 2 are a majority of 3.
        b.handle_answer(t, 2, false);
        assert!(b.may_campaign(t, 1, &[1, 2, 3], W));
        // The answer grows old: closed again.
        assert!(!b.may_campaign(t + W * 2, 1, &[1, 2, 3], W));
        // Five voters need three.
        assert!(!b.may_campaign(t, 1, &[1, 2, 3, 4, 5], W));
        b.handle_answer(t, 5, false);
        assert!(b.may_campaign(t, 1, &[1, 2, 3, 4, 5], W));
        b.retain_voters(&[1, 3, 4]);
        assert!(!b.may_campaign(t, 1, &[1, 3, 4], W));
    }

    #[test]
    fn check_quorum() {
        let lease = Duration::from_millis(800);
        assert!(!deposed(1, Some(60_000), lease), "a single voter is its own quorum");
        assert!(!deposed(3, None, lease), "just elected");
        assert!(!deposed(3, Some(100), lease));
        assert!(!deposed(3, Some(1600), lease), "the others cannot have a new leader yet");
        assert!(deposed(3, Some(1601), lease));
    }
}
