//! The table state the core shares with foca's broadcast handler (`handler`): the replicated
//! tables, node records and who is live. foca delivers every piggybacked item to the handler,
//! so merging happens here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::vocab::{EntryChange, Event, MemberState, MemberView};
use crate::config::CoreConfig;
use crate::metrics::{Counters, DropReason};
use crate::msg::{MemberRecord, WireEntry};
use crate::table::{Merge, Store, Stored};
use crate::types::{EntryKey, Identity, NodeId, NodeMeta, Version};

/// How long a relayed (not held) entry's version is remembered to stop re-relaying it.
const RELAY_MEMORY: Duration = Duration::from_secs(300);

/// Broadcast dedup key: a newer version of the same thing replaces an older one in foca's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BKey {
    Entry(EntryKey, Version),
    Node(NodeId, (u64, u64)),
    Suspect(Identity, u16, NodeId),
}

impl foca::Invalidates for BKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (BKey::Entry(k, v), BKey::Entry(ok, ov)) => k == ok && v >= ov,
            (BKey::Node(n, v), BKey::Node(on, ov)) => n == on && v >= ov,
            (BKey::Suspect(s, i, a), BKey::Suspect(os, oi, oa)) => s == os && a == oa && i >= oi,
            _ => false,
        }
    }
}

/// State shared by the core and foca's broadcast handler (foca owns the handler and offers no
/// access to it, so both hold this; the core never holds the lock across a foca call).
#[derive(Debug)]
pub(super) struct State {
    pub(super) me: Identity,
    pub(super) cfg: CoreConfig,
    pub(super) now: Instant,
    pub(super) clock: u64,
    pub(super) store: Store,
    pub(super) networks: BTreeSet<String>,
    pub(super) relay: BTreeMap<EntryKey, (Version, Instant)>,
    pub(super) nodes: BTreeMap<NodeId, MemberRecord>,
    pub(super) live: BTreeMap<NodeId, Identity>,
    pub(super) latest_gen: BTreeMap<NodeId, u64>,
    pub(super) was_down: BTreeSet<NodeId>,
    pub(super) events: VecDeque<Event>,
    pub(super) counters: Counters,
}

