//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size in which
//! every backend owns an almost equal share of slots, and removing one backend moves few keys
//! besides its own. Hashes are fixed (FNV-1a + a SplitMix64 finaliser), never std's
//! `DefaultHasher`, so a table is the same on every node and every build.
//!
//! Both paths of the routing mesh use one table per service and one client hash: the kernel
//! path's nft rule computes `jhash ip saddr mod M seed CLIENT_SEED`, and [`MaglevTable::lookup_client`]
//! computes the same slot in Rust ([`jhash_ipv4`], [`scale`]), so a client that falls back from
//! the kernel path to the proxy keeps its task.

use std::net::{IpAddr, Ipv4Addr};

/// Smallest table size per backend: the table is a prime ≥ 100 × backends, the size the
/// Maglev paper uses to keep each backend's share of slots near 1/N.
pub const SLOTS_PER_BACKEND: usize = 100;

/// A built lookup table: slot → index into the backend list it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

/// Stable 64-bit hash of `bytes` under `seed`.
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64 finaliser: FNV alone has weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The seed of the client-address hash, the same on every node and in the kernel path's rule.
pub const CLIENT_SEED: u32 = 0x5348_4f41;

/// The Linux kernel's `jhash()` (include/linux/jhash.h) of an IPv4 address's four bytes, as
/// nft's `jhash ip saddr seed S` computes it: the bytes are read as a little-endian word into
/// `a`, then `__jhash_final`.
pub fn jhash_ipv4(addr: Ipv4Addr, seed: u32) -> u32 {
    let init = 0xdead_beef_u32.wrapping_add(4).wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    a = a.wrapping_add(u32::from_le_bytes(addr.octets()));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

/// The slot of a 32-bit hash in a table of `m` slots as nft's `hash … mod m` picks it: the
/// kernel scales the hash into `0..m` (`reciprocal_scale`), it does not take the remainder.
pub fn scale(hash: u32, m: usize) -> usize {
    ((u64::from(hash) * m as u64) >> 32) as usize
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The table size (a prime) up to [`SMALL_MAX`] backends: the kernel path writes one map
/// element per slot, and a table this size is a transaction of milliseconds and well under a
/// megabyte of kernel memory per service.
pub const SMALL_SIZE: usize = 4_093;

/// The most backends a [`SMALL_SIZE`] table holds at 100 slots each.
pub const SMALL_MAX: usize = SMALL_SIZE / SLOTS_PER_BACKEND;

/// The table size (a prime) from [`SMALL_MAX`] + 1 up to 655 backends.
pub const DEFAULT_SIZE: usize = 65_537;

/// The table size used for `n` backends: a prime ≥ 100 × n, from a few fixed sizes so that it
/// does not change when a backend comes or goes (a size change remaps nearly every key):
/// 4 093 up to 40 backends, 65 537 up to 655, beyond that the smallest prime ≥ 100 × the next
/// power of two. Crossing from one size to the next remaps the clients once.
pub fn table_size(n: usize) -> usize {
    if n <= SMALL_MAX {
        return SMALL_SIZE;
    }
    if SLOTS_PER_BACKEND * n <= DEFAULT_SIZE {
        return DEFAULT_SIZE;
    }
    let mut m = SLOTS_PER_BACKEND * n.next_power_of_two();
    while !is_prime(m) {
        m += 1;
    }
    m
}

impl MaglevTable {
    /// Builds the table for backends named by `ids`: their order defines the returned indices,
    /// while placement depends on the names only (the table is filled in the names' sorted
    /// order), so callers that list the same backends in different orders agree on every
    /// slot's backend. Empty → empty.
    pub fn build<S: AsRef<str>>(ids: &[S]) -> MaglevTable {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by(|&a, &b| ids[a].as_ref().cmp(ids[b].as_ref()));
        let sorted: Vec<&str> = order.iter().map(|&i| ids[i].as_ref()).collect();
        let mut table = MaglevTable::build_sorted(&sorted);
        for s in &mut table.slots {
            *s = order[*s as usize] as u32;
        }
        table
    }

    fn build_sorted(ids: &[&str]) -> MaglevTable {
        let n = ids.len();
        if n == 0 {
            return MaglevTable { slots: Vec::new() };
        }
        let m = table_size(n);
        let perms: Vec<(usize, usize)> = ids
            .iter()
            .map(|id| {
                let b = id.as_bytes();
                let offset = (hash64(0x6d61_676c, b) % m as u64) as usize;
                let skip = (hash64(0x736b_6970, b) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut slots = vec![u32::MAX; m];
        let mut filled = 0;
        'outer: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while slots[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'outer;
                }
            }
        }
        MaglevTable { slots }
    }

    /// Number of slots (0 for an empty table).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no backend.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The backend index for a key hash.
    pub fn lookup(&self, key_hash: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(key_hash % self.slots.len() as u64) as usize] as usize)
    }

    /// The backend index for a client's address. An IPv4 client's slot is the one the kernel
    /// path's rule picks (`jhash ip saddr mod M seed CLIENT_SEED`), also when a dual-stack
    /// listener reports it IPv4-mapped; IPv6 has no kernel path and hashes with [`hash64`].
    pub fn lookup_client(&self, client: IpAddr) -> Option<usize> {
        match client.to_canonical() {
            IpAddr::V4(a) => {
                let slot = scale(jhash_ipv4(a, CLIENT_SEED), self.slots.len());
                self.slots.get(slot).map(|&i| i as usize)
            }
            IpAddr::V6(a) => self.lookup(hash64(0, &a.octets())),
        }
    }

    /// The raw slots (backend indices), for tests and diagnostics.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("task-{i:03}")).collect()
    }

    #[test]
    fn sizes_are_prime_and_large_enough() {
        for n in (1..50).chain([600, 655, 656, 1000, 5000]) {
            let m = table_size(n);
            assert!(is_prime(m) && m >= 100 * n, "{n} -> {m}");
        }
        assert!(is_prime(SMALL_SIZE) && is_prime(DEFAULT_SIZE));
        assert_eq!(table_size(1), 4_093);
        assert_eq!(table_size(40), 4_093);
        assert_eq!(table_size(41), 65_537);
        assert_eq!(table_size(655), 65_537);
        assert_eq!(table_size(700), table_size(1000), "stable within a power of two");
    }

    #[test]
    fn the_order_of_the_names_does_not_move_a_slot() {
        let sorted = MaglevTable::build(&["10.0.0.11", "10.0.0.5", "10.0.0.7"]);
        let other = MaglevTable::build(&["10.0.0.7", "10.0.0.11", "10.0.0.5"]);
        let names = |t: &MaglevTable, ids: [&'static str; 3]| -> Vec<&'static str> {
            t.slots().iter().map(|&i| ids[i as usize]).collect()
        };
        assert_eq!(
            names(&sorted, ["10.0.0.11", "10.0.0.5", "10.0.0.7"]),
            names(&other, ["10.0.0.7", "10.0.0.11", "10.0.0.5"])
        );
    }

    #[test]
    fn shares_differ_by_at_most_one_slot() {
        for n in [1, 2, 3, 7, 20] {
            let t = MaglevTable::build(&names(n));
            let mut count = vec![0usize; n];
            for &s in t.slots() {
                count[s as usize] += 1;
            }
            let (lo, hi) = (count.iter().min().copied(), count.iter().max().copied());
            assert!(hi.unwrap() - lo.unwrap() <= 1, "{n}: {count:?}");
        }
    }

    /// Frozen table: if the hash or the population order ever changes, keys silently move to
    /// other backends on upgrade (and nodes of mixed versions disagree). This pins the layout.
    #[test]
    fn frozen_table_guards_against_silent_remapping() {
        let t = MaglevTable::build(&["alpha", "bravo", "charlie"]);
        assert_eq!(t.len(), 4_093);
        let head: Vec<u32> = t.slots()[..24].to_vec();
        let digest = hash64(0, &t.slots().iter().map(|&s| s as u8).collect::<Vec<u8>>());
        assert_eq!(
            (head, digest),
            (FROZEN_HEAD.to_vec(), FROZEN_DIGEST),
            "Maglev placement changed: this remaps client affinity across upgrades"
        );
        assert_eq!(hash64(0, &[198, 19, 0, 7]), FROZEN_KEY_HASH);
    }
    const FROZEN_HEAD: [u32; 24] =
        [0, 2, 0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 1, 2, 0, 0, 2, 1, 2, 0, 0, 2, 1];
    const FROZEN_DIGEST: u64 = 11944609530598010862;
    const FROZEN_KEY_HASH: u64 = 1037965669502947158;

    /// Values the kernel computed (6.18) for nft rules `meta mark set jhash ip saddr mod M seed
    /// S` on the packets of a UDP socket bound to each address, read back bit by bit through
    /// counters. With `mod 2^32-1` the kernel's scaling yields the hash minus one.
    const KERNEL: [(&str, u32, u32, u32); 6] = [
        // (address, jhash seed 0, jhash seed CLIENT_SEED, slot of mod 4 093 seed CLIENT_SEED)
        ("10.9.0.1", 1_313_169_624, 342_069_872, 325),
        ("10.9.0.2", 1_274_103_857, 1_877_644_506, 1789),
        ("198.18.0.254", 3_613_400_335, 731_685_360, 697),
        ("192.168.7.200", 4_164_546_941, 3_382_279_469, 3223),
        ("1.2.3.4", 71_290_333, 973_684_360, 927),
        ("255.255.255.254", 1_399_917_414, 4_156_539_437, 3961),
    ];
    /// The kernel's slots of the same addresses for `mod 65 537`, in [`KERNEL`]'s order.
    const KERNEL_65537: [usize; 6] = [5219, 28_651, 11_164, 51_610, 14_857, 63_424];

    #[test]
    fn the_client_hash_is_the_kernels_jhash() {
        for ((addr, seed0, seeded, slot), big) in KERNEL.into_iter().zip(KERNEL_65537) {
            let a: Ipv4Addr = addr.parse().expect("test literal");
            assert_eq!(jhash_ipv4(a, 0), seed0, "{addr} seed 0");
            assert_eq!(jhash_ipv4(a, CLIENT_SEED), seeded, "{addr} seed {CLIENT_SEED:#x}");
            assert_eq!(scale(seeded, SMALL_SIZE), slot as usize, "{addr} mod {SMALL_SIZE}");
            assert_eq!(scale(seeded, DEFAULT_SIZE), big, "{addr} mod {DEFAULT_SIZE}");
        }
    }

    #[test]
    fn a_client_lands_in_the_kernels_slot() {
        let t = MaglevTable::build(&["10.0.0.5", "10.0.0.7", "10.0.0.9"]);
        for (addr, _, _, slot) in KERNEL {
            let a: Ipv4Addr = addr.parse().expect("test literal");
            let want = t.slots()[slot as usize] as usize;
            assert_eq!(t.lookup_client(IpAddr::V4(a)), Some(want), "{addr}");
            // As a dual-stack listener reports it.
            assert_eq!(t.lookup_client(IpAddr::V6(a.to_ipv6_mapped())), Some(want), "{addr}");
        }
        assert_eq!(
            MaglevTable::build::<&str>(&[]).lookup_client(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            None
        );
    }

    #[test]
    fn removing_one_of_many_moves_little_besides_its_share() {
        for n in [10usize, 25, 50] {
            let all = names(n);
            let before = MaglevTable::build(&all);
            let gone = n / 3;
            let rest: Vec<String> = all.iter().filter(|s| **s != all[gone]).cloned().collect();
            let after = MaglevTable::build(&rest);
            // Compare by key: 200k client hashes.
            let keys = 200_000u64;
            let mut moved = 0u64;
            for k in 0..keys {
                let h = hash64(1, &k.to_be_bytes());
                let b = &all[before.lookup(h).unwrap_or(0)];
                let a = &rest[after.lookup(h).unwrap_or(0)];
                if b != a {
                    moved += 1;
                }
            }
            let frac = moved as f64 / keys as f64;
            // Beyond its own share, a 4 093-slot table moves about 0.5 % of the keys at 4
            // backends and 2-3 % at 25 to 40 (depending on the names); a 65 537-slot one well
            // under 1 % at 50.
            let bound = if table_size(n) == SMALL_SIZE { 0.04 } else { 0.01 } + 1.0 / n as f64;
            assert!(frac <= bound, "n={n}: moved {frac:.4} > {bound:.4}");
            assert!(frac >= 1.0 / n as f64 * 0.8, "n={n}: its own share must move ({frac:.4})");
        }
    }
}
