//! A lab for the root-only tests: a switch namespace with a bridge, "nodes" as namespaces on
//! it (underlay 198.19.X.0/24, no route out), task namespaces, and a guard that removes every
//! namespace whose name starts with the test's prefix (nodes, tasks, and the sandboxes the driver
//! made), also on panic.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_netns::NetNs;
use shoal_vxlan::{Mac, NodeNs, OverlayConfig, PeerRecord, RemoteEndpoint};

pub struct PrefixGuard {
    pub prefix: String,
    pub files: Vec<String>,
    pub children: Vec<Child>,
}

impl Drop for PrefixGuard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let names: Vec<String> =
            NetNs::list().into_iter().filter(|n| n.starts_with(&self.prefix)).collect();
        for n in &names {
            if let Ok(ns) = NetNs::open(n) {
                shoal_netns::kill_all_in(&ns, Duration::from_secs(5));
            }
        }
        for n in &names {
            let _ = NetNs::delete(n);
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub struct Node {
    pub name: String,
    pub ns: Arc<NetNs>,
    pub addr: Ipv4Addr,
}

impl Node {
    pub fn node_ns(&self) -> NodeNs {
        NodeNs::Named(self.ns.clone())
    }

    pub fn config(&self, prefix: &str) -> OverlayConfig {
        let mut c = OverlayConfig::new(self.name.clone(), self.addr);
        c.name_prefix = format!("{prefix}{}-", self.name);
        c
    }

    pub fn peer(&self) -> PeerRecord {
        PeerRecord { node: self.name.clone(), vtep: self.addr, tunnel: None, wg_public: None }
    }
}

pub struct Lab {
    pub guard: PrefixGuard,
    pub p: String,
    pub subnet: u8,
    pub nodes: Vec<Node>,
}

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn must(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    assert!(
        out.status.success(),
        "command failed: {cmd}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    /// A switch and `n` nodes named n1..nN at 198.19.X.1.. .
    pub fn new(tag: &str, n: usize) -> Lab {
        let p = shoal_netns::testing::unique_prefix(tag);
        let guard = PrefixGuard { prefix: p.clone(), files: Vec::new(), children: Vec::new() };
        let subnet = u8::from_str_radix(&p[p.len() - 2..], 16).unwrap_or(7);
        let sw = format!("{p}sw");
        NetNs::create(&sw).expect("switch ns");
        must(&format!("ip -n {sw} link add br0 type bridge && ip -n {sw} link set br0 up"));
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = format!("n{i}");
            let nsname = format!("{p}{name}");
            let ns = Arc::new(NetNs::create(&nsname).expect("node ns"));
            let addr = Ipv4Addr::new(198, 19, subnet, i as u8);
            must(&format!(
                "ip -n {sw} link add e{i} type veth peer name eth0 netns {nsname} && \
                 ip -n {sw} link set e{i} master br0 up && \
                 ip -n {nsname} addr add {addr}/24 dev eth0 && \
                 ip -n {nsname} link set eth0 up && ip -n {nsname} link set lo up"
            ));
            nodes.push(Node { name, ns, addr });
        }
        Lab { guard, p, subnet, nodes }
    }

    pub fn task(&self, name: &str) -> NetNs {
        NetNs::create(&format!("{}{name}", self.p)).expect("task ns")
    }

    pub fn file(&mut self, name: &str) -> String {
        let f = format!("/tmp/{}{name}", self.p);
        self.guard.files.push(f.clone());
        f
    }

    /// Starts tcpdump in a node's namespace writing `file`; returns once it is capturing.
    pub fn capture(&mut self, ns: &str, filter: &str, file: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", "eth0", "-U", "-n", "-w", file])
            .args(filter.split_whitespace())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        self.guard.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::fs::metadata(file).is_ok_and(|m| m.len() > 0) {
                std::thread::sleep(Duration::from_millis(300));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tcpdump did not start");
    }

    /// Stops every capture (SIGTERM, so tcpdump flushes) and waits for them.
    pub fn stop_captures(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.guard.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        self.guard.children.clear();
    }
}

pub fn remote(net: &str, ip: Ipv4Addr, node: &str) -> RemoteEndpoint {
    RemoteEndpoint { network: net.into(), ip, mac: Mac::from_ipv4(ip), node: node.into() }
}

/// `ping` from a namespace; true if all replies came back.
pub fn ping(ns: &str, ip: Ipv4Addr, count: u32) -> bool {
    sh(&format!("ip netns exec {ns} ping -n -c {count} -i 0.2 -W 2 {ip}")).0
}

/// Pings until one succeeds (ARP/handshake warm-up), up to `secs`.
pub fn ping_until(ns: &str, ip: Ipv4Addr, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if sh(&format!("ip netns exec {ns} ping -n -c 1 -W 1 {ip}")).0 {
            return true;
        }
    }
    false
}

/// Sends `payload` repeated to `total` bytes over TCP from `client` to `server` at `ip:port`;
/// returns what the server received.
pub fn tcp_transfer(
    server: &NetNs,
    client: &NetNs,
    ip: Ipv4Addr,
    port: u16,
    payload: &[u8],
    total: usize,
) -> Vec<u8> {
    use std::io::{Read, Write};
    let listener = server
        .run(|| std::net::TcpListener::bind((ip, port)))
        .expect("enter server ns")
        .expect("bind");
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got
    });
    let mut c = client
        .run(|| std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(10)))
        .expect("enter client ns")
        .expect("connect");
    let mut sent = 0;
    while sent < total {
        let n = payload.len().min(total - sent);
        c.write_all(&payload[..n]).expect("write");
        sent += n;
    }
    drop(c);
    srv.join().expect("server thread")
}

/// A TCP stream from `client` to a server in `server` at `ip:port` that counts what it
/// receives until the client closes (or `read_timeout` passes): the restart tests keep it open
/// across a driver restart. Returns the connected client and the server's count.
pub fn counting_stream(
    server: &NetNs,
    client: &NetNs,
    ip: Ipv4Addr,
    port: u16,
    read_timeout: Duration,
) -> (std::net::TcpStream, std::thread::JoinHandle<std::io::Result<usize>>) {
    use std::io::Read;
    let listener =
        server.run(|| std::net::TcpListener::bind((ip, port))).expect("ns").expect("bind");
    let counter = std::thread::spawn(move || {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(read_timeout)).ok();
        let mut n = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) => return Err(e),
            }
        }
    });
    let c = client
        .run(|| std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(10)))
        .expect("ns")
        .expect("connect");
    (c, counter)
}
