//! The return path of routing-mesh connections that keep the client's address.
//!
//! The mesh (`shoal-ingress`) connects to a task from the client's own address and port
//! (`IP_TRANSPARENT` in the node's ingress sandbox), so the task sees the real client as its
//! peer and nothing is translated. Two things make the replies come back through the node
//! that received the connection:
//!
//! - **In the ingress sandbox** ([`apply_sandbox`]): a policy rule sends every packet that
//!   arrives on the ingress interface to a table whose one route is `local 0.0.0.0/0 dev lo`,
//!   so a reply addressed to a client (an address the sandbox does not hold) is delivered to the
//!   mesh's transparent socket instead of being forwarded or dropped. (The TPROXY recipe; only
//!   mesh traffic reaches that interface.)
//! - **In each task on the ingress network** ([`apply_task`]): the task cannot tell from the IP
//!   header which node a client's connection came through, but the Ethernet source can: every
//!   endpoint's MAC is `02:42` followed by its IPv4 address, so the last four bytes of an ingress
//!   sandbox's MAC are its address. An nftables table `ip shoal-return` marks each
//!   connection not yet marked whose packet arrives from a known sandbox MAC with that sandbox's address (conntrack
//!   mark), copies the mark onto every packet the task sends on that connection (a `route`
//!   chain, so the kernel routes the packet again), and a policy rule per sandbox sends marked
//!   packets to a table whose one route is `default via <sandbox>`.
//!
//! ```text
//! table ip shoal-return {
//!     set sandboxes { type ipv4_addr; elements = { 10.0.0.2, 10.0.0.3 } }
//!     chain prerouting {
//!         type filter hook prerouting priority mangle;
//!         ct mark 0 @ll,64,32 @sandboxes ct mark set @ll,64,32
//!     }
//!     chain output {
//!         type route hook output priority mangle;
//!         ct mark @sandboxes meta mark set ct mark
//!     }
//! }
//! ip rule: pref 9000 fwmark <mark(10.0.0.2)> lookup <mark(10.0.0.2)>
//! ip route: default via 10.0.0.2 table <mark(10.0.0.2)>
//! ```
//!
//! A mark is the sandbox address's four bytes read as a host-order integer ([`mark`]), the
//! same value nftables stores when it copies those bytes from the packet; the routing table of
//! a sandbox has the same number. Everything is netlink (rtnetlink and `shoal-nft`), no `ip`
//! or `nft` binary.
//!
//! The routing mesh's kernel path ([`kernel`]) keeps the client's address the same way: it
//! DNATs in the node and forwards through the same sandbox, so the same task rules apply.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conntrack;
pub mod kernel;
pub mod maglev_map;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use shoal_netns::NetNs;
use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, Expr, Family, Hook, PayloadBase, SetKey,
};

/// The nftables table (family `ip`) this crate owns in each task namespace.
pub const TABLE: &str = "shoal-return";

/// The priority of this crate's policy rules, in tasks and in the sandbox (before `main`).
pub const RULE_PRIORITY: u32 = 9000;

/// The sandbox's routing table that delivers everything locally.
pub const SANDBOX_TABLE: u32 = 9000;

/// What went wrong. A bad address is refused before anything changes; a netlink or nftables
/// failure can leave part of a pass applied, and applying again settles it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address would mark with a reserved routing table number.
    #[error("{addr} cannot be an ingress sandbox address here (its mark is a reserved table id)")]
    BadSandbox {
        /// The refused address.
        addr: Ipv4Addr,
    },
    /// A routing rule or route could not be read or written.
    #[error("could not {op} in namespace {ns:?}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The namespace.
        ns: String,
        /// What the kernel said.
        source: rtnetlink::Error,
    },
    /// The kernel refused the nftables transaction (the old table stays).
    #[error("could not apply table ip {TABLE} in namespace {ns:?}: {source}")]
    Nft {
        /// The namespace.
        ns: String,
        /// What the kernel said.
        source: shoal_nft::Error,
    },
    /// The conntrack table could not be read, or a flow in it not deleted (the flows not yet
    /// deleted stay; purging again finishes the job).
    #[error("could not purge conntrack flows in namespace {ns:?}: {source}")]
    Conntrack {
        /// The namespace.
        ns: String,
        /// What the kernel said.
        source: shoal_nft::Error,
    },
    /// A needed interface is missing.
    #[error("no interface {ifname:?} in namespace {ns:?}")]
    NoLink {
        /// The interface.
        ifname: String,
        /// The namespace.
        ns: String,
    },
    /// A system call outside netlink failed (a `/proc/sys` write, a netlink socket).
    #[error("could not {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// Entering the namespace failed; nothing was changed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
}

/// The connection mark and routing table number of a sandbox: its address's bytes as a
/// host-order integer (what nftables makes of the bytes it copies from the MAC).
pub fn mark(sandbox: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(sandbox.octets())
}

