//! The accusations this node has heard, by suspect: Lifeguard's book of suspicions. foca
//! delivers every piggybacked accusation to its broadcast handler in the middle of a foca call,
//! so the book sits behind a lock the handler shares with [`super::lifeguard::Lifeguard`]; the
//! handler records what it hears here and Lifeguard acts on it once the foca call returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::shared::BKey;
use crate::metrics::Counters;
use crate::msg::Suspect;
use crate::types::{Identity, NodeId};

/// How long an ended suspicion is remembered to recognize late copies of its accusations.
const SETTLED_MEMORY: Duration = Duration::from_secs(300);

/// What this node knows of one suspicion: its incarnation, since when, who accuses.
#[derive(Debug)]
pub(super) struct Suspicion {
    pub(super) incarnation: u16,
    pub(super) started: Instant,
    pub(super) accusers: BTreeSet<NodeId>,
    /// The key of its timeout in Lifeguard's timers.
    pub(super) timer: Option<(Instant, u64)>,
    /// Whether this node already decided to check it (or not).
    pub(super) reviewed: bool,
}

/// Suspicions in progress, the ones that ended, and what arrived since Lifeguard last looked.
#[derive(Debug, Default)]
pub(super) struct Accusations {
    /// Whether accusations count at all (Lifeguard is on in the config).
    enabled: bool,
    /// Suspicions in progress, by suspect.
    pub(super) open: BTreeMap<Identity, Suspicion>,
    /// Suspicions that ended (refuted at that incarnation, or `u16::MAX`: down): accusations
    /// at or below it are stale.
    pub(super) settled: BTreeMap<Identity, (u16, Instant)>,
    /// Suspects with new accusations, for Lifeguard to act on after the current foca call.
    pub(super) news: Vec<Identity>,
    /// The highest incarnation at which someone accused us (we refute it).
    pub(super) self_suspected: Option<u16>,
    /// Timers of replaced suspicions, for Lifeguard to cancel.
    pub(super) stale_timers: Vec<(Instant, u64)>,
}

impl Accusations {
    pub(super) fn new(enabled: bool) -> Accusations {
        Accusations { enabled, ..Accusations::default() }
    }

    /// Whether anything arrived that Lifeguard has not acted on yet.
    pub(super) fn has_news(&self) -> bool {
        !self.news.is_empty() || self.self_suspected.is_some() || !self.stale_timers.is_empty()
    }

    /// Records an accusation heard by this node `me` at `now`; `Some` when it is new and
    /// should be relayed.
    pub(super) fn hear(
        &mut self,
        s: Suspect,
        me: &Identity,
        now: Instant,
        counters: &mut Counters,
    ) -> Option<BKey> {
        if !self.enabled {
            return None;
        }
        if s.subject == *me {
            // Someone suspects us: refute (foca also does when its own update arrives).
            self.self_suspected =
                Some(self.self_suspected.map_or(s.incarnation, |i| i.max(s.incarnation)));
            return None;
        }
        // Late copies of accusations about settled suspicions are normal in epidemic
        // dissemination: counted as duplicates, not dropped.
        if self.settled.get(&s.subject).is_some_and(|(i, _)| *i >= s.incarnation) {
            counters.duplicates += 1;
            return None;
        }
        let key = BKey::Suspect(s.subject.clone(), s.incarnation, s.accuser);
        match self.open.get_mut(&s.subject) {
            Some(r) if r.incarnation > s.incarnation => {
                counters.duplicates += 1;
                return None;
            }
            Some(r) if r.incarnation == s.incarnation => {
                if !r.accusers.insert(s.accuser) {
                    counters.duplicates += 1;
                    return None;
                }
            }
            _ => {
                // A newer incarnation replaces an older suspicion; Lifeguard cancels its timer.
                let r = Suspicion {
                    incarnation: s.incarnation,
                    started: now,
                    accusers: BTreeSet::from([s.accuser]),
                    timer: None,
                    reviewed: false,
                };
                if let Some(old) = self.open.insert(s.subject.clone(), r)
                    && let Some(k) = old.timer
                {
                    self.stale_timers.push(k);
                }
            }
        }
        self.news.push(s.subject);
        Some(key)
    }

    /// Forgets suspicions that ended long ago.
    pub(super) fn reap(&mut self, now: Instant) {
        self.settled.retain(|_, (_, t)| now.saturating_duration_since(*t) < SETTLED_MEMORY);
    }
}
