use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test literal")
}

fn port(published: u16, pick: Pick, backends: &[&str]) -> KernelPort {
    KernelPort {
        published,
        target: 8000,
        udp: false,
        pick,
        backends: backends.iter().map(|b| ip(b)).collect(),
    }
}

#[test]
fn node_batch_is_sorted_and_skips_ports_without_backends() {
    let a = node_batch(
        4789,
        &[
            port(8101, Pick::ClientHash, &["10.0.0.7", "10.0.0.5", "10.0.0.7"]),
            port(8100, Pick::Random, &["10.0.0.9"]),
            port(8102, Pick::RoundRobin, &[]),
        ],
    );
    let b = node_batch(
        4789,
        &[
            port(8100, Pick::Random, &["10.0.0.9"]),
            port(8101, Pick::ClientHash, &["10.0.0.5", "10.0.0.7"]),
        ],
    );
    assert_eq!(a, b);
    let commands = a.commands().join("\n");
    for want in [
        "add chain prerouting (nat hook prerouting)\nflush chain prerouting\n\
         add set unanswered\nadd rule to chain prerouting \
         (ct bitwise cmp meta cmp payload payload lookup immediate)\n\
         add chain forward (filter hook forward)\nflush chain forward\n\
         add rule to chain forward (meta cmp payload bitwise cmp payload payload dynset)\n\
         add rule to chain forward \
         (meta cmp meta cmp payload cmp payload cmp counter immediate)\n",
        "add counter tcp-8100\nadd rule to chain prerouting \
         (ct bitwise cmp meta cmp payload cmp fib cmp payload payload dynset immediate objref \
         objref immediate nat)\n",
        "add counter tcp-8101\nadd set __map%d\nadd elements to set __map%d\n",
        "add elements to set __map%d\nadd rule to chain prerouting \
         (ct bitwise cmp meta cmp payload cmp fib cmp payload payload dynset payload hash lookup \
         objref objref immediate nat)",
    ] {
        assert!(commands.contains(want), "{want:?} not in\n{commands}");
    }
    assert!(
        commands.contains(
            "add chain raw-prerouting (filter hook prerouting)\nflush chain raw-prerouting\n\
             add rule to chain raw-prerouting (meta cmp payload cmp notrack)\n\
             add chain raw-output (filter hook output)\nflush chain raw-output\n\
             add rule to chain raw-output (meta cmp payload cmp notrack)\n"
        ),
        "{commands}"
    );
    assert_eq!(commands.matches("add rule").count(), 7, "{commands}");
    assert!(commands.starts_with("add table ip shoal-mesh\nadd ct timeout tcp-syn-sent-1s\n"));
}

#[test]
fn only_tcp_flows_get_the_syn_timeout() {
    let udp = KernelPort { udp: true, ..port(8100, Pick::Random, &["10.0.0.1"]) };
    let commands = node_batch(4789, &[udp]).commands().join("\n");
    assert!(
        commands.contains(
            "add rule to chain prerouting \
             (ct bitwise cmp meta cmp payload cmp fib cmp immediate objref immediate nat)"
        ),
        "{commands}"
    );
}

#[test]
fn the_picks_are_numgen_and_hash() {
    let random = node_batch(4789, &[port(1, Pick::Random, &["10.0.0.1", "10.0.0.2"])]);
    let rotate = node_batch(4789, &[port(1, Pick::RoundRobin, &["10.0.0.1", "10.0.0.2"])]);
    assert!(random.commands().join(" ").contains("dynset numgen lookup"));
    assert!(rotate.commands().join(" ").contains("dynset numgen lookup"));
    assert_ne!(random, rotate, "random and rotation are different numgen types");
}

#[test]
fn sandbox_batch_marks_link_flows_and_their_replies() {
    let commands = sandbox_batch("eth0").commands().join("\n");
    for want in [
        "add chain prerouting (filter hook prerouting)",
        "add rule to chain prerouting (meta cmp ct bitwise cmp immediate ct)",
        "add rule to chain prerouting (meta cmp ct cmp immediate meta)",
    ] {
        assert!(commands.contains(want), "{want:?} not in\n{commands}");
    }
}

