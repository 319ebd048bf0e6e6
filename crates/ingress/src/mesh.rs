//! The tokio driver: listeners per published port, one control task per service (health core,
//! active checks, snapshot rebuilds), and per-connection forwarding tasks.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_netns::NetNs;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::balancer::{Backend, Snapshot};
use crate::forward::{self, ForwardMode, PipePool};
use crate::health::{HealthCore, HealthEvent, HealthState};
use crate::metrics::{BackendMetrics, ServiceMetrics};
use crate::proxy_protocol::{Header, MAX_EMIT_LEN};
use crate::spec::{
    BackendSpec, CheckKind, ClientAddr, PortSpec, ProxyProtocol, PublishMode, ServiceSpec,
    TaskState,
};
use crate::upstream::Upstream;
use crate::{Error, udp};

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

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
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
    pub transport: Transport,
    /// Bound address.
    pub local_addr: SocketAddr,
}

pub(crate) enum Ctl {
    Update(Box<ServiceSpec>, Vec<BackendSpec>),
    Connect(String, bool),
    Shutdown,
}

/// What the data path shares with a service's control task.
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) spec: ArcSwap<ServiceSpec>,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    view: ArcSwap<Vec<(Arc<Backend>, HealthState)>>,
    pub(crate) ctl: mpsc::UnboundedSender<Ctl>,
    pub(crate) no_backend: AtomicU64,
    /// Connections and flows that reached their task from the client's own address.
    client_kept: AtomicU64,
    /// Connections and flows that reached their task from the sandbox's address instead.
    client_fallback: AtomicU64,
    /// TCP connections open now (what `max_connections` limits).
    pub(crate) open_connections: AtomicU64,
    /// Connections refused at `max_connections`.
    refused_connections: AtomicU64,
    /// UDP flows open now over all of the service's ports (what `max_udp_flows` limits).
    pub(crate) udp_flows: AtomicU64,
    /// Datagrams dropped at `max_udp_flows`.
    pub(crate) refused_flows_service: AtomicU64,
    /// Datagrams dropped at `max_udp_flows_per_source`.
    pub(crate) refused_flows_source: AtomicU64,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("name", &self.name).finish()
    }
}

impl Service {
    /// Reports a connect outcome to the health core (successes only after a failure).
    pub(crate) fn report_connect(&self, b: &Backend, ok: bool) {
        if ok {
            if b.fail_streak.load(Ordering::Relaxed) > 0
                && b.fail_streak.swap(0, Ordering::Relaxed) > 0
            {
                let _ = self.ctl.send(Ctl::Connect(b.id.clone(), true));
            }
        } else {
            b.stats.errors.fetch_add(1, Ordering::Relaxed);
            b.fail_streak.fetch_add(1, Ordering::Relaxed);
            let _ = self.ctl.send(Ctl::Connect(b.id.clone(), false));
        }
    }
}

/// What every data-path task needs from the node.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) upstream: Upstream,
    pub(crate) pipes: PipePool,
    pub(crate) forward: ForwardMode,
    pub(crate) attempts: u32,
    pub(crate) client_addr: ArcSwap<ClientAddr>,
}

