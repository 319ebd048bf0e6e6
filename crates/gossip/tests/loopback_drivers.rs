//! Two real drivers over loopback UDP/TCP (no root needed): join, replicate, watch, metrics,
//! key rotation through the handle, and refused operations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use shoal_gossip::{
    DropReason, EntryChange, EntryKey, Event, Gossip, GossipConfig, GossipError, MemberState,
    NodeId, NodeMeta,
};

fn cfg(name: &str, seeds: Vec<SocketAddr>) -> GossipConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut c = GossipConfig::new(NodeId::from_name(name), any, [3; 32]);
    c.bind = any;
    c.seeds = seeds;
    c.networks = vec!["net".into()];
    c.meta = NodeMeta { name: name.into(), ..NodeMeta::default() };
    c
}

async fn until(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < limit {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn two_drivers_replicate_watch_and_export_metrics() {
    let a = Gossip::start(cfg("a", vec![])).await.unwrap();
    let b = Gossip::start(cfg("b", vec![a.local_addr()])).await.unwrap();
    let mut events = a.subscribe();
    assert!(
        until(Duration::from_secs(10), || {
            [&a, &b].iter().all(|g| {
                g.snapshot().members.iter().filter(|m| m.state == MemberState::Alive).count() == 2
            })
        })
        .await,
        "loopback pair did not converge"
    );
    let key = EntryKey::new("endpoint_table", "net", "web.1");
    b.write(key.clone(), b"10.0.0.3".to_vec()).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Entry { key: k, change: EntryChange::Upserted { owner, value } }) =
                events.recv().await
                && k == key
            {
                return (owner, value);
            }
        }
    })
    .await
    .expect("watch stream delivered the write");
    assert_eq!(seen, (NodeId::from_name("b"), bytes::Bytes::from_static(b"10.0.0.3")));
    assert!(
        until(Duration::from_secs(2), || a.snapshot().table("endpoint_table", "net").len() == 1)
            .await
    );

    // Refused operations change nothing and say why.
    assert!(matches!(
        a.write(EntryKey::new("t", "other", "k"), b"x".to_vec()).await,
        Err(GossipError::Table(_))
    ));
    assert!(matches!(a.delete(key.clone()).await, Err(GossipError::Table(_))));
    assert!(matches!(
        a.remove_key(shoal_gossip::key_id(&[3; 32])).await,
        Err(GossipError::Keyring(_))
    ));

    // Rotation through the handles, then traffic still flows.
    for g in [&a, &b] {
        g.add_key([8; 32]).await.unwrap();
    }
    for g in [&a, &b] {
        g.make_primary(shoal_gossip::key_id(&[8; 32])).await.unwrap();
    }
    for g in [&a, &b] {
        g.remove_key(shoal_gossip::key_id(&[3; 32])).await.unwrap();
    }
    b.delete(key.clone()).await.unwrap();
    assert!(
        until(Duration::from_secs(5), || a.snapshot().table("endpoint_table", "net").is_empty())
            .await
    );

    // Prometheus text export.
    let mut reg = prometheus_client::registry::Registry::default();
    a.register_metrics(&mut reg);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(text.contains("gossip_members{state=\"alive\"} 2"), "{text}");
    assert!(text.contains("gossip_dropped_total{reason=\"unknown_key\"}"), "{text}");
    assert!(text.contains("gossip_messages_total{transport=\"udp\",direction=\"out\"}"), "{text}");
    assert!(
        until(Duration::from_secs(5), || a.metrics().counters.probe_rtt_count > 0).await,
        "no probe RTT measured: {:?}",
        a.metrics()
    );
    let m = a.metrics();
    assert!(m.counters.udp_in > 0 && m.counters.udp_out > 0, "{m:?}");
    assert!(m.counters.probe_rtt_mean().is_some_and(|d| d < Duration::from_millis(500)), "{m:?}");

    b.leave().await.unwrap();
    assert!(
        until(Duration::from_secs(3), || {
            a.snapshot()
                .members
                .iter()
                .any(|m| m.id.node == NodeId::from_name("b") && m.state == MemberState::Down)
        })
        .await,
        "graceful leave not seen"
    );
}

