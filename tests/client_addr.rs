//! The routing mesh keeps the client's address, end to end on real agents in the lab: a
//! three-replica service that answers TCP (HTTP) and UDP with the peer address it sees is
//! reached through every node's published ports, from this host and from another lab node,
//! and every answer names the real client address and port. A client the sandbox cannot speak
//! for (loopback on the node) falls back to the node's ingress address, and `/metrics` counts
//! both kinds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::answer::{Answer, through_every_node};
use common::{Lab, eventually, require_root, running_per_node, wait_on_nodes};

/// An HTTP request from a port of `ports` (curl picks a free one).
fn tcp(lab: &Lab, from: Option<&str>, to: &str, ports: (u16, u16)) -> Option<Answer> {
    let range = format!("{}-{}", ports.0, ports.1);
    lab.ask(from, &format!("http://{to}:8100/"), &["--local-port", &range])
}

/// A datagram from `port` and the answer.
fn udp(lab: &Lab, from: Option<&str>, to: &str, port: u16) -> Option<Answer> {
    let peer = format!("UDP:{to}:8101,sourceport={port},reuseaddr");
    let said = lab.run_from(from, &["sh", "-c", &format!("echo hi | socat -t 5 -T 5 - {peer}")]);
    common::answer::parse(&said)
}

fn said_json(inspect: &str) -> serde_json::Value {
    serde_json::from_str(inspect).expect("inspect is JSON")
}

/// A counter of `/metrics` for the service `peer` on one path of the mesh (`proxy`, `kernel`).
fn counter(lab: &Lab, node: &str, name: &str, path: &str) -> u64 {
    let prefix = format!("{name}{{service=\"peer\",path=\"{path}\"}} ");
    lab.metric(node, &prefix).unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

#[test]
fn tasks_see_the_real_client_address_through_every_node() {
    if !require_root("tasks_see_the_real_client_address_through_every_node") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.create_answering(
        "peer",
        &["--replicas", "3", "-p", "8100:8000", "-p", "8101:8001/udp"],
        &[],
    );
    wait_on_nodes(&lab, "peer", 3);
    // Every node's mesh has found all three backends healthy.
    lab.wait_every_node_reaches(3, 8100, 3);
    let host = lab.host().to_string();

    // TCP and UDP from this host (the lab bridge's address) and from node2.
    let node2 = lab.addr(2).to_string();
    for (from, client) in [(None, host.as_str()), (Some("node2"), node2.as_str())] {
        let who = from.unwrap_or("the host");
        through_every_node(&lab, &format!("TCP from {who}"), client, 3, |to, n| {
            let base = 41000 + (n % 200) * 20;
            (tcp(&lab, from, to, (base, base + 19)), base..=base + 19)
        });
        through_every_node(&lab, &format!("UDP from {who}"), client, 3, |to, n| {
            let port = 47000 + n;
            (udp(&lab, from, to, port), port..=port)
        });
    }
    let inspect = lab.on("node1", &["service", "inspect", "peer"]);
    let said = said_json(&inspect)[0]["client_address"].as_str().unwrap_or_default().to_owned();
    assert!(said.starts_with("kept") && said.contains("10.0.0.0/24"), "inspect says {inspect}");
    let ports = &said_json(&inspect)[0]["mesh_paths"];
    // Plain ports take the default path, the kernel's.
    assert_eq!((&ports["8100/tcp"], &ports["8101/udp"]), (&"kernel".into(), &"kernel".into()));
    let kept = counter(&lab, "node1", "shoal_mesh_client_addr_kept_total", "kernel");
    assert!(kept > 0, "node1 counted no kept client address");

    // Loopback on node1 cannot be spoken for: the task sees node1's ingress sandbox address.
    let before = counter(&lab, "node1", "shoal_mesh_client_addr_fallback_total", "proxy");
    let seen = tcp(&lab, Some("node1"), "127.0.0.1", (1024, 65535)).expect("loopback answer");
    assert!(seen.ip.starts_with("10.0.0."), "loopback client arrived as {seen:?}");
    let after = counter(&lab, "node1", "shoal_mesh_client_addr_fallback_total", "proxy");
    assert!(after > before, "the fallback was not counted ({before} -> {after})");
}

/// Docker's `mode=host` publishing: only the nodes that run a task answer on the port, each to
/// its own task, and the task sees the client's address.
#[test]
fn host_mode_answers_only_where_a_task_runs_with_the_client_address() {
    if !require_root("host_mode_answers_only_where_a_task_runs_with_the_client_address") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.create_answering(
        "peer",
        &["--replicas", "2", "--publish", "published=8200,target=8000,mode=host"],
        &[],
    );
    let with_task = eventually("two tasks on two nodes", Duration::from_secs(120), || {
        let per_node: BTreeMap<String, usize> = running_per_node(&lab, "peer");
        (per_node.len() == 2).then_some(per_node.into_keys().collect::<BTreeSet<String>>())
    });
    let host = lab.host().to_string();
    let get = |node: u8| lab.ask(None, &format!("http://{}:8200/", lab.addr(node)), &["-m", "3"]);
    let mut tasks = BTreeSet::new();
    for node in 1..=3u8 {
        let name = format!("node{node}");
        if with_task.contains(&name) {
            let seen =
                eventually(&format!("{name}:8200 answering"), Duration::from_secs(60), || {
                    get(node)
                });
            assert_eq!(seen.ip, host, "{name} presented the client as {seen:?}");
            // Always the node's own task.
            for _ in 0..5 {
                let again = get(node).unwrap_or_else(|| panic!("{name}:8200 stopped answering"));
                assert_eq!(again.task, seen.task, "{name} answered from another node's task");
                assert_eq!(again.ip, host);
            }
            tasks.insert(seen.task);
        } else {
            assert!(get(node).is_none(), "{name} runs no task of peer but answered on 8200");
        }
    }
    assert_eq!(tasks.len(), 2, "the two nodes answered from the same task: {tasks:?}");
}
