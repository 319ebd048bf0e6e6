//! Chaos in a lab, under load from this host through a published port: a node killed whole
//! (`kill -9` of its agent and every task), a node's link cut for 20 s and healed, the leader
//! killed during `service scale`, and 10 nodes with 50 replicas losing their leader. The node
//! kill and the link cut run on both paths of the routing mesh (`mesh=proxy` and
//! `mesh=kernel`), each checked in `/metrics` to have carried the load.
//!
//! Root only (network namespaces). Each test prints its figures: requests sent and failed, and
//! how long failures lasted after the event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Lab, eventually, require_root, run_ok, running_per_node};
use shoal_netns::NetNs;

/// One request's outcome: when it was sent, when it ended, and whether a whole HTTP 200 came
/// back.
#[derive(Clone, Copy)]
struct Sample {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// How many clients a chaos test's load runs.
const CLIENTS: usize = 4;

/// Clients on this host sending one `Connection: close` request after another.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

fn get(target: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: chaos\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    s.read_to_end(&mut body).is_ok()
        && body.starts_with(b"HTTP/1.")
        && body[8..].starts_with(b" 200")
}

impl Load {
    /// `per_target` client threads for each target.
    fn start(targets: &[SocketAddr], per_target: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for t in targets.iter().copied().cycle().take(targets.len() * per_target) {
            let (stop, samples) = (stop.clone(), samples.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let ok = get(t);
                    samples.lock().unwrap().push(Sample { start, end: Instant::now(), ok });
                    std::thread::sleep(Duration::from_millis(if ok { 10 } else { 50 }));
                }
            }));
        }
        Load { stop, samples, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let mut v = std::mem::take(&mut *self.samples.lock().unwrap());
        v.sort_by_key(|s| s.start);
        v
    }
}

/// Requests sent from `since` on, how many failed, and the last failure's offset from `since`.
fn tally(samples: &[Sample], since: Instant) -> (usize, usize, Option<Duration>) {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.start >= since).collect();
    let failed: Vec<&&Sample> = after.iter().filter(|s| !s.ok).collect();
    (after.len(), failed.len(), failed.last().map(|s| s.start - since))
}

/// A directory with an index page, served by `busybox httpd` in the tasks.
fn web_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("index.html"), "chaos\n").unwrap();
    d
}

/// The path of the routing mesh a test's published port takes.
#[derive(Clone, Copy)]
enum Path {
    /// Whatever a plain `-p 8100:80` gets.
    Default,
    Proxy,
    Kernel,
}

impl Path {
    fn publish(self) -> &'static str {
        match self {
            Path::Default => "8100:80",
            Path::Proxy => "published=8100,target=80,mesh=proxy",
            Path::Kernel => "published=8100,target=80,mesh=kernel",
        }
    }
}

/// Connections and flows `node` forwarded for `web` on `path` (`proxy` or `kernel`).
fn forwarded(lab: &Lab, node: &str, path: &str) -> u64 {
    let text = lab.metrics(node);
    let prefix = format!("shoal_mesh_client_addr_kept_total{{service=\"web\",path=\"{path}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Asserts that `node` forwarded most of `sent` requests on `path`'s side of the mesh.
fn carried_by(lab: &Lab, node: &str, path: Path, sent: usize) {
    let (name, other) = match path {
        Path::Kernel => ("kernel", "proxy"),
        Path::Proxy => ("proxy", "kernel"),
        Path::Default => return,
    };
    let (on, off) = (forwarded(lab, node, name), forwarded(lab, node, other));
    eprintln!("{node} forwarded {on} on the {name} path, {off} on the {other} path");
    assert!(on as usize >= sent / 2, "only {on} of {sent} requests took the {name} path");
}

fn create_web(lab: &Lab, replicas: u32, root: &tempfile::TempDir) {
    create_web_on(lab, replicas, root, Path::Default);
}

fn create_web_on(lab: &Lab, replicas: u32, root: &tempfile::TempDir, path: Path) {
    let root = root.path().to_str().unwrap();
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "-d",
            "--name",
            "web",
            "--replicas",
            &replicas.to_string(),
            "-p",
            path.publish(),
            "--",
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            root,
        ],
    );
}

/// `swarm init` on node1, managers on node2..=`managers`, workers on the rest.
fn swarm(lab: &Lab, nodes: u8, managers: u8) {
    lab.on("node1", &["swarm", "init"]);
    let at = format!("{}:2377", lab.addr(1));
    let mt = lab.on("node1", &["swarm", "join-token", "-q", "manager"]);
    let wt = lab.on("node1", &["swarm", "join-token", "-q", "worker"]);
    for i in 2..=nodes {
        let token = if i <= managers { mt.trim() } else { wt.trim() };
        lab.on(&format!("node{i}"), &["swarm", "join", "--token", token, &at]);
    }
}

