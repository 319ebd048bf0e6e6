//! Docker Swarm, side by side: the Swarm tutorial's steps run on a fresh 3-node lab of each
//! system in the same run, timed the same way, through each system's own CLI.
//!
//! [`Cluster`] is what the steps need from a system (its CLI on a node, a client that reaches
//! the nodes, a way into a task's network namespace); `docker.rs` implements it for real
//! dockerd 20.10 nodes, `shoal_lab.rs` for a `shoal lab`. [`scenario::play`] runs the steps on
//! one fresh lab and returns its figures, the capabilities it tried (with the system's own
//! words when one failed) and the CLI's table headers; `section.rs` turns the runs into rows.

pub mod columns;
pub mod docker;
pub mod scenario;
pub mod section;
pub mod shoal_lab;

use std::net::Ipv4Addr;
use std::process::Command;

/// Nodes in every lab of this section.
pub const NODES: usize = 3;

/// What runs in a task: the same busybox programs on both systems (an imported image for
/// Docker, the host's static busybox for shoal).
#[derive(Debug, Clone, Copy)]
pub enum Program {
    /// `busybox httpd` on port 80: `/` answers "ok", `/cgi-bin/ip` the client's address.
    Httpd,
    /// `busybox sleep`: a task to look from.
    Sleep,
}

impl Program {
    /// The program's argv with `www` as the web root.
    pub fn argv(self, busybox: &str, www: &str) -> Vec<String> {
        let v: Vec<&str> = match self {
            Program::Httpd => vec![busybox, "httpd", "-f", "-p", "80", "-h", www],
            Program::Sleep => vec![busybox, "sleep", "3600"],
        };
        v.into_iter().map(str::to_owned).collect()
    }
}

/// A running task or container: the argv prefix that runs a command in its network namespace.
#[derive(Debug, Clone)]
pub struct Task {
    pub enter: Vec<String>,
}

impl Task {
    /// `argv` inside the task's network namespace (with this host's files and tools).
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new(&self.enter[0]);
        c.args(&self.enter[1..]).args(argv);
        c
    }
}

/// A 3-node lab of one system, as the tutorial's steps use it. Nodes are 0-based.
pub trait Cluster {
    /// The system's name in the report.
    fn name(&self) -> String;
    /// A node's underlay address.
    fn addr(&self, node: usize) -> Ipv4Addr;
    /// The address clients connect from (what a task should see as its client).
    fn client_addr(&self) -> Ipv4Addr;
    /// `argv` where a client of the cluster runs (it reaches every node's address).
    fn client(&self, argv: &[&str]) -> Command;
    /// The system's CLI on a node.
    fn cli(&self, node: usize, args: &[&str]) -> Command;
    /// `swarm init` on node 0.
    fn init(&self) -> anyhow::Result<()>;
    /// `swarm join` of `node` through node 0.
    fn join(&self, node: usize, token: &str) -> anyhow::Result<()>;
    /// `service create --name NAME EXTRA... PROGRAM` on node 0, waiting as the CLI does.
    fn service_create(&self, name: &str, extra: &[&str], program: Program) -> Command;
    /// A standalone task/container on `node`, attached to `network`.
    fn run_task(
        &self,
        node: usize,
        name: &str,
        network: &str,
        program: Program,
    ) -> anyhow::Result<Task>;
    /// A node's name in `node ls` and `service ps`.
    fn hostname(&self, node: usize) -> String;
    /// Kills a node's agent or daemon as a crash would.
    fn kill_node(&self, node: usize) -> anyhow::Result<()>;
}