#[tokio::test]
async fn bad_config_is_refused_with_the_field_named() {
    let mut c = cfg("x", vec![]);
    c.core.probe_timeout = Duration::from_secs(5);
    match Gossip::start(c).await {
        Err(GossipError::Config(e)) => assert_eq!(e.field, "probe_timeout"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let mut c = cfg("y", vec![]);
    c.keys.clear();
    assert!(matches!(Gossip::start(c).await, Err(GossipError::Config(_))));
}

#[tokio::test]
async fn hostile_tcp_and_udp_input_is_dropped_and_counted() {
    use tokio::io::AsyncWriteExt;
    let a = Gossip::start(cfg("h", vec![])).await.unwrap();
    let addr = a.local_addr();
    // A TCP frame announcing more than the limit.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    // A TCP frame that is cut short.
    let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
    t.write_all(&100u32.to_be_bytes()).await.unwrap();
    t.write_all(&[1, 2, 3]).await.unwrap();
    drop(t);
    // A well-framed TCP message of garbage, and garbage over UDP.
    let mut g = tokio::net::TcpStream::connect(addr).await.unwrap();
    g.write_all(&40u32.to_be_bytes()).await.unwrap();
    g.write_all(&[0xab; 40]).await.unwrap();
    let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u.send_to(&[0xcd; 100], addr).await.unwrap();
    u.send_to(&[b'S', b'G', 1, 1, 0, 0], addr).await.unwrap();
    let ok = until(Duration::from_secs(5), || {
        let c = a.metrics().counters;
        c.dropped(DropReason::TooBig) >= 1
            && c.dropped(DropReason::Truncated) >= 2
            && c.dropped(DropReason::BadHeader) >= 2
    })
    .await;
    assert!(ok, "hostile input not counted: {:?}", a.metrics().counters);
    drop(s);
    // Still serving.
    let b = Gossip::start(cfg("i", vec![addr])).await.unwrap();
    assert!(
        until(Duration::from_secs(10), || a
            .snapshot()
            .members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .count()
            == 2)
        .await
    );
    drop(b);
}

#[tokio::test]
async fn an_entry_is_changed_only_by_its_owner_while_it_lives() {
    let a = Gossip::start(cfg("owner", vec![])).await.unwrap();
    let b = Gossip::start(cfg("other", vec![a.local_addr()])).await.unwrap();
    let key = EntryKey::new("endpoint_table", "net", "task1");
    a.write(key.clone(), b"10.0.0.5".to_vec()).await.unwrap();
    assert!(
        until(Duration::from_secs(10), || b.snapshot().table("endpoint_table", "net").len() == 1)
            .await,
        "b never saw a's entry"
    );
    // b (any holder of the key) writes over it, and deletes it: a keeps its own and counts both.
    b.write(key.clone(), b"10.0.0.66".to_vec()).await.unwrap();
    let _ = b.delete(key.clone()).await;
    let refused =
        until(Duration::from_secs(10), || a.metrics().counters.dropped(DropReason::NotOwner) >= 1)
            .await;
    assert!(refused, "{:?}", a.metrics().counters);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mine = a.snapshot().table("endpoint_table", "net");
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].1, &mine[0].2[..]), (NodeId::from_name("owner"), &b"10.0.0.5"[..]));
}

#[tokio::test]
async fn idle_connections_from_a_host_without_the_key_take_no_sync_slot() {
    let a = Gossip::start(cfg("busy", vec![])).await.unwrap();
    a.write(EntryKey::new("endpoint_table", "net", "t"), b"x".to_vec()).await.unwrap();
    // Twenty connections from another address that never send a request, held open.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(s.connect(a.local_addr()).await.unwrap());
    }
    // A member joining now still gets the table by TCP sync at once.
    let b = Gossip::start(cfg("newcomer", vec![a.local_addr()])).await.unwrap();
    let synced =
        until(Duration::from_secs(2), || b.snapshot().table("endpoint_table", "net").len() == 1)
            .await;
    assert!(synced, "the join sync waited behind idle connections: {:?}", a.metrics().counters);
    assert!(a.metrics().counters.dropped(DropReason::Rejected) >= 1, "over the per-address limit");
    drop(idle);
}

#[tokio::test]
async fn a_member_owns_at_most_max_entries_per_owner() {
    let mut small = cfg("strict", vec![]);
    small.core.max_entries_per_owner = 3;
    let a = Gossip::start(small).await.unwrap();
    let b = Gossip::start(cfg("chatty", vec![a.local_addr()])).await.unwrap();
    for i in 0..5 {
        b.write(EntryKey::new("endpoint_table", "net", &format!("k{i}")), b"v".to_vec())
            .await
            .unwrap();
    }
    let dropped = until(Duration::from_secs(10), || {
        a.metrics().counters.dropped(DropReason::TooMany) >= 2
            && a.snapshot().table("endpoint_table", "net").len() == 3
    })
    .await;
    assert!(dropped, "{:?}", a.metrics().counters);
    // Its own writes past the limit are refused with the reason.
    for i in 0..3 {
        a.write(EntryKey::new("endpoint_table", "net", &format!("a{i}")), b"v".to_vec())
            .await
            .unwrap();
    }
    let err = a.write(EntryKey::new("endpoint_table", "net", "a3"), b"v".to_vec()).await;
    assert!(
        matches!(&err, Err(GossipError::Table(shoal_gossip::TableError::TooMany { max: 3 }))),
        "{err:?}"
    );
    // Rewriting an entry it has is not a new one.
    a.write(EntryKey::new("endpoint_table", "net", "a0"), b"w".to_vec()).await.unwrap();
}
