//! The encrypted data path: one TUN device per node, one boringtun `noise::Tunn` per peer, one
//! UDP socket, two threads.
//!
//! - **tx thread**: reads what the kernel routed into the TUN (the outer IPv4/UDP/VXLAN packets
//!   of encrypted networks, addressed to a peer's tunnel address). With the TUN's send-side
//!   offloads (Linux 6.17+: `TUN_F_TSO4` + `TUN_F_UDP_TUNNEL_GSO`) one read returns a whole
//!   VXLAN-over-TCP GSO packet of up to 64 KB, which `gro` cuts into MTU-sized packets
//!   (checksums included) since boringtun takes one IP packet at a time. Each packet is
//!   encrypted with that peer's `Tunn` into a fixed batch buffer, and the batch goes out with
//!   one `sendmmsg`, runs of equal-sized datagrams to one peer as a single UDP GSO message.
//! - **rx thread**: receives a batch with one `recvmmsg` (UDP GRO: each buffer may hold many
//!   datagrams), finds the peer by source address, decrypts, checks the inner source is that
//!   peer's tunnel address and that the packet is VXLAN to the data-path port for an encrypted
//!   VNI (anything else is dropped and counted, never handed to the host), and writes the
//!   packets to the TUN, consecutive datagrams of one VTEP pair as one UDP GSO super-packet
//!   (one `writev` and one pass through IP/UDP per up to 64 datagrams; the VXLAN device's GRO
//!   then coalesces the inner TCP segments before the bridge, veth and TCP receive path). It
//!   also runs boringtun's timers (handshake retries, rekeying, keepalives) every 100 ms.
//!
//! The peer set is an immutable snapshot swapped in whole (arc-swap), so the hot path takes no
//! lock the control path holds, except each peer's own `Tunn` mutex (boringtun needs `&mut`).
//! No allocation happens per packet: all buffers are made when the threads start. These are
//! plain threads doing blocking system calls rather than tokio tasks: the data path is a tight
//! loop over batched syscalls, and a runtime would only add wake-ups.

mod batch;
mod fuzz;
mod gro;
mod rx;
mod stats;
mod sys;
mod tx;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::reconcile::WgPeer;
use crate::{EncryptionConfig, Error, NodeNs, keys::NodeKey};

use self::rx::rx_loop;
use self::stats::{Counters, DeviceCounters, REASONS, reason_of};
pub use self::stats::{DeviceStats, PacketDrop, PeerStats};
use self::tx::tx_loop;

/// Whether this kernel can make the data path's TUN device: creates `name` in the calling
/// thread's namespace as the data path would and removes it again (closing it does).
pub fn check_tun(name: &str) -> std::io::Result<()> {
    sys::open_tun(name).map(drop)
}

#[doc(hidden)]
pub use fuzz::receive as fuzz_receive;

/// Fuzzing entry point (not for the agent): runs the TUN offload code over arbitrary bytes,
/// the first [`gro::VNET_HDR_LEN`] as a virtio-net header and the rest as a packet, both as a
/// read would hand them to the tx thread and as a decrypted packet joining an rx train. Panics
/// if an invariant breaks.
#[doc(hidden)]
pub fn fuzz_offload(data: &[u8]) {
    let Some((hdr, pkt)) = data.split_first_chunk::<{ gro::VNET_HDR_LEN }>() else {
        return;
    };
    let mut pkt = pkt.to_vec();
    let mut out = [0u8; 2048];
    match gro::tx_plan(hdr, &pkt, out.len()) {
        Some(gro::TxPlan::Checksum { start, offset }) => {
            gro::complete_checksum(&mut pkt, start, offset)
        }
        Some(gro::TxPlan::Segment(segs)) => {
            let mut total = 0;
            for i in 0..segs.count {
                let len = segs.write(&pkt, i, &mut out);
                assert!(len <= out.len());
                total += len;
            }
            assert!(total >= pkt.len());
        }
        _ => {}
    }
    if let Some(seg) = gro::segment(&pkt, DEFAULT_FUZZ_PORT) {
        let mut train = gro::Train::start(seg);
        assert!(gro::same_flow(&pkt, &pkt));
        let _ = train.push(seg);
        let _ = gro::finish(&mut pkt, &train);
    }
}

const DEFAULT_FUZZ_PORT: u16 = crate::DEFAULT_DATA_PORT;

