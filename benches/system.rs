//! The benchmark suite: one command runs every side-by-side comparison and writes the report.
//!
//! ```text
//! cargo bench -p shoal --bench system -- [--quick] [--only NAME...] [--out DIR] [--rounds N]
//!                                        [--strict] [--list] [--from-json FILE]
//! ```
//!
//! Run as root: every section but `fanout` builds network namespaces on this machine.
//! Sections, in run order (`--only` takes their names, space- or comma-separated):
//!
//! - `mesh`, `mesh-remote`: the routing mesh vs HAProxy, nginx stream, socat and no proxy
//!   (`crates/ingress/benches/mesh.rs` with `PIN=1`, and `OVERLAY=1` for the backend on another
//!   node);
//! - `mesh-lab`: the mesh as deployed (wrk on the host, nginx tasks on two other lab nodes,
//!   nothing pinned) vs HAProxy and nginx stream in node1's namespace, and no proxy; the
//!   whole machine's CPU per request;
//! - `overlay`: plain and encrypted overlay vs kernel VXLAN and wireguard-go
//!   (`crates/vxlan/benches/overlay.rs`);
//! - `dns`: shoal's DNS vs unbound and dnsmasq (`crates/dns/benches/dns.rs`);
//! - `gossip`: failure detection, join propagation and bytes at rest vs serf at 8 and 16 nodes
//!   (`benches/gossip.rs`; 8 nodes only with `--quick`);
//! - `fanout`: what one single-task change costs on a simulated swarm of 100 nodes, 500
//!   services and 5,000 tasks, each figure against its goal: the bytes a node receives (at
//!   most 2 KiB) and the leader's pass (under 50 ms) (`crates/cluster/benches/watch.rs`; no
//!   peer, in memory);
//! - `deploy`: from `service create --replicas 3 -p 8100:8100` on a fresh 3-node lab to all
//!   three nodes answering curl on the published port (no peer);
//! - `rss`: VmRSS of each lab agent (`lab up --demo`) at rest and under a wrk run through the
//!   mesh (no peer);
//! - `swarm`: Docker Swarm itself (Debian's docker.io, 3 dockerds in network namespaces) against
//!   shoal with lab and with production timings, the tutorial's steps on fresh labs of each,
//!   the capabilities tried on both, and the CLI's columns compared (`benches/swarm/`).
//! - `reliability`: requests failed, detection, convergence and failover while a node's link
//!   is cut and healed and the leader is killed (`benches/reliability/`; no peer).
//!
//! The crate benchmarks are built with `cargo bench --no-run` (the same profile) and run as
//! child processes with `--out FILE` (their rows as JSON, benches/common's format) and
//! `--quick`/`--rounds`; deploy and rss run here, driving the `shoal` binary of this build.
//! Each section is a warm-up and several rounds, medians and spreads; `--quick` is one short
//! round each (a few minutes in all, for CI: it checks the report is produced).
//!
//! The report goes to `--out DIR` (default: the repository root for a full run of every
//! section; `$CARGO_TARGET_DIR/bench` or `target/bench` for `--quick` and `--only` runs, so a
//! smoke run does not overwrite the committed figures): `BENCHMARKS.md`, `BENCHMARKS.json` and
//! `benches/charts/*.svg`. Exit status 0 when the report is written; with `--strict`, 1 when
//! any row failed. `--from-json FILE` writes the report again from a BENCHMARKS.json without
//! measuring (after a change to the report's layout).

mod common;
mod mesh_lab;
mod reliability;
mod report;
mod swarm;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use common::{Conditions, Report, Row};
use report::{Section, Suite};

/// The command line.
#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    only: Vec<String>,
    out: Option<PathBuf>,
    rounds: Option<usize>,
    strict: bool,
    list: bool,
    /// Re-render the report from a BENCHMARKS.json instead of measuring.
    from_json: Option<PathBuf>,
}

