//! `--cert-expiry`, `swarm update` and `swarm ca --rotate` through the CLI on a lab of three
//! nodes (two managers, a worker): certificates carry the configured validity and follow a
//! shorter one at once, bad durations change nothing, and after a CA rotation every node holds
//! a certificate from the new CA, the services keep answering and scheduling, and a certificate
//! from the old CA is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Lab, eventually, lossy, ps, require_root, visit};
use shoal_cluster::pki::{
    NodeIdentity, cert_der_from_pem, certs_from_pem, issuer_index, validity_of,
};
use shoal_cluster::transport::Transport;
use shoal_cluster::wire::{Request, Response, TaskRequest};

const PORT: u16 = 8471;
const HOUR: i64 = 3600;

/// The credentials a lab node holds on disk now.
fn identity_of(lab: &Lab, node: &str) -> NodeIdentity {
    let state = shoal::lab::LabState::load(&lab.name).expect("lab state");
    let dir = state.node(node).expect("lab node").data_dir.join("swarm");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("swarm file");
    NodeIdentity::from_pem(read("node-key.pem"), read("node-cert.pem"), read("ca.pem"))
        .expect("identity")
}

/// How long a node's certificate is valid, in hours (it is backdated by one).
fn validity_hours(lab: &Lab, node: &str) -> i64 {
    let id = identity_of(lab, node);
    let (from, to) = validity_of(&cert_der_from_pem(&id.cert_pem).unwrap()).unwrap();
    (to - from) / HOUR
}

