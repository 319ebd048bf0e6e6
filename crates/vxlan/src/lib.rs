//! shoal's overlay driver: Docker Swarm's VXLAN overlay networks on kernel objects programmed
//! over rtnetlink, with WireGuard (boringtun) instead of IPsec for encrypted networks.
//!
//! # Layers
//!
//! - [`wire`]: checked views of the VXLAN header and its outer IPv4/UDP headers (fuzzed).
//! - [`model`]: the vocabulary: [`NetworkSpec`], [`RemoteEndpoint`], [`PeerRecord`], [`Tables`],
//!   [`Mac`].
//! - [`reconcile`]: the sans-I/O core. From the gossip tables it computes, per local network, the
//!   static FDB entries (remote MAC → remote VTEP), the neighbour entries (remote IP → MAC) and the
//!   all-zeros flood entries, and [`reconcile::plan`] diffs them against what the kernel holds.
//! - [`Overlay`] (the driver): per network per node a sandbox namespace
//!   `<prefix>ov-<vni:06x>` holding a kernel VXLAN device `vx-<vni:06x>` (learning off, proxy
//!   ARP on, dstport = data-path port) that was created in the node's namespace and moved in,
//!   so its UDP socket stays on the node, and a macvlan `gw0` on it with the gateway address
//!   (MAC `02:42:<gw>`). Endpoints are macvlans (bridge mode) on the VXLAN device, moved into
//!   the task namespaces: one device hop fewer than Docker's bridge + veth, which is what lets
//!   the plain overlay run at kernel VXLAN speed. Each endpoint's interface holds the same
//!   permanent neighbour entries as the VXLAN device, so no endpoint ARPs across the overlay
//!   and a large cluster never fills the kernel's dynamic neighbour table. Everything is
//!   rtnetlink.
//! - [`wg`]: the encrypted data path. One TUN (`shoal-wg`) per node holding the node's tunnel
//!   address (in `240.0.0.0/4` unless configured), made with the node's first endpoint on an
//!   encrypted network and removed with its last; VXLAN devices of encrypted networks use tunnel addresses, so the kernel hands
//!   whole IPv4/UDP/VXLAN packets to the TUN, and a boringtun `noise::Tunn` per peer carries
//!   them over UDP 51820 (batched `recvmmsg`/`sendmmsg`, UDP GSO/GRO when the kernel has
//!   them, TUN offloads: 64 KB VXLAN GSO reads segmented in userspace and UDP GSO super-packet
//!   writes, fixed buffers, boringtun's timers).
//! - [`guard`]: the nftables table that drops cleartext VXLAN for encrypted VNIs.
//!
//! # Driving it (the agent)
//!
//! ```text
//! let overlay = Overlay::new(NodeNs::Current, OverlayConfig { node_id, name_prefix: "", underlay_addr, .. }).await?;
//! // gossip: publish overlay.wg_public_key() and the tunnel address in this node's peer record
//! overlay.attach(&network_spec, &EndpointSpec { id, task: &task_netns, ip, ifname: None }).await?;
//! overlay.set_tables(Tables { endpoints, peers }).await?;   // on every gossip table change
//! overlay.detach(&network_id, endpoint_id).await?;
//! overlay.peer_stats(); overlay.device_stats(); overlay.networks().await;  // metrics, inspect
//! drop(overlay)            // agent restart: kernel state stays, the next Overlay::new adopts it
//! overlay.shutdown().await // swarm leave: remove everything
//! ```

#![deny(unsafe_code)]

mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
mod kernel;
pub mod keys;
pub mod model;
mod overlay;
pub mod reconcile;
pub mod wg;
pub mod wire;

use std::net::Ipv4Addr;
use std::sync::Arc;

pub use keys::NodeKey;
pub use model::{
    DEFAULT_DATA_PORT, DEFAULT_TUNNEL_PREFIX, DEFAULT_WG_PORT, Mac, NetworkSpec, PeerRecord,
    RemoteEndpoint, Tables, default_tunnel_addr, tunnel_addr,
};
pub use overlay::{Attached, EndpointSpec, NetworkStatus, Overlay};
pub use wg::{DeviceStats, PacketDrop, PeerStats};

/// What went wrong. Validation errors ([`Error::Invalid`]) change nothing; kernel errors leave
/// the object being built removed again where the driver could undo it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (config, spec, endpoint): nothing was changed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The thing named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A netlink request failed.
    #[error("netlink: {op}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// The kernel state is not what the driver just made.
    #[error("kernel state: {0}")]
    Kernel(String),
    /// Entering or managing a namespace failed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
    /// A system call of the WireGuard data path failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Applying the nftables guard failed; the kernel kept the old guard (see
    /// [`shoal_nft::Error`] for when that is certain).
    #[error("nftables guard: {0}")]
    Nft(#[source] shoal_nft::Error),
}

