//! Vocabulary: what the agent tells the mesh (services, published ports, backends) and the
//! knobs of balancing, health checking and forwarding. Plain data, validated by [`ServiceSpec::validate`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::Error;

/// Layer-4 protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Both TCP and UDP on the same port number.
    Both,
}

impl Protocol {
    /// Whether this publishes a TCP listener.
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Both)
    }
    /// Whether this publishes a UDP listener.
    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Both)
    }
}

/// How a port is published: on every node (the routing mesh) or only where a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PublishMode {
    /// Every node listens and forwards to any healthy backend (Swarm's `mode=ingress`).
    #[default]
    Ingress,
    /// The node listens only while it has a local backend and forwards only to local backends.
    Host,
}

/// PROXY protocol header sent to the backend before the client's bytes (TCP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProxyProtocol {
    /// No header (default).
    #[default]
    Off,
    /// Text header, version 1.
    V1,
    /// Binary header, version 2.
    V2,
}

/// One published port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// The port clients connect to on every node.
    pub published: u16,
    /// The port the tasks listen on.
    pub target: u16,
    /// TCP, UDP or both.
    pub protocol: Protocol,
    /// Address to listen on; `None` means all addresses (IPv4 and IPv6 where available).
    pub listen: Option<IpAddr>,
    /// Ingress (mesh) or host publishing.
    pub mode: PublishMode,
    /// Opt-in PROXY protocol header to the backend.
    pub proxy_protocol: ProxyProtocol,
}

impl PortSpec {
    /// A TCP ingress port `published` → `target` on all addresses, no PROXY header.
    pub fn tcp(published: u16, target: u16) -> Self {
        PortSpec {
            published,
            target,
            protocol: Protocol::Tcp,
            listen: None,
            mode: PublishMode::Ingress,
            proxy_protocol: ProxyProtocol::Off,
        }
    }
    /// A UDP ingress port `published` → `target` on all addresses.
    pub fn udp(published: u16, target: u16) -> Self {
        PortSpec { protocol: Protocol::Udp, ..PortSpec::tcp(published, target) }
    }
}

/// Balancing policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Power of two random choices, the one with fewer active connections wins (default).
    #[default]
    P2cLeastConn,
    /// Strict rotation over the eligible backends.
    RoundRobin,
    /// Same client address → same backend while the backend set is stable (Maglev table).
    SourceHash,
}

/// The active health check of a service's backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// A TCP connect to the backend's target port succeeds.
    Tcp,
    /// `GET path HTTP/1.1` answers with a 2xx or 3xx status.
    Http {
        /// Request path, e.g. `/healthz`.
        path: String,
    },
}

/// Active and passive health parameters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthSpec {
    /// Active check; `None` means task state alone decides (plus passive ejection).
    pub check: Option<CheckKind>,
    /// Time between active checks of one backend.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Consecutive connect failures (from real traffic) that eject a backend (default 1: at
    /// once); 0 disables.
    pub eject_after: u32,
    /// First ejection period; it doubles on each ejection in a row, up to `eject_max`.
    pub eject_base: Duration,
    /// Longest ejection period.
    pub eject_max: Duration,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            check: Some(CheckKind::Tcp),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            // One refused or timed-out connect ejects a backend at once (the mesh retries the
            // connection elsewhere): a task that stopped listening costs one attempt, not three.
            eject_after: 1,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
        }
    }
}

/// Everything about one service that the mesh needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique service name (the key of `set_service` / `remove_service`).
    pub name: String,
    /// Published ports.
    pub ports: Vec<PortSpec>,
    /// Balancing policy.
    pub algorithm: Algorithm,
    /// Health checking.
    pub health: HealthSpec,
    /// How long a removed backend's open connections may live before they are reset.
    pub drain_grace: Duration,
    /// Close a TCP connection (with RST both ways) after this long without bytes; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Forget a UDP flow after this long without datagrams.
    pub udp_idle_timeout: Duration,
    /// Limit on how long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// Most TCP connections this node's mesh keeps open for the service; further ones are
    /// refused (reset at once) and counted. `None` = no limit.
    pub max_connections: Option<u32>,
    /// Most UDP flows this node's mesh keeps for the service; a datagram that would open one
    /// more is dropped and counted. `None` = no limit.
    pub max_udp_flows: Option<u32>,
    /// Most UDP flows one client address may hold on one published port. `None` = no limit.
    pub max_udp_flows_per_source: Option<u32>,
}

