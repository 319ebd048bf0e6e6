//! The tx thread: TUN reads (GSO packets segmented), encryption per peer into a batch, and
//! the batch sent with one `sendmmsg`.

use std::fs::File;
use std::net::UdpSocket;
use std::sync::atomic::Ordering;

use boringtun::noise::TunnResult;

use super::stats::reason_of;
use super::{Peer, Shared, TIMER_TICK, batch, gro, wait_readable};
use crate::wire;

/// Largest packet a TUN read returns with the send-side offloads on (a 64 KB GSO packet).
const TUN_READ_MAX: usize = 65536 + 256;

pub(super) fn tx_loop(shared: &Shared, tun: &File, udp: &UdpSocket, buf_size: usize) {
    let mut inbuf = vec![0u8; gro::VNET_HDR_LEN + TUN_READ_MAX.max(buf_size)];
    // One segment of a GSO packet, finished and waiting for boringtun.
    let mut segment = vec![0u8; buf_size];
    let mut out = batch::SendBatch::new(buf_size + 32);
    while !shared.stop.load(Ordering::Relaxed) {
        if !wait_readable(tun, TIMER_TICK) {
            continue;
        }
        let snap = shared.snapshot.load();
        // Drain the TUN into batches, each sent with one syscall.
        loop {
            let n = match nix::unistd::read(tun, &mut inbuf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => break,
            };
            if n <= gro::VNET_HDR_LEN {
                shared.counters.tx_malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (hdr, pkt) = inbuf[..n].split_at_mut(gro::VNET_HDR_LEN);
            let hdr: &[u8; gro::VNET_HDR_LEN] =
                (&*hdr).try_into().unwrap_or(&[0; gro::VNET_HDR_LEN]);
            let (Some(dst), Some(plan)) =
                (wire::ipv4_destination(pkt), gro::tx_plan(hdr, pkt, segment.len()))
            else {
                shared.counters.tx_malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(peer) = snap.by_tunnel.get(&dst) else {
                shared.counters.tx_unknown_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match plan {
                gro::TxPlan::Whole => encrypt(shared, peer, pkt, &mut out, udp),
                gro::TxPlan::Checksum { start, offset } => {
                    gro::complete_checksum(pkt, start, offset);
                    encrypt(shared, peer, pkt, &mut out, udp);
                }
                gro::TxPlan::Segment(segs) => {
                    shared.counters.tun_tso_reads.fetch_add(1, Ordering::Relaxed);
                    for i in 0..segs.count {
                        let len = segs.write(pkt, i, &mut segment);
                        encrypt(shared, peer, &segment[..len], &mut out, udp);
                    }
                }
            }
        }
        flush(shared, &mut out, udp);
    }
}

/// Encrypts one packet for `peer` into the next slot of the batch (sending the batch first
/// when it is full).
fn encrypt(shared: &Shared, peer: &Peer, pkt: &[u8], out: &mut batch::SendBatch, udp: &UdpSocket) {
    if out.is_full() {
        flush(shared, out, udp);
    }
    let slot = out.count;
    let Ok(mut tunn) = peer.tunn.lock() else {
        return;
    };
    match tunn.encapsulate(pkt, &mut out.bufs[slot]) {
        TunnResult::WriteToNetwork(b) => {
            let len = b.len();
            // Message type 4 is transport data; anything else is a handshake message.
            if b.first() != Some(&4) {
                peer.counters.handshakes_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                peer.counters.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
            out.lens[slot] = len;
            out.to[slot] = peer.endpoint;
            out.count += 1;
        }
        TunnResult::Err(e) => peer.counters.drop(reason_of(&e)),
        _ => {}
    }
}

fn flush(shared: &Shared, out: &mut batch::SendBatch, udp: &UdpSocket) {
    if out.count > 0 {
        let (refused, gso_failed) = out.flush(udp, shared.gso.load(Ordering::Relaxed));
        if gso_failed {
            tracing::warn!("UDP GSO send failed; falling back to one datagram per packet");
            shared.gso.store(false, Ordering::Relaxed);
        }
        // A refused datagram is rare (no route to the peer); counting it per peer would need
        // the peer per slot, so it is logged instead.
        if refused > 0 {
            tracing::debug!(refused, "WireGuard datagrams refused by the kernel");
        }
    }
}
