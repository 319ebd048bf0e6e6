//! The tokio/hickory driver: listeners at 127.0.0.11:53 (UDP and TCP) in each task namespace,
//! one hickory [`Server`] per namespace whose handler knows that task's [`Scope`], all sharing
//! one record snapshot (arc-swap) and one forwarder.
//!
//! hickory's [`Request`] does not say which socket a query arrived on, and every task's listener
//! has the same address, so the scope is carried by the handler: one `Server` per namespace.
//! That also gives removal for free: shutting one `Server` down closes that namespace's sockets.
//!
//! TCP is served by hickory's `Server`. UDP is read by a small loop of ours
//! (`udp_loop`) that reads up to 32 datagrams per `recvmmsg` and hands each to the same
//! handler: a plain A/AAAA query for one of our names is answered by the [`crate::wire`] fast
//! path into reused buffers (no allocation per packet) and the batch's answers go out in one
//! `sendmmsg`; everything else is parsed into a hickory `Request` and answered by the handler;
//! only forwarded queries get a task. (hickory's own UDP loop spawns a task and sends through a
//! channel for every datagram, which cost about 20% more CPU per query than unbound in the
//! side-by-side benchmark.)
//!
//! hickory-server logs every request at `info`: the agent's tracing filter should set
//! `hickory_server=warn`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use shoal_netns::NetNs;
use tokio::io::Interest;

use crate::forward::{self, ForwardConfig, Forwarder, Question};
use crate::metrics::{Metrics, Outcome};
use crate::records::{Lookup, RecordsConfig, Scope, Snapshot};
use crate::wire::{self, SimpleQuery};

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

struct Inner {
    records: ArcSwap<Snapshot>,
    forwarder: Arc<Forwarder>,
    metrics: Metrics,
    seed: u64,
    counter: AtomicU64,
    edns_payload: u16,
    tcp_idle_timeout: Duration,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.udp_task.abort();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
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
                records: ArcSwap::from_pointee(Snapshot::empty(config.records)),
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
    pub fn update(&self, snapshot: Snapshot) {
        self.inner.records.store(Arc::new(snapshot));
    }

