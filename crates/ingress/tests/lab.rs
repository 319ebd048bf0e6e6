//! Root-only lab tests: "nodes" are network namespaces. node2 and node3 run real backend
//! servers on a bridge (198.19.X.0/24) that stands in for the overlay; node1 runs no task and is
//! NOT on that bridge: only its ingress sandbox (a namespace of its own, 198.19.X.11 on the
//! bridge) reaches the backends, so every request that succeeds proves the mesh made its
//! upstream socket inside the sandbox. The client reaches node1 over a separate link
//! (198.19.Y.0/24, node1 = .1, client = .2), the way an outside client reaches a node.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shoal_ingress::{BackendSpec, HealthState, Mesh, MeshConfig, PortSpec, ServiceSpec};
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Lab {
    prefix: String,
    net: u8,
    front: u8,
    /// node1, node2, node3.
    nodes: Vec<Arc<NetNs>>,
    /// node1's ingress sandbox.
    sandbox: Arc<NetNs>,
    client: Arc<NetNs>,
    _guard: Cleanup,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

impl Lab {
    fn up(tag: &str) -> Result<Lab> {
        let prefix = unique_prefix(tag);
        let net = u8::from_str_radix(&prefix[prefix.len() - 2..], 16).unwrap_or(7) & 0x7f;
        let front = net | 0x80;
        let mut guard = Cleanup::new();
        let sw = format!("{prefix}sw");
        guard.netns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let mut ns = std::collections::HashMap::new();
        for host in ["n1", "n2", "n3", "ib", "cl"] {
            let name = format!("{prefix}{host}");
            let n = Arc::new(guard.netns(&name)?);
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            ns.insert(host, n);
        }
        // The overlay stand-in: sandbox and the task nodes on the bridge.
        for (i, host) in [(11u8, "ib"), (2, "n2"), (3, "n3")] {
            let name = format!("{prefix}{host}");
            sh(&[
                "ip", "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &name,
                "netns", &sw,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", &name, "master", "br0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("198.19.{net}.{i}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        }
        // The front link: client ↔ node1.
        let (n1, cl) = (format!("{prefix}n1"), format!("{prefix}cl"));
        sh(&[
            "ip", "-n", &n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &cl,
        ])?;
        sh(&["ip", "-n", &n1, "addr", "add", &format!("198.19.{front}.1/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &cl, "addr", "add", &format!("198.19.{front}.2/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &n1, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &cl, "link", "set", "eth0", "up"])?;
        let get = |h: &str| ns.get(h).cloned().context("ns");
        Ok(Lab {
            prefix,
            net,
            front,
            nodes: vec![get("n1")?, get("n2")?, get("n3")?],
            sandbox: get("ib")?,
            client: get("cl")?,
            _guard: guard,
        })
    }

    /// node1's address as the client sees it.
    fn front_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.front, 1))
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.net, host))
    }

    fn ns_name(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn mesh(&self) -> Result<Mesh> {
        Ok(Mesh::new(MeshConfig {
            ingress_ns: Some(self.sandbox.clone()),
            listen_ns: Some(self.nodes[0].clone()),
            ..MeshConfig::default()
        })?)
    }

    /// Runs a command in a namespace in the background; Cleanup kills it with the namespace.
    fn spawn_in(&self, host: &str, args: &[&str]) -> Result<std::process::Child> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns_name(host)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// `curl` from the client namespace; the body, or an error.
    fn curl(&self, url: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns_name("cl"), "curl", "-sS", "-m", "2", "--fail", url])
            .output()?;
        ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

async fn wait_up(mesh: &Mesh, svc: &str, ids: &[&str]) -> Result<()> {
    for _ in 0..400 {
        let m = mesh.service_metrics(svc);
        if ids.iter().all(|id| {
            m.as_ref().and_then(|m| m.backend(id)).is_some_and(|b| b.health == HealthState::Up)
        }) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("backends {ids:?} of {svc} never came up: {:?}", mesh.service_metrics(svc))
}

async fn wait_port(lab: &Lab, host: u8, port: u16) -> Result<()> {
    let addr = SocketAddr::new(lab.ip(host), port);
    for _ in 0..200 {
        let ok = lab.sandbox.run(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{addr} never listened")
}

fn web_spec(port: u16, target: u16) -> ServiceSpec {
    let mut s = ServiceSpec::new("web", vec![PortSpec::tcp(port, target)]);
    s.health.interval = Duration::from_millis(500);
    s
}

/// curl to node1's published port answers from both backends (python http.server on node2
/// and node3, none on node1); kill one → from 3 s on, no request fails (and in practice none
/// fails at all: a refused connect is retried on the other backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_curl_answers_from_both_nodes_and_survives_a_kill() -> Result<()> {
    if !require_root("lab_curl_answers_from_both_nodes_and_survives_a_kill") {
        return Ok(());
    }
    let lab = Lab::up("ig")?;
    let dir = std::env::temp_dir().join(format!("{}-www", lab.prefix));
    let _rm = RmDir(dir.clone());
    let mut procs = Vec::new();
    for (host, n) in [("n2", 2u8), ("n3", 3)] {
        let d = dir.join(host);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("who"), format!("node{n}\n"))?;
        let bind = lab.ip(n).to_string();
        let d = d.to_string_lossy().to_string();
        procs.push(lab.spawn_in(
            host,
            &["python3", "-m", "http.server", "8080", "--bind", &bind, "-d", &d],
        )?);
    }
    wait_port(&lab, 2, 8080).await?;
    wait_port(&lab, 3, 8080).await?;
    let b2 = SocketAddr::new(lab.ip(2), 8080);
    let from_node1 = lab.nodes[0]
        .run(|| std::net::TcpStream::connect_timeout(&b2, Duration::from_millis(300)))?;
    assert!(from_node1.is_err(), "node1 itself must not reach the tasks: only its sandbox does");
    let mesh = lab.mesh()?;
    mesh.set_service(
        web_spec(8100, 8080),
        vec![BackendSpec::new("t2", lab.ip(2)), BackendSpec::new("t3", lab.ip(3))],
    )?;
    wait_up(&mesh, "web", &["t2", "t3"]).await?;
    let url = format!("http://{}:8100/who", lab.front_ip());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(lab.curl(&url)?);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["node2", "node3"]);
    // Kill node2's server.
    let mut victim = procs.remove(0);
    let _ = victim.kill();
    victim.wait()?;
    let killed = Instant::now();
    let (mut early_fail, mut late_ok) = (0, 0);
    while killed.elapsed() < Duration::from_secs(6) {
        match lab.curl(&url) {
            Ok(body) => {
                assert_eq!(body, "node3");
                if killed.elapsed() >= Duration::from_secs(3) {
                    late_ok += 1;
                }
            }
            Err(e) if killed.elapsed() < Duration::from_secs(3) => {
                eprintln!("request failed {:?} after the kill: {e}", killed.elapsed());
                early_fail += 1;
            }
            Err(e) => bail!("request failed {:?} after the kill: {e}", killed.elapsed()),
        }
    }
    eprintln!("failures in the first 3 s: {early_fail}; successes after: {late_ok}");
    assert!(late_ok >= 10);
    let m = mesh.service_metrics("web").context("metrics")?;
    assert_eq!(m.backend("t2").context("t2")?.health, HealthState::Down);
    Ok(())
}

async fn ask(c: &tokio::net::UdpSocket) -> Result<String> {
    let mut buf = [0u8; 256];
    for _ in 0..30 {
        c.send(b"hi\n").await?;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), c.recv(&mut buf)).await {
            let n = r?;
            return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
    }
    bail!("no echo")
}

struct RmDir(std::path::PathBuf);
impl Drop for RmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny HTTP/1.1 keep-alive server (1 KiB body naming its node) whose listening socket is
/// made in the node's namespace and served by this runtime.
fn http_backend(
    ns: &NetNs,
    addr: SocketAddr,
    name: &'static str,
) -> Result<tokio::task::JoinHandle<()>> {
    let std_l = ns.run(|| std::net::TcpListener::bind(addr))??;
    std_l.set_nonblocking(true)?;
    let l = tokio::net::TcpListener::from_std(std_l)?;
    let body = format!("{name}{}", " ".repeat(1024 - name.len()));
    let resp = Arc::new(format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    ));
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let resp = resp.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    }))
}

