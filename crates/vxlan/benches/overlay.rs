//! Side-by-side overlay throughput, one run, two nodes in namespaces (root only):
//! underlay, raw kernel VXLAN set up by hand, shoal plain overlay, wireguard-go, shoal encrypted
//! overlay. iperf3 TCP, `DUR` seconds each (default 5), `ROUNDS` rounds (default 3; the order
//! rotates per round). Prints Gbit/s per round, the ratios of shoal to its peers, and
//! user+system CPU seconds per Gbit of the userspace WireGuard implementations (wireguard-go's
//! two processes; shoal's data-path threads, i.e. this process, which includes the kernel
//! receive path its TUN writes run inline; softirq work that lands in other contexts is counted
//! for neither). Ends with the median and the spread (min–max) of each ratio over the rounds:
//! on a shared 2-vCPU box the absolute figures swing with other load, the same-round ratios
//! much less.
//!
//! Run: `ROUNDS=5 cargo bench -p shoal-vxlan --bench overlay`. For the suite
//! (`cargo bench -p shoal --bench system`): `-- --quick` (2 s per test, one round, unless
//! `DUR`/`ROUNDS` say otherwise), `--rounds N`, and `--out PATH`, which writes the medians as
//! shoal-vs-peer rows (benches/common's JSON report); without wireguard-go (or `wg`) those rows
//! say "peer not installed". Every system runs once for 1 s before the recorded rounds
//! (warm-up; `WARMUP=0` skips it).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../../benches/common/mod.rs"]
mod suite;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shoal_vxlan::keys::encode_key;
use shoal_vxlan::{
    EncryptionConfig, EndpointSpec, NetworkSpec, NodeKey, Overlay, PeerRecord, Tables,
};

fn iperf(client_ns: &str, server_ns: &str, ip: Ipv4Addr, dur: u64) -> f64 {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", &ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(500));
    let out = must(&format!("ip netns exec {client_ns} iperf3 -c {ip} -t {dur} -J"));
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 json");
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
}

fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// User+system CPU seconds of this process's threads named `name` (the data-path threads of
/// both nodes).
fn threads_cpu(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| {
            let s = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let after = s.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            ticks / 100.0
        })
        .sum()
}

