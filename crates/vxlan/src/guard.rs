//! The nftables guard of encrypted networks: a kernel VXLAN device accepts cleartext frames for
//! its VNI from anyone who reaches the data-path port, so frames for an encrypted VNI that did
//! not come out of the WireGuard TUN are dropped (and counted) before the VXLAN socket sees them.
//! Applied atomically over netlink (one nftables transaction) inside the node's namespace.
//!
//! The table, as `nft list` shows it:
//!
//! ```text
//! table inet shoal_guard {
//!     set encrypted_vnis { elements = { 4097, ... } }
//!     chain input-<fingerprint> {
//!         type filter hook input priority -200; policy accept;
//!         udp dport <data port> iifname != "<tun>" @th,96,24 @encrypted_vnis counter drop
//!     }
//! }
//! ```
//!
//! `@th,96,24` is the VNI: bytes 12..15 of the UDP datagram (8 bytes of UDP header, then the
//! VXLAN header's flags and reserved bytes).
//!
//! The chain's name carries a fingerprint of what the guard was made for (data port, TUN, VNIs).
//! The kernel reports each dumped rule with its chain, so one dump of the table tells whether the
//! guard in force is the one wanted ([`in_force`]): a table deleted by hand, a flushed chain or a
//! guard left for another VNI set is found and replaced by the driver's next check.

use std::collections::BTreeSet;

use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, Expr, Family, Hook, MetaKey, PayloadBase, SetKey,
    SetRef, Verdict,
};

use crate::{Error, NodeNs};

/// Name of the nftables table (family `inet`).
pub const TABLE: &str = "shoal_guard";
/// Name of the set of encrypted VNIs.
const SET: &str = "encrypted_vnis";
/// What the base chain's name starts with (the fingerprint follows).
const CHAIN_PREFIX: &str = "input-";
/// The kernel's names of the rule's expressions, in order, as [`rule`] makes them.
const RULE_SHAPE: [&str; 10] =
    ["meta", "cmp", "payload", "cmp", "meta", "cmp", "payload", "lookup", "counter", "immediate"];
/// `IPPROTO_UDP`.
const UDP: u8 = 17;

/// The transaction that makes the guard match `vnis`: the old table goes, and a new one comes
/// unless `vnis` is empty.
pub fn batch(data_port: u16, tun: &str, vnis: &BTreeSet<u32>) -> Batch {
    let f = Family::Inet;
    let mut b = Batch::new();
    // Creating the table first makes the delete succeed whether or not it existed.
    b.add_table(f, TABLE);
    b.del_table(f, TABLE);
    if vnis.is_empty() {
        return b;
    }
    b.add_table(f, TABLE);
    let set = b.add_set(f, TABLE, Some(SET), SetKey::Integer(3), None);
    let elems: Vec<Elem> =
        vnis.iter().map(|v| Elem { key: v.to_be_bytes()[1..].to_vec(), data: None }).collect();
    b.add_elements(f, TABLE, &set, &elems);
    let hook = BaseChain { kind: ChainType::Filter, hook: Hook::Input, priority: -200 };
    let chain = chain_name(data_port, tun, vnis);
    b.add_chain(f, TABLE, &chain, Some(hook));
    b.add_rule(f, TABLE, &chain, &rule(data_port, tun, set));
    b
}

/// The guard's one rule: UDP to the data port, not from the TUN, with a VNI of `set`: drop.
fn rule(data_port: u16, tun: &str, set: SetRef) -> Vec<Expr> {
    // An interface name compares as 16 NUL-padded bytes (IFNAMSIZ).
    let mut name = tun.as_bytes().to_vec();
    name.resize(16, 0);
    vec![
        Expr::Meta(MetaKey::L4Proto),
        Expr::Cmp { op: CmpOp::Eq, data: vec![UDP] },
        Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
        Expr::Cmp { op: CmpOp::Eq, data: data_port.to_be_bytes().to_vec() },
        Expr::Meta(MetaKey::IifName),
        Expr::Cmp { op: CmpOp::Neq, data: name },
        Expr::Payload { base: PayloadBase::Transport, offset: 12, len: 3 },
        Expr::Lookup { set },
        Expr::Counter,
        Expr::Verdict(Verdict::Drop),
    ]
}

