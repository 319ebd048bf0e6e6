//! Side-by-side system benchmark (root only): dnsperf from a client namespace against shoal,
//! unbound and dnsmasq serving the same 1,000 service A records from one server namespace, each
//! with one serving thread, in the same run (the
//! peers run with the same pinning and record set). `cargo bench -p shoal-dns`.
//!
//! Made to hold up on a shared machine: every server is pinned to the same CPU (`SERVER_CPU`,
//! default the last) and dnsperf to another (`CLIENT_CPU`, default 0), and so is this process
//! (it collects dnsperf's output), all in the same scheduling class (`SCHED`: real-time round
//! robin by default, so other jobs on those CPUs do not delay wake-ups; the kernel caps
//! real-time tasks at 95% of a CPU, the same for every server). Each of `ROUNDS` rounds runs
//! every system in a rotated order: once at max load (queries/s; the server's on-CPU and
//! run-queue-wait share from `schedstat`, which tells a server-bound run from a client- or
//! neighbour-bound one; CPU per query, the server's cost when busy) and once at each fixed
//! offered load below saturation (`RATES`: server CPU per query from `schedstat`, at low load
//! mostly the cost of waking up per query, and p50/p99 latency from dnsperf's per-query
//! lines). Prints every round, median [min–max] per figure, and the same-round shoal/unbound
//! ratios. `DUR` sets the seconds per run, `OUTSTANDING` dnsperf's queries in flight at max.
//!
//! For the suite (`cargo bench -p shoal --bench system`): `-- --quick` (2 s per run, one round,
//! one fixed load, unless the variables say otherwise), `--rounds N`, and `--out PATH`, which
//! writes the medians as shoal-vs-peer rows (benches/common's JSON report). A peer that is not
//! installed (unbound, dnsmasq) gives rows that say so. Every system answers one 1 s run at max
//! load before the recorded rounds (warm-up; `WARMUP=0` skips it).

#[path = "../../../benches/common/mod.rs"]
mod suite;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_dns::{
    ClusterRecords, DnsConfig, DnsService, EndpointMode, ForwardConfig, Metrics, NetworkSpec,
    RecordsConfig, Scope, ServiceNetwork, ServiceSpec, Zone,
};
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, unique_prefix};

const NAMES: u32 = 1000;
const SHOAL_PORT: u16 = 53;
const UNBOUND_PORT: u16 = 5353;
const DNSMASQ_PORT: u16 = 5354;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn sh(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn records() -> ClusterRecords {
    ClusterRecords {
        networks: vec![NetworkSpec { id: "n".into(), name: "benchnet".into(), subnets: vec![] }],
        services: (1..=NAMES)
            .map(|i| ServiceSpec {
                name: format!("svc{i}"),
                mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "n".into(),
                    vip: Some(IpAddr::V4(vip(i))),
                    aliases: vec![],
                }],
                tasks: vec![],
            })
            .collect(),
        standalone: vec![],
    }
}

