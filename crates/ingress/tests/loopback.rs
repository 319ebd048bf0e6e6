//! Loopback integration tests: real sockets on 127.0.0.0/8, backends as small tokio servers on
//! distinct 127.0.0.x addresses sharing one target port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_ingress::proxy_protocol;
use shoal_ingress::{
    Algorithm, BackendSpec, CheckKind, Error, ForwardMode, HealthState, Mesh, MeshConfig, PortSpec,
    ProxyProtocol, ServiceSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A free port number on 127.0.0.1 (tests bind the mesh on loopback addresses only).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let u = std::net::UdpSocket::bind(l.local_addr().expect("addr"));
    let p = l.local_addr().expect("addr").port();
    drop(u);
    p
}

/// Distinct 127.0.0.x per test so parallel tests never share a backend address.
fn lo_block() -> u8 {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(10);
    NEXT.fetch_add(4, Ordering::Relaxed)
}

fn fast_spec(name: &str, port: PortSpec) -> ServiceSpec {
    let mut s = ServiceSpec::new(name, vec![port]);
    s.health.interval = Duration::from_millis(100);
    s.health.timeout = Duration::from_millis(200);
    s.drain_grace = Duration::from_millis(500);
    s
}

fn published(ip: IpAddr, published: u16, target: u16) -> PortSpec {
    let mut p = PortSpec::tcp(published, target);
    p.listen = Some(ip);
    p
}

/// An HTTP-ish backend: answers every connection with its name after reading one request line.
async fn name_server(addr: SocketAddr, name: &'static str) -> Result<JoinHandle<()>> {
    let l = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }))
}

async fn ask(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..400 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("timed out waiting for {what}")
}

fn health(mesh: &Mesh, svc: &str, id: &str) -> Option<HealthState> {
    mesh.service_metrics(svc)?.backend(id).map(|b| b.health)
}

/// Pattern byte at offset `i` of stream `seed`: any drop, duplicate or reorder shows.
fn pat(seed: u8, i: u64) -> u8 {
    ((i ^ (i >> 8) ^ (i >> 19)) as u8).wrapping_add(seed)
}

fn fill(seed: u8, off: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pat(seed, off + k as u64);
    }
}

async fn send_pattern(w: &mut (impl AsyncWriteExt + Unpin), seed: u8, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    Ok(())
}

async fn check_pattern(r: &mut (impl AsyncReadExt + Unpin), seed: u8, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut exp = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if off + n as u64 > len {
            bail!("more than {len} bytes");
        }
        fill(seed, off, &mut exp[..n]);
        if buf[..n] != exp[..n] {
            bail!("stream {seed} differs near offset {off}");
        }
        off += n as u64;
    }
    if off != len {
        bail!("stream {seed}: got {off} of {len} bytes before EOF");
    }
    Ok(())
}

async fn stream_both_ways(mode: ForwardMode, len: u64) -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    let server = tokio::spawn(async move {
        let (s, _) = backend.accept().await?;
        let (mut r, mut w) = s.into_split();
        let reader = tokio::spawn(async move { check_pattern(&mut r, 1, len).await });
        send_pattern(&mut w, 2, len).await?;
        w.shutdown().await?;
        reader.await?
    });
    let mesh = Mesh::new(MeshConfig { forward: mode, ..MeshConfig::default() })?;
    let mut spec = fast_spec("bulk", published(lo(base), port, target));
    spec.health.check = None;
    mesh.set_service(spec, vec![BackendSpec::new("b1", lo(base + 1))])?;
    wait_until("backend up", || health(&mesh, "bulk", "b1") == Some(HealthState::Up)).await?;
    let c = TcpStream::connect((lo(base), port)).await?;
    let (mut r, mut w) = c.into_split();
    let reader = tokio::spawn(async move { check_pattern(&mut r, 2, len).await });
    send_pattern(&mut w, 1, len).await?;
    // Half-close: our FIN must reach the backend while its direction keeps flowing.
    w.shutdown().await?;
    reader.await??;
    server.await??;
    let m = mesh.service_metrics("bulk").context("metrics")?;
    let b = m.backend("b1").context("b1")?;
    assert_eq!((b.bytes_in, b.bytes_out, b.total, b.errors), (len, len, 1, 0));
    wait_until("connection closed", || {
        mesh.service_metrics("bulk").is_some_and(|m| m.active() == 0)
    })
    .await?;
    Ok(())
}

