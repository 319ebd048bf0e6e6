//! The address flags of `swarm init/join`, with Docker's meanings, defaults and error words:
//!
//! - `--listen-addr ADDR|IFACE[:PORT]`: where the control plane listens (default `0.0.0.0:2377`);
//! - `--advertise-addr ADDR|IFACE[:PORT]`: the control address other nodes use (default: the
//!   agent's configured address, else the address of the host's only interface, else of the
//!   default-route interface; the port defaults to the listen port);
//! - `--data-path-addr ADDR|IFACE`: where VXLAN and WireGuard run (default: the advertise
//!   address); it must be an IPv4 address of this host, since the overlay sends from it;
//! - `--data-path-port PORT`: the swarm's VXLAN port, chosen once at init (default 4789).
//!
//! An interface name stands for its address. The functions here are pure: they take a snapshot
//! of the host's interfaces ([`Interfaces::read`]), so the choices are unit-tested.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The swarm's VXLAN port when `swarm init` is not told another (IANA's).
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;

/// One network interface: its name and addresses, whether it is up and whether it carries the
/// default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addrs: Vec<IpAddr>,
    pub up: bool,
    pub loopback: bool,
    pub default_route: bool,
}

/// The host's interfaces, as the address flags see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interfaces(pub Vec<Interface>);

impl Interfaces {
    /// The interfaces of the calling thread's network namespace.
    pub fn read() -> Interfaces {
        use nix::net::if_::InterfaceFlags;
        let default_if = default_route_interface();
        let mut out: Vec<Interface> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().into_iter().flatten() {
            let name = ifa.interface_name.clone();
            let i = match out.iter().position(|i| i.name == name) {
                Some(i) => i,
                None => {
                    out.push(Interface {
                        default_route: default_if.as_deref() == Some(name.as_str()),
                        name,
                        addrs: Vec::new(),
                        up: ifa.flags.contains(InterfaceFlags::IFF_UP),
                        loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                    });
                    out.len() - 1
                }
            };
            let addr = ifa.address.as_ref().and_then(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            });
            if let Some(a) = addr {
                out[i].addrs.push(a);
            }
        }
        Interfaces(out)
    }

    fn by_name(&self, name: &str) -> Option<&Interface> {
        self.0.iter().find(|i| i.name == name)
    }

    /// Whether `ip` is an address of one of the interfaces.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|i| i.addrs.contains(&ip))
    }
}

/// The interface of the IPv4 default route, from `/proc/net/route`.
fn default_route_interface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let (iface, dest, _gw, _flags, _, _, _, mask) = (
            f.next()?,
            f.next()?,
            f.next()?,
            f.next()?,
            f.next()?,
            f.next()?,
            f.next()?,
            f.next()?,
        );
        (dest == "00000000" && mask == "00000000").then(|| iface.to_owned())
    })
}

/// Addresses that can name this host to others: not loopback, not link-local, not unspecified.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        IpAddr::V6(a) => {
            !a.is_loopback()
                && !a.is_unspecified()
                && !a.is_unicast_link_local()
                && !a.is_multicast()
        }
    }
}

/// An interface's address (Docker's `resolveInterfaceAddr`): its only IPv4 address, else its
/// only IPv6 one.
fn interface_addr(i: &Interface) -> Result<IpAddr, String> {
    let pick = |v4: bool| -> Result<Option<IpAddr>, String> {
        let mut all = i.addrs.iter().filter(|a| a.is_ipv4() == v4 && usable(a));
        match (all.next(), all.next()) {
            (Some(a), Some(b)) => Err(format!(
                "could not choose an IP address to advertise since this system has multiple addresses on interface {} ({a} and {b})",
                i.name
            )),
            (a, _) => Ok(a.copied()),
        }
    };
    match (pick(true)?, pick(false)?) {
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Err(format!("interface {} has no usable IP address", i.name)),
    }
}

/// An IP address, or the name of an interface standing for its address (Docker's
/// `resolveInputIPAddr`).
fn resolve_host(
    ifaces: &Interfaces,
    host: &str,
    unspecified_ok: bool,
    what: &str,
) -> Result<IpAddr, String> {
    if let Some(i) = ifaces.by_name(host) {
        return interface_addr(i);
    }
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) if unspecified_ok || !ip.is_unspecified() => Ok(ip),
        _ => Err(what.to_owned()),
    }
}

/// Splits `HOST[:PORT]` (`[V6]:PORT` for IPv6); a bare IPv6 address has no port.
fn split_port(s: &str, what: &str) -> Result<(String, Option<u16>), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), Some(sa.port())));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{what}: invalid port {port:?} in {s:?}"))?;
            Ok((host.to_owned(), Some(port)))
        }
        _ => Ok((s.to_owned(), None)),
    }
}

const BAD_LISTEN: &str =
    "listen address must be an IP address or network interface (with optional port number)";
