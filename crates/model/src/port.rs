//! A published port, `-p 8100:80/udp` or `published=8100,target=80,mode=host,proxy-protocol=v2`:
//! parsed once, by the CLI, and kept as a [`PublishedPort`] through the API and the store to
//! the node's mesh.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::MeshPolicy;

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as Docker prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Who answers on a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortMode {
    /// The routing mesh: every node answers and balances over all tasks.
    #[default]
    Ingress,
    /// Only the nodes that run a task answer, each to its own tasks.
    Host,
}

impl PortMode {
    /// `ingress` or `host`, as Docker writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            PortMode::Ingress => "ingress",
            PortMode::Host => "host",
        }
    }
}

/// The PROXY protocol version of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    /// `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// Which path the routing mesh forwards a published port on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshPath {
    /// nftables DNAT and conntrack in the receiving node's kernel; no userspace copy.
    Kernel,
    /// The userspace proxy (splice), which also speaks PROXY protocol and runs HTTP checks.
    Proxy,
}

impl MeshPath {
    /// `kernel` or `proxy`.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshPath::Kernel => "kernel",
            MeshPath::Proxy => "proxy",
        }
    }
}

/// A published port of a service. Build one by parsing, which checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
    /// The store has kept this as `host_mode: bool` from the start.
    #[serde(rename = "host_mode", default, with = "host_mode")]
    pub mode: PortMode,
    /// A PROXY protocol header the mesh sends the task before the client's bytes (TCP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyVersion>,
    /// How the routing mesh forwards this port (`mesh=kernel|proxy`); unset lets
    /// [`PublishedPort::path`] choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshPath>,
}

/// `mode` as the store's `host_mode` flag.
mod host_mode {
    use super::PortMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(mode: &PortMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*mode == PortMode::Host)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PortMode, D::Error> {
        Ok(if bool::deserialize(d)? { PortMode::Host } else { PortMode::Ingress })
    }
}

/// Why a `--publish` value did not parse; each names the whole value it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("invalid published port {0:?}: want PUBLISHED:TARGET[/tcp|udp]")]
    Syntax(String),
    #[error("invalid port {value:?} in {spec:?}")]
    Number { value: String, spec: String },
    #[error("invalid protocol {value:?} in {spec:?}: tcp or udp")]
    Protocol { value: String, spec: String },
    #[error("invalid proxy-protocol {value:?} in {spec:?}: v1 or v2")]
    ProxyVersion { value: String, spec: String },
    #[error("invalid field {field:?} in {spec:?}")]
    Field { field: String, spec: String },
    #[error("{0:?}: target is required")]
    NoTarget(String),
    #[error("{0:?}: proxy-protocol is for TCP ports")]
    ProxyOverUdp(String),
    #[error("invalid mesh {value:?} in {spec:?}: kernel or proxy")]
    MeshPath { value: String, spec: String },
    #[error("{0:?}: mesh=kernel is for ingress ports without proxy-protocol")]
    KernelPath(String),
}

impl PublishedPort {
    /// A TCP port on the routing mesh.
    pub fn tcp(published: u16, target: u16) -> PublishedPort {
        PublishedPort {
            published,
            target,
            protocol: Protocol::Tcp,
            mode: PortMode::Ingress,
            proxy_protocol: None,
            mesh: None,
        }
    }

    /// Whether every node answers on it (rather than only those running a task).
    pub fn is_ingress(&self) -> bool {
        self.mode == PortMode::Ingress
    }

    /// The path the routing mesh forwards this port on, for a service with mesh `policy`: the
    /// one `mesh=` names, else the kernel where it does all the port asks
    /// ([`PublishedPort::kernel_can`]) as the proxy would, else the proxy. Every balancing
    /// method qualifies: the kernel path's Maglev map is the proxy's own table.
    pub fn path(&self, policy: &MeshPolicy) -> MeshPath {
        match self.mesh {
            Some(path) => path,
            None if self.kernel_can(policy) => MeshPath::Kernel,
            None => MeshPath::Proxy,
        }
    }

    /// Whether the kernel path can do everything this port and a service's `policy` ask: no
    /// PROXY header, not `mode=host`, and no connection or UDP flow limit or idle timeout
    /// other than the defaults (only the proxy enforces them).
    pub fn kernel_can(&self, policy: &MeshPolicy) -> bool {
        let d = MeshPolicy::default();
        let proxy_policy = policy.max_connections != d.max_connections
            || policy.idle_timeout_ms != d.idle_timeout_ms
            || policy.max_udp_flows != d.max_udp_flows
            || policy.max_udp_flows_per_source != d.max_udp_flows_per_source;
        self.is_ingress() && self.proxy_protocol.is_none() && !proxy_policy
    }
}

impl FromStr for PublishedPort {
    type Err = PortError;

