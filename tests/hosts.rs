//! The README's "Run it on your hosts", followed as written on three lab nodes treated as three
//! separate machines: each has its own network, mount, UTS and PID namespaces, with private
//! /etc, /var/lib, /usr/local (copy-on-write over the real ones), /run/shoal and /run/netns,
//! so nothing touches this machine's paths and the agents cannot see each other's files. The
//! install block's shell lines run verbatim in each node; `systemctl` cannot run there, so the
//! installed unit's `ExecStartPre`/`ExecStart` lines run instead, with systemd's PATH; node3 also
//! takes the README's optional step, the example config installed unedited. Then the
//! swarm block (init with the node's address, the printed join command) and the tutorial's core
//! through the installed `shoal`: a service published on 8100 answering on every node, an
//! encrypted attachable overlay, `redis-server` run on it and reached by name.
//!
//! Cleanup: killing a node's holder process (PID 1 of its PID namespace) kills everything that
//! ran inside, its mounts and namespaces go with it, and the lab guard removes the nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Lab, eventually, lossy, require_root, visit};

/// The PATH systemd gives a service.
const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";
/// The directories each host gets its own copy-on-write view of.
const LAYERED: [&str; 3] = ["/etc", "/var/lib", "/usr/local"];

/// One lab node as a separate machine; dropping it kills everything that ran inside.
struct Host {
    name: String,
    holder: Child,
    /// `nsenter` running the unit's `ExecStart` (the agent is its child inside the node).
    agent: Option<Child>,
    /// PID (in this machine's PID namespace) of the node's PID 1, whose namespaces we enter.
    pid: u32,
    /// Where the README's commands run: a checkout with `target/release/shoal` and `packaging/`.
    checkout: PathBuf,
    log: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        // `unshare --kill-child`: its child is the node's PID 1, and with it every process of
        // the node dies, the agent, its tasks and everything they hold.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl Host {
    fn start(lab: &Lab, node: &str, dir: &Path, checkout: &Path) -> Host {
        let root = dir.join(node);
        std::fs::create_dir_all(&root).unwrap();
        let ready = root.join("ready");
        // Upper layers live on a tmpfs of the node's own, which any filesystem below supports.
        let mut script = format!(
            "set -e\nhostname {node}\nmount -t tmpfs tmpfs {r}\n",
            r = root.join("layers").display()
        );
        std::fs::create_dir_all(root.join("layers")).unwrap();
        for d in LAYERED {
            let (u, w) =
                (root.join("layers/upper").join(&d[1..]), root.join("layers/work").join(&d[1..]));
            script.push_str(&format!(
                "mkdir -p {u} {w}\nmount -t overlay overlay -o lowerdir={d},upperdir={u},workdir={w} {d}\n",
                u = u.display(),
                w = w.display()
            ));
        }
        // What exists only on this host: its agent's socket and runtime files, its namespaces.
        for d in ["/run/shoal", "/run/netns"] {
            script.push_str(&format!("mount -t tmpfs -o mode=0755 tmpfs {d}\n"));
        }
        script.push_str(&format!("touch {}\nexec sleep infinity\n", ready.display()));
        let netns = format!("/run/netns/{}-{node}", lab.name);
        let holder = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["--", "unshare", "--mount", "--propagation", "slave", "--uts", "--pid"])
            // The node's own /proc, so the PIDs its agent sees are the ones /proc shows it.
            .args(["--fork", "--mount-proc", "--kill-child", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("nsenter and unshare (util-linux)");
        let mut host = Host {
            name: node.to_owned(),
            pid: 0,
            holder,
            agent: None,
            checkout: checkout.to_owned(),
            log: root.join("agent.log"),
        };
        eventually(&format!("{node}'s namespaces"), Duration::from_secs(20), || {
            assert!(host.holder.try_wait().unwrap().is_none(), "making {node} failed");
            ready.exists().then_some(())
        });
        let children = format!("/proc/{0}/task/{0}/children", host.holder.id());
        host.pid = std::fs::read_to_string(children).unwrap().trim().parse().unwrap();
        host
    }

    /// A command inside the node, in the README's working directory, with systemd's PATH.
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-u", "-n", "-p"])
            .arg(format!("--wd={}", self.checkout.display()))
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", SYSTEMD_PATH)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap()
    }

    fn ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{}: {argv:?} failed: {}\n{}\nagent log:\n{}",
            self.name,
            lossy(&out.stdout),
            lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        lossy(&out.stdout)
    }

    /// What `systemctl enable --now shoal` does with the installed unit: its `ExecStartPre`
    /// lines, which must succeed, then its `ExecStart` line, left running.
    fn start_unit(&mut self) {
        let unit = self.ok(&["cat", "/etc/systemd/system/shoal.service"]);
        let exec = |key: &str| -> Vec<Vec<String>> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(key))
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect()
        };
        for pre in exec("ExecStartPre=") {
            let argv: Vec<&str> = pre.iter().map(String::as_str).collect();
            self.ok(&argv);
        }
        let start = exec("ExecStart=");
        assert_eq!(start.len(), 1, "{unit}");
        let argv: Vec<&str> = start[0].iter().map(String::as_str).collect();
        let log = std::fs::File::create(&self.log).unwrap();
        let agent = self.command(&argv).stdout(log.try_clone().unwrap()).stderr(log).spawn();
        self.agent = Some(agent.unwrap());
        eventually(&format!("{}'s agent answering", self.name), Duration::from_secs(60), || {
            self.run(&["shoal", "info"]).status.success().then_some(())
        });
    }
}

