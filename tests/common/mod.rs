//! The multi-node test harness: a [`Lab`] guard builds a lab with a unique name and subnet and
//! tears it down in `Drop`, also when the test fails; helpers run `shoal` and commands in nodes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use std::process::{Child, Command, Output};

pub mod answer;
pub mod capture;
pub mod load;

#[allow(unused_imports)]
pub use load::{Load, curl, get_ok};
#[allow(unused_imports)]
pub use shoal_netns::testing::require_root;

/// The `shoal` binary under test.
pub fn shoal() -> Command {
    shoal_at(std::path::Path::new(env!("CARGO_BIN_EXE_shoal")))
}

/// `shoal` from `binary` (the test's build, or a copy of it standing for an upgrade), with
/// none of this process's `SHOAL_*` settings but the log level.
pub fn shoal_at(binary: &std::path::Path) -> Command {
    let mut c = Command::new(binary);
    for (k, _) in std::env::vars_os() {
        // (A log level set for a test run reaches the agents its labs start.)
        if k.to_str().is_some_and(|k| k.starts_with("SHOAL_") && k != "SHOAL_LOG_LEVEL") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs a command and returns its output, with stdout/stderr in the panic message on failure.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawning a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        lossy(&out.stdout),
        lossy(&out.stderr)
    );
    lossy(&out.stdout)
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A lab for one test; `lab down` runs in `Drop`.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub subnet: ipnet::Ipv4Net,
}

impl Lab {
    /// Brings up a lab of `nodes` hosts on a free /24 of 198.18.1.0 - 198.18.250.0.
    pub fn up(nodes: u8) -> Lab {
        Lab::up_with(nodes, &[])
    }

    /// The same with extra `lab up` flags (e.g. `--gossip`).
    pub fn up_with(nodes: u8, extra: &[&str]) -> Lab {
        let name = shoal_netns::testing::unique_prefix("l");
        let seed: u32 = name.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let mut last = String::new();
        for attempt in 0..8u32 {
            let third = 1 + (seed.wrapping_add(attempt.wrapping_mul(97)) % 250);
            let subnet: ipnet::Ipv4Net = format!("198.18.{third}.0/24").parse().expect("subnet");
            // The guard exists before `up`, so a half-made lab is removed too.
            let lab = Lab { name: name.clone(), subnet };
            let out = shoal()
                .args([
                    "lab",
                    "up",
                    "--lab",
                    &name,
                    "--nodes",
                    &nodes.to_string(),
                    "--subnet",
                    &subnet.to_string(),
                ])
                .args(extra)
                .output()
                .expect("running shoal lab up");
            if out.status.success() {
                return lab;
            }
            last = lossy(&out.stderr);
            if !last.contains("already") {
                break;
            }
        }
        panic!("lab up failed: {last}");
    }

    /// `shoal --lab NAME ARGS...`
    pub fn shoal(&self, args: &[&str]) -> Output {
        shoal().arg("--lab").arg(&self.name).args(args).output().expect("running shoal")
    }

    /// `shoal --lab NAME --node NODE ARGS...`, which must succeed; returns stdout.
    pub fn on(&self, node: &str, args: &[&str]) -> String {
        run_ok(shoal().args(["--lab", &self.name, "--node", node]).args(args))
    }

    /// Runs a command inside a node; returns its output.
    pub fn exec(&self, node: &str, argv: &[&str]) -> Output {
        self.shoal(&[&["lab", "exec", node, "--"], argv].concat())
    }

    /// A node agent's `/metrics` text, fetched with curl over its API socket.
    pub fn metrics(&self, node: &str) -> String {
        let state = shoal::lab::LabState::load(&self.name).expect("lab state");
        let sock = &state.node(node).expect("lab node").socket;
        let out = Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(sock)
            .arg("http://agent/metrics")
            .output()
            .expect("curl");
        lossy(&out.stdout)
    }

    /// The underlay address of nodeI.
    pub fn addr(&self, i: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.subnet.network()) + u32::from(i))
    }

    /// This host's address on the lab bridge: where the lab sees a client on this host come
    /// from.
    pub fn host(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.subnet.network()) + 254)
    }

    /// `shoal --lab NAME --node NODE ARGS...`, which must fail; returns its stderr.
    pub fn refused(&self, node: &str, args: &[&str]) -> String {
        let out = self.shoal(&[&["--node", node], args].concat());
        assert!(!out.status.success(), "{args:?} was accepted: {}", lossy(&out.stdout));
        lossy(&out.stderr)
    }

    /// The value of the first line of a node's `/metrics` that starts with `line_prefix`.
    pub fn metric(&self, node: &str, line_prefix: &str) -> Option<u64> {
        self.metrics(node)
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse().ok())
    }

    /// How many of the service's backends the node's mesh has up, from its `/metrics`.
    pub fn backends_up(&self, node: &str, service: &str) -> usize {
        let label = format!("service=\"{service}\"");
        self.metrics(node)
            .lines()
            .filter(|l| l.starts_with("shoal_mesh_backend_up{") && l.contains(&label))
            .filter(|l| l.ends_with(" 1"))
            .count()
    }
}

