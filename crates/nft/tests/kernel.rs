//! Root-only: batches committed in a throwaway namespace are read back from the kernel, over
//! netlink with [`shoal_nft::rules`] and with the real `nft` binary as an independent reader
//! (skipped loudly where it is not installed), and a refused batch changes nothing.

use std::process::Command;

use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
use shoal_nft::{
    BaseChain, Batch, ChainType, CmpOp, Elem, ElemData, Error, Expr, Family, Hook, MetaKey,
    PayloadBase, Reject, SetData, SetKey, TcpTimeoutState, Verdict, counters, rules,
};

/// `nft list table ...` in the namespace, or `None` when nft is not installed.
fn nft_list(ns: &NetNs, family: &str, table: &str) -> Option<String> {
    let out = ns
        .run(|| Command::new("nft").args(["list", "table", family, table]).output())
        .expect("enter namespace");
    match out {
        Ok(o) => {
            assert!(o.status.success(), "nft list: {}", String::from_utf8_lossy(&o.stderr));
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(e) => {
            eprintln!(
                "\n*** nft not runnable ({e}): skipping the comparison with nft's listing ***\n"
            );
            None
        }
    }
}

/// Deletes `table` if present and starts it again, all in `b`.
fn fresh(b: &mut Batch, family: Family, table: &str) {
    b.add_table(family, table);
    b.del_table(family, table);
    b.add_table(family, table);
}

/// A table using every expression shoal's rules use.
fn everything(b: &mut Batch) {
    let (f, t) = (Family::Ip, "shoal-test");
    fresh(b, f, t);
    let vips = b.add_set(f, t, Some("vips"), SetKey::Ipv4Addr, Some(SetData::Verdict));
    let out = BaseChain { kind: ChainType::Nat, hook: Hook::Output, priority: -100 };
    b.add_chain(f, t, "output", Some(out));
    b.add_chain(f, t, "one", None);
    b.add_chain(f, t, "two", None);
    b.add_chain(f, t, "none", None);
    let elem = |ip: [u8; 4], chain: &str| Elem {
        key: ip.to_vec(),
        data: Some(ElemData::Verdict(Verdict::Goto(chain.to_owned()))),
    };
    b.add_elements(
        f,
        t,
        &vips,
        &[elem([10, 9, 0, 1], "one"), elem([10, 9, 0, 2], "two"), elem([10, 9, 0, 3], "none")],
    );
    b.add_rule(
        f,
        t,
        "output",
        &[
            Expr::CtState,
            Expr::Bitwise { mask: 8u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
            Expr::Cmp { op: CmpOp::Neq, data: vec![0; 4] },
            Expr::Payload { base: PayloadBase::Network, offset: 16, len: 4 },
            Expr::Lookup { set: vips },
        ],
    );
    b.add_rule(f, t, "one", &[Expr::Immediate(vec![10, 9, 0, 7]), Expr::DnatIpv4]);
    let map = b.add_set(f, t, None, SetKey::HostInteger(4), Some(SetData::Ipv4Addr));
    let backends: Vec<Elem> = (0..3u32)
        .map(|i| Elem {
            key: i.to_ne_bytes().to_vec(),
            data: Some(ElemData::Value(vec![10, 9, 0, 10 + i as u8])),
        })
        .collect();
    b.add_elements(f, t, &map, &backends);
    b.add_rule(
        f,
        t,
        "two",
        &[Expr::NumgenRandom { modulus: 3 }, Expr::Lookup { set: map }, Expr::DnatIpv4],
    );
    b.add_rule(
        f,
        t,
        "none",
        &[
            Expr::Payload { base: PayloadBase::Network, offset: 9, len: 1 },
            Expr::Cmp { op: CmpOp::Eq, data: vec![6] },
            Expr::Reject(Reject::TcpReset),
        ],
    );
    b.add_rule(f, t, "none", &[Expr::Reject(Reject::IcmpUnreachable(3))]);

    let (f, t) = (Family::Inet, "shoal-test");
    fresh(b, f, t);
    let set = b.add_set(f, t, Some("ids"), SetKey::Integer(3), None);
    b.add_elements(f, t, &set, &[Elem { key: vec![0, 0x10, 0x01], data: None }]);
    let input = BaseChain { kind: ChainType::Filter, hook: Hook::Input, priority: -200 };
    b.add_chain(f, t, "input", Some(input));
    let mut name = b"lo".to_vec();
    name.resize(16, 0);
    b.add_rule(
        f,
        t,
        "input",
        &[
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp { op: CmpOp::Eq, data: vec![17] },
            Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
            Expr::Cmp { op: CmpOp::Eq, data: 4789u16.to_be_bytes().to_vec() },
            Expr::Meta(MetaKey::IifName),
            Expr::Cmp { op: CmpOp::Neq, data: name },
            Expr::Payload { base: PayloadBase::Transport, offset: 12, len: 3 },
            Expr::Lookup { set },
            Expr::Counter,
            Expr::Verdict(Verdict::Drop),
        ],
    );
}

#[test]
fn a_batch_is_what_the_kernel_reports_back() {
    if !require_root("a_batch_is_what_the_kernel_reports_back") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("nk")).expect("netns");
    ns.run(|| {
        let mut b = Batch::new();
        everything(&mut b);
        b.commit()
    })
    .expect("enter namespace")
    .expect("commit");

    let dumped = ns.run(|| rules(Family::Inet, "shoal-test")).expect("netns").expect("dump");
    assert_eq!(dumped.len(), 1, "{dumped:?}");
    let names: Vec<&str> = dumped[0].exprs.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "meta",
            "cmp",
            "payload",
            "cmp",
            "meta",
            "cmp",
            "payload",
            "lookup",
            "counter",
            "immediate"
        ]
    );
    assert_eq!(dumped[0].exprs[8].counter, Some((0, 0)));
    let ip = ns.run(|| rules(Family::Ip, "shoal-test")).expect("netns").expect("dump");
    let chains: Vec<&str> = ip.iter().map(|r| r.chain.as_str()).collect();
    assert_eq!(chains, ["output", "one", "two", "none", "none"]);

    if let Some(text) = nft_list(&ns, "ip", "shoal-test") {
        eprintln!("{text}");
        for want in [
            "type nat hook output priority -100; policy accept;",
            "ct state new ip daddr vmap @vips",
            "elements = { 10.9.0.1 : goto one, 10.9.0.2 : goto two,",
            "dnat to 10.9.0.7",
            "dnat to numgen random mod 3 map { 0 : 10.9.0.10, 1 : 10.9.0.11, 2 : 10.9.0.12 }",
            "reject with tcp reset",
            "reject",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
    if let Some(text) = nft_list(&ns, "inet", "shoal-test") {
        eprintln!("{text}");
        for want in [
            "type filter hook input priority -200; policy accept;",
            "udp dport 4789 iifname != \"lo\"",
            "counter packets 0 bytes 0 drop",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}

#[test]
fn a_refused_batch_changes_nothing_and_says_what_failed() {
    if !require_root("a_refused_batch_changes_nothing_and_says_what_failed") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("nr")).expect("netns");
    let commit = |b: Batch| ns.run(|| b.commit()).expect("enter namespace");
    let mut b = Batch::new();
    everything(&mut b);
    commit(b).expect("commit");
    let before = ns.run(|| rules(Family::Ip, "shoal-test")).expect("netns").expect("dump");

    // The old table is deleted first, then a rule jumps to a chain that does not exist.
    let mut b = Batch::new();
    fresh(&mut b, Family::Ip, "shoal-test");
    b.add_chain(Family::Ip, "shoal-test", "c", None);
    b.add_rule(Family::Ip, "shoal-test", "c", &[Expr::Verdict(Verdict::Goto("nowhere".into()))]);
    let err = commit(b).expect_err("goto to a missing chain");
    let text = err.to_string();
    assert!(matches!(err, Error::Rejected { .. }), "{text}");
    assert!(text.contains("add rule to chain c (immediate)") && text.contains("ENOENT"), "{text}");
    assert!(text.contains("nothing was changed"), "{text}");
    let after = ns.run(|| rules(Family::Ip, "shoal-test")).expect("netns").expect("dump");
    assert_eq!(before, after);

    // Deleting a table that is not there is a clear error; dumping it finds no rules.
    let mut b = Batch::new();
    b.del_table(Family::Ip, "no-such-table");
    let err = commit(b).expect_err("no such table").to_string();
    assert!(err.contains("delete table ip no-such-table") && err.contains("ENOENT"), "{err}");
    let none = ns.run(|| rules(Family::Ip, "no-such-table")).expect("netns").expect("dump");
    assert!(none.is_empty(), "{none:?}");
}

/// A named counter keeps its counts while the rules that count into it are flushed and added
/// again, and a second `add_counter` leaves it as it is.
#[test]
fn a_named_counter_outlives_the_rules_that_count_into_it() {
    if !require_root("a_named_counter_outlives_the_rules_that_count_into_it") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("nc")).expect("netns");
    let (f, t) = (Family::Ip, "shoal-test");
    let up = Command::new("ip").args(["-n", ns.name(), "link", "set", "lo", "up"]).status();
    assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
    // Output to 127.0.0.1 on a port nobody listens on: each datagram passes the rule once.
    let rules_with_counter = |fresh_table: bool| {
        let mut b = Batch::new();
        if fresh_table {
            fresh(&mut b, f, t);
        } else {
            b.add_table(f, t);
        }
        let out = BaseChain { kind: ChainType::Filter, hook: Hook::Output, priority: 0 };
        b.add_chain(f, t, "output", Some(out));
        b.flush_chain(f, t, "output");
        b.add_counter(f, t, "udp-9");
        b.add_rule(
            f,
            t,
            "output",
            &[
                Expr::Meta(MetaKey::L4Proto),
                Expr::Cmp { op: CmpOp::Eq, data: vec![17] },
                Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
                Expr::Cmp { op: CmpOp::Eq, data: 9u16.to_be_bytes().to_vec() },
                Expr::CounterRef("udp-9".into()),
            ],
        );
        ns.run(|| b.commit()).expect("enter namespace").expect("commit");
    };
    let send = |n: usize| {
        ns.run(|| {
            let lo = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..n {
                let _ = lo.send_to(b"x", "127.0.0.1:9");
            }
        })
        .expect("enter namespace");
    };
    let packets = || {
        let all = ns.run(|| counters(f, t)).expect("enter namespace").expect("dump");
        all.into_iter().find(|(name, _, _)| name == "udp-9").map(|(_, p, _)| p)
    };
    rules_with_counter(true);
    send(3);
    assert_eq!(packets(), Some(3));
    rules_with_counter(false);
    assert_eq!(packets(), Some(3), "flushing the rules reset the counter");
    send(2);
    assert_eq!(packets(), Some(5));
    let dumped = ns.run(|| rules(f, t)).expect("enter namespace").expect("dump");
    assert_eq!(dumped.len(), 1, "the flush left the old rule: {dumped:?}");
    if let Some(text) = nft_list(&ns, "ip", t) {
        assert!(text.contains("counter name \"udp-9\""), "{text}");
        assert!(text.contains("counter udp-9"), "{text}");
    }
}

/// A timeout policy is made, read back by nft as written, attached by name, and left as it is
/// by a second add; a rule naming a policy that does not exist is refused.
#[test]
fn a_timeout_policy_is_attached_by_name_and_outlives_a_second_add() {
    if !require_root("a_timeout_policy_is_attached_by_name_and_outlives_a_second_add") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("nt")).expect("netns");
    let (f, t) = (Family::Ip, "shoal-test");
    let commit = |b: Batch| ns.run(|| b.commit()).expect("enter namespace");
    let rule = |policy: &str| {
        vec![
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp { op: CmpOp::Eq, data: vec![6] },
            Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
            Expr::Cmp { op: CmpOp::Eq, data: 8100u16.to_be_bytes().to_vec() },
            Expr::CtTimeoutRef(policy.to_owned()),
        ]
    };
    for (fresh_table, seconds) in [(true, 1), (false, 5)] {
        let mut b = Batch::new();
        if fresh_table {
            fresh(&mut b, f, t);
        } else {
            b.add_table(f, t);
        }
        b.add_tcp_timeout(f, t, "syn1", &[(TcpTimeoutState::SynSent, seconds)]);
        let pre = BaseChain { kind: ChainType::Nat, hook: Hook::Prerouting, priority: -100 };
        b.add_chain(f, t, "prerouting", Some(pre));
        b.flush_chain(f, t, "prerouting");
        b.add_rule(f, t, "prerouting", &rule("syn1"));
        commit(b).expect("commit");
    }
    let dumped = ns.run(|| rules(f, t)).expect("netns").expect("dump");
    assert_eq!(dumped.len(), 1, "{dumped:?}");
    assert_eq!(dumped[0].exprs.last().map(|e| e.name.as_str()), Some("objref"));
    if let Some(text) = nft_list(&ns, "ip", t) {
        eprintln!("{text}");
        for want in [
            "ct timeout syn1 {\n\t\tprotocol tcp\n\t\tl3proto ip\n\t\tpolicy = { syn_sent : 1 }\n",
            "tcp dport 8100 ct timeout set \"syn1\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    let mut b = Batch::new();
    b.add_table(f, t);
    b.add_rule(f, t, "prerouting", &rule("no-such-policy"));
    let err = commit(b).expect_err("a policy that does not exist");
    assert!(matches!(err, Error::Rejected { .. }), "{err}");
    assert_eq!(ns.run(|| rules(f, t)).expect("netns").expect("dump"), dumped);
}