fn self_cpu() -> f64 {
    let u =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("rusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// Says why the bench cannot run and, when `--out` asks for a report, writes one that holds a
/// failed row saying so.
fn skipped(opts: &suite::Options, why: &str) {
    eprintln!("overlay bench skipped: {why}");
    if opts.out_given {
        let rows = vec![suite::Row::failed("overlay benchmark", "-", "wireguard-go", why)];
        let report =
            suite::Report::new("overlay", opts.quick, 0, suite::Conditions::detect(), rows);
        if let Err(e) = report.write_json(&opts.out) {
            eprintln!("writing {}: {e:#}", opts.out.display());
        }
    }
}

fn main() {
    let opts = suite::Options::from_args("overlay", 3, 1);
    if !nix::unistd::geteuid().is_root() {
        skipped(&opts, "needs root (network namespaces)");
        return;
    }
    if !suite::have("iperf3") {
        skipped(&opts, "the load generator iperf3 is not installed");
        return;
    }
    let wg_ok = suite::have("wireguard-go") && suite::have("wg");
    let dur: u64 = suite::env_or("DUR", if opts.quick { 2 } else { 5 });
    let rounds = opts.rounds_or_env() as u32;
    let warmup: u32 = suite::env_or("WARMUP", 1);
    let lab = Lab::new("vb", 2);
    let p = lab.p.clone();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (n1, n2) = (format!("{p}n1"), format!("{p}n2"));

    // Raw kernel VXLAN, static FDB, no learning (the baseline script's setup).
    must(&format!(
        "ip -n {n1} link add vx42 type vxlan id 42 dstport 4789 local {a} nolearning && \
         ip -n {n2} link add vx42 type vxlan id 42 dstport 4789 local {b} nolearning && \
         bridge -n {n1} fdb append 00:00:00:00:00:00 dev vx42 dst {b} && \
         bridge -n {n2} fdb append 00:00:00:00:00:00 dev vx42 dst {a} && \
         ip -n {n1} addr add 10.42.0.1/24 dev vx42 && ip -n {n1} link set vx42 mtu 1450 up && \
         ip -n {n2} addr add 10.42.0.2/24 dev vx42 && ip -n {n2} link set vx42 mtu 1450 up",
        a = a.addr,
        b = b.addr
    ));

    // wireguard-go between the same two nodes.
    let (k1, k2) = (NodeKey::generate().expect("key"), NodeKey::generate().expect("key"));
    let mut wg_pids = Vec::new();
    if wg_ok {
        for (ns, dev) in [(&n1, "wgb1"), (&n2, "wgb2")] {
            let c = Command::new("ip")
                .args(["netns", "exec", ns, "wireguard-go", "-f", dev])
                .env("WG_PROCESS_FOREGROUND", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("wireguard-go");
            wg_pids.push(c.id());
            std::mem::forget(c); // killed with its namespace by the lab guard
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(sh(&format!("ip -n {n1} link show wgb1")).0
            && sh(&format!("ip -n {n2} link show wgb2")).0)
        {
            assert!(Instant::now() < deadline, "wireguard-go did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        for (ns, dev, me, peer, peer_addr, my_ip) in [
            (&n1, "wgb1", &k1, &k2, b.addr, "192.168.250.1"),
            (&n2, "wgb2", &k2, &k1, a.addr, "192.168.250.2"),
        ] {
            must(&format!(
                "ip netns exec {ns} sh -c 'wg set {dev} private-key /dev/stdin listen-port 51999 peer {} endpoint {peer_addr}:51999 allowed-ips 192.168.250.0/24 <<EOF\n{}\nEOF' && \
                 ip -n {ns} addr add {my_ip}/24 dev {dev} && ip -n {ns} link set {dev} mtu 1420 up",
                encode_key(&peer.public()),
                encode_key(&me.to_bytes())
            ));
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let keys = [NodeKey::generate().expect("key"), NodeKey::generate().expect("key")];
    let plain = NetworkSpec {
        id: format!("{p}plain"),
        vni: 4100,
        subnet: "10.210.0.0/24".parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, 210, 0, 1),
        encrypted: false,
    };
    let secure = NetworkSpec {
        id: format!("{p}sec"),
        vni: 4101,
        subnet: "10.211.0.0/24".parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, 211, 0, 1),
        encrypted: true,
    };
    let overlays: Vec<Overlay> = rt.block_on(async {
        let mut v = Vec::new();
        for (n, k) in lab.nodes.iter().zip(&keys) {
            let mut c = n.config(&p);
            c.encryption = Some(EncryptionConfig::new(k.clone(), n.addr));
            v.push(Overlay::new(n.node_ns(), c).await.expect("overlay"));
        }
        v
    });
    let tasks: Vec<_> = (1..=2).map(|i| lab.task(&format!("t{i}"))).collect();
    rt.block_on(async {
        for (i, (o, t)) in overlays.iter().zip(&tasks).enumerate() {
            for (net, third) in [(&plain, 210u8), (&secure, 211u8)] {
                o.attach(
                    net,
                    &EndpointSpec {
                        id: "e",
                        task: t,
                        ip: Ipv4Addr::new(10, third, 0, 11 + i as u8),
                        ifname: None,
                    },
                )
                .await
                .expect("attach");
            }
        }
        let mut endpoints = Vec::new();
        for i in 0..2u8 {
            let node = format!("n{}", i + 1);
            endpoints.push(remote(&plain.id, Ipv4Addr::new(10, 210, 0, 11 + i), &node));
            endpoints.push(remote(&secure.id, Ipv4Addr::new(10, 211, 0, 11 + i), &node));
        }
        let peers: Vec<PeerRecord> = lab
            .nodes
            .iter()
            .zip(&keys)
            .map(|(n, k)| PeerRecord {
                tunnel: Some(shoal_vxlan::default_tunnel_addr(n.addr)),
                wg_public: Some(k.public()),
                ..n.peer()
            })
            .collect();
        for o in &overlays {
            o.set_tables(Tables { endpoints: endpoints.clone(), peers: peers.clone() })
                .await
                .expect("tables");
        }
    });
    let (t1, t2) = (format!("{p}t1"), format!("{p}t2"));
    assert!(ping_until(&t1, Ipv4Addr::new(10, 211, 0, 12), 10), "encrypted overlay up");
    if wg_ok {
        assert!(ping_until(&n1, Ipv4Addr::new(192, 168, 250, 2), 10), "wireguard-go up");
    }

    println!("overlay throughput, iperf3 TCP {dur}s each, Gbit/s (2 vCPU box, both ends on it)");
    let mut table: Vec<[f64; 6]> = Vec::new();
    // Per recorded round: underlay, kernel VXLAN, shoal plain, wireguard-go, shoal encrypted,
    // CPU s per Gbit of wireguard-go and of shoal encrypted.
    let mut raw: Vec<[f64; 7]> = Vec::new();
    for w in 0..warmup {
        println!("warm-up pass {} (1 s each, not recorded)", w + 1);
        let _ = iperf(&n1, &n2, b.addr, 1);
        let _ = iperf(&n1, &n2, Ipv4Addr::new(10, 42, 0, 2), 1);
        let _ = iperf(&t1, &t2, Ipv4Addr::new(10, 210, 0, 12), 1);
        if wg_ok {
            let _ = iperf(&n1, &n2, Ipv4Addr::new(192, 168, 250, 2), 1);
        }
        let _ = iperf(&t1, &t2, Ipv4Addr::new(10, 211, 0, 12), 1);
    }
    // One system's run: Gbit/s, and for the userspace WireGuard ones the CPU seconds spent
    // (wireguard-go's processes; shoal's process, and its tx and rx data-path threads).
    let run = |which: usize| -> [f64; 4] {
        let nan = f64::NAN;
        match which {
            0 => [iperf(&n1, &n2, b.addr, dur), nan, nan, nan],
            1 => [iperf(&n1, &n2, Ipv4Addr::new(10, 42, 0, 2), dur), nan, nan, nan],
            2 => [iperf(&t1, &t2, Ipv4Addr::new(10, 210, 0, 12), dur), nan, nan, nan],
            3 if wg_ok => {
                let cpu0: f64 = wg_pids.iter().map(|p| proc_cpu(*p)).sum();
                let rate = iperf(&n1, &n2, Ipv4Addr::new(192, 168, 250, 2), dur);
                [rate, wg_pids.iter().map(|p| proc_cpu(*p)).sum::<f64>() - cpu0, nan, nan]
            }
            3 => [nan; 4],
            _ => {
                let our0 = self_cpu();
                let (tx0, rx0) = (threads_cpu("shoal-wg-tx"), threads_cpu("shoal-wg-rx"));
                let rate = iperf(&t1, &t2, Ipv4Addr::new(10, 211, 0, 12), dur);
                [
                    rate,
                    self_cpu() - our0,
                    threads_cpu("shoal-wg-tx") - tx0,
                    threads_cpu("shoal-wg-rx") - rx0,
                ]
            }
        }
    };
    for round in 1..=rounds {
        // Rotate the order each round so no system always runs first or last.
        let mut r = [[f64::NAN; 4]; 5];
        for k in 0..5 {
            let which = (k + round as usize - 1) % 5;
            r[which] = run(which);
        }
        let (underlay, vxlan, shoal_plain) = (r[0][0], r[1][0], r[2][0]);
        let (wggo, wg_cpu) = (r[3][0], r[3][1]);
        let (shoal_enc, our_cpu, tx_cpu, rx_cpu) = (r[4][0], r[4][1], r[4][2], r[4][3]);
        let gbits = |rate: f64| rate * dur as f64;
        println!(
            "round {round}: underlay={underlay:.2} kernel-vxlan={vxlan:.2} shoal-plain={shoal_plain:.2} wireguard-go={wggo:.2} shoal-encrypted={shoal_enc:.2}"
        );
        println!(
            "round {round}: shoal-plain/kernel-vxlan={:.2} (goal >= 0.95)  shoal-encrypted/wireguard-go={:.2} (goal >= 4)  shoal-encrypted/shoal-plain={:.2}",
            shoal_plain / vxlan.max(1e-9),
            shoal_enc / wggo.max(1e-9),
            shoal_enc / shoal_plain.max(1e-9)
        );
        println!(
            "round {round}: CPU s (user+sys) per Gbit: wireguard-go={:.2} shoal-encrypted={:.2}",
            wg_cpu / gbits(wggo).max(1e-9),
            our_cpu / gbits(shoal_enc).max(1e-9)
        );
        println!(
            "round {round}: shoal data-path threads CPU s per Gbit: tx (read TUN, encrypt, send)={:.2} rx (receive, decrypt, write TUN + inline receive path)={:.2}",
            tx_cpu / gbits(shoal_enc).max(1e-9),
            rx_cpu / gbits(shoal_enc).max(1e-9)
        );
        table.push([
            shoal_plain / vxlan.max(1e-9),
            shoal_enc / wggo.max(1e-9),
            shoal_enc / shoal_plain.max(1e-9),
            shoal_enc / vxlan.max(1e-9),
            wg_cpu / gbits(wggo).max(1e-9),
            our_cpu / gbits(shoal_enc).max(1e-9),
        ]);
        let per_gbit = |cpu: f64, rate: f64| if rate > 0.0 { cpu / gbits(rate) } else { f64::NAN };
        raw.push([
            underlay,
            vxlan,
            shoal_plain,
            wggo,
            shoal_enc,
            per_gbit(wg_cpu, wggo),
            per_gbit(our_cpu, shoal_enc),
        ]);
    }
    if opts.out_given {
        let col = |i: usize| -> Vec<f64> { raw.iter().map(|r| r[i]).collect() };
        let mut cond = suite::Conditions::detect();
        cond.peer("wireguard-go", "wireguard-go", &["--version"]);
        cond.peer("kernel VXLAN", "ip", &["-V"]);
        cond.tool("iperf3", "iperf3", &["--version"]);
        cond.pinning =
            "none: both ends, the encryption threads and iperf3 share every CPU".to_owned();
        cond.notes.push(format!(
            "two node namespaces on a bridge; iperf3 TCP, one stream, {dur} s per test, {rounds} rounds in rotating order after {warmup} warm-up pass(es)"
        ));
        cond.notes.push(
            "kernel VXLAN set up by hand (static FDB, no learning, MTU 1450); wireguard-go MTU 1420; shoal's overlays between two task namespaces, one per node".to_owned(),
        );
        cond.notes.push(
            "CPU per Gbit: wireguard-go's two processes; shoal's whole bench process (both nodes' data paths, which includes the kernel receive path its TUN writes run inline)".to_owned(),
        );
        let wg = wg_ok.then(|| col(3));
        let how = "iperf3, one TCP stream, task to task across two nodes";
        let rows = vec![
            suite::Row::new(
                "TCP throughput, plain overlay",
                "Gbit/s",
                false,
                &col(2),
                "kernel VXLAN (by hand)",
                Some(&col(1)),
                how,
            ),
            suite::Row::new(
                "TCP throughput, plain overlay",
                "Gbit/s",
                false,
                &col(2),
                "underlay (no overlay)",
                Some(&col(0)),
                how,
            ),
            suite::Row::new(
                "TCP throughput, encrypted overlay",
                "Gbit/s",
                false,
                &col(4),
                "wireguard-go",
                wg.as_deref(),
                how,
            ),
            suite::Row::new(
                "CPU per Gbit, encrypted overlay",
                "CPU s/Gbit",
                true,
                &col(6),
                "wireguard-go",
                wg_ok.then(|| col(5)).as_deref(),
                "user+system CPU of the userspace WireGuard implementations while iperf3 runs",
            ),
        ];
        let report = suite::Report::new("overlay", opts.quick, rounds as usize, cond, rows);
        report.print();
        if let Err(e) = report.write_json(&opts.out) {
            eprintln!("writing {}: {e:#}", opts.out.display());
        }
    }
    println!("summary over {} rounds: median (min-max)", table.len());
    for (i, name) in [
        "shoal-plain/kernel-vxlan (goal >= 0.95)",
        "shoal-encrypted/wireguard-go (goal >= 4)",
        "shoal-encrypted/shoal-plain",
        "shoal-encrypted/kernel-vxlan",
        "wireguard-go CPU s per Gbit",
        "shoal-encrypted CPU s per Gbit",
    ]
    .iter()
    .enumerate()
    {
        let mut v: Vec<f64> = table.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        println!(
            "  {name}: {median:.2} ({:.2}-{:.2})",
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    for (o, ns) in overlays.iter().zip([&n1, &n2]) {
        println!("{ns}: peers {}", serde_json::to_string(&o.peer_stats()).unwrap_or_default());
        println!("{ns}: device {:?}", o.device_stats());
        println!("{}", sh(&format!("ip -n {ns} -s link show shoal-wg")).1);
        println!("{}", sh(&format!("ip netns exec {ns} ss -uamn sport = :51820")).1);
        println!(
            "{}",
            sh(&format!(
                "ip netns exec {ns} nstat -az UdpRcvbufErrors UdpSndbufErrors UdpInErrors"
            ))
            .1
        );
    }
    rt.block_on(async {
        for o in overlays {
            let _ = o.shutdown().await;
        }
    });
}