/// With the node's table in place, conntrack tracks the namespace's UDP but not datagrams
/// to the data port, in either hook (root).
#[test]
fn the_overlay_datagrams_stay_out_of_conntrack() {
    use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
    if !require_root("the_overlay_datagrams_stay_out_of_conntrack") {
        return;
    }
    let mut c = Cleanup::new();
    let node = c.netns(&unique_prefix("kt")).expect("netns");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let h = node.netlink().expect("netlink");
        let lo = shoal_netns::link_index(&h, "lo").await.expect("lo");
        h.link().set(LinkUnspec::new_with_index(lo).up().build()).execute().await.expect("up");
    });
    let data_port = 4790;
    apply_ports(Some(&node), data_port, &[port(8100, Pick::Random, &["10.0.0.5"])]).expect("ports");
    let flows = node
        .run(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            for to in [data_port, data_port + 1] {
                s.send_to(b"x", ("127.0.0.1", to))?;
            }
            shoal_nft::conntrack::flows().map_err(std::io::Error::other)
        })
        .expect("enter")
        .expect("send and dump");
    let ports: Vec<u16> = flows.iter().filter(|f| f.udp).map(|f| f.original.1.port()).collect();
    assert_eq!(ports, [data_port + 1], "{flows:?}");
}

/// A client connects to a round-robin port whose first backend drops every SYN (after the
/// node's conntrack has confirmed the flow). The first SYN's flow goes to the silent backend
/// with at most a second left in conntrack, and the client stays in the unanswered set; so its
/// retransmitted SYN, a second later, is a new flow that the nat chain lets through
/// untranslated to the proxy's listener on the node: the connect succeeds well within 3 s,
/// the proxy sees the client's own address and port, and the port's counter saw one flow.
/// Without the policy the flow would stay 120 s and every retransmission would follow it.
/// Then a client that a backend answered is out of the set: connecting again from the same
/// address and port goes to the backend again, not to the proxy (root).
#[test]
fn a_silent_backends_client_goes_to_the_proxy_when_it_retransmits() {
    use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
    use shoal_nft::conntrack::{self, TcpState};
    use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
    use std::time::Instant;
    if !require_root("a_silent_backends_client_goes_to_the_proxy_when_it_retransmits") {
        return;
    }
    let mut c = Cleanup::new();
    let node = c.netns(&unique_prefix("qn")).expect("netns");
    let client = c.netns(&unique_prefix("qc")).expect("netns");
    let backends = c.netns(&unique_prefix("qb")).expect("netns");
    let (silent, answering) = (ip("198.18.1.2"), ip("198.18.1.3"));
    let ip_in = |ns: &NetNs, args: &[&str]| {
        let ok = std::process::Command::new("ip").args(["-n", ns.name()]).args(args).status();
        assert!(ok.is_ok_and(|s| s.success()), "ip -n {} {args:?}", ns.name());
    };
    ip_in(
        &node,
        &["link", "add", "n0", "type", "veth", "peer", "name", "c0", "netns", client.name()],
    );
    // The backends sit behind the node's end of the sandbox link, where the ingress sandbox
    // is.
    ip_in(
        &node,
        &["link", "add", NODE_LINK, "type", "veth", "peer", "name", "b0", "netns", backends.name()],
    );
    ip_in(&node, &["addr", "add", "198.18.0.2/30", "dev", "n0"]);
    ip_in(&node, &["addr", "add", "198.18.1.1/24", "dev", NODE_LINK]);
    ip_in(&client, &["addr", "add", "198.18.0.1/30", "dev", "c0"]);
    ip_in(&backends, &["addr", "add", "198.18.1.2/24", "dev", "b0"]);
    ip_in(&backends, &["addr", "add", "198.18.1.3/24", "dev", "b0"]);
    for (ns, link) in [(&node, "n0"), (&node, NODE_LINK), (&client, "c0"), (&backends, "b0")] {
        ip_in(ns, &["link", "set", link, "up"]);
    }
    ip_in(&backends, &["route", "add", "default", "via", "198.18.1.1"]);
    sysctl(Some(&node), "ip_forward", "1").expect("forwarding");
    // The silent backend: its SYNs arrive and are dropped, unanswered.
    let (f, t) = (Family::Ip, "silent");
    let mut b = Batch::new();
    b.add_table(f, t);
    let input = BaseChain { kind: ChainType::Filter, hook: Hook::Input, priority: 0 };
    b.add_chain(f, t, "input", Some(input));
    b.add_rule(
        f,
        t,
        "input",
        &[
            Expr::Payload { base: PayloadBase::Network, offset: 16, len: 4 },
            Expr::Cmp { op: CmpOp::Eq, data: silent.octets().to_vec() },
            Expr::Verdict(Verdict::Drop),
        ],
    );
    backends.run(|| b.commit()).expect("enter").expect("drop rule");
    let backend =
        backends.run(|| TcpListener::bind((answering, 8000))).expect("enter").expect("listen");
    backend.set_nonblocking(true).expect("nonblocking");
    // The proxy's listeners, which the agent keeps on every published port of the node.
    let proxy = |port: u16| {
        let l = node.run(|| TcpListener::bind(("0.0.0.0", port))).expect("enter").expect("listen");
        l.set_nonblocking(true).expect("nonblocking");
        l
    };
    let (proxy_rr, proxy_one) = (proxy(8100), proxy(8101));
    let rr = KernelPort { target: 8000, ..port(8100, Pick::RoundRobin, &[]) };
    let rr = KernelPort { backends: vec![answering, silent], ..rr };
    let one = KernelPort { published: 8101, backends: vec![answering], ..rr.clone() };
    apply_ports(Some(&node), 4789, &[rr, one]).expect("ports");

    let front = SocketAddrV4::new(ip("198.18.0.2"), 8100);
    let sock = client.run(tokio::net::TcpSocket::new_v4).expect("enter").expect("socket");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let (first, connected, took) = rt.block_on(async {
        let started = Instant::now();
        let connect = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), sock.connect(front.into())).await
        });
        // The first SYN's flow, watched from its start (it lives about a second).
        let mut first = None;
        while first.is_none() && !connect.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let flows = node.run(conntrack::flows).expect("enter").expect("conntrack");
            first = flows.into_iter().find(|f| !f.udp && f.original.1 == front);
        }
        let connected = connect.await.expect("join");
        (first, connected, started.elapsed())
    });
    let first = first.expect("the first SYN's flow was never seen in the node's conntrack");
    assert_eq!(*first.reply.0.ip(), silent, "round robin starts at the first backend: {first:?}");
    assert_eq!(first.tcp_state, Some(TcpState::SynSent), "{first:?}");
    assert!(first.timeout.is_some_and(|s| s <= SYN_SENT_SECONDS), "{first:?}");
    let stream = connected
        .unwrap_or_else(|_| {
            panic!("no connection after {took:?}: the SYN stayed on the silent backend")
        })
        .expect("connect");
    let client_end = stream.local_addr().expect("local");
    assert_eq!(SocketAddr::from(first.original.0), client_end, "the same client socket");
    let (_taken, seen) = proxy_rr.accept().expect("the proxy took the retransmitted SYN");
    assert_eq!(seen, client_end, "the proxy sees the client's own address and port");
    let tracked = node.run(conntrack::flows).expect("enter").expect("conntrack");
    let now: Vec<_> = tracked.iter().filter(|f| !f.udp && f.original.1 == front).collect();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].reply.0, front, "untranslated: {now:?}");
    assert_eq!(now[0].tcp_state, Some(TcpState::Established), "{now:?}");

    // Answered, twice from one address and port: the first connection ends in a reset, so
    // neither end waits in TIME_WAIT and the second starts a new flow at once.
    let from = SocketAddrV4::new(ip("198.18.0.1"), 40_000);
    let to = SocketAddrV4::new(ip("198.18.0.2"), 8101);
    for _ in 0..2 {
        let s = client
            .run(|| -> std::io::Result<TcpStream> {
                use socket2::{Domain, Socket, Type};
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&from.into())?;
                s.connect_timeout(&to.into(), Duration::from_secs(3))?;
                Ok(s.into())
            })
            .expect("enter")
            .expect("connect to the single backend");
        let taken = (0..300).find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            backend.accept().ok()
        });
        let (_, seen) = taken.expect("the backend took the connection");
        assert_eq!(seen, from.into());
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("linger");
    }
    let proxied = proxy_one.accept().map(|(_, from)| from);
    assert!(
        proxied.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "an answered client went to the proxy: {proxied:?}"
    );
    let mut counted = flows(Some(&node)).expect("counters");
    counted.sort();
    assert_eq!(counted, [(counter_name(false, 8100), 1), (counter_name(false, 8101), 2)]);
}

