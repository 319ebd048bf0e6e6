//! Gossip side by side with serf, in the same run, at 8 and 16 nodes.
//!
//! Both systems run in the same kind of lab (`shoal lab up --gossip`: one namespace per node on a
//! bridge, 198.18.X.0/24, no route out). For serf the lab's own agents are killed first and a
//! `serf agent -profile lan` (Debian package, memberlist with Lifeguard, encrypted with a
//! 32-byte key like shoal) runs in each namespace instead. Figures:
//!
//! 1. failure detection: `kill -9` the last node; time until every other node sees it failed
//!    (shoal: `down` in `/info`, polled every 50 ms per node; serf: its `EventMemberFailed`
//!    log line, stamped as it is written, on each node: the status change itself, before the
//!    serf agent's 1-3 s coalescing of events for handlers);
//! 2. join propagation: start that node again; time from spawning its process until every
//!    other node sees it alive (shoal: the new generation `alive`; serf: `EventMemberJoin`);
//! 3. bytes per second per node at rest: what each node sends, read from the host end of its
//!    veth (`/sys/class/net/LAB-nI/statistics/rx_bytes`), identical for both; shoal's own
//!    `shoal_gossip_bytes_total` (payload, no IP/UDP headers) is noted beside it.
//!
//! Run as root: `cargo bench -p shoal --bench gossip` (full: 8 and 16 nodes, a warm-up and 5
//! rounds, 2 windows of 30 s at rest) or `-- --quick` (8 nodes, 2 rounds, 1 window of 10 s).
//! Writes `target/bench/gossip.json` (or `--out PATH`). Every lab and process is removed at the
//! end, also on failure or panic (guards).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{Conditions, Options, Report, Row};
use openmetrics_parser::OpenMetricsValue;
use shoal::api::client::Host;
use shoal::api::{MemberInfo, NodeInfo};
use shoal::lab::LabState;
use shoal_netns::NetNs;

/// The `shoal` binary the labs run: this build's, or `SHOAL_BENCH_BIN` (e.g. a build with
/// another gossip profile, to compare profiles against the same serf).
fn shoal_bin() -> std::ffi::OsString {
    std::env::var_os("SHOAL_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_shoal").into())
}
const POLL: Duration = Duration::from_millis(50);
const LIMIT: Duration = Duration::from_secs(90);

