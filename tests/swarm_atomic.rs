//! A `swarm init` or `swarm join` that fails changes nothing, through the CLI on real lab agents:
//! whatever the cause (a listen address that cannot be bound, an advertise address the IPv4 data
//! path cannot use (IPv6, or on no link of the host), a bad token, an unreachable manager, the
//! gossip port taken once the control plane was made), the error says why, the agent keeps answering outside any swarm, no swarm
//! state is on disk and nothing of it runs (ports free, no ingress sandbox, no WireGuard TUN),
//! the agent restarts fine, and the corrected command then works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, run_ok, shoal};
use shoal::api::NodeInfo;
use shoal_netns::NetNs;

fn netns(lab: &Lab, node: &str) -> NetNs {
    NetNs::open(&format!("{}-{node}", lab.name)).unwrap()
}

/// Binds the gossip port's TCP side on every address of a node, as another program on that
/// host would: gossip starts after the control plane has written the node's swarm state.
fn hold_gossip_tcp(lab: &Lab, node: &str) -> TcpListener {
    netns(lab, node).run(|| TcpListener::bind(("0.0.0.0", 7946))).unwrap().unwrap()
}

/// The node is outside any swarm and nothing of a swarm is left: the agent answers, no swarm
/// state in its data dir, control-plane and gossip ports free, no ingress sandbox, no WireGuard
/// TUN (its port may be the one the test holds).
fn assert_outside(lab: &Lab, node: &str) {
    let info: NodeInfo = serde_json::from_str(&lab.on(node, &["info", "--json"])).unwrap();
    assert!(info.swarm.is_none() && info.gossip.is_none(), "{node}: {info:?}");
    let swarm_dir = std::path::Path::new(&info.data_dir).join("swarm");
    assert!(!swarm_dir.exists(), "{} is left on disk", swarm_dir.display());
    let free = netns(lab, node)
        .run(|| {
            UdpSocket::bind("0.0.0.0:2377").is_ok()
                && UdpSocket::bind("0.0.0.0:7946").is_ok()
                && TcpListener::bind("0.0.0.0:7946").is_ok()
        })
        .unwrap();
    assert!(free, "{node}: a swarm port is still bound");
    assert!(!NetNs::exists(&format!("{}-{node}-ingress", lab.name)), "{node}: ingress sandbox");
    let links = lossy(&lab.exec(node, &["ip", "-o", "link"]).stdout);
    assert!(!links.contains("shoal-wg"), "{node}: {links}");
}

fn restart(lab: &Lab, node: &str) {
    run_ok(shoal().args(["--lab", &lab.name, "lab", "stop", node]));
    run_ok(shoal().args(["--lab", &lab.name, "lab", "start", node]));
}

/// An agent started by hand in a lab node (in place of the lab's), killed on drop.
struct HandAgent(Child);

impl Drop for HandAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_failed_init_or_join_changes_nothing() {
    if !require_root("a_failed_init_or_join_changes_nothing") {
        return;
    }
    let lab = Lab::up(2);
    let manager = format!("{}:2377", lab.addr(1));
    // In the lab's subnet, on no node: nothing answers there and nothing can bind it.
    let nowhere = lab.addr(200);

    // A listen address this host does not have.
    let listen = format!("{nowhere}:2377");
    let err = lab.refused("node1", &["swarm", "init", "--listen-addr", &listen]);
    assert!(err.contains(&listen), "{err}");
    assert_outside(&lab, "node1");

    // Gossip cannot start (another program holds its TCP port) after the control plane and its
    // certificates were already made: all of it is undone.
    let held = hold_gossip_tcp(&lab, "node1");
    let err = lab.refused("node1", &["swarm", "init"]);
    assert!(err.contains("gossip") && err.contains("still outside any swarm"), "{err}");
    drop(held);
    assert_outside(&lab, "node1");
    restart(&lab, "node1");
    assert_outside(&lab, "node1");
    assert!(lab.on("node1", &["swarm", "init"]).contains("Swarm initialized"));
    let token = lab.on("node1", &["swarm", "join-token", "-q", "worker"]);
    let token = token.trim();

    // A node in a swarm whose gossip cannot start at a restart: the agent exits (a supervisor
    // retries) saying what to do, and starts once the cause is gone, still in its swarm.
    run_ok(shoal().args(["--lab", &lab.name, "lab", "stop", "node1"]));
    let held = hold_gossip_tcp(&lab, "node1");
    let out = shoal().args(["--lab", &lab.name, "lab", "start", "node1"]).output().unwrap();
    assert!(!out.status.success());
    // The agent's own last word, in its log (the lab prints only the log's last lines, which
    // may be Raft's shutdown).
    let state = shoal::lab::LabState::load(&lab.name).unwrap();
    let log = std::fs::read_to_string(&state.node("node1").unwrap().log).unwrap();
    let err = log.lines().rfind(|l| l.contains("cannot start its part of it"));
    assert!(err.is_some_and(|e| e.contains("gossip")), "{log}");
    drop(held);
    run_ok(shoal().args(["--lab", &lab.name, "lab", "start", "node1"]));
    let info: NodeInfo = serde_json::from_str(&lab.on("node1", &["info", "--json"])).unwrap();
    assert!(info.swarm.is_some(), "{info:?}");

