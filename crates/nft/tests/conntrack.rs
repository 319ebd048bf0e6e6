//! Root-only: a UDP flow made in a throwaway namespace is read back from the kernel's conntrack
//! table over ctnetlink, deleted, and gone; deleting it again is no error and counts nothing.

use std::net::{SocketAddrV4, UdpSocket};
use std::process::Command;

use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
use shoal_nft::conntrack::{self, Flow};
use shoal_nft::{BaseChain, Batch, ChainType, CmpOp, Expr, Family, Hook};

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