impl Args {
    fn parse(args: &[String]) -> anyhow::Result<Args> {
        let mut a = Args {
            quick: std::env::var("SHOAL_BENCH_QUICK").is_ok_and(|v| v == "1"),
            only: Vec::new(),
            out: None,
            rounds: None,
            strict: false,
            list: false,
            from_json: None,
        };
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => a.quick = true,
                "--strict" => a.strict = true,
                "--list" => a.list = true,
                // cargo passes --bench to harness-less benchmarks.
                "--bench" => {}
                "--out" => a.out = Some(it.next().context("--out needs a directory")?.into()),
                "--from-json" => {
                    a.from_json = Some(it.next().context("--from-json needs a file")?.into());
                }
                "--rounds" => {
                    let n = it.next().context("--rounds needs a number")?;
                    a.rounds = Some(n.parse().with_context(|| format!("--rounds {n}"))?);
                }
                "--only" => {
                    while let Some(v) = it.next_if(|v| !v.starts_with("--")) {
                        a.only.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_owned));
                    }
                    if a.only.is_empty() {
                        bail!("--only needs section names: {}", names().join(" "));
                    }
                }
                other => bail!("unknown argument {other:?} (see --list and the source's header)"),
            }
        }
        for o in &a.only {
            if !SECTIONS.iter().any(|s| s.name == o) {
                bail!("unknown section {o:?}: the sections are {}", names().join(", "));
            }
        }
        Ok(a)
    }

    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

/// How a section is measured.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A benchmark binary of a package: its package, bench name, directory, extra environment.
    Bench {
        pkg: &'static str,
        bench: &'static str,
        dir: &'static str,
        env: &'static [(&'static str, &'static str)],
    },
    /// Deploy time, measured here.
    Deploy,
    /// The routing mesh in a lab as deployed, measured here.
    MeshLab,
    /// Agent memory, measured here.
    Rss,
    /// Docker Swarm side by side, measured here (benches/swarm).
    Swarm,
    /// Chaos under load, measured here.
    Reliability,
}

/// A section of the suite.
#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    title: &'static str,
    what: &'static str,
    rerun: &'static str,
    kind: Kind,
    /// Recorded rounds in a full run (quick: one, two for gossip).
    full_rounds: usize,
    /// Longest a full run may take before it is stopped.
    limit: Duration,
    /// Whether the section builds network namespaces (and so runs only as root).
    needs_root: bool,
}

