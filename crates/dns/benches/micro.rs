//! Micro-benchmarks of the DNS answer path (criterion): a lookup in the snapshot (hit, miss
//! inside a network, name that is not ours), the UDP fast path end to end (parse the query,
//! look it up, write the answer into a reused buffer), and building the snapshot of 1,000
//! services. `cargo bench -p shoal-dns --bench micro`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hickory_proto::rr::RecordType;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_dns::wire::SimpleQuery;
use shoal_dns::{
    Attachment, ClusterRecords, EndpointMode, Lookup, NetworkSpec, RecordsConfig, Scope,
    ServiceNetwork, ServiceSpec, TaskSpec, Zone,
};

const SERVICES: u32 = 1000;

fn records() -> ClusterRecords {
    let ip = |a: u32| IpAddr::V4(Ipv4Addr::new(10, 0, (a / 250) as u8, (a % 250 + 1) as u8));
    ClusterRecords {
        networks: vec![NetworkSpec {
            id: "n1".into(),
            name: "benchnet".into(),
            subnets: vec!["10.0.0.0/16".parse().expect("subnet")],
        }],
        services: (1..=SERVICES)
            .map(|i| ServiceSpec {
                name: format!("svc{i}"),
                mode: EndpointMode::Vip,
                networks: vec![ServiceNetwork {
                    network: "n1".into(),
                    vip: Some(ip(i)),
                    aliases: vec![],
                }],
                tasks: (0..3)
                    .map(|t| TaskSpec {
                        slot: (t + 1).to_string(),
                        id: format!("{i:08x}{t:04x}"),
                        healthy: true,
                        attachments: vec![Attachment {
                            network: "n1".into(),
                            addr: ip(30_000 + i * 3 + t),
                            aliases: vec![],
                        }],
                    })
                    .collect(),
            })
            .collect(),
        standalone: vec![],
    }
}

/// `id 0x1234, RD, one question <name> A IN`.
fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn lookup(c: &mut Criterion) {
    let snap = Zone::build(&records(), RecordsConfig::default());
    let scope = Scope::new(["n1"]);
    let mut rng = SmallRng::seed_from_u64(3);
    assert!(matches!(
        snap.lookup(&scope, "svc500", RecordType::A, &mut rng),
        Lookup::Addrs(ref a) if a.len() == 1
    ));
    let mut g = c.benchmark_group("dns/lookup");
    g.bench_function("service VIP (hit)", |b| {
        b.iter(|| snap.lookup(&scope, black_box("svc500"), RecordType::A, &mut rng))
    });
    g.bench_function("tasks.<service> (3 addresses, shuffled)", |b| {
        b.iter(|| snap.lookup(&scope, black_box("tasks.svc500"), RecordType::A, &mut rng))
    });
    g.bench_function("miss inside the network", |b| {
        b.iter(|| snap.lookup(&scope, black_box("nope.benchnet"), RecordType::A, &mut rng))
    });
    g.bench_function("not ours (forwarded)", |b| {
        b.iter(|| snap.lookup(&scope, black_box("example.com"), RecordType::A, &mut rng))
    });
    g.finish();

    // The UDP fast path: parse, look up, write the answer into a buffer the caller keeps.
    let q = query("svc500");
    let mut out = Vec::with_capacity(512);
    let mut name = [0u8; 256];
    c.bench_function("dns/udp fast path (parse, lookup, answer)", |b| {
        b.iter(|| {
            let sq = SimpleQuery::parse(black_box(&q)).expect("plain query");
            let n = sq.name(&mut name).expect("name");
            if let Lookup::Addrs(a) = snap.lookup(&scope, n, RecordType::A, &mut rng) {
                sq.answer(&a, 5, &mut out);
            }
            out.len()
        })
    });
}

fn build(c: &mut Criterion) {
    let input = records();
    let mut g = c.benchmark_group("dns/snapshot");
    g.sample_size(20);
    g.throughput(Throughput::Elements(u64::from(SERVICES)));
    g.bench_function("build (1000 services x 3 tasks)", |b| {
        b.iter(|| Zone::build(black_box(&input), RecordsConfig::default()))
    });
    g.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
