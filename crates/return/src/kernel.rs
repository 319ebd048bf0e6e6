//! The kernel path of the routing mesh (`mesh=kernel`): a new connection to a published port is
//! DNAT-ed by nftables in the receiving node's own namespace straight to a task's ingress
//! address, and conntrack carries the rest of the flow both ways. Nothing is copied in
//! userspace, the task sees the client's own address and port, and flows outlive the agent.
//!
//! ```text
//! client ─▶ node: table ip shoal-mesh, nat prerouting:
//!             ct state new, l4proto, dport 8100, fib daddr type local
//!             dnat to numgen mod N map { 0: 10.0.0.5, 1: 10.0.0.7 } : 8000
//!             (maglev: jhash ip saddr mod M map { slot: task, … }, crate::maglev_map)
//!        ─▶ veth shoal-mesh ⇄ mesh0 (169.254.53.1/30 ⇄ .2) into the ingress sandbox,
//!           which forwards out eth0, its source MAC naming this node, over the ingress overlay
//!        ─▶ task; its shoal-return table sends the reply back to that sandbox (crate docs)
//! reply  ─▶ sandbox eth0: the flow's conntrack mark (set as it came in on mesh0) becomes the
//!           packet's mark, and `fwmark lookup 9001` routes it `default via 169.254.53.1`
//!        ─▶ node: conntrack un-DNATs it ─▶ client
//! ```
//!
//! The sandbox's mark rule sits before the rule that delivers everything from eth0 locally
//! (the userspace mesh's transparent sockets, [`crate::apply_sandbox`]), so both paths share
//! one sandbox. A port with no backend gets no rule, and its connections reach the userspace
//! listener on the same port, as do connections made on the node itself (they never pass
//! prerouting as new).
//!
//! The backends are the healthy, non-draining tasks, sorted; the agent replaces the node's
//! rules in one transaction whenever they change, and each port's rule counts the flows it
//! forwards in a named counter that stays with the table ([`flows`]). Only a flow's first
//! packet passes a nat chain, so established flows stay on their task (a draining one too) and
//! new ones use the new map. Client affinity (`maglev`) looks the client's address up in the
//! service's Maglev table, the same on every node and in the proxy ([`crate::maglev_map`]), so
//! a client lands on the same task through any node and through either path.
//!
//! A backend that has gone silent (its node's link was cut, or its node was killed and the
//! swarm has not noticed yet) or that refuses (its task has just died) still gets new flows
//! until the agent takes it out of the map, and DNAT cannot retry a SYN elsewhere as the
//! proxy's connect does. So a client whose SYN a backend has not answered is remembered
//! ([`UNANSWERED_SET`]), and the SYN the client's own TCP sends again a second later goes to the
//! proxy's listener on the same port, which retries on another backend. For that SYN to be a
//! new flow, the old one must be gone from conntrack, which would keep an unanswered flow in
//! `SYN_SENT` for two minutes: so each TCP port's rule attaches the table's timeout policy
//! [`SYN_TIMEOUT`] to the flow (before conntrack confirms it, as a nat prerouting chain runs):
//! one second in `SYN_SENT`, every other state the kernel's default. A SYN no backend answered
//! leaves conntrack before the client sends it again (Linux's first retransmission comes after
//! its initial retransmission timeout of one second, the next ones 3 s and 7 s after the
//! first); a reset closes the flow at once. A backend that answers a SYN later than a second
//! loses only that SYN. The purge of a departed backend's flows ([`crate::conntrack`]) still
//! clears the rest.
//!
//! The node's table also keeps the overlay's own VXLAN datagrams out of conntrack
//! (`untracked_overlay`); BENCH.md measures what each part of the route costs.
//!
//! Everything is netlink (rtnetlink and `shoal-nft`) and `/proc/sys`, no `ip` or `nft` binary.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use shoal_netns::NetNs;
use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, ElemData, Expr, Family, Hook, MetaKey, PayloadBase,
    SetData, SetKey, TcpTimeoutState, Verdict,
};

use crate::Error;

