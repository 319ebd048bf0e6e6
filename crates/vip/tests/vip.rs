//! Root-only: a client namespace and two backend namespaces on a bridge (10.213.X.0/24, which
//! exists only inside the test's namespaces), a real TCP and UDP server in each backend that
//! answers with its own name and port, and a VIP that no interface holds. The client's
//! connections to the VIP must be spread over the backends, follow rule changes, be refused fast
//! when the VIP has no backends, and survive bad input.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shoal_netns::NetNs;
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};
use shoal_vip::{Error, MAX_BACKENDS, VipRule, apply, batch, clear};

const PORTS: [u16; 2] = [8080, 9090];
const TIMEOUT: Duration = Duration::from_secs(2);

fn sh(args: &[&str]) -> Result<String> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("{args:?}"))?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A TCP server on each of [`PORTS`] and a UDP server on the first, bound inside a backend
/// namespace. TCP: the first line is `name:port`, then lines are echoed. UDP: every datagram gets
/// `name:port`. Dropping it stops the accept loops.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, name: &str, addr: Ipv4Addr) -> Result<Server> {
        let (tcp, udp) = ns.run(|| -> io::Result<_> {
            let tcp = PORTS
                .iter()
                .map(|&p| TcpListener::bind((addr, p)))
                .collect::<io::Result<Vec<_>>>()?;
            Ok((tcp, UdpSocket::bind((addr, PORTS[0]))?))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, port) in tcp.into_iter().zip(PORTS) {
            listener.set_nonblocking(true)?;
            let (stop, hello) = (stop.clone(), format!("{name}:{port}\n"));
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let hello = hello.clone();
                            std::thread::spawn(move || {
                                let _ = serve_tcp(conn, &hello);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (stop2, hello) = (stop.clone(), format!("{name}:{}", PORTS[0]));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(hello.as_bytes(), from);
                }
            }
        }));
        Ok(Server { stop, threads })
    }
}

fn serve_tcp(conn: TcpStream, hello: &str) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = conn.try_clone()?;
    w.write_all(hello.as_bytes())?;
    for line in BufReader::new(conn).lines() {
        w.write_all(format!("{}\n", line?).as_bytes())?;
    }
    Ok(())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Client, two backends `a` and `b`, and a switch namespace holding the bridge.
struct Lab {
    client: NetNs,
    a: NetNs,
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
    vip: Ipv4Addr,
    // Dropped in this order: servers stop before the namespaces go.
    _servers: Vec<Server>,
    _cleanup: Cleanup,
}

impl Lab {
    fn new(tag: &str) -> Result<Lab> {
        let mut c = Cleanup::new();
        let p = unique_prefix(tag);
        let x = u16::from_str_radix(&p[p.len() - 4..], 16).unwrap_or(0) % 250 + 1;
        let ip = |host: u8| Ipv4Addr::new(10, 213, x as u8, host);
        let sw = format!("{p}s");
        c.netns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let mut made = Vec::new();
        for (role, host) in [("c", 1u8), ("a", 2), ("b", 3)] {
            let name = format!("{p}{role}");
            let ns = c.netns(&name)?;
            let port = format!("{role}0");
            sh(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            sh(&["ip", "-n", &name, "addr", "add", &format!("{}/24", ip(host)), "dev", "eth0"])?;
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            made.push(ns);
        }
        let b = made.pop().context("b")?;
        let a = made.pop().context("a")?;
        let client = made.pop().context("client")?;
        let servers = vec![Server::start(&a, "a", ip(2))?, Server::start(&b, "b", ip(3))?];
        Ok(Lab {
            client,
            a,
            a_ip: ip(2),
            b_ip: ip(3),
            vip: ip(200),
            _servers: servers,
            _cleanup: c,
        })
    }

    fn rule(&self, backends: &[Ipv4Addr]) -> Vec<VipRule> {
        vec![VipRule { vip: self.vip, backends: backends.to_vec() }]
    }

    /// `n` fresh TCP connections from the client to VIP:port; how often each answer came back.
    fn tcp_spread(&self, port: u16, n: usize) -> Result<BTreeMap<String, usize>> {
        let to = SocketAddr::from((self.vip, port));
        self.client.run(|| -> Result<_> {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let conn = TcpStream::connect_timeout(&to, TIMEOUT)?;
                conn.set_read_timeout(Some(TIMEOUT))?;
                let mut line = String::new();
                BufReader::new(conn).read_line(&mut line)?;
                *seen.entry(line.trim().to_owned()).or_insert(0) += 1;
            }
            Ok(seen)
        })?
    }