fn main() {
    let opts = Options::from_args("gossip", 5, 2);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("gossip bench: needs root (network namespaces); skipped");
        return;
    }
    if let Err(e) = run(&opts) {
        eprintln!("gossip bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// Full-mode sizes and rest windows; quick mode trims them.
struct Plan {
    sizes: Vec<u8>,
    windows: usize,
    window: Duration,
}

fn run(opts: &Options) -> anyhow::Result<()> {
    let plan = if opts.quick {
        Plan { sizes: vec![8], windows: 1, window: Duration::from_secs(10) }
    } else {
        Plan { sizes: vec![8, 16], windows: 2, window: Duration::from_secs(30) }
    };
    let mut cond = Conditions::detect();
    let serf = cond.peer("serf", "serf", &["version"]);
    // What the agent runs with: `GossipConfig::new`'s profile.
    let core = shoal_gossip::GossipConfig::new(
        shoal_gossip::NodeId(1),
        "198.18.0.1:7946".parse()?,
        [0; 32],
    )
    .core;
    let profile = format!(
        "shoal gossip profile: probe {:?} / timeout {:?}, suspicion x{} (timeout {:?} at 8 nodes), gossip {:?} x{}, sync {:?}",
        core.probe_period,
        core.probe_timeout,
        core.suspicion_mult,
        core.suspicion_timeout(8),
        core.gossip_interval,
        core.gossip_fanout,
        core.sync_interval
    );
    let profile = match std::env::var("SHOAL_BENCH_BIN") {
        Ok(bin) => format!(
            "shoal binary {bin} (SHOAL_BENCH_BIN): its own compiled-in gossip profile, not this build's ({profile})"
        ),
        Err(_) => profile,
    };
    cond.notes.push(profile.clone());
    cond.notes.push(
        "serf: -profile lan (probe 1 s / 500 ms, suspicion x4, gossip 200 ms x3, push-pull 30 s), -encrypt with a 32-byte key"
            .to_owned(),
    );
    cond.notes.push(
        "detection and join: until every other node sees it; join timed from spawning the process; bytes: sent per node, IP headers included, read on the host veth for both"
            .to_owned(),
    );
    cond.notes.push(
        "no CPU pinning: the agents, serf and the bench's pollers share every core".to_owned(),
    );
    println!("{profile}");

    let mut rows = Vec::new();
    for &n in &plan.sizes {
        let shoal = measure(System::Shoal, n, opts, &plan)?;
        let peer = if serf { Some(measure(System::Serf, n, opts, &plan)?) } else { None };
        let c = format!("{n} nodes");
        rows.push(Row::new(
            format!("failure detection, {n} nodes"),
            "s",
            true,
            &shoal.detect,
            "serf",
            peer.as_ref().map(|p| p.detect.as_slice()),
            c.clone(),
        ));
        rows.push(Row::new(
            format!("join propagation, {n} nodes"),
            "s",
            true,
            &shoal.join,
            "serf",
            peer.as_ref().map(|p| p.join.as_slice()),
            c.clone(),
        ));
        let mut bw = Row::new(
            format!("bytes/s sent per node at rest, {n} nodes"),
            "B/s",
            true,
            &shoal.rest,
            "serf",
            peer.as_ref().map(|p| p.rest.as_slice()),
            c.clone(),
        );
        if let Some(own) = common::Stats::of(&shoal.own_metric) {
            bw.conditions = format!(
                "{c}; shoal's own shoal_gossip_bytes_total out (payload only): {} B/s",
                own.show(0)
            );
        }
        rows.push(bw);
    }

    let report = Report {
        bench: "gossip".to_owned(),
        quick: opts.quick,
        rounds: opts.rounds,
        finished_unix: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        conditions: cond,
        rows,
    };
    report.print();
    report.write_json(&opts.out)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum System {
    Shoal,
    Serf,
}

#[derive(Debug, Default)]
struct Figures {
    detect: Vec<f64>,
    join: Vec<f64>,
    rest: Vec<f64>,
    own_metric: Vec<f64>,
}

/// One system at one size: bring the lab up, measure at rest, then rounds of kill and restart.
fn measure(sys: System, n: u8, opts: &Options, plan: &Plan) -> anyhow::Result<Figures> {
    let tag = if sys == System::Shoal { "s" } else { "f" };
    let lab = LabGuard::up(tag, n)?;
    let state = LabState::load(&lab.name)?;
    let mut cluster = match sys {
        System::Shoal => Cluster::Shoal { state },
        System::Serf => Cluster::Serf(SerfCluster::start(&lab.name, state)?),
    };
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let formed = cluster.wait_formed(&names)?;
    println!("[{sys:?} {n}] formed in {formed:.2} s");
    // Let the start-up traffic (joins, first syncs) settle.
    std::thread::sleep(Duration::from_secs(if opts.quick { 3 } else { 5 }));

    let mut fig = Figures::default();
    for w in 0..plan.windows {
        let (sent, own) = cluster.rest_window(&lab.name, n, plan.window)?;
        println!("[{sys:?} {n}] rest window {w}: {sent:.0} B/s sent per node");
        fig.rest.push(sent);
        if let Some(own) = own {
            fig.own_metric.push(own);
        }
    }

    let victim = format!("node{n}");
    let observers: Vec<String> = names.iter().filter(|x| **x != victim).cloned().collect();
    let recorded = common::rounds(1, opts.rounds, |i, warm| {
        let d = cluster.kill_and_detect(&victim, &observers)?;
        let j = cluster.restart_and_join(&victim, &observers)?;
        println!(
            "[{sys:?} {n}] round {i}{}: detection {d:.2} s, join {j:.2} s",
            if warm { " (warm-up)" } else { "" }
        );
        // Let suspicion state and the rejoin's traffic settle before the next kill.
        std::thread::sleep(Duration::from_secs(3));
        Ok((d, j))
    })?;
    for (d, j) in recorded {
        fig.detect.push(d);
        fig.join.push(j);
    }
    drop(cluster);
    drop(lab);
    Ok(fig)
}

/// A lab made with `shoal lab up`; `shoal lab down` in `Drop` (kills every process in its
/// namespaces, deletes them, the bridge and the veths), also on error or panic.
struct LabGuard {
    name: String,
}

impl LabGuard {
    fn up(tag: &str, n: u8) -> anyhow::Result<LabGuard> {
        let pid = std::process::id();
        let name = format!("gb{tag}{}", pid % 10_000);
        let mut last = String::new();
        for attempt in 0..8u32 {
            // 198.18.200-249.0/24, the suite's labs' range (retried when another lab holds it).
            let third = 200 + (pid.wrapping_add(attempt * 13) % 50);
            let subnet = format!("198.18.{third}.0/24");
            let guard = LabGuard { name: name.clone() };
            let out = Command::new(shoal_bin())
                .args(["lab", "up", "--gossip", "--lab", &name, "--nodes", &n.to_string()])
                .args(["--subnet", &subnet])
                .env_remove("SHOAL_CONFIG")
                .output()
                .context("running shoal lab up")?;
            if out.status.success() {
                return Ok(guard);
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if !last.contains("already") {
                break;
            }
        }
        bail!("lab up failed: {last}")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        match Command::new(shoal_bin()).args(["lab", "down", "--lab", &self.name]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("lab down {} failed: {}", self.name, String::from_utf8_lossy(&o.stderr))
            }
            Err(e) => eprintln!("lab down {}: {e}", self.name),
        }
    }
}

enum Cluster {
    Shoal { state: LabState },
    Serf(SerfCluster),
}

impl Cluster {
    fn wait_formed(&self, names: &[String]) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let everyone: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        match self {
            Cluster::Shoal { state } => {
                let socks: Vec<PathBuf> = state.nodes.iter().map(|x| x.socket.clone()).collect();
                poll_all(&socks, t0, |ms| {
                    let alive: BTreeSet<&str> =
                        ms.iter().filter(|m| m.state == "alive").map(|m| m.name.as_str()).collect();
                    alive == everyone
                })
            }
            Cluster::Serf(s) => s.wait_formed(names, t0),
        }
    }

    /// Per-node bytes/s sent (host veth) over `window`, and shoal's own metric when it has one.
    fn rest_window(
        &self,
        lab: &str,
        n: u8,
        window: Duration,
    ) -> anyhow::Result<(f64, Option<f64>)> {
        let veth = |i: u8| format!("/sys/class/net/{lab}-n{i}/statistics/rx_bytes");
        let read = |p: &str| -> anyhow::Result<u64> {
            Ok(std::fs::read_to_string(p)
                .with_context(|| format!("reading {p}"))?
                .trim()
                .parse()?)
        };
        let own = |state: &LabState| -> anyhow::Result<u64> {
            let mut sum = 0;
            for node in &state.nodes {
                sum += gossip_bytes_out(&node.socket)?;
            }
            Ok(sum)
        };
        let own0 = match self {
            Cluster::Shoal { state } => Some(own(state)?),
            Cluster::Serf(_) => None,
        };
        let before: Vec<u64> = (1..=n).map(|i| read(&veth(i))).collect::<anyhow::Result<_>>()?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let after: Vec<u64> = (1..=n).map(|i| read(&veth(i))).collect::<anyhow::Result<_>>()?;
        let el = t0.elapsed().as_secs_f64();
        let own1 = match self {
            Cluster::Shoal { state } => Some(own(state)?),
            Cluster::Serf(_) => None,
        };
        let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        let per_node = total as f64 / el / f64::from(n);
        let own_rate = own0.zip(own1).map(|(a, b)| (b - a) as f64 / el / f64::from(n));
        Ok((per_node, own_rate))
    }

    fn kill_and_detect(&mut self, victim: &str, observers: &[String]) -> anyhow::Result<f64> {
        match self {
            Cluster::Shoal { state } => {
                let socks = sockets(state, observers)?;
                let old_gen = generation_of(&socks[0], victim)?;
                // The pid `lab start` recorded last time.
                let fresh = LabState::load(&state.name)?;
                let pid = fresh.node(victim)?.pid.context("victim agent not running")?;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
                let t0 = Instant::now();
                poll_all(&socks, t0, |ms| {
                    ms.iter()
                        .any(|m| m.name == victim && m.generation == old_gen && m.state == "down")
                })
            }
            Cluster::Serf(s) => s.kill_and_detect(victim, observers),
        }
    }

    fn restart_and_join(&mut self, victim: &str, observers: &[String]) -> anyhow::Result<f64> {
        match self {
            Cluster::Shoal { state } => {
                let socks = sockets(state, observers)?;
                let old = generation_of(&socks[0], victim)?;
                let t0 = Instant::now();
                let mut start = Command::new(shoal_bin())
                    .args(["--lab", &state.name, "lab", "start", victim])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("shoal lab start")?;
                let res = poll_all(&socks, t0, |ms| {
                    ms.iter().any(|m| m.name == victim && m.generation > old && m.state == "alive")
                });
                let st = start.wait()?;
                if !st.success() {
                    let mut err = String::new();
                    if let Some(mut e) = start.stderr.take() {
                        e.read_to_string(&mut err)?;
                    }
                    bail!("lab start {victim}: {err}");
                }
                res
            }
            Cluster::Serf(s) => s.restart_and_join(victim, observers),
        }
    }
}

fn sockets(state: &LabState, names: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    names.iter().map(|n| Ok(state.node(n)?.socket.clone())).collect()
}

fn generation_of(sock: &Path, name: &str) -> anyhow::Result<u64> {
    members(sock)?
        .iter()
        .filter(|m| m.name == name)
        .map(|m| m.generation)
        .max()
        .with_context(|| format!("{name} is not a member"))
}

/// One thread per node polls its agent until `ok` holds; returns when it holds on all, in
/// seconds since `t0`.
fn poll_all(
    socks: &[PathBuf],
    t0: Instant,
    ok: impl Fn(&[MemberInfo]) -> bool + Sync,
) -> anyhow::Result<f64> {
    let ok = &ok;
    let times: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = socks
            .iter()
            .map(|sock| {
                s.spawn(move || {
                    loop {
                        if let Ok(ms) = members(sock)
                            && ok(&ms)
                        {
                            return Ok(t0.elapsed().as_secs_f64());
                        }
                        if t0.elapsed() > LIMIT {
                            bail!("{} did not get there within {LIMIT:?}", sock.display());
                        }
                        std::thread::sleep(POLL);
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("poller panicked"))))
            .collect()
    });
    let mut worst = 0.0f64;
    for t in times {
        worst = worst.max(t?);
    }
    Ok(worst)
}

/// `GET path` on an agent's API socket, through the CLI's own client; the body.
fn http_get(sock: &Path, path: &str) -> anyhow::Result<String> {
    let host = Host { socket: sock.to_path_buf() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The timeout's timer needs the runtime at its creation: made inside `block_on`.
    let body = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), host.get(path)).await })
        .map_err(|_| anyhow::anyhow!("GET {path} on {}: no answer in 5 s", sock.display()))??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn members(sock: &Path) -> anyhow::Result<Vec<MemberInfo>> {
    let info: NodeInfo = serde_json::from_str(&http_get(sock, "/info")?)?;
    Ok(info.gossip.context("agent has no gossip")?.members)
}

