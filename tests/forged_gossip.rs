//! A member of gossip that holds the swarm's key (read from a node's data dir, as a thief
//! would) and lies: it claims to be node2 with its own address and WireGuard key, overwrites
//! node2's endpoint records with another address, and publishes a record of node2's task on a
//! network the task is not on. DNS, the mesh's backends, the VIP rules and node1's WireGuard
//! peer for node2 stay what the store says, and node1 counts what it dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::{Lab, dig, eventually, lossy, ps, require_root, task_netns, visit};
use shoal_gossip::{EntryKey, Gossip, GossipConfig, NodeId, NodeMeta};

const PORT: u16 = 8320;
const TABLE: &str = "endpoint_table";

fn json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&lab.on("node1", args)).unwrap()
}

/// What node1's data path holds for `web`: DNS from the probe task, the mesh's backend
/// addresses, the VIP rules in the probe task, and its WireGuard peers on `secnet`.
#[derive(Debug, PartialEq, Eq)]
struct View {
    tasks_web: BTreeSet<String>,
    vip: String,
    mesh: BTreeSet<String>,
    /// The addresses in the probe task's nf_tables rules (its VIPs and their backends).
    nft: BTreeSet<std::net::Ipv4Addr>,
    peers: Vec<(String, String, String)>,
}

fn view(lab: &Lab, probe_ns: &str) -> View {
    let mesh = lab
        .metrics("node1")
        .lines()
        .filter(|l| l.starts_with("shoal_mesh_backend_up{") && l.contains("service=\"web\""))
        .filter_map(|l| l.split("addr=\"").nth(1).and_then(|r| r.split('"').next()))
        .map(str::to_owned)
        .collect();
    let nft =
        Command::new("ip").args(["netns", "exec", probe_ns, "nft", "list", "ruleset"]).output();
    let inspect = json(lab, &["network", "inspect", "secnet"]);
    let peers = inspect[0]["local"]["encrypted_peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                    (s("node"), s("endpoint"), s("public_key"))
                })
                .collect()
        })
        .unwrap_or_default();
    View {
        tasks_web: dig(probe_ns, "tasks.web").lines().map(str::to_owned).collect(),
        vip: dig(probe_ns, "web"),
        mesh,
        nft: nft
            .map(|o| lossy(&o.stdout))
            .unwrap_or_default()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter_map(|w| w.parse().ok())
            .collect(),
        peers,
    }
}

