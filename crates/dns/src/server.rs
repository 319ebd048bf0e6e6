//! The tokio/hickory driver: listeners at 127.0.0.11:53 (UDP and TCP) in each task namespace,
//! one hickory [`Server`] per namespace whose handler knows that task's [`Scope`], all sharing
//! one record snapshot (arc-swap) and one forwarder.
//!
//! hickory's [`Request`] does not say which socket a query arrived on, and every task's listener
//! has the same address, so the scope is carried by the handler: one `Server` per namespace.
//! That also gives removal for free: shutting one `Server` down closes that namespace's sockets.
//!
//! TCP is served by hickory's `Server`. UDP is read by a small loop of ours
//! (`crate::udp`) that reads up to 32 datagrams per `recvmmsg` and hands each to the same
//! handler: a plain A/AAAA query for one of our names is answered by the [`crate::wire`] fast
//! path into reused buffers (no allocation per packet) and the batch's answers go out in one
//! `sendmmsg`; everything else is parsed into a hickory `Request` and answered by the handler;
//! only forwarded queries get a task. (hickory's own UDP loop spawns a task and sends through a
//! channel for every datagram, which cost about 20% more CPU per query than unbound in the
//! side-by-side benchmark.)
//!
//! hickory-server logs every request at `info`: the agent's tracing filter should set
//! `hickory_server=warn`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use shoal_netns::NetNs;

use crate::forward::{self, ForwardConfig, Forwarder};
use crate::handler::{Handler, Inner, UdpReply};
use crate::metrics::Metrics;
use crate::records::{RecordsConfig, Scope, Zone};
use crate::udp::udp_loop;

/// Where every task's resolver listens.
pub const TASK_DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// Settings of the DNS service.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Policy of the initial (empty) snapshot; later snapshots carry their own.
    pub records: RecordsConfig,
    /// Forwarding settings.
    pub forward: ForwardConfig,
    /// Idle timeout of a TCP connection from a task.
    pub tcp_idle_timeout: Duration,
    /// Largest UDP reply we send to an EDNS client (RFC 9715 / DNS flag day 2020: 1232).
    pub edns_payload: u16,
    /// Seed of the answer shuffle; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            records: RecordsConfig::default(),
            forward: ForwardConfig::default(),
            tcp_idle_timeout: Duration::from_secs(5),
            edns_payload: 1232,
            seed: None,
        }
    }
}

/// What went wrong at the service's edge. A failed call changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listener with this key is already attached.
    #[error("a DNS listener for {0:?} is already attached")]
    AlreadyAttached(String),
    /// No listener with this key.
    #[error("no DNS listener for {0:?}")]
    NotAttached(String),
    /// Entering the namespace failed.
    #[error("entering the task namespace: {0}")]
    Netns(#[from] shoal_netns::Error),
    /// Binding or registering a socket failed (is `lo` up in the namespace?).
    #[error("binding {addr} ({proto}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp`, `tcp` or the socket option that failed.
        proto: &'static str,
        /// The socket error.
        source: std::io::Error,
    },
    /// Called outside a tokio runtime.
    #[error("the DNS service must be driven from a tokio runtime")]
    NoRuntime,
}

/// One task namespace's listener. Dropping it stops its tasks (hickory's `Server` aborts its
/// own on drop; the UDP loop is aborted here).
struct Listener {
    /// hickory's server, serving TCP.
    server: Server<Handler>,
    /// Our UDP loop and its stop signal.
    udp_task: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
    scope: Arc<ArcSwap<Scope>>,
    local: SocketAddr,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.udp_task.abort();
    }
}

/// The DNS service the agent owns: attach a listener per task namespace, push snapshots, read
/// metrics. Cheap to clone; every clone drives the same service.
#[derive(Clone)]
pub struct DnsService {
    inner: Arc<Inner>,
    /// Kept apart from `inner` (which every handler holds) so that dropping the last
    /// `DnsService` drops the listeners and stops their tasks even without `shutdown`.
    listeners: Arc<tokio::sync::Mutex<HashMap<String, Listener>>>,
}

impl std::fmt::Debug for DnsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsService")
            .field("upstreams", &self.inner.forwarder.upstreams())
            .finish_non_exhaustive()
    }
}

