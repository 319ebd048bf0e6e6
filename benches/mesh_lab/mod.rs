//! The routing mesh as a user deploys it: a 3-node lab, nginx tasks on node2 and node3
//! published on 8100, wrk from the host against node1:8100, nothing pinned. In the same run and
//! the same lab, HAProxy and nginx stream in node1's namespace forward to plain nginx processes
//! in node2's and node3's namespaces, and wrk also reaches one of those directly (no proxy).
//!
//! shoal runs twice in the same lab: the service publishes 8100 on the default path, the kernel's
//! (nftables DNAT in node1), and 8400 on the userspace proxy path (`mesh=proxy`), to the same
//! two tasks.
//!
//! The mesh's path is the longer one: its backends are tasks behind the VXLAN overlay, while the
//! peers reach nginx on the underlay. The headline figure is the CPU the whole machine spends per
//! request (every process, every softirq), which does not depend on which CPU saturates first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::common::{self, Row};
use super::report::Section;
use super::{Args, Lab, Spec, section_of};

/// The systems measured, in the order of the first round: name, label in the report.
const SYSTEMS: [(&str, &str); 5] = [
    ("shoal", "shoal kernel path"),
    ("shoal-proxy", "shoal proxy path"),
    ("haproxy", "HAProxy"),
    ("nginx", "nginx stream"),
    ("direct", "direct (no proxy)"),
];

/// A row of the report: metric, unit, whether lower is better, the figure of a run.
type Metric = (&'static str, &'static str, bool, fn(&Run) -> f64);

/// What one wrk run gives.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p99_ms: f64,
    machine_us_per_req: f64,
    errors: u64,
}

/// A scratch directory every nginx worker can read (tasks and node processes run as root;
/// nginx's workers as nobody), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> anyhow::Result<Scratch> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("shoal-meshlab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www"))?;
    for d in [dir.clone(), dir.join("www")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::write(dir.join("www/1k"), vec![b'x'; 1024])?;
    Ok(Scratch(dir))
}

/// An nginx configuration serving `dir/www` on `port`, one worker, no access log.
fn nginx_http_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\nerror_log {d}/nginx-{port}.err;\nevents {{ worker_connections 4096; }}\n\
         http {{ access_log off; server {{ listen {port} reuseport; location / {{ root {d}/www; }} }} }}\n"
    )
}