    /// The snapshot in use.
    pub fn records(&self) -> Arc<Snapshot> {
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
        let capture = Capture::default();
        handler.serve(&request, capture.clone()).await;
        capture.0.lock().ok()?.take()
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

/// The per-namespace request handler.
struct Handler {
    inner: Arc<Inner>,
    scope: Arc<ArcSwap<Scope>>,
}

/// The lower-case presentation form of a query name without the trailing dot; `None` if a label
/// is not plain text (then it cannot be one of our names).
fn query_name<'b>(name: &hickory_proto::rr::Name, buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let mut len = 0;
    for label in name.iter() {
        if label.contains(&b'.') {
            return None;
        }
        let sep = usize::from(len > 0);
        let end = len + sep + label.len();
        if end > buf.len() {
            return None;
        }
        if sep == 1 {
            buf[len] = b'.';
        }
        buf[len + sep..end].copy_from_slice(label);
        len = end;
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// What a request needs, decided without I/O.
enum Plan {
    /// An error reply with this code.
    Error(ResponseCode, Outcome),
    /// An answer from our records, with their TTL.
    Local(Lookup, u32),
    /// Not ours: forward upstream.
    Forward,
}

impl Handler {
    /// The fast path: a plain A/AAAA query for one of our names is answered into `out` without
    /// hickory and without allocating (`scratch` and `out` keep their capacity between calls).
    /// `false` when it does not apply (then the hickory path answers).
    fn answer_fast(
        &self,
        datagram: &[u8],
        out: &mut Vec<u8>,
        scratch: &mut Vec<IpAddr>,
        rng: &mut SmallRng,
    ) -> bool {
        let Some(q) = SimpleQuery::parse(datagram) else {
            return false;
        };
        let mut buf = [0u8; 256];
        let Some(name) = q.name(&mut buf) else {
            return false;
        };
        let snap = self.inner.records.load();
        let scope = self.scope.load();
        let Some(addrs) = snap.addrs_of(&scope, name) else {
            return false;
        };
        let v6 = q.qtype == 28;
        scratch.clear();
        scratch.extend(addrs.iter().filter(|a| a.is_ipv6() == v6));
        if scratch.is_empty() {
            // NODATA: the hickory path answers it.
            return false;
        }
        if scratch.len() > 1 {
            scratch.shuffle(rng);
        }
        q.answer(scratch, snap.ttl(), out);
        true
    }

    fn rng(&self) -> SmallRng {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(self.inner.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn plan(&self, request: &Request) -> Plan {
        if request.metadata.op_code != OpCode::Query {
            return Plan::Error(ResponseCode::NotImp, Outcome::NotImp);
        }
        let queries = request.queries.queries();
        if queries.len() != 1 {
            return Plan::Error(ResponseCode::FormErr, Outcome::FormErr);
        }
        let q = &queries[0];
        if q.query_class() != DNSClass::IN {
            return Plan::Error(ResponseCode::NotImp, Outcome::NotImp);
        }
        let qtype = q.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Plan::Error(ResponseCode::Refused, Outcome::Refused);
        }
        let mut buf = [0u8; 256];
        let Some(name) = query_name(q.name(), &mut buf) else {
            return Plan::Forward;
        };
        let snap = self.inner.records.load();
        let scope = self.scope.load();
        match snap.lookup(&scope, name, qtype, &mut self.rng()) {
            Lookup::NotOurs => Plan::Forward,
            other => Plan::Local(other, snap.ttl()),
        }
    }

    /// Plans, answers and counts one request.
    async fn serve<R: ResponseHandler>(&self, request: &Request, rh: R) -> ResponseInfo {
        let start = Instant::now();
        let plan = self.plan(request);
        let (info, qtype, outcome) = self.execute(request, plan, rh).await;
        self.inner.metrics.query(qtype, outcome, start.elapsed());
        info
    }

    async fn execute<R: ResponseHandler>(
        &self,
        request: &Request,
        plan: Plan,
        mut rh: R,
    ) -> (ResponseInfo, RecordType, Outcome) {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().clamp(512, self.inner.edns_payload));
            r
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let first = request.queries.queries().first();
        let qtype = first.map_or(RecordType::Unknown(0), |q| q.query_type());
        let local = match plan {
            Plan::Error(code, outcome) => {
                meta.response_code = code;
                let info = send(&mut rh, builder.build_no_records(meta)).await;
                return (info, qtype, outcome);
            }
            Plan::Local(lookup, ttl) => Some((lookup, ttl)),
            Plan::Forward => None,
        };
        let Some(q) = first else {
            meta.response_code = ResponseCode::FormErr;
            let info = send(&mut rh, builder.build_no_records(meta)).await;
            return (info, qtype, Outcome::FormErr);
        };
        let owner = q.original().name().clone();
        let Some((lookup, ttl)) = local else {
            let question = Question { name: owner, qtype, qclass: q.query_class() };
            return self.forward(request, question, meta, builder, rh).await;
        };
        meta.authoritative = true;
        match lookup {
            Lookup::Addrs(addrs) => {
                let records: Vec<Record> = addrs
                    .iter()
                    .map(|ip| {
                        let rdata = match ip {
                            IpAddr::V4(v4) => RData::A(A(*v4)),
                            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                        };
                        Record::from_rdata(owner.clone(), ttl, rdata)
                    })
                    .collect();
                let resp = builder.build(meta, records.iter(), [], [], []);
                (send(&mut rh, resp).await, qtype, Outcome::Answer)
            }
            Lookup::Ptr(target) => {
                let records = [Record::from_rdata(owner, ttl, RData::PTR(PTR(target)))];
                let resp = builder.build(meta, records.iter(), [], [], []);
                (send(&mut rh, resp).await, qtype, Outcome::Answer)
            }
            Lookup::NoData => {
                (send(&mut rh, builder.build_no_records(meta)).await, qtype, Outcome::NoData)
            }
            Lookup::NxDomain | Lookup::NotOurs => {
                meta.response_code = ResponseCode::NXDomain;
                (send(&mut rh, builder.build_no_records(meta)).await, qtype, Outcome::NxDomain)
            }
        }
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        question: Question,
        mut meta: Metadata,
        builder: MessageResponseBuilder<'_>,
        mut rh: R,
    ) -> (ResponseInfo, RecordType, Outcome) {
        let qtype = question.qtype;
        match self.inner.forwarder.forward(request.as_slice(), &question).await {
            Ok(reply) => {
                let mut m = reply.metadata;
                m.id = request.metadata.id;
                m.recursion_available = true;
                m.truncation = false;
                let resp = builder.build(
                    m,
                    reply.answers.iter(),
                    reply.authorities.iter(),
                    [],
                    reply.additionals.iter(),
                );
                (send(&mut rh, resp).await, qtype, Outcome::Forwarded)
            }
            Err(e) => {
                tracing::debug!(name = %question.name, error = %e, "forwarding failed");
                meta.response_code = ResponseCode::ServFail;
                (send(&mut rh, builder.build_no_records(meta)).await, qtype, Outcome::ServFail)
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    rh: &mut R,
    resp: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let meta = *resp.metadata();
    match rh.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "sending a DNS reply failed");
            ResponseInfo::from(Header { metadata: meta, counts: HeaderCounts::default() })
        }
    }
}

/// Encodes a reply under the UDP size rules: the EDNS size we answer with, or 512 bytes; what
/// does not fit is cut and flagged TC (hickory's encoder does the cutting).
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    buf: &mut Vec<u8>,
) -> Result<ResponseInfo, NetError> {
    let max = response.edns().map_or(512, |e| e.max_payload().max(512));
    let id = response.metadata().id;
    buf.clear();
    let mut encoder = BinEncoder::new(buf);
    encoder.set_max_size(max);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => Ok(info),
        Err(e) => {
            // The same fallback as hickory's own encoder: a bare SERVFAIL header.
            tracing::debug!(error = %e, "encoding a reply failed");
            buf.clear();
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header { metadata, counts: HeaderCounts::default() };
            let mut encoder = BinEncoder::new(buf);
            header.emit(&mut encoder)?;
            Ok(ResponseInfo::from(header))
        }
    }
}

/// A response handler that keeps the encoded reply instead of sending it.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let info = encode_udp(response, &mut buf)?;
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(buf);
        }
        Ok(info)
    }
}