impl Ctx {
    /// The source of a new upstream connection or flow for `client` (`None`: the sandbox's
    /// own address), counted in the service's metrics.
    pub(crate) fn source_for(&self, svc: &Service, client: SocketAddr) -> Option<SocketAddr> {
        let from = self.client_addr.load().source_for(client);
        let counter = if from.is_some() { &svc.client_kept } else { &svc.client_fallback };
        counter.fetch_add(1, Ordering::Relaxed);
        from
    }
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
    listeners: HashMap<(u16, Transport), ListenerHandle>,
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
        let mut wanted: Vec<(u16, Transport, PortSpec)> = Vec::new();
        for p in &spec.ports {
            if p.mode == PublishMode::Host && !has_local {
                continue;
            }
            if p.protocol.tcp() {
                wanted.push((p.published, Transport::Tcp, p.clone()));
            }
            if p.protocol.udp() {
                wanted.push((p.published, Transport::Udp, p.clone()));
            }
        }
        for (port, t, _) in &wanted {
            if let Some(l) = st.listeners.get(&(*port, *t))
                && l.service != spec.name
            {
                return Err(Error::PortTaken {
                    port: *port,
                    proto: if *t == Transport::Tcp { "tcp" } else { "udp" },
                    owner: l.service.clone(),
                });
            }
        }
        // Bind what is new (or moved to another address) before changing anything.
        let mut fresh: Vec<(u16, Transport, PortSpec, Bound)> = Vec::new();
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
                let shared = Arc::new(Service {
                    name: spec.name.clone(),
                    spec: ArcSwap::from_pointee(spec.clone()),
                    snapshot: ArcSwap::from_pointee(Snapshot::default()),
                    view: ArcSwap::from_pointee(Vec::new()),
                    ctl: tx,
                    no_backend: AtomicU64::new(0),
                    client_kept: AtomicU64::new(0),
                    client_fallback: AtomicU64::new(0),
                    open_connections: AtomicU64::new(0),
                    refused_connections: AtomicU64::new(0),
                    udp_flows: AtomicU64::new(0),
                    refused_flows_service: AtomicU64::new(0),
                    refused_flows_source: AtomicU64::new(0),
                });
                let _ = shared.ctl.send(Ctl::Update(Box::new(spec.clone()), backends));
                self.rt.spawn(control(shared.clone(), rx, self.ctx.clone()));
                st.services.insert(spec.name.clone(), ServiceHandle { shared: shared.clone() });
                shared
            }
        };
        // Update port settings of kept listeners; close unwanted ones of this service.
        let keep: HashSet<(u16, Transport)> = wanted.iter().map(|(p, t, _)| (*p, *t)).collect();
        for (port, t, p) in &wanted {
            if let Some(l) = st.listeners.get(&(*port, *t)) {
                l.port.store(Arc::new(p.clone()));
            }
        }
        let stale: Vec<(u16, Transport)> = st
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
                    let h = self.rt.spawn(tcp_accept(
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
                        transport: *t,
                        local_addr: l.local_addr,
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|l| (l.port, l.transport == Transport::Udp));
        v
    }

    /// Metrics of every service, sorted by name.
    pub fn metrics(&self) -> Vec<ServiceMetrics> {
        let services: Vec<Arc<Service>> = self
            .state
            .lock()
            .map(|s| s.services.values().map(|h| h.shared.clone()).collect())
            .unwrap_or_default();
        let mut out: Vec<ServiceMetrics> = services.iter().map(|s| service_metrics(s)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Metrics of one service.
    pub fn service_metrics(&self, name: &str) -> Option<ServiceMetrics> {
        let s = self.state.lock().ok()?.services.get(name)?.shared.clone();
        Some(service_metrics(&s))
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

fn service_metrics(s: &Service) -> ServiceMetrics {
    let view = s.view.load();
    ServiceMetrics {
        name: s.name.clone(),
        no_backend: s.no_backend.load(Ordering::Relaxed),
        client_kept: s.client_kept.load(Ordering::Relaxed),
        client_fallback: s.client_fallback.load(Ordering::Relaxed),
        refused_connections: s.refused_connections.load(Ordering::Relaxed),
        refused_flows_service: s.refused_flows_service.load(Ordering::Relaxed),
        refused_flows_source: s.refused_flows_source.load(Ordering::Relaxed),
        backends: view
            .iter()
            .map(|(b, h)| BackendMetrics {
                id: b.id.clone(),
                addr: b.addr,
                health: *h,
                active: b.stats.active.load(Ordering::Relaxed),
                total: b.stats.total.load(Ordering::Relaxed),
                selected: b.stats.selected.load(Ordering::Relaxed),
                bytes_in: b.stats.bytes_in.load(Ordering::Relaxed),
                bytes_out: b.stats.bytes_out.load(Ordering::Relaxed),
                errors: b.stats.errors.load(Ordering::Relaxed),
            })
            .collect(),
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind(t: Transport, p: &PortSpec, ns: Option<&NetNs>, reuse_port: bool) -> Result<Bound, Error> {
    let proto = if t == Transport::Tcp { "tcp" } else { "udp" };
    let make = |ip: IpAddr| -> std::io::Result<socket2::Socket> {
        let addr = SocketAddr::new(ip, p.published);
        let domain = socket2::Domain::for_address(addr);
        let (ty, pr) = match t {
            Transport::Tcp => (socket2::Type::STREAM, socket2::Protocol::TCP),
            Transport::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
        };
        let s = socket2::Socket::new(domain, ty.nonblocking().cloexec(), Some(pr))?;
        if ip.is_ipv6() && ip.is_unspecified() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        if reuse_port && t == Transport::Tcp {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        match t {
            Transport::Tcp => s.listen(4096)?,
            Transport::Udp => {
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
        Transport::Tcp => Bound::Tcp(TcpListener::from_std(s.into()).map_err(wrap)?),
        Transport::Udp => Bound::Udp(UdpSocket::from_std(s.into()).map_err(wrap)?),
    })
}

/// The control task of one service: owns the health core, runs active checks, turns health
/// events into snapshot swaps and resets.
async fn control(svc: Arc<Service>, mut rx: mpsc::UnboundedReceiver<Ctl>, ctx: Arc<Ctx>) {
    let spec0 = svc.spec.load_full();
    let mut core = HealthCore::new(spec0.health.clone(), spec0.drain_grace);
    let mut spec = spec0;
    let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
    let rr = Arc::new(AtomicUsize::new(0));
    let (check_tx, mut check_rx) = mpsc::unbounded_channel::<(String, bool)>();
    let mut shutting_down = false;
    loop {
        let now = Instant::now().into_std();
        while let Some(req) = core.poll_check(now) {
            let tx = check_tx.clone();
            let ctx = ctx.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                let ok = run_check(&ctx, &spec, req.addr).await;
                let _ = tx.send((req.id, ok));
            });
        }
        let mut changed = false;
        while let Some(ev) = core.poll_event() {
            match ev {
                HealthEvent::Changed => changed = true,
                HealthEvent::Reset(id) => {
                    if let Some(b) = backends.get_mut(&id) {
                        b.reset.cancel();
                        // A fresh token for connections made if it comes back; same counters.
                        let mut nb = Backend::new(b.id.clone(), b.addr, b.local);
                        nb.stats = b.stats.clone();
                        *b = Arc::new(nb);
                        changed = true;
                    }
                }
                HealthEvent::Forget(id) => {
                    backends.remove(&id);
                    changed = true;
                }
            }
        }
        if changed {
            let eligible: Vec<Arc<Backend>> =
                backends.values().filter(|b| core.eligible(&b.id)).cloned().collect();
            svc.snapshot.store(Arc::new(Snapshot::new(spec.algorithm, eligible, rr.clone())));
            let view: Vec<(Arc<Backend>, HealthState)> = core
                .backends()
                .filter_map(|(id, _, _, h)| backends.get(id).map(|b| (b.clone(), h)))
                .collect();
            svc.view.store(Arc::new(view));
        }
        if shutting_down && backends.is_empty() {
            return;
        }
        let wake = core.poll_timeout().map(Instant::from_std);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ctl::Update(new_spec, list)) => {
                    let now = Instant::now().into_std();
                    if new_spec.health != spec.health
                        || new_spec.drain_grace != spec.drain_grace
                        || new_spec.algorithm != spec.algorithm
                    {
                        // Also forces a snapshot rebuild (a new algorithm needs one).
                        core.set_spec(new_spec.health.clone(), new_spec.drain_grace);
                    }
                    spec = Arc::new(*new_spec);
                    let listed: HashSet<&str> = list.iter().map(|b| b.id.as_str()).collect();
                    for id in backends.keys() {
                        if !listed.contains(id.as_str()) {
                            core.remove(now, id);
                        }
                    }
                    for b in &list {
                        let replace = backends.get(&b.id).is_none_or(|x| x.addr != b.addr || x.local != b.local);
                        if replace {
                            if let Some(old) = backends.get(&b.id) {
                                old.reset.cancel();
                            }
                            let stats = backends.get(&b.id).map(|x| x.stats.clone());
                            let mut nb = Backend::new(b.id.clone(), b.addr, b.local);
                            if let Some(s) = stats {
                                nb.stats = s;
                            }
                            backends.insert(b.id.clone(), Arc::new(nb));
                        }
                        core.upsert(now, b);
                    }
                }
                Some(Ctl::Connect(id, ok)) => core.handle_connect(Instant::now().into_std(), &id, ok),
                Some(Ctl::Shutdown) | None => {
                    if !shutting_down {
                        shutting_down = true;
                        let now = Instant::now().into_std();
                        for id in backends.keys() {
                            core.remove(now, id);
                        }
                    }
                    if backends.is_empty() {
                        return;
                    }
                }
            },
            Some((id, ok)) = check_rx.recv() => core.handle_check(Instant::now().into_std(), &id, ok),
            () = sleep_until(wake) => core.handle_timeout(Instant::now().into_std()),
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One active check; the port is the first TCP port's target (UDP-only services pass).
async fn run_check(ctx: &Ctx, spec: &ServiceSpec, addr: IpAddr) -> bool {
    let Some(port) = spec.ports.iter().find(|p| p.protocol.tcp()).map(|p| p.target) else {
        return true;
    };
    let target = SocketAddr::new(addr, port);
    let timeout = spec.health.timeout;
    let work = async {
        let mut s = ctx.upstream.connect_tcp(target, timeout).await.ok()?;
        match &spec.health.check {
            None | Some(CheckKind::Tcp) => Some(true),
            Some(CheckKind::Http { path }) => {
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: shoal-mesh-check\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).await.ok()?;
                read_check_response(&mut s).await
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten().unwrap_or(false)
}

/// Reads the head of a backend's answer to an HTTP check, however it is split into reads, and
/// judges its status line; `None` if the read fails.
pub(crate) async fn read_check_response<R: AsyncRead + Unpin>(s: &mut R) -> Option<bool> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let m = s.read(&mut buf[n..]).await.ok()?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Some(http_status_ok(&buf[..n]))
}

/// Whether an HTTP response starts with a 2xx or 3xx status line.
pub(crate) fn http_status_ok(head: &[u8]) -> bool {
    let ok_prefix = head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ");
    ok_prefix
        && head.len() >= 12
        && matches!(head[9], b'2' | b'3')
        && head[10..12].iter().all(u8::is_ascii_digit)
}

async fn tcp_accept(
    listener: TcpListener,
    svc: Arc<Service>,
    port: Arc<ArcSwap<PortSpec>>,
    ctx: Arc<Ctx>,
    seed: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of fds or a transient error: back off briefly rather than spin.
                tracing::warn!(service = %svc.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) = OpenSlot::take(&svc) else {
            // At the service's limit: refuse at once (RST) rather than queue.
            svc.refused_connections.fetch_add(1, Ordering::Relaxed);
            forward::set_reset_on_close(&client);
            continue;
        };
        let p = port.load_full();
        let snap = svc.snapshot.load_full();
        let local_only = p.mode == PublishMode::Host;
        let first = snap.pick(peer.ip(), local_only, None, &mut rng);
        let retry_seed = rng.next_u64();
        tokio::spawn(handle_tcp(
            client,
            peer,
            first,
            snap,
            p,
            svc.clone(),
            ctx.clone(),
            retry_seed,
            slot,
        ));
    }
}

/// One of a service's `max_connections`, held for the life of a connection.
struct OpenSlot(Arc<Service>);

impl OpenSlot {
    /// A slot, or `None` if the service has `max_connections` open already.
    fn take(svc: &Arc<Service>) -> Option<OpenSlot> {
        let limit = svc.spec.load().max_connections.map_or(u64::MAX, u64::from);
        let open = &svc.open_connections;
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| OpenSlot(svc.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_tcp(
    client: TcpStream,
    peer: SocketAddr,
    mut choice: Option<Arc<Backend>>,
    snap: Arc<Snapshot>,
    port: Arc<PortSpec>,
    svc: Arc<Service>,
    ctx: Arc<Ctx>,
    seed: u64,
    slot: OpenSlot,
) {
    let _ = client.set_nodelay(true);
    let spec = svc.spec.load_full();
    let local_only = port.mode == PublishMode::Host;
    let mut rng: Option<SmallRng> = None;
    let mut attempt = 0;
    let from = ctx.source_for(&svc, peer);
    let (backend, upstream) = loop {
        let Some(b) = choice.take() else {
            svc.no_backend.fetch_add(1, Ordering::Relaxed);
            forward::set_reset_on_close(&client);
            return;
        };
        attempt += 1;
        let target = SocketAddr::new(b.addr, port.target);
        match ctx.upstream.connect_tcp_from(target, from, spec.connect_timeout).await {
            Ok(s) => {
                svc.report_connect(&b, true);
                break (b, s);
            }
            Err(e) => {
                tracing::debug!(service = %svc.name, backend = %b.id, error = %e, "connect failed");
                svc.report_connect(&b, false);
                if attempt >= ctx.attempts {
                    forward::set_reset_on_close(&client);
                    return;
                }
                let r = rng.get_or_insert_with(|| SmallRng::seed_from_u64(seed));
                // The newest snapshot may already lack the failed backend.
                let now_snap = svc.snapshot.load_full();
                let s = if Arc::ptr_eq(&now_snap, &snap) { &snap } else { &now_snap };
                choice = s.pick(peer.ip(), local_only, Some(&b.id), r);
            }
        }
    };
    let stats = &backend.stats;
    stats.active.fetch_add(1, Ordering::Relaxed);
    stats.total.fetch_add(1, Ordering::Relaxed);
    let result = async {
        if port.proxy_protocol != ProxyProtocol::Off {
            let local = client.local_addr()?;
            let h = Header::tcp(peer, local);
            let mut buf = [0u8; 128];
            let n = match port.proxy_protocol {
                ProxyProtocol::V2 => h.emit_v2(&mut buf[..MAX_EMIT_LEN]).unwrap_or(0),
                _ => {
                    let line = h.to_v1();
                    buf[..line.len()].copy_from_slice(line.as_bytes());
                    line.len()
                }
            };
            // One write: a fresh connection's send buffer takes 107 bytes whole.
            forward::write_all(&upstream, &buf[..n]).await?;
        }
        forward::relay(
            &client,
            &upstream,
            ctx.forward,
            &ctx.pipes,
            spec.idle_timeout,
            &backend.reset,
            &stats.bytes_in,
            &stats.bytes_out,
        )
        .await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(service = %svc.name, backend = %backend.id, error = %e, "relay ended");
        stats.errors.fetch_add(1, Ordering::Relaxed);
        forward::set_reset_on_close(&client);
        forward::set_reset_on_close(&upstream);
    }
    // The slot first: whoever sees the connection gone from `active` may take its slot.
    drop(slot);
    stats.active.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(http_status_ok(b"HTTP/1.0 301 Moved"));
        assert!(!http_status_ok(b"HTTP/1.1 503 Service Unavailable"));
        assert!(!http_status_ok(b"HTTP/1.1 2"));
        assert!(!http_status_ok(b"SSH-2.0-OpenSSH"));
    }
}
