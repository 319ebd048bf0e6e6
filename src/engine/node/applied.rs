//! What each subsystem last applied, so a pass applies only what changed: the projection says
//! what should be, and a [`LastApplied`] (or, for a subsystem keyed by service or task, a
//! [`LastAppliedMap`]) says what the subsystem last took. A value is recorded only once the
//! subsystem took it, so a failed apply is tried again by the next pass.

use std::borrow::Borrow;
use std::collections::BTreeMap;

/// The last value one subsystem took.
#[derive(Debug)]
pub(super) struct LastApplied<T>(Option<T>);

impl<T> Default for LastApplied<T> {
    fn default() -> Self {
        LastApplied(None)
    }
}

impl<T: PartialEq> LastApplied<T> {
    /// What was applied last, if anything.
    pub(super) fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }

    /// Whether `want` is what was applied last (then there is nothing to do).
    pub(super) fn is(&self, want: &T) -> bool {
        self.0.as_ref() == Some(want)
    }

    /// Records that `v` was applied.
    pub(super) fn set(&mut self, v: T) {
        self.0 = Some(v);
    }

    /// Records that nothing is applied any more.
    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

/// The last value a subsystem took per key (a service, a task).
#[derive(Debug)]
pub(super) struct LastAppliedMap<K, V>(BTreeMap<K, V>);

impl<K, V> Default for LastAppliedMap<K, V> {
    fn default() -> Self {
        LastAppliedMap(BTreeMap::new())
    }
}

impl<K: Ord + Clone, V: PartialEq> LastAppliedMap<K, V> {
    /// Whether `want` is what was applied last for `k`.
    pub(super) fn is<Q: Ord + ?Sized>(&self, k: &Q, want: &V) -> bool
    where
        K: Borrow<Q>,
    {
        self.0.get(k) == Some(want)
    }

    /// What was applied last for `k`.
    pub(super) fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.0.get(k)
    }

    /// Records that `v` was applied for `k`.
    pub(super) fn set(&mut self, k: K, v: V) {
        self.0.insert(k, v);
    }

    /// Forgets `k` (it was taken out, or its owner went).
    pub(super) fn remove<Q: Ord + ?Sized>(&mut self, k: &Q)
    where
        K: Borrow<Q>,
    {
        self.0.remove(k);
    }

    /// The keys applied last that `want` no longer has.
    pub(super) fn stale<W>(&self, want: &BTreeMap<K, W>) -> Vec<K> {
        self.0.keys().filter(|k| !want.contains_key(*k)).cloned().collect()
    }

    /// Every key applied.
    pub(super) fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.keys()
    }

    /// Every key with what was applied for it.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_taken_value_counts_as_applied() {
        let mut a = LastApplied::default();
        assert!(!a.is(&1) && a.get().is_none());
        a.set(1);
        assert!(a.is(&1) && !a.is(&2));

        let mut m = LastAppliedMap::default();
        m.set("web", 1);
        m.set("db", 2);
        assert!(m.is(&"web", &1) && !m.is(&"db", &1));
        let want = BTreeMap::from([("web", ())]);
        assert_eq!(m.stale(&want), ["db"]);
        m.remove(&"db");
        assert!(m.stale(&want).is_empty());
    }
}