/// Reads the store as `id` would, from this host to node1's control address.
fn read_store_as(lab: &Lab, id: &NodeIdentity) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = std::net::SocketAddr::new(lab.addr(1).into(), 2377);
    rt.block_on(async {
        let t = Transport::bind("0.0.0.0:0".parse().unwrap(), id).map_err(|e| e.to_string())?;
        let r = t.call(addr, &Request::Tasks(TaskRequest::State), Duration::from_secs(5)).await;
        t.close().await;
        match r {
            Ok(Response::State(_)) => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
}

#[test]
fn certificates_follow_the_expiry_and_a_ca_rotation_keeps_the_swarm_working() {
    if !require_root("certificates_follow_the_expiry_and_a_ca_rotation_keeps_the_swarm_working") {
        return;
    }
    let lab = Lab::up(3);
    lab.on("node1", &["swarm", "init", "--cert-expiry", "2160h"]);
    let manager = format!("{}:2377", lab.addr(1));
    let mtoken = lab.on("node1", &["swarm", "join-token", "-q", "manager"]);
    lab.on("node2", &["swarm", "join", "--token", mtoken.trim(), &manager]);
    let wtoken = lab.on("node1", &["swarm", "join-token", "-q", "worker"]);
    lab.on("node3", &["swarm", "join", "--token", wtoken.trim(), &manager]);
    for node in ["node1", "node2", "node3"] {
        assert_eq!(validity_hours(&lab, node), 2161, "{node}'s certificate lives 2160h");
    }

    // Bad input is refused with its reason and changes nothing.
    let e = lab.refused("node1", &["swarm", "update", "--cert-expiry", "90d"]);
    assert!(e.contains("--cert-expiry: invalid duration \"90d\""), "{e}");
    let e = lab.refused("node1", &["swarm", "update", "--cert-expiry", "10m"]);
    assert!(e.contains("--cert-expiry 10m is out of range"), "{e}");
    let e = lab.refused("node1", &["swarm", "update", "--gossip-key-rotation", "5s"]);
    assert!(e.contains("at least 1m"), "{e}");
    let e = lab.refused("node3", &["swarm", "update", "--cert-expiry", "24h"]);
    assert!(e.contains("not a swarm manager"), "a worker updates the swarm: {e}");
    let e = lab.refused("node3", &["swarm", "ca", "--rotate"]);
    assert!(e.contains("not a swarm manager"), "a worker rotates the CA: {e}");
    std::thread::sleep(Duration::from_secs(2));
    for node in ["node1", "node2", "node3"] {
        assert_eq!(validity_hours(&lab, node), 2161, "{node} kept its certificate");
    }

    // A shorter expiry: every node renews at its next heartbeat.
    lab.on("node2", &["swarm", "update", "--cert-expiry", "24h"]);
    for node in ["node1", "node2", "node3"] {
        eventually(&format!("{node} renews for 24h"), Duration::from_secs(60), || {
            (validity_hours(&lab, node) == 25).then_some(())
        });
    }

    // A service on the worker, reached through the mesh.
    let out = lab.create_visitor("web", PORT, &["--constraint", "node.hostname==node3"]);
    assert!(out.contains("converged"), "{out}");
    eventually("the mesh reaches web", Duration::from_secs(60), || {
        visit(&lab, 1, PORT).contains("Hello World").then_some(())
    });

    // The rotation.
    let old_ca = lab.on("node1", &["swarm", "ca"]);
    let old_worker = identity_of(&lab, "node3");
    read_store_as(&lab, &old_worker).expect("the worker's certificate before the rotation");
    let rotate = lab.shoal(&["--node", "node1", "swarm", "ca", "--rotate"]);
    assert!(rotate.status.success(), "swarm ca --rotate: {}", lossy(&rotate.stderr));
    assert!(lossy(&rotate.stderr).is_empty(), "warnings: {}", lossy(&rotate.stderr));
    let new_ca = lossy(&rotate.stdout);
    assert!(new_ca.starts_with("-----BEGIN CERTIFICATE-----"), "{new_ca}");
    assert_ne!(new_ca, old_ca, "a new CA");
    assert_eq!(lab.on("node2", &["swarm", "ca"]), new_ca, "every manager prints the new CA");
    let new_der = cert_der_from_pem(&new_ca).unwrap();
    for node in ["node1", "node2", "node3"] {
        eventually(
            &format!("{node} trusts only the new CA and holds a certificate from it"),
            Duration::from_secs(60),
            || {
                let id = identity_of(&lab, node);
                let cas = certs_from_pem(&id.ca_pem);
                let cert = cert_der_from_pem(&id.cert_pem).ok()?;
                (cas == [new_der.clone()] && issuer_index(&cert, &cas) == Some(0)).then_some(())
            },
        );
        assert_eq!(validity_hours(&lab, node), 25, "{node}'s new certificate keeps the expiry");
    }
    let e = read_store_as(&lab, &old_worker).expect_err("a certificate from the old CA");
    eprintln!("the old CA's certificate: {e}");
    read_store_as(&lab, &identity_of(&lab, "node3")).expect("the worker's new certificate");
    let new_token = lab.on("node1", &["swarm", "join-token", "-q", "worker"]);
    assert_ne!(new_token, wtoken, "the join token names the new CA");

    // The swarm still works: the service answers, a new one schedules on every node, and
    // `node ls` sees everyone Ready.
    eventually("the mesh still reaches web", Duration::from_secs(60), || {
        visit(&lab, 2, PORT).contains("Hello World").then_some(())
    });
    let out = lab.on(
        "node1",
        &["service", "create", "--mode", "global", "--name", "g", "--", "sleep", "100000"],
    );
    assert!(out.contains("converged"), "{out}");
    let running = ps(&lab, "g").iter().filter(|t| t.state == "Running").count();
    assert_eq!(running, 3, "a task on each node after the rotation");
    let nodes = lab.on("node1", &["node", "ls"]);
    assert_eq!(nodes.matches("Ready").count(), 3, "{nodes}");
    let metrics = lab.metrics("node1");
    for counter in ["shoal_raft_refused_total", "shoal_untrusted_ca_refused_total"] {
        assert!(metrics.contains(counter), "{counter} on /metrics");
    }
}
