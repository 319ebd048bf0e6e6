//! The tutorial's steps on one fresh lab of one system, timed from the start of each command
//! until the cluster does what the step asks (tasks running, tasks answering, a new leader).
//!
//! Every wait is bounded; a step that does not complete is recorded with the system's own words
//! (curl's, dig's, the CLI's) and the run goes on with the next step where it can.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::docker::run;
use super::{Cluster, Program, Task};

/// What one system did on one lab.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds (or milliseconds, for DNS) per step that completed.
    pub figures: BTreeMap<Step, f64>,
    /// Why a step has no figure.
    pub missing: BTreeMap<Step, String>,
    /// Each capability tried: how long until it first worked, or the system's words.
    pub features: BTreeMap<Feature, Result<f64, String>>,
    /// `node ls`, `service ls`, `service ps` header lines.
    pub headers: Vec<(&'static str, String)>,
}

/// A timed step of the tutorial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Formation,
    CreateRunning,
    CreateAnswering,
    CreateReturns,
    Scale,
    Drain,
    Failover,
    Attachable,
    DnsLatency,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Formation,
        Step::CreateRunning,
        Step::CreateAnswering,
        Step::CreateReturns,
        Step::Scale,
        Step::Drain,
        Step::Failover,
        Step::Attachable,
        Step::DnsLatency,
    ];

    /// The row's metric and unit.
    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            Step::Formation => ("swarm formation: init and 2 manager joins", "s"),
            Step::CreateRunning => ("service create --replicas 3 → all 3 tasks running", "s"),
            Step::CreateAnswering => ("service create --replicas 3 → every task answering", "s"),
            Step::CreateReturns => ("service create --replicas 3 → the command returns", "s"),
            Step::Scale => ("service scale 3 → 5 → 5 tasks running", "s"),
            Step::Drain => ("drain a node → its tasks moved, every task answering", "s"),
            Step::Failover => ("leader failover, 3 managers → a new leader in node ls", "s"),
            Step::Attachable => {
                ("attachable overlay: container on node1 started → answers by name on node2", "s")
            }
            Step::DnsLatency => ("service-name DNS answer latency inside a task (median)", "ms"),
        }
    }

    /// How the step is timed.
    pub fn how(self) -> &'static str {
        match self {
            Step::Formation => {
                "`swarm init`, `swarm join-token -q manager`, 2 × `swarm join` in sequence"
            }
            Step::CreateRunning | Step::CreateAnswering | Step::CreateReturns => {
                "from starting `service create` (busybox httpd on an attachable overlay, dnsrr) on node1; \
                 running: `service ps` polled every 50 ms; answering: a task on node2 resolves \
                 tasks.web and fetches every address"
            }
            Step::Scale => "from `service scale -d web=5` until `service ps` shows 5 running",
            Step::Drain => {
                "from `node update --availability drain` of node3 until 5 tasks run elsewhere and \
                 every address of tasks.web answers from node2"
            }
            Step::Failover => {
                "`kill -9` of node1's dockerd or agent, then a new `node ls` on node2 every 100 ms \
                 (each bounded to 5 s: a call may block while there is no leader) until one shows \
                 another node as Leader"
            }
            Step::Attachable => {
                "from `run -d --network ov` of busybox httpd on node1 until a task on node2 gets its \
                 page by name"
            }
            Step::DnsLatency => {
                "python3 in a task's network namespace: A queries for the service's name to \
                 127.0.0.11, one at a time"
            }
        }
    }
}

