//! The per-namespace request handler: the wire fast path, the plan of a parsed request (an
//! error, our records, or a forward) and its execution, and the response handlers that encode
//! replies.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::forward::{Forwarder, Question};
use crate::metrics::{Metrics, Outcome};
use crate::records::{Lookup, Scope, Zone};
use crate::wire::SimpleQuery;

/// What the service's handlers share: the names served, the forwarder, the metrics and the
/// reply settings. The server owns it; every listener's handler holds it.
pub(crate) struct Inner {
    pub(crate) records: ArcSwap<Zone>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) metrics: Metrics,
    pub(crate) seed: u64,
    pub(crate) counter: AtomicU64,
    pub(crate) edns_payload: u16,
    pub(crate) tcp_idle_timeout: Duration,
    pub(crate) watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The per-namespace request handler.
pub(crate) struct Handler {
    pub(crate) inner: Arc<Inner>,
    pub(crate) scope: Arc<ArcSwap<Scope>>,
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
pub(crate) enum Plan {
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
    pub(crate) fn answer_fast(
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

    pub(crate) fn rng(&self) -> SmallRng {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(self.inner.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub(crate) fn plan(&self, request: &Request) -> Plan {
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
    pub(crate) async fn serve<R: ResponseHandler>(&self, request: &Request, rh: R) -> ResponseInfo {
        let start = Instant::now();
        let plan = self.plan(request);
        let (info, qtype, outcome) = self.execute(request, plan, rh).await;
        self.inner.metrics.query(qtype, outcome, start.elapsed());
        info
    }

    pub(crate) async fn execute<R: ResponseHandler>(
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

/// Where a reply to a UDP query goes once encoded: the one response handler of the UDP path.
#[derive(Clone)]
pub(crate) enum UdpReply {
    /// Sent to the client from the listener's socket.
    Client { sock: Arc<tokio::net::UdpSocket>, dst: SocketAddr },
    /// Kept for the caller instead of sent (the hickory path driven without a socket).
    Capture(Arc<std::sync::Mutex<Option<Vec<u8>>>>),
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
        match self {
            UdpReply::Client { sock, dst } => {
                sock.send_to(&buf, *dst).await?;
            }
            UdpReply::Capture(slot) => {
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(buf);
                }
            }
        }
        Ok(info)
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
