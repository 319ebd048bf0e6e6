//! Micro-benchmarks of the VXLAN wire code the encrypted data path runs per packet (criterion):
//! parsing an outer IPv4 + UDP + VXLAN packet as the WireGuard TUN sees it, the destination
//! lookup, and checking/writing a VXLAN header. `cargo bench -p shoal-vxlan --bench micro`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_vxlan::wire::{
    VXLAN_HEADER_LEN, VxlanPacket, VxlanRepr, ipv4_destination, parse_vxlan_over_ipv4,
};

/// A whole outer packet: IPv4 (20) + UDP (8) + VXLAN (8) + a 1,414-byte inner frame = 1,450.
fn outer_packet() -> Vec<u8> {
    let total = 1450usize;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&Ipv4Addr::new(100, 64, 0, 1).octets());
    p[16..20].copy_from_slice(&Ipv4Addr::new(100, 64, 0, 2).octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4789u16.to_be_bytes());
    p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
    let mut vx = VxlanPacket::new_unchecked(&mut p[28..]);
    VxlanRepr { vni: 4097 }.emit(&mut vx).expect("valid VNI");
    p
}

fn wire(c: &mut Criterion) {
    let pkt = outer_packet();
    assert_eq!(parse_vxlan_over_ipv4(&pkt).map(|v| v.vni), Ok(4097));
    let mut g = c.benchmark_group("vxlan/wire");
    g.throughput(Throughput::Bytes(pkt.len() as u64));
    g.bench_function("parse_vxlan_over_ipv4 (1450 B)", |b| {
        b.iter(|| parse_vxlan_over_ipv4(black_box(&pkt)))
    });
    g.bench_function("ipv4_destination", |b| b.iter(|| ipv4_destination(black_box(&pkt))));
    g.finish();

    let mut g = c.benchmark_group("vxlan/header");
    let hdr = pkt[28..28 + VXLAN_HEADER_LEN].to_vec();
    g.bench_function("check+parse", |b| {
        b.iter(|| {
            let p = VxlanPacket::new_checked(black_box(&hdr[..]))?;
            VxlanRepr::parse(&p)
        })
    });
    let mut buf = [0u8; VXLAN_HEADER_LEN];
    g.bench_function("emit", |b| {
        b.iter(|| {
            let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
            VxlanRepr { vni: black_box(4097) }.emit(&mut p)
        })
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