/// A child process killed and reaped when dropped, also when the test fails.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The agents' logs, kept where SHOAL_TEST_LOGS says (to read after a failure).
        if let Some(to) = std::env::var_os("SHOAL_TEST_LOGS") {
            let from = shoal::lab::lab_dir(&self.name);
            for e in std::fs::read_dir(&from).into_iter().flatten().flatten() {
                let log = e.path().join("agent.log");
                let dest = std::path::Path::new(&to).join(format!(
                    "{}-{}.log",
                    self.name,
                    e.file_name().to_string_lossy()
                ));
                let _ = std::fs::copy(&log, dest);
            }
        }
        let out = shoal().args(["lab", "down", "--lab", &self.name]).output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!("lab down {} failed: {}", self.name, lossy(&o.stderr));
        }
    }
}

impl Lab {
    /// `service create NAME` on node1 of `shoal demo visitor` listening on `port` and published
    /// on the same port, with `flags` (e.g. `-d`, `--mode global`) before the command; its output.
    pub fn create_visitor(&self, name: &str, port: u16, flags: &[&str]) -> String {
        let publish = format!("{port}:{port}");
        let listen = format!("0.0.0.0:{port}");
        let head = ["service", "create", "--name", name, "-p", &publish];
        let tail = ["--", env!("CARGO_BIN_EXE_shoal"), "demo", "visitor", "--listen", &listen];
        self.on("node1", &[&head[..], flags, &tail[..]].concat())
    }

    /// `swarm init` on node1 and `swarm join` as workers on the other `nodes - 1`.
    pub fn swarm(&self, nodes: u8) {
        self.on("node1", &["swarm", "init"]);
        let token = self.on("node1", &["swarm", "join-token", "-q", "worker"]);
        let manager = format!("{}:2377", self.addr(1));
        for i in 2..=nodes {
            self.on(&format!("node{i}"), &["swarm", "join", "--token", token.trim(), &manager]);
        }
    }
}

/// Polls until `f` returns Some, or fails naming `what` after `limit`.
pub fn eventually<T>(
    what: &str,
    limit: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// One row of `service ps`.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: String,
    pub name: String,
    /// Empty while pending.
    pub node: String,
    pub desired: String,
    pub state: String,
    /// A row of the slot's history (` \_ name`).
    pub history: bool,
}

/// `service ps SERVICE` asked of node1.
pub fn ps(lab: &Lab, service: &str) -> Vec<TaskRow> {
    lab.on("node1", &["service", "ps", service])
        .lines()
        .skip(1)
        .map(|l| {
            let history = l.contains("\\_");
            let mut f: Vec<&str> = l.split_whitespace().filter(|w| *w != "\\_").collect();
            // A pending task has no node: its column is blank.
            if matches!(f[2], "Running" | "Shutdown") {
                f.insert(2, "");
            }
            TaskRow {
                id: f[0].to_owned(),
                name: f[1].to_owned(),
                node: f[2].to_owned(),
                desired: f[3].to_owned(),
                state: f[4].to_owned(),
                history,
            }
        })
        .collect()
}

/// Waits until a task of the service's current spec runs on `nodes` different nodes.
pub fn wait_on_nodes(lab: &Lab, service: &str, nodes: usize) {
    let what = format!("a task of {service} on {nodes} nodes");
    eventually(&what, std::time::Duration::from_secs(120), || {
        (running_per_node(lab, service).len() == nodes).then_some(())
    });
}

/// Running tasks of the service's current spec per node.
pub fn running_per_node(lab: &Lab, service: &str) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for t in ps(lab, service) {
        if !t.history && t.desired == "Running" && t.state == "Running" {
            *m.entry(t.node).or_default() += 1;
        }
    }
    m
}

/// `dig +short NAME` against the task DNS (127.0.0.11) inside a task's namespace.
pub fn dig(netns: &str, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", "+short", "+time=2", "+tries=1", "@127.0.0.11", name])
        .output()
        .expect("dig");
    lossy(&out.stdout).trim().to_owned()
}

/// `curl http://nodeN:PORT/visitor` from this host (the lab bridge reaches every node); "" when
/// nothing answers.
pub fn visit(lab: &Lab, node: u8, port: u16) -> String {
    curl(&format!("http://{}:{port}/visitor", lab.addr(node)), 10)
}

/// The namespace of a task: `<lab>-<node>-t-<first 12 of its id>`.
pub fn task_netns(lab: &Lab, node: &str, id: &str) -> String {
    format!("{}-{node}-t-{}", lab.name, &id[..12])
}
