//! The lab, as root: nodes come up with their own agents, answer on their own sockets with their
//! own names and addresses, and `lab down` leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Lab, lossy, require_root, shoal};
use shoal::api::NodeInfo;

fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let ns =
        lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout);
    found.extend(
        ns.lines().filter(|l| l.starts_with(&format!("{name}-"))).map(|l| format!("netns {l}")),
    );
    let links =
        lossy(&std::process::Command::new("ip").args(["-o", "link"]).output().unwrap().stdout);
    found.extend(
        links.lines().filter(|l| l.contains(&format!(" {name}-"))).map(|l| format!("link {l}")),
    );
    let procs = lossy(
        &std::process::Command::new("pgrep")
            .args(["-af", &format!("/run/shoal/lab/{name}/")])
            .output()
            .unwrap()
            .stdout,
    );
    found.extend(procs.lines().map(|l| format!("process {l}")));
    let dir = shoal::lab::lab_dir(name);
    if dir.exists() {
        found.push(format!("dir {}", dir.display()));
    }
    found
}

#[test]
fn three_node_lab_answers_and_leaves_nothing() {
    if !require_root("three_node_lab_answers_and_leaves_nothing") {
        return;
    }
    let lab = Lab::up(3);
    for i in 1..=3u8 {
        let node = format!("node{i}");
        let info: NodeInfo = serde_json::from_str(&lab.on(&node, &["info", "--json"])).unwrap();
        assert_eq!(info.node_name, node);
        assert_eq!(info.advertise_addr, Some(std::net::IpAddr::V4(lab.addr(i))));
        // The text form too, as a person reads it.
        assert!(lab.on(&node, &["info"]).contains(&format!("Node:            {node}")));
    }
    // The host reaches each node over the bridge: a closed port answers with a reset at once
    // (a missing route would time out instead).
    for i in 1..=3u8 {
        let err = TcpStream::connect_timeout(
            &SocketAddr::new(lab.addr(i).into(), 9),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "node{i}: {err}");
    }
    // Nodes reach each other, and see only their own address.
    let out = lab.exec("node2", &["sh", "-c", "ip -o -4 addr show dev eth0"]);
    assert!(lossy(&out.stdout).contains(&format!("{}/24", lab.addr(2))), "{}", lossy(&out.stdout));
    // No route out of the machine: a node has no default route.
    let routes = lossy(&lab.exec("node1", &["ip", "route", "show", "default"]).stdout);
    assert!(routes.trim().is_empty(), "node has a default route: {routes}");
    // exec passes the exit code through.
    assert_eq!(lab.exec("node1", &["sh", "-c", "exit 7"]).status.code(), Some(7));

    let status = lossy(&lab.shoal(&["lab", "status"]).stdout);
    assert_eq!(status.matches(" up ").count(), 3, "{status}");

    let name = lab.name.clone();
    assert!(!leftovers(&name).is_empty(), "the check must see a live lab");
    drop(lab);
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn down_cleans_a_lab_whose_agents_crashed() {
    if !require_root("down_cleans_a_lab_whose_agents_crashed") {
        return;
    }
    let lab = Lab::up(2);
    let state = shoal::lab::LabState::load(&lab.name).unwrap();
    for n in &state.nodes {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(n.pid.unwrap() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    // A stray process inside a node must go too.
    let mut stray = shoal()
        .args(["--lab", &lab.name, "lab", "exec", "node1", "--", "sleep", "600"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = lossy(&lab.shoal(&["lab", "status"]).stdout);
    assert_eq!(status.matches("dead").count(), 2, "{status}");
    let name = lab.name.clone();
    drop(lab);
    let _ = stray.wait();
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn a_node_agent_stops_and_starts_again() {
    if !require_root("a_node_agent_stops_and_starts_again") {
        return;
    }
    let lab = Lab::up(2);
    let before: NodeInfo = serde_json::from_str(&lab.on("node2", &["info", "--json"])).unwrap();
    assert!(lab.shoal(&["lab", "stop", "node2", "--kill"]).status.success());
    let out = shoal().args(["--lab", &lab.name, "--node", "node2", "info"]).output().unwrap();
    assert!(!out.status.success(), "a killed agent must not answer");
    // A crash leaves the socket file behind; the new agent replaces it.
    assert!(lab.shoal(&["lab", "start", "node2"]).status.success());
    let after: NodeInfo = serde_json::from_str(&lab.on("node2", &["info", "--json"])).unwrap();
    assert_ne!(before.pid, after.pid);
    assert_eq!(after.node_name, "node2");
    let again = lab.shoal(&["lab", "start", "node2"]);
    assert!(lossy(&again.stderr).contains("already running"), "{}", lossy(&again.stderr));
    assert!(lab.shoal(&["lab", "stop", "node1"]).status.success());
    let status = lossy(&lab.shoal(&["lab", "status"]).stdout);
    assert!(status.contains("dead"), "{status}");
}

#[test]
fn two_labs_coexist() {
    if !require_root("two_labs_coexist") {
        return;
    }
    let a = Lab::up(2);
    let b = Lab::up(2);
    assert_ne!(a.subnet, b.subnet);
    let ia: NodeInfo = serde_json::from_str(&a.on("node1", &["info", "--json"])).unwrap();
    let ib: NodeInfo = serde_json::from_str(&b.on("node1", &["info", "--json"])).unwrap();
    assert_eq!(ia.advertise_addr, Some(std::net::IpAddr::V4(a.addr(1))));
    assert_eq!(ib.advertise_addr, Some(std::net::IpAddr::V4(b.addr(1))));
    // The same subnet twice is refused and leaves nothing behind.
    let clash =
        shoal::lab::validate_name("zz").map(|_| shoal_netns::testing::unique_prefix("z")).unwrap();
    let out = shoal()
        .args(["lab", "up", "--lab", &clash, "--nodes", "1", "--subnet", &a.subnet.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(lossy(&out.stderr).contains("already used"), "{}", lossy(&out.stderr));
    assert_eq!(leftovers(&clash), Vec::<String>::new());
    // Taking one down leaves the other running.
    let a_name = a.name.clone();
    drop(a);
    assert_eq!(leftovers(&a_name), Vec::<String>::new());
    let again: NodeInfo = serde_json::from_str(&b.on("node2", &["info", "--json"])).unwrap();
    assert_eq!(again.node_name, "node2");
}

#[test]
fn lab_rejects_bad_arguments() {
    // Argument checks come before the root check, so these run everywhere.
    for (args, needle) in [
        (vec!["lab", "up", "--lab", "Bad_Name"], "invalid lab name"),
        (vec!["lab", "up", "--lab", "okname", "--subnet", "10.1.2.0/24"], "198.18.0.0/15"),
        (vec!["lab", "up", "--lab", "okname", "--nodes", "0"], "1 to 64"),
    ] {
        let out = shoal().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
