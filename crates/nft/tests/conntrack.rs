//! Root-only: a UDP flow made in a throwaway namespace is read back from the kernel's conntrack
//! table over ctnetlink, deleted, and gone; deleting it again is no error and counts nothing. A
//! timeout policy attached to an unanswered TCP flow gives it its `syn_sent` timeout.

use std::net::{SocketAddrV4, UdpSocket};
use std::process::Command;

use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
use shoal_nft::conntrack::{self, Flow, TcpState};
use shoal_nft::{BaseChain, Batch, ChainType, CmpOp, Expr, Family, Hook, PayloadBase};
use shoal_nft::{MetaKey, TcpTimeoutState};

#[test]
fn a_flow_is_listed_deleted_and_gone() {
    if !require_root("a_flow_is_listed_deleted_and_gone") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("ct")).expect("netns");
    let lo = ns.run(|| Command::new("ip").args(["link", "set", "lo", "up"]).status());
    assert!(lo.expect("enter").expect("ip").success(), "lo up");
    // A rule that matches on conntrack state turns conntrack on in the namespace.
    let (f, t) = (Family::Ip, "ct-test");
    let mut b = Batch::new();
    b.add_table(f, t);
    let hook = BaseChain { kind: ChainType::Filter, hook: Hook::Output, priority: 0 };
    b.add_chain(f, t, "output", Some(hook));
    b.add_rule(
        f,
        t,
        "output",
        &[
            Expr::CtState,
            Expr::Bitwise { mask: 8u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
            Expr::Cmp { op: CmpOp::Neq, data: vec![0; 4] },
            Expr::Counter,
        ],
    );
    ns.run(|| b.commit()).expect("enter").expect("commit");

    let to: SocketAddrV4 = "127.0.0.1:9".parse().expect("literal");
    let from = ns
        .run(|| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.send_to(b"x", to)?;
            s.local_addr()
        })
        .expect("enter")
        .expect("send");
    let ours = |flows: &[Flow]| -> Vec<Flow> {
        flows.iter().filter(|f| f.udp && f.original.1 == to).cloned().collect()
    };
    let listed = ns.run(conntrack::flows).expect("enter").expect("dump");
    let found = ours(&listed);
    assert_eq!(found.len(), 1, "{listed:?}");
    assert_eq!(std::net::SocketAddr::V4(found[0].original.0), from);
    assert_eq!(found[0].reply.0, to, "no NAT: the reply comes from where it went");
    assert!(!found[0].dst_nat);
    assert_eq!(found[0].tcp_state, None);

    assert_eq!(ns.run(|| conntrack::delete(&found)).expect("enter").expect("delete"), 1);
    let listed = ns.run(conntrack::flows).expect("enter").expect("dump");
    assert!(ours(&listed).is_empty(), "still there: {listed:?}");
    assert_eq!(ns.run(|| conntrack::delete(&found)).expect("enter").expect("again"), 0);
}

/// Two SYNs leave and are never answered (they wait for an ARP answer that never comes, on a
/// veth whose peer has no address, after conntrack has confirmed their flows): the one a rule
/// gave a 1 s `syn_sent` policy has at most a second left, the other the namespace's default
/// (120 s).
#[test]
fn a_timeout_policy_sets_an_unanswered_syn_flows_timeout() {
    if !require_root("a_timeout_policy_sets_an_unanswered_syn_flows_timeout") {
        return;
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("cs")).expect("netns");
    for args in [
        vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        vec!["addr", "add", "198.18.0.1/24", "dev", "v0"],
        vec!["link", "set", "v0", "up"],
        vec!["link", "set", "v1", "up"],
    ] {
        let ok = Command::new("ip").args(["-n", ns.name()]).args(&args).status();
        assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
    }
    let (f, t) = (Family::Ip, "ct-test");
    let mut b = Batch::new();
    b.add_table(f, t);
    b.add_tcp_timeout(f, t, "syn1", &[(TcpTimeoutState::SynSent, 1)]);
    let hook = BaseChain { kind: ChainType::Filter, hook: Hook::Output, priority: 0 };
    b.add_chain(f, t, "output", Some(hook));
    b.add_rule(
        f,
        t,
        "output",
        &[
            // The state match turns conntrack on; the policy goes to flows to port 9001 only.
            Expr::CtState,
            Expr::Bitwise { mask: 8u32.to_ne_bytes().to_vec(), xor: vec![0; 4] },
            Expr::Cmp { op: CmpOp::Neq, data: vec![0; 4] },
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp { op: CmpOp::Eq, data: vec![6] },
            Expr::Payload { base: PayloadBase::Transport, offset: 2, len: 2 },
            Expr::Cmp { op: CmpOp::Eq, data: 9001u16.to_be_bytes().to_vec() },
            Expr::CtTimeoutRef("syn1".into()),
        ],
    );
    ns.run(|| b.commit()).expect("enter").expect("commit");

    let mut timeouts = ns
        .run(|| -> Result<Vec<(u16, Option<u32>)>, String> {
            // Each connect sends its SYN at once and stops waiting for an answer after a
            // millisecond; the flow stays in conntrack (closing the socket sends nothing).
            for port in [9001u16, 9002] {
                let to = SocketAddrV4::new([198, 18, 0, 2].into(), port);
                let waited = std::time::Duration::from_millis(1);
                let never = std::net::TcpStream::connect_timeout(&to.into(), waited);
                assert!(never.is_err(), "nothing can answer the SYN");
            }
            let flows = conntrack::flows().map_err(|e| e.to_string())?;
            Ok(flows
                .iter()
                .filter(|f| !f.udp && *f.original.1.ip() == std::net::Ipv4Addr::new(198, 18, 0, 2))
                .inspect(|f| assert_eq!(f.tcp_state, Some(TcpState::SynSent), "{f:?}"))
                .map(|f| (f.original.1.port(), f.timeout))
                .collect())
        })
        .expect("enter")
        .expect("dump");
    timeouts.sort();
    assert_eq!(timeouts.len(), 2, "{timeouts:?}");
    assert_eq!(timeouts[0].0, 9001);
    assert!(timeouts[0].1.is_some_and(|s| s <= 1), "{timeouts:?}");
    assert!(timeouts[1].1.is_some_and(|s| s > 60), "{timeouts:?}");
}
