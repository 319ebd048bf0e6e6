//! Root-only: five real drivers, each in its own network namespace on a bridge, over real UDP
//! and TCP. Kill one (its runtime is torn down, like `kill -9`): the others see it dead within
//! 10 s and its entries disappear; restart it: it rejoins with a new generation. Hostile
//! datagrams (unknown key, truncated, random) are dropped and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_gossip::wire::Kind;
use shoal_gossip::{
    CoreConfig, DropReason, EntryKey, Gossip, GossipConfig, Keyring, MemberState, NodeId, NodeMeta,
};
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};

const KEY: [u8; 32] = [0x42; 32];
const N: usize = 5;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One node: a tokio runtime whose worker threads live in the node's namespace, and its driver.
struct Node {
    rt: Option<tokio::runtime::Runtime>,
    gossip: Option<Gossip>,
}

impl Node {
    fn start(ns: &NetNs, cfg: GossipConfig) -> Node {
        // Threads spawned from a thread inside the namespace inherit it, so every socket the
        // runtime's workers open (UDP, listener, outgoing TCP) belongs to the namespace.
        let rt = ns
            .run(|| {
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
            })
            .unwrap()
            .unwrap();
        let gossip = rt.block_on(rt.spawn(Gossip::start(cfg))).unwrap().unwrap();
        Node { rt: Some(rt), gossip: Some(gossip) }
    }

    fn g(&self) -> &Gossip {
        self.gossip.as_ref().unwrap()
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(f)
    }

    /// Abrupt death: no leave message, sockets closed with the runtime.
    fn kill(&mut self) {
        let g = self.gossip.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        drop(g);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait(limit: Duration, mut pred: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if pred() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn five_drivers_in_namespaces_detect_death_rejoin_and_drop_hostile_packets() {
    if !require_root("five_drivers_in_namespaces_detect_death_rejoin_and_drop_hostile_packets") {
        return;
    }
    let p = unique_prefix("gs");
    let subnet = 20 + (u32::from_str_radix(&p[2..], 16).unwrap() % 200) as u8;
    let addr =
        |i: usize| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, subnet, 10 + i as u8)), 7946);
    let mut guard = Cleanup::new();
    let br = format!("{p}-br");
    guard.netns(&br).unwrap();
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &br, "link", "set", "br0", "up"]);
    let mut nss = Vec::new();
    for i in 0..N {
        let name = format!("{p}-n{i}");
        let ns = guard.netns(&name).unwrap();
        let v = format!("v{i}");
        ip(&["-n", &br, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        ip(&["-n", &br, "link", "set", &v, "master", "br0", "up"]);
        let cidr = format!("{}/24", addr(i).ip());
        ip(&["-n", &name, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        nss.push(ns);
    }

    let config = |i: usize| {
        let mut c = GossipConfig::new(NodeId::from_name(&format!("node{i}")), addr(i), KEY);
        c.bind = addr(i);
        c.seeds = vec![addr(0)];
        c.networks = vec!["net".into()];
        c.meta = NodeMeta {
            name: format!("node{i}"),
            underlay: Some(addr(i).ip()),
            ..NodeMeta::default()
        };
        c.core = CoreConfig::lan();
        c
    };
    let mut nodes: Vec<Node> = (0..N).map(|i| Node::start(&nss[i], config(i))).collect();

    // Converge: everyone alive with metadata.
    let t = wait(Duration::from_secs(30), || {
        nodes.iter().all(|n| {
            let s = n.g().snapshot();
            s.members.iter().filter(|m| m.state == MemberState::Alive && m.meta.is_some()).count()
                == N
        })
    });
    println!("5 drivers converged in {t:?}");
    assert!(t.is_some(), "5 drivers did not converge within 30 s");

    // Each publishes an endpoint; everyone sees all five.
    for (i, n) in nodes.iter().enumerate() {
        let key = EntryKey::new("endpoint_table", "net", &format!("task{i}"));
        n.block(n.g().write(key, format!("10.0.0.{i}").into_bytes())).unwrap();
    }
    let t = wait(Duration::from_secs(10), || {
        nodes.iter().all(|n| n.g().snapshot().table("endpoint_table", "net").len() == N)
    });
    assert!(t.is_some(), "entries did not replicate within 10 s");

    // Kill node 4 abruptly.
    let victim = NodeId::from_name("node4");
    let old_gen = nodes[4].g().snapshot().identity.as_ref().unwrap().generation;
    nodes[4].kill();
    let dead = wait(Duration::from_secs(10), || {
        nodes[..4].iter().all(|n| {
            let s = n.g().snapshot();
            let alive =
                s.members.iter().any(|m| m.id.node == victim && m.state != MemberState::Down);
            !alive && s.table("endpoint_table", "net").len() == N - 1
        })
    });
    println!("killed node declared dead and its entry withdrawn everywhere after {dead:?}");
    assert!(
        dead.is_some(),
        "others did not see the killed node dead (and its entry gone) within 10 s"
    );

    // Restart it: a new generation rejoins and republishes.
    nodes[4] = Node::start(&nss[4], config(4));
    let key4 = EntryKey::new("endpoint_table", "net", "task4");
    nodes[4].block(nodes[4].g().write(key4, b"10.0.0.44".to_vec())).unwrap();
    let back = wait(Duration::from_secs(20), || {
        nodes[..4].iter().all(|n| {
            let s = n.g().snapshot();
            let rejoined = s.members.iter().any(|m| {
                m.id.node == victim && m.state == MemberState::Alive && m.id.generation > old_gen
            });
            let entry = s
                .table("endpoint_table", "net")
                .iter()
                .any(|(k, _, v)| k == "task4" && v[..] == b"10.0.0.44"[..]);
            rejoined && entry
        })
    });
    println!("restarted node rejoined with a new generation after {back:?}");
    assert!(back.is_some(), "restarted node did not rejoin with a new generation within 20 s");

    // Hostile datagrams over real UDP from node 3's namespace to node 0.
    let before = nodes[0].g().metrics().counters;
    let foreign = Keyring::new(&[[9; 32]], 1).unwrap().seal(Kind::Swim, b"let me in");
    let mut ours = Keyring::new(&[KEY], 77).unwrap().seal(Kind::Swim, &[0u8; 64]);
    ours.truncate(30);
    let mut random = vec![0u8; 200];
    let mut x: u32 = 0x1234_5678;
    for b in &mut random {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    random[0] = b'Z';
    let src = SocketAddr::new(addr(3).ip(), 0);
    nss[3]
        .run(move || {
            let s = std::net::UdpSocket::bind(src)?;
            for pkt in [&foreign[..], &ours[..], &random[..]] {
                s.send_to(pkt, addr(0))?;
            }
            std::io::Result::Ok(())
        })
        .unwrap()
        .unwrap();
    let counted = wait(Duration::from_secs(5), || {
        let c = nodes[0].g().metrics().counters;
        c.dropped(DropReason::UnknownKey) > before.dropped(DropReason::UnknownKey)
            && c.dropped(DropReason::Truncated) > before.dropped(DropReason::Truncated)
            && c.dropped(DropReason::BadHeader) > before.dropped(DropReason::BadHeader)
    });
    assert!(
        counted.is_some(),
        "hostile datagrams not counted: {:?}",
        nodes[0].g().metrics().counters
    );
    // And the cluster is still whole.
    let s = nodes[0].g().snapshot();
    assert_eq!(s.members.iter().filter(|m| m.state == MemberState::Alive).count(), N);

    for n in &mut nodes {
        n.kill();
    }
    drop(guard);
}