/// Whether `node:8100` serves the page now.
fn answers(lab: &Lab, node: u8) -> bool {
    get(SocketAddr::from((lab.addr(node), 8100)))
}

fn all_answer(lab: &Lab, nodes: impl IntoIterator<Item = u8>) -> Result<(), Vec<u8>> {
    let silent: Vec<u8> = nodes.into_iter().filter(|n| !answers(lab, *n)).collect();
    if silent.is_empty() { Ok(()) } else { Err(silent) }
}

/// Kills a lab node whole, as a power cut would: SIGKILL to its agent and to every process in
/// its namespaces (task shims and tasks), nothing else of the lab. Returns once every one of
/// them has exited (gone or a zombie): a process dies some time after its SIGKILL, and until
/// then its listening sockets still take connections that its death then resets.
fn kill_node(lab: &Lab, node: &str) {
    let own = format!("{}-{node}", lab.name);
    let mut pids = Vec::new();
    for ns in NetNs::list().into_iter().filter(|n| *n == own || n.starts_with(&format!("{own}-"))) {
        if let Ok(ns) = NetNs::open(&ns) {
            pids.extend(ns.pids());
        }
    }
    assert!(!pids.is_empty(), "no process of {node} to kill");
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::SIGKILL);
    }
    // kill(2) returns before the process is torn down; until then its listening sockets still
    // complete handshakes. The node is dead once every process has exited (a zombie has).
    let t0 = Instant::now();
    while !pids.iter().all(|pid| exited(*pid)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{node}'s processes outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a process has exited: gone from /proc, or a zombie waiting to be reaped.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => true,
    }
}

/// A Raft gauge of a node's agent (`raft_term`, `raft_is_leader`), when it answers.
fn raft_gauge(lab: &Lab, node: &str, name: &str) -> Option<i64> {
    let text = lab.metrics(node);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split_whitespace().next().is_some_and(|k| k.ends_with(name)))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Sets a node's underlay link (the host end of its veth) down or up.
fn link(lab: &Lab, i: u8, up: bool) {
    let veth = format!("{}-n{i}", lab.name);
    run_ok(std::process::Command::new("ip").args([
        "link",
        "set",
        &veth,
        if up { "up" } else { "down" },
    ]));
}

#[test]
fn a_node_killed_whole_fails_no_request_on_the_proxy_path() {
    if !require_root("a_node_killed_whole_fails_no_request_on_the_proxy_path") {
        return;
    }
    node_killed_whole(Path::Proxy);
}

#[test]
fn a_node_killed_whole_fails_no_request_on_the_kernel_path() {
    if !require_root("a_node_killed_whole_fails_no_request_on_the_kernel_path") {
        return;
    }
    node_killed_whole(Path::Kernel);
}

fn node_killed_whole(path: Path) {
    let lab = Lab::up(3);
    swarm(&lab, 3, 1);
    let root = web_root();
    create_web_on(&lab, 3, &root, path);
    eventually("a web task on every node", Duration::from_secs(60), || {
        (running_per_node(&lab, "web").len() == 3).then_some(())
    });
    eventually("node1:8100 answering", Duration::from_secs(30), || answers(&lab, 1).then_some(()));

    let load = Load::start(&[SocketAddr::from((lab.addr(1), 8100))], CLIENTS);
    std::thread::sleep(Duration::from_secs(3));
    let killing = Instant::now();
    kill_node(&lab, "node3");
    let killed = Instant::now();
    eventually("node3 Down", Duration::from_secs(30), || {
        lab.on("node1", &["node", "ls"])
            .lines()
            .any(|l| l.contains("node3") && l.contains("Down"))
            .then_some(())
    });
    let down = killed.elapsed();
    eventually("3 web tasks on node1 and node2", Duration::from_secs(60), || {
        let m = running_per_node(&lab, "web");
        (m.keys().all(|n| n != "node3") && m.values().sum::<usize>() == 3).then_some(())
    });
    let converged = killed.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let samples = load.finish();
    // A request that node3's task had taken when its processes died cannot be answered by
    // anyone: the bytes were delivered to a process that is gone. Those are the requests
    // whose lifetime overlaps the kill (from the first signal until the last process exited),
    // at most one per client.
    let (in_flight, others): (Vec<Sample>, Vec<Sample>) =
        samples.iter().partition(|s| s.start < killed && s.end > killing);
    let lost_in_flight = in_flight.iter().filter(|s| !s.ok).count();
    let (sent, failed, last) = tally(&others, killed);
    let (_, failed_after, _) = tally(&others, killed + Duration::from_secs(5));
    eprintln!(
        "kill -9 node3: {} requests in flight at the kill ({:?}), {lost_in_flight} of them lost; \
         {sent} requests after it, {failed} failed, last failure {last:?} after the kill; \
         node3 Down after {down:?}, replaced after {converged:?}",
        in_flight.len(),
        killed - killing,
    );
    // The proxy retries a failed connect on another backend, and the kernel path hands the
    // proxy a client's next SYN when its first went unanswered, so no request sent after the
    // kill fails, even before gossip declares node3 dead.
    assert!(sent > 100, "the load barely ran: {sent} requests");
    carried_by(&lab, "node1", path, samples.len());
    assert!(lost_in_flight <= CLIENTS, "{lost_in_flight} requests lost at the kill");
    assert_eq!(failed_after, 0, "requests failed more than 5 s after the kill (last {last:?})");
    assert_eq!(failed, 0, "requests sent after the kill failed (last {last:?} after it)");
    let before = others.iter().filter(|s| s.end <= killing && !s.ok).count();
    assert_eq!(before, 0, "requests failed before the kill");
}

