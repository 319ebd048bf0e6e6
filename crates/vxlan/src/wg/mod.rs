//! The encrypted data path: one TUN device per node, one boringtun `noise::Tunn` per peer, one
//! UDP socket, two threads.
//!
//! - **tx thread**: reads what the kernel routed into the TUN (the outer IPv4/UDP/VXLAN packets
//!   of encrypted networks, addressed to a peer's tunnel address). With the TUN's send-side
//!   offloads (Linux 6.17+: `TUN_F_TSO4` + `TUN_F_UDP_TUNNEL_GSO`) one read returns a whole
//!   VXLAN-over-TCP GSO packet of up to 64 KB, which [`gro`] cuts into MTU-sized packets
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

mod fuzz;
mod gro;
mod sys;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::Serialize;

use crate::reconcile::WgPeer;
use crate::wire;
use crate::{EncryptionConfig, Error, NodeNs, keys::NodeKey};

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

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Decryption or authentication failed (bad tag, bad MAC, wrong key or index).
    Decrypt,
    /// A replayed or too-old counter.
    Replay,
    /// A handshake message was rejected (bad timestamp, unexpected, under load).
    Handshake,
    /// The decrypted packet's source is not the peer's tunnel address.
    AllowedIps,
    /// Decrypted VXLAN for a VNI that is not an encrypted network here.
    VniNotEncrypted,
    /// A decrypted packet that is not VXLAN to this node's tunnel address and data-path port.
    NotVxlan,
    /// Not a valid IPv4 packet.
    Malformed,
    /// Writing to the TUN failed.
    TunWrite,
    /// The kernel refused to send the datagram.
    UdpSend,
    /// The session expired and a new handshake has not completed.
    Expired,
}

const REASONS: [DropReason; 10] = [
    DropReason::Decrypt,
    DropReason::Replay,
    DropReason::Handshake,
    DropReason::AllowedIps,
    DropReason::VniNotEncrypted,
    DropReason::NotVxlan,
    DropReason::Malformed,
    DropReason::TunWrite,
    DropReason::UdpSend,
    DropReason::Expired,
];

fn reason_of(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => DropReason::Replay,
        WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::UnexpectedPacket
        | WireGuardError::UnderLoad => DropReason::Handshake,
        WireGuardError::ConnectionExpired | WireGuardError::NoCurrentSession => DropReason::Expired,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            DropReason::Malformed
        }
        _ => DropReason::Decrypt,
    }
}

#[derive(Debug, Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    handshakes_sent: AtomicU64,
    drops: [AtomicU64; REASONS.len()],
}

impl Counters {
    fn drop(&self, r: DropReason) {
        if let Some(i) = REASONS.iter().position(|x| *x == r) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

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

#[derive(Debug, Default)]
struct Snapshot {
    by_tunnel: HashMap<Ipv4Addr, Arc<Peer>>,
    by_endpoint: HashMap<Ipv4Addr, Arc<Peer>>,
    peers: Vec<Arc<Peer>>,
    vnis: BTreeSet<u32>,
}

/// One peer's encryption state and counters (for metrics and `network inspect`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStats {
    /// Peer node id.
    pub node: String,
    /// Its WireGuard endpoint.
    pub endpoint: SocketAddrV4,
    /// Its tunnel address.
    pub tunnel: Ipv4Addr,
    /// Its public key, base64.
    pub public_key: String,
    /// Seconds since the last completed handshake (`None`: never).
    pub handshake_age_secs: Option<f64>,
    /// Whether a session is established (a handshake less than 180 s old).
    pub established: bool,
    /// Packets encrypted and sent.
    pub tx_packets: u64,
    /// Plaintext bytes encrypted and sent.
    pub tx_bytes: u64,
    /// Packets received and delivered.
    pub rx_packets: u64,
    /// Plaintext bytes received and delivered.
    pub rx_bytes: u64,
    /// Handshake initiations and responses sent.
    pub handshakes_sent: u64,
    /// Dropped packets by reason (only non-zero reasons).
    pub drops: Vec<(DropReason, u64)>,
}

/// Node-wide counters of the encrypted data path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    /// Datagrams from an address that is no peer.
    pub rx_unknown_peer: u64,
    /// Packets routed into the TUN for an address that is no peer.
    pub tx_unknown_peer: u64,
    /// Packets from the TUN that are not IPv4.
    pub tx_malformed: u64,
    /// Cleartext VXLAN for encrypted VNIs dropped by the nftables guard.
    pub guard_dropped_cleartext: u64,
    /// Times the driver found the guard gone or made for other VNIs and applied it again.
    pub guard_reapplied: u64,
    /// Whether sends use UDP GSO.
    pub udp_gso: bool,
    /// Whether receives use UDP GRO.
    pub udp_gro: bool,
    /// Whether decrypted datagrams go to the TUN batched as UDP GSO super-packets (turned off
    /// if the kernel refuses one).
    pub tun_gso: bool,
    /// Super-packets written to the TUN.
    pub tun_gso_writes: u64,
    /// Datagrams those super-packets carried.
    pub tun_gso_datagrams: u64,
    /// Whether the kernel hands the TUN whole TCP and VXLAN-over-TCP GSO packets (segmented by
    /// the tx thread) instead of segmenting them itself (Linux 6.17+).
    pub tun_tso: bool,
    /// GSO packets read from the TUN and segmented.
    pub tun_tso_reads: u64,
}