/// 1 GiB each way through the splice path, byte-exact, with a half-close in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_1gib_byte_exact_both_directions_with_half_close() -> Result<()> {
    stream_both_ways(ForwardMode::Splice, 1 << 30).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_auto_paths_are_byte_exact() -> Result<()> {
    stream_both_ways(ForwardMode::Copy, 48 << 20).await?;
    stream_both_ways(ForwardMode::Auto, 48 << 20).await
}

/// The backend answers only after it saw EOF from the client: the FIN crossed the proxy as a
/// half-close and the reverse direction still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_reaches_backend_and_reply_follows() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = backend.accept().await {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            let _ = s.write_all(format!("got {} bytes after EOF", got.len()).as_bytes()).await;
        }
    });
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("hc", published(lo(base), port, target));
    spec.health.check = None;
    mesh.set_service(spec, vec![BackendSpec::new("b1", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "hc", "b1") == Some(HealthState::Up)).await?;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    c.write_all(b"hello world").await?;
    c.shutdown().await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out)).await??;
    assert_eq!(out, "got 11 bytes after EOF");
    Ok(())
}

async fn proxy_header_seen(version: ProxyProtocol) -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    let seen = tokio::spawn(async move {
        let (mut s, _) = backend.accept().await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    });
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut p = published(lo(base), port, target);
    p.proxy_protocol = version;
    let mut spec = fast_spec("pp", p);
    spec.health.check = None;
    mesh.set_service(spec, vec![BackendSpec::new("b1", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "pp", "b1") == Some(HealthState::Up)).await?;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    let me = c.local_addr()?;
    c.write_all(b"payload").await?;
    c.shutdown().await?;
    let bytes = seen.await??;
    let (h, n) = proxy_protocol::parse(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(h.addrs, Some((me, SocketAddr::new(lo(base), port))));
    assert_eq!(&bytes[n..], b"payload");
    if version == ProxyProtocol::V2 {
        assert_eq!(&bytes[..12], &proxy_protocol::V2_SIGNATURE);
        assert_eq!(n, 28);
    } else {
        assert!(bytes.starts_with(b"PROXY TCP4 "));
    }
    Ok(())
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_reach_the_backend() -> Result<()> {
    proxy_header_seen(ProxyProtocol::V2).await?;
    proxy_header_seen(ProxyProtocol::V1).await
}

/// Both backends answer; one stops listening → within `fall` checks it is down and every
/// request still succeeds (connect retries cover the gap); it comes back after `rise`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_backend_is_taken_out_and_requests_keep_working() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let a = name_server(SocketAddr::new(lo(base + 1), target), "A").await?;
    let _b = name_server(SocketAddr::new(lo(base + 2), target), "B").await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("web", published(lo(base), port, target));
    spec.algorithm = Algorithm::RoundRobin;
    mesh.set_service(
        spec,
        vec![BackendSpec::new("a", lo(base + 1)), BackendSpec::new("b", lo(base + 2))],
    )?;
    wait_until("both up", || {
        health(&mesh, "web", "a") == Some(HealthState::Up)
            && health(&mesh, "web", "b") == Some(HealthState::Up)
    })
    .await?;
    let front = SocketAddr::new(lo(base), port);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(ask(front).await?);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["A", "B"]);
    a.abort();
    let _ = a.await;
    for _ in 0..30 {
        assert_eq!(ask(front).await?, "B", "requests keep working while A is dead");
    }
    wait_until("A down", || health(&mesh, "web", "a") == Some(HealthState::Down)).await?;
    let m = mesh.service_metrics("web").context("metrics")?;
    assert!(m.backend("a").context("a")?.errors > 0, "connect failures counted");
    let sel_a = m.backend("a").context("a")?.selected;
    for _ in 0..20 {
        assert_eq!(ask(front).await?, "B");
    }
    let m = mesh.service_metrics("web").context("metrics")?;
    assert_eq!(m.backend("a").context("a")?.selected, sel_a, "a down backend is never picked");
    let _a2 = name_server(SocketAddr::new(lo(base + 1), target), "A").await?;
    wait_until("A back after rise", || health(&mesh, "web", "a") == Some(HealthState::Up)).await?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(ask(front).await?);
    }
    assert_eq!(seen.len(), 2);
    Ok(())
}

