//! The `reliability` section: what clients see while the cluster breaks, measured on a fresh
//! 3-node lab per round (three managers, a 3-replica web service published on 8100, clients on
//! this host sending one `Connection: close` request after another to node1 or node2).
//!
//! Per round, in order: node3's underlay link is cut for 20 s and healed;
//! then the leader, node1, is killed whole (`kill -9` of its agent and every process in its
//! namespaces). Figures: requests sent in each scenario, those sent after the event that failed,
//! those in flight at the event (their bytes on the cut link or in a killed task) that were
//! lost, and failures after the heal; the time
//! until the survivors mark the node Down (detection), until its tasks run elsewhere
//! (convergence), and until a new Raft leader is there (failover). The tests in
//! `tests/chaos.rs` assert the goals; this section records the figures.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::common::{self, Row};
use super::report::Section;
use super::{Args, Lab, Spec, section_of};

fn get(target: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    s.read_to_end(&mut body).is_ok() && body.get(8..12) == Some(b" 200".as_slice())
}

/// One request: when it was sent, when it ended, and whether a whole HTTP 200 came back.
#[derive(Clone, Copy)]
struct Sample {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// Clients sending to `target` until stopped; the outcomes.
fn load<T>(target: SocketAddr, clients: usize, f: impl FnOnce() -> T) -> (T, Vec<Sample>) {
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let out = std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let ok = get(target);
                    let sample = Sample { start, end: Instant::now(), ok };
                    samples.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
                    std::thread::sleep(Duration::from_millis(if ok { 10 } else { 50 }));
                }
            });
        }
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    });
    (out, samples.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Requests sent from `since` on, and how many of them failed.
fn count(samples: &[Sample], since: Instant) -> (f64, f64) {
    let after = samples.iter().filter(|s| s.start >= since);
    let (sent, failed) = after.fold((0, 0), |(n, f), s| (n + 1, f + usize::from(!s.ok)));
    (sent as f64, failed as f64)
}

/// Requests in flight at `at` (sent before, ended after) that failed: no path can save them,
/// as their bytes were on the cut link or in a killed task.
fn lost_in_flight(samples: &[Sample], at: Instant) -> f64 {
    samples.iter().filter(|s| s.start < at && s.end > at && !s.ok).count() as f64
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn node_is(lab: &Lab, asked: &str, node: &str, status: &str) -> bool {
    lab.on(asked, &["node", "ls"])
        .is_ok_and(|o| o.lines().any(|l| l.contains(node) && l.contains(status)))
}

/// Running tasks of `web` per node, asked of `asked`.
fn web_tasks(lab: &Lab, asked: &str) -> Vec<String> {
    let Ok(out) = lab.on(asked, &["service", "ps", "web"]) else { return Vec::new() };
    out.lines()
        .skip(1)
        .filter(|l| !l.contains("\\_"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[3] == "Running" && f[4] == "Running").then(|| f[2].to_owned())
        })
        .collect()
}

fn is_leader(lab: &Lab, node: &str) -> bool {
    let Ok(n) = lab.state.node(node) else { return false };
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "1", "--unix-socket"])
        .arg(&n.socket)
        .arg("http://agent/metrics")
        .output();
    out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|k| k.ends_with("raft_is_leader")) && w.next() == Some("1")
        })
    })
}