fn checked(sandboxes: &[Ipv4Addr]) -> Result<BTreeSet<Ipv4Addr>, Error> {
    let set: BTreeSet<Ipv4Addr> = sandboxes.iter().copied().collect();
    // Table ids 0 and 252..=255 belong to the kernel (unspec, compat, default, main, local).
    if let Some(&addr) = set.iter().find(|a| matches!(mark(**a), 0 | 252..=255)) {
        return Err(Error::BadSandbox { addr });
    }
    Ok(set)
}

/// The transaction that replaces the task's `ip shoal-return` table (see the crate docs).
pub fn batch(sandboxes: &[Ipv4Addr]) -> Result<Batch, Error> {
    let set = checked(sandboxes)?;
    let (f, t) = (Family::Ip, TABLE);
    let mut b = Batch::new();
    b.add_table(f, t);
    b.del_table(f, t);
    b.add_table(f, t);
    let known = b.add_set(f, t, Some("sandboxes"), SetKey::Ipv4Addr, None);
    if !set.is_empty() {
        let elems: Vec<Elem> =
            set.iter().map(|a| Elem { key: a.octets().to_vec(), data: None }).collect();
        b.add_elements(f, t, &known, &elems);
    }
    let pre = BaseChain { kind: ChainType::Filter, hook: Hook::Prerouting, priority: -150 };
    b.add_chain(f, t, "prerouting", Some(pre));
    let out = BaseChain { kind: ChainType::Route, hook: Hook::Output, priority: -150 };
    b.add_chain(f, t, "output", Some(out));
    // The mark is decided once, by the first packet from a known sandbox: the connection's
    // first, or (if the sandbox was briefly not in the set, as when gossip holds its node down
    // for a moment) the next one, such as the client's retransmitted SYN, so the task's
    // answer to it goes back the right way. The source MAC's last four bytes are bytes 8..12
    // of the Ethernet header.
    b.add_rule(
        f,
        t,
        "prerouting",
        &[
            Expr::CtMark,
            Expr::Cmp { op: CmpOp::Eq, data: vec![0; 4] },
            Expr::Payload { base: PayloadBase::LinkLayer, offset: 8, len: 4 },
            Expr::Lookup { set: known.clone() },
            Expr::SetCtMark,
        ],
    );
    // Only marks this table set are copied: the mark's bytes are the sandbox address's.
    b.add_rule(f, t, "output", &[Expr::CtMark, Expr::Lookup { set: known }, Expr::SetMetaMark]);
    Ok(b)
}

fn nl(op: impl Into<String>, ns: &NetNs) -> impl FnOnce(rtnetlink::Error) -> Error {
    let (op, ns) = (op.into(), ns.name().to_owned());
    move |source| Error::Netlink { op, ns, source }
}

/// This crate's IPv4 rules in the namespace (those at [`RULE_PRIORITY`]).
async fn our_rules(h: &Handle, ns: &NetNs) -> Result<Vec<RuleMessage>, Error> {
    let all: Vec<RuleMessage> =
        h.rule().get(IpVersion::V4).execute().try_collect().await.map_err(nl("list rules", ns))?;
    Ok(all
        .into_iter()
        .filter(|r| r.attributes.contains(&RuleAttribute::Priority(RULE_PRIORITY)))
        .collect())
}

fn fwmark_of(r: &RuleMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RuleAttribute::FwMark(m) => Some(*m),
        _ => None,
    })
}

/// Makes a task's replies on mesh connections go back through the sandbox they came from:
/// one route table and rule per sandbox in `sandboxes` (every node's ingress sandbox address),
/// and the `ip shoal-return` table. Idempotent; rules and routes of sandboxes no longer listed
/// go, after the table has stopped marking for them.
pub async fn apply_task(ns: &NetNs, sandboxes: &[Ipv4Addr]) -> Result<(), Error> {
    let want = checked(sandboxes)?;
    let h = ns.netlink()?;
    for &s in &want {
        let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(s).table_id(mark(s)).build();
        h.route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("route default via {s} in table {}", mark(s)), ns))?;
    }
    let have = our_rules(&h, ns).await?;
    let marks: BTreeSet<u32> = have.iter().filter_map(fwmark_of).collect();
    for &s in want.iter().filter(|s| !marks.contains(&mark(**s))) {
        h.rule()
            .add()
            .v4()
            .fw_mark(mark(s))
            .table_id(mark(s))
            .action(RuleAction::ToTable)
            .priority(RULE_PRIORITY)
            .execute()
            .await
            .map_err(nl(format!("add the rule for sandbox {s}"), ns))?;
    }
    let b = batch(sandboxes)?;
    ns.run(|| b.commit())?.map_err(|source| Error::Nft { ns: ns.name().to_owned(), source })?;
    let wanted: BTreeSet<u32> = want.iter().map(|s| mark(*s)).collect();
    for r in have.into_iter().filter(|r| fwmark_of(r).is_none_or(|m| !wanted.contains(&m))) {
        let table = fwmark_of(&r);
        h.rule().del(r).execute().await.map_err(nl("delete a stale rule", ns))?;
        if let Some(t) = table {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().table_id(t).build();
            // Gone already is fine: the table only ever held this route.
            let _ = h.route().del(route).execute().await;
        }
    }
    Ok(())
}

