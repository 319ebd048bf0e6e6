//! The server on loopback: real sockets, real hickory-server, raw DNS clients and `dig`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use shoal_dns::{DnsConfig, DnsService, ForwardConfig, Metrics, Scope};

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "shoal-dns-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

/// A service on 127.0.0.1:<random> with no upstream, serving `snapshot(tasks, big)`.
async fn serve(tasks: u32, big: u32) -> Result<(DnsService, SocketAddr)> {
    let config = DnsConfig {
        forward: ForwardConfig { resolv_conf: temp_path("missing"), ..ForwardConfig::default() },
        seed: Some(42),
        ..DnsConfig::default()
    };
    let dns = DnsService::start(config, Metrics::new())?;
    dns.update(snapshot(tasks, big));
    let addr = dns.attach_local("t1", "127.0.0.1:0".parse()?, Scope::new([NET])).await?;
    Ok((dns, addr))
}

#[tokio::test]
async fn udp_and_tcp_answer_services_tasks_and_standalone() -> Result<()> {
    let (dns, addr) = serve(3, 0).await?;
    for proto in ["udp", "tcp"] {
        let q = |name: &'static str| async move {
            if proto == "udp" {
                udp(addr, name, RecordType::A).await
            } else {
                tcp(addr, name, RecordType::A).await
            }
        };
        let m = q("web").await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(ips(&m), vec!["10.0.1.2".parse::<IpAddr>()?], "{proto}");
        assert_eq!(m.answers[0].ttl, 5);
        let mut t = ips(&q("tasks.web").await?);
        t.sort();
        let want: Vec<IpAddr> = ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(t, want, "{proto}");
        assert_eq!(ips(&q("MyRedis.").await?), vec!["10.0.1.250".parse::<IpAddr>()?]);
        assert_eq!(ips(&q("web.2.w1.appnet").await?), vec!["10.0.1.11".parse::<IpAddr>()?]);
        let nx = q("nothere").await?;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    }
    let aaaa = udp(addr, "web", RecordType::AAAA).await?;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty(), "AAAA of a v4-only name is NODATA");
    let ptr = udp(addr, "2.1.0.10.in-addr.arpa.", RecordType::PTR).await?;
    match ptr.answers.first().map(|r| &r.data) {
        Some(RData::PTR(p)) => assert_eq!(p.0.to_string(), "web.appnet."),
        other => panic!("expected a PTR, got {other:?}"),
    }
    dns.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_tasks_truncate_over_udp_and_come_whole_over_tcp() -> Result<()> {
    let (dns, addr) = serve(1, 60).await?;
    let m = udp(addr, "tasks.big", RecordType::A).await?;
    assert!(m.metadata.truncation, "60 A records do not fit in 512 bytes");
    assert!(m.answers.len() < 60);
    let m = tcp(addr, "tasks.big", RecordType::A).await?;
    assert!(!m.metadata.truncation);
    assert_eq!(ips(&m).len(), 60);
    let mut all = ips(&m);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 60, "every task once");
    // dnsrr name: the same 60 task IPs.
    assert_eq!(ips(&tcp(addr, "big", RecordType::A).await?).len(), 60);
    // A large EDNS buffer gets the whole answer over UDP.
    let m = udp_raw(addr, &query_bytes("tasks.big", RecordType::A, Some(4096))).await?;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
    // `dig` retries over TCP after TC and prints every address.
    let out = run(
        "dig",
        &[
            &format!("@{}", addr.ip()),
            "-p",
            &addr.port().to_string(),
            "+noedns",
            "+short",
            "+time=2",
            "+tries=1",
            "tasks.big",
        ],
    )?;
    assert_eq!(out.lines().count(), 60, "dig output:\n{out}");
    dns.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn answers_are_shuffled_between_replies() -> Result<()> {
    let (dns, addr) = serve(1, 20).await?;
    let mut orders = std::collections::HashSet::new();
    for _ in 0..5 {
        orders.insert(ips(&tcp(addr, "tasks.big", RecordType::A).await?));
    }
    assert!(orders.len() > 1, "five replies, one order: not shuffled");
    dns.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn hostile_requests_get_an_rcode_and_the_server_keeps_serving() -> Result<()> {
    let (dns, addr) = serve(2, 0).await?;

    // Header says one question, body is cut short: FORMERR.
    let mut cut = query_bytes("web", RecordType::A, None);
    cut.truncate(14);
    let m = udp_raw(addr, &cut).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // Two questions: FORMERR.
    let mut two = Message::new(7, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(Name::from_ascii("web.")?, RecordType::A));
    two.add_query(Query::query(Name::from_ascii("big.")?, RecordType::A));
    let m = udp_raw(addr, &two.to_vec()?).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // No question: FORMERR.
    let none = Message::new(8, MessageType::Query, OpCode::Query);
    let m = udp_raw(addr, &none.to_vec()?).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // Opcode STATUS: NOTIMP.
    let mut st = Message::new(9, MessageType::Query, OpCode::Status);
    st.add_query(Query::query(Name::from_ascii("web.")?, RecordType::A));
    let m = udp_raw(addr, &st.to_vec()?).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

    // CHAOS class: NOTIMP.
    let mut ch = Message::new(10, MessageType::Query, OpCode::Query);
    let mut q = Query::query(Name::from_ascii("version.bind.")?, RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    ch.add_query(q);
    let m = udp_raw(addr, &ch.to_vec()?).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

    // Zone transfer: REFUSED.
    let m = tcp(addr, "web", RecordType::AXFR).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // ANY for our name: NOERROR with its addresses.
    let m = udp(addr, "tasks.web", RecordType::ANY).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m).len(), 2);

    // Oversized junk datagram and a junk TCP stream: no crash.
    let junk: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(&junk, addr).await?;
    s.send_to(&junk[..5], addr).await?;
    if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
        use tokio::io::AsyncWriteExt;
        let _ = c.write_all(&[0xff, 0xff, 1, 2, 3]).await;
        drop(c);
    }

    // Still serving over both transports.
    assert_eq!(ips(&udp(addr, "web", RecordType::A).await?).len(), 1);
    assert_eq!(ips(&tcp(addr, "web", RecordType::A).await?).len(), 1);
    dns.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn snapshot_updates_are_seen_at_once_and_detach_closes_the_sockets() -> Result<()> {
    let (dns, addr) = serve(3, 0).await?;
    assert_eq!(ips(&udp(addr, "tasks.web", RecordType::A).await?).len(), 3);
    dns.update(snapshot(1, 0));
    assert_eq!(ips(&udp(addr, "tasks.web", RecordType::A).await?).len(), 1);

    assert!(matches!(
        dns.attach_local("t1", "127.0.0.1:0".parse()?, Scope::new([NET])).await,
        Err(shoal_dns::DnsError::AlreadyAttached(_))
    ));
    // Changing the scope to a network the task is not on hides every name.
    dns.set_scope("t1", Scope::new(["other"])).await?;
    let m = udp(addr, "web", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    dns.detach("t1").await?;
    assert!(dns.listeners().await.is_empty());
    assert!(tcp(addr, "web", RecordType::A).await.is_err(), "TCP still open");
    assert!(udp(addr, "web", RecordType::A).await.is_err(), "UDP still answers");
    Ok(())
}

#[tokio::test]
async fn dropping_the_service_closes_every_listener() -> Result<()> {
    let (dns, addr) = serve(1, 0).await?;
    let clone = dns.clone();
    drop(dns);
    // A clone keeps it serving.
    assert_eq!(ips(&udp(addr, "web", RecordType::A).await?).len(), 1);
    drop(clone);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tcp(addr, "web", RecordType::A).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "TCP still served after the service was dropped");
    }
    // The UDP socket is closed too: its port can be bound again.
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::net::UdpSocket::bind(addr).is_err() {
        assert!(Instant::now() < deadline, "UDP socket still open after the service was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn no_upstream_is_servfail_at_once_and_counted() -> Result<()> {
    let (dns, addr) = serve(1, 0).await?;
    assert!(dns.upstreams().is_empty());
    let t = Instant::now();
    let m = udp(addr, "example.com.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());

    let mut reg = prometheus_client::registry::Registry::with_prefix("shoal");
    dns.metrics().register(&mut reg);
    udp(addr, "web", RecordType::A).await?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg)?;
    assert!(text.contains(r#"shoal_dns_queries_total{qtype="A",outcome="ServFail"} 1"#), "{text}");
    assert!(text.contains(r#"shoal_dns_queries_total{qtype="A",outcome="Answer"} 1"#));
    assert!(text.contains(r#"shoal_dns_forwarded_total{result="NoUpstream"} 1"#));
    assert!(text.contains("shoal_dns_request_duration_seconds_count 2"));
    dns.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn silent_upstream_times_out_to_servfail() -> Result<()> {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let config = DnsConfig {
        forward: ForwardConfig {
            resolv_conf: temp_path("silent"),
            attempt_timeout: Duration::from_millis(300),
            ..ForwardConfig::default()
        },
        ..DnsConfig::default()
    };
    let dns = DnsService::start(config, Metrics::new())?;
    dns.set_upstreams(vec![silent.local_addr()?]);
    let addr = dns.attach_local("t", "127.0.0.1:0".parse()?, Scope::new([NET])).await?;
    let t = Instant::now();
    let m = udp(addr, "example.com.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert!(t.elapsed() < Duration::from_secs(2));
    dns.shutdown().await;
    Ok(())
}

/// A real upstream (dnsmasq on loopback, unprivileged port) answers a forwarded name; the
/// resolv.conf is re-read when it changes.
#[tokio::test]
async fn forwards_to_dnsmasq_and_follows_resolv_conf_changes() -> Result<()> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let port = probe.local_addr()?.port();
    drop(probe);
    let pid_file = temp_path("dnsmasq-pid");
    let mut args = vec![
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        "--listen-address=127.0.0.1".to_owned(),
        format!("--port={port}"),
        "--address=/ext.shoal.test/192.0.2.7".to_owned(),
        format!("--pid-file={}", pid_file.display()),
    ];
    if nix::unistd::geteuid().is_root() {
        // Keep root so the pid file stays ours to read and remove.
        args.push("--user=root".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = run("dnsmasq", &args)?;
    struct Kill(PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Ok(p) = std::fs::read_to_string(&self.0) {
                let _ = std::process::Command::new("kill").arg(p.trim()).status();
            }
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _kill = Kill(pid_file);

    let conf = temp_path("resolv");
    std::fs::write(&conf, "nameserver 127.0.0.11\n")?;
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(conf.clone());
    let config = DnsConfig {
        forward: ForwardConfig {
            resolv_conf: conf.clone(),
            poll: Duration::from_millis(100),
            ..ForwardConfig::default()
        },
        ..DnsConfig::default()
    };
    let dns = DnsService::start(config, Metrics::new())?;
    // Our own address is never an upstream.
    assert!(dns.upstreams().is_empty());
    // dnsmasq listens on a high port; resolv.conf cannot say so, so the port is set directly,
    // and a later resolv.conf change must replace it.
    dns.set_upstreams(vec![SocketAddr::new("127.0.0.1".parse()?, port)]);
    let addr = dns.attach_local("t", "127.0.0.1:0".parse()?, Scope::new([NET])).await?;
    let m = udp(addr, "ext.shoal.test.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m), vec!["192.0.2.7".parse::<IpAddr>()?]);
    let m = tcp(addr, "ext.shoal.test.", RecordType::A).await?;
    assert_eq!(ips(&m), vec!["192.0.2.7".parse::<IpAddr>()?]);

    std::fs::write(&conf, "nameserver 192.0.2.53\n")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while dns.upstreams() != vec!["192.0.2.53:53".parse::<SocketAddr>()?] {
        assert!(
            Instant::now() < deadline,
            "resolv.conf change not picked up: {:?}, file {:?}",
            dns.upstreams(),
            std::fs::read_to_string(&conf)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An emptied resolv.conf: SERVFAIL at once, no upstream traffic.
    std::fs::write(&conf, "# nothing\n")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !dns.upstreams().is_empty() {
        assert!(Instant::now() < deadline, "resolv.conf change not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = udp(addr, "ext.shoal.test.", RecordType::A).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    dns.shutdown().await;
    Ok(())
}

/// A burst the UDP loop reads in batches (`recvmmsg`) and answers together (`sendmmsg`), fast
/// path and hickory path mixed, from several client sockets: every query gets its own answer,
/// sent back to the socket that asked.
#[tokio::test]
async fn a_burst_of_queries_from_many_sockets_is_answered_one_for_one() -> Result<()> {
    let (dns, addr) = serve(3, 0).await?;
    let cases: [(&str, RecordType, ResponseCode, usize); 3] = [
        ("web", RecordType::A, ResponseCode::NoError, 1),
        ("nothere", RecordType::A, ResponseCode::NXDomain, 0),
        ("web", RecordType::AAAA, ResponseCode::NoError, 0),
    ];
    let mut socks = Vec::new();
    for _ in 0..4 {
        socks.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    }
    // Socket s sends 50 queries with ids s*1000 + i, all before reading anything.
    for (s, sock) in socks.iter().enumerate() {
        for i in 0..50u16 {
            let (name, t, _, _) = cases[usize::from(i) % cases.len()];
            let mut q = query_bytes(name, t, None);
            q[..2].copy_from_slice(&(s as u16 * 1000 + i).to_be_bytes());
            sock.send_to(&q, addr).await?;
        }
    }
    for (s, sock) in socks.iter().enumerate() {
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = [0u8; 1500];
        while seen.len() < 50 {
            let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await??;
            let m = Message::from_vec(&buf[..n])?;
            let i = m.metadata.id.checked_sub(s as u16 * 1000).expect("an id this socket sent");
            assert!(i < 50 && seen.insert(i), "one answer per query, to its socket");
            let (name, t, code, answers) = cases[usize::from(i) % cases.len()];
            assert_eq!(m.queries[0].name().to_string(), format!("{name}."));
            assert_eq!(m.queries[0].query_type(), t);
            assert_eq!(m.metadata.response_code, code, "{name} {t}");
            assert_eq!(m.answers.len(), answers, "{name} {t}");
        }
    }
    dns.shutdown().await;
    Ok(())
}
