//! The answering task the mesh tests run: a Python server that tells each client the peer
//! address it saw and which task it is, and the client side that asks through a lab's nodes
//! and reads the answers.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::process::Command;
use std::time::Duration;

use super::{Lab, eventually, lossy};

/// The task's program (`python3 -c ANSWERING [NAME]`): HTTP on 8000 and UDP on 8001, each
/// answering one line `peer=IP:PORT task=HOSTNAME name=NAME`: the peer the kernel reports, the
/// task's hostname (its short id) and the first argument ("-" without one).
pub const ANSWERING: &str = r#"
import http.server, socketserver, socket, sys, threading
me = socket.gethostname()
name = sys.argv[1] if len(sys.argv) > 1 else "-"
def line(a):
    return ("peer=%s:%d task=%s name=%s\n" % (a[0], a[1], me, name)).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = line(self.client_address)
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
        s.sendto(line(a), a)
threading.Thread(target=udp, daemon=True).start()
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// One answer of the answering task.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The peer address the task saw.
    pub ip: String,
    /// The peer port the task saw.
    pub port: u16,
    /// The task's hostname.
    pub task: String,
    /// The task's first argument, "-" without one.
    pub name: String,
}

/// Reads an answer out of a reply ("" or anything else: `None`).
pub fn parse(reply: &str) -> Option<Answer> {
    let line = reply.lines().find(|l| l.starts_with("peer="))?;
    let mut words = line.split_whitespace();
    let (ip, port) = words.next()?.strip_prefix("peer=")?.rsplit_once(':')?;
    let task = words.next()?.strip_prefix("task=")?;
    let name = words.next()?.strip_prefix("name=")?;
    Some(Answer {
        ip: ip.to_owned(),
        port: port.parse().ok()?,
        task: task.to_owned(),
        name: name.to_owned(),
    })
}

impl Lab {
    /// `service create --name NAME FLAGS -- python3 -c ANSWERING ARGS` on node1; its output.
    pub fn create_answering(&self, name: &str, flags: &[&str], args: &[&str]) -> String {
        let head = ["service", "create", "--name", name];
        let program = ["--", "python3", "-c", ANSWERING];
        self.on("node1", &[&head[..], flags, &program[..], args].concat())
    }

    /// Runs `argv` on this host (`from` None) or inside a lab node; its stdout.
    pub fn run_from(&self, from: Option<&str>, argv: &[&str]) -> String {
        match from {
            None => lossy(&Command::new(argv[0]).args(&argv[1..]).output().expect(argv[0]).stdout),
            Some(n) => lossy(&self.exec(n, argv).stdout),
        }
    }

    /// `curl -s -m 10 FLAGS URL` from this host (`from` None) or a lab node, read as an answer
    /// (a later `-m` in `flags` wins).
    pub fn ask(&self, from: Option<&str>, url: &str, flags: &[&str]) -> Option<Answer> {
        let argv = [&["curl", "-s", "-m", "10"][..], flags, &[url]].concat();
        parse(&self.run_from(from, &argv))
    }

    /// Waits until every node's published `port` (nodes 1 to `nodes`) has reached `tasks`
    /// different tasks from this host: every node's mesh has found them all up.
    pub fn wait_every_node_reaches(&self, nodes: u8, port: u16, tasks: usize) {
        let what = format!("every node's :{port} reaching {tasks} tasks");
        eventually(&what, Duration::from_secs(120), || {
            let mut all = true;
            for node in 1..=nodes {
                let url = format!("http://{}:{port}/", self.addr(node));
                let reached: BTreeSet<String> =
                    (0..12).filter_map(|_| self.ask(None, &url, &[])).map(|a| a.task).collect();
                all &= reached.len() == tasks;
            }
            all.then_some(())
        });
    }
}

/// Sends requests through each of nodes 1 to 3 until that node has reached `tasks` different
/// tasks, asserting that every answer names `client` and a port of the client's.
/// `ask(node_addr, n)` makes the n-th request and says which ports the client sent it from.
pub fn through_every_node(
    lab: &Lab,
    what: &str,
    client: &str,
    tasks: usize,
    mut ask: impl FnMut(&str, u16) -> (Option<Answer>, RangeInclusive<u16>),
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
                ports.contains(&seen.port),
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
