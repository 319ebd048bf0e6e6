//! Root only: the agent needs no helper programs. A demo lab runs with a `PATH` that has no `nft`
//! and no `ip` (everything else of /usr/sbin, /usr/bin, /sbin and /bin is there, so the demo
//! still finds redis-server), and every node answers on 8100. And the kernel preflight at agent
//! start names a missing feature and exits non-zero: an agent in a private mount namespace where
//! /dev/net is an empty tmpfs (no /dev/net/tun) says TUN devices are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, lossy, require_root, shoal};

/// A directory of symlinks to every program in the usual directories except `nft` and `ip`.
fn path_without_nft_and_ip(dir: &Path) -> String {
    let mut seen = BTreeSet::new();
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name == "nft" || name == "ip" || !seen.insert(name.clone()) {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
        }
    }
    dir.display().to_string()
}

fn have(path: &str, cmd: &str) -> bool {
    Command::new("/bin/sh")
        .args(["-c", &format!("command -v {cmd}")])
        .env("PATH", path)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_demo_lab_runs_without_nft_and_ip_on_the_path() {
    if !require_root("a_demo_lab_runs_without_nft_and_ip_on_the_path") {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    let path = path_without_nft_and_ip(bin.path());
    assert!(!have(&path, "nft") && !have(&path, "ip"), "nft or ip still on {path}");
    if !have(&path, "redis-server") || !have(&path, "curl") {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "redis-server and curl needed");
        eprintln!("*** SKIPPED: redis-server or curl missing (scripts/install-test-deps.sh) ***");
        return;
    }
    let name = shoal_netns::testing::unique_prefix("nh");
    let seed: u32 = name.bytes().fold(11u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let mut lab = None;
    let mut last = String::new();
    for attempt in 0..8u32 {
        let third = 1 + (seed.wrapping_add(attempt.wrapping_mul(97)) % 250);
        let subnet: ipnet::Ipv4Net = format!("198.18.{third}.0/24").parse().unwrap();
        // The guard exists before `up`, so a half-made lab is removed too.
        let guard = Lab { name: name.clone(), subnet };
        let out = shoal()
            .args(["lab", "up", "--demo", "--nodes", "3", "--lab", &name, "--subnet"])
            .arg(subnet.to_string())
            .env("PATH", &path)
            .output()
            .unwrap();
        if out.status.success() {
            lab = Some(guard);
            break;
        }
        last = format!("{}{}", lossy(&out.stdout), lossy(&out.stderr));
        if !last.contains("already") {
            break;
        }
    }
    let lab = lab.unwrap_or_else(|| panic!("lab up --demo without nft and ip failed: {last}"));
    for i in 1..=3 {
        let url = format!("http://{}:8100/visitor", lab.addr(i));
        let out = Command::new("curl").args(["-sS", "--max-time", "10", &url]).output().unwrap();
        let page = lossy(&out.stdout);
        assert!(page.contains("visitor number"), "node{i} on 8100: {page} {}", lossy(&out.stderr));
    }
}

#[test]
fn an_agent_without_tun_devices_names_them_and_exits() {
    if !require_root("an_agent_without_tun_devices_names_them_and_exits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_shoal");
    // The shell prints its pid and execs the agent, which keeps it: the preflight namespace's
    // name carries it.
    let script = format!(
        "mount -t tmpfs shoal-test-no-tun /dev/net && echo $$ && exec {exe} agent \
         --node-name pf --advertise-addr 198.18.255.1 --data-dir {d}/data --socket {d}/api.sock",
        d = dir.path().display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pid = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut pid).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit without /dev/net/tun");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("cannot run the shoal agent"), "{err}");
    assert!(err.contains("TUN devices (/dev/net/tun"), "{err}");
    let ns = format!("shoal-preflight-{}", pid.trim());
    assert!(!pid.trim().is_empty() && !shoal_netns::NetNs::exists(&ns), "{ns} left behind");
    assert!(!Path::new("/run/netns").join(&ns).exists(), "{ns} left behind");
}
