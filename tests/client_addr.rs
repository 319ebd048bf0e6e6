//! The routing mesh keeps the client's address, end to end on real agents in the lab: a
//! three-replica service that answers TCP (HTTP) and UDP with the peer address it sees is
//! reached through every node's published ports, from this host and from another lab node,
//! and every answer names the real client address and port. A client the sandbox cannot speak
//! for (loopback on the node) falls back to the node's ingress address, and `/metrics` counts
//! both kinds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, running_per_node};

/// The task: an HTTP server on 8000 and a UDP server on 8001, both answering
/// `peer=IP:PORT task=HOSTNAME` with the peer the kernel reports.
const PEER_SERVER: &str = r#"
import http.server, socketserver, socket, threading
me = socket.gethostname()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("peer=%s:%d task=%s\n" % (self.client_address[0], self.client_address[1], me)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 8001))
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(("peer=%s:%d task=%s\n" % (a[0], a[1], me)).encode(), a)
threading.Thread(target=udp, daemon=True).start()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// One answer: the peer the task saw, and which task it was.
#[derive(Debug)]
struct Seen {
    ip: String,
    port: u16,
    task: String,
}

fn parse(answer: &str) -> Option<Seen> {
    let line = answer.lines().find(|l| l.starts_with("peer="))?;
    let mut words = line.split_whitespace();
    let (ip, port) = words.next()?.strip_prefix("peer=")?.rsplit_once(':')?;
    let task = words.next()?.strip_prefix("task=")?;
    Some(Seen { ip: ip.to_owned(), port: port.parse().ok()?, task: task.to_owned() })
}

/// Runs `argv` here (`node` None) or inside a lab node.
fn run(lab: &Lab, node: Option<&str>, argv: &[&str]) -> String {
    match node {
        None => lossy(&Command::new(argv[0]).args(&argv[1..]).output().expect(argv[0]).stdout),
        Some(n) => lossy(&lab.exec(n, argv).stdout),
    }
}

/// An HTTP request from a port of `ports` (curl picks a free one).
fn tcp(lab: &Lab, from: Option<&str>, to: &str, ports: (u16, u16)) -> Option<Seen> {
    let range = format!("{}-{}", ports.0, ports.1);
    let url = format!("http://{to}:8100/");
    parse(&run(lab, from, &["curl", "-s", "-m", "10", "--local-port", &range, &url]))
}

/// A datagram from `port` and the answer.
fn udp(lab: &Lab, from: Option<&str>, to: &str, port: u16) -> Option<Seen> {
    let peer = format!("UDP:{to}:8101,sourceport={port},reuseaddr");
    parse(&run(lab, from, &["sh", "-c", &format!("echo hi | socat -t 5 -T 5 - {peer}")]))
}

/// Sends requests through every node until each node has reached every task, asserting that
/// every answer names `client` and the client's port. `ask(node_addr, n)` makes the n-th request.
fn through_every_node(
    lab: &Lab,
    what: &str,
    client: &str,
    tasks: usize,
    mut ask: impl FnMut(&str, u16) -> (Option<Seen>, (u16, u16)),
) {
    let mut n = 0u16;
    for node in 1..=3u8 {
        let addr = lab.addr(node).to_string();
        let mut reached = BTreeSet::new();
        for _ in 0..60 {
            n += 1;
            let (seen, ports) = ask(&addr, n);
            let seen = seen.unwrap_or_else(|| panic!("{what} via {addr}: no answer"));
            assert_eq!(seen.ip, client, "{what} via {addr}: the task saw {seen:?}");
            assert!(
                (ports.0..=ports.1).contains(&seen.port),
                "{what} via {addr}: port {} is not the client's ({ports:?})",
                seen.port
            );
            reached.insert(seen.task);
            if reached.len() == tasks {
                break;
            }
        }
        assert_eq!(reached.len(), tasks, "{what} via {addr} reached only {reached:?}");
    }
}

fn said_json(inspect: &str) -> serde_json::Value {
    serde_json::from_str(inspect).expect("inspect is JSON")
}

/// A counter of `/metrics` for the service `peer` on one path of the mesh (`proxy`, `kernel`).
fn counter(lab: &Lab, node: &str, name: &str, path: &str) -> u64 {
    let text = lab.metrics(node);
    let prefix = format!("{name}{{service=\"peer\",path=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
}

#[test]
fn tasks_see_the_real_client_address_through_every_node() {
    if !require_root("tasks_see_the_real_client_address_through_every_node") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "peer",
            "--replicas",
            "3",
            "-p",
            "8100:8000",
            "-p",
            "8101:8001/udp",
            "--",
            "python3",
            "-c",
            PEER_SERVER,
        ],
    );
    eventually("a task of peer on every node", Duration::from_secs(120), || {
        let per_node: BTreeMap<String, usize> = running_per_node(&lab, "peer");
        (per_node.len() == 3).then_some(())
    });
    // Every node's mesh has found all three backends healthy.
    let host = format!("{}", std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254));
    eventually("every node reaching all three tasks", Duration::from_secs(120), || {
        let mut all = true;
        for node in 1..=3u8 {
            let to = lab.addr(node).to_string();
            let tasks: BTreeSet<String> = (0..12)
                .filter_map(|_| tcp(&lab, None, &to, (1024, 65535)))
                .map(|s| s.task)
                .collect();
            all &= tasks.len() == 3;
        }
        all.then_some(())
    });

    // TCP and UDP from this host (the lab bridge's address) and from node2.
    let node2 = lab.addr(2).to_string();
    for (from, client) in [(None, host.as_str()), (Some("node2"), node2.as_str())] {
        let who = from.unwrap_or("the host");
        through_every_node(&lab, &format!("TCP from {who}"), client, 3, |to, n| {
            let base = 41000 + (n % 200) * 20;
            (tcp(&lab, from, to, (base, base + 19)), (base, base + 19))
        });
        through_every_node(&lab, &format!("UDP from {who}"), client, 3, |to, n| {
            let port = 47000 + n;
            (udp(&lab, from, to, port), (port, port))
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
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "peer",
            "--replicas",
            "2",
            "--publish",
            "published=8200,target=8000,mode=host",
            "--",
            "python3",
            "-c",
            PEER_SERVER,
        ],
    );
    let with_task = eventually("two tasks on two nodes", Duration::from_secs(120), || {
        let per_node: BTreeMap<String, usize> = running_per_node(&lab, "peer");
        (per_node.len() == 2).then_some(per_node.into_keys().collect::<BTreeSet<String>>())
    });
    let host = format!("{}", std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254));
    let get = |node: u8| {
        let url = format!("http://{}:8200/", lab.addr(node));
        parse(&run(&lab, None, &["curl", "-s", "-m", "3", &url]))
    };
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
