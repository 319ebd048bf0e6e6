//! East-west service VIPs for shoal tasks: a connection from a task to a service's virtual IP is
//! DNAT-ed by the kernel, inside the task's own network namespace, to one of the service's
//! healthy task addresses.
//!
//! Swarm does this with IPVS in a per-node load-balancer namespace and SNATs the caller away; this
//! kernel has no IPVS, and nftables in the caller's namespace needs neither an extra hop nor SNAT,
//! so backends see the real client task address.
//!
//! # Layers
//!
//! - [`batch`]: the pure part. [`VipRule`]s in, the nftables transaction that replaces table
//!   `ip shoal-vip` out: sorted, deduplicated, validated, the same for the same input. No I/O.
//! - [`apply`] / [`clear`]: commit that transaction over netlink from a thread inside the task's
//!   namespace ([`shoal_nft`]; no `nft` binary). One transaction deletes the old table and
//!   creates the new one atomically: there is never a moment without rules, and a failed
//!   transaction changes nothing.
//!
//! # The ruleset
//!
//! A nat chain on the `output` hook (the traffic originates in the namespace) looks the
//! destination up in the verdict map `vips`, one entry per VIP, and jumps to that VIP's chain:
//!
//! - with backends: `dnat to numgen random mod N map { 0 : a, 1 : b, … }` (one backend: `dnat to a`).
//!   Only the address is rewritten, so any port of the VIP reaches the same port of a backend.
//! - without backends: `reject with tcp reset` for TCP and an ICMP port-unreachable `reject` for
//!   the rest, so clients fail at once instead of waiting for a timeout. (A locally sent UDP
//!   datagram that the output hook rejects makes `send` fail with `EPERM`.)
//!
//! Only a connection's first packet passes a nat chain; conntrack keeps an established
//! connection on its backend when the rules change, and new connections use the new set. The
//! chain's `ct state new` match is load-bearing: nftables turns conntrack on in a namespace only
//! for `ct` and `nat` expressions, not for nat chains, so a table whose VIPs all lacked backends
//! would otherwise see no packets at all and strand established connections. (Kernel 6.18.)
//!
//! # Driving it (the agent)
//!
//! ```no_run
//! # fn f(ns: &shoal_netns::NetNs) -> Result<(), shoal_vip::Error> {
//! use shoal_vip::VipRule;
//! // Whenever the endpoint tables change, for every task namespace: the VIPs of the services on
//! // that task's networks, each with the addresses of its healthy tasks.
//! let rules = [VipRule {
//!     vip: "10.0.1.2".parse().expect("literal"),
//!     backends: vec!["10.0.1.7".parse().expect("literal"), "10.0.1.9".parse().expect("literal")],
//! }];
//! shoal_vip::apply(ns, &rules)?;
//! // When the task leaves (deleting its namespace removes the table too):
//! shoal_vip::clear(ns)?;
//! # Ok(()) }
//! ```
//!
//! The VIP must be routable in the namespace, or `connect` fails with `ENETUNREACH` before the
//! output hook runs. Swarm takes VIPs from the network's subnet, whose connected route covers
//! them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use shoal_netns::NetNs;
use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, ElemData, Expr, Family, Hook, PayloadBase, Reject,
    SetData, SetKey, Verdict,
};

/// The nftables table (family `ip`) this crate owns in each namespace.
pub const TABLE: &str = "shoal-vip";

/// The most backends one VIP may have (the size of its `numgen` map).
pub const MAX_BACKENDS: usize = 4096;

/// One service VIP as seen from a task: its virtual address and the addresses of its healthy tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipRule {
    /// The service's virtual address (not assigned to any interface).
    pub vip: Ipv4Addr,
    /// The addresses of the service's healthy tasks; empty means connections are refused.
    pub backends: Vec<Ipv4Addr>,
}

