//! CLI parity with the real docker CLI: a swarm of real dockerd 20.10 nodes (Debian's docker.io,
//! in network namespaces, made by `benches/swarm/docker-lab.sh`) and a shoal lab get the same
//! commands; every column Docker's `node ls`, `service ls` and `service ps` print must be in
//! shoal's tables too.
//!
//! Root only. Needs docker.io and busybox-static (scripts/install-test-deps.sh installs them);
//! it installs nothing itself. Outside CI a missing docker skips loudly; with CI=true it fails.

mod common;

#[path = "../benches/swarm/columns.rs"]
mod columns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, require_root, run_ok};

const DOCKER: &str = "/usr/bin/docker";

/// The Docker lab held open by the script; closing its stdin removes everything it made.
struct DockerLab {
    holder: Child,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    prefix: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/swarm/docker-lab.sh")
}

impl DockerLab {
    fn up() -> DockerLab {
        let prefix = shoal_netns::testing::unique_prefix("dp");
        let dir = std::env::temp_dir().join(format!("shoal-{prefix}"));
        let mut holder = Command::new(script())
            .arg("run")
            .arg(&dir)
            .args([&prefix, "198.19.65", "198.19.66.1/24", "198.19.80.0/20"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting benches/swarm/docker-lab.sh");
        let stdin = holder.stdin.take();
        let stdout = holder.stdout.take().expect("stdout");
        let stderr = holder.stderr.take().expect("stderr");
        let lab = DockerLab { holder, stdin, dir, prefix };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the script");
        if line.trim() != "ready" {
            let why: Vec<String> = BufReader::new(stderr).lines().map_while(Result::ok).collect();
            panic!("dockerd could not start here: {}", why.join(" "));
        }
        lab
    }

    fn docker(&self, args: &[&str]) -> String {
        let sock = format!("unix://{}/n1/docker.sock", self.dir.display());
        run_ok(Command::new(DOCKER).args(["-H", &sock]).args(args))
    }
}

impl Drop for DockerLab {
    fn drop(&mut self) {
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

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim_end().to_owned()
}

#[test]
fn shoal_prints_every_column_docker_prints() {
    if !require_root("shoal_prints_every_column_docker_prints") {
        return;
    }
    let missing: Vec<&str> = [DOCKER, "/usr/sbin/dockerd", "/usr/bin/busybox"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "{missing:?} missing with CI=true: scripts/install-test-deps.sh installs docker.io and \
             busybox-static"
        );
        eprintln!(
            "\n*** SKIPPED: {missing:?} missing (apt-get install docker.io busybox-static) ***\n"
        );
        return;
    }

    let docker = DockerLab::up();
    docker.docker(&[
        "swarm",
        "init",
        "--advertise-addr",
        "198.19.65.1",
        "--default-addr-pool",
        "198.19.96.0/20",
    ]);
    docker.docker(&[
        "service",
        "create",
        "-d",
        "--no-resolve-image",
        "--name",
        "web",
        "bb:latest",
        "httpd",
        "-f",
    ]);
    let theirs = [
        ("node ls", first_line(&docker.docker(&["node", "ls"]))),
        ("service ls", first_line(&docker.docker(&["service", "ls"]))),
        ("service ps", first_line(&docker.docker(&["service", "ps", "web"]))),
    ];
    drop(docker);

    let lab = Lab::up(1);
    lab.swarm(1);
    lab.on("node1", &["service", "create", "-d", "--name", "web", "--", "sleep", "600"]);
    let ours = [
        first_line(&lab.on("node1", &["node", "ls"])),
        first_line(&lab.on("node1", &["service", "ls"])),
        first_line(&lab.on("node1", &["service", "ps", "web"])),
    ];

    let mut dropped = Vec::new();
    for ((what, d), s) in theirs.iter().zip(&ours) {
        // A real header, not an error message, on both sides.
        assert!(d.starts_with("ID "), "docker {what} printed {d:?}");
        assert!(s.starts_with("ID "), "shoal {what} printed {s:?}");
        let (lacks, _) = columns::compare(d, s);
        if !lacks.is_empty() {
            dropped.push(format!("`{what}` lacks {lacks:?} (docker: {d:?}; shoal: {s:?})"));
        }
    }
    assert!(dropped.is_empty(), "shoal drops columns docker prints: {}", dropped.join("; "));
}

#[test]
fn a_missing_column_is_caught_and_single_space_padding_is_read() {
    // docker 20.10's `service ps` header, and shoal's before it had IMAGE and PORTS.
    let docker = "ID             NAME      IMAGE       NODE      DESIRED STATE   CURRENT STATE   ERROR     PORTS";
    let old = "ID   NAME   NODE   DESIRED STATE CURRENT STATE   ADDRESSES   ERROR";
    let (lacks, extra) = columns::compare(docker, old);
    assert_eq!(lacks, ["IMAGE", "PORTS"]);
    assert_eq!(extra, ["ADDRESSES"]);
    let (lacks, _) = columns::compare(docker, &format!("{old} IMAGE PORTS"));
    assert!(lacks.is_empty(), "{lacks:?}");
    // A column name is matched whole: STATUS is not found inside MANAGER STATUS.
    let (lacks, _) = columns::compare("ID   STATUS   MANAGER STATUS", "ID MANAGER STATUS");
    assert_eq!(lacks, ["STATUS"]);
}
