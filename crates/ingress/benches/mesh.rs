//! Side-by-side system benchmark of the routing mesh (root only; `cargo bench -p shoal-ingress`).
//!
//! Three namespaces on a bridge (underlay 198.19.X.0/24): client, proxy, backend. The backend
//! runs iperf3 and nginx (1 KiB file). In the proxy namespace, in the same run: HAProxy 2.6
//! (`option splice-auto`, 1 thread), nginx stream (1 worker), socat (fork) and shoal's mesh
//! (in this process; listeners and upstream sockets in the proxy namespace). Measured
//! from the client: direct and through each proxy,
//! - bulk TCP Gbit/s (iperf3, one stream) and the proxy's CPU seconds per GB forwarded,
//! - 1 KiB HTTP req/s and p99 latency (wrk, 1 thread, 50 keep-alive connections), the
//!   proxy's CPU per request, and the whole machine's CPU per request (every process and
//!   softirq, from /proc/stat: the figure that does not depend on which CPU saturates first),
//! - new connections/s (wrk, 50 connections, `Connection: close`).
//!
//! Prints a table per round, the medians, and shoal/HAProxy ratios. shoal runs on one
//! current-thread runtime (`SHOAL_RT=multi SHOAL_WORKERS=N` for a multi-thread one) with the
//! Auto forwarding mode (`SHOAL_FORWARD=splice|copy` forces one). `DUR` (seconds per test,
//! default 5) and `ROUNDS` (default 3; the order rotates per round) tune it; `OVERLAY=1` puts
//! the backend behind a kernel VXLAN overlay as seen from the proxy (a task on another node). Without root or
//! a tool it prints SKIPPED and exits 0.
//!
//! For the suite (`cargo bench -p shoal --bench system`): `-- --quick` (2 s per test, one
//! round, unless `DUR`/`ROUNDS` say otherwise), `--rounds N`, and `--out PATH`, which writes
//! the medians as shoal-vs-peer rows (benches/common's JSON report). A peer that is not
//! installed (HAProxy, nginx with the stream module, socat) gives rows that say so; without
//! iperf3 or wrk (the load generators) or root, the report holds one failed row saying why.
//! Every system runs once for 1 s per test before the recorded rounds (warm-up; `WARMUP=0`
//! skips it).
//!
//! The sockmap experiment (`benches/mesh/sockmap.rs`): a second shoal mesh forwarding with
//! `ForwardMode::Sockmap` runs as system `sockmap` in the same rounds; its rows compare it
//! with `shoal` (splice). Without clang and libbpf-dev it is left out with a note.
//!
//! The kernel path (`benches/mesh/kernel.rs`): shoal's nftables DNAT (`shoal_return::kernel`)
//! in the proxy namespace runs as system `kernel` in the same rounds, on an address of its own;
//! its rows ("…, shoal kernel path") compare it with HAProxy, nginx stream and the shoal proxy.
//! It has no process, so only the whole-machine CPU counts its work.

#[path = "mesh/kernel.rs"]
mod kernel_path;
#[path = "mesh/sockmap.rs"]
mod sockmap_exp;
#[path = "../../../benches/common/mod.rs"]
mod suite;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use shoal_ingress::{BackendSpec, ForwardMode, Mesh, MeshConfig, PortSpec, ServiceSpec};
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, unique_prefix};

fn sh(args: &[&str]) -> Result<String, String> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// utime + stime (+ reaped children) of a process, in seconds.
fn cpu_of(pid: u32) -> f64 {
    cpu_ticks(pid, 4)
}

/// utime + stime of this process only: its reaped children are the load generators
/// (wrk, iperf3 run through `ip netns exec`), whose CPU must not count as shoal's.
fn cpu_self() -> f64 {
    cpu_ticks(std::process::id(), 2)
}

/// The first `fields` of utime, stime, cutime, cstime, in seconds.
fn cpu_ticks(pid: u32, fields: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14-17 of stat are at 11..15 after the state field (index 0 = field 3).
    let ticks: f64 = f[11..11 + fields].iter().filter_map(|x| x.parse::<f64>().ok()).sum();
    ticks / 100.0
}

fn cpu_of_all(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_of(*p)).sum()
}

