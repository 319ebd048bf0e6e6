//! Gossip between real agents in the lab: five nodes converge, a crashed node is seen dead by
//! all others within 10 s and comes back with a new generation, and hostile datagrams are
//! dropped and counted while membership carries on. In a swarm, a crashed node's endpoint entries
//! leave every other node's tables (and DNS) with it, and come back when it does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Lab, require_root};
use shoal::api::NodeInfo;

fn members(lab: &Lab, node: &str) -> BTreeMap<String, (String, u64)> {
    let info: NodeInfo = serde_json::from_str(&lab.on(node, &["info", "--json"])).unwrap();
    info.gossip
        .expect("lab agents run gossip")
        .members
        .into_iter()
        .map(|m| (m.name, (m.state, m.generation)))
        .collect()
}

/// Polls until `ok` holds for every listed node's view; returns how long it took.
fn until(
    lab: &Lab,
    nodes: &[&str],
    limit: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<String, (String, u64)>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if nodes.iter().all(|n| ok(&members(lab, n))) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{what} not reached within {limit:?}: {:?}",
            nodes.iter().map(|n| (n, members(lab, n))).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn five_agents_converge_detect_a_crash_and_take_it_back() {
    if !require_root("five_agents_converge_detect_a_crash_and_take_it_back") {
        return;
    }
    let lab = Lab::up_with(5, &["--gossip"]);
    let all = ["node1", "node2", "node3", "node4", "node5"];
    let t = until(&lab, &all, Duration::from_secs(30), "5 alive members everywhere", |m| {
        m.len() == 5 && m.values().all(|(s, _)| s == "alive")
    });
    eprintln!("converged in {t:?}");
    let old_gen = members(&lab, "node1")["node3"].1;

    let killed = Instant::now();
    assert!(lab.shoal(&["lab", "stop", "node3", "--kill"]).status.success());
    let others = ["node1", "node2", "node4", "node5"];
    until(
        &lab,
        &others,
        Duration::from_secs(10).saturating_sub(killed.elapsed()),
        "node3 down everywhere within 10 s",
        |m| m.get("node3").is_none_or(|(s, _)| s == "down"),
    );
    eprintln!("crash seen by all 4 others after {:?}", killed.elapsed());

    assert!(lab.shoal(&["lab", "start", "node3"]).status.success());
    until(&lab, &all, Duration::from_secs(30), "node3 back with a new generation", |m| {
        m.get("node3").is_some_and(|(s, g)| s == "alive" && *g > old_gen)
    });
}

#[test]
fn hostile_datagrams_are_dropped_and_counted() {
    if !require_root("hostile_datagrams_are_dropped_and_counted") {
        return;
    }
    let lab = Lab::up_with(2, &["--gossip"]);
    until(&lab, &["node1", "node2"], Duration::from_secs(30), "2 alive", |m| {
        m.len() == 2 && m.values().all(|(s, _)| s == "alive")
    });
    let target = std::net::SocketAddr::new(lab.addr(1).into(), 7946);
    let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).unwrap();

    let before = |reason: &str| {
        let name = format!("shoal_gossip_dropped_total{{reason=\"{reason}\"}}");
        lab.metric("node1", &name).unwrap_or_else(|| panic!("no metric {name} on node1"))
    };
    let (trunc0, hdr0, key0) = (before("truncated"), before("bad_header"), before("unknown_key"));

    // A frame sealed by a keyring the cluster does not have.
    let mut foreign = shoal_gossip::Keyring::new(&[[7u8; 32]], 1).unwrap();
    let sealed = foreign.seal(shoal_gossip::wire::Kind::Swim, b"hello from outside");
    for _ in 0..3 {
        sock.send_to(&sealed, target).unwrap();
        sock.send_to(b"SG", target).unwrap();
        let junk: Vec<u8> =
            (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        sock.send_to(&junk, target).unwrap();
    }
    let t0 = Instant::now();
    loop {
        let (t, h, k) = (before("truncated"), before("bad_header"), before("unknown_key"));
        if t >= trunc0 + 3 && h >= hdr0 + 3 && k >= key0 + 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "drops not counted: truncated {t} bad_header {h} unknown_key {k}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Membership did not notice.
    let m = members(&lab, "node2");
    assert_eq!(m.len(), 2);
    assert!(m.values().all(|(s, _)| s == "alive"), "{m:?}");
}

/// Visible gossip entries on `node` (its own included).
fn entries(lab: &Lab, node: &str) -> usize {
    let info: NodeInfo = serde_json::from_str(&lab.on(node, &["info", "--json"])).unwrap();
    info.gossip.expect("a swarm node runs gossip").entries
}

#[test]
fn a_crashed_nodes_entries_disappear_and_come_back() {
    if !require_root("a_crashed_nodes_entries_disappear_and_come_back") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    // Each node publishes its ingress sandbox, one task of a global service and its record of
    // applied changes (the node engine's confirmations): 9 entries.
    lab.on("node1", &["network", "create", "net"]);
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--mode",
            "global",
            "--name",
            "g",
            "--network",
            "net",
            "--",
            "sleep",
            "100000",
        ],
    );
    let wait = |what: &str, limit: Duration, ok: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < limit, "{what} not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    };
    wait("9 entries on every node", Duration::from_secs(30), &|| {
        ["node1", "node2", "node3"].iter().all(|n| entries(&lab, n) == 9)
    });

    let killed = Instant::now();
    assert!(lab.shoal(&["lab", "stop", "node3", "--kill"]).status.success());
    wait("node3's entries gone from node1 and node2", Duration::from_secs(10), &|| {
        ["node1", "node2"].iter().all(|n| entries(&lab, n) == 6)
    });
    eprintln!("a crashed node's entries were withdrawn after {:?}", killed.elapsed());

    assert!(lab.shoal(&["lab", "start", "node3"]).status.success());
    wait("node3's entries back everywhere", Duration::from_secs(60), &|| {
        ["node1", "node2", "node3"].iter().all(|n| entries(&lab, n) == 9)
    });
}