/// The nftables table (family `ip`) of the kernel path, in the node and in the sandbox.
pub const TABLE: &str = "shoal-mesh";
/// The node's end of the link into the ingress sandbox.
pub const NODE_LINK: &str = "shoal-mesh";
/// The sandbox's end.
pub const SANDBOX_LINK: &str = "mesh0";
/// The node's address on the link (a /30 of link-local space).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 1);
/// The sandbox's address on the link.
pub const SANDBOX_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 2);
/// The conntrack and packet mark of kernel-path flows in the sandbox ("mesh").
pub const FLOW_MARK: u32 = 0x6d65_7368;
/// The sandbox's routing table for replies of kernel-path flows.
pub const REPLY_TABLE: u32 = 9001;
/// The priority of the sandbox's reply rule: before [`crate::RULE_PRIORITY`].
pub const REPLY_RULE_PRIORITY: u32 = 8990;

/// How a port's new flows pick a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Uniformly at random.
    Random,
    /// Strict rotation (per node).
    RoundRobin,
    /// The service's Maglev table, looked up by a hash of the client's address: the same client,
    /// the same backend, through any node and through the proxy ([`crate::maglev_map`]).
    ClientHash,
}

/// A published port on the kernel path, with the backends new flows may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPort {
    /// The port clients connect to on every node.
    pub published: u16,
    /// The task's port.
    pub target: u16,
    /// UDP rather than TCP.
    pub udp: bool,
    /// How a backend is picked.
    pub pick: Pick,
    /// The healthy, non-draining tasks' ingress addresses (sorted and deduplicated here).
    pub backends: Vec<Ipv4Addr>,
}

/// The node's conntrack timeout policy for the TCP flows its rules DNAT: [`SYN_SENT_SECONDS`]
/// in `SYN_SENT`, the kernel's defaults in every other state (module docs). The kernel keeps a
/// policy that exists as it is, so the name says the value: another value needs another name.
pub const SYN_TIMEOUT: &str = "tcp-syn-sent-1s";
/// How long a DNAT-ed SYN no backend has answered stays in conntrack: up to Linux's initial SYN
/// retransmission timeout (1 s), so the client's first retransmission is a new flow. Less is
/// not possible: policies count whole seconds, and 0 would forget the flow before its answer.
pub const SYN_SENT_SECONDS: u32 = 1;

/// The most backends one port's map holds.
pub const MAX_BACKENDS: usize = 4096;

fn conntrack_new() -> [Expr; 3] {
    // Conntrack state bits are a host-order u32; "new" is bit 3. The match also turns
    // conntrack on in the namespace (a nat chain alone does not).
    [
        Expr::CtState,
        Expr::Bitwise { mask: 8u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
        Expr::Cmp { op: CmpOp::Neq, data: vec![0; 4] },
    ]
}

fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(16, 0);
    v
}

/// The name of a port's flow counter in the node's table: `tcp-8100`, `udp-8101`.
pub fn counter_name(udp: bool, published: u16) -> String {
    format!("{}-{published}", if udp { "udp" } else { "tcp" })
}