/// Reads a proxy's CPU seconds so far.
type CpuFn = Box<dyn Fn() -> f64>;
/// A system under test: name, (address, bulk port, HTTP port) on the proxy (None: direct),
/// CPU reader.
type System<'a> = (&'static str, Option<(&'a str, u16, u16)>, CpuFn);

struct Setup {
    prefix: String,
    net: u8,
    _guard: Cleanup,
    tmp: std::path::PathBuf,
    proxy_ns: Arc<NetNs>,
    /// PIN=1: the load generators and the backend run on CPU 0 and every proxy on CPU 1
    /// (taskset / sched_setaffinity).
    pin: bool,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Setup {
    fn ip(&self, h: u8) -> String {
        format!("198.19.{}.{h}", self.net)
    }
    fn ns(&self, h: &str) -> String {
        format!("{}{h}", self.prefix)
    }
    /// `taskset -c 0` for client commands when pinning.
    fn client_pin(&self) -> Vec<&'static str> {
        if self.pin { vec!["taskset", "-c", "0"] } else { Vec::new() }
    }
    /// `taskset -c 1` for proxy commands when pinning.
    fn proxy_pin(&self) -> Vec<&'static str> {
        if self.pin { vec!["taskset", "-c", "1"] } else { Vec::new() }
    }
    /// TCP segments sent from the proxy namespace so far (`Tcp: OutSegs` of its /proc/net/snmp).
    fn tcp_out_segs(&self) -> f64 {
        let Ok(snmp) = self.exec("px", &["cat", "/proc/net/snmp"]) else { return f64::NAN };
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(vals)) = (tcp.next(), tcp.next()) else { return f64::NAN };
        names
            .split_whitespace()
            .zip(vals.split_whitespace())
            .find(|(n, _)| *n == "OutSegs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
    /// `TcpExt: TCPSynRetrans` of a namespace (SYNs sent again after the 1 s initial RTO).
    fn syn_retrans(&self, h: &str) -> f64 {
        let Ok(text) = self.exec(h, &["cat", "/proc/net/netstat"]) else { return f64::NAN };
        let mut ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(vals)) = (ext.next(), ext.next()) else { return f64::NAN };
        names
            .split_whitespace()
            .zip(vals.split_whitespace())
            .find(|(n, _)| *n == "TCPSynRetrans")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
    fn exec(&self, h: &str, args: &[&str]) -> Result<String, String> {
        let ns = self.ns(h);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
    fn spawn(&self, h: &str, args: &[&str]) -> Result<std::process::Child, String> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(h)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    }
}

fn setup() -> Result<Setup, String> {
    let prefix = unique_prefix("bm");
    let net = u8::from_str_radix(&prefix[prefix.len() - 2..], 16).unwrap_or(9);
    let mut guard = Cleanup::new();
    let sw = format!("{prefix}sw");
    guard.netns(&sw).map_err(|e| e.to_string())?;
    sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
    let mut proxy_ns = None;
    for (i, h) in [(1u8, "cl"), (2, "px"), (3, "be")] {
        let name = format!("{prefix}{h}");
        let ns = guard.netns(&name).map_err(|e| e.to_string())?;
        sh(&[
            "ip", "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &name,
            "netns", &sw,
        ])?;
        sh(&["ip", "-n", &sw, "link", "set", &name, "master", "br0", "up"])?;
        sh(&["ip", "-n", &name, "addr", "add", &format!("198.19.{net}.{i}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        if h == "px" {
            proxy_ns = Some(Arc::new(ns));
        }
    }
    let tmp = std::env::temp_dir().join(format!("{prefix}-bench"));
    std::fs::create_dir_all(tmp.join("www")).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join("www/1k"), vec![b'x'; 1024]).map_err(|e| e.to_string())?;
    let pin = std::env::var("PIN").is_ok_and(|v| v == "1");
    Ok(Setup { prefix, net, _guard: guard, tmp, proxy_ns: proxy_ns.ok_or("no proxy ns")?, pin })
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    gbit: f64,
    cpu_per_gb: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    us_per_req: f64,
    /// CPU the whole machine spent per request: client, proxy, backend, kernel.
    machine_us_per_req: f64,
    /// TCP segments the proxy namespace sent per request (both of its sockets).
    segs_per_req: f64,
    cps: f64,
    /// Idle percent of CPU 0 (load generator, backend) and CPU 1 (proxy) in the req/s test.
    idle_rps: [f64; 2],
}

impl Figures {
    const NAN: Figures = Figures {
        gbit: f64::NAN,
        cpu_per_gb: f64::NAN,
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        us_per_req: f64::NAN,
        machine_us_per_req: f64::NAN,
        segs_per_req: f64::NAN,
        cps: f64::NAN,
        idle_rps: [f64::NAN; 2],
    };
}

fn iperf(s: &Setup, host: &str, port: u16, dur: u64, cpu_pids: &dyn Fn() -> f64) -> (f64, f64) {
    let before = cpu_pids();
    let (port, dur) = (port.to_string(), dur.to_string());
    let mut args = s.client_pin();
    args.extend(["iperf3", "-c", host, "-p", &port, "-t", &dur, "-J"]);
    let out = s.exec("cl", &args);
    let after = cpu_pids();
    let Ok(out) = out else { return (f64::NAN, f64::NAN) };
    let num = |key: &str| -> f64 {
        // "sum_received": { ... "bytes": N, ... "bits_per_second": X }
        out.find("\"sum_received\"")
            .and_then(|i| {
                let rest = &out[i..];
                let k = rest.find(&format!("\"{key}\":"))?;
                let v = &rest[k + key.len() + 3..];
                let end = v.find([',', '\n', '}'])?;
                v[..end].trim().parse().ok()
            })
            .unwrap_or(f64::NAN)
    };
    let bytes = num("bytes");
    let bps = num("bits_per_second");
    (bps / 1e9, (after - before) / (bytes / 1e9))
}

/// What one wrk run gives: req/s, p50 and p99 (ms), proxy CPU µs per request, proxy TCP
/// segments per request.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50: f64,
    p99: f64,
    us_per_req: f64,
    machine_us_per_req: f64,
    segs: f64,
    /// Idle share of CPU 0 and CPU 1 during the run, in percent.
    idle: [f64; 2],
}

impl Wrk {
    const NAN: Wrk = Wrk {
        rps: f64::NAN,
        p50: f64::NAN,
        p99: f64::NAN,
        us_per_req: f64::NAN,
        machine_us_per_req: f64::NAN,
        segs: f64::NAN,
        idle: [f64::NAN; 2],
    };
}

/// (idle, total) jiffies of CPU 0 and CPU 1 from /proc/stat (idle includes iowait).
fn cpu_jiffies() -> [(f64, f64); 2] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut out = [(f64::NAN, f64::NAN); 2];
    for (i, slot) in out.iter_mut().enumerate() {
        let tag = format!("cpu{i} ");
        if let Some(l) = stat.lines().find(|l| l.starts_with(&tag)) {
            let v: Vec<f64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            if v.len() >= 5 {
                *slot = (v[3] + v[4], v.iter().take(8).sum());
            }
        }
    }
    out
}