/// Under a wrk load through node1, one backend is drained (removed from the service): wrk
/// sees zero errors and zero non-2xx answers, and the drained backend gets no new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_draining_under_wrk_loses_zero_requests() -> Result<()> {
    if !require_root("lab_draining_under_wrk_loses_zero_requests") {
        return Ok(());
    }
    let lab = Lab::up("id")?;
    let _b2 = http_backend(&lab.nodes[1], SocketAddr::new(lab.ip(2), 8080), "node2")?;
    let _b3 = http_backend(&lab.nodes[2], SocketAddr::new(lab.ip(3), 8080), "node3")?;
    let mesh = lab.mesh()?;
    let mut spec = web_spec(8100, 8080);
    spec.drain_grace = Duration::from_secs(30);
    mesh.set_service(
        spec.clone(),
        vec![BackendSpec::new("t2", lab.ip(2)), BackendSpec::new("t3", lab.ip(3))],
    )?;
    wait_up(&mesh, "web", &["t2", "t3"]).await?;
    let url = format!("http://{}:8100/", lab.front_ip());
    let client = lab.ns_name("cl");
    let wrk = tokio::process::Command::new("ip")
        .args(["netns", "exec", &client, "wrk", "-t1", "-c20", "-d6s", "--timeout", "5s", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let drain = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = mesh.service_metrics("web").context("m")?.backend("t3").context("t3")?.total;
        mesh.set_service(spec.clone(), vec![BackendSpec::new("t2", lab.ip(2))])?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = mesh.service_metrics("web").context("m")?.backend("t3").context("t3")?.clone();
        anyhow::Ok((before, at))
    };
    let (out, drained) = tokio::join!(wrk, drain);
    let out = out?;
    let (before, at) = drained?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    ensure!(out.status.success(), "wrk: {}", String::from_utf8_lossy(&out.stderr));
    assert!(before > 0, "t3 served before the drain");
    assert_eq!(at.health, HealthState::Draining);
    assert!(!text.contains("Socket errors"), "wrk saw socket errors:\n{text}");
    assert!(!text.contains("Non-2xx"), "wrk saw bad answers:\n{text}");
    let reqs: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec")?;
    assert!(reqs > 100.0, "{reqs} req/s");
    let m = mesh.service_metrics("web").context("m")?;
    let t3 = m.backend("t3").context("t3")?;
    assert!(t3.total <= at.total, "no new connection to the draining backend");
    assert!(m.backend("t2").context("t2")?.total > 0);
    Ok(())
}