/// The inline code spans of README.md's section `title` that contain `needle`.
fn readme_inline(title: &str, needle: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## ").find(|s| s.starts_with(title)).expect("README section");
    // Outside code blocks, every other piece between backticks is a span.
    let prose: Vec<&str> = section.split("```").step_by(2).collect();
    let text = prose.join(" ").replace('\n', " ");
    text.split('`').skip(1).step_by(2).filter(|c| c.contains(needle)).map(str::to_owned).collect()
}

/// The shell lines of the `sh` code blocks of README.md's section `title`, comments dropped.
fn readme_blocks(title: &str) -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## ").find(|s| s.starts_with(title)).expect("README section");
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while lines.any(|l| l.trim() == "```sh") {
        let block: Vec<String> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(|l| l.split(" # ").next().unwrap_or("").trim().to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        blocks.push(block);
    }
    blocks
}

#[test]
fn the_readme_install_runs_on_three_separate_hosts() {
    if !require_root("the_readme_install_runs_on_three_separate_hosts") {
        return;
    }
    let needed = ["nsenter", "unshare", "curl", "redis-server"];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "{missing:?} needed in CI");
        eprintln!("*** SKIPPED hosts test: {missing:?} missing ***");
        return;
    }
    let blocks = readme_blocks("Run it on your hosts");
    assert_eq!(blocks.len(), 2, "an install block and a swarm block: {blocks:?}");
    let (install, swarm) = (&blocks[0], &blocks[1]);

    let lab = Lab::up_with(3, &["--no-agents"]);
    // A checkout as the README assumes one: the binary under test as target/release/shoal.
    let dir = tempfile::tempdir().unwrap();
    let checkout = dir.path().join("checkout");
    std::fs::create_dir_all(checkout.join("target/release")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_shoal"), checkout.join("target/release/shoal"))
        .unwrap();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/packaging"),
        checkout.join("packaging"),
    )
    .unwrap();
    let mut hosts: Vec<Host> =
        (1..=3).map(|i| Host::start(&lab, &format!("node{i}"), dir.path(), &checkout)).collect();

    // The README's optional step, the example config installed unedited, on the last host: as
    // shipped it must leave the node ready for the swarm like the others.
    let config_line = readme_inline("Run it on your hosts", "/etc/shoal/agent.toml")
        .into_iter()
        .find(|c| c.starts_with("install "))
        .expect("the README's line installing packaging/agent.toml");
    for (i, host) in hosts.iter_mut().enumerate() {
        // Nothing of shoal is on the host before the install.
        assert!(!host.run(&["test", "-e", "/usr/local/bin/shoal"]).status.success());
        if i == 2 {
            host.ok(&["sh", "-c", &config_line]);
        }
        for line in install {
            if line.starts_with("systemctl") {
                assert!(line.contains("enable --now shoal"), "{line}");
                host.start_unit();
            } else {
                host.ok(&["sh", "-c", line]);
            }
        }
        let info = host.ok(&["shoal", "info"]);
        assert!(info.contains(&format!("Node:            {}", host.name)), "{info}");
        let config = host.run(&["test", "-e", "/etc/shoal/agent.toml"]).status.success();
        assert_eq!(config, i == 2, "{}: only node3 has a config file", host.name);
    }

    let init = swarm.iter().find(|l| l.starts_with("shoal swarm init")).expect("init line");
    let init = init.replace("192.0.2.10", &lab.addr(1).to_string());
    let out = hosts[0].ok(&["sh", "-c", &init]);
    let join = out.lines().map(str::trim).find(|l| l.starts_with("shoal swarm join --token"));
    let join = join.unwrap_or_else(|| panic!("no join command printed: {out}"));
    assert!(swarm.iter().any(|l| l.starts_with("shoal swarm join --token")), "{swarm:?}");
    for host in &hosts[1..] {
        assert!(host.ok(&["sh", "-c", join]).contains("joined a swarm"));
    }
    eventually("three Ready nodes", Duration::from_secs(60), || {
        let ls = hosts[0].ok(&["shoal", "node", "ls"]);
        (ls.matches("Ready").count() == 3).then_some(())
    });

    let s = |h: &Host, args: &[&str]| h.ok(&[&["shoal"], args].concat());
    s(
        &hosts[0],
        &[
            "service",
            "create",
            "--replicas",
            "3",
            "--name",
            "myhelloworld",
            "-p",
            "8100:8100",
            "--",
            "shoal",
            "demo",
            "visitor",
        ],
    );
    for n in 1..=3 {
        let page = eventually("the mesh on every node", Duration::from_secs(60), || {
            Some(visit(&lab, n, 8100)).filter(|p| p.contains("Hello World"))
        });
        assert!(page.contains("connection to redis error"), "node{n}: {page}");
    }
    s(
        &hosts[0],
        &["network", "create", "-d", "overlay", "--opt", "encrypted", "--attachable", "my-overlay"],
    );
    s(&hosts[0], &["service", "update", "--network-add", "my-overlay", "myhelloworld"]);
    s(
        &hosts[2],
        &[
            "run",
            "-d",
            "--name",
            "myredis",
            "--network",
            "my-overlay",
            "--",
            "redis-server",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    );
    // Every node's mesh reaches a replica that reaches redis on node3 by name, encrypted.
    for n in 1..=3 {
        let page = eventually("a visitor count on every node", Duration::from_secs(90), || {
            Some(visit(&lab, n, 8100)).filter(|p| p.contains("you are visitor number"))
        });
        assert!(page.starts_with("Hello World"), "node{n}: {page}");
        eprintln!("node{n}:8100 -> {}", page.trim());
    }
    drop(hosts);
}