impl State {
    pub(super) fn new(me: Identity, cfg: CoreConfig, now: Instant) -> State {
        State {
            me,
            cfg,
            now,
            clock: 0,
            store: Store::new(),
            networks: BTreeSet::new(),
            relay: BTreeMap::new(),
            nodes: BTreeMap::new(),
            live: BTreeMap::new(),
            latest_gen: BTreeMap::new(),
            was_down: BTreeSet::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// Our live entries in `network`, or `None` if we do not participate in it.
    pub(super) fn own_entries_in(&self, network: &str) -> Option<Vec<EntryKey>> {
        if !self.networks.contains(network) {
            return None;
        }
        let me = self.me.node;
        let mine = |k: &EntryKey, e: &Stored| {
            k.network == network && e.version.owner == me && e.value.is_some()
        };
        Some(self.store.iter().filter(|(k, e)| mine(k, e)).map(|(k, _)| k.clone()).collect())
    }

    /// Stops holding `network`'s tables; its visible entries are withdrawn from consumers.
    pub(super) fn forget_network(&mut self, network: &str) {
        self.networks.remove(network);
        let gone = self.store.remove_where(|k, _| k.network == network);
        for (key, e) in gone {
            if e.value.is_some() && self.owner_live(e.version.owner, e.version.generation) {
                let change = EntryChange::Deleted { owner: e.version.owner };
                self.events.push_back(Event::Entry { key, change });
            }
        }
    }

    /// Our metadata and networks as last published (or as held, before the first record).
    pub(super) fn own_record(&self) -> (NodeMeta, Vec<String>) {
        match self.nodes.get(&self.me.node) {
            Some(r) => (r.meta.clone(), r.networks.clone()),
            None => (NodeMeta::default(), self.networks.iter().cloned().collect()),
        }
    }

    /// Our next member record, one version above the last.
    pub(super) fn next_record(&self, meta: NodeMeta, networks: Vec<String>) -> MemberRecord {
        let version = self.nodes.get(&self.me.node).map_or(1, |r| r.version + 1);
        MemberRecord { node: self.me.node, generation: self.me.generation, version, meta, networks }
    }

    /// Drops old tombstones and relay memories.
    pub(super) fn reap(&mut self, now: Instant) {
        self.store.reap(now, self.cfg.tombstone_reap);
        self.relay.retain(|_, (_, t)| now.saturating_duration_since(*t) < RELAY_MEMORY);
    }

    pub(super) fn owner_live(&self, node: NodeId, generation: u64) -> bool {
        if node == self.me.node {
            generation == self.me.generation
        } else {
            self.live.get(&node).is_some_and(|id| id.generation == generation)
        }
    }

    pub(super) fn view(&self, key: &EntryKey) -> Option<(NodeId, Bytes)> {
        let e = self.store.get(key)?;
        let v = e.value.as_ref()?;
        self.owner_live(e.version.owner, e.version.generation).then(|| (e.version.owner, v.clone()))
    }

    fn diff(&mut self, key: &EntryKey, before: Option<(NodeId, Bytes)>) {
        let after = self.view(key);
        if before == after {
            return;
        }
        let change = match (after, before) {
            (Some((owner, value)), _) => EntryChange::Upserted { owner, value },
            (None, Some((owner, _))) => EntryChange::Deleted { owner },
            (None, None) => return,
        };
        self.events.push_back(Event::Entry { key: key.clone(), change });
    }

    /// Runs `f` and emits events for the visible changes of `node`'s entries.
    fn around_owner(&mut self, node: NodeId, f: impl FnOnce(&mut State)) {
        let keys = self.store.keys_owned_by(node);
        let before: Vec<_> = keys.iter().map(|k| self.view(k)).collect();
        f(self);
        for (k, b) in keys.iter().zip(before) {
            self.diff(k, b);
        }
    }

    /// A newer process generation of `node` exists: its older entries die with the old process.
    fn learn_generation(&mut self, node: NodeId, generation: u64) {
        if node == self.me.node {
            return;
        }
        let known = self.latest_gen.get(&node).copied();
        if known.is_some_and(|g| g >= generation) {
            return;
        }
        self.latest_gen.insert(node, generation);
        let old = self
            .store
            .remove_where(|_, e| e.version.owner == node && e.version.generation < generation);
        for (key, e) in old {
            if e.value.is_some() && self.owner_live(node, e.version.generation) {
                self.events
                    .push_back(Event::Entry { key, change: EntryChange::Deleted { owner: node } });
            }
        }
        self.relay.retain(|_, (v, _)| !(v.owner == node && v.generation < generation));
    }

    fn stale_generation(&self, node: NodeId, generation: u64) -> bool {
        if node == self.me.node {
            return generation != self.me.generation;
        }
        self.latest_gen.get(&node).is_some_and(|g| *g > generation)
    }

    fn valid_entry(&self, e: &WireEntry) -> bool {
        let n = self.cfg.max_name_len;
        e.key.table.len() <= n
            && e.key.network.len() <= n
            && e.key.key.len() <= n
            && !e.key.table.is_empty()
            && !e.key.network.is_empty()
            && e.value.as_ref().is_none_or(|v| v.len() <= self.cfg.max_value_len)
    }

    fn valid_record(&self, r: &MemberRecord) -> bool {
        r.meta.name.len() <= 255
            && r.meta.id.len() <= 255
            && r.networks.len() <= 4096
            && r.networks.iter().all(|n| !n.is_empty() && n.len() <= self.cfg.max_name_len)
    }

    /// Applies a table event; `Some` when it is new and should be relayed.
    pub(super) fn apply_entry(&mut self, e: WireEntry, relay: bool) -> Option<BKey> {
        if !self.valid_entry(&e) {
            self.counters.drop(DropReason::Malformed);
            return None;
        }
        self.clock = self.clock.max(e.version.ltime);
        self.learn_generation(e.version.owner, e.version.generation);
        if self.stale_generation(e.version.owner, e.version.generation) {
            self.counters.drop(DropReason::Stale);
            return None;
        }
        let bkey = BKey::Entry(e.key.clone(), e.version);
        if !self.networks.contains(&e.key.network) {
            if !relay {
                return None;
            }
            match self.relay.get(&e.key) {
                Some((v, _)) if *v == e.version => {
                    self.counters.duplicates += 1;
                    None
                }
                Some((v, _)) if *v > e.version => {
                    self.counters.drop(DropReason::Stale);
                    None
                }
                _ => {
                    self.relay.insert(e.key, (e.version, self.now));
                    Some(bkey)
                }
            }
        } else {
            let before = self.view(&e.key);
            // An entry belongs to the node that wrote it while that node lives: a write or delete
            // by another member (anyone holding the key can send one) is refused, so it can
            // neither replace nor hide the owner's record. Once the owner is gone, the key is free.
            // (Our own writes are our caller's business; the others refuse them the same way.)
            if let Some((owner, _)) = &before
                && *owner != e.version.owner
                && e.version.owner != self.me.node
            {
                self.counters.drop(DropReason::NotOwner);
                return None;
            }
            if e.value.is_some()
                && before.as_ref().is_none_or(|(owner, _)| *owner != e.version.owner)
                && self.store.live_owned_by(e.version.owner) >= self.cfg.max_entries_per_owner
            {
                self.counters.drop(DropReason::TooMany);
                return None;
            }
            match self.store.merge(&e.key, e.version, e.value.map(Bytes::from), self.now) {
                Merge::Applied => {
                    self.diff(&e.key, before);
                    Some(bkey)
                }
                Merge::Duplicate => {
                    self.counters.duplicates += 1;
                    None
                }
                Merge::Stale => {
                    self.counters.drop(DropReason::Stale);
                    None
                }
            }
        }
    }

    /// Applies a member record; `Some` when it is new.
    pub(super) fn apply_record(&mut self, r: MemberRecord, local: bool) -> Option<BKey> {
        if !self.valid_record(&r) {
            self.counters.drop(DropReason::Malformed);
            return None;
        }
        if r.node == self.me.node && !local {
            // Our own record echoed back, or a previous run's: ours is authoritative.
            return None;
        }
        self.learn_generation(r.node, r.generation);
        if let Some(cur) = self.nodes.get(&r.node) {
            if cur.order() == r.order() {
                self.counters.duplicates += 1;
                return None;
            }
            if cur.order() > r.order() {
                self.counters.drop(DropReason::Stale);
                return None;
            }
        }
        let key = BKey::Node(r.node, r.order());
        let node = r.node;
        self.nodes.insert(node, r);
        if let Some(id) = self.live.get(&node).cloned() {
            let view = self.member_view(&id, MemberState::Alive, 0);
            self.events.push_back(Event::MemberUpdated(view));
        }
        Some(key)
    }

    pub(super) fn member_view(
        &self,
        id: &Identity,
        state: MemberState,
        incarnation: u16,
    ) -> MemberView {
        let rec = self.nodes.get(&id.node).filter(|r| r.generation == id.generation);
        MemberView {
            id: id.clone(),
            state,
            incarnation,
            meta: rec.map(|r| r.meta.clone()),
            networks: rec.map(|r| r.networks.clone()).unwrap_or_default(),
        }
    }

    pub(super) fn member_up(&mut self, id: &Identity) {
        self.learn_generation(id.node, id.generation);
        if self.stale_generation(id.node, id.generation) || id.node == self.me.node {
            return;
        }
        if self.live.get(&id.node) == Some(id) {
            return;
        }
        let node = id.node;
        let new = id.clone();
        self.around_owner(node, |s| {
            s.live.insert(node, new);
        });
        let view = self.member_view(id, MemberState::Alive, 0);
        self.events.push_back(Event::MemberUp(view));
    }

    pub(super) fn member_down(&mut self, id: &Identity) {
        if self.live.get(&id.node) != Some(id) {
            return;
        }
        self.around_owner(id.node, |s| {
            s.live.remove(&id.node);
        });
        self.was_down.insert(id.node);
        let view = self.member_view(id, MemberState::Down, 0);
        self.events.push_back(Event::MemberDown(view));
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only this thread ever holds the locks and no code path panics while holding one.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