/// Sends the reply to one UDP client from the listener's socket.
#[derive(Clone)]
struct UdpReply {
    sock: Arc<tokio::net::UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let info = encode_udp(response, &mut buf)?;
        self.sock.send_to(&buf, self.dst).await?;
        Ok(info)
    }
}

/// A FORMERR header for bytes that carry a query header but do not parse; `None` when not even
/// that, or when it is a response (never answer those).
fn formerr(query: &[u8]) -> Option<[u8; 12]> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut r = [0u8; 12];
    r[..2].copy_from_slice(&query[..2]);
    // QR, the request's opcode and RD; then RA and rcode 1 (FORMERR).
    r[2] = 0x80 | (query[2] & 0x79);
    r[3] = 0x80 | 0x01;
    Some(r)
}

/// Datagrams read (and fast-path replies sent) per system call.
const BATCH: usize = 32;
/// Largest datagram read; longer ones arrive cut and fail to parse (FORMERR).
const RX_MAX: usize = 4096;

/// The loop's buffers, allocated once per listener: nothing on the per-packet path allocates
/// (the slow hickory path aside).
struct Buffers {
    rx: Vec<[u8; RX_MAX]>,
    /// Length and source of each datagram of the last batch.
    got: [(usize, Option<SocketAddr>); BATCH],
    /// Fast-path replies of this batch, and where they go.
    replies: Vec<Vec<u8>>,
    dst: [Option<SockaddrStorage>; BATCH],
    /// Query type of each reply, for the metrics.
    qtypes: [u16; BATCH],
    scratch: Vec<IpAddr>,
}

/// The kernel-facing headers of `recvmmsg`/`sendmmsg`. They hold raw pointers, so they are not
/// `Send` and cannot live in the loop's task across an await: each thread that runs a loop
/// keeps one pair, made on its first batch and reused after.
struct Headers {
    rx: MultiHeaders<SockaddrStorage>,
    tx: MultiHeaders<SockaddrStorage>,
}

thread_local! {
    static HEADERS: RefCell<Headers> = RefCell::new(Headers {
        rx: MultiHeaders::preallocate(BATCH, None),
        tx: MultiHeaders::preallocate(BATCH, None),
    });
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            rx: vec![[0u8; RX_MAX]; BATCH],
            got: [(0, None); BATCH],
            replies: (0..BATCH).map(|_| Vec::with_capacity(wire::UDP_MAX)).collect(),
            dst: [None; BATCH],
            qtypes: [0; BATCH],
            scratch: Vec::with_capacity(wire::UDP_MAX / 16),
        }
    }
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Reads up to [`BATCH`] datagrams with one `recvmmsg`, without waiting; `WouldBlock` when
/// there are none.
fn recv_batch(fd: RawFd, b: &mut Buffers) -> std::io::Result<usize> {
    HEADERS.with_borrow_mut(|h| {
        let mut bufs = b.rx.iter_mut();
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(bufs.next().map_or(&mut [][..], |buf| &mut buf[..]))]
        });
        let results = recvmmsg(fd, &mut h.rx, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
            .map_err(std::io::Error::from)?;
        let mut n = 0;
        for (slot, r) in b.got.iter_mut().zip(results) {
            *slot = (r.bytes, r.address.as_ref().and_then(to_std));
            n += 1;
        }
        Ok(n)
    })
}

/// Sends replies `off..k` with one `sendmmsg`, without waiting; how many went.
fn send_mmsg(fd: RawFd, b: &Buffers, off: usize, k: usize) -> nix::Result<usize> {
    HEADERS.with_borrow_mut(|h| {
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(b.replies.get(i).map_or(&[][..], |r| r))]);
        sendmmsg(
            fd,
            &mut h.tx,
            iovs[off..k].iter(),
            &b.dst[off..k],
            [] as [ControlMessage<'_>; 0],
            MsgFlags::MSG_DONTWAIT,
        )
        .map(|r| r.count())
    })
}