const SECTIONS: &[Spec] = &[
    Spec {
        name: "mesh",
        title: "Routing mesh, backend on the same node",
        what: "A client namespace reaches a backend namespace (iperf3, nginx serving 1 KiB) through a \
               proxy namespace: shoal's routing mesh (one runtime thread, splice for bulk), HAProxy \
               (splice-auto, one thread), nginx stream (one worker), socat (fork), and directly \
               with no proxy. The proxy reaches the backend over a veth on the same bridge, as the \
               mesh reaches a task on its own node.",
        rerun: "PIN=1 cargo bench -p shoal-ingress --bench mesh",
        kind: Kind::Bench {
            pkg: "shoal-ingress",
            bench: "mesh",
            dir: "crates/ingress",
            env: &[("PIN", "1")],
        },
        full_rounds: 3,
        limit: Duration::from_secs(40 * 60),
        needs_root: true,
    },
    Spec {
        name: "mesh-remote",
        title: "Routing mesh, backend on another node",
        what: "The same comparison with the backend behind a kernel VXLAN overlay as seen from the \
               proxy, the way the mesh reaches a task on another node; the client still reaches \
               the proxy on the underlay.",
        rerun: "PIN=1 OVERLAY=1 cargo bench -p shoal-ingress --bench mesh",
        kind: Kind::Bench {
            pkg: "shoal-ingress",
            bench: "mesh",
            dir: "crates/ingress",
            env: &[("PIN", "1"), ("OVERLAY", "1")],
        },
        full_rounds: 3,
        limit: Duration::from_secs(40 * 60),
        needs_root: true,
    },
    Spec {
        name: "mesh-lab",
        title: "Routing mesh as deployed",
        what: "A 3-node lab as a user runs it, nothing pinned: wrk on the host against node1's \
               published port, nginx tasks on node2 and node3 behind the overlay. In the same lab \
               HAProxy and nginx stream run in node1's namespace and forward to plain nginx on \
               node2's and node3's underlay addresses (a shorter path than the mesh's, which \
               crosses VXLAN), and wrk also reaches one nginx directly. The headline is the CPU \
               the whole machine spends per request: every process and softirq, from /proc/stat.",
        rerun: "cargo bench -p shoal --bench system -- --only mesh-lab",
        kind: Kind::MeshLab,
        full_rounds: 3,
        limit: Duration::from_secs(20 * 60),
        needs_root: true,
    },
    Spec {
        name: "overlay",
        title: "Overlay throughput",
        what: "TCP between two task namespaces on two node namespaces: shoal's plain overlay \
               against kernel VXLAN set up by hand and the bare underlay; shoal's encrypted \
               overlay (kernel VXLAN inside userspace WireGuard, boringtun) against wireguard-go; \
               CPU per Gbit of the two userspace WireGuard implementations.",
        rerun: "cargo bench -p shoal-vxlan --bench overlay",
        kind: Kind::Bench { pkg: "shoal-vxlan", bench: "overlay", dir: "crates/vxlan", env: &[] },
        full_rounds: 5,
        limit: Duration::from_secs(30 * 60),
        needs_root: true,
    },
    Spec {
        name: "dns",
        title: "Service DNS",
        what: "1,000 service names answered by shoal's DNS service, unbound (local-data) and \
               dnsmasq (hosts file), one serving thread each, all pinned to the same CPU; dnsperf \
               from a client namespace at max load and at fixed offered loads (p50/p99 latency, \
               server CPU per query).",
        rerun: "cargo bench -p shoal-dns --bench dns",
        kind: Kind::Bench { pkg: "shoal-dns", bench: "dns", dir: "crates/dns", env: &[] },
        full_rounds: 5,
        limit: Duration::from_secs(30 * 60),
        needs_root: true,
    },
    Spec {
        name: "gossip",
        title: "Gossip membership",
        what: "SWIM membership in labs of 8 and 16 node namespaces (8 only with --quick), shoal's \
               gossip against serf (memberlist, LAN profile), each in its own lab: time until \
               every other node sees a `kill -9`ed node failed, time until every node sees it \
               alive again after a restart, and bytes per second each node sends at rest.",
        rerun: "cargo bench -p shoal --bench gossip",
        kind: Kind::Bench { pkg: "shoal", bench: "gossip", dir: ".", env: &[] },
        full_rounds: 5,
        limit: Duration::from_secs(40 * 60),
        needs_root: true,
    },
    Spec {
        name: "fanout",
        title: "Watch fan-out",
        what: "A simulated swarm in memory (100 nodes, 500 services, 5,000 tasks, 20 networks): \
               one task report at a time is applied and logged by the leader, which then answers \
               every node with its encoded delta from the node's last revision. The largest \
               delta any node receives per single-task change (goal: at most 2 KiB) and the \
               time of the whole leader pass (goal: under 50 ms), each compared with its goal; a \
               figure that misses its goal is a failed row.",
        rerun: "cargo bench -p shoal-cluster --bench watch",
        kind: Kind::Bench { pkg: "shoal-cluster", bench: "watch", dir: "crates/cluster", env: &[] },
        full_rounds: 5,
        limit: Duration::from_secs(10 * 60),
        needs_root: false,
    },
    Spec {
        name: "deploy",
        title: "Deploy time",
        what: "A fresh 3-node lab per round (`shoal lab up`, `swarm init`, two `swarm join`s), then \
               `service create --replicas 3 -p 8100:8100` of the demo app (`shoal demo visitor`): \
               the time until the command returns (it waits for 3/3 running) and until every \
               node answers curl on the published port. These rows are shoal's alone; Docker \
               Swarm's figures for the same steps are in \"Docker Swarm, side by side\".",
        rerun: "cargo bench -p shoal --bench system -- --only deploy",
        kind: Kind::Deploy,
        full_rounds: 3,
        limit: Duration::from_secs(20 * 60),
        needs_root: true,
    },
    Spec {
        name: "rss",
        title: "Agent memory",
        what: "VmRSS of each lab agent in `shoal lab up --demo` (3 nodes; myhelloworld x3 behind \
               the mesh on 8100, myredis on the encrypted overlay my-overlay): at rest, and its \
               peak while wrk drives the demo app through node1's published port (each request \
               crosses the mesh and the encrypted overlay to redis). No peer: these rows are \
               shoal's alone.",
        rerun: "cargo bench -p shoal --bench system -- --only rss",
        kind: Kind::Rss,
        full_rounds: 3,
        limit: Duration::from_secs(20 * 60),
        needs_root: true,
    },
    Spec {
        name: "swarm",
        title: "Docker Swarm, side by side",
        what: "The Swarm tutorial's steps on a fresh 3-node lab of each system in the same run: \
               Docker Swarm (Debian's docker.io: one dockerd per network namespace, the docker \
               CLI), shoal with the lab's fast control-plane timings and shoal with production \
               timings (`lab up --cluster-tuning default`). Per step both figures and the ratio; \
               then each capability tried on both (a failure in the system's own words); the \
               docker CLI's `node ls`, `service ls` and `service ps` columns against shoal's.",
        rerun: "cargo bench -p shoal --bench system -- --only swarm",
        kind: Kind::Swarm,
        full_rounds: 3,
        limit: Duration::from_secs(30 * 60),
        needs_root: true,
    },
    Spec {
        name: "reliability",
        title: "Reliability",
        what: "Clients on this host send one request after another through the published port \
               of a 3-node lab (three managers, a 3-replica web service) while node3's link is \
               cut for 20 s and healed, and then while the leader (node1) is killed whole: \
               requests sent and failed, the time until the node is marked Down (detection), \
               until its task runs elsewhere (convergence) and until a new leader is there \
               (failover). No peer: these rows are shoal's alone.",
        rerun: "cargo bench -p shoal --bench system -- --only reliability",
        kind: Kind::Reliability,
        full_rounds: 3,
        limit: Duration::from_secs(20 * 60),
        needs_root: true,
    },
];

