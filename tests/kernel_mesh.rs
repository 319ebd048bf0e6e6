//! The routing mesh's kernel path (`--publish …,mesh=kernel`), end to end on real agents in
//! the lab: a three-replica service answering TCP (HTTP) and UDP with the peer it sees is
//! reached through every node's published ports, by nftables DNAT and conntrack.
//!
//! - every node balances over the tasks on every node, and each task sees this host's own
//!   address and port, over TCP and UDP; each node's `/metrics` counts those flows;
//! - an established keep-alive connection keeps answering across a `kill -9` and restart of
//!   the agent of the node it came through (the flow lives in the kernel);
//! - a task that turns unhealthy keeps its established connection while new ones avoid it,
//!   and new connections avoid a drained node's task;
//! - a task whose process dies leaves the maps, and every request after that succeeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{Lab, eventually, lossy, ps, require_root, running_per_node, task_netns};

/// The task: HTTP/1.1 (keep-alive) on 8000 and UDP on 8001, both answering
/// `peer=IP:PORT task=HOSTNAME` with the peer the kernel reports.
const PEER_SERVER: &str = r#"
import http.server, socketserver, socket, threading
me = socket.gethostname()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
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
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// One answer: the peer the task saw, and which task (its hostname) it was.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One HTTP request on a new connection from this host.
fn get(to: &str) -> Option<Seen> {
    let url = format!("http://{to}:8100/");
    parse(&lossy(&Command::new("curl").args(["-s", "-m", "5", &url]).output().ok()?.stdout))
}

/// A datagram from `port` and the answer.
fn udp(to: &str, port: u16) -> Option<Seen> {
    let peer = format!("UDP:{to}:8101,sourceport={port},reuseaddr");
    let cmd = format!("echo hi | socat -t 5 -T 5 - {peer}");
    parse(&lossy(&Command::new("sh").args(["-c", &cmd]).output().ok()?.stdout))
}

/// A keep-alive HTTP/1.1 connection: every request goes over the same TCP flow.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn open(to: &str) -> KeepAlive {
        let s = TcpStream::connect((to, 8100)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        KeepAlive { reader: BufReader::new(s) }
    }

    fn get(&mut self) -> Option<Seen> {
        self.reader.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n").ok()?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).ok()?;
        parse(&lossy(&body))
    }
}

/// The flows `node` forwarded for `peer` on the kernel path, as its `/metrics` says.
fn kernel_flows(lab: &Lab, node: &str) -> u64 {
    let text = lab.metrics(node);
    let prefix = "shoal_mesh_client_addr_kept_total{service=\"peer\",path=\"kernel\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {node}'s /metrics:\n{text}"))
}

/// The node's kernel-path table, as the real `nft` lists it.
fn table(lab: &Lab, node: &str) -> String {
    lossy(&lab.exec(node, &["nft", "list", "table", "ip", "shoal-mesh"]).stdout)
}

/// The hostnames (first 12 characters of the id) of the service's running tasks, by node.
fn tasks_by_node(lab: &Lab) -> BTreeMap<String, String> {
    ps(lab, "peer")
        .into_iter()
        .filter(|t| !t.history && t.desired == "Running" && t.state == "Running")
        .map(|t| (t.id[..12].to_owned(), t.node))
        .collect()
}

/// A scratch directory for health flags, removed on drop.
struct Flags(std::path::PathBuf);

impl Flags {
    fn new() -> Flags {
        let dir = std::env::temp_dir().join(shoal_netns::testing::unique_prefix("kmesh"));
        std::fs::create_dir_all(&dir).expect("flags dir");
        Flags(dir)
    }
}

