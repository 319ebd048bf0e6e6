//! Root-only: plain overlay networks across nodes built as namespaces.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use shoal_netns::NetNs;
use shoal_netns::testing::require_root;
use shoal_vxlan::{EndpointSpec, Mac, NetworkSpec, Overlay, Tables};

fn spec(p: &str, vni: u32) -> NetworkSpec {
    NetworkSpec {
        id: format!("{p}net"),
        vni,
        subnet: "10.200.0.0/24".parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, 200, 0, 1),
        encrypted: false,
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, last)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn plain_network_across_three_nodes() {
    if !require_root("plain_network_across_three_nodes") {
        return;
    }
    let mut lab = Lab::new("vp", 3);
    let p = lab.p.clone();
    let vni = 4096 + u32::from(lab.subnet);
    let net = spec(&p, vni);
    let rt = rt();
    rt.block_on(async {
        let mut overlays = Vec::new();
        for n in &lab.nodes {
            overlays.push(Overlay::new(n.node_ns(), n.config(&p)).await.expect("overlay"));
        }
        assert_eq!(overlays[0].underlay_mtu(), 1500, "detected from eth0");
        let tasks: Vec<NetNs> = (1..=3).map(|i| lab.task(&format!("t{i}"))).collect();
        for (i, (o, t)) in overlays.iter().zip(&tasks).enumerate() {
            let a = o
                .attach(
                    &net,
                    &EndpointSpec {
                        id: &format!("ep{i}"),
                        task: t,
                        ip: ip(11 + i as u8),
                        ifname: None,
                    },
                )
                .await
                .expect("attach");
            assert_eq!(a.ifname, "eth0");
            assert_eq!(a.mtu, 1450);
            assert!(a.default_route);
            assert_eq!(a.mac, Mac::from_ipv4(ip(11 + i as u8)));
        }
        // Attaching the same endpoint again changes nothing.
        let again = overlays[0]
            .attach(&net, &EndpointSpec { id: "ep0", task: &tasks[0], ip: ip(11), ifname: None })
            .await
            .expect("idempotent attach");
        assert_eq!(again.ifname, "eth0");

        let tables = Tables {
            endpoints: (0..3)
                .map(|i| remote(&net.id, ip(11 + i as u8), &format!("n{}", i + 1)))
                .collect(),
            peers: lab.nodes.iter().map(|n| n.peer()).collect(),
        };
        for o in &overlays {
            let n = o.set_tables(tables.clone()).await.expect("set tables");
            // Two remote endpoints: fdb, neighbour and flood each on the VXLAN device, and a
            // permanent neighbour entry each in the node's one local endpoint.
            assert_eq!(n, 2 + 2 + 2 + 2, "fdb, neighbour, flood and endpoint neighbour per remote");
            assert_eq!(o.set_tables(tables.clone()).await.expect("again"), 0, "no-op");
        }

        // The kernel objects are what the contract says.
        let sb = format!("{p}n1-ov-{vni:06x}");
        let d = must(&format!("ip -n {sb} -d link show vx-{vni:06x}"));
        assert!(d.contains(&format!("vxlan id {vni}")), "{d}");
        assert!(d.contains("dstport 4789"), "{d}");
        assert!(d.contains("nolearning"), "{d}");
        assert!(d.contains("mtu 1450"), "{d}");
        let t = must(&format!("ip -n {p}t1 -d link show eth0"));
        assert!(t.contains("02:42:0a:c8:00:0b") && t.contains("mtu 1450"), "{t}");
        // The endpoint is a macvlan straight on the VXLAN device (no bridge, no veth), and the
        // sandbox's gateway interface holds the gateway address.
        assert!(t.contains("macvlan mode bridge"), "{t}");
        assert!(t.contains(&format!("alias shoal-ep {sb} ep0")), "{t}");
        let gw = must(&format!("ip -n {sb} -d addr show gw0"));
        assert!(gw.contains("10.200.0.1/24") && gw.contains("macvlan"), "{gw}");
        let fdb = must(&format!("bridge -n {sb} fdb show dev vx-{vni:06x}"));
        assert!(fdb.contains(&format!("02:42:0a:c8:00:0c dst {}", lab.nodes[1].addr)), "{fdb}");
        assert!(fdb.contains(&format!("00:00:00:00:00:00 dst {}", lab.nodes[2].addr)), "{fdb}");
        let neigh = must(&format!("ip -n {sb} neigh show dev vx-{vni:06x}"));
        assert!(neigh.contains("10.200.0.13 lladdr 02:42:0a:c8:00:0d PERMANENT"), "{neigh}");

        let cap = lab.file("plain.pcap");
        lab.capture(&format!("{p}n2"), "udp", &cap);
        assert!(ping(&format!("{p}t1"), ip(12), 3), "t1 -> t2");
        assert!(ping(&format!("{p}t1"), ip(13), 3), "t1 -> t3");
        assert!(ping(&format!("{p}t3"), ip(12), 3), "t3 -> t2");
        let got = tcp_transfer(&tasks[1], &tasks[0], ip(12), 5001, b"overlay-tcp-check ", 2 << 20);
        assert_eq!(got.len(), 2 << 20);
        assert!(got.starts_with(b"overlay-tcp-check "));
        lab.stop_captures();
        let fields =
            must(&format!("tshark -r {cap} -Y vxlan -T fields -e udp.dstport -e vxlan.vni"));
        let lines: Vec<&str> = fields.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() > 100, "VXLAN packets seen: {}", lines.len());
        for l in &lines {
            assert_eq!(
                l.split_whitespace().collect::<Vec<_>>(),
                ["4789", &vni.to_string()],
                "every VXLAN packet on 4789 with the network's VNI"
            );
        }

        // Withdrawal: n3's endpoint leaves the table; n1 and n2 drop its entries in < 2 s.
        let mut t2 = tables.clone();
        t2.endpoints.retain(|e| e.node != "n3");
        let start = Instant::now();
        for o in &overlays[..2] {
            o.set_tables(t2.clone()).await.expect("set tables");
        }
        for node in ["n1", "n2"] {
            let sb = format!("{p}{node}-ov-{vni:06x}");
            loop {
                // Only the device's own (static, "dst") entries; the bridge's learned
                // "master br0" entries age out on their own.
                let fdb: String = must(&format!("bridge -n {sb} fdb show dev vx-{vni:06x}"))
                    .lines()
                    .filter(|l| l.contains(" dst "))
                    .collect();
                let neigh = must(&format!("ip -n {sb} neigh show dev vx-{vni:06x}"));
                if !fdb.contains("02:42:0a:c8:00:0d")
                    && !fdb.contains(&lab.nodes[2].addr.to_string())
                    && !neigh.contains("10.200.0.13")
                {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(2), "not withdrawn: {fdb}{neigh}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(!ping(&format!("{p}t1"), ip(13), 1), "withdrawn endpoint unreachable");
        assert!(ping(&format!("{p}t1"), ip(12), 1), "others unaffected");

        // Detaching the last endpoint removes the sandbox and the task's interface.
        overlays[2].detach(&net.id, "ep2").await.expect("detach");
        assert!(!NetNs::exists(&format!("{p}n3-ov-{vni:06x}")));
        assert!(!sh(&format!("ip -n {p}t3 link show eth0")).0);
        assert!(overlays[2].detach(&net.id, "ep2").await.is_err(), "unknown endpoint");

        for o in overlays {
            o.shutdown().await.expect("shutdown");
        }
        assert!(
            NetNs::list()
                .iter()
                .all(|n| !n.contains(&format!("{p}n1-ov")) && !n.contains(&format!("{p}n2-ov"))),
            "sandboxes removed"
        );
    });
}

#[test]
fn hand_configured_kernel_vxlan_interoperates() {
    if !require_root("hand_configured_kernel_vxlan_interoperates") {
        return;
    }
    let lab = Lab::new("vk", 2);
    let p = lab.p.clone();
    let vni = 8192 + u32::from(lab.subnet);
    let net = spec(&p, vni);
    let (a, k) = (&lab.nodes[0], &lab.nodes[1]);
    // The "kernel" node: iproute2 only, no shoal; VNI, MAC, FDB and the static neighbour entry
    // given by hand, the way an overlay driver (Docker's too) programs a VTEP. Static neighbours
    // are needed because shoal's VXLAN devices answer ARP locally (proxy) and never forward it.
    let kns = format!("{p}n2");
    must(&format!(
        "ip -n {kns} link add vxk type vxlan id {vni} dstport 4789 local {} nolearning && \
         ip -n {kns} link set vxk address 02:42:0a:c8:00:63 mtu 1450 && \
         ip -n {kns} addr add 10.200.0.99/24 dev vxk && ip -n {kns} link set vxk up && \
         bridge -n {kns} fdb append 00:00:00:00:00:00 dev vxk dst {} && \
         bridge -n {kns} fdb add 02:42:0a:c8:00:0b dev vxk dst {} self permanent && \
         ip -n {kns} neigh add 10.200.0.11 lladdr 02:42:0a:c8:00:0b dev vxk nud permanent",
        k.addr, a.addr, a.addr
    ));
    let rt = rt();
    rt.block_on(async {
        let o = Overlay::new(a.node_ns(), a.config(&p)).await.expect("overlay");
        let t1 = lab.task("t1");
        o.attach(&net, &EndpointSpec { id: "ep1", task: &t1, ip: ip(11), ifname: Some("eth7") })
            .await
            .expect("attach");
        o.set_tables(Tables {
            endpoints: vec![remote(&net.id, ip(99), "k")],
            peers: vec![shoal_vxlan::PeerRecord { node: "k".into(), ..k.peer() }],
        })
        .await
        .expect("tables");
        assert!(ping_until(&format!("{p}t1"), ip(99), 5), "shoal task -> kernel VTEP");
        assert!(ping(&kns, ip(11), 3), "kernel VTEP -> shoal task");
        let k_ns = NetNs::open(&kns).expect("kernel ns");
        let got = tcp_transfer(&t1, &k_ns, ip(11), 5002, b"rfc7348 ", 256 << 10);
        assert_eq!(got.len(), 256 << 10);
        o.shutdown().await.expect("shutdown");
    });
}

#[test]
fn restart_adopts_sandboxes_and_keeps_tcp_alive() {
    if !require_root("restart_adopts_sandboxes_and_keeps_tcp_alive") {
        return;
    }
    use std::io::Write;
    let lab = Lab::new("vr", 2);
    let p = lab.p.clone();
    let vni = 12288 + u32::from(lab.subnet);
    let net = spec(&p, vni);
    let rt = rt();
    // A stale sandbox from a crashed agent: this node's prefix, no endpoint left.
    let stale = format!("{p}n1-ov-00ffff");
    NetNs::create(&stale).expect("stale sandbox");
    rt.block_on(async {
        let mut o1 =
            Overlay::new(lab.nodes[0].node_ns(), lab.nodes[0].config(&p)).await.expect("overlay 1");
        assert!(!NetNs::exists(&stale), "stale sandbox cleaned at start");
        let o2 =
            Overlay::new(lab.nodes[1].node_ns(), lab.nodes[1].config(&p)).await.expect("overlay 2");
        let t1 = lab.task("t1");
        let t2 = lab.task("t2");
        for (o, t, i, id) in [(&o1, &t1, 11, "a"), (&o2, &t2, 12, "b")] {
            o.attach(&net, &EndpointSpec { id, task: t, ip: ip(i), ifname: None })
                .await
                .expect("attach");
        }
        let tables = Tables {
            endpoints: vec![remote(&net.id, ip(11), "n1"), remote(&net.id, ip(12), "n2")],
            peers: lab.nodes.iter().map(|n| n.peer()).collect(),
        };
        o1.set_tables(tables.clone()).await.expect("tables");
        o2.set_tables(tables.clone()).await.expect("tables");

        let (mut c, server) = counting_stream(&t2, &t1, ip(12), 5003, Duration::from_secs(20));
        c.write_all(&[1u8; 65536]).expect("before restart");

        // Agent restart: the driver goes away without tearing down, a new one adopts.
        drop(o1);
        o1 = Overlay::new(lab.nodes[0].node_ns(), lab.nodes[0].config(&p))
            .await
            .expect("overlay 1 again");
        let nets = o1.networks().await;
        assert_eq!(nets.len(), 1, "adopted");
        assert_eq!(nets[0].spec, net);
        assert_eq!(nets[0].endpoints, ["a"]);
        let written = o1.set_tables(tables.clone()).await.expect("tables again");
        assert_eq!(written, 0, "the adopted sandbox already holds every entry: nothing rewritten");
        for _ in 0..20 {
            c.write_all(&[2u8; 65536]).expect("stream survives the restart");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(c);
        let n = server.join().expect("server").expect("no reset");
        assert_eq!(n, 21 * 65536);
        // The adopted endpoint can be detached by id.
        o1.detach(&net.id, "a").await.expect("detach adopted");
        assert!(!NetNs::exists(&format!("{p}n1-ov-{vni:06x}")));
        o1.shutdown().await.expect("shutdown");
        o2.shutdown().await.expect("shutdown");
    });
}
