//! Mesh policy from the CLI, end to end on real agents in the lab: `--lb-algorithm maglev`
//! sends the same client to the same task through every node (each node builds the same
//! Maglev table from the same backends), and a bad algorithm is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, running_per_node};

/// The task: an HTTP server on 8000 that answers `task=HOSTNAME`.
const SERVER: &str = r#"
import http.server, socketserver, socket
me = socket.gethostname()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("task=%s\n" % me).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// The task that answered a request from `from` (None: this host) through `to`.
fn task(lab: &Lab, from: Option<&str>, to: &str) -> Option<String> {
    let url = format!("http://{to}:8100/");
    let argv = ["curl", "-s", "-m", "10", url.as_str()];
    let out = match from {
        None => Command::new("curl").args(&argv[1..]).output().expect("curl").stdout,
        Some(n) => lab.exec(n, &argv).stdout,
    };
    lossy(&out).trim().strip_prefix("task=").map(str::to_owned)
}

/// How many of `sticky`'s backends the node's mesh has up, from its `/metrics`.
fn backends_up(lab: &Lab, node: &str) -> usize {
    lab.metrics(node)
        .lines()
        .filter(|l| {
            l.starts_with("shoal_mesh_backend_up{")
                && l.contains("service=\"sticky\"")
                && l.ends_with(" 1")
        })
        .count()
}

#[test]
fn maglev_sends_a_client_to_the_same_task_through_every_node() {
    if !require_root("maglev_sends_a_client_to_the_same_task_through_every_node") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    let bad = lab.shoal(&[
        "--node",
        "node1",
        "service",
        "create",
        "--name",
        "bad",
        "--lb-algorithm",
        "random",
        "--",
        "sleep",
        "100",
    ]);
    assert!(!bad.status.success(), "--lb-algorithm random was accepted");

    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "sticky",
            "--replicas",
            "3",
            "--lb-algorithm",
            "maglev",
            "-p",
            "8100:8000",
            "--",
            "python3",
            "-c",
            SERVER,
        ],
    );
    eventually("a task of sticky on every node", Duration::from_secs(120), || {
        (running_per_node(&lab, "sticky").len() == 3).then_some(())
    });
    let inspect = lab.on("node1", &["service", "inspect", "sticky"]);
    assert!(inspect.contains("\"lb_algorithm\": \"maglev\""), "{inspect}");

    // Once every node's mesh has all three backends up, a client's task is the same through
    // every node and on every request; different clients may land on different tasks.
    eventually("three backends up on every node", Duration::from_secs(120), || {
        (1..=3).all(|i| backends_up(&lab, &format!("node{i}")) == 3).then_some(())
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
}