impl Drop for Flags {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn published_ports_on_the_kernel_path() {
    if !require_root("published_ports_on_the_kernel_path") {
        return;
    }
    for tool in ["curl", "socat", "nft", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            assert!(std::env::var("CI").is_err(), "CI needs {tool}");
            eprintln!("*** SKIPPED published_ports_on_the_kernel_path: no {tool}");
            return;
        }
    }
    // Health flags the tasks' check reads (tasks see the host's file system).
    let flags = Flags::new();
    let health = format!("test ! -e {}/sick-$(hostname)", flags.0.display());
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
            // The server ignores SIGWINCH, so a drained task keeps serving its open connections
            // for the whole grace.
            "--stop-signal",
            "SIGWINCH",
            "--stop-grace-period",
            "60s",
            "--health-cmd",
            &health,
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--publish",
            "published=8100,target=8000,mesh=kernel",
            "--publish",
            "published=8101,target=8001,protocol=udp,mesh=kernel",
            "--",
            "python3",
            "-c",
            PEER_SERVER,
        ],
    );
    eventually("a task of peer on every node", Duration::from_secs(120), || {
        (running_per_node(&lab, "peer").len() == 3).then_some(())
    });
    let host = format!("{}", std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254));
    let nodes: Vec<String> = (1..=3u8).map(|i| lab.addr(i).to_string()).collect();

    // Every node DNATs both ports to all three tasks, and each reaches all three.
    eventually("every node's table mapping to three tasks", Duration::from_secs(60), || {
        (1..=3)
            .all(|i| {
                let t = table(&lab, &format!("node{i}"));
                t.contains("tcp dport 8100")
                    && t.contains("udp dport 8101")
                    && t.contains("2 : 10.")
            })
            .then_some(())
    });
    let mut udp_port = 47000u16;
    for (i, to) in nodes.iter().enumerate() {
        let node = format!("node{}", i + 1);
        let before = kernel_flows(&lab, &node);
        let mut flows = 0;
        let mut reached = BTreeSet::new();
        let mut reached_udp = BTreeSet::new();
        for _ in 0..60 {
            flows += 2;
            let seen = get(to).unwrap_or_else(|| panic!("TCP via {to}: no answer"));
            assert_eq!(seen.ip, host, "TCP via {to}: the task saw {seen:?}");
            reached.insert(seen.task);
            // A new source port each time: the task's conntrack keys a flow by the client's
            // address and port only, whichever node it came through.
            udp_port += 1;
            let seen = udp(to, udp_port).unwrap_or_else(|| panic!("UDP via {to}: no answer"));
            assert_eq!((seen.ip.as_str(), seen.port), (host.as_str(), udp_port), "UDP via {to}");
            reached_udp.insert(seen.task);
            if reached.len() == 3 && reached_udp.len() == 3 {
                break;
            }
        }
        assert_eq!(reached.len(), 3, "TCP via {to} reached only {reached:?}");
        assert_eq!(reached_udp.len(), 3, "UDP via {to} reached only {reached_udp:?}");
        // Each request was a new flow, and the node's /metrics counted every one as forwarded
        // by the kernel with the client's address.
        assert_eq!(kernel_flows(&lab, &node) - before, flows, "{node}'s kernel-path count");
    }

    // An established flow through node2 survives its agent's kill -9 and restart.
    let mut kept = KeepAlive::open(&nodes[1]);
    let first = kept.get().expect("a first answer on the kept connection");
    assert!(lab.shoal(&["lab", "stop", "node2", "--kill"]).status.success(), "lab stop");
    let during = kept.get().expect("an answer while node2's agent is down");
    let out = lab.shoal(&["lab", "start", "node2"]);
    assert!(out.status.success(), "lab start: {}", lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(3));
    let after = kept.get().expect("an answer after node2's agent is back");
    assert_eq!(first, during, "the flow moved while the agent was down");
    assert_eq!(first, after, "the flow moved when the agent came back");
    eventually("node2 answering new connections again", Duration::from_secs(60), || {
        get(&nodes[1]).map(|s| assert_eq!(s.ip, host))
    });

    // A task that turns unhealthy drains: it leaves the maps (its endpoint stays, not serving),
    // the connection already on it continues, and new ones avoid it.
    let by_node = tasks_by_node(&lab);
    let sick = by_node.keys().next().expect("a task").clone();
    let mut draining = eventually("a connection to the task", Duration::from_secs(60), || {
        let mut c = KeepAlive::open(&nodes[0]);
        c.get().filter(|s| s.task == sick).map(|_| c)
    });
    std::fs::write(flags.0.join(format!("sick-{sick}")), b"").expect("flag file");
    eventually("new connections avoiding the unhealthy task", Duration::from_secs(60), || {
        let seen: Vec<Seen> = nodes.iter().flat_map(|to| (0..5).filter_map(|_| get(to))).collect();
        (seen.len() == 15 && seen.iter().all(|s| s.task != sick)).then_some(())
    });
    for _ in 0..3 {
        let seen = draining.get().expect("the draining task's established connection");
        assert_eq!(seen.task, sick, "the established connection moved");
    }
    drop(draining);
    std::fs::remove_file(flags.0.join(format!("sick-{sick}"))).expect("flag file");

    // Draining a node: new connections avoid its task at once.
    let on_node3 = by_node.iter().find(|(_, n)| *n == "node3").map(|(t, _)| t.clone());
    let on_node3 = on_node3.expect("a task on node3");
    lab.on("node1", &["node", "update", "--availability", "drain", "node3"]);
    eventually("new connections avoiding the drained task", Duration::from_secs(30), || {
        let seen: Vec<Seen> = (0..15).filter_map(|_| get(&nodes[0])).collect();
        (seen.len() == 15 && seen.iter().all(|s| s.task != on_node3)).then_some(())
    });
    lab.on("node1", &["node", "update", "--availability", "active", "node3"]);

    // A task whose process dies leaves every node's map; after that nothing fails.
    eventually("three running tasks again", Duration::from_secs(120), || {
        (tasks_by_node(&lab).len() == 3).then_some(())
    });
    let (victim, node) = tasks_by_node(&lab).into_iter().next().expect("a task");
    let ns = task_netns(&lab, &node, &victim);
    let pids = lossy(&Command::new("ip").args(["netns", "pids", &ns]).output().unwrap().stdout);
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    eventually("new connections avoiding the dead task", Duration::from_secs(60), || {
        let seen: Vec<Seen> = nodes.iter().flat_map(|to| (0..5).filter_map(|_| get(to))).collect();
        (seen.len() == 15 && seen.iter().all(|s| s.task != victim)).then_some(())
    });
    for to in &nodes {
        for _ in 0..10 {
            let seen = get(to).unwrap_or_else(|| panic!("via {to}: a request failed"));
            assert_ne!(seen.task, victim, "via {to}: the dead task answered");
        }
    }
}
