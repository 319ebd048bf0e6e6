//! The tutorial's first half on real agents in the lab: init, joins with the printed command,
//! node ls, the worker's refusal, promote, losing the leader, bad tokens, availability, demoting
//! the last manager, and gossip key rotation while membership holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Lab, lossy, require_root};
use shoal::api::NodeInfo;

fn info(lab: &Lab, node: &str) -> NodeInfo {
    serde_json::from_str(&lab.on(node, &["info", "--json"])).unwrap()
}

/// `node ls` rows as (hostname, status, availability, manager status).
fn node_ls(lab: &Lab, node: &str) -> Vec<(String, String, String, String)> {
    let out = lab.on(node, &["node", "ls"]);
    out.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "*").collect();
            let mgr = if f.len() >= 6 { f[4] } else { "" };
            (f[1].to_owned(), f[2].to_owned(), f[3].to_owned(), mgr.to_owned())
        })
        .collect()
}

fn row(rows: &[(String, String, String, String)], host: &str) -> (String, String, String) {
    let r = rows.iter().find(|r| r.0 == host).unwrap_or_else(|| panic!("{host} missing: {rows:?}"));
    (r.1.clone(), r.2.clone(), r.3.clone())
}

fn wait(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn swarm_init_join_promote_failover_and_refusals() {
    if !require_root("swarm_init_join_promote_failover_and_refusals") {
        return;
    }
    let lab = Lab::up(4);
    let init = lab.on("node1", &["swarm", "init"]);
    assert!(init.contains("Swarm initialized: current node ("), "{init}");
    let join_line =
        init.lines().find(|l| l.contains("swarm join --token")).unwrap().trim().to_owned();
    let args: Vec<&str> = join_line.split_whitespace().skip(1).collect();
    assert_eq!(args[..3], ["swarm", "join", "--token"]);
    assert!(args[4].ends_with(&format!("{}:2377", lab.addr(1))), "{join_line}");
    for n in ["node2", "node3"] {
        assert!(lab.on(n, &args).contains("joined a swarm as a worker"));
    }

    // Tokens that must not admit node4, each refused with its reason.
    let token = args[3].to_owned();
    let mut wrong = token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let parts: Vec<&str> = token.split('-').collect();
    let foreign = format!("SWMTKN-1-{}-{}", "1".repeat(parts[2].len()), parts[3]);
    for (t, why) in [(wrong.as_str(), "token"), (foreign.as_str(), "CA")] {
        let out = lab.shoal(&["--node", "node4", "swarm", "join", "--token", t, args[4]]);
        assert!(!out.status.success());
        let err = lossy(&out.stderr);
        assert!(err.contains(why), "{why}: {err}");
    }
    let rotated =
        lab.on("node1", &["swarm", "join-token", "--rotate", "-q", "worker"]).trim().to_owned();
    assert_ne!(rotated, token);
    let out = lab.shoal(&["--node", "node4", "swarm", "join", "--token", &token, args[4]]);
    assert!(lossy(&out.stderr).contains("rotated"), "{}", lossy(&out.stderr));
    assert!(info(&lab, "node4").swarm.is_none(), "refused joins change nothing");

    let rows = node_ls(&lab, "node1");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(row(&rows, "node1"), ("Ready".into(), "Active".into(), "Leader".into()));
    for n in ["node2", "node3"] {
        wait(Duration::from_secs(20), "workers Ready", || {
            row(&node_ls(&lab, "node1"), n).0 == "Ready"
        });
    }
    let out = lab.shoal(&["--node", "node2", "node", "ls"]);
    assert!(!out.status.success());
    assert!(
        lossy(&out.stderr).contains("This node is not a swarm manager."),
        "{}",
        lossy(&out.stderr)
    );

    // Availability round trip.
    for a in ["drain", "pause", "active"] {
        lab.on("node1", &["node", "update", "--availability", a, "node3"]);
        let want = format!("{}{}", a[..1].to_uppercase(), &a[1..]);
        assert_eq!(row(&node_ls(&lab, "node1"), "node3").1, want);
    }

    // Promote: three managers; a write, then the leader dies.
    lab.on("node1", &["node", "promote", "node2", "node3"]);
    wait(Duration::from_secs(30), "node2 and node3 Reachable", || {
        let r = node_ls(&lab, "node1");
        row(&r, "node2").2 == "Reachable" && row(&r, "node3").2 == "Reachable"
    });
    lab.on("node1", &["node", "update", "--label-add", "zone=a", "node3"]);
    let old_leader = info(&lab, "node1").swarm.unwrap().node_id;
    assert!(lab.shoal(&["lab", "stop", "node1", "--kill"]).status.success());
    let took = wait(Duration::from_secs(5), "a new leader", || {
        info(&lab, "node2").swarm.unwrap().leader.is_some_and(|l| l != old_leader)
    });
    eprintln!("new leader after {took:?}");
    let inspect = lab.on("node2", &["node", "inspect", "node3"]);
    assert!(inspect.contains("\"zone\": \"a\""), "the write before the kill survives: {inspect}");
    wait(Duration::from_secs(30), "old leader Unreachable and Down", || {
        let (status, _, mgr) = row(&node_ls(&lab, "node2"), "node1");
        status == "Down" && mgr == "Unreachable"
    });
    assert!(lab.shoal(&["lab", "start", "node1"]).status.success());
    wait(Duration::from_secs(30), "old leader back as Reachable", || {
        let (status, _, mgr) = row(&node_ls(&lab, "node2"), "node1");
        status == "Ready" && mgr == "Reachable"
    });

    // Gossip keys rotate twice while membership holds.
    for _ in 0..2 {
        let before = info(&lab, "node2").gossip.unwrap().key_ids;
        lab.on("node2", &["swarm", "rotate-gossip-key"]);
        wait(Duration::from_secs(30), "every node on the new primary key", || {
            let ids: Vec<_> = ["node1", "node2", "node3"]
                .iter()
                .map(|n| info(&lab, n).gossip.unwrap().key_ids)
                .collect();
            ids.iter().all(|k| k.len() == 1 && k[0] != before[0] && *k == ids[0])
        });
        for n in ["node1", "node2", "node3"] {
            let g = info(&lab, n).gossip.unwrap();
            assert!(
                g.members.iter().filter(|m| m.state == "alive").count() == 3,
                "{n}: {:?}",
                g.members
            );
        }
    }

    // Demote down to one manager; demoting the last is refused and changes nothing.
    // Demoting the leader moves leadership; the next demote waits for Raft to settle.
    for n in ["node3", "node1"] {
        wait(Duration::from_secs(30), "demote", || {
            lab.shoal(&["--node", "node2", "node", "demote", n]).status.success()
        });
    }
    wait(Duration::from_secs(30), "one manager left", || {
        node_ls(&lab, "node2").iter().filter(|r| !r.3.is_empty()).count() == 1
    });
    let before = node_ls(&lab, "node2");
    let out = lab.shoal(&["--node", "node2", "node", "demote", "node2"]);
    assert!(!out.status.success());
    assert!(lossy(&out.stderr).contains("last manager"), "{}", lossy(&out.stderr));
    assert_eq!(node_ls(&lab, "node2"), before);
}
