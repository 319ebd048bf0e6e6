//! Vocabulary shared by the reconciler, the driver and the agent: networks, endpoints, peers,
//! MAC addresses. Plain data, no I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Smallest VNI shoal hands out (outside the 802.1Q range, as Swarm does).
pub const VNI_MIN: u32 = 4096;
/// Default VXLAN data-path port (IANA).
pub const DEFAULT_DATA_PORT: u16 = 4789;
/// Default WireGuard port for encrypted overlays.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// Bytes VXLAN adds on an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes WireGuard adds on an IPv4 underlay (IPv4 20 + UDP 8 + WireGuard data header/tag 32).
pub const WG_OVERHEAD: u32 = 60;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zeros address, the key of VXLAN flood (BUM) entries.
    pub const ZERO: Mac = Mac([0; 6]);

    /// Docker's MAC for an endpoint: `02:42:` followed by the four IPv4 bytes.
    pub fn from_ipv4(ip: Ipv4Addr) -> Mac {
        let o = ip.octets();
        Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    /// The address as a byte slice.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses the 6 bytes a netlink attribute carries.
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a MAC from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: want six hex bytes separated by ':'")]
pub struct MacParseError(pub String);

impl FromStr for Mac {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(':') {
            if n == 6 || part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
            n += 1;
        }
        if n != 6 {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(Mac(out))
    }
}

/// An overlay network as the driver needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Cluster-wide network id (opaque to the driver; at most 64 bytes of `[A-Za-z0-9_.-]`).
    pub id: String,
    /// VXLAN Network Identifier, [`VNI_MIN`] and up, at most 24 bits.
    pub vni: u32,
    /// The network's subnet; task addresses come from it.
    pub subnet: Ipv4Net,
    /// The gateway address, held by each node's sandbox bridge.
    pub gateway: Ipv4Addr,
    /// Whether traffic between nodes rides inside WireGuard.
    pub encrypted: bool,
}

/// An endpoint on another node, from the gossip endpoint table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    /// The network it is attached to.
    pub network: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
    /// Its MAC (normally [`Mac::from_ipv4`] of `ip`).
    pub mac: Mac,
    /// The node that hosts it.
    pub node: String,
}

/// Another node, from the gossip peer table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Node id.
    pub node: String,
    /// Its underlay address: the VTEP of plain networks and the WireGuard endpoint.
    pub vtep: Ipv4Addr,
    /// Its address inside the WireGuard tunnel (needed for encrypted networks).
    pub tunnel: Option<Ipv4Addr>,
    /// Its WireGuard (X25519) public key (needed for encrypted networks).
    pub wg_public: Option<[u8; 32]>,
}

/// The remote half of the world as gossip sees it: what the reconciler is a function of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    /// Endpoints of all nodes (the local node's own are ignored).
    pub endpoints: Vec<RemoteEndpoint>,
    /// All known nodes (the local node's own record is ignored).
    pub peers: Vec<PeerRecord>,
}

/// The default range of tunnel addresses: `240.0.0.0/4`, the reserved "class E" block. Linux
/// treats it as ordinary unicast, nothing on a network uses it, and it leaves alone the ranges
/// that other overlays take (CGNAT and Tailscale's `100.64.0.0/10`, the private blocks of
/// Docker's pools and of cloud VPCs). Tunnel addresses never leave the node: the kernel routes
/// them into the TUN, and the wire carries them only inside WireGuard.
pub const DEFAULT_TUNNEL_PREFIX: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4);

/// A node's tunnel address: the range's network bits, then the underlay address's host bits (its
/// low 28 bits for a /4). Unique as long as the nodes' underlay addresses differ in those bits,
/// which every underlay no larger than the range guarantees; every node must use the same range.
pub fn tunnel_addr(range: Ipv4Net, underlay: Ipv4Addr) -> Ipv4Addr {
    let host = u32::from(underlay) & u32::from(range.hostmask());
    Ipv4Addr::from(u32::from(range.network()) | host)
}

/// [`tunnel_addr`] in [`DEFAULT_TUNNEL_PREFIX`].
pub fn default_tunnel_addr(underlay: Ipv4Addr) -> Ipv4Addr {
    tunnel_addr(DEFAULT_TUNNEL_PREFIX, underlay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_mac_from_ip() {
        let m = Mac::from_ipv4(Ipv4Addr::new(10, 0, 1, 7));
        assert_eq!(m.to_string(), "02:42:0a:00:01:07");
        assert_eq!("02:42:0a:00:01:07".parse::<Mac>(), Ok(m));
        assert!("02:42:0a:00:01".parse::<Mac>().is_err());
        assert!("02:42:0a:00:01:07:08".parse::<Mac>().is_err());
        assert!("zz:42:0a:00:01:07".parse::<Mac>().is_err());
    }

    #[test]
    fn tunnel_addr_keeps_low_bits() {
        assert_eq!(
            default_tunnel_addr(Ipv4Addr::new(192, 168, 7, 3)),
            Ipv4Addr::new(240, 168, 7, 3)
        );
        assert_eq!(default_tunnel_addr(Ipv4Addr::new(10, 0, 0, 1)), Ipv4Addr::new(250, 0, 0, 1));
        let range: Ipv4Net = "172.31.0.0/16".parse().expect("range");
        assert_eq!(tunnel_addr(range, Ipv4Addr::new(198, 19, 7, 3)), Ipv4Addr::new(172, 31, 7, 3));
    }
}