/// UDP echo through node1 to socat on node2/node3; killing the serving one switches the flow
/// to the other within 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_udp_echo_switches_backend_when_one_goes() -> Result<()> {
    if !require_root("lab_udp_echo_switches_backend_when_one_goes") {
        return Ok(());
    }
    let lab = Lab::up("iu")?;
    let mut procs = Vec::new();
    for (host, n) in [("n2", 2u8), ("n3", 3)] {
        let listen = format!("UDP4-RECVFROM:9000,bind={},fork", lab.ip(n));
        let reply = format!("SYSTEM:echo node{n}");
        procs.push((n, lab.spawn_in(host, &["socat", &listen, &reply])?));
    }
    let mesh = lab.mesh()?;
    let mut spec = ServiceSpec::new("echo", vec![PortSpec::udp(9100, 9000)]);
    spec.health.check = None;
    mesh.set_service(
        spec,
        vec![BackendSpec::new("t2", lab.ip(2)), BackendSpec::new("t3", lab.ip(3))],
    )?;
    wait_up(&mesh, "echo", &["t2", "t3"]).await?;
    let front = SocketAddr::new(lab.front_ip(), 9100);
    let sock = lab.client.run(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_nonblocking(true)?;
    let c = tokio::net::UdpSocket::from_std(sock)?;
    c.connect(front).await?;
    let first = ask(&c).await?;
    assert!(first == "node2" || first == "node3", "{first}");
    for _ in 0..5 {
        assert_eq!(ask(&c).await?, first, "one flow sticks to one backend");
    }
    let idx = procs.iter().position(|(n, _)| format!("node{n}") == first).context("victim")?;
    let (_, mut victim) = procs.remove(idx);
    let _ = victim.kill();
    victim.wait()?;
    let t = Instant::now();
    let other = if first == "node2" { "node3" } else { "node2" };
    loop {
        match ask(&c).await {
            Ok(r) if r == other => break,
            Ok(r) => ensure!(r != first || t.elapsed() < Duration::from_secs(3), "still {r}"),
            Err(_) => {}
        }
        ensure!(t.elapsed() < Duration::from_secs(3), "flow did not switch within 3 s");
    }
    eprintln!("UDP flow switched after {:?}", t.elapsed());
    for _ in 0..5 {
        assert_eq!(ask(&c).await?, other);
    }
    Ok(())
}