fn names() -> Vec<&'static str> {
    SECTIONS.iter().map(|s| s.name).collect()
}

/// The repository root (this package's directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn shoal_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal"))
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("system bench: {e:#}");
            std::process::exit(64);
        }
    };
    if args.list {
        for s in SECTIONS {
            println!("{:<12} {}", s.name, s.title);
        }
        return;
    }
    match run(&args, &argv) {
        Ok(failed) if failed > 0 && args.strict => {
            eprintln!("system bench: {failed} row(s) failed (--strict)");
            std::process::exit(1);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("system bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs the sections, writes the report; returns how many rows failed.
fn run(args: &Args, argv: &[String]) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    let started = now_unix();
    // The tree measured is the one built now, whatever is committed while the suite runs.
    let commit = commit();
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick || !args.only.is_empty() { target_dir().join("bench") } else { root() }
    });
    let shown: Vec<&str> = argv.iter().map(String::as_str).filter(|a| *a != "--bench").collect();
    let command = if shown.is_empty() {
        "cargo bench -p shoal --bench system".to_owned()
    } else {
        format!("cargo bench -p shoal --bench system -- {}", shown.join(" "))
    };
    if let Some(json) = &args.from_json {
        let mut suite = report::read(json)?;
        let written = report::write(&mut suite, &out)?;
        println!("wrote {} from {}", written.markdown.display(), json.display());
        return Ok(suite
            .sections
            .iter()
            .flat_map(|s| &s.rows)
            .filter(|r| r.status == common::Status::Failed)
            .count());
    }
    let specs: Vec<&Spec> = SECTIONS.iter().filter(|s| args.wants(s.name)).collect();
    println!(
        "shoal benchmark suite: {} ({}), report into {}",
        specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        if args.quick { "quick" } else { "full" },
        out.display()
    );
    let root_user = nix::unistd::geteuid().is_root();
    let tmp = target_dir().join("bench").join(format!("system-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    // Build the benchmark binaries once, with this build's profile. Always all of them, with
    // the same packages selected, so cargo resolves the same features each time and reuses
    // what it built (`scripts/bench.sh` selects the same packages for this binary too).
    let wanted: Vec<(&str, &str, &str)> = SECTIONS
        .iter()
        .filter_map(|s| match s.kind {
            Kind::Bench { pkg, bench, dir, .. } => Some((pkg, bench, dir)),
            _ => None,
        })
        .collect();
    let needs_build =
        specs.iter().any(|s| matches!(s.kind, Kind::Bench { .. }) && (root_user || !s.needs_root));
    let built = Instant::now();
    let exes = if needs_build { build_benches(&wanted) } else { Ok(BTreeMap::new()) };
    let build_seconds = built.elapsed().as_secs_f64();

    let mut sections = Vec::new();
    for spec in &specs {
        let started = Instant::now();
        println!("\n=== [{}] {} ===", spec.name, spec.title);
        let mut section = if spec.needs_root && !root_user {
            Section::failed(
                spec.name,
                spec.title,
                spec.what,
                spec.rerun,
                "needs root (network namespaces)",
            )
        } else {
            match spec.kind {
                Kind::Bench { bench, dir, env, .. } => match &exes {
                    Err(e) => Section::failed(
                        spec.name,
                        spec.title,
                        spec.what,
                        spec.rerun,
                        &format!("building the benchmarks failed: {e:#}"),
                    ),
                    Ok(map) => match map.get(&(dir.to_owned(), bench.to_owned())) {
                        None => Section::failed(
                            spec.name,
                            spec.title,
                            spec.what,
                            spec.rerun,
                            &format!("cargo did not report the {bench} benchmark's executable"),
                        ),
                        Some(exe) => run_bench(spec, exe, dir, env, args, &tmp),
                    },
                },
                Kind::Deploy => in_process(spec, args, deploy),
                Kind::MeshLab => in_process(spec, args, mesh_lab::mesh_lab),
                Kind::Rss => in_process(spec, args, rss),
                Kind::Swarm => in_process(spec, args, swarm::section::measure),
                Kind::Reliability => in_process(spec, args, reliability::reliability),
            }
        };
        section.seconds = started.elapsed().as_secs_f64();
        for r in &section.rows {
            if r.status == common::Status::Failed {
                eprintln!(
                    "[{}] failed: {} vs {}: {}",
                    spec.name,
                    r.metric,
                    r.peer_name,
                    r.note.as_deref().unwrap_or("")
                );
            }
        }
        sections.push(section);
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let mut machine = Conditions::detect();
    for s in &sections {
        for (n, v) in &s.peers {
            if !machine.peers.iter().any(|(m, _)| m == n) {
                machine.peers.push((n.clone(), v.clone()));
            }
        }
        for (n, v) in &s.tools {
            if !machine.tools.iter().any(|(m, _)| m == n) {
                machine.tools.push((n.clone(), v.clone()));
            }
        }
    }
    machine.tool("rustc", "rustc", &["-V"]);
    machine.pinning = "per section".to_owned();
    let mut suite = Suite {
        schema: 1,
        command,
        quick: args.quick,
        started_unix: started,
        seconds: t0.elapsed().as_secs_f64(),
        build_seconds,
        commit,
        machine,
        notes: machine_notes(),
        sections,
    };
    let written = report::write(&mut suite, &out)?;
    for p in &written.repaired {
        eprintln!("report: {p}");
    }
    let failed = suite
        .sections
        .iter()
        .flat_map(|s| &s.rows)
        .filter(|r| r.status == common::Status::Failed)
        .count();
    println!(
        "\nwrote {} and {} ({} chart(s)) in {:.1} min; {} row(s), {} failed",
        written.markdown.display(),
        written.json.display(),
        written.charts.len(),
        suite.seconds / 60.0,
        suite.sections.iter().map(|s| s.rows.len()).sum::<usize>(),
        failed
    );
    Ok(failed)
}

/// Memory and the load when the suite started (the machine may be shared).
fn machine_notes() -> Vec<String> {
    let mut v = Vec::new();
    if let Some(kb) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    }) {
        v.push(format!("{:.1} GiB of memory", kb / 1024.0 / 1024.0));
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        let l: Vec<&str> = l.split_whitespace().take(3).collect();
        v.push(format!(
            "load average {} at the start (the machine is shared with other work)",
            l.join(" ")
        ));
    }
    v
}

/// The commit measured, with "+changes" when the tree differs from it.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown".to_owned() };
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty { format!("{head}+changes") } else { head }
}

