//! Micro-benchmarks of the routing mesh's per-connection and per-change work (criterion): the
//! balancer's pick for each algorithm over 3 and 100 backends, and the Maglev table build a
//! backend change costs. `cargo bench -p shoal-ingress --bench micro`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_ingress::maglev::MaglevTable;
use shoal_ingress::{Algorithm, Backend, BackendSet};

fn backends(n: u8) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                format!("task-{i:03}"),
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2 + i)),
                i % 3 == 0,
            ))
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingress/pick");
    let client = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254));
    for n in [3u8, 100] {
        for (name, algo) in [
            ("p2c", Algorithm::P2cLeastConn),
            ("round-robin", Algorithm::RoundRobin),
            ("source-hash", Algorithm::SourceHash),
        ] {
            let snap = BackendSet::new(algo, backends(n), Arc::new(AtomicUsize::new(0)));
            let mut rng = SmallRng::seed_from_u64(1);
            g.bench_with_input(BenchmarkId::new(name, n), &snap, |b, snap| {
                b.iter(|| snap.pick(black_box(client), false, None, &mut rng))
            });
        }
        let snap =
            BackendSet::new(Algorithm::P2cLeastConn, backends(n), Arc::new(AtomicUsize::new(0)));
        let mut rng = SmallRng::seed_from_u64(1);
        g.bench_with_input(BenchmarkId::new("p2c, excluding a failed one", n), &snap, |b, snap| {
            b.iter(|| snap.pick(black_box(client), false, Some("task-001"), &mut rng))
        });
    }
    g.finish();
}

fn maglev(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingress/maglev build");
    g.sample_size(20);
    for n in [3usize, 10, 100] {
        let ids: Vec<String> = (0..n).map(|i| format!("task-{i:03}")).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &ids, |b, ids| {
            b.iter(|| MaglevTable::build(black_box(ids)))
        });
    }
    g.finish();
    let table = MaglevTable::build(&["a", "b", "c"]);
    c.bench_function("ingress/maglev lookup", |b| {
        b.iter(|| table.lookup(black_box(0x1234_5678_9abc_def0)))
    });
}

criterion_group!(benches, pick, maglev);
criterion_main!(benches);
