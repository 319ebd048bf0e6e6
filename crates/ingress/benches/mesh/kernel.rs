//! The kernel path's system for `benches/mesh.rs`: shoal's other routing-mesh path
//! (`shoal_return::kernel`, nftables DNAT with conntrack in the receiving namespace) programmed
//! in the proxy namespace with the real `apply_ports`, publishing the same backend on ports
//! 65201/65080, measured in the same rounds as the proxies and reported as "shoal kernel path".
//!
//! DNAT keeps the client's address, so the backend's replies must come back through the proxy
//! namespace to be un-NATed. Routing the client's own address that way would also send the
//! replies of `direct` (and the ICMP redirects of a forwarding proxy) through it, so the kernel
//! path gets an address pair of its own: the proxy namespace answers on 198.19.N.12, the
//! client reaches that from 198.19.N.11 (a source route), and only .11 is routed back through
//! the proxy namespace from the backend (via the proxy's underlay address, or its overlay
//! address with `OVERLAY=1`).
//!
//! The table turns conntrack on for the whole proxy namespace, which would then track every
//! other proxy's connections too; so it is in place only while the kernel path is measured
//! ([`KernelPath::arm`]), and removed (with `kernel::remove`) after. It has no process: its
//! work is softirq on whichever CPU handles the packets, which only the whole-machine CPU per
//! request sees.

use std::cell::Cell;
use std::net::Ipv4Addr;
use std::sync::Arc;

use shoal_netns::NetNs;
use shoal_return::kernel::{self, KernelPort, Pick};

use super::Setup;

/// The kernel path's (bulk, HTTP) ports on its address.
pub const PORTS: (u16, u16) = (65201, 65080);
/// The VXLAN port the table keeps out of conntrack: the one `OVERLAY=1` tunnels on.
const DATA_PORT: u16 = 4789;
/// The host part (in the underlay /24) of the proxy namespace's kernel-path address.
const PROXY_HOST: u8 = 12;
/// The host part of the client's address for the kernel path, the one routed back through the
/// proxy namespace.
const CLIENT_HOST: u8 = 11;

/// The kernel path set up in the proxy namespace, its table not yet applied.
pub struct KernelPath {
    ns: Arc<NetNs>,
    ports: [KernelPort; 2],
    /// The address clients connect to.
    pub host: String,
    /// The route the backend takes back to the client: "CLIENT/32 via PROXY".
    pub back: String,
    /// Flows the DNAT rules forwarded, summed over every time the table was applied.
    flows: Cell<u64>,
    /// Drives `kernel::remove`'s netlink connection.
    rt: tokio::runtime::Runtime,
}

/// The table in place; dropping it removes the table.
pub struct Armed<'a>(&'a KernelPath);

/// Gives the namespaces what DNAT needs and the proxies do not: the address pair, the route
/// back, forwarding in the proxy namespace. `backend` is the backend's address as the proxy
/// reaches it, `via` the proxy's address as the backend reaches it. Applies the table once and
/// removes it, so a kernel that refuses it says so here.
pub fn start(s: &Setup, backend: Ipv4Addr, via: &str) -> Result<KernelPath, String> {
    let (host, client) = (s.ip(PROXY_HOST), s.ip(CLIENT_HOST));
    let (host32, client32) = (format!("{host}/32"), format!("{client}/32"));
    s.exec("px", &["ip", "addr", "add", &host32, "dev", "eth0"])?;
    s.exec("cl", &["ip", "addr", "add", &client32, "dev", "eth0"])?;
    s.exec("cl", &["ip", "route", "add", &host32, "dev", "eth0", "src", &client])?;
    s.exec("be", &["ip", "route", "add", &client32, "via", via])?;
    // Forwarding for the DNAT-ed flows. Without the overlay they leave by the interface they
    // came in on, where a router sends ICMP redirects: the backend would learn to reach the
    // client directly, and its replies would skip the un-NAT. Forwarding stays on for the whole
    // run; no other system forwards anything.
    for (key, value) in
        [("ip_forward", "1"), ("conf/all/send_redirects", "0"), ("conf/eth0/send_redirects", "0")]
    {
        let path = format!("/proc/sys/net/ipv4/{key}");
        s.proxy_ns
            .run(|| std::fs::write(&path, value))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("write {path} in the proxy namespace: {e}"))?;
    }
    let port = |published, target| KernelPort {
        published,
        target,
        udp: false,
        pick: Pick::Random,
        backends: vec![backend],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let k = KernelPath {
        ns: s.proxy_ns.clone(),
        ports: [port(PORTS.0, 5201), port(PORTS.1, 8080)],
        back: format!("{client32} via {via}"),
        host,
        flows: Cell::new(0),
        rt,
    };
    drop(k.arm()?);
    k.flows.set(0);
    Ok(k)
}

impl KernelPath {
    /// Applies the table: the kernel path answers until the guard is dropped.
    pub fn arm(&self) -> Result<Armed<'_>, String> {
        kernel::apply_ports(Some(&self.ns), DATA_PORT, &self.ports).map_err(|e| e.to_string())?;
        Ok(Armed(self))
    }

    /// Flows the kernel path forwarded in the run (its rules' counters).
    pub fn flows(&self) -> u64 {
        self.flows.get()
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let k = self.0;
        // The counters go with the table: read them first.
        match kernel::flows(Some(&k.ns)) {
            Ok(counted) => k.flows.set(k.flows.get() + counted.iter().map(|(_, n)| n).sum::<u64>()),
            Err(e) => eprintln!("  kernel path: reading its counters: {e}"),
        }
        if let Err(e) = k.rt.block_on(kernel::remove(Some(&k.ns))) {
            eprintln!("  kernel path: removing its table: {e}");
        }
    }
}

/// The report's notes on the kernel path.
pub fn notes(outcome: &Result<KernelPath, String>) -> Vec<String> {
    match outcome {
        Ok(k) => vec![
            format!(
                "shoal kernel path: shoal_return::kernel::apply_ports in the proxy namespace (nftables DNAT with conntrack, Pick::Random, one backend) on {}:{}/{}; the client reaches it from an address of its own, which alone the backend routes back through the proxy namespace ({}), so direct and the proxies keep their usual return path. The table is applied only while the kernel path is measured (its conntrack would otherwise track every other system's connections in that namespace); IPv4 forwarding is on, ICMP redirects off, in the proxy namespace for the whole run. Its rules forwarded {} flows",
                k.host,
                PORTS.0,
                PORTS.1,
                k.back,
                k.flows()
            ),
            "shoal kernel path has no process: its CPU is softirq, counted by the whole-machine CPU per request only; it has no row of proxy CPU per GB or proxy CPU per request (no process to measure, and 0 would be false)".to_owned(),
            "shoal kernel path is not pinned to the proxy CPU: its work runs in softirq on whichever CPU handles the packets (over these veths, the sending side's: with PIN=1, mostly CPU 0 with wrk and the backend)".to_owned(),
        ],
        Err(e) => vec![format!("shoal kernel path not run: {e}")],
    }
}
