//! Root-only: encrypted overlay networks (VXLAN inside boringtun WireGuard), the cleartext
//! guard, and interop with wireguard-go.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use shoal_netns::NetNs;
use shoal_netns::testing::require_root;
use shoal_vxlan::keys::{decode_key, encode_key};
use shoal_vxlan::wire::{VxlanPacket, VxlanRepr};
use shoal_vxlan::{
    EncryptionConfig, EndpointSpec, Mac, NetworkSpec, NodeKey, Overlay, OverlayConfig, PacketDrop,
    PeerRecord, Tables,
};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn net(p: &str, name: &str, vni: u32, third: u8, encrypted: bool) -> NetworkSpec {
    NetworkSpec {
        id: format!("{p}{name}"),
        vni,
        subnet: format!("10.{third}.0.0/24").parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, third, 0, 1),
        encrypted,
    }
}

fn enc_config(node: &Node, p: &str, key: &NodeKey) -> OverlayConfig {
    let mut c = node.config(p);
    c.encryption = Some(EncryptionConfig::new(key.clone(), node.addr));
    c
}

fn enc_peer(node: &Node, key: &NodeKey) -> PeerRecord {
    PeerRecord {
        tunnel: Some(shoal_vxlan::default_tunnel_addr(node.addr)),
        wg_public: Some(key.public()),
        ..node.peer()
    }
}

