//! Mesh policy from the CLI, end to end on real agents in the lab: `--lb-algorithm maglev`
//! sends the same client to the same task through every node (each node builds the same
//! Maglev table from the same backends, and the kernel path hashes the client over the same
//! sorted backends), and a bad algorithm is refused. Limits are the proxy's: a service that sets
//! them has its ports there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Lab, curl, eventually, lossy, require_root, running_per_node, wait_on_nodes};

/// The task that answered a request from `from` (None: this host) through `to`.
fn task(lab: &Lab, from: Option<&str>, to: &str) -> Option<String> {
    task_on(lab, from, to, 8100)
}

/// [`task`] on another published port.
fn task_on(lab: &Lab, from: Option<&str>, to: &str, port: u16) -> Option<String> {
    lab.ask(from, &format!("http://{to}:{port}/"), &[]).map(|a| a.task)
}

#[test]
fn maglev_sends_a_client_to_the_same_task_through_every_node() {
    if !require_root("maglev_sends_a_client_to_the_same_task_through_every_node") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.refused(
        "node1",
        &["service", "create", "--name", "bad", "--lb-algorithm", "random", "--", "sleep", "100"],
    );

    let maglev = ["--replicas", "3", "--lb-algorithm", "maglev"];
    // Clients on the nodes themselves always take the proxy: pin it for all of them.
    let proxy = ["-p", "published=8100,target=8000,mesh=proxy"];
    lab.create_answering("sticky", &[&maglev[..], &proxy[..]].concat(), &[]);
    let kernel = ["-p", "published=8102,target=8000,mesh=kernel"];
    lab.create_answering("sticky-k", &[&maglev[..], &kernel[..]].concat(), &[]);
    wait_on_nodes(&lab, "sticky", 3);
    let inspect = lab.on("node1", &["service", "inspect", "sticky"]);
    assert!(inspect.contains("\"lb_algorithm\": \"maglev\""), "{inspect}");

    // Once every node's mesh has all three backends up, a client's task is the same through
    // every node and on every request; different clients may land on different tasks.
    eventually("three backends up on every node", Duration::from_secs(120), || {
        (1..=3).all(|i| lab.backends_up(&format!("node{i}"), "sticky") == 3).then_some(())
    });
    let nodes: Vec<String> = (1..=3).map(|i| lab.addr(i).to_string()).collect();
    let mut chosen = BTreeSet::new();
    for from in [None, Some("node2"), Some("node3")] {
        let who = from.unwrap_or("this host");
        let seen = eventually(
            &format!("one task for {who} via every node"),
            Duration::from_secs(90),
            || {
                let seen: BTreeSet<String> = nodes
                    .iter()
                    .flat_map(|to| (0..4).map(move |_| to))
                    .map(|to| task(&lab, from, to))
                    .collect::<Option<_>>()?;
                (seen.len() == 1).then_some(seen)
            },
        );
        chosen.extend(seen);
    }
    assert!(!chosen.is_empty());

    // The same on the kernel path (`mesh=kernel`), for this host.
    let inspect = lab.on("node1", &["service", "inspect", "sticky-k"]);
    let said: serde_json::Value = serde_json::from_str(&inspect).expect("inspect is JSON");
    assert_eq!(said[0]["mesh_paths"]["8102/tcp"], "kernel", "{inspect}");
    wait_on_nodes(&lab, "sticky-k", 3);
    eventually("one task for this host via every node's kernel", Duration::from_secs(90), || {
        let seen: BTreeSet<String> = nodes
            .iter()
            .flat_map(|to| (0..4).map(move |_| to))
            .map(|to| task_on(&lab, None, to, 8102))
            .collect::<Option<_>>()?;
        let all = lab.metrics("node1");
        let kernel = "shoal_mesh_client_addr_kept_total{service=\"sticky-k\",path=\"kernel\"}";
        (seen.len() == 1 && all.lines().any(|l| l.starts_with(kernel) && !l.ends_with(" 0")))
            .then_some(())
    });
}

/// The task of the policy test: on 8000, `GET /healthz` answers 503 while the file named by
/// its first argument exists (else 200); anything else is echoed line by line for as long as
/// the client keeps the connection.
const ECHO: &str = r#"
import os, socketserver, sys
sick = sys.argv[1]
class H(socketserver.StreamRequestHandler):
    def handle(self):
        first = self.rfile.readline()
        if first.startswith(b"GET "):
            code = b"503 Sick" if os.path.exists(sick) else b"200 OK"
            self.wfile.write(b"HTTP/1.1 " + code + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        line = first
        while line:
            self.wfile.write(line)
            self.wfile.flush()
            line = self.rfile.readline()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// Whether `line` comes back on `s` within a few seconds.
fn echoes(s: &mut std::net::TcpStream, line: &str) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("{line}\n").as_bytes()).is_err() {
        return false;
    }
    let mut got = String::new();
    let mut r = BufReader::new(&*s);
    r.read_line(&mut got).is_ok() && got.trim_end() == line
}

