//! Host-mode ports of a global service, end to end on real agents in the lab: a global
//! `mode=host` service is not started on a node where another service's live task holds the
//! same host port; its task there waits, pending, with swarmkit's message, and starts once the
//! port is free.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Lab, eventually, require_root, running_per_node};

/// The name of the task that answers on nodeN:8200 ("" when nothing does).
fn answer(lab: &Lab, node: u8) -> String {
    let url = format!("http://{}:8200/", lab.addr(node));
    lab.ask(None, &url, &["-m", "3"]).map(|a| a.name).unwrap_or_default()
}

#[test]
fn a_global_host_mode_task_waits_where_another_service_holds_the_port() {
    if !require_root("a_global_host_mode_task_waits_where_another_service_holds_the_port") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    let port = "published=8200,target=8000,mode=host";
    lab.create_answering(
        "web",
        &["--constraint", "node.hostname==node2", "--publish", port],
        &["web"],
    );
    eventually("web answering on node2", Duration::from_secs(120), || {
        (answer(&lab, 2) == "web").then_some(())
    });
    lab.create_answering("edge", &["--detach", "--mode", "global", "--publish", port], &["edge"]);
    eventually("edge on node1 and node3, pending on node2", Duration::from_secs(120), || {
        let running = running_per_node(&lab, "edge");
        let ps = lab.on("node1", &["service", "ps", "edge"]);
        let waiting = ps.lines().any(|l| {
            l.contains("node2")
                && l.contains("Pending")
                && l.contains("no suitable node (host-mode port already in use on 1 node)")
        });
        (waiting && running.keys().map(String::as_str).eq(["node1", "node3"])).then_some(())
    });
    // A task reported running may not listen yet.
    for (node, who) in [(1, "edge"), (2, "web"), (3, "edge")] {
        eventually(&format!("{who} answering on node{node}"), Duration::from_secs(60), || {
            (answer(&lab, node) == who).then_some(())
        });
    }
    // The waiting task stays so: nothing of edge starts on node2 while web holds the port.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!running_per_node(&lab, "edge").contains_key("node2"));
    assert_eq!(answer(&lab, 2), "web");

    lab.on("node1", &["service", "rm", "web"]);
    eventually("edge on every node once web is gone", Duration::from_secs(120), || {
        (running_per_node(&lab, "edge").len() == 3 && answer(&lab, 2) == "edge").then_some(())
    });
    let ps = lab.on("node1", &["service", "ps", "edge"]);
    assert_eq!(ps.lines().skip(1).count(), 3, "edge kept one task per node:\n{ps}");
}