/// An Ethernet + IPv4 + UDP frame to `dst_ip:port`, as an attacker on the underlay would forge
/// it inside VXLAN.
fn forged_vxlan(vni: u32, dst_mac: Mac, src_ip: Ipv4Addr, dst_ip: Ipv4Addr, port: u16) -> Vec<u8> {
    let payload = b"forged-cleartext";
    let mut f = vec![0u8; 8 + 14 + 20 + 8 + payload.len()];
    let mut vx = VxlanPacket::new_unchecked(&mut f[..8]);
    VxlanRepr { vni }.emit(&mut vx).expect("vni");
    let eth = &mut f[8..];
    eth[..6].copy_from_slice(&dst_mac.0);
    eth[6..12].copy_from_slice(&Mac::from_ipv4(src_ip).0);
    eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ipv4 = &mut eth[14..];
    let total = (20 + 8 + payload.len()) as u16;
    ipv4[0] = 0x45;
    ipv4[2..4].copy_from_slice(&total.to_be_bytes());
    ipv4[8] = 64;
    ipv4[9] = 17;
    ipv4[12..16].copy_from_slice(&src_ip.octets());
    ipv4[16..20].copy_from_slice(&dst_ip.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([ipv4[i], ipv4[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ipv4[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut ipv4[20..];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp[8..].copy_from_slice(payload);
    f
}

/// Whether a datagram reaches `ip:port` in `task` while `send` runs.
fn forged_arrives(task: &NetNs, ip: Ipv4Addr, port: u16, send: impl Fn()) -> bool {
    let sock = task.run(|| UdpSocket::bind((ip, port))).expect("ns").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(300))).ok();
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        send();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return &buf[..n] == b"forged-cleartext";
        }
    }
    false
}

#[test]
fn encrypted_network_hides_payload_and_drops_forged_cleartext() {
    if !require_root("encrypted_network_hides_payload_and_drops_forged_cleartext") {
        return;
    }
    let mut lab = Lab::new("ve", 3);
    let p = lab.p.clone();
    let enc = net(&p, "sec", 16384 + u32::from(lab.subnet), 201, true);
    let plain = net(&p, "pln", 20480 + u32::from(lab.subnet), 202, false);
    let keys: Vec<NodeKey> = (0..2).map(|_| NodeKey::generate().expect("key")).collect();
    let rt = rt();
    rt.block_on(async {
        let mut overlays = Vec::new();
        for (n, k) in lab.nodes[..2].iter().zip(&keys) {
            overlays.push(Overlay::new(n.node_ns(), enc_config(n, &p, k)).await.expect("overlay"));
        }
        let t1 = lab.task("t1");
        let t2 = lab.task("t2");
        for (i, (o, t)) in overlays.iter().zip([&t1, &t2]).enumerate() {
            let a = o
                .attach(
                    &enc,
                    &EndpointSpec {
                        id: "e",
                        task: t,
                        ip: Ipv4Addr::new(10, 201, 0, 11 + i as u8),
                        ifname: None,
                    },
                )
                .await
                .expect("attach encrypted");
            assert_eq!(a.mtu, 1500 - 110);
            o.attach(
                &plain,
                &EndpointSpec {
                    id: "p",
                    task: t,
                    ip: Ipv4Addr::new(10, 202, 0, 11 + i as u8),
                    ifname: None,
                },
            )
            .await
            .expect("attach plain");
        }
        let mut endpoints = Vec::new();
        for i in 0..2u8 {
            let node = format!("n{}", i + 1);
            endpoints.push(remote(&enc.id, Ipv4Addr::new(10, 201, 0, 11 + i), &node));
            endpoints.push(remote(&plain.id, Ipv4Addr::new(10, 202, 0, 11 + i), &node));
        }
        let tables = Tables {
            endpoints,
            peers: lab.nodes[..2].iter().zip(&keys).map(|(n, k)| enc_peer(n, k)).collect(),
        };
        for o in &overlays {
            o.set_tables(tables.clone()).await.expect("tables");
        }
        let guard = must(&format!("ip netns exec {p}n2 nft list table inet shoal_guard"));
        // Only the encrypted network's VNI is guarded.
        assert!(guard.contains(&format!("elements = {{ {} }}", enc.vni)), "{guard}");

        let cap = lab.file("enc.pcap");
        lab.capture(&format!("{p}n2"), "udp", &cap);
        let t2ip = Ipv4Addr::new(10, 201, 0, 12);
        assert!(ping_until(&format!("{p}t1"), t2ip, 10), "encrypted ping (handshake first)");
        assert!(ping(&format!("{p}t1"), t2ip, 3));
        let marker = b"SHOAL-MARKER-7f3a9c ";
        // 64 KB writes, so the sender's kernel builds TCP GSO packets (the TUN offload path);
        // every byte must arrive intact through segmentation, encryption and coalescing.
        let chunk: Vec<u8> = marker
            .iter()
            .copied()
            .chain((0..).map(|i: u32| (i % 251) as u8))
            .take(1 << 16)
            .collect();
        let got = tcp_transfer(&t2, &t1, t2ip, 5004, &chunk, 4 << 20);
        assert_eq!(got.len(), 4 << 20);
        assert!(got.chunks(chunk.len()).all(|c| c == &chunk[..]), "payload arrived intact");
        // The receiving node batched decrypted datagrams into UDP GSO writes to its TUN (the
        // transfer above went through them intact).
        let dev = overlays[1].device_stats().expect("encryption on");
        assert!(dev.tun_gso && dev.tun_gso_writes > 0, "{dev:?}");
        assert!(dev.tun_gso_datagrams >= 2 * dev.tun_gso_writes, "{dev:?}");
        // On kernels with TUN UDP-tunnel GSO (6.17+) the sending node read whole VXLAN GSO
        // packets from its TUN and cut them itself.
        let sender = overlays[0].device_stats().expect("encryption on");
        assert!(!sender.tun_tso || sender.tun_tso_reads > 0, "{sender:?}");
        lab.stop_captures();
        let raw = std::fs::read(&cap).expect("capture file");
        assert!(raw.len() > 1 << 20, "the capture saw the transfer ({} bytes)", raw.len());
        assert!(!raw.windows(marker.len()).any(|w| w == marker), "marker visible on the underlay");
        // The plain network on the same nodes does show cleartext VXLAN (IPv6 autoconf
        // multicast, flooded); the encrypted VNI must never appear in clear.
        let vnis = must(&format!("tshark -r {cap} -Y vxlan -T fields -e vxlan.vni"));
        assert!(
            !vnis.lines().any(|l| l.trim() == enc.vni.to_string()),
            "cleartext VXLAN of the encrypted network on the wire"
        );
        let wg = must(&format!("tshark -r {cap} -d udp.port==51820,wg -Y wg -T fields -e wg.type"));
        // (The handshake itself may precede the capture: IPv6 autoconf traffic of the tasks
        // starts it as soon as the tables are in.)
        assert!(
            wg.lines().all(|l| ["1", "2", "3", "4"].contains(&l.trim())),
            "only WireGuard messages: {wg}"
        );
        assert!(wg.lines().filter(|l| l.trim() == "4").count() > 100, "transport data");

        let stats = overlays[0].peer_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].node, "n2");
        assert!(stats[0].established && stats[0].handshake_age_secs.is_some());
        assert!(stats[0].tx_bytes > 1 << 20 && stats[0].rx_packets > 10, "{stats:?}");

        // Forged cleartext VXLAN from a third host on the underlay: reaches a plain network's
        // task (the forger works), never the encrypted network's task.
        let attacker = lab.nodes[2].ns.clone();
        let n2 = lab.nodes[1].addr;
        let send = |vni: u32, third: u8| {
            let f = forged_vxlan(
                vni,
                Mac::from_ipv4(Ipv4Addr::new(10, third, 0, 12)),
                Ipv4Addr::new(10, third, 0, 11),
                Ipv4Addr::new(10, third, 0, 12),
                7777,
            );
            attacker
                .run(|| {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                    s.send_to(&f, (n2, 4789)).expect("send");
                })
                .expect("ns");
        };
        assert!(
            forged_arrives(&t2, Ipv4Addr::new(10, 202, 0, 12), 7777, || send(plain.vni, 202)),
            "control: plain VNI accepts"
        );
        assert!(
            !forged_arrives(&t2, t2ip, 7777, || send(enc.vni, 201)),
            "forged frame reached the encrypted task"
        );
        let dev = overlays[1].device_stats().expect("encryption on");
        assert!(dev.guard_dropped_cleartext >= 5, "{dev:?}");

        for o in overlays {
            o.shutdown().await.expect("shutdown");
        }
        let left = sh(&format!("ip netns exec {p}n2 nft list table inet shoal_guard")).0;
        assert!(!left, "guard table removed");
        assert!(!sh(&format!("ip -n {p}n2 link show shoal-wg")).0, "TUN removed");
    });
}

