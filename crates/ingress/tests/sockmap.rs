//! The sockmap forwarder (`ForwardMode::Sockmap`) through a real mesh on loopback: the BPF
//! program is compiled with clang and loaded into this kernel. Needs root (CAP_BPF) and clang
//! with libbpf-dev (scripts/install-test-deps.sh); without them the tests say SKIPPED, and
//! under CI=true they fail instead.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_ingress::{
    BackendSpec, ForwardMode, HealthState, Mesh, MeshConfig, PortSpec, ServiceSpec, sockmap,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether the test can run here; `Err` under CI when it cannot.
fn ready(test: &str) -> Result<bool> {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (loads a BPF program)".to_owned()
    } else {
        match sockmap::compile_object().and_then(|o| sockmap::install(&o)) {
            Ok(()) => return Ok(true),
            Err(e) => format!("cannot load the sockmap program: {e}"),
        }
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    Ok(false)
}

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Distinct 127.0.0.x per test (apart from tests/loopback.rs's blocks).
fn lo_block() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(200);
    NEXT.fetch_add(4, Ordering::Relaxed)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A mesh on a current-thread runtime of its own thread, which a test can stall (block) to
/// have a client's bytes arrive before the mesh has accepted the connection.
struct MeshThread {
    mesh: Mesh,
    rt: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MeshThread {
    /// Blocks the mesh's runtime for `d`: it accepts nothing meanwhile.
    fn stall(&self, d: Duration) {
        self.rt.spawn(async move { std::thread::sleep(d) });
    }
}

impl Drop for MeshThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A mesh forwarding with the sockmap, publishing `port` on `lo(base)` to `lo(base+1):target`.
async fn mesh(base: u8, port: u16, target: u16, idle: Option<Duration>) -> Result<MeshThread> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = rt.handle().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = rt.block_on(rx);
    });
    let mesh = {
        let _g = handle.enter();
        Mesh::new(MeshConfig { forward: ForwardMode::Sockmap, ..MeshConfig::default() })?
    };
    let mut p = PortSpec::tcp(port, target);
    p.listen = Some(lo(base));
    let mut spec = ServiceSpec::new("sm", vec![p]);
    spec.health.check = None;
    spec.idle_timeout = idle;
    mesh.set_service(spec, vec![BackendSpec::new("b1", lo(base + 1))])?;
    for _ in 0..400 {
        let up = mesh
            .service_metrics("sm")
            .and_then(|m| m.backend("b1").map(|b| b.health == HealthState::Up));
        if up == Some(true) {
            return Ok(MeshThread { mesh, rt: handle, stop: Some(tx) });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("backend never came up")
}

/// Pattern byte at offset `i` of stream `seed`: any drop, duplicate or reorder shows.
fn pat(seed: u8, i: u64) -> u8 {
    ((i ^ (i >> 8) ^ (i >> 19)) as u8).wrapping_add(seed)
}

async fn send_pattern(w: &mut (impl AsyncWriteExt + Unpin), seed: u8, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pat(seed, off + k as u64);
        }
        w.write_all(&buf[..n]).await?;
        off += n as u64;
    }
    Ok(())
}

async fn check_pattern(r: &mut (impl AsyncReadExt + Unpin), seed: u8, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            if *b != pat(seed, off + k as u64) {
                bail!("stream {seed} differs at offset {}", off + k as u64);
            }
        }
        off += n as u64;
    }
    if off != len {
        bail!("stream {seed}: got {off} of {len} bytes before EOF");
    }
    Ok(())
}

