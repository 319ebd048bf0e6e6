//! The rx thread: batched receives (with UDP GRO), decryption, the checks a decrypted packet
//! must pass, and the trains of datagrams written to the TUN as one super-packet.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use boringtun::noise::TunnResult;

use super::stats::{PacketDrop, reason_of};
use super::{Peer, PeerSet, Shared, TIMER_TICK, batch, gro, run_timers, wait_readable};
use crate::wire;

/// Most datagrams one super-packet written to the TUN carries.
const MAX_TRAIN: usize = gro::MAX_SEGMENTS;

/// The rx thread's plaintext buffers and the train of segments waiting to be written to the
/// TUN as one packet. A train holds packets of one peer only and is written before the rx
/// thread sleeps, so nothing waits in it longer than one receive batch.
struct RxTrain {
    /// Decrypted packets; `slots[count]` is where the next one is decrypted to.
    slots: Vec<Vec<u8>>,
    lens: [usize; MAX_TRAIN],
    count: usize,
    /// The coalescing state; `None` when the train holds one packet that cannot be coalesced.
    train: Option<gro::Train>,
    peer: Option<Arc<Peer>>,
}

impl RxTrain {
    fn new(buf_size: usize) -> Self {
        RxTrain {
            slots: (0..MAX_TRAIN).map(|_| vec![0u8; buf_size]).collect(),
            lens: [0; MAX_TRAIN],
            count: 0,
            train: None,
            peer: None,
        }
    }

    /// Takes the packet just decrypted into `slots[count]` (`len` bytes, already checked),
    /// appending it to the train or writing the train first and starting a new one.
    fn push(&mut self, shared: &Shared, tun: &File, peer: &Arc<Peer>, len: usize) {
        let k = self.count;
        self.lens[k] = len;
        let seg = if shared.tun_gso.load(Ordering::Relaxed) {
            gro::segment(&self.slots[k][..len], shared.data_port)
        } else {
            None
        };
        if k > 0 {
            let joined = match (&mut self.train, seg, &self.peer) {
                (Some(t), Some(s), Some(p)) if Arc::ptr_eq(p, peer) => {
                    gro::same_flow(&self.slots[0], &self.slots[k][..len]) && t.push(s)
                }
                _ => false,
            };
            if joined {
                self.count += 1;
                if self.count == MAX_TRAIN || self.train.is_some_and(|t| !t.open) {
                    self.flush(shared, tun);
                }
                return;
            }
            // The new packet does not continue the train: write the train, then let the new
            // packet start the next one from slot 0.
            self.flush(shared, tun);
            self.slots.swap(0, k);
            self.lens[0] = len;
        }
        self.count = 1;
        self.peer = Some(peer.clone());
        self.train = seg.map(gro::Train::start);
        if self.train.is_none_or(|t| !t.open) {
            self.flush(shared, tun);
        }
    }

    /// Writes what the train holds: one packet as it is, several as one TCP GSO packet.
    fn flush(&mut self, shared: &Shared, tun: &File) {
        let n = std::mem::take(&mut self.count);
        let train = self.train.take();
        let Some(peer) = self.peer.take() else {
            return;
        };
        if n == 0 {
            return;
        }
        let bytes: usize = self.lens[..n].iter().sum();
        let ok = match train {
            Some(t) if n > 1 => {
                let hl = gro::HDR_LEN;
                let mut saved = [0u8; gro::HDR_LEN];
                saved.copy_from_slice(&self.slots[0][..hl]);
                let vnet = gro::finish(&mut self.slots[0][..hl], &t);
                let mut iov = [IoSlice::new(&[]); MAX_TRAIN + 1];
                iov[0] = IoSlice::new(&vnet);
                iov[1] = IoSlice::new(&self.slots[0][..self.lens[0]]);
                for i in 1..n {
                    iov[i + 1] = IoSlice::new(&self.slots[i][hl..self.lens[i]]);
                }
                match write_all_vectored(tun, &iov[..n + 1], gro::VNET_HDR_LEN + t.total) {
                    Ok(()) => {
                        shared.counters.tun_gso_writes.fetch_add(1, Ordering::Relaxed);
                        shared.counters.tun_gso_datagrams.fetch_add(n as u64, Ordering::Relaxed);
                        true
                    }
                    Err(e) => {
                        // A kernel that refuses the super-packet gets single packets from now
                        // on: restore the first packet's headers and write them one by one.
                        tracing::warn!(error = %e, "TUN refused a TCP GSO packet; coalescing off");
                        shared.tun_gso.store(false, Ordering::Relaxed);
                        self.slots[0][..hl].copy_from_slice(&saved);
                        (0..n).all(|i| write_one(tun, &self.slots[i][..self.lens[i]]))
                    }
                }
            }
            _ => (0..n).all(|i| write_one(tun, &self.slots[i][..self.lens[i]])),
        };
        if ok {
            peer.counters.rx_packets.fetch_add(n as u64, Ordering::Relaxed);
            peer.counters.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            peer.counters.drop(PacketDrop::TunWrite);
        }
    }
}

/// Writes one packet to the TUN behind an all-zero virtio-net header (no offload asked).
fn write_one(tun: &File, pkt: &[u8]) -> bool {
    let zero = [0u8; gro::VNET_HDR_LEN];
    write_all_vectored(tun, &[IoSlice::new(&zero), IoSlice::new(pkt)], zero.len() + pkt.len())
        .is_ok()
}

