//! The mesh's limits on loopback: a service's open TCP connections and its UDP flows (per
//! service and per client address) are capped, what is refused is counted, and a freed slot
//! is taken again. Addresses are in 127.0.2.0/24, apart from the other loopback tests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shoal_ingress::{BackendSpec, HealthState, Mesh, MeshConfig, PortSpec, ServiceSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 2, n))
}

/// A port free for TCP and UDP on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..800 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("timed out waiting for {what}")
}

fn up(mesh: &Mesh, svc: &str, id: &str) -> bool {
    mesh.service_metrics(svc)
        .and_then(|m| m.backend(id).map(|b| b.health == HealthState::Up))
        .unwrap_or(false)
}

/// An echo server that keeps each connection open for as long as the client does.
async fn tcp_echo(addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

async fn echoes(s: &mut TcpStream, what: &[u8]) -> bool {
    let mut buf = [0u8; 64];
    let round = async {
        s.write_all(what).await.ok()?;
        let n = s.read(&mut buf).await.ok()?;
        Some(&buf[..n] == what)
    };
    tokio::time::timeout(Duration::from_secs(5), round).await.ok().flatten().unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_and_counted() -> Result<()> {
    let (port, target) = (free_port(), free_port());
    tcp_echo(SocketAddr::new(lo(2), target)).await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut p = PortSpec::tcp(port, target);
    p.listen = Some(lo(1));
    let mut spec = ServiceSpec::new("capped", vec![p]);
    spec.health.check = None;
    spec.max_connections = Some(2);
    mesh.set_service(spec, vec![BackendSpec::new("t", lo(2))])?;
    wait_until("backend up", || up(&mesh, "capped", "t")).await?;

    let front = SocketAddr::new(lo(1), port);
    let mut a = TcpStream::connect(front).await?;
    let mut b = TcpStream::connect(front).await?;
    assert!(echoes(&mut a, b"a").await && echoes(&mut b, b"b").await, "two fit");
    // The mesh resets the third at once; the reset may already be there when connect returns.
    let third_refused = match TcpStream::connect(front).await {
        Ok(mut c) => !echoes(&mut c, b"c").await,
        Err(_) => true,
    };
    assert!(third_refused, "a third connection got through");
    let refused = || mesh.service_metrics("capped").map_or(0, |m| m.refused_connections);
    assert_eq!(refused(), 1);
    let text = mesh.render_prometheus();
    assert!(text.contains("shoal_mesh_connections_refused_total{service=\"capped\"} 1"), "{text}");

    // The open ones are untouched; closing one frees its slot.
    assert!(echoes(&mut a, b"again").await);
    drop(b);
    wait_until("slot freed", || mesh.service_metrics("capped").is_some_and(|m| m.active() == 1))
        .await?;
    let mut d = TcpStream::connect(front).await?;
    assert!(echoes(&mut d, b"d").await, "a freed slot is taken again");
    assert_eq!(refused(), 1);
    Ok(())
}

async fn udp_echo(addr: SocketAddr) -> Result<()> {
    let s = UdpSocket::bind(addr).await?;
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    Ok(())
}

/// Whether a datagram from a new socket on `from` is answered through the mesh.
async fn udp_answered(from: IpAddr, to: SocketAddr) -> Result<(UdpSocket, bool)> {
    let c = UdpSocket::bind((from, 0)).await?;
    c.connect(to).await?;
    c.send(b"ping").await?;
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_millis(1500), c.recv(&mut buf)).await;
    let ok = matches!(got, Ok(Ok(4)));
    Ok((c, ok))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_are_capped_per_source_and_per_service() -> Result<()> {
    let (port, target) = (free_port(), free_port());
    udp_echo(SocketAddr::new(lo(12), target)).await?;
    let mesh = Mesh::new(MeshConfig::default())?;
    let mut p = PortSpec::udp(port, target);
    p.listen = Some(lo(11));
    let mut spec = ServiceSpec::new("flows", vec![p]);
    spec.health.check = None;
    spec.max_udp_flows = Some(3);
    spec.max_udp_flows_per_source = Some(2);
    mesh.set_service(spec, vec![BackendSpec::new("t", lo(12))])?;
    wait_until("backend up", || up(&mesh, "flows", "t")).await?;
    let front = SocketAddr::new(lo(11), port);

    // Two flows from one address; its third is dropped, another address still gets one.
    let mut keep = Vec::new();
    for _ in 0..2 {
        let (s, ok) = udp_answered(lo(13), front).await?;
        assert!(ok, "a flow within the per-source limit was dropped");
        keep.push(s);
    }
    let (_, ok) = udp_answered(lo(13), front).await?;
    assert!(!ok, "a third flow from one address got through");
    let (s, ok) = udp_answered(lo(14), front).await?;
    assert!(ok, "another address was refused");
    keep.push(s);
    // Three flows now: the service is full for every address.
    let (_, ok) = udp_answered(lo(15), front).await?;
    assert!(!ok, "a fourth flow of the service got through");

    let m = mesh.service_metrics("flows").context("metrics")?;
    assert_eq!((m.refused_flows_source, m.refused_flows_service), (1, 1));
    let text = mesh.render_prometheus();
    for limit in ["source", "service"] {
        let line =
            format!("shoal_mesh_udp_flows_refused_total{{service=\"flows\",limit=\"{limit}\"}} 1");
        assert!(text.contains(&line), "{text}");
    }
    // The open flows still work.
    for s in &keep {
        s.send(b"more").await?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await??;
        assert_eq!(&buf[..n], b"more");
    }
    Ok(())
}