/// The transaction that rewrites the node's `ip shoal-mesh` table: one DNAT rule per port that
/// has backends, each counting the flows it forwards in the port's named counter and, for TCP,
/// giving them the [`SYN_TIMEOUT`] policy and remembering the client until its backend answers
/// ([`UNANSWERED_SET`]), and the overlay's VXLAN on `data_port` kept out of
/// conntrack (`untracked_overlay`). The table, the counters and the policy stay (so the
/// counts survive), the rules are replaced. The same ports give the same batch, in any order.
pub fn node_batch(data_port: u16, ports: &[KernelPort]) -> Batch {
    let (f, t) = (Family::Ip, TABLE);
    let mut ports: Vec<KernelPort> = ports
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.backends.sort_unstable();
            p.backends.dedup();
            p.backends.truncate(MAX_BACKENDS);
            p
        })
        .collect();
    ports.sort_by_key(|p| (p.udp, p.published));
    ports.dedup_by_key(|p| (p.udp, p.published));
    let mut b = Batch::new();
    b.add_table(f, t);
    b.add_tcp_timeout(f, t, SYN_TIMEOUT, &[(TcpTimeoutState::SynSent, SYN_SENT_SECONDS)]);
    untracked_overlay(&mut b, data_port);
    let hook = BaseChain { kind: ChainType::Nat, hook: Hook::Prerouting, priority: -100 };
    b.add_chain(f, t, "prerouting", Some(hook));
    b.flush_chain(f, t, "prerouting");
    let unanswered = unanswered_to_the_proxy(&mut b);
    for p in ports.iter().filter(|p| !p.backends.is_empty()) {
        let counter = counter_name(p.udp, p.published);
        b.add_counter(f, t, &counter);
        let mut rule: Vec<Expr> = conntrack_new().into();
        rule.extend([
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp { op: CmpOp::Eq, data: vec![if p.udp { 17 } else { 6 }] },
            Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
            Expr::Cmp { op: CmpOp::Eq, data: p.published.to_be_bytes().to_vec() },
            // Only what is addressed to this node (RTN_LOCAL), not what it routes onwards.
            Expr::FibDaddrType,
            Expr::Cmp { op: CmpOp::Eq, data: 2u32.to_ne_bytes().to_vec() },
        ]);
        if !p.udp {
            // The client is unanswered until its backend's SYN-ACK comes back; if the set is
            // full the rule stops here and the flow goes to the proxy.
            rule.extend(client_key(false));
            rule.push(Expr::AddToSet { set: unanswered.clone() });
        }
        if let [one] = p.backends.as_slice() {
            rule.push(Expr::Immediate(one.octets().to_vec()));
        } else {
            let modulus = u32::try_from(p.backends.len()).unwrap_or(u32::MAX);
            match p.pick {
                Pick::Random => rule.push(Expr::NumgenRandom { modulus }),
                Pick::RoundRobin => rule.push(Expr::NumgenInc { modulus }),
                Pick::ClientHash => rule.extend(crate::maglev_map::pick(&mut b, &p.backends)),
            }
            if p.pick != Pick::ClientHash {
                // numgen's results are host-order u32s, so the map's keys are too.
                let map = b.add_set(f, t, None, SetKey::HostInteger(4), Some(SetData::Ipv4Addr));
                let elems: Vec<Elem> = (0u32..)
                    .zip(&p.backends)
                    .map(|(i, a)| Elem {
                        key: i.to_ne_bytes().to_vec(),
                        data: Some(ElemData::Value(a.octets().to_vec())),
                    })
                    .collect();
                b.add_elements(f, t, &map, &elems);
                rule.push(Expr::Lookup { set: map });
            }
        }
        if !p.udp {
            // The flow is new and unconfirmed here, so the policy still takes: its SYN leaves
            // conntrack after a second if no backend answers (module docs).
            rule.push(Expr::CtTimeoutRef(SYN_TIMEOUT.to_owned()));
        }
        // A nat chain sees only a flow's first packet: the counter counts flows.
        rule.extend([Expr::CounterRef(counter), Expr::PortImmediate(p.target), Expr::DnatIpv4Port]);
        b.add_rule(f, t, "prerouting", &rule);
    }
    b
}

/// The node's table turns connection tracking on for the whole namespace (its `ct state`
/// matches), and every overlay packet crosses the node's namespace as VXLAN over UDP: each
/// request and reply would be looked up in conntrack, and pass the NAT hooks, once leaving one
/// node and once arriving at the other. Nothing uses those entries: the DNAT-ed flow is
/// tracked by its inner packets, the cleartext guard of encrypted networks is a stateless
/// `input` rule, and WireGuard's own UDP port stays tracked. Both directions of a tunnel send
/// to `data_port` (the source port is a hash of the inner flow), so one match per hook
/// covers them, in chains that run before conntrack's (priority -300, nft's `raw`).
fn untracked_overlay(b: &mut Batch, data_port: u16) {
    let (f, t) = (Family::Ip, TABLE);
    let rule = [
        Expr::Meta(MetaKey::L4Proto),
        Expr::Cmp { op: CmpOp::Eq, data: vec![17] },
        Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
        Expr::Cmp { op: CmpOp::Eq, data: data_port.to_be_bytes().to_vec() },
        Expr::Notrack,
    ];
    for (chain, hook) in [("raw-prerouting", Hook::Prerouting), ("raw-output", Hook::Output)] {
        b.add_chain(f, t, chain, Some(BaseChain { kind: ChainType::Filter, hook, priority: -300 }));
        b.flush_chain(f, t, chain);
        b.add_rule(f, t, chain, &rule);
    }
}

/// The set of clients (address and port) whose SYN a backend has not answered: their next SYN
/// goes to the proxy, which retries on another backend.
pub const UNANSWERED_SET: &str = "unanswered";
/// How long an unanswered client's address and port go to the proxy: past the client's SYN
/// retransmissions (1 s, then 3 s, 7 s after the first).
const UNANSWERED_FOR: Duration = Duration::from_secs(10);
/// The most clients the set holds: far above what is unanswered at once in a healthy cluster
/// (an answered client leaves the set within a round trip), and a bound on what a flood of
/// SYNs from forged sources can make the node remember.
pub const UNANSWERED_MAX: u32 = 65_536;