/// One `writev` of a whole packet (the TUN takes a packet per call, never part of one).
fn write_all_vectored(tun: &File, iov: &[IoSlice<'_>], len: usize) -> std::io::Result<()> {
    let mut w = tun;
    match w.write_vectored(iov) {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(std::io::Error::other(format!("short TUN write: {n} of {len}"))),
        Err(e) => Err(e),
    }
}

pub(super) fn rx_loop(shared: &Shared, tun: &File, udp: &UdpSocket, buf_size: usize) {
    let slot = if shared.gro { batch::GRO_BUF } else { buf_size + 32 };
    let mut batch = shoal_udp::RecvBatch::new(batch::RECV_BATCH, slot);
    let mut train = RxTrain::new(buf_size + 32);
    let mut scratch = vec![0u8; buf_size + 32];
    let mut last_tick = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        if last_tick.elapsed() >= TIMER_TICK {
            last_tick = Instant::now();
            run_timers(shared, udp, &mut scratch);
        }
        // Receive until the socket is empty; only then sleep in poll (one syscall less per
        // batch while traffic flows).
        match batch.recv(udp.as_fd()) {
            Ok(n) if n > 0 => {}
            _ => {
                wait_readable(udp, TIMER_TICK);
                continue;
            }
        }
        let snap = shared.snapshot.load();
        for received in batch.iter() {
            let Some(SocketAddr::V4(from)) = received.from else {
                continue;
            };
            let Some(peer) = snap.by_endpoint.get(from.ip()) else {
                shared.counters.rx_unknown_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            for datagram in datagrams(received.data, received.segment) {
                receive_one(shared, &snap, peer, tun, udp, from, datagram, &mut train);
            }
        }
        train.flush(shared, tun);
    }
}

/// The datagrams of one received buffer: with UDP GRO it holds several of `seg` bytes (the last
/// may be shorter); `seg` 0 means the buffer is one datagram.
pub(super) fn datagrams(buf: &[u8], seg: usize) -> std::slice::Chunks<'_, u8> {
    buf.chunks(if seg > 0 { seg } else { buf.len().max(1) })
}

#[allow(clippy::too_many_arguments)]
fn receive_one(
    shared: &Shared,
    snap: &PeerSet,
    peer: &Arc<Peer>,
    tun: &File,
    udp: &UdpSocket,
    from: SocketAddrV4,
    datagram: &[u8],
    train: &mut RxTrain,
) {
    let out = &mut train.slots[train.count];
    // boringtun panics when the output is smaller than the ciphertext; an oversized datagram
    // (nothing we send is larger than the TUN MTU + 32) is hostile and dropped here.
    if datagram.len() > out.len() {
        peer.counters.drop(PacketDrop::Malformed);
        return;
    }
    let Ok(mut tunn) = peer.tunn.lock() else {
        return;
    };
    match tunn.decapsulate(Some((*from.ip()).into()), datagram, out) {
        TunnResult::WriteToNetwork(b) => {
            peer.counters.handshakes_sent.fetch_add(1, Ordering::Relaxed);
            let _ = udp.send_to(b, peer.endpoint);
            // Flush what boringtun queued while the handshake was in flight.
            while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], out) {
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                let _ = udp.send_to(b, peer.endpoint);
            }
        }
        TunnResult::WriteToTunnelV4(pkt, src) => {
            // boringtun leaves the packet at the start of the slot.
            let len = pkt.len();
            // The packet lives in the slot, not in the session: release the session before
            // the TUN write, which runs the whole receive path, so the tx thread never waits.
            drop(tunn);
            let k = train.count;
            if admit(shared, snap, peer, &train.slots[k][..len], src) {
                train.push(shared, tun, peer, len);
            }
        }
        TunnResult::WriteToTunnelV6(..) => peer.counters.drop(PacketDrop::AllowedIps),
        TunnResult::Done => {}
        TunnResult::Err(e) => peer.counters.drop(reason_of(&e)),
    }
}

/// Whether a decrypted packet may go to the TUN: its source is the peer's tunnel address and
/// it is VXLAN to the data-path port for an encrypted network.
fn admit(shared: &Shared, snap: &PeerSet, peer: &Peer, pkt: &[u8], src: Ipv4Addr) -> bool {
    match check_decrypted(
        pkt,
        src,
        peer.key.tunnel,
        shared.tunnel_addr,
        shared.data_port,
        &snap.vnis,
    ) {
        Ok(()) => true,
        Err(reason) => {
            peer.counters.drop(reason);
            false
        }
    }
}

/// The checks of [`admit`] on their own: a decrypted packet from `src` (boringtun's parse of
/// its source) of a peer whose tunnel address is `peer_tunnel`, to this node at `own_tunnel`.
pub(super) fn check_decrypted(
    pkt: &[u8],
    src: Ipv4Addr,
    peer_tunnel: Ipv4Addr,
    own_tunnel: Ipv4Addr,
    data_port: u16,
    vnis: &BTreeSet<u32>,
) -> Result<(), PacketDrop> {
    if src != peer_tunnel {
        return Err(PacketDrop::AllowedIps);
    }
    // The tunnel carries the encrypted networks' VXLAN and nothing else: anything else would
    // reach the node's own stack (its services, its routing) from a peer's key alone.
    let vxlan = match wire::parse_vxlan_over_ipv4(pkt) {
        Ok(v) if v.dst_port == data_port && v.dst == own_tunnel => v,
        _ => return Err(PacketDrop::NotVxlan),
    };
    // The guard trusts the TUN, so a peer must not use it to reach plain networks' VNIs either.
    if !vnis.contains(&vxlan.vni) {
        return Err(PacketDrop::VniNotEncrypted);
    }
    Ok(())
}