/// The base chain's name: [`CHAIN_PREFIX`] and an FNV-1a hash of everything the guard is made
/// for, so that a guard made for anything else has another name.
fn chain_name(data_port: u16, tun: &str, vnis: &BTreeSet<u32>) -> String {
    let bytes = data_port
        .to_be_bytes()
        .into_iter()
        .chain(tun.bytes())
        .chain([0])
        .chain(vnis.iter().flat_map(|v| v.to_be_bytes()));
    let hash = bytes
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{CHAIN_PREFIX}{hash:016x}")
}

/// Applies the guard for `vnis` in the node's namespace (atomically replacing the old one).
pub fn apply(node: &NodeNs, data_port: u16, tun: &str, vnis: &BTreeSet<u32>) -> Result<(), Error> {
    if tun.len() >= 16 || vnis.iter().any(|&v| v >= 1 << 24) {
        return Err(Error::Invalid(format!(
            "guard: interface name {tun:?} or a VNI of {vnis:?} is out of range"
        )));
    }
    let b = batch(data_port, tun, vnis);
    node.run(move || b.commit())?.map_err(Error::Nft)
}

/// Whether the guard in force in the node's namespace is the one [`apply`] makes for `vnis`
/// (for no VNIs: that the table holds no rule), and the packets its table has dropped. One
/// dump of the table's rules.
pub fn in_force(
    node: &NodeNs,
    data_port: u16,
    tun: &str,
    vnis: &BTreeSet<u32>,
) -> Result<(bool, u64), Error> {
    let rules = node.run(|| shoal_nft::rules(Family::Inet, TABLE))?.map_err(Error::Nft)?;
    let dropped = drops_of(&rules);
    if vnis.is_empty() {
        return Ok((rules.is_empty(), dropped));
    }
    let chain = chain_name(data_port, tun, vnis);
    let ok = matches!(rules.as_slice(), [r] if r.chain == chain
        && r.exprs.iter().map(|e| e.name.as_str()).eq(RULE_SHAPE));
    Ok((ok, dropped))
}

/// Packets the guard has dropped so far (0 when the table is absent).
pub fn drops(node: &NodeNs) -> u64 {
    let Ok(Ok(rules)) = node.run(|| shoal_nft::rules(Family::Inet, TABLE)) else {
        return 0;
    };
    drops_of(&rules)
}

fn drops_of(rules: &[shoal_nft::DumpedRule]) -> u64 {
    rules
        .iter()
        .filter(|r| r.chain.starts_with(CHAIN_PREFIX))
        .flat_map(|r| &r.exprs)
        .filter_map(|e| e.counter)
        .map(|(packets, _)| packets)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_input_is_refused_before_the_kernel() {
        let vnis: BTreeSet<u32> = [1 << 24].into_iter().collect();
        let err = apply(&NodeNs::Current, 4789, "shoal-wg", &vnis).expect_err("VNI too big");
        assert!(err.to_string().contains("out of range"), "{err}");
        let one: BTreeSet<u32> = [4097].into_iter().collect();
        let err = apply(&NodeNs::Current, 4789, "a-name-longer-than-15", &one).expect_err("name");
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }

    #[test]
    fn the_shape_checked_is_the_rule_made() {
        let mut b = Batch::new();
        let set = b.add_set(Family::Inet, TABLE, Some(SET), SetKey::Integer(3), None);
        let names: Vec<&str> = rule(4789, "shoal-wg", set).iter().map(Expr::name).collect();
        assert_eq!(names, RULE_SHAPE);
    }

    #[test]
    fn the_chain_name_changes_with_anything_the_guard_is_made_for() {
        let vnis = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        let base = chain_name(4789, "shoal-wg", &vnis(&[4097, 4098]));
        assert!(base.len() <= 64 && base.starts_with(CHAIN_PREFIX), "{base}");
        assert_eq!(base, chain_name(4789, "shoal-wg", &vnis(&[4098, 4097])));
        for other in [
            chain_name(4790, "shoal-wg", &vnis(&[4097, 4098])),
            chain_name(4789, "shoal-wh", &vnis(&[4097, 4098])),
            chain_name(4789, "shoal-wg", &vnis(&[4097])),
            chain_name(4789, "shoal-wg", &vnis(&[4097, 4099])),
        ] {
            assert_ne!(base, other);
        }
    }
}