/// The health states of `service`'s backends in a node's `/metrics`, sorted.
fn backend_health(lab: &Lab, node: &str, service: &str) -> Vec<String> {
    let want = format!("service=\"{service}\"");
    let mut v: Vec<String> = lab
        .metrics(node)
        .lines()
        .filter(|l| l.starts_with("shoal_mesh_backend_health{") && l.contains(&want))
        .filter_map(|l| l.split("state=\"").nth(1)?.split('"').next().map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// Every node's mesh shows every backend of `keep` in `state`.
fn all_backends(lab: &Lab, state: &str) -> Option<()> {
    ["node1", "node2"]
        .iter()
        .all(|n| {
            let h = backend_health(lab, n, "keep");
            h.len() == 2 && h.iter().all(|s| s == state)
        })
        .then_some(())
}

fn task_ids(lab: &Lab) -> BTreeSet<String> {
    common::ps(lab, "keep").into_iter().map(|t| t.id).collect()
}

#[test]
fn the_mesh_policy_changes_in_place_and_its_limits_refuse() {
    if !require_root("the_mesh_policy_changes_in_place_and_its_limits_refuse") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick");
    let unready = dir.path().join("unready");
    let lab = Lab::up(2);
    lab.swarm(2);

    // Bad policy is refused with the flag's name, and creates nothing.
    for (flag, value) in [("--mesh-check", "ping"), ("--mesh-check-rise", "0")] {
        let out = lab.shoal(&[
            "--node", "node1", "service", "create", "--name", "bad", flag, value, "--", "sleep",
            "100",
        ]);
        let err = lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&flag[2..]), "{flag} {value}: {err}");
    }
    assert!(!lab.on("node1", &["service", "ls"]).contains("bad"));

    let health = format!("test ! -e {}", unready.display());
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "keep",
            "--replicas",
            "2",
            "-p",
            "8100:8000",
            "--mesh-max-connections",
            "2",
            "--mesh-idle-timeout",
            "30s",
            "--health-cmd",
            &health,
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "--",
            "python3",
            "-c",
            ECHO,
            sick.to_str().unwrap(),
        ],
    );
    wait_on_nodes(&lab, "keep", 2);
    eventually("both backends up on both nodes", Duration::from_secs(60), || {
        all_backends(&lab, "up")
    });
    let inspect = lab.on("node1", &["service", "inspect", "keep"]);
    for want in ["\"idle_timeout_ms\": 30000", "\"max_connections\": 2", "\"check\": \"tcp\""] {
        assert!(inspect.contains(want), "{want} in {inspect}");
    }
    // Only the proxy enforces a connection limit and an idle timeout: the plain port takes it.
    let said: serde_json::Value = serde_json::from_str(&inspect).expect("inspect is JSON");
    assert_eq!(said[0]["mesh_paths"]["8100/tcp"], "proxy", "{inspect}");

    // Two connections through node1 fit; the third is refused and counted.
    let front = std::net::SocketAddr::from((lab.addr(1), 8100));
    let connect = || std::net::TcpStream::connect_timeout(&front, Duration::from_secs(5)).unwrap();
    let mut long = connect();
    assert!(echoes(&mut long, "first"));
    let mut second = connect();
    assert!(echoes(&mut second, "second"));
    // The proxy accepts and resets the third, so on a busy machine the reset can reach the
    // client before its connect call returns: a failed connect is the same refusal.
    let third = std::net::TcpStream::connect_timeout(&front, Duration::from_secs(5));
    let got_past = third.map(|mut s| echoes(&mut s, "third")).unwrap_or(false);
    assert!(!got_past, "a third connection got past the limit of 2");
    let refused = "shoal_mesh_connections_refused_total{service=\"keep\"} 1";
    assert!(lab.metrics("node1").contains(refused), "{}", lab.metrics("node1"));
    drop(second);

    // A bad update changes nothing.
    let out =
        lab.shoal(&["--node", "node1", "service", "update", "--mesh-check-fall", "0", "keep"]);
    assert!(!out.status.success(), "--mesh-check-fall 0 was accepted");
    assert_eq!(lab.on("node1", &["service", "inspect", "keep"]), inspect);

    // A policy update: new values everywhere, the same tasks, the open connection untouched.
    let tasks = task_ids(&lab);
    lab.on(
        "node1",
        &[
            "service",
            "update",
            "--lb-algorithm",
            "round-robin",
            "--mesh-idle-timeout",
            "3s",
            "--mesh-max-connections",
            "10",
            "--mesh-check",
            "http:/healthz",
            "--mesh-check-interval",
            "500ms",
            "--mesh-check-rise",
            "1",
            "--mesh-check-fall",
            "2",
            "keep",
        ],
    );
    let inspect = lab.on("node1", &["service", "inspect", "keep"]);
    for want in [
        "\"lb_algorithm\": \"round-robin\"",
        "\"idle_timeout_ms\": 3000",
        "\"check\": \"http:/healthz\"",
        "\"check_interval_ms\": 500",
    ] {
        assert!(inspect.contains(want), "{want} in {inspect}");
    }
    for i in 0..10 {
        assert!(echoes(&mut long, &format!("during {i}")), "the open connection broke");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(task_ids(&lab), tasks, "a policy update replaced tasks");

    // The new idle timeout holds for new connections: a quiet one is reset between one and
    // two timeouts after its last byte.
    let mut quiet = connect();
    assert!(echoes(&mut quiet, "hello"));
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        !echoes(&mut quiet, "still there?"),
        "a connection idle for 9 s outlived a 3 s timeout"
    );

    // One health view: the mesh's HTTP check (now in force on every node) and the task's own
    // health command both take a task out, and each node's /metrics says which.
    drop(long);
    std::fs::write(&sick, "").unwrap();
    eventually("the HTTP mesh check takes the backends down", Duration::from_secs(30), || {
        all_backends(&lab, "down")
    });
    std::fs::remove_file(&sick).unwrap();
    eventually("the backends back up", Duration::from_secs(30), || all_backends(&lab, "up"));
    std::fs::write(&unready, "").unwrap();
    eventually("the health command takes the backends out", Duration::from_secs(30), || {
        all_backends(&lab, "not_ready")
    });
    std::fs::remove_file(&unready).unwrap();
    eventually("the backends back up again", Duration::from_secs(30), || all_backends(&lab, "up"));
    let mut fresh = connect();
    assert!(echoes(&mut fresh, "back"), "no traffic after both checks pass again");
}