fn kill_whole(lab: &Lab, node: &str) {
    let own = format!("{}-{node}", lab.name);
    for ns in shoal_netns::NetNs::list() {
        if ns != own && !ns.starts_with(&format!("{own}-")) {
            continue;
        }
        for pid in shoal_netns::NetNs::open(&ns).map(|n| n.pids()).unwrap_or_default() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
}

fn set_link(lab: &Lab, node: usize, up: bool) -> anyhow::Result<()> {
    let veth = &lab.state.nodes[node - 1].host_veth;
    let ok = std::process::Command::new("ip")
        .args(["link", "set", veth, if up { "up" } else { "down" }])
        .status()?
        .success();
    if !ok {
        bail!("ip link set {veth} failed");
    }
    Ok(())
}

/// One round's figures: link cut (sent, failed after the cut, lost in flight at it, failed from
/// the heal on, Down after, tasks elsewhere after) and leader kill (sent, failed after the kill,
/// lost in flight at it, new leader after, Down after, tasks elsewhere after).
type Round = ([f64; 6], [f64; 6]);

fn round() -> anyhow::Result<Round> {
    let lab = Lab::up("r", &[])?;
    let addr = |i: usize| -> Ipv4Addr { lab.state.nodes[i - 1].addr };
    lab.on("node1", &["swarm", "init"])?;
    let token = lab.on("node1", &["swarm", "join-token", "-q", "manager"])?;
    let at = format!("{}:2377", addr(1));
    for n in ["node2", "node3"] {
        lab.on(n, &["swarm", "join", "--token", token.trim(), &at])?;
    }
    let root = tempfile::tempdir()?;
    std::fs::write(root.path().join("index.html"), "bench\n")?;
    let root_s = root.path().to_str().context("temp dir path")?;
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "-p",
            "8100:80",
            "--",
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            root_s,
        ],
    )?;
    let web = |i: usize| SocketAddr::from((addr(i), 8100));
    wait("every node answering", Duration::from_secs(60), || (1..=3).all(|i| get(web(i))))?;

    // node3's link cut, then healed.
    let cut_for = Duration::from_secs(20);
    let (r, samples) = load(web(1), 4, || -> anyhow::Result<_> {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        set_link(&lab, 3, false)?;
        let cut = Instant::now();
        let (mut down, mut moved) = (None, None);
        while t.elapsed() < cut_for {
            down = down.or_else(|| node_is(&lab, "node1", "node3", "Down").then(|| t.elapsed()));
            moved = moved.or_else(|| {
                let w = web_tasks(&lab, "node1");
                (w.len() == 3 && !w.iter().any(|n| n == "node3")).then(|| t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(100));
        }
        set_link(&lab, 3, true)?;
        let healed = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        Ok((cut, down, moved, healed))
    });
    let (cut, down, moved, healed) = r?;
    let (sent, _) = count(&samples, samples.first().map_or(healed, |s| s.start));
    let (_, failed) = count(&samples, cut);
    let lost = lost_in_flight(&samples, cut);
    let (_, at_heal) = count(&samples, healed);
    let secs = |what: &str, d: Option<Duration>| {
        d.map(|d| d.as_secs_f64()).with_context(|| format!("{what} was never seen"))
    };
    let cut = [
        sent,
        failed,
        lost,
        at_heal,
        secs("node3 Down", down)?,
        secs("node3's task moved", moved)?,
    ];
    wait("node3 Ready again", Duration::from_secs(30), || {
        node_is(&lab, "node1", "node3", "Ready")
    })?;

    // The leader killed whole; clients on node2.
    let (r, samples) = load(web(2), 4, || -> anyhow::Result<_> {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        kill_whole(&lab, "node1");
        let killed = Instant::now();
        let (mut failover, mut down, mut moved) = (None, None, None);
        while t.elapsed() < Duration::from_secs(30) && moved.is_none() {
            failover = failover.or_else(|| {
                ["node2", "node3"].iter().any(|n| is_leader(&lab, n)).then(|| t.elapsed())
            });
            down = down.or_else(|| node_is(&lab, "node2", "node1", "Down").then(|| t.elapsed()));
            moved = moved.or_else(|| {
                let w = web_tasks(&lab, "node2");
                (w.len() == 3 && !w.iter().any(|n| n == "node1")).then(|| t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok((killed, failover, down, moved))
    });
    let (killed, failover, down, moved) = r?;
    let (sent, _) = count(&samples, samples.first().map_or(killed, |s| s.start));
    let (_, failed) = count(&samples, killed);
    let kill = [
        sent,
        failed,
        lost_in_flight(&samples, killed),
        secs("a new leader", failover)?,
        secs("node1 Down", down)?,
        secs("node1's task moved", moved)?,
    ];
    println!(
        "[reliability] link cut: {} sent, {} sent after it failed, {} in flight lost, {} failed \
         from the heal on, Down after {:.2} s, tasks moved after {:.2} s; leader kill: {} sent, \
         {} sent after it failed, {} in flight lost, new leader after {:.2} s, Down after {:.2} s, \
         tasks moved after {:.2} s",
        cut[0],
        cut[1],
        cut[2],
        cut[3],
        cut[4],
        cut[5],
        kill[0],
        kill[1],
        kill[2],
        kill[3],
        kill[4],
        kill[5]
    );
    Ok((cut, kill))
}

/// The section: `rounds` fresh labs (1 with `--quick`, 3 in a full run), medians per figure.
pub fn reliability(spec: &Spec, args: &Args) -> anyhow::Result<Section> {
    if !common::have("curl") || !common::have("busybox") {
        bail!("curl and busybox are needed");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { spec.full_rounds });
    let recorded = common::rounds(0, rounds, |_, _| round())?;
    let col = |f: fn(&Round) -> f64| -> Vec<f64> { recorded.iter().map(f).collect() };
    let cut_s = 20;
    let how = "4 clients on this host, one Connection: close GET after another (10 ms apart), \
               through the published port";
    let rows = vec![
        Row::no_peer(
            format!("link cut {cut_s} s + heal: requests sent"),
            "requests",
            false,
            &col(|r| r.0[0]),
            format!("{how} of node1"),
        ),
        Row::no_peer(
            format!("link cut {cut_s} s + heal: requests sent after the cut that failed"),
            "requests",
            true,
            &col(|r| r.0[1]),
            format!("{how} of node1"),
        ),
        Row::no_peer(
            "link cut: requests in flight at the cut, lost",
            "requests",
            true,
            &col(|r| r.0[2]),
            format!("{how} of node1; sent before the cut, ended after it (bytes on the cut link)"),
        ),
        Row::no_peer(
            "link heal: requests failed from the heal on (5 s)",
            "requests",
            true,
            &col(|r| r.0[3]),
            format!("{how} of node1"),
        ),
        Row::no_peer(
            "link cut: node Down after (detection)",
            "s",
            true,
            &col(|r| r.0[4]),
            "first `node ls` on node1 showing node3 Down, polled every 100 ms",
        ),
        Row::no_peer(
            "link cut: its task running elsewhere after (convergence)",
            "s",
            true,
            &col(|r| r.0[5]),
            "first `service ps` on node1 with 3 running tasks off node3",
        ),
        Row::no_peer(
            "leader kill -9: requests sent",
            "requests",
            false,
            &col(|r| r.1[0]),
            format!("{how} of node2"),
        ),
        Row::no_peer(
            "leader kill -9: requests sent after the kill that failed",
            "requests",
            true,
            &col(|r| r.1[1]),
            format!("{how} of node2"),
        ),
        Row::no_peer(
            "leader kill -9: requests in flight at the kill, lost",
            "requests",
            true,
            &col(|r| r.1[2]),
            format!(
                "{how} of node2; sent before the kill, ended after it (taken by a killed task)"
            ),
        ),
        Row::no_peer(
            "leader kill -9: new leader after (failover)",
            "s",
            true,
            &col(|r| r.1[3]),
            "raft_is_leader of node2/node3 from /metrics, polled every 50 ms; lab timings",
        ),
        Row::no_peer(
            "leader kill -9: node Down after (detection)",
            "s",
            true,
            &col(|r| r.1[4]),
            "first `node ls` on node2 showing node1 Down",
        ),
        Row::no_peer(
            "leader kill -9: its task running elsewhere after (convergence)",
            "s",
            true,
            &col(|r| r.1[5]),
            "first `service ps` on node2 with 3 running tasks off node1",
        ),
    ];
    let notes = vec![format!(
        "{rounds} round(s), a fresh 3-node lab each (three managers, web x3 = busybox httpd \
         behind the mesh on 8100); medians; lab agents use the lab's fast control-plane timings"
    )];
    Ok(section_of(spec, rounds, "none", Vec::new(), notes, rows))
}
