//! shoal's side: a `shoal lab` of 3 nodes (with its fast timings or production ones), driven
//! with the `shoal` CLI of this build as a user would.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::docker::run;
use super::{Cluster, Program, Task};
use crate::Lab;

/// The static busybox the tasks run (the same binary Docker's image is made of).
const BUSYBOX: &str = "/usr/bin/busybox";

/// A shoal lab and the web root its httpd tasks serve.
pub struct ShoalLab {
    lab: Lab,
    www: PathBuf,
    production: bool,
}

impl ShoalLab {
    /// `shoal lab up` with the lab's fast timings, or with `--cluster-tuning default`.
    pub fn up(production: bool, www: &Path) -> anyhow::Result<ShoalLab> {
        let lab = if production {
            Lab::up("sd", &["--cluster-tuning", "default"])?
        } else {
            Lab::up("sf", &[])?
        };
        Ok(ShoalLab { lab, www: www.to_owned(), production })
    }

    fn shoal(&self, node: usize) -> Command {
        let mut c = crate::shoal();
        c.args(["--lab", &self.lab.name, "--node", &self.hostname(node)]);
        c
    }
}

impl Cluster for ShoalLab {
    fn name(&self) -> String {
        if self.production {
            "shoal, production timings".to_owned()
        } else {
            "shoal, lab timings".to_owned()
        }
    }

    fn addr(&self, node: usize) -> Ipv4Addr {
        self.lab.state.nodes[node].addr
    }

    fn client_addr(&self) -> Ipv4Addr {
        self.lab.state.host_addr
    }

    fn client(&self, argv: &[&str]) -> Command {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    }

    fn cli(&self, node: usize, args: &[&str]) -> Command {
        let mut c = self.shoal(node);
        c.args(args);
        c
    }

    fn init(&self) -> anyhow::Result<()> {
        run(&mut self.cli(0, &["swarm", "init"]))?;
        Ok(())
    }

    fn join(&self, node: usize, token: &str) -> anyhow::Result<()> {
        let manager = format!("{}:2377", self.addr(0));
        run(&mut self.cli(node, &["swarm", "join", "--token", token, &manager]))?;
        Ok(())
    }

    fn service_create(&self, name: &str, extra: &[&str], program: Program) -> Command {
        let mut c = self.shoal(0);
        c.args(["service", "create", "--name", name])
            .args(extra)
            .arg("--")
            .args(program.argv(BUSYBOX, &self.www.display().to_string()));
        c
    }

    fn run_task(
        &self,
        node: usize,
        name: &str,
        network: &str,
        program: Program,
    ) -> anyhow::Result<Task> {
        let id = run(self
            .shoal(node)
            .args(["run", "-d", "--name", name, "--network", network, "--"])
            .args(program.argv(BUSYBOX, &self.www.display().to_string())))?;
        let id = id.trim();
        let short = id.get(..12).with_context(|| format!("run -d printed {id:?}, not an id"))?;
        // The agent names a task's namespace after the lab's node and the task's id.
        let ns = format!("{}-t-{short}", self.lab.state.nodes[node].netns);
        Ok(Task { enter: vec!["ip".into(), "netns".into(), "exec".into(), ns] })
    }

    fn hostname(&self, node: usize) -> String {
        self.lab.state.nodes[node].name.clone()
    }

    fn kill_node(&self, node: usize) -> anyhow::Result<()> {
        run(crate::shoal()
            .args(["lab", "stop", "--lab", &self.lab.name, "--kill"])
            .arg(self.hostname(node)))?;
        Ok(())
    }
}