/// 64 MiB each way, byte-exact, the client's FIN passed on as a half-close while the
/// backend's direction keeps flowing; the mesh's byte counters match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_is_byte_exact_both_ways_with_half_close() -> Result<()> {
    if !ready("sockmap_is_byte_exact_both_ways_with_half_close")? {
        return Ok(());
    }
    let len: u64 = 64 << 20;
    let (base, port, target) = (lo_block(), free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    let server = tokio::spawn(async move {
        let (s, _) = backend.accept().await?;
        let (mut r, mut w) = s.into_split();
        let reader = tokio::spawn(async move { check_pattern(&mut r, 1, len).await });
        send_pattern(&mut w, 2, len).await?;
        w.shutdown().await?;
        reader.await?
    });
    let mesh = mesh(base, port, target, None).await?;
    let mesh = &mesh.mesh;
    let c = TcpStream::connect((lo(base), port)).await?;
    let (mut r, mut w) = c.into_split();
    let reader = tokio::spawn(async move { check_pattern(&mut r, 2, len).await });
    send_pattern(&mut w, 1, len).await?;
    w.shutdown().await?;
    tokio::time::timeout(Duration::from_secs(120), async {
        reader.await??;
        server.await?
    })
    .await
    .context("transfer did not finish")??;
    let mut last = (0, 0, 0, 0);
    for _ in 0..400 {
        let m = mesh.service_metrics("sm").context("metrics")?;
        let b = m.backend("b1").context("b1")?;
        last = (b.bytes_in, b.bytes_out, b.total, b.errors);
        if last == (len, len, 1, 0) && m.active() == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("metrics (in, out, total, errors) = {last:?}, want ({len}, {len}, 1, 0) and none active")
}

/// Keep-alive request/response, the way wrk drives the mesh, 100 exchanges on each of 20
/// connections. On every other connection the mesh's runtime is stalled while the client
/// connects and sends its first request, so those bytes wait in the accepted socket before
/// the pair is linked and must still be redirected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_serves_keepalive_requests_sent_before_the_pair_is_linked() -> Result<()> {
    if !ready("sockmap_serves_keepalive_requests_sent_before_the_pair_is_linked")? {
        return Ok(());
    }
    let (base, port, target) = (lo_block(), free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let reply: Vec<u8> = buf[..n].iter().map(|b| b + 1).collect();
                            if s.write_all(&reply).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let mesh = mesh(base, port, target, None).await?;
    for conn in 0..20u8 {
        if conn % 2 == 1 {
            mesh.stall(Duration::from_millis(200));
            // The stall has begun once the runtime no longer answers.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = TcpStream::connect((lo(base), port)).await?;
        c.set_nodelay(true)?;
        for i in 0..100u8 {
            let req = [conn, i, 7, 9];
            c.write_all(&req).await?;
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
                .await
                .with_context(|| format!("connection {conn} request {i}: no answer"))??;
            assert_eq!(got, [conn + 1, i + 1, 8, 10], "connection {conn} request {i}");
        }
    }
    Ok(())
}

/// A connection quiet for the idle timeout is reset on both sides, as on the splice path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_idle_timeout_resets_quiet_connections() -> Result<()> {
    if !ready("sockmap_idle_timeout_resets_quiet_connections")? {
        return Ok(());
    }
    let (base, port, target) = (lo_block(), free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let _mesh = mesh(base, port, target, Some(Duration::from_millis(300))).await?;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    c.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    c.read_exact(&mut got).await?;
    assert_eq!(&got, b"ping");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .context("the quiet connection was not closed")?;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => bail!("want a reset, got {other:?} after {} bytes", rest.len()),
    }
}

/// A client that has sent its request and its FIN before the mesh accepts cannot join a
/// sockmap (its socket is no longer established): the mesh relays it the usual way, and the
/// backend still sees the request, then EOF, and the reply comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_relays_a_client_that_closed_before_the_link_the_usual_way() -> Result<()> {
    if !ready("sockmap_relays_a_client_that_closed_before_the_link_the_usual_way")? {
        return Ok(());
    }
    let (base, port, target) = (lo_block(), free_port(), free_port());
    let backend = TcpListener::bind((lo(base + 1), target)).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(format!("got {} bytes then EOF", got.len()).as_bytes()).await;
            });
        }
    });
    let mesh = mesh(base, port, target, None).await?;
    mesh.stall(Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = TcpStream::connect((lo(base), port)).await?;
    c.write_all(b"hello world").await?;
    c.shutdown().await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out)).await??;
    assert_eq!(out, "got 11 bytes then EOF");
    let m = mesh.mesh.service_metrics("sm").context("metrics")?;
    assert_eq!(m.backend("b1").map(|b| b.errors), Some(0));
    Ok(())
}