#[test]
fn a_link_cut_for_20s_heals_without_a_failure_or_an_election() {
    if !require_root("a_link_cut_for_20s_heals_without_a_failure_or_an_election") {
        return;
    }
    link_cut(Path::Proxy);
}

#[test]
fn a_link_cut_for_20s_heals_without_a_failure_on_the_kernel_path() {
    if !require_root("a_link_cut_for_20s_heals_without_a_failure_on_the_kernel_path") {
        return;
    }
    link_cut(Path::Kernel);
}

fn link_cut(path: Path) {
    let lab = Lab::up(3);
    // Three managers: the cut one must not disrupt the leader when it comes back (pre-vote).
    swarm(&lab, 3, 3);
    let root = web_root();
    create_web_on(&lab, 3, &root, path);
    eventually("a web task on every node", Duration::from_secs(60), || {
        (running_per_node(&lab, "web").len() == 3).then_some(())
    });
    eventually("node1:8100 answering", Duration::from_secs(30), || answers(&lab, 1).then_some(()));
    let term = raft_gauge(&lab, "node1", "raft_term").expect("node1's Raft term");

    let load = Load::start(&[SocketAddr::from((lab.addr(1), 8100))], CLIENTS);
    std::thread::sleep(Duration::from_secs(2));
    let cut = Instant::now();
    link(&lab, 3, false);
    std::thread::sleep(Duration::from_secs(20));
    link(&lab, 3, true);
    let healed = Instant::now();
    eventually("node3 Ready again", Duration::from_secs(30), || {
        lab.on("node1", &["node", "ls"])
            .lines()
            .any(|l| l.contains("node3") && l.contains("Ready"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(10));
    let samples = load.finish();
    let (sent, failed, last) = tally(&samples, cut);
    let (at_heal, failed_at_heal, _) = tally(&samples, healed);
    eprintln!(
        "link cut 20 s: {sent} requests, {failed} failed (last {last:?} after the cut); \
         from the heal on {at_heal} requests, {failed_at_heal} failed"
    );
    assert_eq!(failed_at_heal, 0, "requests failed at the heal");
    carried_by(&lab, "node1", path, samples.len());
    assert_eq!(raft_gauge(&lab, "node1", "raft_is_leader"), Some(1), "node1 lost the lead");
    assert_eq!(
        raft_gauge(&lab, "node1", "raft_term"),
        Some(term),
        "the cut node forced an election when it came back"
    );
    assert!(node3_serves(&lab), "node3:8100 does not answer after the heal");
}

fn node3_serves(lab: &Lab) -> bool {
    (0..50).any(|_| {
        answers(lab, 3) || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    })
}

#[test]
fn a_leader_killed_during_scale_is_replaced_within_2s_and_loses_nothing() {
    if !require_root("a_leader_killed_during_scale_is_replaced_within_2s_and_loses_nothing") {
        return;
    }
    let lab = Lab::up(3);
    swarm(&lab, 3, 3);
    let root = web_root();
    create_web(&lab, 3, &root);
    // Committed before the kill: these must all be there afterwards.
    for i in 0..5 {
        lab.on(
            "node2",
            &["service", "create", "-d", "--name", &format!("keep{i}"), "--", "sleep", "100000"],
        );
    }
    eventually("node2 and node3 following node1", Duration::from_secs(30), || {
        (raft_gauge(&lab, "node1", "raft_is_leader") == Some(1)
            && raft_gauge(&lab, "node2", "raft_has_leader") == Some(1)
            && raft_gauge(&lab, "node3", "raft_has_leader") == Some(1))
        .then_some(())
    });

    let scale = {
        let (name, args) = (lab.name.clone(), ["service", "scale", "web=6"]);
        std::thread::spawn(move || {
            common::shoal().args(["--lab", &name, "--node", "node2"]).args(args).output().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(30));
    let killed = Instant::now();
    kill_node(&lab, "node1");
    let new_leader = eventually("a new leader", Duration::from_secs(30), || {
        ["node2", "node3"].into_iter().find(|n| raft_gauge(&lab, n, "raft_is_leader") == Some(1))
    });
    let failover = killed.elapsed();
    let out = scale.join().unwrap();
    eprintln!("leader kill during scale: {new_leader} leads after {failover:?}");
    assert!(
        out.status.success(),
        "service scale failed across the failover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(failover <= Duration::from_secs(2), "new leader after {failover:?}");
    eventually("6 web tasks on node2 and node3", Duration::from_secs(90), || {
        let m = running_per_node_on(&lab, new_leader, "web");
        (m.keys().all(|n| n != "node1") && m.values().sum::<usize>() == 6).then_some(())
    });
    let ls = lab.on(new_leader, &["service", "ls"]);
    for i in 0..5 {
        assert!(ls.contains(&format!("keep{i}")), "keep{i} lost with the leader:\n{ls}");
    }
}

/// [`running_per_node`] asked of `node` instead of node1.
fn running_per_node_on(
    lab: &Lab,
    node: &str,
    service: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in lab.on(node, &["service", "ps", service]).lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if l.contains("\\_") || f.len() < 5 {
            continue;
        }
        if f[3] == "Running" && f[4] == "Running" {
            *m.entry(f[2].to_owned()).or_default() += 1;
        }
    }
    m
}

#[test]
fn ten_nodes_with_50_replicas_answer_everywhere_and_survive_a_leader_kill() {
    if !require_root("ten_nodes_with_50_replicas_answer_everywhere_and_survive_a_leader_kill") {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::up(10);
    swarm(&lab, 10, 3);
    let root = web_root();
    create_web(&lab, 50, &root);
    eventually("50 web tasks running", Duration::from_secs(150), || {
        (running_per_node(&lab, "web").values().sum::<usize>() == 50).then_some(())
    });
    eventually("every node answering on 8100", Duration::from_secs(60), || {
        all_answer(&lab, 1..=10).ok()
    });
    eprintln!("10 nodes, 50 replicas: every node answers after {:?}", t0.elapsed());
    // node1's ingress sandbox resolved no remote endpoint by ARP: one permanent entry per remote
    // endpoint (45 or more remote tasks, 9 other sandboxes); only its own node's tasks (whose
    // frames never cross the overlay) may be learnt.
    let sandbox = format!("{}-node1-ingress", lab.name);
    let show = || run_ok(std::process::Command::new("ip").args(["-n", &sandbox, "neigh", "show"]));
    let permanent_count =
        |t: &str| t.lines().filter(|l| l.trim_end().ends_with("PERMANENT")).count();
    let neigh =
        eventually("permanent entries in node1's ingress sandbox", Duration::from_secs(30), || {
            Some(show()).filter(|t| permanent_count(t) >= 54)
        });
    let permanent: Vec<&str> =
        neigh.lines().filter(|l| l.trim_end().ends_with("PERMANENT")).collect();
    let dev = permanent.first().and_then(|l| l.split_whitespace().nth(2)).unwrap_or_default();
    let learnt: Vec<&str> = neigh
        .lines()
        .filter(|l| {
            !l.trim_end().ends_with("PERMANENT") && l.split_whitespace().nth(2) == Some(dev)
        })
        .collect();
    assert!(permanent.len() >= 54, "{} permanent entries:\n{neigh}", permanent.len());
    let local = running_per_node(&lab, "web").get("node1").copied().unwrap_or(0);
    assert!(
        learnt.len() <= local,
        "{} entries learnt by ARP in the ingress sandbox, {local} local tasks: {learnt:?}",
        learnt.len()
    );

    let killed = Instant::now();
    kill_node(&lab, "node1");
    let new_leader = eventually("a new leader", Duration::from_secs(30), || {
        ["node2", "node3"].into_iter().find(|n| raft_gauge(&lab, n, "raft_is_leader") == Some(1))
    });
    let failover = killed.elapsed();
    eventually("every survivor answering", Duration::from_secs(30), || {
        all_answer(&lab, 2..=10).ok()
    });
    let answering = killed.elapsed();
    // And they keep answering: five passes over all survivors.
    for _ in 0..5 {
        if let Err(silent) = all_answer(&lab, 2..=10) {
            panic!("nodes {silent:?} stopped answering after the leader kill");
        }
    }
    eprintln!(
        "10 nodes: leader kill -> {new_leader} leads after {failover:?}, every survivor answers \
         after {answering:?}; whole test {:?}",
        t0.elapsed()
    );
    // Failover within 2 s is asserted on 3 nodes (leader kill during scale); here 10 agents and
    // 50 tasks share the machine, so the bound only catches a failover that did not happen.
    assert!(failover <= Duration::from_secs(10), "new leader after {failover:?}");
}