/// A backend whose HTTP check answers 503 gets nothing, and its open connections are reset
/// when the check takes it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_gates_and_dead_backend_connections_are_reset() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let status = Arc::new(AtomicU64::new(200));
    let l = TcpListener::bind((lo(base + 1), target)).await?;
    let st = status.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /healthz") {
                    let code = st.load(Ordering::Relaxed);
                    let _ = s.write_all(format!("HTTP/1.1 {code} X\r\n\r\n").as_bytes()).await;
                } else {
                    // A long-lived client connection: echo forever.
                    let _ = s.write_all(&buf[..n]).await;
                    let mut rest = [0u8; 1024];
                    while let Ok(m) = s.read(&mut rest).await {
                        if m == 0 || s.write_all(&rest[..m]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("api", published(lo(base), port, target));
    spec.health.check = Some(CheckKind::Http { path: "/healthz".into() });
    mesh.set_service(spec, vec![BackendSpec::new("a", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "api", "a") == Some(HealthState::Up)).await?;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    c.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    status.store(503, Ordering::Relaxed);
    wait_until("down after fall", || health(&mesh, "api", "a") == Some(HealthState::Down)).await?;
    // The open connection is reset promptly, not left hanging.
    let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await?;
    assert!(matches!(r, Err(_) | Ok(0)), "connection must be closed: {r:?}");
    // New connections find no backend and are refused by a reset.
    // (The reset may already fail the connect.)
    if let Ok(mut c2) = TcpStream::connect((lo(base), port)).await {
        let r = tokio::time::timeout(Duration::from_secs(2), c2.read(&mut buf)).await?;
        assert!(matches!(r, Err(_) | Ok(0)));
    }
    assert!(mesh.service_metrics("api").context("m")?.no_backend >= 1);
    status.store(200, Ordering::Relaxed);
    wait_until("up after rise", || health(&mesh, "api", "a") == Some(HealthState::Up)).await?;
    Ok(())
}

/// Removing a backend: no new connections at once, an open one keeps working during the
/// grace and is reset when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_backend_finishes_open_connections_within_grace() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    for (n, name) in [(1u8, "A"), (2, "B")] {
        let l = TcpListener::bind((lo(base + n), target)).await?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(m) = s.read(&mut buf).await {
                        if m == 0 || s.write_all(name.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("d", published(lo(base), port, target));
    spec.drain_grace = Duration::from_secs(4);
    spec.health.check = None;
    let both = vec![BackendSpec::new("a", lo(base + 1)), BackendSpec::new("b", lo(base + 2))];
    mesh.set_service(spec.clone(), both)?;
    wait_until("up", || health(&mesh, "d", "b") == Some(HealthState::Up)).await?;
    // Open connections until one lands on A.
    let mut on_a = None;
    for _ in 0..40 {
        let mut c = TcpStream::connect((lo(base), port)).await?;
        c.write_all(b"?").await?;
        let mut who = [0u8; 1];
        c.read_exact(&mut who).await?;
        if &who == b"A" {
            on_a = Some(c);
            break;
        }
    }
    let mut c = on_a.context("no connection reached A")?;
    mesh.set_service(spec, vec![BackendSpec::new("b", lo(base + 2))])?;
    wait_until("a draining", || health(&mesh, "d", "a") == Some(HealthState::Draining)).await?;
    for _ in 0..20 {
        let mut n = TcpStream::connect((lo(base), port)).await?;
        n.write_all(b"?").await?;
        let mut who = [0u8; 1];
        n.read_exact(&mut who).await?;
        assert_eq!(&who, b"B", "no new connection goes to a draining backend");
    }
    c.write_all(b"?").await?;
    let mut who = [0u8; 1];
    c.read_exact(&mut who).await?;
    assert_eq!(&who, b"A", "the open connection still works during the grace");
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut who)).await?;
    assert!(matches!(r, Err(_) | Ok(0)), "reset when the grace ends: {r:?}");
    wait_until("a forgotten", || health(&mesh, "d", "a").is_none()).await?;
    Ok(())
}

#[tokio::test]
async fn idle_timeout_resets_quiet_connections() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let l = TcpListener::bind((lo(base + 1), target)).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(m) = s.read(&mut buf).await {
                    if m == 0 || s.write_all(&buf[..m]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("idle", published(lo(base), port, target));
    spec.health.check = None;
    spec.idle_timeout = Some(Duration::from_millis(1000));
    mesh.set_service(spec, vec![BackendSpec::new("a", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "idle", "a") == Some(HealthState::Up)).await?;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    let mut buf = [0u8; 1];
    // Activity keeps it alive past several timeouts.
    for _ in 0..8 {
        c.write_all(b"x").await?;
        c.read_exact(&mut buf).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(6), c.read(&mut buf)).await?;
    let e = r.expect_err("idle connection is reset, not closed cleanly");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(t.elapsed() >= Duration::from_millis(900));
    Ok(())
}

/// Listeners come and go per service without disturbing others; a taken port is refused and
/// changes nothing; a bad spec changes nothing.
#[tokio::test]
async fn listeners_are_added_and_removed_independently() -> Result<()> {
    let base = lo_block();
    let (p1, p2, target) = (free_port(), free_port(), free_port());
    let _srv = name_server(SocketAddr::new(lo(base + 1), target), "X").await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut s1 = fast_spec("one", published(lo(base), p1, target));
    s1.health.check = None;
    let mut s2 = fast_spec("two", published(lo(base), p2, target));
    s2.health.check = None;
    let bs = vec![BackendSpec::new("x", lo(base + 1))];
    mesh.set_service(s1.clone(), bs.clone())?;
    mesh.set_service(s2.clone(), bs.clone())?;
    wait_until("up", || health(&mesh, "two", "x") == Some(HealthState::Up)).await?;
    assert_eq!(mesh.listeners().len(), 2);
    // A long-lived connection on service two.
    let mut long = TcpStream::connect((lo(base), p2)).await?;
    // Port of service one claimed by a third service: refused, nothing changes.
    let mut s3 = fast_spec("three", published(lo(base), p1, target));
    s3.health.check = None;
    let err = mesh.set_service(s3, bs.clone()).expect_err("port taken");
    assert!(matches!(err, Error::PortTaken { port, .. } if port == p1), "{err}");
    assert_eq!(mesh.services(), ["one", "two"]);
    let mut bad = s1.clone();
    bad.health.rise = 0;
    assert!(matches!(mesh.set_service(bad, bs.clone()), Err(Error::InvalidSpec { .. })));
    assert_eq!(ask(SocketAddr::new(lo(base), p1)).await?, "X");
    mesh.remove_service("one")?;
    assert!(matches!(mesh.remove_service("one"), Err(Error::UnknownService(_))));
    assert_eq!(mesh.listeners().len(), 1);
    wait_until("port 1 closed", || std::net::TcpStream::connect((lo(base), p1)).is_err()).await?;
    // Service two and its open connection are untouched.
    long.write_all(b"GET /\r\n").await?;
    let mut out = String::new();
    long.read_to_string(&mut out).await?;
    assert_eq!(out, "X");
    assert_eq!(ask(SocketAddr::new(lo(base), p2)).await?, "X");
    // Moving service two to another published port frees the old one.
    let p3 = free_port();
    let mut s2b = s2.clone();
    s2b.ports[0].published = p3;
    mesh.set_service(s2b, bs)?;
    assert_eq!(ask(SocketAddr::new(lo(base), p3)).await?, "X");
    assert!(std::net::TcpStream::connect((lo(base), p2)).is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_are_reused_across_connections() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let _srv = name_server(SocketAddr::new(lo(base + 1), target), "P").await?;
    let mesh = Mesh::new(MeshConfig { forward: ForwardMode::Splice, ..MeshConfig::default() })?;
    let mut spec = fast_spec("pipes", published(lo(base), port, target));
    spec.health.check = None;
    mesh.set_service(spec, vec![BackendSpec::new("p", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "pipes", "p") == Some(HealthState::Up)).await?;
    for _ in 0..50 {
        assert_eq!(ask(SocketAddr::new(lo(base), port)).await?, "P");
    }
    assert!(mesh.pipes_created() <= 8, "pool reuses pipes: {} created", mesh.pipes_created());
    Ok(())
}

async fn udp_echo(addr: SocketAddr, name: &'static str) -> Result<JoinHandle<()>> {
    let s = UdpSocket::bind(addr).await?;
    Ok(tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut out = name.as_bytes().to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    }))
}

/// UDP flows stick to a backend, and move at once when it leaves the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_are_sticky_and_purged_when_backend_goes() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let _a = udp_echo(SocketAddr::new(lo(base + 1), target), "A:").await?;
    let _b = udp_echo(SocketAddr::new(lo(base + 2), target), "B:").await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut p = PortSpec::udp(port, target);
    p.listen = Some(lo(base));
    let mut spec = fast_spec("dns", p);
    spec.health.check = None;
    let both = vec![BackendSpec::new("a", lo(base + 1)), BackendSpec::new("b", lo(base + 2))];
    mesh.set_service(spec.clone(), both)?;
    wait_until("up", || {
        health(&mesh, "dns", "a") == Some(HealthState::Up)
            && health(&mesh, "dns", "b") == Some(HealthState::Up)
    })
    .await?;
    let c = UdpSocket::bind((lo(base + 3), 0)).await?;
    c.connect((lo(base), port)).await?;
    let mut buf = [0u8; 2048];
    let mut first = None;
    for i in 0..20u32 {
        c.send(format!("q{i}").as_bytes()).await?;
        let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf)).await??;
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(reply.ends_with(&format!("q{i}")), "{reply}");
        let who = reply[..2].to_string();
        assert_eq!(first.get_or_insert(who.clone()), &who, "one flow, one backend");
    }
    let first = first.context("no reply")?;
    let (gone_id, stay) =
        if first == "A:" { ("a", ("b", lo(base + 2))) } else { ("b", ("a", lo(base + 1))) };
    mesh.set_service(spec, vec![BackendSpec::new(stay.0, stay.1)])?;
    wait_until("drain", || health(&mesh, "dns", gone_id) == Some(HealthState::Draining)).await?;
    c.send(b"after").await?;
    let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf)).await??;
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(!reply.starts_with(&first) && reply.ends_with("after"), "flow moved at once: {reply}");
    let m = mesh.service_metrics("dns").context("m")?;
    assert_eq!(m.backend(stay.0).context("stay")?.total, 1);
    Ok(())
}