#[test]
fn a_member_with_the_gossip_key_cannot_redirect_another_node_s_traffic() {
    if !require_root("a_member_with_the_gossip_key_cannot_redirect_another_node_s_traffic") {
        return;
    }
    for bin in ["dig", "curl", "nft"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {bin}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            assert!(std::env::var_os("CI").is_none(), "{bin} is needed in CI");
            eprintln!("*** SKIPPED forged gossip test: {bin} missing ***");
            return;
        }
    }
    let lab = Lab::up(2);
    lab.swarm(2);
    let shoal = env!("CARGO_BIN_EXE_shoal");
    lab.on("node1", &["network", "create", "--opt", "encrypted", "secnet"]);
    lab.on("node1", &["network", "create", "othernet"]);
    let listen = format!("0.0.0.0:{PORT}");
    let published = format!("{PORT}:{PORT}");
    let out = lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "secnet",
            "-p",
            &published,
            "--constraint",
            "node.hostname==node2",
            "--",
            shoal,
            "demo",
            "visitor",
            "--listen",
            &listen,
        ],
    );
    assert!(out.contains("converged"), "{out}");
    let out = lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "probe",
            "--network",
            "secnet",
            "--network",
            "othernet",
            "--constraint",
            "node.hostname==node1",
            "--",
            "sleep",
            "100000",
        ],
    );
    assert!(out.contains("converged"), "{out}");
    let probe = ps(&lab, "probe").into_iter().find(|t| t.state == "Running").unwrap();
    let probe_ns = task_netns(&lab, "node1", &probe.id);

    // The store holds node2's WireGuard key, which it said itself over its session.
    let node2 = eventually("node2's WireGuard key in its record", Duration::from_secs(30), || {
        let n = json(&lab, &["node", "inspect", "node2"]);
        n[0]["wg_public_key"].is_array().then_some(n)
    });
    let node2_id = shoal_cluster::NodeId(node2[0]["id"].as_u64().expect("node id")).to_string();
    let key = &node2[0]["wg_public_key"];
    assert_eq!(key.as_array().map(Vec::len), Some(32), "node2's record has its key: {node2}");

    // Everything works before the lie: the encrypted peer is up, names resolve, the mesh and
    // the VIP reach the task on node2.
    eventually("the mesh on node1", Duration::from_secs(60), || {
        visit(&lab, 1, PORT).contains("Hello World").then_some(())
    });
    let before = eventually("node1's data path for web", Duration::from_secs(60), || {
        let v = view(&lab, &probe_ns);
        let in_rules = |ip: &str| ip.parse().is_ok_and(|ip| v.nft.contains(&ip));
        let ready = v.tasks_web.len() == 1
            && in_rules(&v.vip)
            && v.tasks_web.iter().all(|ip| in_rules(ip))
            && v.mesh.len() == 1
            && v.peers.len() == 1
            && curl_vip(&probe_ns, &v.vip);
        ready.then_some(v)
    });
    eprintln!("before: {before:?}");

    // The thief: gossip on the host's lab address with the swarm's key from node1's files.
    let node_file = shoal::lab::LabState::load(&lab.name)
        .unwrap()
        .node("node1")
        .unwrap()
        .data_dir
        .join("swarm/node.json");
    let local: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(node_file).unwrap()).unwrap();
    let keys: Vec<[u8; 32]> = local["keyring"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| serde_json::from_value(k["key"].clone()).unwrap())
        .collect();
    let network_id = |name: &str| {
        let v = json(&lab, &["network", "inspect", name]);
        v[0]["network"]["id"].as_str().or(v[0]["id"].as_str()).unwrap().to_owned()
    };
    let (secnet, othernet, ingress) =
        (network_id("secnet"), network_id("othernet"), network_id("ingress"));
    let host: IpAddr = shoal::lab::LabState::load(&lab.name).unwrap().host_addr.into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bogus: [u8; 32] = [7; 32];
    let rogue = rt.block_on(async {
        let mut cfg =
            GossipConfig::new(NodeId::from_name("rogue"), SocketAddr::new(host, 0), keys[0]);
        cfg.bind = SocketAddr::new(host, 0);
        cfg.keys = keys.clone();
        cfg.seeds = vec![SocketAddr::new(lab.addr(1).into(), 7946)];
        cfg.meta = NodeMeta {
            id: node2_id.clone(),
            name: "node2".into(),
            underlay: Some(host),
            wg_public_key: Some(bogus),
            ..NodeMeta::default()
        };
        cfg.networks = vec![secnet.clone(), othernet.clone(), ingress.clone()];
        Gossip::start(cfg).await.unwrap()
    });
    // It learns node2's records of its web task, as every member does ...
    let theirs = eventually("the rogue holding web's endpoints", Duration::from_secs(30), || {
        let snap = rogue.snapshot();
        let eps: Vec<(EntryKey, serde_json::Value)> = snap
            .entries
            .iter()
            .filter(|(k, _, _)| k.table == TABLE && (k.network == secnet || k.network == ingress))
            .filter_map(|(k, _, v)| {
                let e: serde_json::Value = serde_json::from_slice(v).ok()?;
                (e["node"] == node2_id.as_str() && !e["task"].as_str()?.is_empty())
                    .then(|| (k.clone(), e))
            })
            .collect();
        (eps.len() == 2).then_some(eps)
    });
    // ... and lies about them: the task's address is now one of its choosing, on both networks,
    // and the task is on a network it is not on.
    rt.block_on(async {
        for (k, e) in &theirs {
            let mut forged = e.clone();
            forged["ip"] = "10.0.0.250".into();
            rogue.write(k.clone(), serde_json::to_vec(&forged).unwrap()).await.unwrap();
        }
        let (k, e) = &theirs[0];
        let elsewhere = EntryKey::new(TABLE, &othernet, &k.key);
        rogue.write(elsewhere, serde_json::to_vec(e).unwrap()).await.unwrap();
    });

    // node1 refuses all of it, and counts it.
    eventually("node1 counting the forged claims", Duration::from_secs(30), || {
        let (peer, endpoint, overwrite) = (
            lab.metric("node1", "shoal_gossip_claims_dropped_total{kind=\"peer\"}").unwrap_or(0),
            lab.metric("node1", "shoal_gossip_claims_dropped_total{kind=\"endpoint\"}")
                .unwrap_or(0),
            lab.metric("node1", "shoal_gossip_dropped_total{reason=\"not_owner\"}").unwrap_or(0),
        );
        eprintln!("dropped: {peer} peer, {endpoint} endpoint, {overwrite} overwrites");
        (peer >= 1 && endpoint >= 1 && overwrite >= 1).then_some(())
    });
    // A few more gossip rounds for anything that would still get through.
    std::thread::sleep(Duration::from_secs(3));
    let after = view(&lab, &probe_ns);
    assert_eq!(after, before, "node1's data path changed after forged gossip");
    let forged: std::net::Ipv4Addr = "10.0.0.250".parse().unwrap();
    assert!(!after.nft.contains(&forged) && !after.tasks_web.contains("10.0.0.250"));
    assert!(visit(&lab, 1, PORT).contains("Hello World"), "the mesh still reaches the task");
    assert!(curl_vip(&probe_ns, &after.vip), "the VIP still reaches the task");
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(3), rogue.leave()).await;
    });
}

/// Whether the probe task reaches `web` through its VIP.
fn curl_vip(probe_ns: &str, vip: &str) -> bool {
    let url = format!("http://{vip}:{PORT}/visitor");
    let out = Command::new("ip")
        .args(["netns", "exec", probe_ns, "curl", "-s", "-m", "5", &url])
        .output()
        .unwrap();
    lossy(&out.stdout).contains("Hello World")
}