/// The client's address and port into registers 1 and 2, the key of [`UNANSWERED_SET`]: the
/// source of a packet from the client, the destination of one to it.
fn client_key(to_client: bool) -> [Expr; 2] {
    let (addr, port) = if to_client { (16, 2) } else { (12, 0) };
    [
        Expr::Payload { base: PayloadBase::Network, offset: addr, len: 4 },
        Expr::PayloadNext { base: PayloadBase::Transport, offset: port, len: 2 },
    ]
}

/// DNAT cannot retry a SYN elsewhere as the proxy's connect does, and a backend may not answer:
/// it is silent (its node's link was cut, or its node died and gossip has not suspected it
/// yet), or it refuses (no listener: its task has just died, or its node was killed whole and
/// its kernel answers for it). So every TCP port's rule adds the client's address and port to
/// [`UNANSWERED_SET`] as it DNATs the SYN, the backend's SYN-ACK deletes them on its way back
/// through the node, and a reset that answers the SYN (RST and ACK, sequence 0, RFC 9293
/// 3.10.7.1) coming back over the link is dropped, leaving them in. The client's own TCP sends
/// the SYN again a second later; the old flow is gone from conntrack by then (the reset closed
/// it, or the [`SYN_TIMEOUT`] policy let it expire), so that SYN starts a new flow, and the
/// first rule of the nat chain lets a new flow from a client in the set through untranslated,
/// to the proxy's listener on the same port, which retries on another backend. Returns the set.
fn unanswered_to_the_proxy(b: &mut Batch) -> shoal_nft::SetRef {
    let (f, t) = (Family::Ip, TABLE);
    let unanswered = b.add_dynamic_set(
        f,
        t,
        UNANSWERED_SET,
        SetKey::Ipv4AddrPort,
        UNANSWERED_FOR,
        UNANSWERED_MAX,
    );
    let tcp = [Expr::Meta(MetaKey::L4Proto), Expr::Cmp { op: CmpOp::Eq, data: vec![6] }];
    let mut rule: Vec<Expr> = conntrack_new().into();
    rule.extend(tcp.clone());
    rule.extend(client_key(false));
    rule.extend([Expr::Lookup { set: unanswered.clone() }, Expr::Verdict(Verdict::Accept)]);
    b.add_rule(f, t, "prerouting", &rule);
    let hook = BaseChain { kind: ChainType::Filter, hook: Hook::Forward, priority: 0 };
    b.add_chain(f, t, "forward", Some(hook));
    b.flush_chain(f, t, "forward");
    // A SYN-ACK, whatever its ECN bits: SYN, ACK, RST and FIN, masked, are SYN and ACK. Any the
    // node forwards, not only those back over the link: deleting a client that is not in the
    // set costs a lookup, and a backend's reply may come back another way (the benchmark's
    // kernel path has no link).
    let mut answered = tcp.to_vec();
    answered.extend([
        Expr::Payload { base: PayloadBase::Transport, offset: 13, len: 1 },
        Expr::Bitwise { mask: vec![0x17], xor: vec![0] },
        Expr::Cmp { op: CmpOp::Eq, data: vec![0x12] },
    ]);
    answered.extend(client_key(true));
    answered.push(Expr::DeleteFromSet { set: unanswered.clone() });
    b.add_rule(f, t, "forward", &answered);
    let mut refused =
        vec![Expr::Meta(MetaKey::IifName), Expr::Cmp { op: CmpOp::Eq, data: ifname(NODE_LINK) }];
    refused.extend(tcp);
    refused.extend([
        // TCP flags RST|ACK exactly, sequence number 0.
        Expr::Payload { base: PayloadBase::Transport, offset: 13, len: 1 },
        Expr::Cmp { op: CmpOp::Eq, data: vec![0x14] },
        Expr::Payload { base: PayloadBase::Transport, offset: 4, len: 4 },
        Expr::Cmp { op: CmpOp::Eq, data: vec![0; 4] },
        Expr::Counter,
        Expr::Verdict(Verdict::Drop),
    ]);
    b.add_rule(f, t, "forward", &refused);
    unanswered
}