impl ServiceSpec {
    /// A service with defaults: P2C, TCP health check every 2 s (rise 2, fall 3), 10 s drain grace,
    /// no TCP idle timeout, 30 s UDP flow timeout, no connection or flow limits.
    pub fn new(name: impl Into<String>, ports: Vec<PortSpec>) -> Self {
        ServiceSpec {
            name: name.into(),
            ports,
            algorithm: Algorithm::default(),
            health: HealthSpec::default(),
            drain_grace: Duration::from_secs(10),
            idle_timeout: None,
            udp_idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            max_connections: None,
            max_udp_flows: None,
            max_udp_flows_per_source: None,
        }
    }

    /// Checks the spec; an invalid spec is rejected before anything changes.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, why: String| Error::InvalidSpec {
            service: self.name.clone(),
            field,
            why,
        };
        if self.name.is_empty() {
            return Err(bad("name", "empty".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.ports {
            if p.published == 0 || p.target == 0 {
                return Err(bad("ports", format!("port 0 in {}:{}", p.published, p.target)));
            }
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let on = match proto {
                    Protocol::Tcp => p.protocol.tcp(),
                    _ => p.protocol.udp(),
                };
                if on && !seen.insert((p.published, proto)) {
                    return Err(bad("ports", format!("{}/{proto:?} published twice", p.published)));
                }
            }
            if p.proxy_protocol != ProxyProtocol::Off && p.protocol == Protocol::Udp {
                return Err(bad("ports", "PROXY protocol is for TCP ports".into()));
            }
        }
        let h = &self.health;
        if h.rise == 0 || h.fall == 0 {
            return Err(bad("health", "rise and fall must be at least 1".into()));
        }
        if h.check.is_some() && (h.interval.is_zero() || h.timeout.is_zero()) {
            return Err(bad("health", "interval and timeout must be positive".into()));
        }
        if let Some(CheckKind::Http { path }) = &h.check
            && (!path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f))
        {
            return Err(bad("health", format!("bad HTTP check path {path:?}")));
        }
        if self.udp_idle_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(bad("timeouts", "must be positive".into()));
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(bad("idle_timeout", "zero; use None for no timeout".into()));
        }
        let limits = [
            ("max_connections", self.max_connections),
            ("max_udp_flows", self.max_udp_flows),
            ("max_udp_flows_per_source", self.max_udp_flows_per_source),
        ];
        for (field, limit) in limits {
            if limit == Some(0) {
                return Err(bad(field, "zero; use None for no limit".into()));
            }
        }
        Ok(())
    }
}

/// Where the mesh's upstream connections and flows come from, node-wide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClientAddr {
    /// From the ingress sandbox's own address: tasks see the node, not the client (the
    /// default of a bare [`crate::Mesh`]; needs nothing from the namespaces).
    #[default]
    Sandbox,
    /// From the client's own address and port (`IP_TRANSPARENT`), so tasks see the real
    /// client. The sandbox and the tasks must route the replies back (the agent programs that
    /// with `shoal-return`). Clients the sandbox cannot speak for fall back to the sandbox's
    /// address: IPv6, loopback, and addresses in `except` (the ingress subnet, whose addresses
    /// the tasks reach directly rather than through the sandbox).
    Keep {
        /// Client networks that fall back to the sandbox's address.
        except: Vec<ipnet::Ipv4Net>,
    },
}

impl ClientAddr {
    /// The address an upstream connection for `client` comes from, or `None` for the
    /// sandbox's own.
    pub fn source_for(&self, client: SocketAddr) -> Option<SocketAddr> {
        let ClientAddr::Keep { except } = self else { return None };
        let IpAddr::V4(ip) = client.ip().to_canonical() else { return None };
        let unusable = ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_broadcast()
            || except.iter().any(|n| n.contains(&ip));
        (!unusable).then_some(SocketAddr::new(IpAddr::V4(ip), client.port()))
    }
}

/// The task state the tables report for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TaskState {
    /// Not running yet (new, pending, starting).
    #[default]
    Starting,
    /// Running; its own health check (if any) passes or it has none.
    Healthy,
    /// Running but its own health check fails.
    Unhealthy,
    /// Shutting down or gone.
    Stopped,
}

/// One backend (task) of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    /// Stable id (the task id); metrics are keyed by it.
    pub id: String,
    /// Task address on the ingress network (the port is the service's `target`). Maglev
    /// placement is keyed by it, as on the kernel path, which knows no task ids.
    pub addr: IpAddr,
    /// Task state from the tables.
    pub state: TaskState,
    /// Whether the task runs on this node (only local backends serve `mode=host` ports).
    pub local: bool,
}

impl BackendSpec {
    /// A healthy, remote backend.
    pub fn new(id: impl Into<String>, addr: IpAddr) -> Self {
        BackendSpec { id: id.into(), addr, state: TaskState::Healthy, local: false }
    }

    /// The socket address for a target port.
    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr, port)
    }
}
