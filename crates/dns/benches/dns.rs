//! Side-by-side system benchmark (root only): dnsperf from a client namespace against shoal,
//! unbound and dnsmasq serving the same 1,000 service A records from one server namespace, each
//! with one serving thread, in the same run (as shared/bench/dns-baseline.sh does for the two
//! peers). Prints queries/s per round, the shoal/peer ratios, and p99 latency measured at a
//! fixed offered load. `cargo bench -p shoal-dns`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_dns::{
    ClusterRecords, DnsConfig, DnsService, EndpointMode, ForwardConfig, Metrics, NetworkSpec,
    RecordsConfig, Scope, ServiceNetwork, ServiceSpec, Snapshot,
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
            dns.update(Snapshot::build(&records(), RecordsConfig::default()));
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
                // This thread serves every query (current-thread runtime): its stat file gives
                // the CPU time shoal spends.
                let me = std::fs::read_link("/proc/thread-self").unwrap_or_default();
                let _ = ready.send(Ok(Path::new("/proc").join(me).join("stat")));
                let _ = stop.await;
                dns.shutdown().await;
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    });
}

/// User+system CPU ticks of a process or thread, from its `stat` file.
fn cpu_ticks(stat: &Path) -> Result<u64> {
    let s = std::fs::read_to_string(stat)?;
    let after = s.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Queries dnsperf keeps in flight (its default is 100); `OUTSTANDING` overrides.
fn outstanding() -> String {
    std::env::var("OUTSTANDING").unwrap_or_else(|_| "100".to_owned())
}

/// Runs dnsperf; returns (queries/s, queries completed).
fn dnsperf(client: &str, server: &str, port: u16, qfile: &Path, dur: u32) -> Result<(f64, u64)> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        client,
        "dnsperf",
        "-s",
        server,
        "-p",
        &port.to_string(),
        "-d",
        &qfile.to_string_lossy(),
        "-l",
        &dur.to_string(),
        "-c",
        "10",
        "-Q",
        "500000",
        "-q",
        &outstanding(),
    ])?;
    let line = out
        .lines()
        .find(|l| l.contains("Queries per second"))
        .context("no qps line in dnsperf output")?;
    let qps: f64 = line.split_whitespace().last().context("qps")?.parse()?;
    let lost = out.lines().find(|l| l.contains("Queries lost")).unwrap_or("").trim().to_owned();
    let completed: u64 = out
        .lines()
        .find(|l| l.contains("Queries completed"))
        .and_then(|l| l.split_whitespace().nth(2))
        .context("no completed line")?
        .parse()?;
    if !out.contains("NOERROR") {
        bail!("no NOERROR answers:\n{out}");
    }
    eprintln!("    port {port}: {qps:.0} q/s ({lost})");
    Ok((qps, completed))
}

/// p50/p99 latency (ms) at a fixed offered load, from dnsperf's per-query lines.
fn latency(client: &str, server: &str, port: u16, qfile: &Path, rate: u32) -> Result<(f64, f64)> {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        client,
        "dnsperf",
        "-s",
        server,
        "-p",
        &port.to_string(),
        "-d",
        &qfile.to_string_lossy(),
        "-l",
        "3",
        "-c",
        "10",
        "-Q",
        &rate.to_string(),
        "-v",
    ])?;
    let mut lat: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    if lat.len() < 100 {
        bail!("too few samples ({})", lat.len());
    }
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] * 1e3;
    Ok((pick(0.50), pick(0.99)))
}

fn main() -> Result<()> {
    if !nix_is_root() {
        println!("dns bench: SKIPPED (needs root for network namespaces)");
        return Ok(());
    }
    for tool in ["dnsperf", "unbound", "dnsmasq"] {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            println!("dns bench: SKIPPED ({tool} not installed)");
            return Ok(());
        }
    }
    let dur: u32 = std::env::var("DUR").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
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
    sh(&[
        "ip",
        "netns",
        "exec",
        &sv,
        "unbound",
        "-c",
        &dir.join("unbound.conf").to_string_lossy(),
    ])?;

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let addr = SocketAddr::new(sip.parse()?, SHOAL_PORT);
    let shoal = std::thread::spawn(move || serve_shoal(server_ns, addr, ready_tx, stop_rx));
    let shoal_stat = ready_rx.recv_timeout(Duration::from_secs(10))??;
    let pid_stat = |f: &str| -> Result<std::path::PathBuf> {
        let pid = std::fs::read_to_string(dir.join(f))?;
        Ok(Path::new("/proc").join(pid.trim()).join("stat"))
    };
    let stats = [shoal_stat, pid_stat("ub.pid")?, pid_stat("dm.pid")?];
    let tick_us = 1e6 / 100.0;
    std::thread::sleep(Duration::from_millis(500));

    let systems = [("shoal", SHOAL_PORT), ("unbound", UNBOUND_PORT), ("dnsmasq", DNSMASQ_PORT)];
    println!(
        "dns bench: {NAMES} service names, dnsperf -c 10, {dur} s per run, one serving thread each"
    );
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut qps: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        // Rotate the order each round so no system always runs first or last.
        let mut line = format!("round {} qps:", round + 1);
        let mut this = [0f64; 3];
        for k in 0..3 {
            let i = (k + round) % 3;
            let (name, port) = systems[i];
            let t0 = cpu_ticks(&stats[i])?;
            // A run that fails on this shared machine is reported and left out, not fatal.
            let (q, completed) = match dnsperf(&cl, &sip, port, &qfile, dur) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("    {name}: dnsperf run failed: {e:#}");
                    line.push_str(&format!(" {name}=failed"));
                    continue;
                }
            };
            let t1 = cpu_ticks(&stats[i])?;
            this[i] = q;
            cpu[i].push((t1 - t0) as f64 * tick_us / completed.max(1) as f64);
            qps[i].push(this[i]);
            line.push_str(&format!(" {name}={:.0}", this[i]));
        }
        let ratio = |a: f64, b: f64| {
            if a > 0.0 && b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".to_owned() }
        };
        println!(
            "{line}  (shoal/unbound {}, shoal/dnsmasq {})",
            ratio(this[0], this[1]),
            ratio(this[0], this[2])
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let m: Vec<f64> = qps.iter_mut().map(median).collect();
    let c: Vec<f64> = cpu.iter_mut().map(median).collect();
    println!(
        "median qps: shoal={:.0} unbound={:.0} dnsmasq={:.0}; shoal/unbound = {:.2}x, shoal/dnsmasq = {:.2}x",
        m[0],
        m[1],
        m[2],
        m[0] / m[1],
        m[0] / m[2]
    );
    println!(
        "median server CPU per query: shoal={:.2} us unbound={:.2} us dnsmasq={:.2} us",
        c[0], c[1], c[2]
    );
    let rate = 20_000;
    for (name, port) in systems {
        match latency(&cl, &sip, port, &qfile, rate) {
            Ok((p50, p99)) => {
                println!("latency at {rate} q/s offered: {name}: p50 {p50:.3} ms, p99 {p99:.3} ms")
            }
            Err(e) => println!("latency at {rate} q/s offered: {name}: failed: {e:#}"),
        }
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

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