impl DnsService {
    /// Starts the service: reads the resolv.conf once, starts watching it, serves an empty
    /// snapshot until [`DnsService::update`]. Must be called inside the agent's tokio runtime,
    /// whose threads are in the host namespace (upstream sockets are made there).
    pub fn start(config: DnsConfig, metrics: Metrics) -> Result<DnsService, DnsError> {
        tokio::runtime::Handle::try_current().map_err(|_| DnsError::NoRuntime)?;
        let (initial, ups) = forward::read_resolv_conf(&config.forward.resolv_conf);
        let forwarder = Arc::new(Forwarder::new(&config.forward, ups, metrics.clone()));
        let watcher = forward::spawn_watcher(
            config.forward.resolv_conf.clone(),
            config.forward.poll,
            forwarder.clone(),
            initial,
        );
        let seed = config.seed.unwrap_or_else(rand::random);
        Ok(DnsService {
            inner: Arc::new(Inner {
                records: ArcSwap::from_pointee(Zone::empty(config.records)),
                forwarder,
                metrics,
                seed,
                counter: AtomicU64::new(0),
                edns_payload: config.edns_payload.max(512),
                tcp_idle_timeout: config.tcp_idle_timeout,
                watcher,
            }),
            listeners: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
        })
    }

    /// Swaps in a new snapshot; queries already running finish on the old one, none waits.
    pub fn update(&self, snapshot: Zone) {
        self.inner.records.store(Arc::new(snapshot));
    }

    /// The snapshot in use.
    pub fn records(&self) -> Arc<Zone> {
        self.inner.records.load_full()
    }