/// The namespace that plays "the node": where the underlay address, the VXLAN UDP sockets, the
/// WireGuard TUN and the guard live. The real agent uses [`NodeNs::Current`]; tests and the lab
/// run several nodes on one machine, each in a named namespace.
#[derive(Debug, Clone)]
pub enum NodeNs {
    /// The namespace of the calling process.
    Current,
    /// A named namespace.
    Named(Arc<shoal_netns::NetNs>),
}

impl NodeNs {
    /// Runs `f` inside the node's namespace (on a helper thread for a named one).
    pub fn run<F, R>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self {
            NodeNs::Current => Ok(f()),
            NodeNs::Named(ns) => Ok(ns.run(f)?),
        }
    }

    /// A netlink handle in the node's namespace (inside a tokio runtime).
    pub fn netlink(&self) -> Result<rtnetlink::Handle, Error> {
        match self {
            NodeNs::Current => {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| Error::Io { op: "netlink socket", source: e })?;
                tokio::spawn(conn);
                Ok(handle)
            }
            NodeNs::Named(ns) => Ok(ns.netlink()?),
        }
    }
}

/// Encryption settings of a node (all encrypted networks share one WireGuard device).
#[derive(Debug, Clone)]
pub struct EncryptionConfig {
    /// The node's X25519 key.
    pub key: NodeKey,
    /// UDP port of the WireGuard endpoint (default 51820).
    pub port: u16,
    /// Name of the TUN device (default `shoal-wg`; the guard exempts it).
    pub tun_name: String,
    /// This node's address inside the tunnel (see [`tunnel_addr`]).
    pub tunnel_addr: Ipv4Addr,
    /// Prefix length of the tunnel range (default 4, for [`DEFAULT_TUNNEL_PREFIX`]).
    pub tunnel_prefix: u8,
}

impl EncryptionConfig {
    /// Defaults for a node with underlay address `underlay`.
    pub fn new(key: NodeKey, underlay: Ipv4Addr) -> Self {
        EncryptionConfig {
            key,
            port: DEFAULT_WG_PORT,
            tun_name: "shoal-wg".into(),
            tunnel_addr: default_tunnel_addr(underlay),
            tunnel_prefix: DEFAULT_TUNNEL_PREFIX.prefix_len(),
        }
    }
}

/// A node's overlay settings.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// This node's id in the gossip tables (its own records are skipped).
    pub node_id: String,
    /// Prefix of this node's sandbox namespace names, so several nodes on one machine never
    /// collide (`""` for the real agent, e.g. `"n1-"` in the lab). At most 40 bytes.
    pub name_prefix: String,
    /// This node's underlay (VTEP) address.
    pub underlay_addr: Ipv4Addr,
    /// Underlay MTU; `None` reads it from the link holding `underlay_addr`.
    pub underlay_mtu: Option<u32>,
    /// VXLAN destination port (the cluster's data-path port).
    pub data_port: u16,
    /// WireGuard settings; `None` means encrypted networks are refused.
    pub encryption: Option<EncryptionConfig>,
}

impl OverlayConfig {
    /// A plain-only config with defaults.
    pub fn new(node_id: impl Into<String>, underlay_addr: Ipv4Addr) -> Self {
        OverlayConfig {
            node_id: node_id.into(),
            name_prefix: String::new(),
            underlay_addr,
            underlay_mtu: None,
            data_port: DEFAULT_DATA_PORT,
            encryption: None,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.name_prefix.len() > 40
            || !self.name_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(Error::Invalid(format!(
                "name_prefix {:?}: at most 40 of [A-Za-z0-9_.-]",
                self.name_prefix
            )));
        }
        if self.data_port == 0 {
            return Err(Error::Invalid("data_port 0".into()));
        }
        if let Some(e) = &self.encryption {
            if e.port == 0 || e.port == self.data_port {
                return Err(Error::Invalid(format!(
                    "WireGuard port {} (must be non-zero and differ from the data-path port)",
                    e.port
                )));
            }
            if e.tun_name.is_empty()
                || e.tun_name.len() > 15
                || e.tun_name.contains(['/', ' ', '"'])
            {
                return Err(Error::Invalid(format!("TUN name {:?}", e.tun_name)));
            }
            if e.tunnel_prefix == 0 || e.tunnel_prefix > 30 {
                return Err(Error::Invalid(format!(
                    "tunnel_prefix {} (want 1..=30)",
                    e.tunnel_prefix
                )));
            }
        }
        Ok(())
    }
}