#[tokio::test]
async fn prometheus_text_lists_backends() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("prom", published(lo(base), port, target));
    spec.health.check = None;
    mesh.set_service(spec, vec![BackendSpec::new("t1", lo(base + 1))])?;
    wait_until("up", || health(&mesh, "prom", "t1") == Some(HealthState::Up)).await?;
    let text = mesh.render_prometheus();
    let want = format!(
        "shoal_mesh_backend_up{{service=\"prom\",backend=\"t1\",addr=\"{}\",health=\"up\"}} 1",
        lo(base + 1)
    );
    assert!(text.contains(&want), "{text}");
    assert!(text.contains("# TYPE shoal_mesh_backend_bytes_in_total counter"));
    Ok(())
}

/// `mode=host`: no listener while the node has no local task; once it has one, every
/// connection goes to the local task even though a remote one is eligible.
#[tokio::test]
async fn host_mode_listens_only_with_a_local_task_and_forwards_locally() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let _local = name_server(SocketAddr::new(lo(base + 1), target), "local").await?;
    let _remote = name_server(SocketAddr::new(lo(base + 2), target), "remote").await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut p = published(lo(base), port, target);
    p.mode = shoal_ingress::PublishMode::Host;
    let mut spec = fast_spec("hm", p);
    spec.health.check = None;
    let remote = BackendSpec::new("r", lo(base + 2));
    mesh.set_service(spec.clone(), vec![remote.clone()])?;
    assert!(mesh.listeners().is_empty(), "no local task, no listener");
    assert!(std::net::TcpStream::connect((lo(base), port)).is_err());
    let mut local = BackendSpec::new("l", lo(base + 1));
    local.local = true;
    mesh.set_service(spec, vec![remote, local])?;
    assert_eq!(mesh.listeners().len(), 1);
    wait_until("both up", || {
        health(&mesh, "hm", "l") == Some(HealthState::Up)
            && health(&mesh, "hm", "r") == Some(HealthState::Up)
    })
    .await?;
    for _ in 0..10 {
        assert_eq!(ask(SocketAddr::new(lo(base), port)).await?, "local");
    }
    Ok(())
}