    /// `8100:8100`, `8100:80/udp`, or the long form
    /// `published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v2,mesh=kernel`.
    fn from_str(s: &str) -> Result<PublishedPort, PortError> {
        let port = |v: &str| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(PortError::Number { value: v.into(), spec: s.into() }),
        };
        let proto = |v: &str| match v {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(PortError::Protocol { value: v.into(), spec: s.into() }),
        };
        if !s.contains('=') {
            let (ports, protocol) = match s.split_once('/') {
                Some((p, pr)) => (p, proto(pr)?),
                None => (s, Protocol::Tcp),
            };
            let (published, target) =
                ports.split_once(':').ok_or_else(|| PortError::Syntax(s.into()))?;
            return Ok(PublishedPort {
                published: port(published)?,
                target: port(target)?,
                protocol,
                mode: PortMode::Ingress,
                proxy_protocol: None,
                mesh: None,
            });
        }
        let (mut published, mut target, mut protocol, mut mode, mut proxy_protocol) =
            (None, None, Protocol::Tcp, PortMode::Ingress, None);
        let mut mesh = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("published", v)) => published = Some(port(v)?),
                Some(("target", v)) => target = Some(port(v)?),
                Some(("protocol", v)) => protocol = proto(v)?,
                Some(("mode", "host")) => mode = PortMode::Host,
                Some(("mode", "ingress")) => mode = PortMode::Ingress,
                Some(("proxy-protocol", "v1")) => proxy_protocol = Some(ProxyVersion::V1),
                Some(("proxy-protocol", "v2")) => proxy_protocol = Some(ProxyVersion::V2),
                Some(("proxy-protocol", v)) => {
                    return Err(PortError::ProxyVersion { value: v.into(), spec: s.into() });
                }
                Some(("mesh", "kernel")) => mesh = Some(MeshPath::Kernel),
                Some(("mesh", "proxy")) => mesh = Some(MeshPath::Proxy),
                Some(("mesh", v)) => {
                    return Err(PortError::MeshPath { value: v.into(), spec: s.into() });
                }
                _ => return Err(PortError::Field { field: part.into(), spec: s.into() }),
            }
        }
        let target = target.ok_or_else(|| PortError::NoTarget(s.into()))?;
        if proxy_protocol.is_some() && protocol != Protocol::Tcp {
            return Err(PortError::ProxyOverUdp(s.into()));
        }
        // The kernel path forwards packets; it cannot add a header or answer as the host.
        if mesh == Some(MeshPath::Kernel) && (proxy_protocol.is_some() || mode == PortMode::Host) {
            return Err(PortError::KernelPath(s.into()));
        }
        Ok(PublishedPort {
            published: published.unwrap_or(target),
            target,
            protocol,
            mode,
            proxy_protocol,
            mesh,
        })
    }
}