const BAD_ADVERTISE: &str = "advertise address must be a non-zero IP address or network interface (with optional port number)";
const BAD_DATA_PATH: &str =
    "data path address must be a non-zero IP address or network interface (without a port number)";

/// `--listen-addr`: `0.0.0.0:<default_port>` when not given.
pub fn listen_addr(
    ifaces: &Interfaces,
    given: Option<&str>,
    default_port: u16,
) -> Result<SocketAddr, String> {
    let Some(s) = given.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), default_port));
    };
    let (host, port) = split_port(s, BAD_LISTEN)?;
    let ip = resolve_host(ifaces, &host, true, BAD_LISTEN)?;
    Ok(SocketAddr::new(ip, port.unwrap_or(default_port)))
}

/// `--advertise-addr`: the port defaults to the listen port; the address to `configured` (the
/// agent's own setting), else the host's address ([`system_addr`]).
pub fn advertise_addr(
    ifaces: &Interfaces,
    given: Option<&str>,
    configured: Option<IpAddr>,
    listen_port: u16,
) -> Result<SocketAddr, String> {
    match given.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => {
            let (host, port) = split_port(s, BAD_ADVERTISE)?;
            let ip = resolve_host(ifaces, &host, false, BAD_ADVERTISE)?;
            Ok(SocketAddr::new(ip, port.unwrap_or(listen_port)))
        }
        None => {
            let ip = match configured {
                Some(ip) => ip,
                None => system_addr(ifaces)
                    .map_err(|e| format!("{e} - specify one with --advertise-addr"))?,
            };
            Ok(SocketAddr::new(ip, listen_port))
        }
    }
}

/// `--data-path-addr`: the advertise address when not given. It must be an IPv4 address held
/// by this host: VXLAN and WireGuard send from it.
pub fn data_path_addr(
    ifaces: &Interfaces,
    given: Option<&str>,
    advertise: IpAddr,
) -> Result<Ipv4Addr, String> {
    let ip = match given.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => {
            if split_port(s, BAD_DATA_PATH)?.1.is_some() && s.parse::<IpAddr>().is_err() {
                return Err(BAD_DATA_PATH.to_owned());
            }
            resolve_host(ifaces, s, false, BAD_DATA_PATH)?
        }
        None => advertise,
    };
    let IpAddr::V4(v4) = ip else {
        return Err(format!(
            "data path address {ip} is IPv6: the overlay runs over IPv4; give an IPv4 address or interface with --data-path-addr"
        ));
    };
    if !ifaces.holds(ip) {
        let hint = if given.is_some() { "" } else { " (the advertise address)" };
        return Err(format!(
            "data path address {ip}{hint} is not an address of this host; give one of its addresses or interfaces with --data-path-addr"
        ));
    }
    Ok(v4)
}

/// `--data-path-port`: Docker's range for it, 1024-49151 (4789 when not given).
pub fn data_path_port(given: Option<u16>) -> Result<u16, String> {
    match given {
        None | Some(0) => Ok(DEFAULT_DATA_PATH_PORT),
        Some(p) if (1024..=49151).contains(&p) => Ok(p),
        Some(p) => Err(format!("Datapath port number is not in valid range (1024-49151) : {p}")),
    }
}

/// The host's address when none is given (Docker's `resolveSystemAddr`): the address of the
/// only interface that is up and has one; with several, that of the default route's interface.
pub fn system_addr(ifaces: &Interfaces) -> Result<IpAddr, String> {
    let found: Vec<&Interface> =
        ifaces.0.iter().filter(|i| i.up && !i.loopback && i.addrs.iter().any(usable)).collect();
    let first = |i: &Interface| i.addrs.iter().copied().find(usable);
    match found.as_slice() {
        [] => Err("could not find the system's IP address".to_owned()),
        [only] => interface_addr(only),
        [a, b, ..] => match found.iter().find(|i| i.default_route) {
            Some(i) => interface_addr(i),
            None => Err(format!(
                "could not choose an IP address to advertise since this system has multiple addresses on different interfaces ({} on {} and {} on {})",
                first(a).map(|x| x.to_string()).unwrap_or_default(),
                a.name,
                first(b).map(|x| x.to_string()).unwrap_or_default(),
                b.name
            )),
        },
    }
}