/// A capability of the tutorial, tried on each system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    Mesh,
    Vip,
    Encrypted,
    DnsByName,
    HostPublish,
    Drain,
    ClientAddr,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::Mesh,
        Feature::Vip,
        Feature::Encrypted,
        Feature::DnsByName,
        Feature::HostPublish,
        Feature::Drain,
        Feature::ClientAddr,
    ];

    pub fn metric(self) -> &'static str {
        match self {
            Feature::Mesh => "works: routing mesh answers on every node (-p 8081:80, 1 task)",
            Feature::Vip => "works: VIP of a service answers from another node's task",
            Feature::Encrypted => "works: encrypted overlay, container by name across nodes",
            Feature::DnsByName => "works: service name resolves and every task answers",
            Feature::HostPublish => "works: host-mode publish answers on every node",
            Feature::Drain => "works: drain moves the tasks and the service still answers",
            Feature::ClientAddr => "works: client address preserved (host-mode port)",
        }
    }

    pub fn how(self) -> &'static str {
        match self {
            Feature::Mesh => {
                "seconds from `service create -d` until curl gets the page from all 3 nodes (20 s bound)"
            }
            Feature::Vip => {
                "seconds from `service create -d --replicas 2` (endpoint mode vip) until the one address `vip` resolves to answers (20 s bound)"
            }
            Feature::Encrypted => {
                "seconds from `run -d` on node1 on a `--opt encrypted` overlay until a task on node2 gets its page by name (20 s bound)"
            }
            Feature::DnsByName => {
                "seconds until `web` resolves to its 3 tasks and each answers (as in the create rows)"
            }
            Feature::HostPublish => {
                "seconds from `service create -d --replicas 3 --publish mode=host` until curl gets the page from all 3 nodes (20 s bound)"
            }
            Feature::Drain => "as in the drain row",
            Feature::ClientAddr => {
                "seconds of one curl of /cgi-bin/ip on node1's host-mode port; works when the task saw the client's own address"
            }
        }
    }
}

/// Runs `cmd`, killing it after `limit`; its stdout, or its words (stderr, else stdout).
pub fn within(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {:.0} s", limit.as_secs_f64()));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else if !out.stderr.is_empty() {
        Err(text(&out.stderr))
    } else {
        Err(format!("{} ({})", text(&out.stdout), out.status))
    }
}