/// What went wrong. The rules in force are unchanged after every variant (bad input is caught
/// before the kernel is asked, a refused transaction is rolled back by the kernel), except when
/// the kernel's verdict could not be read ([`shoal_nft::Error::NoVerdict`]): then it may have
/// committed, and applying again settles it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VIP is among its own backends, which would loop; nothing was changed.
    #[error("VIP {vip} lists itself as a backend; nothing was changed")]
    VipIsBackend {
        /// The offending VIP.
        vip: Ipv4Addr,
    },
    /// A VIP has more distinct backends than [`MAX_BACKENDS`]; nothing was changed.
    #[error(
        "VIP {vip} has {count} backends, more than the {MAX_BACKENDS} allowed; nothing was changed"
    )]
    TooManyBackends {
        /// The offending VIP.
        vip: Ipv4Addr,
        /// Its number of distinct backends.
        count: usize,
    },
    /// The same VIP appears twice with different backend sets; nothing was changed.
    #[error("VIP {vip} is given twice with different backends; nothing was changed")]
    ConflictingVip {
        /// The duplicated VIP.
        vip: Ipv4Addr,
    },
    /// A VIP or backend is unspecified, loopback, multicast or broadcast; nothing was changed.
    #[error(
        "{role} {addr} of VIP {vip} is not a unicast task address \
         (unspecified, loopback, multicast or broadcast); nothing was changed"
    )]
    BadAddress {
        /// The VIP whose rule holds the address.
        vip: Ipv4Addr,
        /// The bad address.
        addr: Ipv4Addr,
        /// `"VIP"` or `"backend"`.
        role: &'static str,
    },
    /// The kernel refused the transaction or could not be asked; see [`shoal_nft::Error`] for
    /// whether the rules in force changed (only when no verdict came back).
    #[error("could not {op} table ip {TABLE} in namespace {ns:?}: {source}")]
    Nft {
        /// `"apply"` or `"clear"`.
        op: &'static str,
        /// The namespace.
        ns: String,
        /// What the kernel said.
        source: shoal_nft::Error,
    },
    /// Entering the namespace failed; nothing was changed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
}

/// Checks the rules and brings them to one canonical form: VIPs in order, each with its backends
/// sorted and deduplicated. Identical duplicates of a rule collapse into one.
fn normalise(rules: &[VipRule]) -> Result<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>, Error> {
    let unusable =
        |a: Ipv4Addr| a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast();
    let mut out = BTreeMap::new();
    for rule in rules {
        let vip = rule.vip;
        if unusable(vip) {
            return Err(Error::BadAddress { vip, addr: vip, role: "VIP" });
        }
        let mut backends = rule.backends.clone();
        backends.sort_unstable();
        backends.dedup();
        if let Some(&addr) = backends.iter().find(|&&a| unusable(a)) {
            return Err(Error::BadAddress { vip, addr, role: "backend" });
        }
        if backends.binary_search(&vip).is_ok() {
            return Err(Error::VipIsBackend { vip });
        }
        if backends.len() > MAX_BACKENDS {
            return Err(Error::TooManyBackends { vip, count: backends.len() });
        }
        match out.get(&vip) {
            Some(seen) if *seen != backends => return Err(Error::ConflictingVip { vip }),
            Some(_) => {}
            None => {
                out.insert(vip, backends);
            }
        }
    }
    Ok(out)
}

/// The name of a VIP's chain: `v10_0_1_2` for 10.0.1.2.
fn chain_name(vip: Ipv4Addr) -> String {
    let [a, b, c, d] = vip.octets();
    format!("v{a}_{b}_{c}_{d}")
}

/// Starts a transaction that makes the table exist and then deletes it, so the commands that
/// follow start from nothing whether or not the table was there.
fn delete_table() -> Batch {
    let mut b = Batch::new();
    b.add_table(Family::Ip, TABLE);
    b.del_table(Family::Ip, TABLE);
    b
}