struct Peer {
    key: WgPeer,
    endpoint: SocketAddrV4,
    tunn: Mutex<Tunn>,
    counters: Counters,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("node", &self.key.node)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The peers as the data path sees them, by tunnel and by endpoint address, with the VNIs
/// they may carry; rebuilt on every change and swapped in whole.
#[derive(Debug, Default)]
struct PeerSet {
    by_tunnel: HashMap<Ipv4Addr, Arc<Peer>>,
    by_endpoint: HashMap<Ipv4Addr, Arc<Peer>>,
    peers: Vec<Arc<Peer>>,
    vnis: BTreeSet<u32>,
}

/// One peer's encryption state and counters (for metrics and `network inspect`).
#[derive(Debug)]
struct Shared {
    key: NodeKey,
    /// This node's tunnel address: the destination of everything a peer may send inside.
    tunnel_addr: Ipv4Addr,
    data_port: u16,
    wg_port: u16,
    snapshot: ArcSwap<PeerSet>,
    stop: AtomicBool,
    next_index: AtomicU32,
    counters: DeviceCounters,
    control: Mutex<()>,
    /// UDP GSO on sends (probed at start, turned off if the kernel refuses a GSO message).
    gso: AtomicBool,
    /// UDP GRO on receives.
    gro: bool,
    /// UDP GSO super-packets on TUN writes (turned off if the kernel refuses one).
    tun_gso: AtomicBool,
    /// TCP (and VXLAN-tunnelled TCP) GSO packets on TUN reads.
    tun_tso: bool,
}

/// The node's WireGuard device: TUN, UDP socket, data-path threads. Dropping it stops the
/// threads and closes the TUN (which removes it from the kernel).
#[derive(Debug)]
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

pub(super) const TIMER_TICK: Duration = Duration::from_millis(100);

impl Device {
    /// Creates the TUN and the UDP socket in the node's namespace and starts the threads. The
    /// caller configures the TUN's address, MTU and state over netlink.
    pub(crate) fn start(
        node: &NodeNs,
        enc: &EncryptionConfig,
        data_port: u16,
        tun_mtu: u32,
    ) -> Result<Device, Error> {
        let name = enc.tun_name.clone();
        let port = enc.port;
        let (tun, udp) = node.run(move || -> Result<((File, bool), UdpSocket), Error> {
            let (tun, tso) = sys::open_tun(&name)
                .map_err(|e| Error::Io { op: "create TUN device", source: e })?;
            let tun = (File::from(tun), tso);
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )
            .map_err(|e| Error::Io { op: "WireGuard UDP socket", source: e })?;
            // Large buffers absorb bursts the single rx thread has not drained yet. The FORCE
            // variants (we run as root) go past net.core.rmem_max, whose 208 KiB default
            // overflowed at a few hundred Mbit/s in the benchmark.
            use nix::sys::socket::{setsockopt, sockopt};
            if setsockopt(&sock, sockopt::RcvBufForce, &(8 << 20)).is_err() {
                let _ = sock.set_recv_buffer_size(8 << 20);
            }
            if setsockopt(&sock, sockopt::SndBufForce, &(8 << 20)).is_err() {
                let _ = sock.set_send_buffer_size(8 << 20);
            }
            sock.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
                .map_err(|e| Error::Io { op: "bind the WireGuard port", source: e })?;
            Ok((tun, sock.into()))
        })??;
        let (tun, tun_tso) = tun;
        let gso = shoal_udp::probe_gso(udp.as_fd());
        let gro = shoal_udp::enable_gro(udp.as_fd());
        tracing::info!(gso, gro, tun_tso, "WireGuard UDP and TUN offloads");
        let shared = Arc::new(Shared {
            key: enc.key.clone(),
            tunnel_addr: enc.tunnel_addr,
            data_port,
            wg_port: enc.port,
            snapshot: ArcSwap::from_pointee(PeerSet::default()),
            stop: AtomicBool::new(false),
            next_index: AtomicU32::new(1),
            counters: DeviceCounters::default(),
            control: Mutex::new(()),
            gso: AtomicBool::new(gso),
            gro,
            tun_gso: AtomicBool::new(true),
            tun_tso,
        });
        let buf_size = (tun_mtu as usize + 64).max(2048);
        let tun = Arc::new(tun);
        let udp = Arc::new(udp);
        let mut threads = Vec::new();
        for (which, role) in [("shoal-wg-tx", true), ("shoal-wg-rx", false)] {
            let (s, t, u) = (shared.clone(), tun.clone(), udp.clone());
            let h = std::thread::Builder::new()
                .name(which.into())
                .spawn(move || {
                    if role { tx_loop(&s, &t, &u, buf_size) } else { rx_loop(&s, &t, &u, buf_size) }
                })
                .map_err(|e| Error::Io { op: "spawn data-path thread", source: e })?;
            threads.push(h);
        }
        Ok(Device { shared, threads })
    }