/// Runs shoal's service on a current-thread runtime (one serving thread) with its sockets in
/// `ns`, until `stop` fires.
fn serve_shoal(
    ns: NetNs,
    addr: SocketAddr,
    ready: std::sync::mpsc::Sender<Result<std::path::PathBuf>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    rt.block_on(async move {
        let started = async {
            let config = DnsConfig {
                forward: ForwardConfig {
                    resolv_conf: "/nonexistent/shoal-bench-resolv.conf".into(),
                    ..ForwardConfig::default()
                },
                ..DnsConfig::default()
            };
            let dns = DnsService::start(config, Metrics::new())?;
            dns.update(Zone::build(&records(), RecordsConfig::default()));
            let (udp, tcp) = ns.run(|| -> std::io::Result<_> {
                let u = std::net::UdpSocket::bind(addr)?;
                let t = std::net::TcpListener::bind(addr)?;
                u.set_nonblocking(true)?;
                t.set_nonblocking(true)?;
                Ok((u, t))
            })??;
            dns.attach_sockets("bench", udp, tcp, Scope::new(["n"])).await?;
            anyhow::Ok(dns)
        };
        match started.await {
            Ok(dns) => {
                // This thread serves every query (current-thread runtime): its /proc directory
                // gives the CPU time shoal spends, and its tid is what gets pinned.
                let me = std::fs::read_link("/proc/thread-self").unwrap_or_default();
                let _ = ready.send(Ok(Path::new("/proc").join(me)));
                let _ = stop.await;
                dns.shutdown().await;
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    });
}

/// On-CPU time and run-queue wait (ns) summed over the threads of a process, or of one thread,
/// from `schedstat` (nanosecond resolution, unlike the 10 ms ticks of `stat`).
#[derive(Debug, Clone, Copy, Default)]
struct Sched {
    run_ns: u64,
    wait_ns: u64,
}

/// What to read: every thread of a process, or one thread (shoal's serving thread).
enum Target {
    Process(u32),
    Thread(std::path::PathBuf),
}

impl Target {
    fn sched(&self) -> Result<Sched> {
        let read = |p: &Path, acc: &mut Sched| -> Result<()> {
            let s = std::fs::read_to_string(p)?;
            let mut f = s.split_whitespace();
            acc.run_ns += f.next().context("schedstat")?.parse::<u64>()?;
            acc.wait_ns += f.next().context("schedstat")?.parse::<u64>()?;
            Ok(())
        };
        let mut acc = Sched::default();
        match self {
            Target::Thread(dir) => read(&dir.join("schedstat"), &mut acc)?,
            Target::Process(pid) => {
                for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
                    read(&t?.path().join("schedstat"), &mut acc)?;
                }
            }
        }
        Ok(acc)
    }

    /// Pins to `cpu` and sets the scheduling class, for every thread of a process or for the
    /// thread.
    fn pin(&self, cpu: usize, sched: &SchedClass) -> Result<()> {
        let (all, id) = match self {
            Target::Process(pid) => (true, pid.to_string()),
            Target::Thread(dir) => {
                (false, dir.file_name().context("tid")?.to_string_lossy().into_owned())
            }
        };
        let cpu = cpu.to_string();
        let mut args = vec!["taskset", "-p", "-c", &cpu, &id];
        if all {
            args.insert(1, "-a");
        }
        sh(&args)?;
        let tids: Vec<String> = if all {
            std::fs::read_dir(format!("/proc/{id}/task"))?
                .filter_map(|t| Some(t.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        } else {
            vec![id]
        };
        for t in tids {
            let mut args: Vec<String> = match sched {
                SchedClass::Rr(prio) => {
                    ["chrt", "-r", "-p", &prio.to_string()].map(String::from).to_vec()
                }
                SchedClass::Nice(n) => {
                    ["renice", "-n", &n.to_string(), "-p"].map(String::from).to_vec()
                }
            };
            args.push(t);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sh(&args)?;
        }
        Ok(())
    }
}

/// How servers and dnsperf are scheduled (`SCHED`): `rr` (the default) puts them in the
/// real-time round-robin class at priority 10, so a wake-up preempts other jobs on their CPU
/// at once (the kernel still leaves 5% of each second to those); `nice` gives them nice -10.
enum SchedClass {
    Rr(u8),
    Nice(i32),
}

impl SchedClass {
    /// The command prefix that starts dnsperf in this class.
    fn prefix(&self) -> Vec<String> {
        match self {
            SchedClass::Rr(p) => vec!["chrt".into(), "-r".into(), p.to_string()],
            SchedClass::Nice(n) => vec!["nice".into(), "-n".into(), n.to_string()],
        }
    }

    fn describe(&self) -> String {
        match self {
            SchedClass::Rr(p) => format!("SCHED_RR priority {p}"),
            SchedClass::Nice(n) => format!("nice {n}"),
        }
    }
}

/// The bench's knobs (environment variables), with their defaults.
struct Knobs {
    /// Seconds per dnsperf run (`DUR`, 5).
    dur: u32,
    /// Rounds, each running every system at max and at the fixed load (`ROUNDS`, 5).
    rounds: usize,
    /// Queries dnsperf keeps in flight at max load (`OUTSTANDING`, 100).
    outstanding: u32,
    /// Offered loads of the fixed-load runs, queries/s, below every server's saturation
    /// (`RATES`, comma-separated, `20000,100000`).
    rates: Vec<u32>,
    /// CPU every server is pinned to in turn (`SERVER_CPU`, the last CPU).
    server_cpu: usize,
    /// CPU dnsperf is pinned to (`CLIENT_CPU`, CPU 0).
    client_cpu: usize,
    /// Scheduling class of the servers and dnsperf (`SCHED`: `rr` or `nice`).
    sched: SchedClass,
}

impl Knobs {
    fn from_env(opts: &suite::Options) -> Knobs {
        fn var<T: std::str::FromStr>(k: &str, d: T) -> T {
            std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rates = if opts.quick { "20000" } else { "20000,100000" };
        Knobs {
            dur: var("DUR", if opts.quick { 2 } else { 5 }),
            rounds: opts.rounds_or_env(),
            outstanding: var("OUTSTANDING", 100),
            rates: var("RATES", rates.to_owned())
                .split(',')
                .filter_map(|r| r.trim().parse().ok())
                .collect(),
            server_cpu: var("SERVER_CPU", cpus - 1),
            client_cpu: var("CLIENT_CPU", 0),
            sched: if var("SCHED", "rr".to_owned()) == "nice" {
                SchedClass::Nice(-10)
            } else {
                SchedClass::Rr(10)
            },
        }
    }
}

/// One dnsperf run's results.
struct Run {
    qps: f64,
    completed: u64,
    lost: u64,
    /// Per-query latencies in seconds (only with `verbose`).
    lat: Vec<f64>,
}

/// Runs dnsperf pinned to the client CPU: at max load (`rate` None) or at a fixed offered load.
fn dnsperf(
    k: &Knobs,
    client: &str,
    server: &str,
    port: u16,
    qfile: &Path,
    rate: Option<u32>,
) -> Result<Run> {
    let (cpu, port_s, dur) = (k.client_cpu.to_string(), port.to_string(), k.dur.to_string());
    let prefix = k.sched.prefix();
    let q = qfile.to_string_lossy();
    let (limit, outstanding) = match rate {
        Some(r) => (r.to_string(), "1000".to_owned()),
        None => ("500000".to_owned(), k.outstanding.to_string()),
    };
    let mut args = vec!["ip", "netns", "exec", client];
    args.extend(prefix.iter().map(String::as_str));
    args.extend([
        "taskset",
        "-c",
        &cpu,
        "dnsperf",
        "-s",
        server,
        "-p",
        &port_s,
        "-d",
        &q,
        "-l",
        &dur,
        "-c",
        "10",
        "-Q",
        &limit,
        "-q",
        &outstanding,
    ]);
    if rate.is_some() {
        args.push("-v");
    }
    let out = sh(&args)?;
    let field = |key: &str, nth: usize| -> Result<f64> {
        out.lines()
            .find(|l| l.contains(key))
            .and_then(|l| l.split_whitespace().nth(nth))
            .with_context(|| format!("no {key:?} in dnsperf output"))?
            .parse::<f64>()
            .map_err(Into::into)
    };
    let qps = field("Queries per second", 3)?;
    let completed = field("Queries completed", 2)? as u64;
    let lost = field("Queries lost", 2)? as u64;
    if !out.contains("NOERROR") {
        bail!("no NOERROR answers:\n{out}");
    }
    let lat = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    Ok(Run { qps, completed, lost, lat })
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// `median [min–max]` of a series.
fn spread(v: &[f64], digits: usize) -> String {
    let mut s = v.to_vec();
    if s.is_empty() {
        return "n/a".to_owned();
    }
    let med = quantile(&mut s, 0.5);
    format!("{med:.digits$} [{:.digits$}–{:.digits$}]", s[0], s[s.len() - 1])
}

/// One fixed-load figure per system, per round.
#[derive(Default, Clone)]
struct Fixed {
    /// Queries/s achieved (the offered load, when nothing is lost).
    qps: Vec<f64>,
    /// Server CPU per answered query, microseconds.
    cpu_us: Vec<f64>,
    /// p50 and p99 latency, milliseconds.
    p50: Vec<f64>,
    p99: Vec<f64>,
}

/// Per system, per round.
#[derive(Default)]
struct Series {
    /// Max queries/s.
    qps: Vec<f64>,
    /// Share of the wall time the server was on its CPU during the max run.
    busy: Vec<f64>,
    /// Share of the wall time the server waited for its CPU during the max run.
    waited: Vec<f64>,
    /// Server CPU per answered query during the max run, microseconds.
    cpu_max: Vec<f64>,
    /// Per offered load (`Knobs::rates`).
    fixed: Vec<Fixed>,
}

/// Says why the bench cannot run and, when `--out` asks for a report, writes one that holds a
/// failed row saying so.
fn skipped(opts: &suite::Options, why: &str) -> Result<()> {
    println!("dns bench: SKIPPED ({why})");
    if opts.out_given {
        let rows = vec![suite::Row::failed("DNS benchmark", "-", "unbound", why)];
        suite::Report::new("dns", opts.quick, 0, suite::Conditions::detect(), rows)
            .write_json(&opts.out)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let opts = suite::Options::from_args("dns", 5, 1);
    if !nix::unistd::geteuid().is_root() {
        return skipped(&opts, "needs root for network namespaces");
    }
    for tool in ["dnsperf", "taskset", "renice", "chrt"] {
        if !suite::have(tool) {
            return skipped(&opts, &format!("{tool} is not installed"));
        }
    }
    let installed = [true, suite::have("unbound"), suite::have("dnsmasq")];
    let k = Knobs::from_env(&opts);
    let warmup: usize = suite::env_or("WARMUP", 1);
    // This process (its main thread collects dnsperf's output, megabytes with -v) stays off the
    // server CPU: only the server under test runs there. Threads made later inherit this; the
    // shoal serving thread is moved to the server CPU below.
    sh(&["taskset", "-a", "-p", "-c", &k.client_cpu.to_string(), &std::process::id().to_string()])?;
    let mut c = Cleanup::new();
    let p = unique_prefix("db");
    let (cl, sv) = (format!("{p}c"), format!("{p}s"));
    c.netns(&cl)?;
    let server_ns = c.netns(&sv)?;
    let x = u16::from_str_radix(&p[2..], 16).unwrap_or(0) % 200 + 30;
    let (cip, sip) = (format!("198.19.{x}.1"), format!("198.19.{x}.2"));
    sh(&[
        "ip",
        "-n",
        &cl,
        "link",
        "add",
        &format!("{p}a"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("{p}b"),
        "netns",
        &sv,
    ])?;
    sh(&["ip", "-n", &cl, "addr", "add", &format!("{cip}/24"), "dev", &format!("{p}a")])?;
    sh(&["ip", "-n", &sv, "addr", "add", &format!("{sip}/24"), "dev", &format!("{p}b")])?;
    for (ns, l) in [(&cl, format!("{p}a")), (&sv, format!("{p}b"))] {
        sh(&["ip", "-n", ns, "link", "set", &l, "up"])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }

    let dir = std::env::temp_dir().join(format!("{p}-dnsbench"));
    std::fs::create_dir_all(&dir)?;
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(dir.clone());
    let (mut q, mut hosts, mut local) = (String::new(), String::new(), String::new());
    for i in 1..=NAMES {
        q.push_str(&format!("svc{i} A\n"));
        hosts.push_str(&format!("{} svc{i}\n", vip(i)));
        local.push_str(&format!("local-data: \"svc{i}. 5 IN A {}\"\n", vip(i)));
    }
    let qfile = dir.join("queries");
    std::fs::write(&qfile, q)?;
    std::fs::write(dir.join("hosts"), hosts)?;
    std::fs::write(dir.join("unbound-local"), local)?;
    std::fs::write(
        dir.join("unbound.conf"),
        format!(
            "server:\n  interface: {sip}@{UNBOUND_PORT}\n  access-control: 198.19.0.0/16 allow\n  \
             num-threads: 1\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  \
             pidfile: \"{d}/ub.pid\"\n  do-daemonize: yes\n  local-zone: \".\" static\n  \
             include: \"{d}/unbound-local\"\n",
            d = dir.display()
        ),
    )?;
    if installed[2] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &sv,
            "dnsmasq",
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", dir.join("hosts").display()),
            &format!("--port={DNSMASQ_PORT}"),
            &format!("--listen-address={sip}"),
            "--bind-interfaces",
            "--cache-size=10000",
            "--dns-forward-max=5000",
            &format!("--pid-file={}", dir.join("dm.pid").display()),
            "--user=root",
        ])?;
    }
    if installed[1] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &sv,
            "unbound",
            "-c",
            &dir.join("unbound.conf").to_string_lossy(),
        ])?;
    }

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let addr = SocketAddr::new(sip.parse()?, SHOAL_PORT);
    let shoal = std::thread::spawn(move || serve_shoal(server_ns, addr, ready_tx, stop_rx));
    let shoal_thread = ready_rx.recv_timeout(Duration::from_secs(10))??;
    let pid =
        |f: &str| -> Result<u32> { Ok(std::fs::read_to_string(dir.join(f))?.trim().parse()?) };
    let targets = [
        Some(Target::Thread(shoal_thread)),
        if installed[1] { Some(Target::Process(pid("ub.pid")?)) } else { None },
        if installed[2] { Some(Target::Process(pid("dm.pid")?)) } else { None },
    ];
    for t in targets.iter().flatten() {
        t.pin(k.server_cpu, &k.sched)?;
    }
    std::thread::sleep(Duration::from_millis(500));

    let systems = [("shoal", SHOAL_PORT), ("unbound", UNBOUND_PORT), ("dnsmasq", DNSMASQ_PORT)];
    println!(
        "dns bench: {NAMES} service names, dnsperf -c 10, {} s per run, {} rounds in rotating \
         order, one serving thread each",
        k.dur, k.rounds
    );
    let pinning = format!(
        "every server on CPU {} (in turn, all three pinned there), dnsperf and the bench on CPU {}, \
         {} for servers and dnsperf",
        k.server_cpu,
        k.client_cpu,
        k.sched.describe()
    );
    println!("pinning: {pinning}; max runs -q {}, fixed-load runs -Q {:?}", k.outstanding, k.rates);
    if warmup > 0 {
        println!(
            "warm-up: each server answers a 1 s run at max load ({warmup} time(s), not recorded)"
        );
        let short = Knobs { dur: 1, ..Knobs::from_env(&opts) };
        for _ in 0..warmup {
            for (i, (name, port)) in systems.iter().enumerate() {
                if installed[i]
                    && let Err(e) = dnsperf(&short, &cl, &sip, *port, &qfile, None)
                {
                    eprintln!("    {name}: warm-up run failed: {e:#}");
                }
            }
        }
    }
    let mut s: [Series; 3] = Default::default();
    for x in &mut s {
        x.fixed = vec![Fixed::default(); k.rates.len()];
    }
    let (mut ratio_qps, mut ratio_cpu) = (Vec::new(), Vec::new());
    let mut ratio_fixed = vec![Vec::new(); k.rates.len()];
    for round in 0..k.rounds {
        let mut max = [f64::NAN; 3];
        let mut cpu = [f64::NAN; 3];
        let mut fixed = vec![[f64::NAN; 3]; k.rates.len()];
        for j in 0..3 {
            // Rotate the order each round so no system always runs first or last.
            let i = (j + round) % 3;
            let (name, port) = systems[i];
            let Some(target) = &targets[i] else { continue };
            // A run that fails on this shared machine is reported and left out, not fatal.
            let t0 = (target.sched()?, std::time::Instant::now());
            match dnsperf(&k, &cl, &sip, port, &qfile, None) {
                Ok(run) => {
                    let t1 = (target.sched()?, std::time::Instant::now());
                    let wall = (t1.1 - t0.1).as_nanos() as f64;
                    let ran = (t1.0.run_ns - t0.0.run_ns) as f64;
                    max[i] = run.qps;
                    cpu[i] = ran / 1e3 / run.completed.max(1) as f64;
                    s[i].qps.push(run.qps);
                    s[i].cpu_max.push(cpu[i]);
                    s[i].busy.push(ran / wall);
                    s[i].waited.push((t1.0.wait_ns - t0.0.wait_ns) as f64 / wall);
                    if run.lost > 0 {
                        eprintln!("    {name}: {} of {} lost at max load", run.lost, run.completed);
                    }
                }
                Err(e) => eprintln!("    {name}: dnsperf max run failed: {e:#}"),
            }
            for (r, &rate) in k.rates.iter().enumerate() {
                let t0 = target.sched()?;
                let mut run = match dnsperf(&k, &cl, &sip, port, &qfile, Some(rate)) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("    {name}: dnsperf run at {rate} q/s failed: {e:#}");
                        continue;
                    }
                };
                let t1 = target.sched()?;
                let f = &mut s[i].fixed[r];
                fixed[r][i] = (t1.run_ns - t0.run_ns) as f64 / 1e3 / run.completed.max(1) as f64;
                f.cpu_us.push(fixed[r][i]);
                f.qps.push(run.qps);
                if run.lat.len() >= 100 {
                    f.p50.push(quantile(&mut run.lat, 0.50) * 1e3);
                    f.p99.push(quantile(&mut run.lat, 0.99) * 1e3);
                }
            }
        }
        if max[0] > 0.0 && max[1] > 0.0 {
            ratio_qps.push(max[0] / max[1]);
        }
        if cpu[0] > 0.0 && cpu[1] > 0.0 {
            ratio_cpu.push(cpu[1] / cpu[0]);
        }
        let mut line = format!(
            "round {}: max qps shoal={:.0} unbound={:.0} dnsmasq={:.0} (shoal/unbound {:.2}x, \
             shoal/dnsmasq {:.2}x), CPU/query shoal={:.2} unbound={:.2} dnsmasq={:.2} us",
            round + 1,
            max[0],
            max[1],
            max[2],
            max[0] / max[1],
            max[0] / max[2],
            cpu[0],
            cpu[1],
            cpu[2]
        );
        for (r, rate) in k.rates.iter().enumerate() {
            let c = fixed[r];
            if c[0] > 0.0 && c[1] > 0.0 {
                ratio_fixed[r].push(c[1] / c[0]);
            }
            line.push_str(&format!(
                "; at {rate} q/s CPU/query shoal={:.2} unbound={:.2} dnsmasq={:.2} us",
                c[0], c[1], c[2]
            ));
        }
        println!("{line}");
    }
    println!("summary (median [min–max] over {} rounds):", k.rounds);
    for (i, (name, _)) in systems.iter().enumerate() {
        let pct: Vec<f64> = s[i].busy.iter().map(|b| b * 100.0).collect();
        let wait: Vec<f64> = s[i].waited.iter().map(|b| b * 100.0).collect();
        println!(
            "  {name:8} max: {} q/s, CPU/query {} us, server on-CPU {}%, run-queue wait {}%",
            spread(&s[i].qps, 0),
            spread(&s[i].cpu_max, 2),
            spread(&pct, 0),
            spread(&wait, 1),
        );
        for (r, rate) in k.rates.iter().enumerate() {
            let f = &s[i].fixed[r];
            println!(
                "  {name:8} at {rate} q/s offered: {} q/s answered, CPU/query {} us, p50 {} ms, \
                 p99 {} ms",
                spread(&f.qps, 0),
                spread(&f.cpu_us, 2),
                spread(&f.p50, 3),
                spread(&f.p99, 3),
            );
        }
    }
    println!(
        "shoal/unbound, same round: max qps {}x; CPU/query at max, unbound/shoal {}x",
        spread(&ratio_qps, 2),
        spread(&ratio_cpu, 2)
    );
    for (r, rate) in k.rates.iter().enumerate() {
        println!(
            "shoal/unbound, same round: CPU/query at {rate} q/s, unbound/shoal {}x",
            spread(&ratio_fixed[r], 2)
        );
    }
    if opts.out_given {
        let mut cond = suite::Conditions::detect();
        cond.peer("unbound", "unbound", &["-V"]);
        cond.peer("dnsmasq", "dnsmasq", &["--version"]);
        cond.tool("dnsperf", "dnsperf", &["-h"]);
        cond.pinning = pinning.clone();
        cond.notes.push(format!(
            "{NAMES} service A records served by each system from a server namespace, dnsperf -c 10 from a client namespace over a veth; {} s per run, {} rounds in rotating order after {warmup} warm-up run(s)",
            k.dur, k.rounds
        ));
        cond.notes.push(
            "one serving thread each: shoal's DNS service on a current-thread runtime, unbound num-threads 1, dnsmasq".to_owned(),
        );
        let max_how = format!("dnsperf at max load, {} queries in flight", k.outstanding);
        let mut rows = Vec::new();
        let peers = [(1, "unbound"), (2, "dnsmasq")];
        for (i, name) in peers {
            let theirs = installed[i].then_some(s[i].qps.as_slice());
            rows.push(suite::Row::new(
                "queries/s at max load",
                "q/s",
                false,
                &s[0].qps,
                name,
                theirs,
                &max_how,
            ));
        }
        for (i, name) in peers {
            let theirs = installed[i].then_some(s[i].cpu_max.as_slice());
            rows.push(suite::Row::new(
                "server CPU per query at max load",
                "CPU µs/query",
                true,
                &s[0].cpu_max,
                name,
                theirs,
                &max_how,
            ));
        }
        for (r, rate) in k.rates.iter().enumerate() {
            let how = format!("dnsperf at a fixed {rate} q/s offered");
            for (metric, unit, get) in [
                ("p50 latency", "ms", (|f: &Fixed| f.p50.clone()) as fn(&Fixed) -> Vec<f64>),
                ("p99 latency", "ms", |f: &Fixed| f.p99.clone()),
                ("server CPU per query", "CPU µs/query", |f: &Fixed| f.cpu_us.clone()),
            ] {
                let ours = get(&s[0].fixed[r]);
                for (i, name) in peers {
                    let theirs = get(&s[i].fixed[r]);
                    rows.push(suite::Row::new(
                        format!("{metric} at {rate} q/s"),
                        unit,
                        true,
                        &ours,
                        name,
                        installed[i].then_some(theirs.as_slice()),
                        &how,
                    ));
                }
            }
        }
        let report = suite::Report::new("dns", opts.quick, k.rounds, cond, rows);
        report.print();
        report.write_json(&opts.out)?;
    }

    let _ = stop_tx.send(());
    let _ = shoal.join();
    for pid in ["dm.pid", "ub.pid"] {
        if let Ok(p) = std::fs::read_to_string(dir.join(pid)) {
            let _ = sh(&["kill", p.trim()]);
        }
    }
    drop(c);
    Ok(())
}