/// Sum of `shoal_gossip_bytes_total{direction="out"}` over transports.
fn gossip_bytes_out(sock: &Path) -> anyhow::Result<u64> {
    let text = http_get(sock, "/metrics")?;
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .map_err(|e| anyhow::anyhow!("/metrics is not OpenMetrics text: {e:?}"))?;
    let family = parsed.families.get("shoal_gossip_bytes").context("no shoal_gossip_bytes")?;
    let mut sum = 0.0;
    for sample in family.iter_samples() {
        let labels = sample.get_labelset().ok();
        let out = labels.as_ref().and_then(|l| l.get_label_value("direction")) == Some("out");
        if let (true, OpenMetricsValue::Counter(c)) = (out, &sample.value) {
            sum += c.value.as_f64();
        }
    }
    Ok(sum as u64)
}

/// serf agents in a lab's namespaces (the lab's own agents killed first). A thread per agent
/// reads its log as it is written and stamps serf's `EventMemberJoin` / `EventMemberFailed`
/// lines: serf logs them the moment a member's status changes (what `serf members` shows),
/// before its agent coalesces member events for handlers (3 s / 1 s quiescent), so this
/// times serf exactly, without polling. `Drop` kills and reaps them (the lab's `down` would
/// kill them too).
struct SerfCluster {
    state: LabState,
    key: String,
    agents: Vec<(String, Option<Child>)>,
    events: std::sync::Arc<std::sync::Mutex<Vec<SerfEvent>>>,
}