/// Polls `f` every 50 ms until it gives `Ok` or `limit` passes; the last words otherwise.
fn until<T>(limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if t0.elapsed() >= limit => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The service's tasks whose desired and current state are both Running, by node.
fn running(c: &dyn Cluster, service: &str) -> Result<Vec<usize>, String> {
    let out = within(&mut c.cli(0, &["service", "ps", service]), Duration::from_secs(10))?;
    let mut nodes = Vec::new();
    for line in out.lines().skip(1).filter(|l| !l.contains("\\_")) {
        if line.matches("Running").count() >= 2 {
            let words: Vec<&str> = line.split_whitespace().collect();
            let node = (0..super::NODES).find(|&n| words.contains(&c.hostname(n).as_str()));
            nodes.push(node.unwrap_or(usize::MAX));
        }
    }
    Ok(nodes)
}

/// `curl` from where the cluster's clients are; the page, or curl's words.
fn curl(c: &dyn Cluster, url: &str) -> Result<String, String> {
    within(&mut c.client(&["curl", "-sS", "-m", "1", url]), Duration::from_secs(5))
}

/// The addresses `name` resolves to at the task's resolver.
fn resolve(task: &Task, name: &str) -> Result<Vec<String>, String> {
    let out = within(
        &mut task.cmd(&["dig", "+short", "+time=1", "+tries=1", "@127.0.0.11", name]),
        Duration::from_secs(5),
    )?;
    let addrs: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .collect();
    if addrs.is_empty() {
        return Err(format!("{name} does not resolve ({})", out.trim()));
    }
    Ok(addrs)
}

/// Fetches `/` from every address `name` resolves to, inside `task`; how many there were.
fn fetch_all(task: &Task, name: &str) -> Result<usize, String> {
    let addrs = resolve(task, name)?;
    for a in &addrs {
        let page = within(
            &mut task.cmd(&["curl", "-sS", "-m", "1", &format!("http://{a}/")]),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("{name} → {a}: {e}"))?;
        if page.trim() != "ok" {
            return Err(format!("{name} → {a} answered {:?}", page.trim()));
        }
    }
    Ok(addrs.len())
}

/// Median milliseconds of `n` DNS queries for `name`, one at a time, from inside `task`.
fn dns_latency(task: &Task, name: &str, n: usize) -> anyhow::Result<f64> {
    const PROBE: &str = r#"
import socket, struct, sys, time
name, n = sys.argv[1], int(sys.argv[2])
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
times = []
for i in range(n):
    pkt = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1)
    t = time.perf_counter()
    s.sendto(pkt, ("127.0.0.11", 53))
    while True:
        data = s.recv(2048)
        if struct.unpack(">H", data[:2])[0] == i:
            break
    dt = time.perf_counter() - t
    if struct.unpack(">H", data[6:8])[0] == 0:
        sys.exit("no answer for " + name)
    times.append(dt * 1000.0)
times.sort()
print("%.4f" % times[len(times) // 2])
"#;
    let out = within(
        &mut task.cmd(&["python3", "-c", PROBE, name, &n.to_string()]),
        Duration::from_secs(60),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    out.trim().parse().with_context(|| format!("DNS probe printed {out:?}"))
}

/// The first line of a listing command.
fn header(c: &dyn Cluster, args: &[&str]) -> String {
    within(&mut c.cli(0, args), Duration::from_secs(10))
        .map(|o| o.lines().next().unwrap_or("").trim_end().to_owned())
        .unwrap_or_else(|e| format!("(failed: {e})"))
}

/// Runs the tutorial on a fresh lab of `c`. An error is a step the rest depends on.
pub fn play(c: &(dyn Cluster + Sync), quick: bool) -> anyhow::Result<Outcome> {
    let mut o = Outcome::default();
    let name = c.name();
    let say = |what: &str| println!("[swarm] {name}: {what}");

    let t = Instant::now();
    c.init()?;
    let token = run(&mut c.cli(0, &["swarm", "join-token", "-q", "manager"]))?;
    for n in 1..super::NODES {
        c.join(n, token.trim())?;
    }
    o.figures.insert(Step::Formation, t.elapsed().as_secs_f64());
    say(&format!("formed in {:.2} s", t.elapsed().as_secs_f64()));

    run(&mut c.cli(0, &["network", "create", "-d", "overlay", "--attachable", "ov"]))?;
    let probe = c.run_task(1, "probe", "ov", Program::Sleep)?;

    // service create, with one poller for `service ps` and one for the tasks' answers.
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let (returned, all_running, all_answering) = std::thread::scope(|s| {
        let stop = &stop;
        let ps = s.spawn(move || {
            until(Duration::from_secs(90), || {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let n = running(c, "web")?.len();
                if n >= 3 {
                    Ok(Some(t0.elapsed().as_secs_f64()))
                } else {
                    Err(format!("{n}/3 running"))
                }
            })
        });
        let answers = s.spawn(|| {
            until(Duration::from_secs(90), || {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                match fetch_all(&probe, "tasks.web")? {
                    3 => Ok(Some(t0.elapsed().as_secs_f64())),
                    n => Err(format!("tasks.web has {n} addresses")),
                }
            })
        });
        let created = run(&mut c.service_create(
            "web",
            &["--replicas", "3", "--network", "ov", "--endpoint-mode", "dnsrr"],
            Program::Httpd,
        ));
        let returned = t0.elapsed().as_secs_f64();
        if created.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let ps = ps.join().unwrap_or_else(|_| Err("poller panicked".into()));
        let answers = answers.join().unwrap_or_else(|_| Err("poller panicked".into()));
        (created.map(|_| returned), ps, answers)
    });
    let record = |o: &mut Outcome, step: Step, r: Result<Option<f64>, String>| match r {
        Ok(Some(v)) => {
            o.figures.insert(step, v);
        }
        Ok(None) => {
            o.missing.insert(step, "service create failed".to_owned());
        }
        Err(e) => {
            o.missing.insert(step, e);
        }
    };
    let returned = returned.map_err(|e| format!("service create: {e}"));
    record(&mut o, Step::CreateReturns, returned.clone().map(Some));
    record(&mut o, Step::CreateRunning, all_running);
    record(&mut o, Step::CreateAnswering, all_answering.clone());
    o.features.insert(
        Feature::DnsByName,
        all_answering.and_then(|v| v.ok_or_else(|| "service create failed".to_owned())),
    );
    if let Err(e) = returned {
        bail!("{e}");
    }
    say(&format!("service created: {:?}", o.figures));

    match dns_latency(&probe, "web", if quick { 100 } else { 400 }) {
        Ok(ms) => {
            o.figures.insert(Step::DnsLatency, ms);
        }
        Err(e) => {
            o.missing.insert(Step::DnsLatency, format!("{e:#}"));
        }
    }

    // Scale 3 → 5, timed by `service ps` (docker's `service scale` would otherwise wait 5 s more
    // to "verify").
    let t = Instant::now();
    let scaled = run(&mut c.cli(0, &["service", "scale", "-d", "web=5"]))
        .map_err(|e| format!("service scale: {e:#}"))
        .and_then(|_| {
            until(Duration::from_secs(60), || match running(c, "web")?.len() {
                n if n >= 5 => Ok(t.elapsed().as_secs_f64()),
                n => Err(format!("{n}/5 running after 60 s")),
            })
        });
    record(&mut o, Step::Scale, scaled.map(Some));

    // Drain node3: every task elsewhere, and all of them answering.
    let t = Instant::now();
    let third = c.hostname(2);
    let drained = run(&mut c.cli(0, &["node", "update", "--availability", "drain", &third]))
        .map_err(|e| format!("node update: {e:#}"))
        .and_then(|_| {
            until(Duration::from_secs(60), || {
                let nodes = running(c, "web")?;
                if nodes.len() < 5 || nodes.contains(&2) {
                    return Err(format!(
                        "{} running, {} on {third}",
                        nodes.len(),
                        nodes.iter().filter(|&&n| n == 2).count()
                    ));
                }
                match fetch_all(&probe, "tasks.web")? {
                    5 => Ok(t.elapsed().as_secs_f64()),
                    n => Err(format!("tasks.web has {n} addresses")),
                }
            })
        });
    o.features.insert(Feature::Drain, drained.clone());
    record(&mut o, Step::Drain, drained.map(Some));
    let _ = run(&mut c.cli(0, &["node", "update", "--availability", "active", &third]));

    // A standalone container on node1, reached by name from node2.
    let t = Instant::now();
    let reached = c
        .run_task(0, "c1", "ov", Program::Httpd)
        .map_err(|e| format!("run: {e:#}"))
        .and_then(|_| until(Duration::from_secs(30), || fetch_all(&probe, "c1")))
        .map(|_| t.elapsed().as_secs_f64());
    record(&mut o, Step::Attachable, reached.map(Some));

    features(c, &probe, &mut o);
    say(&format!("capabilities: {:?}", o.features));

    for (what, args) in [
        ("node ls", &["node", "ls"][..]),
        ("service ls", &["service", "ls"][..]),
        ("service ps", &["service", "ps", "web"][..]),
    ] {
        o.headers.push((what, header(c, args)));
    }

    // Leader failover: node1 (the leader) dies; node2 is asked until another node leads.
    let t = Instant::now();
    c.kill_node(0)?;
    let failover =
        new_leader(c, &c.hostname(0), Duration::from_secs(120)).map(|_| t.elapsed().as_secs_f64());
    record(&mut o, Step::Failover, failover.map(Some));
    say(&format!("done: {:?}; missing {:?}", o.figures, o.missing));
    Ok(o)
}

/// The capabilities not already tried by the timed steps.
fn features(c: &(dyn Cluster + Sync), probe: &Task, o: &mut Outcome) {
    let bound = Duration::from_secs(20);
    // The routing mesh: one task, every node's port answers.
    let t = Instant::now();
    let mesh = run(&mut c.service_create(
        "mesh",
        &["-d", "--replicas", "1", "--publish", "8081:80"],
        Program::Httpd,
    ))
    .map_err(|e| format!("service create: {e:#}"))
    .and_then(|_| every_node(c, 8081, bound))
    .map(|_| t.elapsed().as_secs_f64());
    o.features.insert(Feature::Mesh, mesh);

    // A VIP: one address for the service, answering.
    let t = Instant::now();
    let vip = run(&mut c.service_create(
        "vip",
        &["-d", "--replicas", "2", "--network", "ov"],
        Program::Httpd,
    ))
    .map_err(|e| format!("service create: {e:#}"))
    .and_then(|_| {
        until(bound, || match fetch_all(probe, "vip")? {
            1 => Ok(t.elapsed().as_secs_f64()),
            n => Err(format!("vip resolves to {n} addresses, not one VIP")),
        })
    });
    o.features.insert(Feature::Vip, vip);

    // An encrypted overlay between two nodes.
    let t0 = Instant::now();
    let enc = run(&mut c.cli(
        0,
        &["network", "create", "-d", "overlay", "--attachable", "--opt", "encrypted", "enc"],
    ))
    .map_err(|e| format!("network create: {e:#}"))
    .and_then(|_| c.run_task(1, "eprobe", "enc", Program::Sleep).map_err(|e| format!("run: {e:#}")))
    .and_then(|eprobe| {
        let t = Instant::now();
        c.run_task(0, "e1", "enc", Program::Httpd).map_err(|e| format!("run: {e:#}"))?;
        until(bound, || fetch_all(&eprobe, "e1")).map(|_| t.elapsed().as_secs_f64())
    });
    let _ = t0;
    o.features.insert(Feature::Encrypted, enc);

    // Host-mode publish on every node, and the client's address as the task sees it.
    let t = Instant::now();
    let host = run(&mut c.service_create(
        "pub",
        &["-d", "--replicas", "3", "--publish", "mode=host,target=80,published=8082"],
        Program::Httpd,
    ))
    .map_err(|e| format!("service create: {e:#}"))
    .and_then(|_| every_node(c, 8082, bound))
    .map(|_| t.elapsed().as_secs_f64());
    let client = match &host {
        Err(e) => Err(format!("no host-mode port to ask: {e}")),
        Ok(_) => {
            let t = Instant::now();
            let url = format!("http://{}:8082/cgi-bin/ip", c.addr(0));
            curl(c, &url).and_then(|seen| {
                let me = c.client_addr().to_string();
                let seen =
                    seen.trim().trim_start_matches("[::ffff:").trim_end_matches(']').to_owned();
                if seen == me {
                    Ok(t.elapsed().as_secs_f64())
                } else {
                    Err(format!("the task saw {seen}, the client is {me}"))
                }
            })
        }
    };
    o.features.insert(Feature::HostPublish, host);
    o.features.insert(Feature::ClientAddr, client);
}

/// Waits until node 1's `node ls` shows a leader other than `old`. A follower's `node ls` may
/// block while there is no leader (Docker's returns once one is elected), so a new call starts
/// every 100 ms, each bounded to 5 s, and the first that shows a new leader counts.
fn new_leader(c: &dyn Cluster, old: &str, limit: Duration) -> Result<(), String> {
    use std::io::Read;
    let t0 = Instant::now();
    let mut calls: Vec<(std::process::Child, Instant)> = Vec::new();
    let mut words = String::from("no answer");
    let result = loop {
        if t0.elapsed() > limit {
            break Err(format!("no new leader within {:.0} s: {words}", limit.as_secs_f64()));
        }
        if calls.last().is_none_or(|(_, s)| s.elapsed() >= Duration::from_millis(100)) {
            let child = c
                .cli(1, &["node", "ls"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            calls.push((child, Instant::now()));
        }
        let mut found = false;
        calls.retain_mut(|(child, started)| match child.try_wait() {
            Ok(Some(_)) => {
                let mut out = String::new();
                if let Some(mut so) = child.stdout.take() {
                    let _ = so.read_to_string(&mut out);
                }
                let leads = out
                    .lines()
                    .any(|l| l.contains("Leader") && !l.split_whitespace().any(|w| w == old));
                if leads {
                    found = true;
                } else if let Some(mut se) = child.stderr.take() {
                    let mut e = String::new();
                    let _ = se.read_to_string(&mut e);
                    words = if e.trim().is_empty() {
                        "the old leader still leads".into()
                    } else {
                        e.trim().to_owned()
                    };
                }
                false
            }
            Ok(None) if started.elapsed() < Duration::from_secs(5) => true,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        });
        if found {
            break Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for (mut child, _) in calls {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// Waits until every node's `port` serves the page; the nodes' words otherwise.
fn every_node(c: &dyn Cluster, port: u16, bound: Duration) -> Result<(), String> {
    let mut left: Vec<usize> = (0..super::NODES).collect();
    let mut words = BTreeMap::new();
    let t0 = Instant::now();
    while !left.is_empty() {
        left.retain(|&n| match curl(c, &format!("http://{}:{port}/", c.addr(n))) {
            Ok(p) if p.trim() == "ok" => false,
            Ok(p) => {
                words.insert(n, format!("answered {:?}", p.trim()));
                true
            }
            Err(e) => {
                words.insert(n, e);
                true
            }
        });
        if t0.elapsed() > bound {
            // One node's words stand for the rest: each says the same of its own address.
            let first = left[0];
            return Err(format!(
                "{} of {} nodes fail; node{}: {}",
                left.len(),
                super::NODES,
                first + 1,
                words[&first]
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