    // Joins that never get in: a token that is not one, a manager that is not there.
    let err = lab.refused("node2", &["swarm", "join", "--token", "SWMTKN-1-nonsense", &manager]);
    assert!(err.to_lowercase().contains("token"), "{err}");
    assert_outside(&lab, "node2");
    let err =
        lab.refused("node2", &["swarm", "join", "--token", token, &format!("{nowhere}:2377")]);
    assert!(err.contains(&nowhere.to_string()) || err.contains("timed out"), "{err}");
    assert_outside(&lab, "node2");

    // A join the manager admitted, then gossip failed to start: the node leaves again.
    let held = hold_gossip_tcp(&lab, "node2");
    let err = lab.refused("node2", &["swarm", "join", "--token", token, &manager]);
    assert!(err.contains("gossip") && err.contains("still outside any swarm"), "{err}");
    drop(held);
    assert_outside(&lab, "node2");
    // The managers saw it leave, as after `swarm leave`: Down, and `node rm` removes it.
    eventually("node2 Down on the manager", Duration::from_secs(30), || {
        let ls = lab.on("node1", &["node", "ls"]);
        ls.lines().any(|l| l.contains("node2") && l.contains("Down")).then_some(())
    });
    lab.on("node1", &["node", "rm", "node2"]);
    assert!(!lab.on("node1", &["node", "ls"]).contains("node2"));

    // Agents whose advertise address the IPv4 overlay cannot use: an IPv6 one (on its link), and
    // one on no link of the host (a NAT or cloud elastic address). The data-path address
    // defaults to it, so init refuses before it makes anything, naming the flag that fixes it.
    run_ok(shoal().args(["--lab", &lab.name, "lab", "stop", "node2"]));
    run_ok(&mut lab_exec(
        &lab,
        "node2",
        &["ip", "-6", "addr", "add", "fd00:5:6::2/64", "dev", "eth0", "nodad"],
    ));
    for (advertise, why) in [
        ("fd00:5:6::2".to_owned(), "is IPv6"),
        (nowhere.to_string(), "is not an address of this host"),
    ] {
        let agent = hand_agent(&lab, "node2", &advertise);
        let err = lab.refused("node2", &["swarm", "init"]);
        assert!(err.contains(why) && err.contains("--data-path-addr"), "{err}");
        assert_outside(&lab, "node2");
        drop(agent);
    }

    // Restarted as the lab starts it (IPv4), the corrected join works.
    run_ok(shoal().args(["--lab", &lab.name, "lab", "start", "node2"]));
    assert_outside(&lab, "node2");
    let out = lab.on("node2", &["swarm", "join", "--token", token, &manager]);
    assert!(out.contains("joined a swarm as a worker"), "{out}");
    eventually("node2 Ready on the manager", Duration::from_secs(30), || {
        let ls = lab.on("node1", &["node", "ls"]);
        ls.lines().any(|l| l.contains("node2") && l.contains("Ready")).then_some(())
    });
}

/// Starts a node's agent as the lab does but advertising `advertise`; the lab's agent of that
/// node must be stopped.
fn hand_agent(lab: &Lab, node: &str, advertise: &str) -> HandAgent {
    let state = shoal::lab::LabState::load(&lab.name).unwrap();
    let n = state.node(node).unwrap();
    let mut agent = Command::new("ip");
    agent
        .args(["netns", "exec", &n.netns, env!("CARGO_BIN_EXE_shoal"), "agent"])
        .args(["--node-name", node, "--advertise-addr", advertise])
        .arg("--data-dir")
        .arg(&n.data_dir)
        .arg("--socket")
        .arg(&n.socket)
        .args(["--cluster-tuning", "fast", "--netns-prefix", &n.netns])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = HandAgent(agent.spawn().unwrap());
    eventually("the hand-started agent answers", Duration::from_secs(30), || {
        lab.shoal(&["--node", node, "info"]).status.success().then_some(())
    });
    agent
}

fn lab_exec(lab: &Lab, node: &str, argv: &[&str]) -> Command {
    let mut c = shoal();
    c.args(["--lab", &lab.name, "lab", "exec", node, "--"]).args(argv);
    c
}