/// The transaction that replaces the namespace's table `ip shoal-vip` with `rules`; in `nft`
/// syntax:
///
/// ```text
/// table ip shoal-vip {
///     map vips { type ipv4_addr : verdict; elements = { 10.0.1.2 : goto v10_0_1_2, ... } }
///     chain output {
///         type nat hook output priority -100; policy accept;
///         ct state new ip daddr vmap @vips
///     }
///     chain v10_0_1_2 { dnat to numgen random mod 2 map { 0 : 10.0.1.7, 1 : 10.0.1.9 } }
///     chain v10_0_1_3 { dnat to 10.0.1.20 }
///     chain v10_0_1_4 { ip protocol tcp reject with tcp reset; reject }
/// }
/// ```
pub fn batch(rules: &[VipRule]) -> Result<Batch, Error> {
    let vips = normalise(rules)?;
    let (f, t) = (Family::Ip, TABLE);
    let mut b = delete_table();
    b.add_table(f, t);
    let map = b.add_set(f, t, Some("vips"), SetKey::Ipv4Addr, Some(SetData::Verdict));
    let hook = BaseChain { kind: ChainType::Nat, hook: Hook::Output, priority: -100 };
    b.add_chain(f, t, "output", Some(hook));
    // The VIP chains exist before the map's elements jump to them.
    for &vip in vips.keys() {
        b.add_chain(f, t, &chain_name(vip), None);
    }
    let entries: Vec<Elem> = vips
        .keys()
        .map(|&vip| Elem {
            key: vip.octets().to_vec(),
            data: Some(ElemData::Verdict(Verdict::Goto(chain_name(vip)))),
        })
        .collect();
    b.add_elements(f, t, &map, &entries);
    // `ct state new` is what keeps conntrack on in the namespace: a nat chain alone does not, and
    // without conntrack the chain is never consulted and established connections lose their
    // translation. (A nat chain only sees a connection's first packet, so the match is exact.)
    // Conntrack state bits are a host-order u32; "new" is bit 3.
    b.add_rule(
        f,
        t,
        "output",
        &[
            Expr::CtState,
            Expr::Bitwise { mask: 8u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
            Expr::Cmp { op: CmpOp::Neq, data: vec![0; 4] },
            Expr::Payload { base: PayloadBase::Network, offset: 16, len: 4 },
            Expr::Lookup { set: map },
        ],
    );
    for (&vip, backends) in &vips {
        let chain = chain_name(vip);
        match backends.as_slice() {
            [] => {
                // `ip protocol tcp` (byte 9 of the IP header is 6), then a reset; else ICMP.
                b.add_rule(
                    f,
                    t,
                    &chain,
                    &[
                        Expr::Payload { base: PayloadBase::Network, offset: 9, len: 1 },
                        Expr::Cmp { op: CmpOp::Eq, data: vec![6] },
                        Expr::Reject(Reject::TcpReset),
                    ],
                );
                // ICMP code 3: port unreachable.
                b.add_rule(f, t, &chain, &[Expr::Reject(Reject::IcmpUnreachable(3))]);
            }
            [one] => {
                b.add_rule(f, t, &chain, &[Expr::Immediate(one.octets().to_vec()), Expr::DnatIpv4]);
            }
            many => {
                // numgen's result is a host-order u32, so the map's keys are too.
                let pick = b.add_set(f, t, None, SetKey::HostInteger(4), Some(SetData::Ipv4Addr));
                let elems: Vec<Elem> = (0u32..)
                    .zip(many)
                    .map(|(i, a)| Elem {
                        key: i.to_ne_bytes().to_vec(),
                        data: Some(ElemData::Value(a.octets().to_vec())),
                    })
                    .collect();
                b.add_elements(f, t, &pick, &elems);
                let modulus = u32::try_from(many.len()).unwrap_or(u32::MAX);
                b.add_rule(
                    f,
                    t,
                    &chain,
                    &[Expr::NumgenRandom { modulus }, Expr::Lookup { set: pick }, Expr::DnatIpv4],
                );
            }
        }
    }
    Ok(b)
}

/// Replace the namespace's `ip shoal-vip` table with `rules` (one nftables transaction,
/// committed in the namespace). Idempotent; on any error the previous rules stay in force.
pub fn apply(ns: &NetNs, rules: &[VipRule]) -> Result<(), Error> {
    commit_in(ns, "apply", batch(rules)?)
}

/// Remove the table (no error if absent).
pub fn clear(ns: &NetNs) -> Result<(), Error> {
    commit_in(ns, "clear", delete_table())
}

fn commit_in(ns: &NetNs, op: &'static str, b: Batch) -> Result<(), Error> {
    ns.run(|| b.commit())?.map_err(|source| Error::Nft { op, ns: ns.name().to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test literal")
    }

    fn rule(vip: &str, backends: &[&str]) -> VipRule {
        VipRule { vip: ip(vip), backends: backends.iter().map(|b| ip(b)).collect() }
    }

    #[test]
    fn batch_is_deterministic_sorted_and_deduplicated() {
        let a = [
            rule("10.0.1.3", &["10.0.1.9", "10.0.1.7", "10.0.1.9"]),
            rule("10.0.1.2", &["10.0.1.20"]),
            rule("10.0.1.3", &["10.0.1.7", "10.0.1.9"]),
        ];
        let b = [rule("10.0.1.2", &["10.0.1.20"]), rule("10.0.1.3", &["10.0.1.7", "10.0.1.9"])];
        let batch_a = batch(&a).expect("valid");
        assert_eq!(batch_a, batch(&b).expect("valid"));
        let commands = batch_a.commands().join("\n");
        for want in [
            "add table ip shoal-vip\ndelete table ip shoal-vip\nadd table ip shoal-vip\n",
            "add chain output (nat hook output)\nadd chain v10_0_1_2\nadd chain v10_0_1_3\n",
            "add rule to chain output (ct bitwise cmp payload lookup)\n",
            "add rule to chain v10_0_1_2 (immediate nat)\n",
            "add set __map%d\nadd elements to set __map%d\n\
             add rule to chain v10_0_1_3 (numgen lookup nat)",
        ] {
            assert!(commands.contains(want), "{want:?} not in\n{commands}");
        }
    }

    #[test]
    fn vip_without_backends_rejects() {
        let commands = batch(&[rule("10.0.1.4", &[])]).expect("valid").commands().join("\n");
        assert!(commands.contains("chain v10_0_1_4 (payload cmp reject)\n"), "{commands}");
        assert!(commands.ends_with("add rule to chain v10_0_1_4 (reject)"), "{commands}");
        assert!(!commands.contains("nat)"), "{commands}");
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            batch(&[rule("10.0.1.2", &["10.0.1.3", "10.0.1.2"])]),
            Err(Error::VipIsBackend { .. })
        ));
        assert!(matches!(
            batch(&[rule("10.0.1.2", &["10.0.1.3"]), rule("10.0.1.2", &["10.0.1.4"])]),
            Err(Error::ConflictingVip { .. })
        ));
        assert!(matches!(
            batch(&[rule("127.0.0.11", &["10.0.1.3"])]),
            Err(Error::BadAddress { role: "VIP", .. })
        ));
        assert!(matches!(
            batch(&[rule("10.0.1.2", &["224.0.0.1"])]),
            Err(Error::BadAddress { role: "backend", .. })
        ));
        let many: Vec<Ipv4Addr> =
            (0..=MAX_BACKENDS as u32).map(|i| Ipv4Addr::from(0x0a01_0000 + i)).collect();
        let err = batch(&[VipRule { vip: ip("10.0.0.1"), backends: many.clone() }]);
        assert!(
            matches!(err, Err(Error::TooManyBackends { count, .. }) if count == MAX_BACKENDS + 1)
        );
        // Exactly the limit is fine, and duplicates do not count.
        let mut at_limit = many[..MAX_BACKENDS].to_vec();
        at_limit.extend_from_slice(&many[..10]);
        assert!(batch(&[VipRule { vip: ip("10.0.0.1"), backends: at_limit }]).is_ok());
    }

    /// A transaction that the kernel refuses after the deletion of the old table comes back as
    /// `Error::Nft` naming the refused command, and the kernel keeps the old rules (root only).
    #[test]
    fn a_refused_transaction_says_why_and_keeps_the_old_table() {
        use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
        if !require_root("a_refused_transaction_says_why_and_keeps_the_old_table") {
            return;
        }
        let mut c = Cleanup::new();
        let name = unique_prefix("vu");
        let ns = c.netns(&name).expect("netns");
        apply(&ns, &[rule("10.0.1.2", &["10.0.1.7", "10.0.1.9"])]).expect("apply");
        let listed = || {
            let rules = ns.run(|| shoal_nft::rules(Family::Ip, TABLE)).expect("enter ns");
            let rules = rules.expect("dump");
            rules.into_iter().map(|r| r.chain).collect::<Vec<_>>()
        };
        assert_eq!(listed(), ["output", "v10_0_1_2"]);
        let mut bogus = batch(&[rule("10.0.1.3", &["10.0.1.8"])]).expect("valid");
        bogus.add_rule(Family::Ip, TABLE, "output", &[Expr::Verdict(Verdict::Goto("x".into()))]);
        let err = commit_in(&ns, "apply", bogus).expect_err("goto a missing chain");
        assert!(matches!(err, Error::Nft { op: "apply", .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("add rule to chain output (immediate)"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        assert_eq!(listed(), ["output", "v10_0_1_2"], "old rules gone");
        apply(&ns, &[]).expect("apply no VIPs");
        assert_eq!(listed(), ["output"]);
        clear(&ns).expect("clear");
        assert!(listed().is_empty());
        clear(&ns).expect("clear of an absent table");
    }
}