    /// Replaces the peer set and the encrypted VNIs. Peers whose key, endpoint and tunnel
    /// address are unchanged keep their session.
    pub(crate) fn set_peers(&self, peers: &[WgPeer], vnis: &BTreeSet<u32>) {
        let _g = self.shared.control.lock();
        let old = self.shared.snapshot.load();
        let mut snap = PeerSet { vnis: vnis.clone(), ..PeerSet::default() };
        for p in peers {
            let endpoint = SocketAddrV4::new(p.vtep, self.shared.wg_port);
            let peer = match old.peers.iter().find(|o| o.key == *p && o.endpoint == endpoint) {
                Some(o) => o.clone(),
                None => {
                    let idx = self.shared.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                    Arc::new(Peer {
                        key: p.clone(),
                        endpoint,
                        tunn: Mutex::new(Tunn::new(
                            self.shared.key.secret(),
                            PublicKey::from(p.public),
                            None,
                            None,
                            idx,
                            None,
                        )),
                        counters: Counters::default(),
                    })
                }
            };
            if snap.by_tunnel.contains_key(&p.tunnel) || snap.by_endpoint.contains_key(&p.vtep) {
                tracing::warn!(node = %p.node, "two peers share a tunnel or underlay address; keeping the first");
                continue;
            }
            snap.by_tunnel.insert(p.tunnel, peer.clone());
            snap.by_endpoint.insert(p.vtep, peer.clone());
            snap.peers.push(peer);
        }
        self.shared.snapshot.store(Arc::new(snap));
    }

    /// Per-peer state and counters.
    pub fn stats(&self) -> Vec<PeerStats> {
        let snap = self.shared.snapshot.load();
        snap.peers
            .iter()
            .map(|p| {
                let age = p.tunn.lock().ok().and_then(|t| t.time_since_last_handshake());
                let c = &p.counters;
                PeerStats {
                    node: p.key.node.clone(),
                    endpoint: p.endpoint,
                    tunnel: p.key.tunnel,
                    public_key: crate::keys::encode_key(&p.key.public),
                    handshake_age_secs: age.map(|d| d.as_secs_f64()),
                    established: age.is_some_and(|d| d < Duration::from_secs(180)),
                    tx_packets: c.tx_packets.load(Ordering::Relaxed),
                    tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
                    rx_packets: c.rx_packets.load(Ordering::Relaxed),
                    rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
                    handshakes_sent: c.handshakes_sent.load(Ordering::Relaxed),
                    drops: REASONS
                        .iter()
                        .zip(&c.drops)
                        .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                }
            })
            .collect()
    }

    /// Node-wide counters (the guard's counts are filled in by the driver).
    pub fn device_stats(&self) -> DeviceStats {
        let c = &self.shared.counters;
        DeviceStats {
            rx_unknown_peer: c.rx_unknown_peer.load(Ordering::Relaxed),
            tx_unknown_peer: c.tx_unknown_peer.load(Ordering::Relaxed),
            tx_malformed: c.tx_malformed.load(Ordering::Relaxed),
            guard_dropped_cleartext: 0,
            guard_reapplied: 0,
            udp_gso: self.shared.gso.load(Ordering::Relaxed),
            udp_gro: self.shared.gro,
            tun_gso: self.shared.tun_gso.load(Ordering::Relaxed),
            tun_gso_writes: c.tun_gso_writes.load(Ordering::Relaxed),
            tun_gso_datagrams: c.tun_gso_datagrams.load(Ordering::Relaxed),
            tun_tso: self.shared.tun_tso,
            tun_tso_reads: c.tun_tso_reads.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(super) fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

fn run_timers(shared: &Shared, udp: &UdpSocket, out: &mut [u8]) {
    let snap = shared.snapshot.load();
    for peer in &snap.peers {
        let Ok(mut tunn) = peer.tunn.lock() else {
            continue;
        };
        match tunn.update_timers(out) {
            TunnResult::WriteToNetwork(b) => {
                peer.counters.handshakes_sent.fetch_add(1, Ordering::Relaxed);
                let _ = udp.send_to(b, peer.endpoint);
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {}
            TunnResult::Err(e) => peer.counters.drop(reason_of(&e)),
            _ => {}
        }
    }
}