/// Sends the first `k` replies with `sendmmsg`, falling back to one awaited `send_to` for a
/// reply the socket has no room for; a reply that cannot be sent is dropped (the client asks
/// again), as a failed `send_to` was before.
async fn send_batch(sock: &tokio::net::UdpSocket, fd: RawFd, b: &Buffers, k: usize) {
    let mut off = 0;
    while off < k {
        match send_mmsg(fd, b, off, k) {
            Ok(n) if n > 0 => off += n,
            Err(nix::errno::Errno::EAGAIN) => {
                if let Some(dst) = b.dst[off].as_ref().and_then(to_std) {
                    let _ = sock.send_to(&b.replies[off], dst).await;
                }
                off += 1;
            }
            // The first reply failed (its destination, say): skip it.
            _ => off += 1,
        }
    }
}

/// The UDP side of a listener. hickory's `Server` spawns a task per datagram and passes each
/// reply through a channel to the socket's task; here datagrams are read [`BATCH`] at a time
/// (`recvmmsg`), plain A/AAAA queries for our names are answered by the fast path into reused
/// buffers and sent together (`sendmmsg`), anything else is parsed (hickory's `Request`),
/// answered by the same handler and sent inline, and only a forwarded one gets a task.
async fn udp_loop(
    sock: tokio::net::UdpSocket,
    handler: Arc<Handler>,
    stop: Arc<tokio::sync::Notify>,
) {
    let sock = Arc::new(sock);
    let fd = sock.as_raw_fd();
    let mut b = Buffers::new();
    let mut rng = handler.rng();
    let mut forwards = tokio::task::JoinSet::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let metrics = &handler.inner.metrics;
    'serve: loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = sock.readable() => if let Err(e) = r {
                tracing::warn!(error = %e, "DNS UDP socket closed");
                break;
            },
        }
        // A few batches per wake-up, then back through `select!`: the stop signal is seen and
        // `readable()` spends the task's cooperative budget, so a flood cannot starve the
        // runtime's other tasks.
        for _ in 0..4 {
            let n = match sock.try_io(Interest::READABLE, || recv_batch(fd, &mut b)) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // As hickory's loop does: these mean the socket is gone for good.
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionAborted
                    ) {
                        tracing::warn!(error = %e, "DNS UDP socket closed");
                        break 'serve;
                    }
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    break;
                }
            };
            while forwards.try_join_next().is_some() {}
            let start = Instant::now();
            let mut k = 0;
            for i in 0..n {
                let (len, Some(src)) = b.got[i] else { continue };
                if src.port() == 0 {
                    continue;
                }
                let bytes = &b.rx[i][..len.min(RX_MAX)];
                if handler.answer_fast(bytes, &mut b.replies[k], &mut b.scratch, &mut rng) {
                    b.dst[k] = Some(SockaddrStorage::from(src));
                    // The fast path only takes queries that end in type and class.
                    let t = bytes.len() - 4;
                    b.qtypes[k] = u16::from_be_bytes([bytes[t], bytes[t + 1]]);
                    k += 1;
                    continue;
                }
                serve_slow(&sock, &handler, &mut forwards, bytes, src, start).await;
            }
            if k > 0 {
                send_batch(&sock, fd, &b, k).await;
                let took = start.elapsed();
                for &t in &b.qtypes[..k] {
                    metrics.query(RecordType::from(t), Outcome::Answer, took);
                }
            }
            if n < BATCH {
                // Drained: wait for readiness (the next read clears it if this one did not).
                break;
            }
        }
    }
}

/// Everything but the fast path: parse with hickory, answer inline, forward in a task.
async fn serve_slow(
    sock: &Arc<tokio::net::UdpSocket>,
    handler: &Arc<Handler>,
    forwards: &mut tokio::task::JoinSet<()>,
    bytes: &[u8],
    src: SocketAddr,
    start: Instant,
) {
    let request = match Request::from_bytes(bytes.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            if let Some(reply) = formerr(bytes) {
                let _ = sock.send_to(&reply, src).await;
                let metrics = &handler.inner.metrics;
                metrics.query(RecordType::Unknown(0), Outcome::FormErr, Duration::ZERO);
            }
            return;
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return;
    }
    let rh = UdpReply { sock: sock.clone(), dst: src };
    match handler.plan(&request) {
        Plan::Forward => {
            let handler = handler.clone();
            forwards.spawn(async move {
                let (_, qtype, outcome) = handler.execute(&request, Plan::Forward, rh).await;
                handler.inner.metrics.query(qtype, outcome, start.elapsed());
            });
        }
        plan => {
            let (_, qtype, outcome) = handler.execute(&request, plan, rh).await;
            handler.inner.metrics.query(qtype, outcome, start.elapsed());
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.serve(request, response_handle).await
    }
}