#[test]
fn wireguard_go_peer_completes_handshake() {
    if !require_root("wireguard_go_peer_completes_handshake") {
        return;
    }
    let mut lab = Lab::new("vw", 2);
    let p = lab.p.clone();
    let keyfile = lab.file("wg.key");
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let key = NodeKey::generate().expect("key");
    let theirs_text = must("wg genkey").trim().to_owned();
    let theirs = NodeKey::from_base64(&theirs_text).expect("wg genkey output parses");
    let their_pub_text = must(&format!("echo {theirs_text} | wg pubkey")).trim().to_owned();
    assert_eq!(decode_key(&their_pub_text), Ok(theirs.public()), "same X25519 as wg");
    let range = shoal_vxlan::DEFAULT_TUNNEL_PREFIX;
    let our_tunnel = shoal_vxlan::default_tunnel_addr(a.addr);
    let their_tunnel = shoal_vxlan::default_tunnel_addr(b.addr);
    std::fs::write(&keyfile, format!("{theirs_text}\n")).expect("key file");
    let bns = format!("{p}n2");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &bns, "wireguard-go", "-f", "wgx"])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("wireguard-go");
    let _wg = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh(&format!("ip -n {bns} link show wgx")).0 {
        assert!(Instant::now() < deadline, "wireguard-go did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    must(&format!(
        "ip netns exec {bns} wg set wgx private-key {keyfile} listen-port 51820 peer {} endpoint {}:51820 allowed-ips {range} && \
         ip -n {bns} addr add {their_tunnel}/{} dev wgx && ip -n {bns} link set wgx mtu 1420 up",
        encode_key(&key.public()),
        a.addr,
        range.prefix_len(),
    ));
    let vni = 24576 + u32::from(lab.subnet);
    let enc = net(&p, "wg", vni, 203, true);
    let rt = rt();
    rt.block_on(async {
        let o = Overlay::new(a.node_ns(), enc_config(a, &p, &key)).await.expect("overlay");
        assert_eq!(o.wg_public_key(), Some(key.public()));
        let t1 = lab.task("t1");
        o.attach(
            &enc,
            &EndpointSpec { id: "e", task: &t1, ip: Ipv4Addr::new(10, 203, 0, 11), ifname: None },
        )
        .await
        .expect("attach");
        o.set_tables(Tables {
            endpoints: vec![remote(&enc.id, Ipv4Addr::new(10, 203, 0, 12), "wgo")],
            peers: vec![PeerRecord {
                node: "wgo".into(),
                vtep: b.addr,
                tunnel: Some(their_tunnel),
                wg_public: Some(theirs.public()),
            }],
        })
        .await
        .expect("tables");
        // The peer's own kernel VXLAN over wireguard-go's tunnel reaches the task: the
        // encrypted network works with a WireGuard that is not shoal's.
        must(&format!(
            "ip -n {bns} link add vxg type vxlan id {vni} local {their_tunnel} remote {our_tunnel} dstport 4789 && \
             ip -n {bns} link set vxg address {} mtu 1370 up && \
             ip -n {bns} addr add 10.203.0.12/24 dev vxg && \
             ip -n {bns} neigh add 10.203.0.11 lladdr {} dev vxg nud permanent",
            Mac::from_ipv4(Ipv4Addr::new(10, 203, 0, 12)),
            // (Shoal's VXLAN devices answer ARP from their neighbour entries, as the peer's
            // agent would have them; a static one stands in for those here.)
            Mac::from_ipv4(Ipv4Addr::new(10, 203, 0, 11)),
        ));
        let task_ip = Ipv4Addr::new(10, 203, 0, 11);
        assert!(
            ping_until(&bns, task_ip, 10),
            "VXLAN through wireguard-go reaches the task: {:?}",
            o.peer_stats()
        );
        assert!(ping(&bns, task_ip, 3));
        let hs = must(&format!("ip netns exec {bns} wg show wgx latest-handshakes"));
        let ts: u64 = hs.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
        assert!(ts > 0, "wireguard-go records a handshake: {hs}");
        let stats = o.peer_stats();
        assert_eq!(stats.len(), 1);
        assert!(stats[0].established, "{stats:?}");
        assert!(stats[0].rx_packets >= 3 && stats[0].tx_packets >= 3, "{stats:?}");

        // Anything else the peer sends through the tunnel is dropped before the TUN: a UDP
        // service of the node listening on its tunnel address hears nothing, and a ping of
        // that address goes unanswered.
        let not_vxlan = |o: &Overlay| {
            o.peer_stats()[0]
                .drops
                .iter()
                .find(|(r, _)| *r == PacketDrop::NotVxlan)
                .map_or(0, |(_, n)| *n)
        };
        let before = not_vxlan(&o);
        let listener =
            a.ns.run(|| UdpSocket::bind((our_tunnel, 7777))).expect("ns").expect("bind");
        listener.set_read_timeout(Some(Duration::from_millis(300))).ok();
        let sender = lab.nodes[1]
            .ns
            .run(|| UdpSocket::bind((their_tunnel, 0)))
            .expect("ns")
            .expect("bind");
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            sender.send_to(b"not-vxlan", (our_tunnel, 7777)).expect("send into the tunnel");
            assert!(listener.recv_from(&mut buf).is_err(), "a peer's cleartext reached the host");
        }
        assert!(!ping(&bns, our_tunnel, 2), "the host answered a ping through the tunnel");
        let dropped = not_vxlan(&o) - before;
        assert!(dropped >= 7, "5 datagrams and 2 pings counted, got {dropped}: {:?}", o.peer_stats());
        // The tunnel still carries VXLAN.
        assert!(ping(&bns, task_ip, 2));
        o.shutdown().await.expect("shutdown");
    });
}

