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
//!     chain input {
//!         type filter hook input priority -200; policy accept;
//!         udp dport <data port> iifname != "<tun>" @th,96,24 @encrypted_vnis counter drop
//!     }
//! }
//! ```
//!
//! `@th,96,24` is the VNI: bytes 12..15 of the UDP datagram (8 bytes of UDP header, then the
//! VXLAN header's flags and reserved bytes).

use std::collections::BTreeSet;

use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, Expr, Family, Hook, MetaKey, PayloadBase, SetKey,
    Verdict,
};

use crate::{Error, NodeNs};

/// Name of the nftables table (family `inet`).
pub const TABLE: &str = "shoal_guard";
/// Name of the set of encrypted VNIs.
const SET: &str = "encrypted_vnis";
/// Name of the base chain.
const CHAIN: &str = "input";
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
    b.add_chain(f, TABLE, CHAIN, Some(hook));
    // An interface name compares as 16 NUL-padded bytes (IFNAMSIZ).
    let mut name = tun.as_bytes().to_vec();
    name.resize(16, 0);
    b.add_rule(
        f,
        TABLE,
        CHAIN,
        &[
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
        ],
    );
    b
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

/// Packets the guard has dropped so far (0 when the table is absent).
pub fn drops(node: &NodeNs) -> u64 {
    let Ok(Ok(rules)) = node.run(|| shoal_nft::rules(Family::Inet, TABLE)) else {
        return 0;
    };
    rules
        .iter()
        .filter(|r| r.chain == CHAIN)
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
}
