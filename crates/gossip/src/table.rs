//! The replicated table store: last-writer-wins by Lamport [`Version`], deletes as tombstones.
//!
//! The merge is a join on a total order, so applying any set of updates in any order, any
//! number of times, ends in the same state (property-tested below). Tombstones are reaped after
//! a configurable time, which bounds memory and is safe as long as a partition heals sooner.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::types::{EntryKey, NodeId, Version};

/// A stored entry: its version and value (`None` = tombstone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Version of the last write.
    pub version: Version,
    /// Value, or `None` for a delete.
    pub value: Option<Bytes>,
    /// When the tombstone was stored locally (for reaping).
    pub tombstone_since: Option<Instant>,
}

/// What a merge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// The update was newer and is now stored.
    Applied,
    /// Same version already stored.
    Duplicate,
    /// An older version: ignored.
    Stale,
}

/// The entries of the networks this node participates in.
#[derive(Clone, Debug, Default)]
pub struct Store {
    entries: BTreeMap<EntryKey, Stored>,
    /// Live (not deleted) entries per owner, kept in step with `entries`.
    live: HashMap<NodeId, usize>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges one update: kept only if its version is larger than the stored one.
    pub fn merge(
        &mut self,
        key: &EntryKey,
        version: Version,
        value: Option<Bytes>,
        now: Instant,
    ) -> Merge {
        if let Some(cur) = self.entries.get(key) {
            match version.cmp(&cur.version) {
                std::cmp::Ordering::Less => return Merge::Stale,
                std::cmp::Ordering::Equal => return Merge::Duplicate,
                std::cmp::Ordering::Greater => {}
            }
        }
        let tombstone_since = value.is_none().then_some(now);
        let live = value.is_some();
        if let Some(old) =
            self.entries.insert(key.clone(), Stored { version, value, tombstone_since })
        {
            self.forget(&old);
        }
        if live {
            *self.live.entry(version.owner).or_default() += 1;
        }
        Merge::Applied
    }

    /// The stored entry (live or tombstone).
    pub fn get(&self, key: &EntryKey) -> Option<&Stored> {
        self.entries.get(key)
    }

