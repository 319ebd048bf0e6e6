//! Creates that race: 26 `network create` and `service create` calls at once, spread over three
//! managers, leave no two networks with one subnet or VNI (the store picks them as it applies
//! each create, so every create lands at its first try, and of two that ask for one subnet one
//! lands), no two services with one name or one published port, and the scheduler keeps working
//! afterwards. Then `shoal run` races: six runs
//! of one name on three nodes make one container, and twelve of different names twelve
//! containers with twelve addresses. The store decides; the API only proposes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, running_per_node};

/// Runs every argv at once, the i-th on node i % 3 + 1: (argv, success, stderr) each.
fn race(lab: &Lab, runs: &[Vec<String>]) -> Vec<(String, bool, String)> {
    std::thread::scope(|s| {
        let calls: Vec<_> = runs
            .iter()
            .enumerate()
            .map(|(i, args)| {
                let node = format!("node{}", i % 3 + 1);
                s.spawn(move || {
                    let argv: Vec<&str> = ["--node", node.as_str()]
                        .into_iter()
                        .chain(args.iter().map(String::as_str))
                        .collect();
                    let out = lab.shoal(&argv);
                    (args.join(" "), out.status.success(), lossy(&out.stderr))
                })
            })
            .collect();
        calls.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn run_argv(name: &str) -> Vec<String> {
    ["run", "-d", "--name", name, "--network", "race0", "--", "sleep", "100000"]
        .map(String::from)
        .to_vec()
}

#[test]
fn racing_creates_leave_no_duplicate() {
    if !require_root("racing_creates_leave_no_duplicate") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.on("node1", &["node", "promote", "node2", "node3"]);
    eventually("three managers", Duration::from_secs(60), || {
        let ls = lab.on("node1", &["node", "ls"]);
        (ls.matches("Reachable").count() + ls.matches("Leader").count() == 3).then_some(())
    });

    let calls: Vec<Vec<String>> = (0..26)
        .map(|i| {
            if i >= 24 {
                // Two networks that ask for one subnet.
                let name = format!("asked{i}");
                ["network", "create", "-d", "overlay", "--subnet", "10.0.250.0/24", &name]
                    .map(String::from)
                    .to_vec()
            } else if i < 10 {
                ["network", "create", "-d", "overlay", "--attachable", &format!("race{i}")]
                    .map(String::from)
                    .to_vec()
            } else if i < 20 {
                let name = format!("dup{}", i % 2);
                ["service", "create", "-d", "--name", &name, "--", "sleep", "100000"]
                    .map(String::from)
                    .to_vec()
            } else {
                // Four services, one published port.
                let name = format!("port{i}");
                [
                    "service", "create", "-d", "--name", &name, "-p", "8500:80", "--", "sleep",
                    "100000",
                ]
                .map(String::from)
                .to_vec()
            }
        })
        .collect();
    let outcomes = race(&lab, &calls);

    // Every network create that asks for no subnet lands; of the two that ask for one, one
    // lands and the other is told it overlaps.
    for (call, ok, err) in outcomes.iter().filter(|(c, ..)| c.contains("race")) {
        assert!(ok, "{call}: {err}");
    }
    let asked: Vec<_> = outcomes.iter().filter(|(c, ..)| c.contains("--subnet")).collect();
    assert_eq!(asked.iter().filter(|(_, ok, _)| *ok).count(), 1, "{asked:?}");
    assert!(asked.iter().any(|(_, ok, err)| !ok && err.contains("overlaps")), "{asked:?}");
    // Each network, the ingress network and the one that asked included, has its own subnet
    // and VNI.
    let ids = lab.on("node2", &["network", "ls", "-q"]);
    let argv: Vec<&str> = ["network", "inspect"].into_iter().chain(ids.lines()).collect();
    let views: Vec<serde_json::Value> = serde_json::from_str(&lab.on("node2", &argv)).unwrap();
    let subnets: BTreeSet<String> =
        views.iter().map(|v| v["network"]["subnet"].as_str().unwrap().to_owned()).collect();
    let vnis: BTreeSet<u64> = views.iter().map(|v| v["network"]["vni"].as_u64().unwrap()).collect();
    assert_eq!((views.len(), subnets.len(), vnis.len()), (12, 12, 12), "{subnets:?} {vnis:?}");
    assert!(subnets.contains("10.0.250.0/24"), "{subnets:?}");

    // Of the service creates, exactly one per name and one per published port lands; the
    // others are told why.
    let services: Vec<_> = outcomes.iter().filter(|(c, ..)| c.starts_with("service")).collect();
    let landed = |f: &str| services.iter().filter(|(c, ok, _)| *ok && c.contains(f)).count();
    assert_eq!((landed("dup"), landed("8500")), (2, 1), "{services:?}");
    for (call, ok, err) in &services {
        assert!(
            *ok || err.contains("already exists") || err.contains("already in use"),
            "{call}: {err}"
        );
    }
    let ls = lab.on("node3", &["service", "ls", "-q"]);
    assert_eq!(ls.lines().count(), 3, "{ls}");

    // The scheduler is unharmed: the survivors run, and a new service converges.
    for name in ["dup0", "dup1"] {
        eventually(&format!("{name} running"), Duration::from_secs(60), || {
            (running_per_node(&lab, name).values().sum::<usize>() == 1).then_some(())
        });
    }
    let out = lab.on(
        "node1",
        &["service", "create", "--replicas", "3", "--name", "after", "--", "sleep", "100000"],
    );
    assert!(out.contains("converged"), "{out}");

    // `shoal run --name solo` six times at once on three nodes: one container, five conflicts.
    let same: Vec<Vec<String>> = (0..6).map(|_| run_argv("solo")).collect();
    let outcomes = race(&lab, &same);
    assert_eq!(outcomes.iter().filter(|(_, ok, _)| *ok).count(), 1, "{outcomes:?}");
    for (call, ok, err) in &outcomes {
        assert!(
            *ok || err.starts_with("Error response from daemon: Conflict. The container name \"/solo\" is already in use"),
            "{call}: {err}"
        );
    }
    // Twelve different names at once: twelve containers, each with its own address.
    let many: Vec<Vec<String>> = (0..12).map(|i| run_argv(&format!("many{i}"))).collect();
    for (call, ok, err) in race(&lab, &many) {
        assert!(ok, "{call}: {err}");
    }
    eventually("13 containers running on race0", Duration::from_secs(90), || {
        let views: Vec<serde_json::Value> =
            serde_json::from_str(&lab.on("node1", &["network", "inspect", "race0"])).unwrap();
        let addrs: Vec<&str> = views[0]["tasks"]
            .as_object()?
            .values()
            .flat_map(|rows| rows.as_array().into_iter().flatten())
            .filter_map(|row| row[1].as_str())
            .collect();
        let unique: BTreeSet<&str> = addrs.iter().copied().collect();
        assert_eq!(unique.len(), addrs.len(), "an address given twice: {addrs:?}");
        (addrs.len() == 13).then_some(())
    });
}