/// The sandbox's `ip shoal-mesh` table: a flow that comes in on [`SANDBOX_LINK`] is marked, and
/// its replies on `ingress_if` carry the mark, which routes them back over the link.
pub fn sandbox_batch(ingress_if: &str) -> Batch {
    let (f, t) = (Family::Ip, TABLE);
    let mut b = Batch::new();
    b.add_table(f, t);
    b.del_table(f, t);
    b.add_table(f, t);
    let hook = BaseChain { kind: ChainType::Filter, hook: Hook::Prerouting, priority: -150 };
    b.add_chain(f, t, "prerouting", Some(hook));
    let mark = FLOW_MARK.to_ne_bytes().to_vec();
    let mut first: Vec<Expr> =
        vec![Expr::Meta(MetaKey::IifName), Expr::Cmp { op: CmpOp::Eq, data: ifname(SANDBOX_LINK) }];
    first.extend(conntrack_new());
    first.extend([Expr::Immediate(mark.clone()), Expr::SetCtMark]);
    b.add_rule(f, t, "prerouting", &first);
    b.add_rule(
        f,
        t,
        "prerouting",
        &[
            Expr::Meta(MetaKey::IifName),
            Expr::Cmp { op: CmpOp::Eq, data: ifname(ingress_if) },
            Expr::CtMark,
            Expr::Cmp { op: CmpOp::Eq, data: mark.clone() },
            Expr::Immediate(mark),
            Expr::SetMetaMark,
        ],
    );
    b
}

/// A netlink handle in `ns`, or in the calling process's namespace for `None`.
fn handle(ns: Option<&NetNs>) -> Result<Handle, Error> {
    match ns {
        Some(ns) => Ok(ns.netlink()?),
        None => {
            let (conn, h, _) = rtnetlink::new_connection()
                .map_err(|e| Error::Io { what: "open a netlink socket".into(), source: e })?;
            tokio::spawn(conn);
            Ok(h)
        }
    }
}

pub(crate) fn nsname(ns: Option<&NetNs>) -> String {
    ns.map_or_else(|| "(the agent's)".to_owned(), |n| n.name().to_owned())
}

fn nl(op: impl Into<String>, ns: Option<&NetNs>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let (op, ns) = (op.into(), nsname(ns));
    move |source| Error::Netlink { op, ns, source }
}

/// Runs `f` in `ns`, or right here for `None`.
pub(crate) fn run_in<R: Send>(
    ns: Option<&NetNs>,
    f: impl FnOnce() -> R + Send,
) -> Result<R, Error> {
    match ns {
        Some(ns) => Ok(ns.run(f)?),
        None => Ok(f()),
    }
}

fn sysctl(ns: Option<&NetNs>, key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    run_in(ns, || std::fs::write(&path, value))?
        .map_err(|e| Error::Io { what: format!("write {path} in {}", nsname(ns)), source: e })
}

/// Adds an address, which may be there already.
async fn address(h: &Handle, idx: u32, addr: Ipv4Addr, ns: Option<&NetNs>) -> Result<(), Error> {
    match h.address().add(idx, addr.into(), 30).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        r => r.map_err(nl(format!("add {addr}/30"), ns)),
    }
}