    /// `n` UDP requests, each from a fresh socket, to VIP:port; how often each answer came back.
    fn udp_spread(&self, port: u16, n: usize) -> Result<BTreeMap<String, usize>> {
        self.client.run(|| -> Result<_> {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let answer = udp_ask((self.vip, port).into())?;
                *seen.entry(answer).or_insert(0) += 1;
            }
            Ok(seen)
        })?
    }

    /// The client namespace's `nft list tables`.
    fn tables(&self) -> Result<String> {
        self.client.run(|| sh(&["nft", "list", "tables"]))?
    }
}

fn udp_ask(to: SocketAddr) -> io::Result<String> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.connect(to)?;
    sock.send(b"who")?;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn expect_only(seen: &BTreeMap<String, usize>, wanted: &[&str]) -> Result<()> {
    for w in wanted {
        ensure!(seen.get(*w).copied().unwrap_or(0) > 0, "{w} never answered: {seen:?}");
    }
    ensure!(seen.keys().all(|k| wanted.contains(&k.as_str())), "unexpected answers: {seen:?}");
    Ok(())
}

#[test]
fn vip_spreads_tcp_and_udp_over_all_backends_keeping_ports() -> Result<()> {
    if !require_root("vip_spreads_tcp_and_udp_over_all_backends_keeping_ports") {
        return Ok(());
    }
    let lab = Lab::new("vs")?;
    apply(&lab.client, &lab.rule(&[lab.a_ip, lab.b_ip]))?;
    // 60 random picks out of 2 miss one backend with probability 2^-59.
    let seen = lab.tcp_spread(8080, 60)?;
    expect_only(&seen, &["a:8080", "b:8080"])?;
    eprintln!("tcp 8080 over 60 connections: {seen:?}");
    expect_only(&lab.tcp_spread(9090, 60)?, &["a:9090", "b:9090"])?;
    let seen = lab.udp_spread(8080, 60)?;
    expect_only(&seen, &["a:8080", "b:8080"])?;
    eprintln!("udp over 60 sockets: {seen:?}");
    ensure!(lab.tables()?.contains("table ip shoal-vip"));
    Ok(())
}