fn netns_exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output()?;
    if !out.status.success() {
        bail!("{args:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One `wrk -t2 -c50` run of `secs` seconds, keep-alive, with the machine's busy CPU around it.
fn wrk(url: &str, secs: u64) -> anyhow::Result<Run> {
    let m0 = common::machine_busy_seconds();
    let out = Command::new("wrk")
        .args(["-t2", "-c50", &format!("-d{secs}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    let m1 = common::machine_busy_seconds();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk {url} printed no rate: {text}"))?;
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk {url} printed no request count: {text}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .flat_map(|l| l.split([' ', ',']).filter_map(|w| w.parse::<u64>().ok()))
        .sum();
    Ok(Run {
        rps,
        p99_ms: wrk_p99_ms(&text),
        machine_us_per_req: (m1 - m0) * 1e6 / requests,
        errors,
    })
}

/// The 99 % line of `wrk --latency` ("99%  1.23ms") in milliseconds.
fn wrk_p99_ms(out: &str) -> f64 {
    let Some(v) = out.lines().find_map(|l| l.trim().strip_prefix("99%")) else {
        return f64::NAN;
    };
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// Polls `url` until it serves the 1 KiB file.
fn wait_answering(url: &str, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < within {
        let out = Command::new("curl")
            .args(["-s", "-m", "1", "-o", "/dev/null", "-w", "%{size_download}", url])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "1024" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{url} did not serve the 1 KiB file within {} s", within.as_secs())
}

/// The section: see the module's documentation.
pub fn mesh_lab(spec: &Spec, args: &Args) -> anyhow::Result<Section> {
    for tool in ["wrk", "nginx", "curl"] {
        if !common::have(tool) {
            bail!("{tool} is not installed");
        }
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { spec.full_rounds });
    let secs: u64 = if args.quick { 3 } else { 10 };
    let dir = scratch()?;
    let d = dir.0.display().to_string();
    std::fs::write(dir.0.join("task.conf"), nginx_http_conf(&dir.0, 8080))?;
    std::fs::write(dir.0.join("plain.conf"), nginx_http_conf(&dir.0, 18080))?;

    println!("[mesh-lab] lab up (3 nodes), swarm, nginx tasks on node2 and node3");
    let lab = Lab::up("m", &[])?;
    lab.form_swarm()?;
    let nodes = &lab.state.nodes;
    let (n1, n2, n3) = (nodes[0].addr, nodes[1].addr, nodes[2].addr);
    // The shell gives each task its own pid file: the tasks share the host's file system.
    let task_cmd = format!("exec nginx -c {d}/task.conf -g \"daemon off; pid {d}/task-$$.pid;\"");
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--constraint",
            "node.hostname!=node1",
            "--publish",
            "published=8100,target=8080",
            "--publish",
            "published=8400,target=8080,mesh=proxy",
            "--",
            "sh",
            "-c",
            &task_cmd,
        ],
    )?;
    for (n, name) in [(&nodes[1], "node2"), (&nodes[2], "node3")] {
        let pid = format!("pid {d}/plain-{name}.pid;");
        netns_exec(&n.netns, &["nginx", "-c", &format!("{d}/plain.conf"), "-g", &pid])?;
    }
    let mut peers = Vec::new();
    let haproxy = common::have("haproxy");
    if haproxy {
        std::fs::write(
            dir.0.join("haproxy.cfg"),
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
                 timeout server 60s\nfrontend f\n  bind {n1}:8200\n  default_backend b\nbackend b\n  \
                 balance roundrobin\n  server s2 {n2}:18080\n  server s3 {n3}:18080\n"
            ),
        )?;
        netns_exec(
            &nodes[0].netns,
            &["haproxy", "-D", "-f", &format!("{d}/haproxy.cfg"), "-p", &format!("{d}/ha.pid")],
        )?;
        if let Some(v) = common::peer_version("haproxy", &["-v"]) {
            peers.push(("HAProxy".to_owned(), v));
        }
    }
    std::fs::write(
        dir.0.join("stream.conf"),
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\n\
             pid {d}/stream.pid;\nerror_log {d}/stream.err;\nevents {{ worker_connections 4096; }}\n\
             stream {{ upstream b {{ server {n2}:18080; server {n3}:18080; }} \
             server {{ listen {n1}:8300; proxy_pass b; }} }}\n"
        ),
    )?;
    let stream = netns_exec(&nodes[0].netns, &["nginx", "-c", &format!("{d}/stream.conf")])
        .map_err(|e| eprintln!("[mesh-lab] nginx stream: {e:#}"))
        .is_ok();
    if stream && let Some(v) = common::peer_version("nginx", &["-v"]) {
        peers.push(("nginx stream".to_owned(), v));
    }
    let url = |system: &str| match system {
        "shoal" => format!("http://{n1}:8100/1k"),
        "shoal-proxy" => format!("http://{n1}:8400/1k"),
        "haproxy" => format!("http://{n1}:8200/1k"),
        "nginx" => format!("http://{n1}:8300/1k"),
        _ => format!("http://{n2}:18080/1k"),
    };
    let runs = |system: &str| match system {
        "haproxy" => haproxy,
        "nginx" => stream,
        _ => true,
    };
    for (system, _) in SYSTEMS {
        if runs(system) {
            wait_answering(&url(system), Duration::from_secs(60))?;
        }
    }
    // Warm-up: 1 s each, not recorded.
    for (system, _) in SYSTEMS {
        if runs(system) {
            wrk(&url(system), 1)?;
        }
    }
    let mut samples: Vec<(&str, Vec<Run>)> =
        SYSTEMS.iter().map(|(s, _)| (*s, Vec::new())).collect();
    for round in 0..rounds {
        // Rotate the order each round so no system always runs first or last.
        for k in 0..SYSTEMS.len() {
            let (system, _) = SYSTEMS[(k + round) % SYSTEMS.len()];
            if !runs(system) {
                continue;
            }
            let r = wrk(&url(system), secs)?;
            println!(
                "[mesh-lab] round {round} {system}: {:.0} req/s, p99 {:.2} ms, machine {:.1} µs/req, {} errors",
                r.rps, r.p99_ms, r.machine_us_per_req, r.errors
            );
            samples.iter_mut().find(|(s, _)| *s == system).expect("a system").1.push(r);
        }
    }
    let of = |system: &str, get: fn(&Run) -> f64| -> Vec<f64> {
        samples
            .iter()
            .find(|(s, _)| *s == system)
            .map_or(Vec::new(), |(_, v)| v.iter().map(get).collect())
    };
    let how = format!(
        "wrk -t2 -c50 -d{secs}s keep-alive, 1 KiB file, from the host to node1; nothing pinned"
    );
    let metrics: [Metric; 3] = [
        ("whole-machine CPU per 1 KiB request", "CPU µs/req", true, |r| r.machine_us_per_req),
        ("1 KiB HTTP requests/s", "req/s", false, |r| r.rps),
        ("1 KiB HTTP p99 latency", "ms", true, |r| r.p99_ms),
    ];
    let mut rows = Vec::new();
    // The default path's rows (the kernel's) keep their names and are also set against the
    // proxy path; the proxy path's say so.
    for (subject, path) in [("shoal", None), ("shoal-proxy", Some("proxy path"))] {
        for (metric, unit, lower, get) in metrics {
            let shoal = of(subject, get);
            let metric = path.map_or(metric.to_owned(), |p| format!("{metric}, {p}"));
            for (system, label) in SYSTEMS.iter().filter(|(s, _)| *s != subject) {
                if path.is_some() && *system == "shoal" {
                    continue;
                }
                let peer = of(system, get);
                let installed = runs(system);
                rows.push(Row::new(
                    metric.clone(),
                    unit,
                    lower,
                    &shoal,
                    label,
                    installed.then_some(peer.as_slice()),
                    how.clone(),
                ));
            }
        }
    }
    let mut tools = Vec::new();
    if let Some(v) = common::peer_version("wrk", &["-v"]) {
        tools.push(("wrk".to_owned(), v));
    }
    let errors: Vec<String> = SYSTEMS
        .iter()
        .filter(|(s, _)| runs(s))
        .map(|(s, label)| format!("{label} {}", of(s, |r| r.errors as f64).iter().sum::<f64>()))
        .collect();
    let notes = vec![
        format!(
            "failed requests (wrk socket errors and non-2xx), all rounds: {}",
            errors.join(", ")
        ),
        format!(
            "{rounds} recorded round(s) of {secs} s per system after a 1 s warm-up each, the order rotating per round"
        ),
        "shoal: node1's routing mesh (the default kernel path on 8100, the proxy path on 8400) to nginx tasks on node2 and node3 across the overlay; \
         HAProxy (its default threads) and nginx stream (worker_processes auto) in node1's \
         namespace to nginx on node2's and node3's underlay addresses; direct: wrk to node2's nginx"
            .to_owned(),
    ];
    drop(lab);
    drop(dir);
    let mut section = section_of(spec, rounds, "none", tools, notes, rows);
    section.peers = peers;
    Ok(section)
}