/// `cargo bench --no-run` for the wanted benchmarks; their executables by (dir, bench).
fn build_benches(
    wanted: &[(&str, &str, &str)],
) -> anyhow::Result<BTreeMap<(String, String), PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args(["bench", "--no-run", "--message-format=json-render-diagnostics"]);
    let mut pkgs: Vec<&str> = wanted.iter().map(|w| w.0).collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    for p in pkgs {
        cmd.args(["-p", p]);
    }
    let mut benches: Vec<&str> = wanted.iter().map(|w| w.1).collect();
    benches.sort_unstable();
    benches.dedup();
    for b in benches {
        cmd.args(["--bench", b]);
    }
    println!("building the benchmarks: {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output().context("running cargo")?;
    if !out.status.success() {
        bail!("cargo bench --no-run: {}", out.status);
    }
    let mut map = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(src)) = (v["executable"].as_str(), v["target"]["src_path"].as_str())
        else {
            continue;
        };
        for (_, bench, dir) in wanted {
            let expected = root().join(dir).join("benches").join(format!("{bench}.rs"));
            if Path::new(src) == expected {
                map.insert(((*dir).to_owned(), (*bench).to_owned()), PathBuf::from(exe));
            }
        }
    }
    Ok(map)
}

/// Waits for `child`, killing it after `limit`; its exit status or why there is none.
fn wait_limited(mut child: Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("stopped after {:.0} min", limit.as_secs_f64() / 60.0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs one benchmark binary with `--out FILE` and makes its report a section.
fn run_bench(
    spec: &Spec,
    exe: &Path,
    dir: &str,
    env: &[(&str, &str)],
    args: &Args,
    tmp: &Path,
) -> Section {
    let json = tmp.join(format!("{}.json", spec.name));
    let _ = std::fs::remove_file(&json);
    let rounds =
        args.rounds.unwrap_or(if args.quick { quick_rounds(spec) } else { spec.full_rounds });
    let mut cmd = Command::new(exe);
    cmd.current_dir(root().join(dir))
        .arg("--out")
        .arg(&json)
        .args(["--rounds", &rounds.to_string()])
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    if args.quick {
        cmd.arg("--quick");
    }
    let limit = if args.quick { Duration::from_secs(15 * 60) } else { spec.limit };
    println!(
        "running {}{}",
        env.iter().map(|(k, v)| format!("{k}={v} ")).collect::<String>(),
        format_args!("{cmd:?}")
    );
    let status = cmd.spawn().context("starting the benchmark").and_then(|c| wait_limited(c, limit));
    let report = Report::read_json(&json);
    let section = match (status, report) {
        (Ok(_), Ok(rep)) | (Err(_), Ok(rep)) => from_report(spec, rep),
        (Ok(st), Err(e)) => Section::failed(
            spec.name,
            spec.title,
            spec.what,
            spec.rerun,
            &format!("{} exited with {st} and wrote no report ({e:#})", exe.display()),
        ),
        (Err(e), Err(_)) => {
            Section::failed(spec.name, spec.title, spec.what, spec.rerun, &format!("{e:#}"))
        }
    };
    if let Some(e) = section.error.as_ref() {
        eprintln!("[{}] {e}", spec.name);
    }
    section
}

fn quick_rounds(spec: &Spec) -> usize {
    if spec.name == "gossip" { 2 } else { 1 }
}

fn from_report(spec: &Spec, rep: Report) -> Section {
    Section {
        name: spec.name.to_owned(),
        title: spec.title.to_owned(),
        what: spec.what.to_owned(),
        rerun: spec.rerun.to_owned(),
        rounds: rep.rounds,
        pinning: rep.conditions.pinning.clone(),
        peers: rep.conditions.peers.clone(),
        tools: rep.conditions.tools.clone(),
        notes: rep.conditions.notes.clone(),
        rows: rep.rows,
        seconds: 0.0,
        error: None,
    }
}

/// Runs a section measured in this process; an error becomes a failed section.
fn in_process(spec: &Spec, args: &Args, f: fn(&Spec, &Args) -> anyhow::Result<Section>) -> Section {
    match f(spec, args) {
        Ok(s) => s,
        Err(e) => Section::failed(spec.name, spec.title, spec.what, spec.rerun, &format!("{e:#}")),
    }
}

/// A lab made with `shoal lab up` on a /24 of 198.18.200-249.0/24; `shoal lab down` in `Drop`
/// (kills every process in its namespaces, deletes them, the bridge and the veths), also on
/// error or panic.
struct Lab {
    name: String,
    state: shoal::lab::LabState,
}

impl Lab {
    fn up(tag: &str, extra: &[&str]) -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let name = format!("b{tag}{}", pid % 100_000);
        let mut last = String::new();
        for attempt in 0..10u32 {
            let third = 200 + (pid.wrapping_add(attempt * 7) % 50);
            let subnet = format!("198.18.{third}.0/24");
            let guard = LabGuard(name.clone());
            let out = shoal()
                .args(["lab", "up", "--lab", &name, "--nodes", "3", "--subnet", &subnet])
                .args(extra)
                .output()
                .context("running shoal lab up")?;
            if out.status.success() {
                let state = shoal::lab::LabState::load(&name)?;
                std::mem::forget(guard);
                return Ok(Lab { name, state });
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            drop(guard);
            if !last.contains("already") && !last.contains("in use") {
                break;
            }
        }
        bail!("lab up failed: {last}")
    }

    /// `swarm init` on node1, then node2 and node3 join it as workers.
    fn form_swarm(&self) -> anyhow::Result<()> {
        self.on("node1", &["swarm", "init"])?;
        let token = self.on("node1", &["swarm", "join-token", "-q", "worker"])?;
        let manager = format!("{}:2377", self.state.nodes[0].addr);
        for n in ["node2", "node3"] {
            self.on(n, &["swarm", "join", "--token", token.trim(), &manager])?;
        }
        Ok(())
    }

    /// `shoal --lab NAME --node NODE ARGS...`, which must succeed; its stdout.
    fn on(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = shoal().args(["--lab", &self.name, "--node", node]).args(args).output()?;
        if !out.status.success() {
            bail!("shoal {args:?} on {node}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(LabGuard(self.name.clone()));
    }
}

/// `shoal lab down` of a lab name when dropped.
struct LabGuard(String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        match shoal().args(["lab", "down", "--lab", &self.0]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("lab down {}: {}", self.0, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("lab down {}: {e}", self.0),
        }
    }
}

/// The `shoal` binary with no SHOAL_* variables from the environment.
fn shoal() -> Command {
    let mut c = Command::new(shoal_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("SHOAL_")) {
            c.env_remove(k);
        }
    }
    c
}

/// Whether `curl` gets the demo page from `url`.
fn answers(url: &str) -> bool {
    Command::new("curl")
        .args(["-s", "-m", "1", url])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Hello World"))
}

fn section_of(
    spec: &Spec,
    rounds: usize,
    pinning: &str,
    tools: Vec<(String, String)>,
    notes: Vec<String>,
    rows: Vec<Row>,
) -> Section {
    Section {
        name: spec.name.to_owned(),
        title: spec.title.to_owned(),
        what: spec.what.to_owned(),
        rerun: spec.rerun.to_owned(),
        rounds,
        pinning: pinning.to_owned(),
        peers: Vec::new(),
        tools,
        notes,
        rows,
        seconds: 0.0,
        error: None,
    }
}

/// Deploy time: per round a fresh lab, the swarm, then `service create` timed until every node
/// answers curl on the published port.
fn deploy(spec: &Spec, args: &Args) -> anyhow::Result<Section> {
    if !common::have("curl") {
        bail!("curl is not installed");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { spec.full_rounds });
    let warmup = usize::from(!args.quick);
    let exe = shoal_bin().display().to_string();
    let (mut form, mut created, mut answered) = (Vec::new(), Vec::new(), Vec::new());
    let recorded = common::rounds(warmup, rounds, |i, warm| {
        let lab = Lab::up("d", &[])?;
        let t = Instant::now();
        lab.form_swarm()?;
        let formed = t.elapsed().as_secs_f64();
        let urls: Vec<String> =
            lab.state.nodes.iter().map(|n| format!("http://{}:8100/visitor", n.addr)).collect();
        let t0 = Instant::now();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (create, all) = std::thread::scope(|s| -> anyhow::Result<(f64, f64)> {
            let stop = &stop;
            let pollers: Vec<_> = urls
                .iter()
                .map(|u| {
                    s.spawn(move || -> Option<f64> {
                        while t0.elapsed() < Duration::from_secs(180)
                            && !stop.load(std::sync::atomic::Ordering::Relaxed)
                        {
                            if answers(u) {
                                return Some(t0.elapsed().as_secs_f64());
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        None
                    })
                })
                .collect();
            let out = lab.on(
                "node1",
                &[
                    "service",
                    "create",
                    "--replicas",
                    "3",
                    "--name",
                    "web",
                    "-p",
                    "8100:8100",
                    "--",
                    &exe,
                    "demo",
                    "visitor",
                ],
            );
            let create = t0.elapsed().as_secs_f64();
            if out.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let mut all = 0.0f64;
            let mut missing = None;
            for (p, u) in pollers.into_iter().zip(&urls) {
                match p.join().ok().flatten() {
                    Some(x) => all = all.max(x),
                    None => missing = Some(u),
                }
            }
            let out = out?;
            if let Some(u) = missing {
                bail!("{u} did not answer within 180 s");
            }
            if !out.contains("converged") {
                bail!("service create did not report convergence: {out}");
            }
            Ok((create, all))
        })?;
        println!(
            "[deploy] round {i}{}: swarm formed in {formed:.2} s; service create returned after {create:.2} s, all 3 nodes answered after {all:.2} s",
            if warm { " (warm-up)" } else { "" }
        );
        drop(lab);
        Ok((formed, create, all))
    })?;
    for (f, c, a) in recorded {
        form.push(f);
        created.push(c);
        answered.push(a);
    }
    let how = "fresh 3-node lab per round; timed from starting `shoal service create` on node1";
    let rows = vec![
        Row::no_peer(
            "service create → all 3 nodes answer curl on the published port",
            "s",
            true,
            &answered,
            format!("{how}; curl -m 1 every 50 ms on each node's 8100"),
        ),
        Row::no_peer(
            "service create → the command returns (3/3 running)",
            "s",
            true,
            &created,
            how,
        ),
        Row::no_peer(
            "swarm formation: init and 2 joins",
            "s",
            true,
            &form,
            "the CLI commands in sequence on a fresh lab",
        ),
    ];
    let mut tools = Vec::new();
    if let Some(v) = common::peer_version("curl", &["-V"]) {
        tools.push(("curl".to_owned(), v));
    }
    let notes = vec![format!(
        "{rounds} recorded round(s) after {warmup} warm-up round(s); lab agents use the lab's fast control-plane timings"
    )];
    Ok(section_of(spec, rounds, "none", tools, notes, rows))
}

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Agent memory at rest and under a wrk run through the mesh, on a `lab up --demo` lab.
fn rss(spec: &Spec, args: &Args) -> anyhow::Result<Section> {
    if !common::have("wrk") {
        bail!("wrk is not installed");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { spec.full_rounds });
    let (rest_s, load_s) = if args.quick { (3u64, 3u64) } else { (10, 10) };
    println!("[rss] lab up --demo (3 nodes)");
    let lab = Lab::up("r", &["--demo"])?;
    let pids: Vec<(String, u32)> = lab
        .state
        .nodes
        .iter()
        .map(|n| Ok((n.name.clone(), n.pid.context("a lab agent without a pid")?)))
        .collect::<anyhow::Result<_>>()?;
    let url = format!("http://{}:8100/visitor", lab.state.nodes[0].addr);
    // Warm-up: a short wrk run fills the mesh's and the overlay's first buffers; then rest.
    let warm = Command::new("wrk").args(["-t1", "-c50", "-d2s", &url]).output()?;
    if !warm.status.success() {
        bail!("wrk warm-up: {}", String::from_utf8_lossy(&warm.stderr));
    }
    std::thread::sleep(Duration::from_secs(if args.quick { 2 } else { 5 }));
    let mut rest: Vec<Vec<f64>> = vec![Vec::new(); pids.len()];
    for _ in 0..rest_s {
        for (i, (_, pid)) in pids.iter().enumerate() {
            rest[i].push(rss_mib(*pid).context("an agent exited")?);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut peak: Vec<Vec<f64>> = vec![Vec::new(); pids.len()];
    let mut rps = Vec::new();
    for round in 0..rounds {
        let child = Command::new("wrk")
            .args(["-t1", "-c50", &format!("-d{load_s}s"), &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut top = vec![0.0f64; pids.len()];
        let mut child = child;
        while child.try_wait()?.is_none() {
            for (i, (_, pid)) in pids.iter().enumerate() {
                top[i] = top[i].max(rss_mib(*pid).context("an agent exited under load")?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut text = String::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                text.push_str(&line?);
                text.push('\n');
            }
        }
        let r: f64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        println!(
            "[rss] round {round}: {r:.0} req/s; peak VmRSS {}",
            pids.iter()
                .zip(&top)
                .map(|((n, _), m)| format!("{n} {m:.1} MiB"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rps.push(r);
        for (i, t) in top.into_iter().enumerate() {
            peak[i].push(t);
        }
        std::thread::sleep(Duration::from_secs(if args.quick { 1 } else { 5 }));
    }
    let load_how = format!(
        "peak of VmRSS sampled every 200 ms during wrk -t1 -c50 -d{load_s}s against node1:8100/visitor"
    );
    let mut rows = Vec::new();
    for (i, (node, _)) in pids.iter().enumerate() {
        let role = if i == 0 { " (manager)" } else { " (worker)" };
        rows.push(Row::no_peer(
            format!("agent VmRSS at rest, {node}{role}"),
            "MiB",
            true,
            &rest[i],
            format!("sampled once a second for {rest_s} s after the demo settled"),
        ));
    }
    for (i, (node, _)) in pids.iter().enumerate() {
        let role = if i == 0 { " (manager)" } else { " (worker)" };
        rows.push(Row::no_peer(
            format!("agent VmRSS peak under load, {node}{role}"),
            "MiB",
            true,
            &peak[i],
            load_how.clone(),
        ));
    }
    rows.push(Row::no_peer(
        "demo app requests/s through the mesh (node1:8100)",
        "req/s",
        false,
        &rps,
        format!(
            "wrk -t1 -c50 -d{load_s}s from the host; tasks on all three nodes, \
             redis across the encrypted overlay"
        ),
    ));
    let mut tools = Vec::new();
    if let Some(v) = common::peer_version("wrk", &["-v"]) {
        tools.push(("wrk".to_owned(), v));
    }
    if let Some(v) = common::peer_version("redis-server", &["--version"]) {
        tools.push(("redis-server (the demo's myredis)".to_owned(), v));
    }
    let notes = vec![format!(
        "{rounds} recorded wrk run(s) after a 2 s warm-up run; agents unpinned, wrk unpinned"
    )];
    drop(lab);
    Ok(section_of(spec, rounds, "none", tools, notes, rows))
}