    /// All stored entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&EntryKey, &Stored)> {
        self.entries.iter()
    }

    /// Number of stored entries, tombstones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops tombstones older than `age`; returns how many.
    pub fn reap(&mut self, now: Instant, age: Duration) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            e.tombstone_since.is_none_or(|t| now.saturating_duration_since(t) < age)
        });
        before - self.entries.len()
    }

    /// Removes and returns the entries `pred` selects (no tombstones left behind).
    pub fn remove_where(
        &mut self,
        mut pred: impl FnMut(&EntryKey, &Stored) -> bool,
    ) -> Vec<(EntryKey, Stored)> {
        let keys: Vec<EntryKey> =
            self.entries.iter().filter(|(k, e)| pred(k, e)).map(|(k, _)| k.clone()).collect();
        let gone: Vec<(EntryKey, Stored)> =
            keys.into_iter().filter_map(|k| self.entries.remove(&k).map(|e| (k, e))).collect();
        for (_, e) in &gone {
            self.forget(e);
        }
        gone
    }

    /// How many live entries `node` owns.
    pub fn live_owned_by(&self, node: NodeId) -> usize {
        self.live.get(&node).copied().unwrap_or(0)
    }

    fn forget(&mut self, e: &Stored) {
        if e.value.is_some()
            && let Some(n) = self.live.get_mut(&e.version.owner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live.remove(&e.version.owner);
            }
        }
    }

    /// Keys of the entries owned by `node`.
    pub fn keys_owned_by(&self, node: NodeId) -> Vec<EntryKey> {
        self.entries
            .iter()
            .filter(|(_, e)| e.version.owner == node)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The state without local timestamps, for comparing replicas.
    pub fn digest(&self) -> Vec<(EntryKey, Version, Option<Bytes>)> {
        self.entries.iter().map(|(k, e)| (k.clone(), e.version, e.value.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Update = (EntryKey, Version, Option<Bytes>);

    fn update() -> impl Strategy<Value = Update> {
        (0u8..4, 0u64..6, 0u64..3, 0u64..2, proptest::option::of(0u8..4)).prop_map(
            |(k, lt, owner, g, v)| {
                let key = EntryKey::new("endpoint_table", "net", &format!("k{k}"));
                let version = Version { ltime: lt, owner: NodeId(owner), generation: g };
                // Same version always carries the same value, as a real writer guarantees.
                let value = v.map(|_| Bytes::from(format!("{lt}/{owner}/{g}")));
                (key, version, value)
            },
        )
    }

    fn apply(updates: &[Update]) -> Vec<(EntryKey, Version, Option<Bytes>)> {
        let now = Instant::now();
        let mut s = Store::new();
        for (k, v, val) in updates {
            s.merge(k, *v, val.clone(), now);
        }
        s.digest()
    }

    /// Updates from a consistent world: one value per version.
    fn consistent(mut u: Vec<Update>) -> Vec<Update> {
        let mut seen: BTreeMap<(EntryKey, Version), Option<Bytes>> = BTreeMap::new();
        for (k, v, val) in &mut u {
            let e = seen.entry((k.clone(), *v)).or_insert_with(|| val.clone());
            *val = e.clone();
        }
        u
    }

    proptest! {
        #[test]
        fn merge_is_order_independent(u in proptest::collection::vec(update(), 0..40), seed in any::<u64>()) {
            let u = consistent(u);
            let mut shuffled = u.clone();
            // Fisher-Yates with a tiny LCG so the permutation follows the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(apply(&u), apply(&shuffled));
        }

        #[test]
        fn merge_is_idempotent(u in proptest::collection::vec(update(), 0..40)) {
            let u = consistent(u);
            let twice: Vec<Update> = u.iter().chain(u.iter()).cloned().collect();
            prop_assert_eq!(apply(&u), apply(&twice));
        }

        #[test]
        fn merge_is_commutative(a in update(), b in update()) {
            let u = consistent(vec![a, b]);
            let r = vec![u[1].clone(), u[0].clone()];
            prop_assert_eq!(apply(&u), apply(&r));
        }

        #[test]
        fn live_counts_per_owner_match_the_entries(
            u in proptest::collection::vec(update(), 0..40),
            gone in 0u64..3,
        ) {
            let now = Instant::now();
            let mut s = Store::new();
            for (k, v, val) in &consistent(u) {
                s.merge(k, *v, val.clone(), now);
            }
            s.remove_where(|_, e| e.version.owner == NodeId(gone));
            for owner in 0..3 {
                let live = s
                    .iter()
                    .filter(|(_, e)| e.value.is_some() && e.version.owner == NodeId(owner))
                    .count();
                prop_assert_eq!(s.live_owned_by(NodeId(owner)), live);
            }
        }

        #[test]
        fn larger_version_always_wins(u in proptest::collection::vec(update(), 1..40)) {
            let u = consistent(u);
            let state = apply(&u);
            for (k, v, _) in &state {
                let max = u.iter().filter(|(uk, _, _)| uk == k).map(|(_, uv, _)| *uv).max();
                prop_assert_eq!(Some(*v), max);
            }
        }
    }

    #[test]
    fn tombstones_are_reaped_after_their_time() {
        let t0 = Instant::now();
        let mut s = Store::new();
        let k = EntryKey::new("t", "n", "k");
        let v1 = Version { ltime: 1, owner: NodeId(1), generation: 1 };
        let v2 = Version { ltime: 2, ..v1 };
        assert_eq!(s.merge(&k, v1, Some(Bytes::from_static(b"x")), t0), Merge::Applied);
        assert_eq!(s.merge(&k, v1, Some(Bytes::from_static(b"x")), t0), Merge::Duplicate);
        assert_eq!(s.merge(&k, v2, None, t0), Merge::Applied);
        assert_eq!(s.merge(&k, v1, Some(Bytes::from_static(b"x")), t0), Merge::Stale);
        assert_eq!(s.reap(t0 + Duration::from_secs(60), Duration::from_secs(1800)), 0);
        assert_eq!(s.reap(t0 + Duration::from_secs(1801), Duration::from_secs(1800)), 1);
        assert!(s.is_empty());
    }
}
