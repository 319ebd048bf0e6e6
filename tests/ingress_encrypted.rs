//! The ingress network is replaced by an encrypted one, as in Docker: `network rm ingress` is
//! refused while a service publishes through it, then allowed; `network create --driver overlay
//! --ingress --opt encrypted` makes the new one. On three real agents in the lab, a
//! three-replica service that answers with the peer address it sees is then reached through
//! every node's published port, from this host and from another lab node, and every answer
//! names the real client address; the cross-node mesh traffic on the underlay is WireGuard,
//! never cleartext VXLAN.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, running_per_node};

/// The task: an HTTP server on 8000 answering `peer=IP:PORT task=HOSTNAME`.
const PEER_SERVER: &str = r#"
import http.server, socketserver, socket
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
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// What a request carries, to look for in the underlay capture.
const MARKER: &str = "ingress-cleartext-marker";

/// One answer: the peer the task saw, and which task it was.
#[derive(Debug)]
struct Seen {
    ip: String,
    task: String,
}

fn parse(answer: &str) -> Option<Seen> {
    let line = answer.lines().find(|l| l.starts_with("peer="))?;
    let mut words = line.split_whitespace();
    let (ip, _port) = words.next()?.strip_prefix("peer=")?.rsplit_once(':')?;
    let task = words.next()?.strip_prefix("task=")?;
    Some(Seen { ip: ip.to_owned(), task: task.to_owned() })
}

/// An HTTP request to `to:8100` from this host (`from` None) or from inside a lab node.
fn get(lab: &Lab, from: Option<&str>, to: &str) -> Option<Seen> {
    let url = format!("http://{to}:8100/{MARKER}");
    let argv = ["curl", "-s", "-m", "10", url.as_str()];
    let out = match from {
        None => Command::new("curl").args(&argv[1..]).output().expect("curl").stdout,
        Some(n) => lab.exec(n, &argv).stdout,
    };
    parse(&lossy(&out))
}

/// tcpdump on a host interface; stopped (and flushed) on drop.
struct Capture(std::process::Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn capture(iface: &str, file: &std::path::Path) -> Capture {
    use std::io::BufRead;
    let mut child = Command::new("tcpdump")
        // `-Z root`: tcpdump would otherwise drop to its own user, who cannot write in the
        // test's private temporary directory.
        // `--immediate-mode` with `-U`: each packet reaches the file as it is seen, so the
        // file can be read while tcpdump still runs.
        .args(["-n", "-U", "--immediate-mode", "-Z", "root", "-i", iface, "-w"])
        .arg(file)
        .arg("udp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let stderr = child.stderr.take().expect("stderr");
    let capture = Capture(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l.contains("listening on"));
    assert!(ready, "tcpdump on {iface} did not start");
    std::thread::spawn(move || lines.for_each(drop));
    capture
}

/// The capture's packets that match `filter`, printed with their payload.
fn packets(file: &std::path::Path, filter: &str) -> String {
    let out = Command::new("tcpdump").args(["-n", "-A", "-r"]).arg(file).arg(filter).output();
    lossy(&out.expect("tcpdump -r").stdout)
}

/// `lab.shoal` on a node, which must fail; returns its stderr.
fn refused(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = lab.shoal(&[&["--node", node], args].concat());
    assert!(!out.status.success(), "{args:?} was accepted: {}", lossy(&out.stdout));
    lossy(&out.stderr)
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
    let err = refused(&lab, "node1", &["network", "rm", "ingress"]);
    assert!(
        err.contains("ingress network cannot be removed because service(s) blocker depend on it"),
        "{err}"
    );
    let err = refused(&lab, "node1", &["network", "create", "--ingress", "other"]);
    assert!(
        err.contains("ingress network (ingress, ") && err.contains("is already present"),
        "{err}"
    );
    let err = refused(&lab, "node1", &["network", "create", "--ingress", "--attachable", "x"]);
    assert!(err.contains("cannot be attachable"), "{err}");
    lab.on("node1", &["service", "rm", "blocker"]);
    // Once blocker's tasks are gone nothing holds an address on it.
    eventually("network rm ingress", Duration::from_secs(60), || {
        lab.shoal(&["--node", "node1", "network", "rm", "ingress"]).status.success().then_some(())
    });
    let err = refused(
        &lab,
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
    eventually("every node reaching all three tasks", Duration::from_secs(120), || {
        let mut all = true;
        for node in 1..=3u8 {
            let to = lab.addr(node).to_string();
            let tasks: BTreeSet<String> =
                (0..12).filter_map(|_| get(&lab, None, &to)).map(|s| s.task).collect();
            all &= tasks.len() == 3;
        }
        all.then_some(())
    });

    // From this host (the lab bridge's address) and from node2, through every node's port, to
    // every task, while the underlay is captured.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("underlay.pcap");
    let cap = capture(&format!("{}-br", lab.name), &file);
    let host = std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254).to_string();
    let node2 = lab.addr(2).to_string();
    for (from, client) in [(None, host.as_str()), (Some("node2"), node2.as_str())] {
        let who = from.unwrap_or("the host");
        for node in 1..=3u8 {
            let to = lab.addr(node).to_string();
            let mut reached = BTreeSet::new();
            for _ in 0..60 {
                let seen = get(&lab, from, &to)
                    .unwrap_or_else(|| panic!("from {who} via {to}: no answer"));
                assert_eq!(seen.ip, client, "from {who} via {to}: the task saw {seen:?}");
                reached.insert(seen.task);
                if reached.len() == 3 {
                    break;
                }
            }
            assert_eq!(reached.len(), 3, "from {who} via {to}: reached only {reached:?}");
        }
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