#[test]
fn encrypted_restart_keeps_tcp_alive() {
    if !require_root("encrypted_restart_keeps_tcp_alive") {
        return;
    }
    use std::io::Write;
    let lab = Lab::new("vx", 2);
    let p = lab.p.clone();
    let enc = net(&p, "sec", 28672 + u32::from(lab.subnet), 204, true);
    let keys: Vec<NodeKey> = (0..2).map(|_| NodeKey::generate().expect("key")).collect();
    let rt = rt();
    rt.block_on(async {
        let mut o1 = Overlay::new(lab.nodes[0].node_ns(), enc_config(&lab.nodes[0], &p, &keys[0]))
            .await
            .expect("overlay 1");
        let o2 = Overlay::new(lab.nodes[1].node_ns(), enc_config(&lab.nodes[1], &p, &keys[1]))
            .await
            .expect("overlay 2");
        let t1 = lab.task("t1");
        let t2 = lab.task("t2");
        let ip = |i: u8| Ipv4Addr::new(10, 204, 0, i);
        for (o, t, i) in [(&o1, &t1, 11), (&o2, &t2, 12)] {
            o.attach(&enc, &EndpointSpec { id: "e", task: t, ip: ip(i), ifname: None })
                .await
                .expect("attach");
        }
        let tables = Tables {
            endpoints: vec![remote(&enc.id, ip(11), "n1"), remote(&enc.id, ip(12), "n2")],
            peers: lab.nodes.iter().zip(&keys).map(|(n, k)| enc_peer(n, k)).collect(),
        };
        o1.set_tables(tables.clone()).await.expect("tables");
        o2.set_tables(tables.clone()).await.expect("tables");
        assert!(ping_until(&format!("{p}t1"), ip(12), 10), "encrypted overlay up");

        let (mut c, server) = counting_stream(&t2, &t1, ip(12), 5005, Duration::from_secs(30));
        c.write_all(&[1u8; 65536]).expect("before restart");

        // Restart node 1's driver: same key, the sandbox is adopted, the TUN and the WireGuard
        // session are rebuilt; TCP rides out the gap by retransmitting.
        drop(o1);
        o1 = Overlay::new(lab.nodes[0].node_ns(), enc_config(&lab.nodes[0], &p, &keys[0]))
            .await
            .expect("overlay 1 again");
        assert_eq!(o1.networks().await.len(), 1, "encrypted sandbox adopted");
        assert_eq!(o1.set_tables(tables.clone()).await.expect("tables"), 0, "entries kept");
        for _ in 0..10 {
            c.write_all(&[2u8; 65536]).expect("stream survives the restart");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(c);
        let n = server.join().expect("server").expect("no reset");
        assert_eq!(n, 11 * 65536);
        assert!(o1.peer_stats()[0].established, "new session after restart");
        o1.shutdown().await.expect("shutdown");
        o2.shutdown().await.expect("shutdown");
    });
}

#[test]
fn wireguard_runs_only_while_an_encrypted_network_is_here() {
    if !require_root("wireguard_runs_only_while_an_encrypted_network_is_here") {
        return;
    }
    let lab = Lab::new("vl", 1);
    let p = lab.p.clone();
    let node = &lab.nodes[0];
    let ns = format!("{p}n1");
    let enc = net(&p, "lzs", 36864 + u32::from(lab.subnet), 204, true);
    let plain = net(&p, "lzp", 40960 + u32::from(lab.subnet), 205, false);
    let key = NodeKey::generate().expect("key");
    let tun = || sh(&format!("ip -n {ns} -o addr show dev shoal-wg"));
    let rt = rt();
    rt.block_on(async {
        let o = Overlay::new(node.node_ns(), enc_config(node, &p, &key)).await.expect("overlay");
        assert!(!tun().0, "no TUN before any network");
        let t = lab.task("t");
        let ep = |id, third| EndpointSpec {
            id,
            task: &t,
            ip: Ipv4Addr::new(10, third, 0, 11),
            ifname: None,
        };
        o.attach(&plain, &ep("p", 205)).await.expect("attach plain");
        assert!(!tun().0, "a plain network needs no TUN");
        assert!(!o.wg_running() && o.device_stats().is_none());

        o.attach(&enc, &ep("e", 204)).await.expect("attach encrypted");
        let (up, addr) = tun();
        let want = shoal_vxlan::default_tunnel_addr(node.addr);
        assert!(up && addr.contains(&format!("{want}/4")), "TUN with the tunnel address: {addr}");
        assert!(!addr.contains("100.64."), "{addr}");
        assert!(o.wg_running());

        o.detach(&enc.id, "e").await.expect("detach encrypted");
        assert!(!tun().0, "the TUN goes with the last encrypted endpoint");
        assert!(!o.wg_running());
        assert!(!sh(&format!("ip netns exec {ns} nft list table inet shoal_guard")).0);
        assert_eq!(o.networks().await.len(), 1, "the plain network stays");

        // A second round brings it back: nothing is left half made.
        o.attach(&enc, &ep("e", 204)).await.expect("attach encrypted again");
        assert!(tun().0);
        o.shutdown().await.expect("shutdown");
        assert!(!tun().0);
    });
}

/// Sends forged cleartext VXLAN for `vni` to the task `10.<third>.0.12` on `target` from
/// `attacker` (another host on the underlay).
fn send_forged(attacker: &NetNs, target: Ipv4Addr, vni: u32, third: u8) {
    let f = forged_vxlan(
        vni,
        Mac::from_ipv4(Ipv4Addr::new(10, third, 0, 12)),
        Ipv4Addr::new(10, third, 0, 11),
        Ipv4Addr::new(10, third, 0, 12),
        7777,
    );
    attacker
        .run(|| {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.send_to(&f, (target, 4789)).expect("send");
        })
        .expect("ns");
}

#[test]
fn guard_deleted_by_hand_is_applied_again() {
    if !require_root("guard_deleted_by_hand_is_applied_again") {
        return;
    }
    let lab = Lab::new("vg", 2);
    let p = lab.p.clone();
    let ns = format!("{p}n1");
    let enc = net(&p, "grd", 45056 + u32::from(lab.subnet), 206, true);
    let key = NodeKey::generate().expect("key");
    let node = &lab.nodes[0];
    let attacker = lab.nodes[1].ns.clone();
    let rt = rt();
    rt.block_on(async {
        let o = Overlay::new(node.node_ns(), enc_config(node, &p, &key)).await.expect("overlay");
        let t = lab.task("t");
        let ip = Ipv4Addr::new(10, 206, 0, 12);
        o.attach(&enc, &EndpointSpec { id: "e", task: &t, ip, ifname: None })
            .await
            .expect("attach");
        let forged = || send_forged(&attacker, node.addr, enc.vni, 206);
        assert!(!forged_arrives(&t, ip, 7777, forged), "forged cleartext reached the task");
        let dev = o.device_stats().expect("encryption on");
        assert!(dev.guard_dropped_cleartext >= 5 && dev.guard_reapplied == 0, "{dev:?}");
        assert!(!o.check_guard().await.expect("check"), "a guard in force is left alone");

        // Someone deletes the table: the hole is real (the forger gets through) ...
        must(&format!("ip netns exec {ns} nft delete table inet shoal_guard"));
        assert!(forged_arrives(&t, ip, 7777, forged), "control: without the guard it arrives");
        // ... until the next check, which the node runs on every data-plane pass.
        assert!(o.check_guard().await.expect("check"), "the guard is applied again");
        let table = must(&format!("ip netns exec {ns} nft list table inet shoal_guard"));
        assert!(table.contains(&format!("elements = {{ {} }}", enc.vni)), "{table}");
        assert!(!forged_arrives(&t, ip, 7777, forged), "forged cleartext reached the task");
        let again = o.device_stats().expect("encryption on");
        assert_eq!(again.guard_reapplied, 1, "{again:?}");
        // What the deleted table had dropped (as of the last check) still counts.
        assert!(again.guard_dropped_cleartext >= dev.guard_dropped_cleartext + 5, "{again:?}");

        // A flushed chain (table still there, rule gone) is found too, by set_tables.
        let chain = table
            .lines()
            .find_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {"))
            .expect("the guard's chain")
            .to_owned();
        must(&format!("ip netns exec {ns} nft flush chain inet shoal_guard {chain}"));
        o.set_tables(Tables::default()).await.expect("tables");
        assert_eq!(o.device_stats().expect("encryption on").guard_reapplied, 2);
        assert!(!forged_arrives(&t, ip, 7777, forged), "forged cleartext reached the task");
        o.shutdown().await.expect("shutdown");
    });
}

#[test]
fn attach_fails_closed_when_the_guard_cannot_be_applied() {
    if !require_root("attach_fails_closed_when_the_guard_cannot_be_applied") {
        return;
    }
    use std::io::Write;
    let lab = Lab::new("vf", 1);
    let p = lab.p.clone();
    let ns = format!("{p}n1");
    let node = &lab.nodes[0];
    let enc = net(&p, "fcl", 49152 + u32::from(lab.subnet), 207, true);
    let key = NodeKey::generate().expect("key");
    // Another program owns a table of the guard's name: the kernel refuses every change to it
    // from anyone else (EPERM) for as long as that program's netlink socket is open.
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-i"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nft -i");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"add table inet shoal_guard { flags owner; }\n")
        .expect("write to nft");
    let owner = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !must(&format!("ip netns exec {ns} nft list tables")).contains("shoal_guard") {
        assert!(Instant::now() < deadline, "nft did not make the owned table");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rt = rt();
    rt.block_on(async {
        let o = Overlay::new(node.node_ns(), enc_config(node, &p, &key)).await.expect("overlay");
        let t = lab.task("t");
        let ep =
            EndpointSpec { id: "e", task: &t, ip: Ipv4Addr::new(10, 207, 0, 11), ifname: None };
        let err = o.attach(&enc, &ep).await.expect_err("attach without a guard");
        assert!(err.to_string().contains("nftables guard"), "{err}");
        // Nothing of the network was made: no sandbox, no VXLAN device, no endpoint, no TUN.
        assert!(o.networks().await.is_empty());
        let netns = must("ip netns list");
        assert!(!netns.contains(&format!("{p}ov-")), "{netns}");
        let links = must(&format!("ip -n {ns} -o link show"));
        assert!(!links.contains("vx-") && !links.contains("shoal-wg"), "{links}");
        let task_links = must(&format!("ip -n {p}t -o link show"));
        assert_eq!(task_links.lines().count(), 1, "only lo in the task: {task_links}");
        assert!(!o.wg_running());

        // Once the guard can be made, the same attach succeeds, the guard in place.
        drop(owner);
        let deadline = Instant::now() + Duration::from_secs(10);
        while must(&format!("ip netns exec {ns} nft list tables")).contains("shoal_guard") {
            assert!(Instant::now() < deadline, "the owned table outlived its owner");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        o.attach(&enc, &ep).await.expect("attach");
        let table = must(&format!("ip netns exec {ns} nft list table inet shoal_guard"));
        assert!(table.contains(&format!("elements = {{ {} }}", enc.vni)), "{table}");
        o.shutdown().await.expect("shutdown");
    });
}