/// The kernel takes both tables and the link, and applying again changes nothing (root).
#[test]
fn the_kernel_takes_the_link_and_both_tables() {
    use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
    if !require_root("the_kernel_takes_the_link_and_both_tables") {
        return;
    }
    let mut c = Cleanup::new();
    let node = c.netns(&unique_prefix("kn")).expect("netns");
    let sandbox = c.netns(&unique_prefix("ks")).expect("netns");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    for _ in 0..2 {
        rt.block_on(apply_link(Some(&node), &sandbox, "eth0", (ip("10.0.0.0"), 24))).expect("link");
    }
    let ports = [
        port(8100, Pick::Random, &["10.0.0.5", "10.0.0.7"]),
        port(8101, Pick::RoundRobin, &["10.0.0.5", "10.0.0.7"]),
        port(8102, Pick::ClientHash, &["10.0.0.5", "10.0.0.7"]),
        KernelPort { udp: true, ..port(8103, Pick::Random, &["10.0.0.5"]) },
    ];
    apply_ports(Some(&node), 4789, &ports).expect("ports");
    apply_ports(Some(&node), 4789, &ports).expect("ports again");
    let rules = node.run(|| shoal_nft::rules(Family::Ip, TABLE)).expect("enter").expect("dump");
    let chains: Vec<&str> = rules.iter().map(|r| r.chain.as_str()).collect();
    let want = ["raw-prerouting", "raw-output"].into_iter().chain(["prerouting"; 5]);
    assert_eq!(chains, want.chain(["forward"; 2]).collect::<Vec<_>>());
    // The real nft, where installed, reads the table as meant.
    let listed = std::process::Command::new("ip")
        .args(["netns", "exec", node.name(), "nft", "list", "table", "ip", TABLE])
        .output();
    match listed {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            for want in [
                "ct state new ip saddr . tcp sport @unanswered accept",
                "add @unanswered { ip saddr . tcp sport } ct timeout set",
                "delete @unanswered { ip daddr . tcp dport }",
                "tcp flags == 0x14 tcp sequence 0 counter packets 0 bytes 0 drop",
                "size 65536",
                "ct timeout tcp-syn-sent-1s {\n\t\tprotocol tcp\n\t\tl3proto ip\n\t\t\
                 policy = { syn_sent : 1 }\n\t}",
                "ct timeout set \"tcp-syn-sent-1s\" counter name \"tcp-8100\" \
                 dnat to numgen random mod 2 map",
                "counter name \"udp-8103\" dnat to 10.0.0.5:8000",
                "flags dynamic,timeout",
                "type filter hook prerouting priority raw; policy accept;\n\t\tudp dport 4789 notrack",
                "type filter hook output priority raw; policy accept;\n\t\tudp dport 4789 notrack",
            ] {
                assert!(text.contains(want), "{want:?} not in\n{text}");
            }
        }
        other => eprintln!("*** nft not runnable ({other:?}): not comparing its listing"),
    }
    let mut counted: Vec<(String, u64)> = flows(Some(&node)).expect("flows");
    counted.sort();
    let names: Vec<&str> = counted.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["tcp-8100", "tcp-8101", "tcp-8102", "udp-8103"]);
    assert!(counted.iter().all(|(_, n)| *n == 0), "{counted:?}");
    let rules = sandbox.run(|| shoal_nft::rules(Family::Ip, TABLE)).expect("enter").expect("dump");
    assert_eq!(rules.len(), 2, "{rules:?}");
    rt.block_on(remove(Some(&node))).expect("remove");
    rt.block_on(remove(Some(&node))).expect("remove again");
    assert!(flows(Some(&node)).expect("flows").is_empty(), "the counters stayed");
    let gone = rt.block_on(async {
        let h = node.netlink().expect("netlink");
        shoal_netns::link_index(&h, NODE_LINK).await
    });
    assert!(gone.is_none(), "the link stayed");
}