/// Makes the ingress sandbox deliver every packet that arrives on `ifname` locally, so replies
/// to the clients' addresses reach the mesh's transparent sockets. Idempotent.
pub async fn apply_sandbox(ns: &NetNs, ifname: &str) -> Result<(), Error> {
    let h = ns.netlink()?;
    let lo = shoal_netns::link_index(&h, "lo")
        .await
        .ok_or_else(|| Error::NoLink { ifname: "lo".into(), ns: ns.name().to_owned() })?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(lo)
        .table_id(SANDBOX_TABLE)
        .build();
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("local route in table {SANDBOX_TABLE}"), ns))?;
    let iif = RuleAttribute::Iifname(ifname.to_owned());
    if !our_rules(&h, ns).await?.iter().any(|r| r.attributes.contains(&iif)) {
        h.rule()
            .add()
            .v4()
            .input_interface(ifname)
            .table_id(SANDBOX_TABLE)
            .action(RuleAction::ToTable)
            .priority(RULE_PRIORITY)
            .execute()
            .await
            .map_err(nl(format!("add the rule for {ifname}"), ns))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test literal")
    }

    #[test]
    fn the_mark_is_the_address_bytes_in_host_order() {
        let m = mark(ip("10.0.0.2"));
        assert_eq!(m.to_ne_bytes(), [10, 0, 0, 2]);
    }

    #[test]
    fn batch_marks_from_the_mac_and_copies_known_marks() {
        let a = batch(&[ip("10.0.0.3"), ip("10.0.0.2"), ip("10.0.0.3")]).expect("valid");
        assert_eq!(a, batch(&[ip("10.0.0.2"), ip("10.0.0.3")]).expect("valid"));
        let commands = a.commands().join("\n");
        for want in [
            "add chain prerouting (filter hook prerouting)",
            "add chain output (route hook output)",
            "add rule to chain prerouting (ct cmp payload lookup ct)",
            "add rule to chain output (ct lookup meta)",
        ] {
            assert!(commands.contains(want), "{want:?} not in\n{commands}");
        }
    }

    /// The rules and routes follow the sandbox list, stale ones go, and applying twice is a
    /// no-op (root only).
    #[test]
    fn task_rules_follow_the_sandboxes() {
        use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
        if !require_root("task_rules_follow_the_sandboxes") {
            return;
        }
        let mut c = Cleanup::new();
        let name = unique_prefix("rt");
        let ns = c.netns(&name).expect("netns");
        // An interface on the sandboxes' subnet, so their addresses are gateways.
        for args in [
            vec!["link", "add", "ret0", "type", "veth", "peer", "name", "ret1"],
            vec!["addr", "add", "10.0.0.9/24", "dev", "ret0"],
            vec!["link", "set", "ret0", "up"],
            vec!["link", "set", "ret1", "up"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(["-n", &name])
                .args(&args)
                .status()
                .expect("ip");
            assert!(ok.success(), "ip {args:?}");
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let marks = |ns: &NetNs| -> BTreeSet<u32> {
            rt.block_on(async {
                let h = ns.netlink().expect("netlink");
                our_rules(&h, ns).await.expect("rules").iter().filter_map(fwmark_of).collect()
            })
        };
        let (a, b) = (ip("10.0.0.2"), ip("10.0.0.3"));
        rt.block_on(apply_task(&ns, &[a, b])).expect("apply two");
        rt.block_on(apply_task(&ns, &[b, a])).expect("apply again");
        assert_eq!(marks(&ns), [mark(a), mark(b)].into_iter().collect());
        rt.block_on(apply_task(&ns, &[b])).expect("apply one");
        assert_eq!(marks(&ns), [mark(b)].into_iter().collect());
        let tables = rt.block_on(async {
            let h = ns.netlink().expect("netlink");
            let all: Vec<_> = h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .expect("routes");
            all.iter()
                .filter_map(|r| {
                    r.attributes.iter().find_map(|x| match x {
                        rtnetlink::packet_route::route::RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                })
                .collect::<BTreeSet<u32>>()
        });
        assert!(tables.contains(&mark(b)) && !tables.contains(&mark(a)), "{tables:?}");
        let rules = ns.run(|| shoal_nft::rules(Family::Ip, TABLE)).expect("enter").expect("dump");
        let chains: Vec<&str> = rules.iter().map(|r| r.chain.as_str()).collect();
        assert_eq!(chains, ["prerouting", "output"]);
        rt.block_on(apply_sandbox(&ns, "ret0")).expect("sandbox");
        rt.block_on(apply_sandbox(&ns, "ret0")).expect("sandbox again");
        let iif = RuleAttribute::Iifname("ret0".into());
        let sandbox_rules = rt.block_on(async {
            let h = ns.netlink().expect("netlink");
            our_rules(&h, &ns)
                .await
                .expect("rules")
                .iter()
                .filter(|r| r.attributes.contains(&iif))
                .count()
        });
        assert_eq!(sandbox_rules, 1);
    }

    #[test]
    fn reserved_table_numbers_are_refused() {
        let reserved = Ipv4Addr::from(254u32.to_ne_bytes());
        assert!(matches!(batch(&[reserved]), Err(Error::BadSandbox { .. })));
    }
}
