//! The ingress network is replaced by an encrypted one, as in Docker: `network rm ingress` is
//! refused while a service publishes through it, then allowed; `network create --driver overlay
//! --ingress --opt encrypted` makes the new one. On three real agents in the lab, a
//! three-replica service that answers with the peer address it sees is then reached through
//! every node's published port, from this host and from another lab node, and every answer
//! names the real client address; the cross-node mesh traffic on the underlay is WireGuard,
//! never cleartext VXLAN.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::answer::{Answer, through_every_node};
use common::capture::{capture, packets};
use common::{Lab, eventually, require_root, wait_on_nodes};

/// What a request carries, to look for in the underlay capture.
const MARKER: &str = "ingress-cleartext-marker";

/// An HTTP request carrying [`MARKER`] to `to:8100` from this host (`from` None) or from
/// inside a lab node.
fn get(lab: &Lab, from: Option<&str>, to: &str) -> Option<Answer> {
    lab.ask(from, &format!("http://{to}:8100/{MARKER}"), &[])
}

#[test]
fn an_encrypted_ingress_keeps_client_addresses_and_hides_the_traffic() {
    if !require_root("an_encrypted_ingress_keeps_client_addresses_and_hides_the_traffic") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);

    // The ingress `swarm init` made stays while a service publishes through it, and a second
    // ingress network is refused while it exists.
    lab.on(
        "node1",
        &["service", "create", "--name", "blocker", "-p", "8200:8000", "--", "sleep", "1d"],
    );
    let err = lab.refused("node1", &["network", "rm", "ingress"]);
    assert!(
        err.contains("ingress network cannot be removed because service(s) blocker depend on it"),
        "{err}"
    );
    let err = lab.refused("node1", &["network", "create", "--ingress", "other"]);
    assert!(
        err.contains("ingress network (ingress, ") && err.contains("is already present"),
        "{err}"
    );
    let err = lab.refused("node1", &["network", "create", "--ingress", "--attachable", "x"]);
    assert!(err.contains("cannot be attachable"), "{err}");
    lab.on("node1", &["service", "rm", "blocker"]);
    // Once blocker's tasks are gone nothing holds an address on it.
    eventually("network rm ingress", Duration::from_secs(60), || {
        lab.shoal(&["--node", "node1", "network", "rm", "ingress"]).status.success().then_some(())
    });
    let err = lab.refused(
        "node1",
        &["service", "create", "--name", "x", "-p", "8300:80", "--", "sleep", "1d"],
    );
    assert!(err.contains("no ingress network is present"), "{err}");

    lab.on(
        "node1",
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--ingress",
            "--subnet",
            "10.11.0.0/24",
            "--opt",
            "encrypted",
            "ingress",
        ],
    );
    let ls = lab.on("node1", &["network", "ls"]);
    let row = ls.lines().find(|l| l.contains(" ingress ")).unwrap_or_default();
    assert!(
        row.contains("10.11.0.0/24") && row.contains("ingress") && row.contains("encrypted"),
        "network ls: {ls}"
    );
    lab.create_answering("peer", &["--replicas", "3", "-p", "8100:8000"], &[]);
    wait_on_nodes(&lab, "peer", 3);
    lab.wait_every_node_reaches(3, 8100, 3);

    // From this host (the lab bridge's address) and from node2, through every node's port, to
    // every task, while the underlay is captured.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("underlay.pcap");
    let cap = capture(&format!("{}-br", lab.name), &file);
    let host = lab.host().to_string();
    let node2 = lab.addr(2).to_string();
    for (from, client) in [(None, host.as_str()), (Some("node2"), node2.as_str())] {
        let who = from.unwrap_or("the host");
        // Any port of the client's: the address is what this test is about.
        through_every_node(&lab, &format!("from {who}"), client, 3, |to, _| {
            (get(&lab, from, to), 0..=u16::MAX)
        });
    }
    // The WireGuard datagrams of those requests are in the file before tcpdump is stopped.
    eventually("WireGuard in the capture", Duration::from_secs(30), || {
        (!packets(&file, "udp port 51820").is_empty()).then_some(())
    });
    drop(cap);
    let inspect = lab.on("node1", &["service", "inspect", "peer"]);
    let said: serde_json::Value = serde_json::from_str(&inspect).expect("inspect is JSON");
    let said = said[0]["client_address"].as_str().unwrap_or_default().to_owned();
    assert!(said.starts_with("kept") && said.contains("10.11.0.0/24"), "inspect says {inspect}");

    // Requests crossed nodes (each node reached the tasks on the other two) inside WireGuard:
    // no VXLAN on the underlay, and the requests' bytes in no datagram.
    let vxlan = packets(&file, "udp port 4789");
    assert!(vxlan.is_empty(), "cleartext VXLAN on the underlay:\n{vxlan}");
    let wg = packets(&file, "udp port 51820");
    assert!(!wg.is_empty(), "no WireGuard on the underlay");
    let all = packets(&file, "udp");
    assert!(!all.contains(MARKER), "a request in cleartext on the underlay");
}
