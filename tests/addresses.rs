//! The operator's addresses, end to end on real agents in the lab: nodes with a control and a
//! data underlay, `swarm init/join --advertise-addr <control> --data-path-addr <data>
//! --data-path-port 4790`, a service on a plain and an encrypted network across three nodes
//! (mesh, DNS, task to task), and a capture on both bridges showing VXLAN (udp 4790) and
//! WireGuard only on the data bridge and nothing on 4789. WireGuard's TUN exists only while a
//! task of an encrypted network runs on the node. Bad flags are refused and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::capture::{capture, count};
use common::{Lab, dig, eventually, lossy, ps, require_root, shoal, task_netns, visit};

/// A lab whose nodes also have `eth1` on a second bridge; returns it and the data subnet.
fn lab_with_data_underlay(nodes: u8) -> (Lab, ipnet::Ipv4Net) {
    let name = shoal_netns::testing::unique_prefix("a");
    let seed: u32 = name.bytes().fold(11u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let mut last = String::new();
    for attempt in 0..8u32 {
        let third = 1 + (seed.wrapping_add(attempt.wrapping_mul(89)) % 250);
        let subnet: ipnet::Ipv4Net = format!("198.18.{third}.0/24").parse().unwrap();
        let data: ipnet::Ipv4Net = format!("198.19.{third}.0/24").parse().unwrap();
        // The guard exists before `up`, so a half-made lab is removed too.
        let lab = Lab { name: name.clone(), subnet };
        let out = shoal()
            .args(["lab", "up", "--lab", &name, "--nodes", &nodes.to_string()])
            .args(["--subnet", &subnet.to_string(), "--data-subnet", &data.to_string()])
            .output()
            .expect("running shoal lab up");
        if out.status.success() {
            return (lab, data);
        }
        last = lossy(&out.stderr);
        if !last.contains("already") {
            break;
        }
    }
    panic!("lab up failed: {last}");
}

fn has_tun(lab: &Lab, node: &str) -> bool {
    lab.exec(node, &["ip", "link", "show", "shoal-wg"]).status.success()
}

#[test]
fn data_path_follows_the_operators_addresses() {
    if !require_root("data_path_follows_the_operators_addresses") {
        return;
    }
    for bin in ["tcpdump", "curl", "dig"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(std::env::var_os("CI").is_none(), "{bin} is needed in CI");
            eprintln!("*** SKIPPED addresses test: {bin} missing ***");
            return;
        }
    }
    let (lab, data) = lab_with_data_underlay(3);
    let data_addr = |i: u8| std::net::Ipv4Addr::from(u32::from(data.network()) + u32::from(i));
    let shoal_exe = env!("CARGO_BIN_EXE_shoal");
    let refused = |args: &[&str], want: &str| {
        let out = lab.shoal(&[&["--node", "node1", "swarm", "init"], args].concat());
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    };

    // Bad flags: Docker's words, and nothing changes (the node is still outside any swarm).
    refused(
        &["--data-path-port", "80"],
        "Datapath port number is not in valid range (1024-49151) : 80",
    );
    refused(
        &["--advertise-addr", "nosuch0"],
        "advertise address must be a non-zero IP address or network interface",
    );
    refused(
        &["--listen-addr", "nosuch0"],
        "listen address must be an IP address or network interface",
    );
    refused(
        &["--data-path-addr", "eth1:4789"],
        "data path address must be a non-zero IP address or network interface (without a port number)",
    );
    refused(&["--data-path-addr", "203.0.113.7"], "203.0.113.7 is not an address of this host");
    refused(&["--data-path-port", "7946"], "also this node's gossip port");
    refused(&["--data-path-port", "2377"], "also this node's control port");
    let not_in_swarm = lab.shoal(&["--node", "node1", "node", "ls"]);
    assert!(lossy(&not_in_swarm.stderr).contains("not a swarm manager"), "{not_in_swarm:?}");

    // init on node1 by addresses; node2 joins by interface names, node3 by addresses.
    let ctl1 = lab.addr(1).to_string();
    lab.on(
        "node1",
        &[
            "swarm",
            "init",
            "--advertise-addr",
            &ctl1,
            "--data-path-addr",
            &data_addr(1).to_string(),
            "--data-path-port",
            "4790",
        ],
    );
    assert!(!has_tun(&lab, "node1"), "no WireGuard TUN without an encrypted network");
    let token = lab.on("node1", &["swarm", "join-token", "-q", "worker"]);
    let manager = format!("{ctl1}:2377");
    let join = |node: &str, adv: &str, data: &str| {
        let args = ["swarm", "join", "--token", token.trim(), "--advertise-addr", adv];
        lab.on(node, &[&args[..], &["--data-path-addr", data, &manager]].concat());
    };
    join("node2", "eth0", "eth1");
    join("node3", &lab.addr(3).to_string(), &data_addr(3).to_string());
    for i in 1..=3u8 {
        let info = lab.on(&format!("node{i}"), &["info"]);
        assert!(info.contains(&format!("Advertise addr:  {}", lab.addr(i))), "{info}");
        assert!(info.contains(&format!("Data path addr:  {}", data_addr(i))), "{info}");
        assert!(info.contains("data path 4790/udp"), "the swarm's port on node{i}: {info}");
    }

    let dir = tempfile::tempdir().unwrap();
    let (on_ctl, on_data) = (dir.path().join("control.pcap"), dir.path().join("data.pcap"));
    let captures = [
        capture(&format!("{}-br", lab.name), &on_ctl),
        capture(&format!("{}-bd", lab.name), &on_data),
    ];

    lab.on("node1", &["network", "create", "plainnet"]);
    lab.on("node1", &["network", "create", "--opt", "encrypted", "secnet"]);
    let out = lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "plainnet",
            "--network",
            "secnet",
            "-p",
            "8310:8310",
            "--",
            shoal_exe,
            "demo",
            "visitor",
            "--listen",
            "0.0.0.0:8310",
        ],
    );
    assert!(out.contains("converged"), "{out}");
    let tasks: Vec<_> = ps(&lab, "web").into_iter().filter(|t| t.state == "Running").collect();
    let nodes: std::collections::BTreeSet<&str> = tasks.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "a task on every node: {tasks:?}");
    for i in 1..=3 {
        assert!(has_tun(&lab, &format!("node{i}")), "node{i} runs an encrypted task: TUN up");
    }

    // The routing mesh on every node's control address.
    for n in 1..=3 {
        eventually("the mesh on every node", Duration::from_secs(30), || {
            visit(&lab, n, 8310).contains("Hello World").then_some(())
        });
    }
    // DNS and task-to-task traffic across nodes, on the plain and on the encrypted network.
    let listing = lab.on("node1", &["service", "ps", "web"]);
    let addrs = |net: &str| -> Vec<String> {
        let prefix = format!("{net}=");
        listing
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter_map(|w| w.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    };
    let web1 = tasks.iter().find(|t| t.node == "node1").unwrap();
    let ns1 = task_netns(&lab, "node1", &web1.id);
    eventually("tasks.web lists three tasks", Duration::from_secs(30), || {
        (dig(&ns1, "tasks.web").lines().count() == 3).then_some(())
    });
    for net in ["plainnet", "secnet"] {
        let ips = addrs(net);
        assert_eq!(ips.len(), 3, "{net}: {listing}");
        for ip in &ips {
            let url = format!("http://{ip}:8310/visitor");
            eventually(&format!("{url} from node1's task"), Duration::from_secs(60), || {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns1, "curl", "-s", "-m", "5", &url])
                    .output()
                    .unwrap();
                lossy(&out.stdout).contains("Hello World").then_some(())
            });
        }
    }
    // `network inspect` prints a JSON array, one object per name (as Docker's).
    let inspect: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        &lab.on("node1", &["network", "inspect", "secnet"]),
    )
    .unwrap()[0]
        .clone();
    let peers = inspect["local"]["encrypted_peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2, "{inspect}");
    for p in peers {
        assert!(p["established"] == true, "{inspect}");
        let endpoint = p["endpoint"].as_str().unwrap();
        assert!(endpoint.starts_with("198.19.") && endpoint.ends_with(":51820"), "{inspect}");
    }

    // What went over which wire. tcpdump writes each packet as it reads it but may lag behind
    // the kernel on a busy machine, and what it has not read when stopped is lost: wait until
    // the encrypted curls above show in the file before stopping it.
    eventually("the data bridge's capture to catch up", Duration::from_secs(30), || {
        (count(&on_data, "udp port 51820") > 0 && count(&on_data, "udp port 4790") > 0)
            .then_some(())
    });
    drop(captures);
    let vxlan_data = count(&on_data, "udp port 4790");
    let wg_data = count(&on_data, "udp port 51820");
    eprintln!("data bridge: {vxlan_data} VXLAN (4790) and {wg_data} WireGuard packets");
    assert!(vxlan_data > 0 && wg_data > 0, "no data-path traffic on the data bridge");
    assert_eq!(
        count(&on_ctl, "udp port 4790 or udp port 51820"),
        0,
        "data path on the control bridge"
    );
    assert_eq!(count(&on_ctl, "udp port 4789") + count(&on_data, "udp port 4789"), 0, "udp 4789");
    assert!(count(&on_ctl, "udp port 2377") > 0, "the control plane stays on the control bridge");
    assert_eq!(count(&on_data, "udp port 2377 or udp port 7946"), 0, "control on the data bridge");

    // The TUN goes once the encrypted network's tasks have left the node.
    lab.on("node1", &["service", "rm", "web"]);
    for i in 1..=3 {
        let node = format!("node{i}");
        eventually(&format!("{node}'s TUN removed"), Duration::from_secs(30), || {
            (!has_tun(&lab, &node)).then_some(())
        });
    }
    // It is per node: only the node running a task of the encrypted network has one.
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "one",
            "--network",
            "secnet",
            "--constraint",
            "node.hostname==node3",
            "--",
            "sleep",
            "100000",
        ],
    );
    eventually("node3's TUN", Duration::from_secs(30), || has_tun(&lab, "node3").then_some(()));
    assert!(!has_tun(&lab, "node1") && !has_tun(&lab, "node2"));
    lab.on("node1", &["service", "rm", "one"]);
    eventually("node3's TUN removed", Duration::from_secs(30), || {
        (!has_tun(&lab, "node3")).then_some(())
    });

    // A restarted agent keeps the addresses the node joined with.
    let out = lab.shoal(&["lab", "stop", "node2"]);
    assert!(out.status.success(), "{out:?}");
    let out = lab.shoal(&["lab", "start", "node2"]);
    assert!(out.status.success(), "{out:?}");
    let info = eventually("node2 back in the swarm", Duration::from_secs(30), || {
        Some(lab.on("node2", &["info"])).filter(|i| i.contains("Data path addr"))
    });
    assert!(info.contains(&format!("Data path addr:  {}", data_addr(2))), "{info}");
    assert!(info.contains("data path 4790/udp"), "{info}");
    assert!(!has_tun(&lab, "node2"));
}
