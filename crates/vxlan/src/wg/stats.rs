//! What the encrypted data path counts: drops by reason, per peer and node-wide.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use boringtun::noise::errors::WireGuardError;
use serde::Serialize;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketDrop {
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

pub(super) const REASONS: [PacketDrop; 10] = [
    PacketDrop::Decrypt,
    PacketDrop::Replay,
    PacketDrop::Handshake,
    PacketDrop::AllowedIps,
    PacketDrop::VniNotEncrypted,
    PacketDrop::NotVxlan,
    PacketDrop::Malformed,
    PacketDrop::TunWrite,
    PacketDrop::UdpSend,
    PacketDrop::Expired,
];

pub(super) fn reason_of(e: &WireGuardError) -> PacketDrop {
    match e {
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => PacketDrop::Replay,
        WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::UnexpectedPacket
        | WireGuardError::UnderLoad => PacketDrop::Handshake,
        WireGuardError::ConnectionExpired | WireGuardError::NoCurrentSession => PacketDrop::Expired,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            PacketDrop::Malformed
        }
        _ => PacketDrop::Decrypt,
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) tx_packets: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) rx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) handshakes_sent: AtomicU64,
    pub(super) drops: [AtomicU64; REASONS.len()],
}

impl Counters {
    pub(super) fn drop(&self, r: PacketDrop) {
        if let Some(i) = REASONS.iter().position(|x| *x == r) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

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
    pub drops: Vec<(PacketDrop, u64)>,
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
pub(super) struct DeviceCounters {
    pub(super) rx_unknown_peer: AtomicU64,
    pub(super) tx_unknown_peer: AtomicU64,
    pub(super) tx_malformed: AtomicU64,
    pub(super) tun_gso_writes: AtomicU64,
    pub(super) tun_gso_datagrams: AtomicU64,
    pub(super) tun_tso_reads: AtomicU64,
}
