//! Micro-benchmarks of gossip's hot functions (criterion): the sealed frame's header view,
//! sealing and opening a frame (AES-256-GCM), the postcard codec of broadcast items and of a
//! full-state sync, and the table merge (fresh updates, and the duplicates a steady cluster
//! gossips most). `cargo bench -p shoal-gossip --bench micro`.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use shoal_gossip::msg::{Item, Sync, WireEntry, decode_item, decode_sync, encode};
use shoal_gossip::table::Store;
use shoal_gossip::wire::{Frame, FrameRepr, HEADER_LEN, Kind};
use shoal_gossip::{EntryKey, Identity, Keyring, NodeId, Version};

fn entry(i: u64) -> WireEntry {
    WireEntry {
        key: EntryKey::new("endpoint_table", "net-0123456789ab", &format!("task-{i:012x}")),
        version: Version { ltime: 1000 + i, owner: NodeId(i % 16), generation: 1 },
        // About what an endpoint record weighs: name, addresses, MAC, node.
        value: Some(vec![0xab; 96]),
    }
}

fn frames(c: &mut Criterion) {
    let mut ring = Keyring::new(&[[7u8; 32]], 1).expect("key");
    let plain = vec![0x5a; 1024];
    let sealed = ring.seal(Kind::Swim, &plain);
    let mut g = c.benchmark_group("gossip/frame");
    g.bench_function("check+parse header", |b| {
        b.iter(|| {
            let f = Frame::new_checked(black_box(&sealed[..]))?;
            FrameRepr::parse(&f)
        })
    });
    let repr = FrameRepr::parse(&Frame::new_checked(&sealed[..]).expect("frame")).expect("repr");
    let mut hdr = [0u8; HEADER_LEN];
    g.bench_function("emit header", |b| b.iter(|| black_box(&repr).emit(&mut hdr)));
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("seal 1 KiB", |b| b.iter(|| ring.seal(Kind::Swim, black_box(&plain))));
    // After the first open the replay window refuses the frame, but only once it has
    // authenticated and decrypted it: every iteration does the whole work of an open.
    g.bench_function("open 1 KiB", |b| b.iter(|| ring.open(black_box(&sealed))));
    g.finish();
}

fn codec(c: &mut Criterion) {
    let item = Item::Entry(entry(7));
    let bytes = encode(&item);
    let mut g = c.benchmark_group("gossip/codec");
    g.bench_function("encode item", |b| b.iter(|| encode(black_box(&item))));
    g.bench_function("decode item", |b| b.iter(|| decode_item(black_box(&bytes), 64 * 1024)));
    let sync = Sync {
        from: Identity {
            addr: "198.18.0.1:7946".parse().expect("addr"),
            node: NodeId(1),
            generation: 1,
            bump: 0,
        },
        members: Vec::new(),
        nodes: Vec::new(),
        networks: vec!["net-0123456789ab".to_owned()],
        entries: (0..1000).map(entry).collect(),
    };
    let sync_bytes = encode(&sync);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("encode sync (1000 entries)", |b| b.iter(|| encode(black_box(&sync))));
    g.bench_function("decode sync (1000 entries)", |b| {
        b.iter(|| decode_sync(black_box(&sync_bytes), 16 << 20))
    });
    g.finish();
}

fn merge(c: &mut Criterion) {
    let now = Instant::now();
    let updates: Vec<(EntryKey, Version, Option<Bytes>)> = (0..1000)
        .map(|i| {
            let e = entry(i);
            (e.key, e.version, e.value.map(Bytes::from))
        })
        .collect();
    let mut g = c.benchmark_group("gossip/table");
    g.throughput(Throughput::Elements(updates.len() as u64));
    g.bench_function("merge 1000 new entries", |b| {
        b.iter_batched(
            Store::new,
            |mut s| {
                for (k, v, val) in &updates {
                    s.merge(k, *v, val.clone(), now);
                }
                s
            },
            BatchSize::SmallInput,
        )
    });
    let mut full = Store::new();
    for (k, v, val) in &updates {
        full.merge(k, *v, val.clone(), now);
    }
    g.bench_function("merge 1000 duplicates", |b| {
        b.iter(|| {
            for (k, v, val) in &updates {
                black_box(full.merge(k, *v, val.clone(), now));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, frames, codec, merge);
criterion_main!(benches);