/// A manager's address for `swarm join`: an IP, or IP:PORT; the port defaults to `default_port`.
pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("invalid address {s:?}: expected IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, addrs: &[&str], default_route: bool) -> Interface {
        Interface {
            name: name.into(),
            addrs: addrs.iter().map(|a| a.parse().expect("addr")).collect(),
            up: true,
            loopback: name == "lo",
            default_route,
        }
    }

    fn host() -> Interfaces {
        Interfaces(vec![
            iface("lo", &["127.0.0.1", "::1"], false),
            iface("eth0", &["198.18.1.5", "fe80::1"], true),
            iface("eth1", &["198.19.1.5"], false),
            iface("two", &["198.19.2.1", "198.19.2.2"], false),
        ])
    }

    #[test]
    fn listen_defaults_and_interfaces() {
        let h = host();
        assert_eq!(listen_addr(&h, None, 2377).unwrap().to_string(), "0.0.0.0:2377");
        assert_eq!(listen_addr(&h, Some("eth1"), 2377).unwrap().to_string(), "198.19.1.5:2377");
        assert_eq!(
            listen_addr(&h, Some("eth1:4000"), 2377).unwrap().to_string(),
            "198.19.1.5:4000"
        );
        assert_eq!(listen_addr(&h, Some("0.0.0.0:3000"), 2377).unwrap().port(), 3000);
        assert_eq!(listen_addr(&h, Some("nope"), 2377).unwrap_err(), BAD_LISTEN);
        assert!(listen_addr(&h, Some("eth0:x"), 2377).unwrap_err().contains("invalid port"));
    }

    #[test]
    fn advertise_takes_ip_interface_or_the_default() {
        let h = host();
        let a = |s| advertise_addr(&h, s, None, 2377);
        assert_eq!(a(Some("198.18.1.5")).unwrap().to_string(), "198.18.1.5:2377");
        assert_eq!(a(Some("eth1:2400")).unwrap().to_string(), "198.19.1.5:2400");
        assert_eq!(a(Some("[2001:db8::1]:2400")).unwrap().to_string(), "[2001:db8::1]:2400");
        assert_eq!(a(None).unwrap().to_string(), "198.18.1.5:2377", "the default route's");
        assert_eq!(a(Some("0.0.0.0")).unwrap_err(), BAD_ADVERTISE);
        assert_eq!(a(Some("eht0")).unwrap_err(), BAD_ADVERTISE);
        assert!(a(Some("two")).unwrap_err().contains("multiple addresses on interface two"));
        let configured: IpAddr = "198.19.1.5".parse().unwrap();
        assert_eq!(advertise_addr(&h, None, Some(configured), 2377).unwrap().ip(), configured);
    }

    #[test]
    fn system_addr_is_the_only_or_the_default_route_interface() {
        let only =
            Interfaces(vec![iface("lo", &["127.0.0.1"], false), iface("e", &["10.1.1.1"], false)]);
        assert_eq!(system_addr(&only).unwrap().to_string(), "10.1.1.1");
        let two =
            Interfaces(vec![iface("a", &["10.1.1.1"], false), iface("b", &["10.2.2.2"], false)]);
        let e = system_addr(&two).unwrap_err();
        assert!(e.contains("10.1.1.1 on a and 10.2.2.2 on b"), "{e}");
        let e = advertise_addr(&two, None, None, 2377).unwrap_err();
        assert!(e.ends_with("specify one with --advertise-addr"), "{e}");
        let mut down = two.clone();
        down.0[1].up = false;
        assert_eq!(system_addr(&down).unwrap().to_string(), "10.1.1.1");
        assert!(system_addr(&Interfaces(vec![iface("lo", &["127.0.0.1"], false)])).is_err());
    }

    #[test]
    fn data_path_addr_is_a_local_ipv4() {
        let h = host();
        let adv: IpAddr = "198.18.1.5".parse().unwrap();
        assert_eq!(data_path_addr(&h, None, adv).unwrap().to_string(), "198.18.1.5");
        assert_eq!(data_path_addr(&h, Some("eth1"), adv).unwrap().to_string(), "198.19.1.5");
        assert_eq!(data_path_addr(&h, Some("198.19.1.5"), adv).unwrap().to_string(), "198.19.1.5");
        assert_eq!(data_path_addr(&h, Some("eth1:4789"), adv).unwrap_err(), BAD_DATA_PATH);
        assert_eq!(data_path_addr(&h, Some("0.0.0.0"), adv).unwrap_err(), BAD_DATA_PATH);
        let e = data_path_addr(&h, Some("203.0.113.9"), adv).unwrap_err();
        assert!(e.contains("not an address of this host"), "{e}");
        let nat: IpAddr = "203.0.113.9".parse().unwrap();
        let e = data_path_addr(&h, None, nat).unwrap_err();
        assert!(e.contains("(the advertise address)") && e.contains("--data-path-addr"), "{e}");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(data_path_addr(&h, None, v6).unwrap_err().contains("IPv6"));
    }

    #[test]
    fn data_path_port_range() {
        assert_eq!(data_path_port(None), Ok(4789));
        assert_eq!(data_path_port(Some(4790)), Ok(4790));
        assert_eq!(
            data_path_port(Some(80)).unwrap_err(),
            "Datapath port number is not in valid range (1024-49151) : 80"
        );
        assert!(data_path_port(Some(51820)).is_err());
    }
}