/// Idle percent per CPU between two [`cpu_jiffies`] samples.
fn idle_between(a: [(f64, f64); 2], b: [(f64, f64); 2]) -> [f64; 2] {
    [0, 1].map(|i| 100.0 * (b[i].0 - a[i].0) / (b[i].1 - a[i].1))
}

/// A latency line of `wrk --latency` ("99%  1.23ms") in milliseconds.
fn wrk_latency(out: &str, pct: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(pct))
        .map(|v| {
            let v = v.trim();
            let (num, unit) =
                v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().unwrap_or(f64::NAN);
            match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => f64::NAN,
            }
        })
        .unwrap_or(f64::NAN)
}

fn wrk(s: &Setup, url: &str, dur: u64, close: bool, cpu_pids: &dyn Fn() -> f64) -> Wrk {
    let d = format!("{dur}s");
    let mut args = s.client_pin();
    args.extend(["wrk", "-t1", "-c50", "-d", d.as_str(), "--latency"]);
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let segs0 = s.tcp_out_segs();
    let syn0 = (s.syn_retrans("cl"), s.syn_retrans("px"));
    let before = cpu_pids();
    let j0 = cpu_jiffies();
    let m0 = suite::machine_busy_seconds();
    let out = s.exec("cl", &args);
    let m1 = suite::machine_busy_seconds();
    let j1 = cpu_jiffies();
    let after = cpu_pids();
    let segs1 = s.tcp_out_segs();
    let syn1 = (s.syn_retrans("cl"), s.syn_retrans("px"));
    if syn1.0 > syn0.0 || syn1.1 > syn0.1 {
        // Each costs its connection the 1 s initial RTO, which wrk's latency correction
        // turns into hundreds of slow samples (a p99 near 1 s).
        eprintln!(
            "  note: {url}: SYN retransmits: client {} proxy namespace {}",
            syn1.0 - syn0.0,
            syn1.1 - syn0.1
        );
    }
    let Ok(out) = out else { return Wrk::NAN };
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let p50 = wrk_latency(&out, "50%");
    let p99 = wrk_latency(&out, "99%");
    if out.contains("Socket errors") || out.contains("Non-2xx") {
        eprintln!(
            "  note: {url}: {}",
            out.lines()
                .filter(|l| l.contains("errors") || l.contains("Non-2xx"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let reqs = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Wrk {
        rps,
        p50,
        p99,
        us_per_req: (after - before) * 1e6 / reqs,
        machine_us_per_req: (m1 - m0) * 1e6 / reqs,
        segs: (segs1 - segs0) / reqs,
        idle: idle_between(j0, j1),
    }
}

fn pids_named(ns: &NetNs, comm: &str) -> Vec<u32> {
    ns.pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(|p| p as u32)
        .collect()
}

/// A reported figure: metric, unit, lower is better, how to read it from a round's figures,
/// how it was measured, whether it is also compared with no proxy at all.
type Metric = (&'static str, &'static str, bool, fn(&Figures) -> f64, &'static str, bool);

/// The load generators and proxies, with whether each can run here.
struct Tools {
    haproxy: bool,
    nginx: bool,
    socat: bool,
}

/// Writes a report that holds one failed row (the bench could not run), when `--out` asks for
/// one, and says so.
fn skipped(opts: &suite::Options, why: &str) {
    println!("SKIPPED mesh bench: {why}");
    if opts.out_given {
        let rows = vec![suite::Row::failed("routing mesh benchmark", "-", "HAProxy", why)];
        let report = suite::Report::new("mesh", opts.quick, 0, suite::Conditions::detect(), rows);
        if let Err(e) = report.write_json(&opts.out) {
            eprintln!("writing {}: {e:#}", opts.out.display());
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let opts = suite::Options::from_args("mesh", 3, 1);
    if !nix::unistd::geteuid().is_root() {
        skipped(&opts, "needs root (network namespaces)");
        return;
    }
    for t in ["iperf3", "wrk"] {
        if !suite::have(t) {
            skipped(&opts, &format!("the load generator {t} is not installed"));
            return;
        }
    }
    let tools = Tools {
        haproxy: suite::have("haproxy"),
        nginx: suite::have("nginx"),
        socat: suite::have("socat"),
    };
    let dur: u64 = suite::env_or("DUR", if opts.quick { 2 } else { 5 });
    let rounds = opts.rounds_or_env() as u32;
    let warmup: u32 = suite::env_or("WARMUP", 1);
    // ONLY=shoal,haproxy limits the systems, TESTS=bulk,rps,cps the measurements.
    let only: Option<Vec<String>> =
        std::env::var("ONLY").ok().map(|v| v.split(',').map(str::to_owned).collect());
    let tests: Option<Vec<String>> =
        std::env::var("TESTS").ok().map(|v| v.split(',').map(str::to_owned).collect());
    // THREADS=N: HAProxy nbthread N, nginx stream N workers, shoal N runtime threads.
    let threads: usize = std::env::var("THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let workers: usize =
        std::env::var("SHOAL_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(threads);
    let s = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("setup failed: {e}");
            skipped(&opts, &format!("setup failed: {e}"));
            std::process::exit(1);
        }
    };
    let (px, be_under) = (s.ip(2), s.ip(3));
    // OVERLAY=1: the proxies reach the backend across a kernel VXLAN overlay (VNI 4242 on
    // 4789/udp between the proxy and backend namespaces, 10.213.0.0/24), the way the mesh
    // reaches a task on another node; the client still reaches the proxy on the underlay.
    let overlay = std::env::var("OVERLAY").is_ok_and(|v| v == "1");
    if overlay {
        for (h, me, peer, ip) in
            [("px", &px, &be_under, "10.213.0.2"), ("be", &be_under, &px, "10.213.0.3")]
        {
            let steps: [&[&str]; 3] = [
                &[
                    "ip", "link", "add", "vx0", "type", "vxlan", "id", "4242", "local", me,
                    "remote", peer, "dstport", "4789", "dev", "eth0",
                ],
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", "vx0"],
                &["ip", "link", "set", "vx0", "up"],
            ];
            for step in steps {
                s.exec(h, step).expect("overlay");
            }
        }
    }
    let be = if overlay { "10.213.0.3".to_owned() } else { be_under.clone() };
    let t = s.tmp.to_string_lossy().to_string();
    // Backend: iperf3 + nginx serving 1 KiB.
    let mut children = Vec::new();
    // Pinned with the load generators: the proxy under test has CPU 1 to itself. Left to the
    // scheduler, the backend lands beside the proxy in some runs and not in others, which
    // swung the req/s ratio between 0.78 and 1.15 from one round to the next.
    let be_pin = s.client_pin();
    let with_pin = |cmd: &[&'static str]| -> Vec<&'static str> {
        be_pin.iter().copied().chain(cmd.iter().copied()).collect()
    };
    children.push(s.spawn("be", &with_pin(&["iperf3", "-s", "-p", "5201"])).expect("iperf3"));
    std::fs::write(
        s.tmp.join("nb.conf"),
        format!("worker_processes 1; pid {t}/nb.pid; error_log {t}/nb.err; daemon on;\nevents {{ worker_connections 4096; }}\nhttp {{ access_log off; server {{ listen 8080; root {t}/www; }} }}\n"),
    )
    .expect("write");
    let nb_conf = format!("{t}/nb.conf");
    let mut nginx_be = with_pin(&["nginx", "-c"]);
    nginx_be.push(&nb_conf);
    if let Err(e) = s.exec("be", &nginx_be) {
        // The HTTP backend is nginx; without it there is no request-rate figure for anyone.
        eprintln!("nginx backend: {e}");
    }
    // Proxies.
    // THREADS > 1: thread i on CPU i, as shoal's per-core runtimes.
    let cpu_map = if threads > 1 && !s.pin {
        format!("  cpu-map auto:1/1-{threads} 0-{}\n", threads - 1)
    } else {
        String::new()
    };
    std::fs::write(
        s.tmp.join("haproxy.cfg"),
        format!("global\n  maxconn 4000\n  nbthread {threads}\n{cpu_map}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option splice-auto\nfrontend f1\n  bind {px}:15201\n  default_backend b1\nbackend b1\n  server s1 {be}:5201\nfrontend f2\n  bind {px}:18080\n  default_backend b2\nbackend b2\n  server s2 {be}:8080\n"),
    )
    .expect("write");
    let (hacfg, hapid) = (format!("{t}/haproxy.cfg"), format!("{t}/ha.pid"));
    let haproxy_ok = tools.haproxy && {
        let mut args = s.proxy_pin();
        args.extend(["haproxy", "-D", "-f", &hacfg, "-p", &hapid]);
        s.exec("px", &args).map_err(|e| eprintln!("haproxy: {e}")).is_ok()
    };
    std::fs::write(
        s.tmp.join("ns.conf"),
        format!("load_module /usr/lib/nginx/modules/ngx_stream_module.so; worker_processes {threads}; pid {t}/ns.pid; error_log {t}/ns.err; daemon on;\nevents {{ worker_connections 20000; }}\nstream {{ server {{ listen {px}:25201; proxy_pass {be}:5201; }} server {{ listen {px}:28080; proxy_pass {be}:8080; }} }}\n"),
    )
    .expect("write");
    let nscfg = format!("{t}/ns.conf");
    let nginx_ok = tools.nginx && {
        let mut args = s.proxy_pin();
        args.extend(["nginx", "-c", &nscfg]);
        s.exec("px", &args).map_err(|e| eprintln!("nginx stream: {e}")).is_ok()
    };
    if tools.socat {
        for (l, c) in [
            (format!("TCP-LISTEN:35201,bind={px},fork,reuseaddr"), format!("TCP:{be}:5201")),
            (format!("TCP-LISTEN:38080,bind={px},fork,reuseaddr"), format!("TCP:{be}:8080")),
        ] {
            let mut args = s.proxy_pin();
            args.extend(["socat", &l, &c]);
            children.push(s.spawn("px", &args).expect("socat"));
        }
    }
    let socat_ok = tools.socat;
    // shoal: its own runtime. THREADS=1 (default): one current-thread runtime driven by a
    // dedicated thread (like HAProxy's nbthread 1); THREADS=N>1 or SHOAL_RT=multi: a
    // multi-thread runtime with N workers (SHOAL_WORKERS overrides N).
    // SHOAL_RT=percore (default when THREADS > 1): one current-thread runtime per thread,
    // thread i pinned to CPU i, each with its own Mesh publishing the same ports with
    // SO_REUSEPORT (HAProxy's threads are pinned the same way with cpu-map).
    // SHOAL_RT=multi: one multi-thread runtime with `workers` workers, unpinned.
    let rt_kind = match std::env::var("SHOAL_RT").as_deref() {
        Ok("multi") => "multi",
        Ok("percore") => "percore",
        _ if workers > 1 => "percore",
        _ => "single",
    };
    let pin = s.pin;
    let pin_to = move |cpu: Option<usize>| {
        let cpu = if pin { Some(1) } else { cpu };
        if let Some(c) = cpu {
            let mut set = nix::sched::CpuSet::new();
            let _ = set.set(c);
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    };
    let mut stops = Vec::new();
    let mut drivers = Vec::new();
    let mut handles = Vec::new();
    let mut multi_rt = None;
    match rt_kind {
        "multi" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .on_thread_start(move || pin_to(None))
                .enable_all()
                .build()
                .expect("runtime");
            handles.push(rt.handle().clone());
            multi_rt = Some(rt);
        }
        _ => {
            let n = if rt_kind == "percore" { workers } else { 1 };
            for i in 0..n {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                handles.push(rt.handle().clone());
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                stops.push(tx);
                // Only the thread inside `Runtime::block_on` drives a current-thread runtime.
                let cpu = (rt_kind == "percore").then_some(i);
                drivers.push(std::thread::spawn(move || {
                    pin_to(cpu);
                    let _ = rt.block_on(rx);
                }));
            }
        }
    }
    let rt_name = match rt_kind {
        "multi" => format!("multi-thread x{workers}"),
        "percore" => format!("{workers} current-thread runtimes, one per CPU, SO_REUSEPORT"),
        _ => "current-thread".into(),
    };
    let mode = match std::env::var("SHOAL_FORWARD").as_deref() {
        Ok("splice") => ForwardMode::Splice,
        Ok("copy") => ForwardMode::Copy,
        _ => ForwardMode::Auto,
    };
    let beip: IpAddr = be.parse().expect("backend address");
    let listen = Some(IpAddr::V4(Ipv4Addr::new(198, 19, s.net, 2)));
    let meshes: Vec<Mesh> = handles
        .iter()
        .map(|h| {
            let _g = h.enter();
            let mesh = Mesh::new(MeshConfig {
                ingress_ns: Some(s.proxy_ns.clone()),
                listen_ns: Some(s.proxy_ns.clone()),
                forward: mode,
                reuse_port: rt_kind == "percore",
                ..MeshConfig::default()
            })
            .expect("mesh");
            for (name, port, target) in [("bulk", 45201u16, 5201u16), ("http", 48080, 8080)] {
                let mut p = PortSpec::tcp(port, target);
                p.listen = listen;
                let mut spec = ServiceSpec::new(name, vec![p]);
                spec.health.interval = Duration::from_secs(2);
                mesh.set_service(spec, vec![BackendSpec::new("be", beip)]).expect("service");
            }
            mesh
        })
        .collect();
    let sockmap_meshes =
        sockmap_exp::start(&handles, &s.proxy_ns, listen, beip, rt_kind == "percore");
    if let Err(e) = &sockmap_meshes {
        eprintln!("sockmap experiment not run: {e}");
    }
    let sockmap_ok = sockmap_meshes.is_ok();
    let kernel = match beip {
        // The backend reaches the proxy namespace across the overlay when there is one.
        IpAddr::V4(b) => kernel_path::start(&s, b, if overlay { "10.213.0.2" } else { &px }),
        IpAddr::V6(_) => Err("the kernel path is IPv4 only".to_owned()),
    };
    if let Err(e) = &kernel {
        eprintln!("kernel path not run: {e}");
    }
    let kernel_ok = kernel.is_ok();
    let kernel_host = kernel.as_ref().map_or(String::new(), |k| k.host.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let ha_pid: u32 = std::fs::read_to_string(s.tmp.join("ha.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    let proxy_ns = s.proxy_ns.clone();
    let (kb, kh) = kernel_path::PORTS;
    let (sb, sht) = sockmap_exp::PORTS;
    let systems: Vec<System<'_>> = vec![
        ("direct", None, Box::new(|| 0.0)),
        ("shoal", Some((px.as_str(), 45201, 48080)), Box::new(cpu_self)),
        ("sockmap", Some((px.as_str(), sb, sht)), Box::new(cpu_self)),
        // No process: the proxy CPU figures are NaN, not 0.
        ("kernel", Some((kernel_host.as_str(), kb, kh)), Box::new(|| f64::NAN)),
        ("haproxy", Some((px.as_str(), 15201, 18080)), Box::new(move || cpu_of(ha_pid))),
        ("nginx", Some((px.as_str(), 25201, 28080)), {
            let ns = proxy_ns.clone();
            Box::new(move || cpu_of_all(&pids_named(&ns, "nginx")))
        }),
        ("socat", Some((px.as_str(), 35201, 38080)), {
            let ns = proxy_ns.clone();
            Box::new(move || cpu_of_all(&pids_named(&ns, "socat")))
        }),
    ];
    let runs = |name: &str| match name {
        "haproxy" => haproxy_ok,
        "nginx" => nginx_ok,
        "socat" => socat_ok,
        "sockmap" => sockmap_ok,
        "kernel" => kernel_ok,
        _ => true,
    };
    let pinning = if s.pin {
        "wrk/iperf3 and the backend (iperf3 -s, nginx) on CPU 0, every proxy (shoal's runtime thread, HAProxy, nginx, socat) alone on CPU 1; the shoal kernel path's softirq is not pinned"
    } else {
        "none"
    };
    println!(
        "mesh bench: DUR={dur}s ROUNDS={rounds} THREADS={threads} (HAProxy nbthread {threads}, nginx stream {threads} worker(s)) shoal runtime={rt_name} forward={mode:?} overlay={overlay}; pinning: {pinning}; client → proxy → backend in namespaces (198.19.{}.0/24)",
        s.net
    );
    let head = || {
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>11} {:>8} {:>10} {:>11}",
            "system",
            "bulk Gb/s",
            "CPU s/GB",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU us/req",
            "mach us/req",
            "segs/req",
            "conn/s",
            "idle 0/1 %"
        );
    };
    let row = |name: &str, f: &Figures| {
        println!(
            "{:<8} {:>10.2} {:>10.3} {:>10.0} {:>9.2} {:>9.2} {:>10.1} {:>11.1} {:>8.2} {:>10.0} {:>5.0}/{:<5.0}",
            name,
            f.gbit,
            f.cpu_per_gb,
            f.rps,
            f.p50_ms,
            f.p99_ms,
            f.us_per_req,
            f.machine_us_per_req,
            f.segs_per_req,
            f.cps,
            f.idle_rps[0],
            f.idle_rps[1]
        );
    };
    let ratios = |sh: &Figures, ha: &Figures| -> [f64; 7] {
        [
            sh.gbit / ha.gbit,
            sh.rps / ha.rps,
            sh.p99_ms / ha.p99_ms,
            sh.cpu_per_gb / ha.cpu_per_gb,
            sh.us_per_req / ha.us_per_req,
            sh.machine_us_per_req / ha.machine_us_per_req,
            sh.cps / ha.cps,
        ]
    };
    const RATIO_NAMES: [&str; 7] = [
        "bulk (goal >= 1.15)",
        "req/s (goal >= 1.10)",
        "p99 (goal <= 1)",
        "CPU/GB (goal <= 1)",
        "CPU/req",
        "machine CPU/req",
        "conn/s",
    ];
    // The experiment's and the kernel path's ratios, without shoal/haproxy's goals; the
    // kernel path's proxy CPU ratios are NaN (it has no process).
    const SIDE_RATIOS: [(&str, &str, &str); 4] = [
        ("sockmap", "shoal", "sockmap/shoal (splice)"),
        ("kernel", "haproxy", "kernel path/haproxy"),
        ("kernel", "nginx", "kernel path/nginx stream"),
        ("kernel", "shoal", "kernel path/shoal (splice)"),
    ];
    let side_ratios = |res: &BTreeMap<&str, Figures>, suffix: &str| {
        for (a, b, label) in SIDE_RATIOS {
            if let (Some(a), Some(b)) = (res.get(a), res.get(b)) {
                let parts: Vec<String> = RATIO_NAMES
                    .iter()
                    .zip(ratios(a, b))
                    .map(|(n, x)| format!("{} {x:.2}x", n.split(" (").next().unwrap_or(n)))
                    .collect();
                println!("{label}{suffix}: {}", parts.join("  "));
            }
        }
    };
    // One pass over every system and test, `dur` 1 s, not recorded: connections, caches,
    // the backend's and the proxies' first allocations.
    let measure = |name: &str, ports: &Option<(&str, u16, u16)>, cpu: &CpuFn, dur: u64| {
        let (host, bp, hp) = match ports {
            None => (be_under.as_str(), 5201, 8080),
            Some((a, b, h)) => (*a, *b, *h),
        };
        // The kernel path's table is there only while it is measured (kernel_path's docs).
        let _armed = match (name, &kernel) {
            ("kernel", Ok(k)) => match k.arm() {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("  kernel path: {e}");
                    return Figures::NAN;
                }
            },
            _ => None,
        };
        let want = |t: &str| tests.as_ref().is_none_or(|v| v.iter().any(|x| x == t));
        let nan = (f64::NAN, f64::NAN);
        let (gbit, cpu_per_gb) =
            if want("bulk") { iperf(&s, host, bp, dur, cpu.as_ref()) } else { nan };
        let url = format!("http://{host}:{hp}/1k");
        let w = if want("rps") { wrk(&s, &url, dur, false, cpu.as_ref()) } else { Wrk::NAN };
        let c = if want("cps") { wrk(&s, &url, dur, true, cpu.as_ref()) } else { Wrk::NAN };
        let direct = ports.is_none();
        // The kernel path forwards without sockets of its own in the proxy namespace.
        let no_sockets = direct || name == "kernel";
        Figures {
            gbit,
            cpu_per_gb: if direct { f64::NAN } else { cpu_per_gb },
            rps: w.rps,
            p50_ms: w.p50,
            p99_ms: w.p99,
            us_per_req: if direct { f64::NAN } else { w.us_per_req },
            machine_us_per_req: w.machine_us_per_req,
            segs_per_req: if no_sockets { f64::NAN } else { w.segs },
            cps: c.rps,
            idle_rps: w.idle,
        }
    };
    let selected =
        |name: &str| runs(name) && only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    for w in 0..warmup {
        println!("warm-up pass {} (1 s per test, not recorded)", w + 1);
        for (name, ports, cpu) in &systems {
            if selected(name) {
                let _ = measure(name, ports, cpu, 1);
            }
        }
    }
    let mut all: Vec<BTreeMap<&str, Figures>> = Vec::new();
    let mut per_round: Vec<[f64; 7]> = Vec::new();
    for round in 1..=rounds {
        let mut res = BTreeMap::new();
        println!("\nround {round}");
        head();
        // Rotate the order each round so no system always runs first or last.
        let n = systems.len();
        for k in 0..n {
            let (name, ports, cpu) = &systems[(k + round as usize - 1) % n];
            if !selected(name) {
                continue;
            }
            let f = measure(name, ports, cpu, dur);
            row(name, &f);
            res.insert(*name, f);
        }
        if let (Some(sh), Some(ha)) = (res.get("shoal"), res.get("haproxy")) {
            let r = ratios(sh, ha);
            let parts: Vec<String> =
                RATIO_NAMES.iter().zip(r).map(|(n, x)| format!("{n} {x:.2}x")).collect();
            println!("shoal/haproxy: {}", parts.join("  "));
            per_round.push(r);
        }
        side_ratios(&res, "");
        all.push(res);
    }
    if all.len() > 1 {
        let med = |name: &str, get: fn(&Figures) -> f64| -> f64 {
            let mut v: Vec<f64> =
                all.iter().filter_map(|r| r.get(name)).map(get).filter(|x| !x.is_nan()).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
        };
        println!("\nmedian of {} rounds", all.len());
        head();
        let mut meds = BTreeMap::new();
        for (name, _, _) in &systems {
            let f = Figures {
                gbit: med(name, |f| f.gbit),
                cpu_per_gb: med(name, |f| f.cpu_per_gb),
                rps: med(name, |f| f.rps),
                p50_ms: med(name, |f| f.p50_ms),
                p99_ms: med(name, |f| f.p99_ms),
                us_per_req: med(name, |f| f.us_per_req),
                machine_us_per_req: med(name, |f| f.machine_us_per_req),
                segs_per_req: med(name, |f| f.segs_per_req),
                cps: med(name, |f| f.cps),
                idle_rps: [med(name, |f| f.idle_rps[0]), med(name, |f| f.idle_rps[1])],
            };
            row(name, &f);
            meds.insert(*name, f);
        }
        side_ratios(&meds, ", ratio of the medians");
        if let (Some(sh), Some(ha)) = (meds.get("shoal"), meds.get("haproxy")) {
            let r = ratios(sh, ha);
            println!(
                "shoal/haproxy, ratio of the medians, then median [min–max] of per-round ratios:"
            );
            for (i, name) in RATIO_NAMES.iter().enumerate() {
                let mut v: Vec<f64> =
                    per_round.iter().map(|x| x[i]).filter(|x| !x.is_nan()).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                if v.is_empty() {
                    continue;
                }
                println!(
                    "  {name:<22} {:.2}x   per round {:.2}x [{:.2}–{:.2}]",
                    r[i],
                    v[v.len() / 2],
                    v[0],
                    v[v.len() - 1]
                );
            }
        }
    }
    for (i, mesh) in meshes.iter().enumerate() {
        for svc in &mesh.metrics() {
            println!(
                "shoal mesh {i} metrics {}: total {} errors {} bytes in {} out {}",
                svc.name,
                svc.total(),
                svc.backends.iter().map(|b| b.errors).sum::<u64>(),
                svc.backends.iter().map(|b| b.bytes_in).sum::<u64>(),
                svc.backends.iter().map(|b| b.bytes_out).sum::<u64>()
            );
        }
        println!("shoal mesh {i} splice pipes created: {}", mesh.pipes_created());
    }
    for (i, mesh) in sockmap_meshes.iter().flatten().enumerate() {
        for svc in &mesh.metrics() {
            let errors: u64 = svc.backends.iter().map(|b| b.errors).sum();
            println!(
                "sockmap mesh {i} metrics {}: total {} errors {errors}",
                svc.name,
                svc.total()
            );
        }
    }
    if let Ok(k) = &kernel {
        println!("shoal kernel path: its rules forwarded {} flows", k.flows());
    }
    if opts.out_given {
        let placement = if overlay {
            "backend on another node: the proxy reaches it across kernel VXLAN"
        } else {
            "backend on the same node's bridge: the proxy reaches it over a veth"
        };
        let mut cond = suite::Conditions::detect();
        cond.pinning = pinning.to_owned();
        cond.peer("HAProxy", "haproxy", &["-v"]);
        cond.peer("nginx stream", "nginx", &["-v"]);
        cond.peer("socat", "socat", &["-V"]);
        cond.tool("iperf3", "iperf3", &["--version"]);
        cond.tool("wrk", "wrk", &["-v"]);
        cond.notes.push(format!(
            "client → proxy → backend, three namespaces on a bridge; {placement}; {dur} s per test, {rounds} rounds in rotating order after {warmup} warm-up pass(es)"
        ));
        cond.notes.push(format!(
            "one thread each: shoal {rt_name} (forward {mode:?}), HAProxy nbthread {threads} with splice-auto, nginx stream {threads} worker(s), socat fork"
        ));
        cond.notes.push(sockmap_exp::note(&sockmap_meshes));
        cond.notes.extend(kernel_path::notes(&kernel));
        if !nginx_ok && tools.nginx {
            cond.notes.push("nginx is installed but its stream module would not load".into());
        }
        let samples = |name: &str, get: fn(&Figures) -> f64| -> Vec<f64> {
            all.iter().filter_map(|r| r.get(name)).map(get).collect()
        };
        // Which CPU was the limit: req/s compares the proxies only while the proxy's CPU is.
        let idle_of = |name: &str| -> Option<[f64; 2]> {
            let median = |get: fn(&Figures) -> f64| suite::Stats::of(&samples(name, get));
            Some([median(|f| f.idle_rps[0])?.median, median(|f| f.idle_rps[1])?.median])
        };
        if let (Some(sh), Some(ha)) = (idle_of("shoal"), idle_of("haproxy")) {
            cond.notes.push(format!(
                "idle during the keep-alive 1 KiB test (median): CPU 0 (wrk and the backend) {:.0} % with shoal, {:.0} % with HAProxy; CPU 1 (the proxy) {:.0} % with shoal, {:.0} % with HAProxy. Where CPU 0 has no idle time left, it sets the request rate for every proxy that keeps up, and the req/s ratio says little about the proxies; CPU per request does",
                sh[0], ha[0], sh[1], ha[1]
            ));
        }
        let bulk = "iperf3, one TCP stream";
        let http = "wrk -t1 -c50, keep-alive, 1 KiB body";
        let close = "wrk -t1 -c50, Connection: close";
        let metrics: [Metric; 8] = [
            (
                "whole-machine CPU per 1 KiB request",
                "CPU µs/req",
                true,
                |f| f.machine_us_per_req,
                http,
                true,
            ),
            ("bulk TCP throughput", "Gbit/s", false, |f| f.gbit, bulk, true),
            ("proxy CPU per GB forwarded", "CPU s/GB", true, |f| f.cpu_per_gb, bulk, false),
            ("1 KiB HTTP requests/s", "req/s", false, |f| f.rps, http, true),
            ("1 KiB HTTP p50 latency", "ms", true, |f| f.p50_ms, http, true),
            ("1 KiB HTTP p99 latency", "ms", true, |f| f.p99_ms, http, true),
            ("proxy CPU per request", "CPU µs/req", true, |f| f.us_per_req, http, false),
            ("new connections/s", "conn/s", false, |f| f.cps, close, true),
        ];
        let mut rows = Vec::new();
        for (metric, unit, lower, get, how, vs_direct) in metrics {
            let shoal = samples("shoal", get);
            for (peer, label) in [
                ("haproxy", "HAProxy"),
                ("nginx", "nginx stream"),
                ("socat", "socat"),
                ("direct", "direct (no proxy)"),
            ] {
                if peer == "direct" && !vs_direct {
                    continue;
                }
                let theirs = samples(peer, get);
                let installed = runs(peer);
                let peer_samples = installed.then_some(theirs.as_slice());
                rows.push(suite::Row::new(metric, unit, lower, &shoal, label, peer_samples, how));
            }
            if sockmap_ok {
                // The experiment in the shoal column, the splice mesh as its peer.
                let metric = format!("{metric}, shoal sockmap vs splice");
                let sm = samples("sockmap", get);
                let splice = Some(shoal.as_slice());
                rows.push(suite::Row::new(metric, unit, lower, &sm, "shoal splice", splice, how));
            }
            // The kernel path in the shoal column, where a figure counts its work: it has no
            // process, so not in the per-process rows (its notes say so).
            if kernel_ok && !metric.starts_with("proxy CPU") {
                let metric = format!("{metric}, shoal kernel path");
                let k = samples("kernel", get);
                for (peer, label) in [
                    ("haproxy", "HAProxy"),
                    ("nginx", "nginx stream"),
                    ("shoal", "shoal proxy (splice)"),
                ] {
                    let theirs = samples(peer, get);
                    let peer_samples = runs(peer).then_some(theirs.as_slice());
                    rows.push(suite::Row::new(&metric, unit, lower, &k, label, peer_samples, how));
                }
            }
        }
        if let Err(e) = &kernel {
            let metric = "whole-machine CPU per 1 KiB request, shoal kernel path";
            rows.push(suite::Row::failed(metric, "CPU µs/req", "HAProxy", e.as_str()));
        }
        let report = suite::Report::new("mesh", opts.quick, rounds as usize, cond, rows);
        report.print();
        if let Err(e) = report.write_json(&opts.out) {
            eprintln!("writing {}: {e:#}", opts.out.display());
        }
    }
    drop(meshes);
    drop(sockmap_meshes);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    for pidfile in ["ha.pid", "nb.pid", "ns.pid"] {
        if let Some(pid) = std::fs::read_to_string(s.tmp.join(pidfile))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for tx in stops {
        let _ = tx.send(());
    }
    for d in drivers {
        let _ = d.join();
    }
    if let Some(rt) = multi_rt {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    drop(kernel);
    drop(s);
}
