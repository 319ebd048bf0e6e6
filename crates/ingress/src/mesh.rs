//! The tokio driver: the [`Mesh`] handle binds listeners per published port and starts one
//! control task per service (`control`); the listeners run the TCP (`tcp`) and UDP (`udp`)
//! data paths over the `Service` cell they share with it (`service`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use shoal_netns::NetNs;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::forward::{ForwardMode, PipePool};
use crate::metrics::ServiceMetrics;
use crate::service::{Ctl, Ctx, Service};
use crate::spec::{BackendSpec, ClientAddr, PortSpec, PublishMode, ServiceSpec, TaskState};
use crate::upstream::Upstream;
use crate::{Error, control, tcp, udp};

/// Node-wide settings of the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The node's ingress sandbox; upstream sockets and health checks are made in it. `None`:
    /// the agent's own namespace (tests, single-host use).
    pub ingress_ns: Option<Arc<NetNs>>,
    /// Where published-port listeners are bound. `None`: the agent's own namespace (the
    /// node's host namespace in production; tests put nodes in namespaces).
    pub listen_ns: Option<Arc<NetNs>>,
    /// Seed of every RNG the mesh uses (balancer choices).
    pub seed: u64,
    /// Splice pipe size in bytes (capped by `fs.pipe-max-size`).
    pub pipe_size: usize,
    /// Spare pipes kept for reuse.
    pub max_idle_pipes: usize,
    /// How TCP bytes are moved.
    pub forward: ForwardMode,
    /// Connect attempts per client connection (different backends when possible).
    pub connect_attempts: u32,
    /// Sets SO_REUSEPORT on TCP listeners, so several meshes (one per core, each on its own
    /// current-thread runtime) can publish the same ports and the kernel spreads new
    /// connections over them. Off by default (a second bind of a port then fails); when on,
    /// any other socket of the same user that sets SO_REUSEPORT can share the port too.
    pub reuse_port: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            ingress_ns: None,
            listen_ns: None,
            seed: 0x5400_a100_0000_0001,
            pipe_size: 1 << 20,
            max_idle_pipes: 512,
            forward: ForwardMode::Auto,
            connect_attempts: 3,
            reuse_port: false,
        }
    }
}

/// What a listener is: a TCP listener or a UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// TCP listener.
    Tcp,
    /// UDP socket.
    Udp,
}

/// A listener the mesh holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// Owning service.
    pub service: String,
    /// Published port.
    pub port: u16,
    /// TCP or UDP.
    pub kind: ListenerKind,
    /// Bound address.
    pub local_addr: SocketAddr,
}

struct ListenerHandle {
    service: String,
    port: Arc<ArcSwap<PortSpec>>,
    listen: Option<IpAddr>,
    local_addr: SocketAddr,
    task: AbortHandle,
}

struct ServiceHandle {
    shared: Arc<Service>,
}

struct State {
    services: HashMap<String, ServiceHandle>,
    listeners: HashMap<(u16, ListenerKind), ListenerHandle>,
}

/// The routing mesh of one node. Create it inside a tokio runtime; drive it with
/// [`Mesh::set_service`] / [`Mesh::remove_service`]; read [`Mesh::metrics`].
pub struct Mesh {
    ctx: Arc<Ctx>,
    listen_ns: Option<Arc<NetNs>>,
    reuse_port: bool,
    seed: AtomicU64,
    state: Mutex<State>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("ctx", &self.ctx).finish()
    }
}