/// Source affinity end to end: one client address always lands on the same backend.
#[tokio::test]
async fn source_hash_keeps_a_client_on_one_backend() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let names = ["s0", "s1", "s2"];
    for (i, n) in names.iter().enumerate() {
        drop(name_server(SocketAddr::new(lo(base + 1 + i as u8), target), n).await?);
    }
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut spec = fast_spec("sh", published(lo(base), port, target));
    spec.health.check = None;
    spec.algorithm = Algorithm::SourceHash;
    let bs = (0..3).map(|i| BackendSpec::new(names[i], lo(base + 1 + i as u8))).collect();
    mesh.set_service(spec, bs)?;
    wait_until("up", || health(&mesh, "sh", "s2") == Some(HealthState::Up)).await?;
    let first = ask(SocketAddr::new(lo(base), port)).await?;
    for _ in 0..15 {
        assert_eq!(ask(SocketAddr::new(lo(base), port)).await?, first);
    }
    Ok(())
}

/// With `reuse_port`, two meshes (one per core in production) publish the same TCP port and
/// both answer; without it a second mesh is refused the port with a bind error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_lets_meshes_share_a_published_port() -> Result<()> {
    let base = lo_block();
    let (port, target) = (free_port(), free_port());
    let _srv = name_server(SocketAddr::new(lo(base + 1), target), "R").await?;
    let cfg = MeshConfig { reuse_port: true, ..MeshConfig::default() };
    let (m1, m2) = (Mesh::new(cfg.clone())?, Mesh::new(cfg)?);
    let mut spec = fast_spec("shared", published(lo(base), port, target));
    spec.health.check = None;
    let bs = vec![BackendSpec::new("r", lo(base + 1))];
    m1.set_service(spec.clone(), bs.clone())?;
    m2.set_service(spec.clone(), bs.clone())?;
    for m in [&m1, &m2] {
        wait_until("up", || health(m, "shared", "r") == Some(HealthState::Up)).await?;
    }
    // The kernel spreads connections by 4-tuple hash: enough of them reach both meshes.
    for _ in 0..64 {
        assert_eq!(ask(SocketAddr::new(lo(base), port)).await?, "R");
    }
    let served = |m: &Mesh| m.service_metrics("shared").map_or(0, |s| s.total());
    wait_until("both served", || served(&m1) > 0 && served(&m2) > 0).await?;
    assert!(served(&m1) + served(&m2) >= 64);
    // Without the option the port stays exclusive.
    let m3 = Mesh::new(MeshConfig::default())?;
    let err = m3.set_service(spec, bs).expect_err("port in use");
    assert!(matches!(err, Error::Bind { .. }), "{err}");
    Ok(())
}