/// Makes the link between the node (`node`, `None` for the calling process's namespace) and its
/// ingress sandbox, routes `ingress` (the ingress network's subnet) over it, turns forwarding on
/// in both, and sets up the sandbox's marks and reply route. Idempotent; a restarted agent
/// finds all of it in place.
pub async fn apply_link(
    node: Option<&NetNs>,
    sandbox: &NetNs,
    ingress_if: &str,
    ingress: (Ipv4Addr, u8),
) -> Result<(), Error> {
    let h = handle(node)?;
    if shoal_netns::link_index(&h, NODE_LINK).await.is_none() {
        // The peer end is born inside the sandbox, already named.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(SANDBOX_LINK.to_owned())
            .setns_by_fd(sandbox.as_fd().as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(NODE_LINK.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link().add(veth).execute().await.map_err(nl(format!("create veth {NODE_LINK}"), node))?;
    }
    let idx = shoal_netns::link_index(&h, NODE_LINK)
        .await
        .ok_or_else(|| Error::NoLink { ifname: NODE_LINK.into(), ns: nsname(node) })?;
    address(&h, idx, NODE_ADDR, node).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {NODE_LINK} up"), node))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ingress.0, ingress.1)
        .gateway(SANDBOX_ADDR)
        .build();
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {}/{} via {SANDBOX_ADDR}", ingress.0, ingress.1), node))?;
    sysctl(node, "ip_forward", "1")?;

    let s = Some(sandbox);
    let sh = sandbox.netlink()?;
    let sidx = shoal_netns::link_index(&sh, SANDBOX_LINK)
        .await
        .ok_or_else(|| Error::NoLink { ifname: SANDBOX_LINK.into(), ns: nsname(s) })?;
    address(&sh, sidx, SANDBOX_ADDR, s).await?;
    sh.link()
        .set(LinkUnspec::new_with_index(sidx).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {SANDBOX_LINK} up"), s))?;
    sysctl(s, "ip_forward", "1")?;
    // Clients' addresses arrive on the link but are routed back only by mark, which the
    // reverse-path filter does not consult. And the source check of a forwarded packet looks
    // the client up as if it came in on the ingress interface, where the userspace mesh's rule
    // makes every address local: `accept_local` lets such a source through.
    let link_conf = format!("conf/{SANDBOX_LINK}");
    for (key, value) in [
        ("conf/all/rp_filter".to_owned(), "0"),
        (format!("{link_conf}/rp_filter"), "0"),
        (format!("{link_conf}/accept_local"), "1"),
    ] {
        sysctl(s, &key, value)?;
    }
    let reply = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(NODE_ADDR)
        .output_interface(sidx)
        .table_id(REPLY_TABLE)
        .build();
    sh.route()
        .add(reply)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route default via {NODE_ADDR} in table {REPLY_TABLE}"), s))?;
    let rules: Vec<_> =
        sh.rule().get(IpVersion::V4).execute().try_collect().await.map_err(nl("list rules", s))?;
    let ours = rtnetlink::packet_route::rule::RuleAttribute::Priority(REPLY_RULE_PRIORITY);
    if !rules.iter().any(|r| r.attributes.contains(&ours)) {
        sh.rule()
            .add()
            .v4()
            .fw_mark(FLOW_MARK)
            .table_id(REPLY_TABLE)
            .action(RuleAction::ToTable)
            .priority(REPLY_RULE_PRIORITY)
            .execute()
            .await
            .map_err(nl("add the reply rule", s))?;
    }
    let b = sandbox_batch(ingress_if);
    sandbox.run(|| b.commit())?.map_err(|source| Error::Nft { ns: nsname(s), source })
}

/// Replaces the node's DNAT rules with `ports` (one transaction: on an error the old rules
/// stays). `node` is the node's namespace, `None` for the calling process's; `data_port` is the
/// swarm's VXLAN port, which the table keeps out of conntrack.
pub fn apply_ports(
    node: Option<&NetNs>,
    data_port: u16,
    ports: &[KernelPort],
) -> Result<(), Error> {
    let b = node_batch(data_port, ports);
    run_in(node, || b.commit())?.map_err(|source| Error::Nft { ns: nsname(node), source })
}

/// The flows each port's rule has forwarded, by [`counter_name`], read from the node's table
/// (`node`, `None` for the calling process's namespace). The counts live in the kernel: they
/// outlive the agent and the rewrites of the rules, and go with the table.
pub fn flows(node: Option<&NetNs>) -> Result<Vec<(String, u64)>, Error> {
    let counters = run_in(node, || shoal_nft::counters(Family::Ip, TABLE))?
        .map_err(|source| Error::Nft { ns: nsname(node), source })?;
    Ok(counters.into_iter().map(|(name, packets, _)| (name, packets)).collect())
}

/// Removes the node's table and its end of the link (the sandbox's end goes with it), for a
/// node leaving the swarm. Gone already is fine.
pub async fn remove(node: Option<&NetNs>) -> Result<(), Error> {
    let (f, t) = (Family::Ip, TABLE);
    let mut b = Batch::new();
    b.add_table(f, t);
    b.del_table(f, t);
    run_in(node, || b.commit())?.map_err(|source| Error::Nft { ns: nsname(node), source })?;
    let h = handle(node)?;
    if let Some(idx) = shoal_netns::link_index(&h, NODE_LINK).await {
        h.link().del(idx).execute().await.map_err(nl(format!("delete {NODE_LINK}"), node))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