/// One stamped status change: when, seen by which node, which event, about whom.
#[derive(Debug, Clone)]
struct SerfEvent {
    at: Instant,
    observer: String,
    event: String,
    subject: String,
}

impl SerfCluster {
    fn start(lab: &str, state: LabState) -> anyhow::Result<SerfCluster> {
        // Crash-stop the lab's shoal agents: the namespaces stay, port 7946 frees.
        for node in &state.nodes {
            let st = Command::new(shoal_bin())
                .args(["--lab", lab, "lab", "stop", &node.name, "--kill"])
                .output()?;
            if !st.status.success() {
                bail!("lab stop {}: {}", node.name, String::from_utf8_lossy(&st.stderr));
            }
        }
        let key = STANDARD.encode(rand::random::<[u8; 32]>());
        let mut c = SerfCluster { state, key, agents: Vec::new(), events: Default::default() };
        let names: Vec<String> = c.state.nodes.iter().map(|x| x.name.clone()).collect();
        for name in names {
            let child = c.spawn(&name)?;
            c.agents.push((name, Some(child)));
        }
        Ok(c)
    }

    fn spawn(&self, name: &str) -> anyhow::Result<Child> {
        let node = self.state.node(name)?;
        let seed = self.state.nodes.iter().find(|x| x.name != name).map(|x| x.addr);
        let mut cmd = Command::new("serf");
        cmd.arg("agent")
            .args(["-node", name, "-bind", &format!("{}:7946", node.addr)])
            .args(["-rpc-addr", "127.0.0.1:7373", "-profile", "lan", "-encrypt", &self.key])
            .args(["-log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // node1 is the seed; the others join through it (retrying while it starts), and a
        // restarted node joins at once like `shoal lab start`.
        let restart = self.agents.len() == self.state.nodes.len();
        if let Some(s) = seed.filter(|_| name != "node1" || restart) {
            let s = format!("{s}:7946");
            if restart {
                cmd.args(["-join", &s]);
            } else {
                cmd.args(["-retry-join", &s, "-retry-interval", "1s"]);
            }
        }
        let ns = NetNs::open(&node.netns)?;
        let mut child =
            ns.run(|| cmd.spawn())?.with_context(|| format!("starting serf in {name}"))?;
        let out = child.stdout.take().context("serf stdout")?;
        let (events, observer) = (self.events.clone(), name.to_owned());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                // "... [INFO] serf: EventMemberFailed: node8 198.18.150.8"
                let Some((_, rest)) = line.split_once("serf: EventMember") else { continue };
                let mut it = rest.split_whitespace();
                let (Some(ev), Some(subject)) = (it.next(), it.next()) else { continue };
                let event = ev.trim_end_matches(':').to_owned();
                if let Ok(mut v) = events.lock() {
                    v.push(SerfEvent {
                        at,
                        observer: observer.clone(),
                        event,
                        subject: subject.to_owned(),
                    });
                }
            }
        });
        Ok(child)
    }

    /// Waits until every observer logged `event` ("Join", "Failed") about `subject` after
    /// `t0`; the latest of those times, in seconds since `t0`.
    fn wait_event(
        &self,
        observers: &[String],
        event: &str,
        subject: &str,
        t0: Instant,
    ) -> anyhow::Result<f64> {
        loop {
            let firsts: Vec<Option<Instant>> = {
                let v = self.events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                observers
                    .iter()
                    .map(|o| {
                        v.iter()
                            .filter(|e| {
                                e.at >= t0
                                    && &e.observer == o
                                    && e.event == event
                                    && e.subject == subject
                            })
                            .map(|e| e.at)
                            .min()
                    })
                    .collect()
            };
            if firsts.iter().all(Option::is_some) {
                let last = firsts.into_iter().flatten().max().unwrap_or(t0);
                return Ok(last.duration_since(t0).as_secs_f64());
            }
            if t0.elapsed() > LIMIT {
                bail!("serf: {event} {subject} not seen by all within {LIMIT:?}: {firsts:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_formed(&self, names: &[String], t0: Instant) -> anyhow::Result<f64> {
        loop {
            let done = {
                let v = self.events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                names.iter().all(|o| {
                    let seen: BTreeSet<&str> = v
                        .iter()
                        .filter(|e| &e.observer == o && e.event == "Join")
                        .map(|e| e.subject.as_str())
                        .collect();
                    names.iter().all(|x| seen.contains(x.as_str()))
                })
            };
            if done {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > LIMIT {
                bail!("serf cluster did not form within {LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_and_detect(&mut self, victim: &str, observers: &[String]) -> anyhow::Result<f64> {
        let slot = self.agents.iter_mut().find(|(n, _)| n == victim).context("no such agent")?;
        let mut child = slot.1.take().context("victim not running")?;
        child.kill()?;
        let t0 = Instant::now();
        child.wait()?;
        self.wait_event(observers, "Failed", victim, t0)
    }

    fn restart_and_join(&mut self, victim: &str, observers: &[String]) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let child = self.spawn(victim)?;
        let slot = self.agents.iter_mut().find(|(n, _)| n == victim).context("no such agent")?;
        slot.1 = Some(child);
        self.wait_event(observers, "Join", victim, t0)
    }
}

impl Drop for SerfCluster {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().filter_map(|(_, c)| c.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