#[test]
fn rule_changes_apply_to_new_connections_and_an_empty_vip_refuses_fast() -> Result<()> {
    if !require_root("rule_changes_apply_to_new_connections_and_an_empty_vip_refuses_fast") {
        return Ok(());
    }
    let lab = Lab::new("vc")?;
    apply(&lab.client, &lab.rule(&[lab.a_ip, lab.b_ip]))?;
    expect_only(&lab.tcp_spread(8080, 20)?, &["a:8080", "b:8080"])?;

    apply(&lab.client, &lab.rule(&[lab.b_ip]))?;
    expect_only(&lab.tcp_spread(8080, 30)?, &["b:8080"])?;
    expect_only(&lab.udp_spread(8080, 10)?, &["b:8080"])?;

    // An established connection keeps its backend when the VIP loses all of them.
    let to = SocketAddr::from((lab.vip, 8080));
    let held = lab.client.run(|| TcpStream::connect_timeout(&to, TIMEOUT))??;
    held.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(held.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    ensure!(line == "b:8080\n", "{line:?}");

    apply(&lab.client, &lab.rule(&[]))?;
    let (tcp, udp) = lab.client.run(|| {
        let t0 = Instant::now();
        let tcp = TcpStream::connect_timeout(&to, TIMEOUT).map(drop);
        let t1 = Instant::now();
        let udp = udp_ask(to);
        ((tcp, t1 - t0), (udp, t1.elapsed()))
    })?;
    match tcp {
        (Err(e), took) if e.kind() == io::ErrorKind::ConnectionRefused => {
            ensure!(took < TIMEOUT, "refusal took {took:?}");
            eprintln!("tcp to an empty VIP refused in {took:?}");
        }
        other => bail!("expected a fast ConnectionRefused, got {other:?}"),
    }
    match udp {
        // The output hook's reject drops the datagram: send fails at once (EPERM), or the ICMP
        // error arrives as ECONNREFUSED; either way not a timeout.
        (Err(e), took)
            if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
        {
            ensure!(took < TIMEOUT, "udp failure took {took:?}");
            eprintln!("udp to an empty VIP failed in {took:?}: {e}");
        }
        other => bail!("expected a fast UDP error, got {other:?}"),
    }

    (&held).write_all(b"still here\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    ensure!(line == "still here\n", "established connection broken: {line:?}");

    apply(&lab.client, &lab.rule(&[lab.a_ip]))?;
    expect_only(&lab.tcp_spread(8080, 10)?, &["a:8080"])?;
    Ok(())
}

#[test]
fn bad_input_changes_nothing() -> Result<()> {
    if !require_root("bad_input_changes_nothing") {
        return Ok(());
    }
    let lab = Lab::new("vb")?;
    apply(&lab.client, &lab.rule(&[lab.a_ip, lab.b_ip]))?;
    let before = lab.client.run(|| sh(&["nft", "list", "table", "ip", "shoal-vip"]))??;

    let looped = lab.rule(&[lab.a_ip, lab.vip]);
    let err = apply(&lab.client, &looped).expect_err("a VIP among its own backends");
    ensure!(matches!(err, Error::VipIsBackend { vip } if vip == lab.vip), "{err}");
    let too_many: Vec<Ipv4Addr> =
        (0..=MAX_BACKENDS as u32).map(|i| Ipv4Addr::from(0x0a_d6_00_00 + i)).collect();
    let err = apply(&lab.client, &lab.rule(&too_many)).expect_err("too many backends");
    ensure!(matches!(err, Error::TooManyBackends { .. }), "{err}");
    eprintln!("errors read: {err}");

    let after = lab.client.run(|| sh(&["nft", "list", "table", "ip", "shoal-vip"]))??;
    ensure!(before == after, "rules changed:\n{before}\n---\n{after}");
    expect_only(&lab.tcp_spread(8080, 40)?, &["a:8080", "b:8080"])?;
    Ok(())
}

#[test]
fn apply_is_idempotent_and_clear_removes_the_table() -> Result<()> {
    if !require_root("apply_is_idempotent_and_clear_removes_the_table") {
        return Ok(());
    }
    let lab = Lab::new("vi")?;
    let rules = lab.rule(&[lab.a_ip, lab.b_ip]);
    apply(&lab.client, &rules)?;
    let list = || lab.client.run(|| sh(&["nft", "list", "ruleset"]));
    let first = list()??;
    let t = Instant::now();
    apply(&lab.client, &rules)?;
    eprintln!("apply of one VIP with two backends took {:?}", t.elapsed());
    ensure!(first == list()??, "a second apply changed the ruleset");
    ensure!(first.matches("table ip shoal-vip").count() == 1, "{first}");
    ensure!(first.contains("numgen random mod 2 map"), "{first}");

    clear(&lab.client)?;
    let tables = lab.tables()?;
    ensure!(!tables.contains("shoal-vip"), "table still there: {tables}");
    clear(&lab.client)?;
    // The rules in the backends' namespaces were never touched.
    ensure!(lab.a.run(|| sh(&["nft", "list", "tables"]))??.trim().is_empty());
    Ok(())
}

/// A large ruleset (1,000 VIPs with 8 backends, one with the maximum of 4,096, and 50 empty
/// ones) is accepted by the kernel and replaced atomically; prints how long `apply` takes.
#[test]
fn a_large_ruleset_applies() -> Result<()> {
    if !require_root("a_large_ruleset_applies") {
        return Ok(());
    }
    let mut c = Cleanup::new();
    let ns = c.netns(&unique_prefix("vl"))?;
    let addr = |i: u32| Ipv4Addr::from(0x0a_00_00_00 + i);
    let mut rules: Vec<VipRule> = (0..1000)
        .map(|i| VipRule {
            vip: addr(0x10_0000 + i),
            backends: (0..8).map(|j| addr(i * 8 + j + 1)).collect(),
        })
        .collect();
    rules.push(VipRule {
        vip: addr(0x20_0000),
        backends: (0..MAX_BACKENDS as u32).map(|j| addr(0x30_0000 + j)).collect(),
    });
    rules.extend((0..50).map(|i| VipRule { vip: addr(0x40_0000 + i), backends: Vec::new() }));
    let commands = batch(&rules)?.commands().len();
    let mut took = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        apply(&ns, &rules)?;
        took.push(t.elapsed());
    }
    let listed = ns.run(|| sh(&["nft", "list", "table", "ip", "shoal-vip"]))??;
    let chains = listed.matches("\tchain ").count();
    ensure!(chains == 1 + 1000 + 1 + 50, "{chains} chains");
    ensure!(listed.contains(&format!("numgen random mod {MAX_BACKENDS} map")));
    eprintln!("transaction of {commands} commands applied in {took:?}");
    clear(&ns)?;
    Ok(())
}