    /// The metrics (to encode them, or register them if the caller has not).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The upstream resolvers currently used for forwarding.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.inner.forwarder.upstreams().to_vec()
    }

    async fn ensure_free(&self, key: &str) -> Result<(), DnsError> {
        if self.listeners.lock().await.contains_key(key) {
            return Err(DnsError::AlreadyAttached(key.to_owned()));
        }
        Ok(())
    }

    /// Replaces the upstream resolvers until the resolv.conf next changes (an explicit
    /// `--dns-upstream`, or tests).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.inner.forwarder.set_upstreams(upstreams);
    }

    /// Creates UDP and TCP sockets at 127.0.0.11:53 inside `ns` (its `lo` must be up) and serves
    /// them with `scope`, under `key` (the task id, say).
    pub async fn attach_netns(&self, key: &str, ns: &NetNs, scope: Scope) -> Result<(), DnsError> {
        self.ensure_free(key).await?;
        let (udp, tcp) = ns.run(|| bind_pair(TASK_DNS_ADDR))??;
        self.attach_sockets(key, udp, tcp, scope).await
    }

    /// Binds `addr` in the current namespace and serves it with `scope` (loopback tests, benches,
    /// or a node-level listener).
    pub async fn attach_local(
        &self,
        key: &str,
        addr: SocketAddr,
        scope: Scope,
    ) -> Result<SocketAddr, DnsError> {
        self.ensure_free(key).await?;
        let (udp, tcp) = bind_pair(addr)?;
        let local =
            udp.local_addr().map_err(|source| DnsError::Bind { addr, proto: "udp", source })?;
        // bind_pair binds TCP on the port UDP got, so port 0 gives one port for both.
        self.attach_sockets(key, udp, tcp, scope).await?;
        Ok(local)
    }

    /// Serves already-bound sockets (made in whatever namespace the caller chose).
    pub async fn attach_sockets(
        &self,
        key: &str,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        scope: Scope,
    ) -> Result<(), DnsError> {
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: TASK_DNS_ADDR,
            proto: "udp",
            source,
        })?;
        let bind_err = |proto, source| DnsError::Bind { addr: local, proto, source };
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| bind_err("udp", e))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| bind_err("tcp", e))?;
        let scope = Arc::new(ArcSwap::from_pointee(scope));
        let mut listeners = self.listeners.lock().await;
        if listeners.contains_key(key) {
            return Err(DnsError::AlreadyAttached(key.to_owned()));
        }
        let handler = Arc::new(Handler { inner: self.inner.clone(), scope: scope.clone() });
        let mut server = Server::new(Handler { inner: self.inner.clone(), scope: scope.clone() });
        server.register_listener(tcp, self.inner.tcp_idle_timeout, 64);
        let stop = Arc::new(tokio::sync::Notify::new());
        let udp_task = tokio::spawn(udp_loop(udp, handler, stop.clone()));
        listeners.insert(key.to_owned(), Listener { server, udp_task, stop, scope, local });
        self.inner.metrics.listeners.set(listeners.len() as i64);
        Ok(())
    }

    /// Changes the networks a listener's task sees (a task joined or left a network).
    pub async fn set_scope(&self, key: &str, scope: Scope) -> Result<(), DnsError> {
        let listeners = self.listeners.lock().await;
        let l = listeners.get(key).ok_or_else(|| DnsError::NotAttached(key.to_owned()))?;
        l.scope.store(Arc::new(scope));
        Ok(())
    }

    /// Stops serving a task namespace and closes its sockets.
    pub async fn detach(&self, key: &str) -> Result<(), DnsError> {
        let l = {
            let mut listeners = self.listeners.lock().await;
            let l = listeners.remove(key).ok_or_else(|| DnsError::NotAttached(key.to_owned()))?;
            self.inner.metrics.listeners.set(listeners.len() as i64);
            l
        };
        let mut l = l;
        l.stop.notify_one();
        let _ = (&mut l.udp_task).await;
        if let Err(e) = l.server.shutdown_gracefully().await {
            tracing::debug!(key, local = %l.local, error = %e, "DNS listener ended with an error");
        }
        Ok(())
    }

    /// Keys of the attached listeners, sorted.
    pub async fn listeners(&self) -> Vec<String> {
        let mut v: Vec<String> = self.listeners.lock().await.keys().cloned().collect();
        v.sort();
        v
    }

    /// Answers one raw query as a UDP listener with `scope` would (fast path, else hickory's),
    /// without sockets: the request path for tests, fuzzing and diagnostics. `None` when the
    /// bytes are not a DNS request (the listener then answers a bare FORMERR header if a query
    /// header can be read, and drops the rest).
    pub async fn answer_raw(&self, scope: Scope, query: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        if self.answer_fast(scope.clone(), query, &mut out) {
            return Some(out);
        }
        self.answer_hickory(scope, query).await
    }

    /// The UDP fast path alone (a plain A/AAAA query for one of our names): `true` with the
    /// reply in `out`, or `false` when the query is not for it.
    pub fn answer_fast(&self, scope: Scope, query: &[u8], out: &mut Vec<u8>) -> bool {
        let handler =
            Handler { inner: self.inner.clone(), scope: Arc::new(ArcSwap::from_pointee(scope)) };
        let mut rng = handler.rng();
        handler.answer_fast(query, out, &mut Vec::new(), &mut rng)
    }

    /// The hickory path alone, as every query that is not for the fast path takes it.
    pub async fn answer_hickory(&self, scope: Scope, query: &[u8]) -> Option<Vec<u8>> {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5353);
        let request = Request::from_bytes(query.to_vec(), src, Protocol::Udp).ok()?;
        let handler =
            Handler { inner: self.inner.clone(), scope: Arc::new(ArcSwap::from_pointee(scope)) };
        let slot = Arc::default();
        handler.serve(&request, UdpReply::Capture(Arc::clone(&slot))).await;
        slot.lock().ok()?.take()
    }

    /// Detaches every listener.
    pub async fn shutdown(&self) {
        let keys = self.listeners().await;
        for k in keys {
            let _ = self.detach(&k).await;
        }
    }
}

fn bind_pair(addr: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), DnsError> {
    let udp = std::net::UdpSocket::bind(addr).map_err(|source| DnsError::Bind {
        addr,
        proto: "udp",
        source,
    })?;
    let port = udp.local_addr().map(|a| a.port()).unwrap_or(addr.port());
    let taddr = SocketAddr::new(addr.ip(), port);
    let tcp = std::net::TcpListener::bind(taddr).map_err(|source| DnsError::Bind {
        addr: taddr,
        proto: "tcp",
        source,
    })?;
    for r in [udp.set_nonblocking(true), tcp.set_nonblocking(true)] {
        r.map_err(|source| DnsError::Bind { addr, proto: "nonblocking", source })?;
    }
    Ok((udp, tcp))
}