#[derive(Debug, Default)]
struct DeviceCounters {
    rx_unknown_peer: AtomicU64,
    tx_unknown_peer: AtomicU64,
    tx_malformed: AtomicU64,
    tun_gso_writes: AtomicU64,
    tun_gso_datagrams: AtomicU64,
    tun_tso_reads: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    key: NodeKey,
    /// This node's tunnel address: the destination of everything a peer may send inside.
    tunnel_addr: Ipv4Addr,
    data_port: u16,
    wg_port: u16,
    snapshot: ArcSwap<Snapshot>,
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

const TIMER_TICK: Duration = Duration::from_millis(100);

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
        let gso = sys::probe_gso(&udp);
        let gro = sys::enable_gro(&udp);
        tracing::info!(gso, gro, tun_tso, "WireGuard UDP and TUN offloads");
        let shared = Arc::new(Shared {
            key: enc.key.clone(),
            tunnel_addr: enc.tunnel_addr,
            data_port,
            wg_port: enc.port,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
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
        let mut snap = Snapshot { vnis: vnis.clone(), ..Snapshot::default() };
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

fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// Largest packet a TUN read returns with the send-side offloads on (a 64 KB GSO packet).
const TUN_READ_MAX: usize = 65536 + 256;

fn tx_loop(shared: &Shared, tun: &File, udp: &UdpSocket, buf_size: usize) {
    let mut inbuf = vec![0u8; gro::VNET_HDR_LEN + TUN_READ_MAX.max(buf_size)];
    // One segment of a GSO packet, finished and waiting for boringtun.
    let mut segment = vec![0u8; buf_size];
    let mut out = sys::SendBatch::new(buf_size + 32);
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
fn encrypt(shared: &Shared, peer: &Peer, pkt: &[u8], out: &mut sys::SendBatch, udp: &UdpSocket) {
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

fn flush(shared: &Shared, out: &mut sys::SendBatch, udp: &UdpSocket) {
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
            peer.counters.drop(DropReason::TunWrite);
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

fn rx_loop(shared: &Shared, tun: &File, udp: &UdpSocket, buf_size: usize) {
    let mut batch = sys::RecvBatch::new(if shared.gro { sys::GRO_BUF } else { buf_size + 32 });
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
        let n = match batch.recv(udp) {
            Ok(n) if n > 0 => n,
            _ => {
                wait_readable(udp, TIMER_TICK);
                continue;
            }
        };
        let snap = shared.snapshot.load();
        for i in 0..n {
            let Some(from) = batch.from[i] else {
                continue;
            };
            let Some(peer) = snap.by_endpoint.get(from.ip()) else {
                shared.counters.rx_unknown_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            for datagram in datagrams(&batch.bufs[i][..batch.lens[i]], batch.seg[i]) {
                receive_one(shared, &snap, peer, tun, udp, from, datagram, &mut train);
            }
        }
        train.flush(shared, tun);
    }
}

/// The datagrams of one received buffer: with UDP GRO it holds several of `seg` bytes (the last
/// may be shorter); `seg` 0 means the buffer is one datagram.
fn datagrams(buf: &[u8], seg: usize) -> std::slice::Chunks<'_, u8> {
    buf.chunks(if seg > 0 { seg } else { buf.len().max(1) })
}

#[allow(clippy::too_many_arguments)]
fn receive_one(
    shared: &Shared,
    snap: &Snapshot,
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
        peer.counters.drop(DropReason::Malformed);
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
        TunnResult::WriteToTunnelV6(..) => peer.counters.drop(DropReason::AllowedIps),
        TunnResult::Done => {}
        TunnResult::Err(e) => peer.counters.drop(reason_of(&e)),
    }
}

/// Whether a decrypted packet may go to the TUN: its source is the peer's tunnel address and
/// it is VXLAN to the data-path port for an encrypted network.
fn admit(shared: &Shared, snap: &Snapshot, peer: &Peer, pkt: &[u8], src: Ipv4Addr) -> bool {
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
fn check_decrypted(
    pkt: &[u8],
    src: Ipv4Addr,
    peer_tunnel: Ipv4Addr,
    own_tunnel: Ipv4Addr,
    data_port: u16,
    vnis: &BTreeSet<u32>,
) -> Result<(), DropReason> {
    if src != peer_tunnel {
        return Err(DropReason::AllowedIps);
    }
    // The tunnel carries the encrypted networks' VXLAN and nothing else: anything else would
    // reach the node's own stack (its services, its routing) from a peer's key alone.
    let vxlan = match wire::parse_vxlan_over_ipv4(pkt) {
        Ok(v) if v.dst_port == data_port && v.dst == own_tunnel => v,
        _ => return Err(DropReason::NotVxlan),
    };
    // The guard trusts the TUN, so a peer must not use it to reach plain networks' VNIs either.
    if !vnis.contains(&vxlan.vni) {
        return Err(DropReason::VniNotEncrypted);
    }
    Ok(())
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