impl Mesh {
    /// A mesh with no services. Must be called inside a tokio runtime.
    pub fn new(cfg: MeshConfig) -> Result<Mesh, Error> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        Ok(Mesh {
            listen_ns: cfg.listen_ns,
            reuse_port: cfg.reuse_port,
            ctx: Arc::new(Ctx {
                upstream: Upstream::new(cfg.ingress_ns),
                pipes: PipePool::new(cfg.pipe_size, cfg.max_idle_pipes),
                forward: cfg.forward,
                attempts: cfg.connect_attempts.max(1),
                client_addr: ArcSwap::from_pointee(ClientAddr::default()),
                health_changes: tokio::sync::watch::Sender::new(0),
            }),
            seed: AtomicU64::new(cfg.seed),
            state: Mutex::new(State { services: HashMap::new(), listeners: HashMap::new() }),
            rt,
        })
    }

    fn next_seed(&self) -> u64 {
        // Weyl sequence: distinct, reproducible seeds per task.
        self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
    }

    /// Sets where new upstream connections and flows come from (open ones keep theirs).
    pub fn set_client_addr(&self, policy: ClientAddr) {
        self.ctx.client_addr.store(Arc::new(policy));
    }

    /// Where new upstream connections and flows come from.
    pub fn client_addr(&self) -> ClientAddr {
        ClientAddr::clone(&self.ctx.client_addr.load())
    }

    /// Creates or updates a service and its full backend set. Backends missing from `backends`
    /// start draining; new ones are health-checked before they get traffic. Listeners are
    /// bound for new ports and closed for ports no longer published, without touching other
    /// services' listeners. On error (invalid spec, port owned by another service, bind
    /// failure) nothing changes.
    pub fn set_service(&self, spec: ServiceSpec, backends: Vec<BackendSpec>) -> Result<(), Error> {
        spec.validate()?;
        let mut ids = HashSet::new();
        for b in &backends {
            if b.id.is_empty() || !ids.insert(b.id.as_str()) {
                return Err(Error::InvalidSpec {
                    service: spec.name.clone(),
                    field: "backends",
                    why: format!("empty or duplicate backend id {:?}", b.id),
                });
            }
        }
        let mut st =
            self.state.lock().map_err(|_| Error::io("mesh state", std::io::ErrorKind::Other))?;
        // Which listeners this service wants.
        let has_local = backends.iter().any(|b| b.local && b.state != TaskState::Stopped);
        let mut wanted: Vec<(u16, ListenerKind, PortSpec)> = Vec::new();
        for p in &spec.ports {
            if p.mode == PublishMode::Host && !has_local {
                continue;
            }
            if p.protocol.tcp() {
                wanted.push((p.published, ListenerKind::Tcp, p.clone()));
            }
            if p.protocol.udp() {
                wanted.push((p.published, ListenerKind::Udp, p.clone()));
            }
        }
        for (port, t, _) in &wanted {
            if let Some(l) = st.listeners.get(&(*port, *t))
                && l.service != spec.name
            {
                return Err(Error::PortTaken {
                    port: *port,
                    proto: if *t == ListenerKind::Tcp { "tcp" } else { "udp" },
                    owner: l.service.clone(),
                });
            }
        }
        // Bind what is new (or moved to another address) before changing anything.
        let mut fresh: Vec<(u16, ListenerKind, PortSpec, Bound)> = Vec::new();
        for (port, t, p) in &wanted {
            let same = st.listeners.get(&(*port, *t)).is_some_and(|l| l.listen == p.listen);
            if same {
                continue;
            }
            let moved = st.listeners.contains_key(&(*port, *t));
            if moved {
                // The old socket holds the port; it has to go first.
                if let Some(old) = st.listeners.remove(&(*port, *t)) {
                    old.task.abort();
                }
            }
            let _guard = self.rt.enter();
            match bind(*t, p, self.listen_ns.as_deref(), self.reuse_port) {
                Ok(b) => fresh.push((*port, *t, p.clone(), b)),
                Err(e) => return Err(e),
            }
        }
        // Service: create or update.
        let shared = match st.services.get(&spec.name) {
            Some(h) => {
                let _ = h.shared.ctl.send(Ctl::Update(Box::new(spec.clone()), backends));
                h.shared.spec.store(Arc::new(spec.clone()));
                h.shared.clone()
            }
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                let shared = Arc::new(Service::new(&spec, tx));
                let _ = shared.ctl.send(Ctl::Update(Box::new(spec.clone()), backends));
                self.rt.spawn(control::control(shared.clone(), rx, self.ctx.clone()));
                st.services.insert(spec.name.clone(), ServiceHandle { shared: shared.clone() });
                shared
            }
        };
        // Update port settings of kept listeners; close unwanted ones of this service.
        let keep: HashSet<(u16, ListenerKind)> = wanted.iter().map(|(p, t, _)| (*p, *t)).collect();
        for (port, t, p) in &wanted {
            if let Some(l) = st.listeners.get(&(*port, *t)) {
                l.port.store(Arc::new(p.clone()));
            }
        }
        let stale: Vec<(u16, ListenerKind)> = st
            .listeners
            .iter()
            .filter(|(k, l)| l.service == spec.name && !keep.contains(k))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(l) = st.listeners.remove(&k) {
                l.task.abort();
            }
        }
        for (port, t, p, bound) in fresh {
            let listen = p.listen;
            let cell = Arc::new(ArcSwap::from_pointee(p));
            let (local_addr, task) = match bound {
                Bound::Tcp(l) => {
                    let a = l.local_addr().map_err(|e| Error::io("local_addr", e))?;
                    let h = self.rt.spawn(tcp::accept(
                        l,
                        shared.clone(),
                        cell.clone(),
                        self.ctx.clone(),
                        self.next_seed(),
                    ));
                    (a, h.abort_handle())
                }
                Bound::Udp(s) => {
                    let a = s.local_addr().map_err(|e| Error::io("local_addr", e))?;
                    let h = self.rt.spawn(udp::serve(
                        Arc::new(s),
                        shared.clone(),
                        cell.clone(),
                        self.ctx.clone(),
                        self.next_seed(),
                    ));
                    (a, h.abort_handle())
                }
            };
            st.listeners.insert(
                (port, t),
                ListenerHandle { service: spec.name.clone(), port: cell, listen, local_addr, task },
            );
        }
        Ok(())
    }

    /// Removes a service: its listeners close at once; its backends drain (open connections
    /// may finish within the drain grace, then are reset).
    pub fn remove_service(&self, name: &str) -> Result<(), Error> {
        let mut st =
            self.state.lock().map_err(|_| Error::io("mesh state", std::io::ErrorKind::Other))?;
        let h = st.services.remove(name).ok_or_else(|| Error::UnknownService(name.to_owned()))?;
        st.listeners.retain(|_, l| {
            let mine = l.service == name;
            if mine {
                l.task.abort();
            }
            !mine
        });
        let _ = h.shared.ctl.send(Ctl::Shutdown);
        Ok(())
    }

    /// Names of the services, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.state.lock().map(|s| s.services.keys().cloned().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// The listeners bound now, sorted by port and transport.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        let mut v: Vec<ListenerInfo> = self
            .state
            .lock()
            .map(|s| {
                s.listeners
                    .iter()
                    .map(|((port, t), l)| ListenerInfo {
                        service: l.service.clone(),
                        port: *port,
                        kind: *t,
                        local_addr: l.local_addr,
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|l| (l.port, l.kind == ListenerKind::Udp));
        v
    }

    /// Metrics of every service, sorted by name.
    pub fn metrics(&self) -> Vec<ServiceMetrics> {
        let services: Vec<Arc<Service>> = self
            .state
            .lock()
            .map(|s| s.services.values().map(|h| h.shared.clone()).collect())
            .unwrap_or_default();
        let mut out: Vec<ServiceMetrics> = services.iter().map(|s| s.metrics()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Ticks whenever a backend's health changes in any service (a check passed or failed, an
    /// ejection, a drain): a caller that mirrors the health elsewhere reads it again then.
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ctx.health_changes.subscribe()
    }

    /// Metrics of one service.
    pub fn service_metrics(&self, name: &str) -> Option<ServiceMetrics> {
        let s = self.state.lock().ok()?.services.get(name)?.shared.clone();
        Some(s.metrics())
    }

    /// Metrics in Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        crate::metrics::render_prometheus(&self.metrics())
    }

    /// Splice pipes created so far (far fewer than connections when the pool works).
    pub fn pipes_created(&self) -> u64 {
        self.ctx.pipes.created()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut() {
            for l in st.listeners.values() {
                l.task.abort();
            }
            for s in st.services.values() {
                let _ = s.shared.ctl.send(Ctl::Shutdown);
            }
        }
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind(
    t: ListenerKind,
    p: &PortSpec,
    ns: Option<&NetNs>,
    reuse_port: bool,
) -> Result<Bound, Error> {
    let proto = if t == ListenerKind::Tcp { "tcp" } else { "udp" };
    let make = |ip: IpAddr| -> std::io::Result<socket2::Socket> {
        let addr = SocketAddr::new(ip, p.published);
        let domain = socket2::Domain::for_address(addr);
        let (ty, pr) = match t {
            ListenerKind::Tcp => (socket2::Type::STREAM, socket2::Protocol::TCP),
            ListenerKind::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
        };
        let s = socket2::Socket::new(domain, ty.nonblocking().cloexec(), Some(pr))?;
        if ip.is_ipv6() && ip.is_unspecified() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        if reuse_port && t == ListenerKind::Tcp {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        match t {
            ListenerKind::Tcp => s.listen(4096)?,
            ListenerKind::Udp => {
                let _ = s.set_recv_buffer_size(4 << 20);
            }
        }
        Ok(s)
    };
    let make_any = |listen: Option<IpAddr>| -> Result<socket2::Socket, (IpAddr, std::io::Error)> {
        match listen {
            Some(ip) => make(ip).map_err(|e| (ip, e)),
            None => {
                let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
                make(any6).or_else(|e6| {
                    // No IPv6 on this host: IPv4 only.
                    make(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)).map_err(|_| (any6, e6))
                })
            }
        }
    };
    let made = match ns {
        Some(ns) => ns.run(|| make_any(p.listen))?,
        None => make_any(p.listen),
    };
    let s = made.map_err(|(ip, e)| Error::Bind {
        addr: SocketAddr::new(ip, p.published),
        proto,
        source: e,
    })?;
    let wrap = |e| Error::io("register listener", e);
    Ok(match t {
        ListenerKind::Tcp => Bound::Tcp(TcpListener::from_std(s.into()).map_err(wrap)?),
        ListenerKind::Udp => Bound::Udp(UdpSocket::from_std(s.into()).map_err(wrap)?),
    })
}