impl fmt::Display for PublishedPort {
    /// The short form where it says everything, else the long form; either parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, t, proto) = (self.published, self.target, self.protocol.as_str());
        if self.mode == PortMode::Ingress && self.proxy_protocol.is_none() && self.mesh.is_none() {
            return write!(f, "{p}:{t}/{proto}");
        }
        write!(f, "published={p},target={t},protocol={proto},mode={}", self.mode.as_str())?;
        if let Some(v) = self.proxy_protocol {
            write!(f, ",proxy-protocol={}", v.as_str())?;
        }
        if let Some(m) = self.mesh {
            write!(f, ",mesh={}", m.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<PublishedPort, String> {
        s.parse::<PublishedPort>().map_err(|e| e.to_string())
    }

    #[test]
    fn both_forms_parse_with_docker_defaults() {
        assert_eq!(parse("8100:8100").unwrap(), PublishedPort::tcp(8100, 8100));
        let p = parse("53:5353/udp").unwrap();
        assert_eq!((p.published, p.target, p.protocol), (53, 5353, Protocol::Udp));
        let p = parse("published=8080,target=80,protocol=udp,mode=host").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (8080, 80, Protocol::Udp, PortMode::Host)
        );
        assert_eq!(parse("target=80").unwrap(), PublishedPort::tcp(80, 80));
        let p =
            parse("published=8100,target=80,protocol=tcp,mode=ingress,proxy-protocol=v2").unwrap();
        assert_eq!((p.published, p.proxy_protocol), (8100, Some(ProxyVersion::V2)));
        let p = parse("published=8100,target=80,proxy-protocol=v1").unwrap();
        assert_eq!(p.proxy_protocol, Some(ProxyVersion::V1));
        assert_eq!(parse("8100:80").unwrap().mesh, None);
        let p = parse("published=8100,target=80,protocol=udp,mesh=kernel").unwrap();
        assert_eq!((p.protocol, p.mesh), (Protocol::Udp, Some(MeshPath::Kernel)));
        let p = parse("published=8100,target=80,proxy-protocol=v1,mesh=proxy").unwrap();
        assert_eq!(p.mesh, Some(MeshPath::Proxy));
    }

    #[test]
    fn the_kernel_path_is_the_default_where_it_can_do_everything_asked() {
        let default = MeshPolicy::default();
        let port = |s: &str| parse(s).unwrap();
        let path = |s: &str, policy: &MeshPolicy| port(s).path(policy);
        assert_eq!(path("8100:80", &default), MeshPath::Kernel);
        assert_eq!(path("8100:80/udp", &default), MeshPath::Kernel);
        assert_eq!(path("published=8100,target=80,mesh=proxy", &default), MeshPath::Proxy);
        // What only the proxy does keeps a plain port on the proxy.
        let capped = MeshPolicy { max_connections: 2, ..MeshPolicy::default() };
        assert_eq!(path("8100:80", &capped), MeshPath::Proxy);
        assert_eq!(path("published=8100,target=80,mode=host", &default), MeshPath::Proxy);
        let pp = "published=8100,target=80,proxy-protocol=v2";
        assert_eq!(path(pp, &default), MeshPath::Proxy);
        assert!(port("8100:80").kernel_can(&default));
        assert!(port("8100:80/udp").kernel_can(&default));
        assert!(!port("published=8100,target=80,proxy-protocol=v2").kernel_can(&default));
        assert!(!port("published=8100,target=80,mode=host").kernel_can(&default));
        for policy in [
            MeshPolicy { max_connections: 2, ..MeshPolicy::default() },
            MeshPolicy { idle_timeout_ms: 1_000, ..MeshPolicy::default() },
            MeshPolicy { max_udp_flows: 5, ..MeshPolicy::default() },
            MeshPolicy { max_udp_flows_per_source: 5, ..MeshPolicy::default() },
        ] {
            assert!(!port("8100:80").kernel_can(&policy), "{policy:?}");
        }
        // Checks and their timing are the mesh's either way: the kernel path follows them.
        let checked = MeshPolicy { check_interval_ms: 500, check_fall: 1, ..MeshPolicy::default() };
        assert!(port("8100:80").kernel_can(&checked));
    }

    #[test]
    fn bad_ports_say_why() {
        for (bad, why) in [
            ("8100", "PUBLISHED:TARGET"),
            ("0:80", "invalid port \"0\""),
            ("70000:80", "invalid port \"70000\""),
            ("80:", "invalid port \"\""),
            ("80:80/sctp", "invalid protocol"),
            ("published=80", "target is required"),
            ("published=80,target=80,mode=bridge", "invalid field"),
            ("published=80,target=80,proxy-protocol=v3", "v1 or v2"),
            ("published=53,target=53,protocol=udp,proxy-protocol=v2", "for TCP ports"),
            ("published=80,target=80,mesh=ipvs", "kernel or proxy"),
            ("published=80,target=80,mesh=kernel,proxy-protocol=v2", "mesh=kernel is for"),
            ("published=80,target=80,mesh=kernel,mode=host", "mesh=kernel is for"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_store_keeps_the_mode_as_host_mode() {
        let p = parse("published=8080,target=80,mode=host").unwrap();
        let v = serde_json::to_value(p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"published": 8080, "target": 80, "protocol": "tcp", "host_mode": true})
        );
        let old = serde_json::json!({"published": 80, "target": 80, "protocol": "udp"});
        let p: PublishedPort = serde_json::from_value(old).unwrap();
        assert_eq!((p.mode, p.protocol), (PortMode::Ingress, Protocol::Udp));
    }

    fn any_port() -> impl Strategy<Value = PublishedPort> {
        (1..=u16::MAX, 1..=u16::MAX, any::<bool>(), any::<bool>(), 0..3u8, 0..3u8).prop_map(
            |(published, target, udp, host, proxy, mesh)| {
                let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                let proxy_protocol = match (proxy, protocol) {
                    (1, Protocol::Tcp) => Some(ProxyVersion::V1),
                    (2, Protocol::Tcp) => Some(ProxyVersion::V2),
                    _ => None,
                };
                let mesh = match mesh {
                    1 if !host && proxy_protocol.is_none() => Some(MeshPath::Kernel),
                    2 => Some(MeshPath::Proxy),
                    _ => None,
                };
                PublishedPort {
                    published,
                    target,
                    protocol,
                    mode: if host { PortMode::Host } else { PortMode::Ingress },
                    proxy_protocol,
                    mesh,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn display_parses_back(p in any_port()) {
            prop_assert_eq!(p.to_string().parse::<PublishedPort>(), Ok(p));
        }

        #[test]
        fn any_text_parses_or_says_why(s in "[a-z0-9=,:/-]{0,40}") {
            if let Ok(p) = s.parse::<PublishedPort>() {
                prop_assert_eq!(p.to_string().parse::<PublishedPort>(), Ok(p));
            }
        }
    }
}
