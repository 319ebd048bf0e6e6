//! The Docker Swarm peer: three real dockerd 20.10 nodes in network namespaces, made and held by
//! `benches/swarm/docker-lab.sh`, driven here with the real docker CLI.
//!
//! The script owns every kernel object Docker makes (namespaces, mounts, cgroups, daemons and
//! their containers) and removes them when its stdin closes. [`DockerLab`] holds that pipe, so
//! the lab goes away when it is dropped, when the suite fails, and when the suite is killed.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Cluster, Program, Task};

/// The docker CLI of the docker.io package (a newer one may be earlier on the PATH).
pub const DOCKER: &str = "/usr/bin/docker";
/// The daemon that makes a node.
pub const DOCKERD: &str = "/usr/sbin/dockerd";

/// The underlay: nodes on .1-.3, the client on .254 (all of Docker's addresses are inside
/// 198.19.64.0/18, apart from the shoal labs' 198.18.200-249.0/24).
const NET: &str = "198.19.65";
/// docker0 on every node (unused by the swarm, but the daemon wants one).
const BIP: &str = "198.19.66.1/24";
/// The daemons' local networks (docker_gwbridge).
const LOCAL_POOL: &str = "198.19.80.0/20";
/// The swarm's overlay networks (`swarm init --default-addr-pool`).
const SWARM_POOL: &str = "198.19.96.0/20";

/// The helper script that makes and removes the lab.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/swarm/docker-lab.sh")
}

/// Why Docker cannot run here, or `None` when it can be tried.
pub fn missing() -> Option<String> {
    let needed =
        [(DOCKER, "docker.io"), (DOCKERD, "docker.io"), ("/usr/bin/busybox", "busybox-static")];
    for (bin, what) in needed {
        if !Path::new(bin).exists() {
            return Some(format!("peer not installed: {bin} missing (apt-get install {what})"));
        }
    }
    None
}

/// The docker.io version, e.g. "20.10.24+dfsg1".
pub fn version() -> Option<String> {
    let out = Command::new(DOCKERD).arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    Some(v.trim().trim_start_matches("Docker version ").to_owned())
}

/// A running 3-node Docker lab; removed on drop.
pub struct DockerLab {
    holder: Child,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    prefix: String,
}

impl DockerLab {
    /// Makes the lab: namespaces `PREFIX-n1..3` on a bridge in `PREFIX-sw`; `dir` must not
    /// exist.
    pub fn up(dir: &Path, prefix: &str) -> anyhow::Result<DockerLab> {
        let mut holder = Command::new(script())
            .arg("run")
            .arg(dir)
            .args([prefix, NET, BIP, LOCAL_POOL])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting benches/swarm/docker-lab.sh")?;
        let stdin = holder.stdin.take();
        let stdout = holder.stdout.take().context("no stdout")?;
        let stderr = holder.stderr.take().context("no stderr")?;
        let lab = DockerLab { holder, stdin, dir: dir.to_owned(), prefix: prefix.to_owned() };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut why = String::new();
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                why.push_str(&l);
                why.push(' ');
            }
            bail!("the Docker lab did not start: {}", why.trim());
        }
        // The script's later complaints (teardown) go to the suite's stderr.
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{l}");
            }
        });
        Ok(lab)
    }

    fn sock(&self, node: usize) -> String {
        format!("unix://{}/n{}/docker.sock", self.dir.display(), node + 1)
    }

    fn netns(&self, node: usize) -> String {
        format!("{}-n{}", self.prefix, node + 1)
    }

    /// `docker` against node `node` (0-based), without waiting for its result.
    pub fn docker(&self, node: usize) -> Command {
        let mut c = Command::new(DOCKER);
        c.args(["-H", &self.sock(node)]).env("DOCKER_CLI_EXPERIMENTAL", "disabled");
        c
    }

    /// The pid of a container's first process (dockerd runs in this PID namespace).
    fn pid_of(&self, node: usize, container: &str) -> anyhow::Result<u32> {
        let out = run(self.docker(node).args(["inspect", "-f", "{{.State.Pid}}", container]))?;
        out.trim().parse().with_context(|| format!("pid of {container}: {out:?}"))
    }
}

impl Drop for DockerLab {
    fn drop(&mut self) {
        // Closing the pipe tells the script to remove everything it made.
        drop(self.stdin.take());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(_)) = self.holder.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new(script()).arg("down").arg(&self.dir).arg(&self.prefix).status();
    }
}

/// Runs a command that must succeed; its stdout, or an error with its own words.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = if err.trim().is_empty() { String::from_utf8_lossy(&out.stdout) } else { err };
        bail!("{}", msg.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster for DockerLab {
    fn name(&self) -> String {
        "Docker Swarm".to_owned()
    }

    fn addr(&self, node: usize) -> Ipv4Addr {
        format!("{NET}.{}", node + 1).parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn client_addr(&self) -> Ipv4Addr {
        format!("{NET}.254").parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn client(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-sw", self.prefix)]).args(argv);
        c
    }

    fn cli(&self, node: usize, args: &[&str]) -> Command {
        let mut c = self.docker(node);
        c.args(args);
        c
    }

    fn init(&self) -> anyhow::Result<()> {
        let me = self.addr(0).to_string();
        run(&mut self.cli(
            0,
            &["swarm", "init", "--advertise-addr", &me, "--default-addr-pool", SWARM_POOL],
        ))?;
        Ok(())
    }

    fn join(&self, node: usize, token: &str) -> anyhow::Result<()> {
        let manager = format!("{}:2377", self.addr(0));
        let me = self.addr(node).to_string();
        run(&mut self
            .cli(node, &["swarm", "join", "--token", token, "--advertise-addr", &me, &manager]))?;
        Ok(())
    }

    fn service_create(&self, name: &str, extra: &[&str], program: Program) -> Command {
        let mut c = self.docker(0);
        c.args(["service", "create", "--detach=false", "--no-resolve-image", "--name", name])
            .args(extra)
            .arg("bb:latest")
            .args(program.argv("busybox", "/www"));
        c
    }

    fn run_task(
        &self,
        node: usize,
        name: &str,
        network: &str,
        program: Program,
    ) -> anyhow::Result<Task> {
        run(self
            .docker(node)
            .args(["run", "-d", "--name", name, "--network", network, "bb:latest"])
            .args(program.argv("busybox", "/www")))?;
        let pid = self.pid_of(node, name)?;
        Ok(Task { enter: vec!["nsenter".into(), "-t".into(), pid.to_string(), "-n".into()] })
    }

    fn hostname(&self, node: usize) -> String {
        self.netns(node)
    }

    fn kill_node(&self, node: usize) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.join(format!("n{}/docker.pid", node + 1)))?;
        run(Command::new("kill").args(["-9", pid.trim()]))?;
        Ok(())
    }
}