#[test]
fn a_host_mode_task_waits_for_a_node_whose_port_is_free() {
    if !require_root("a_host_mode_task_waits_for_a_node_whose_port_is_free") {
        return;
    }
    let lab = Lab::up(2);
    lab.swarm(2);
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "-d",
            "--name",
            "edge",
            "--replicas",
            "3",
            "-p",
            "published=8300,target=8000,mode=host",
            "--",
            "python3",
            "-m",
            "http.server",
            "8000",
        ],
    );
    eventually("one task of edge on each node", Duration::from_secs(120), || {
        (running_per_node(&lab, "edge").values().copied().collect::<Vec<_>>() == [1, 1])
            .then_some(())
    });
    let ps = lab.on("node1", &["service", "ps", "edge"]);
    let pending: Vec<&str> = ps.lines().filter(|l| l.contains("Pending")).collect();
    assert_eq!(pending.len(), 1, "{ps}");
    assert!(
        pending[0].contains("no suitable node (host-mode port already in use on 2 nodes)"),
        "{ps}"
    );
    // Each node answers on its own task; the waiting one never doubles up.
    for i in 1..=2 {
        eventually(&format!("node{i} answers on 8300"), Duration::from_secs(60), || {
            let url = format!("http://{}:8300/", lab.addr(i));
            curl(&url, 10).contains("Directory listing").then_some(())
        });
    }
    assert_eq!(running_per_node(&lab, "edge").values().sum::<usize>(), 2);
}

/// A UDP echo on 8000.
const UDP_ECHO: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 8000))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"#;

#[test]
fn udp_flows_past_the_per_source_limit_are_dropped_and_counted() {
    if !require_root("udp_flows_past_the_per_source_limit_are_dropped_and_counted") {
        return;
    }
    let lab = Lab::up(1);
    lab.swarm(1);
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "echo",
            "-p",
            "8400:8000/udp",
            "--mesh-check",
            "none",
            "--mesh-max-udp-flows-per-source",
            "1",
            "--",
            "python3",
            "-c",
            UDP_ECHO,
        ],
    );
    let front = std::net::SocketAddr::from((lab.addr(1), 8400));
    let answered = |s: &std::net::UdpSocket| {
        let _ = s.send_to(b"ping", front);
        let mut buf = [0u8; 16];
        matches!(s.recv(&mut buf), Ok(4))
    };
    let open = || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    };
    let first = open();
    eventually("the first flow answered", Duration::from_secs(60), || {
        answered(&first).then_some(())
    });
    let second = open();
    for _ in 0..3 {
        assert!(!answered(&second), "a second flow from one address got through");
    }
    assert!(answered(&first), "the first flow stopped");
    let line = "shoal_mesh_udp_flows_refused_total{service=\"echo\",limit=\"source\"} 3";
    assert!(lab.metrics("node1").contains(line), "{}", lab.metrics("node1"));
}
