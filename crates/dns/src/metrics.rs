//! Prometheus metrics of the resolver: queries by type and outcome, forwarding results, and the
//! time from a parsed query to the reply being handed to the socket.

use std::time::Duration;

use hickory_proto::rr::RecordType;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Query type, as a closed label set (no allocation per query).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum QType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    AAAA,
    /// Reverse lookup.
    PTR,
    /// Service record.
    SRV,
    /// Text record.
    TXT,
    /// Mail exchanger.
    MX,
    /// Any type.
    ANY,
    /// Every other type.
    Other,
}

impl From<RecordType> for QType {
    fn from(t: RecordType) -> Self {
        match t {
            RecordType::A => QType::A,
            RecordType::AAAA => QType::AAAA,
            RecordType::PTR => QType::PTR,
            RecordType::SRV => QType::SRV,
            RecordType::TXT => QType::TXT,
            RecordType::MX => QType::MX,
            RecordType::ANY => QType::ANY,
            _ => QType::Other,
        }
    }
}

/// How a query ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Answered from our records with at least one record.
    Answer,
    /// Our name, no record of that type.
    NoData,
    /// Our space, no such name.
    NxDomain,
    /// Forwarded and relayed (whatever the upstream's rcode).
    Forwarded,
    /// Forwarding failed (no upstream, timeout, too many in flight).
    ServFail,
    /// The request was malformed (no question, several questions).
    FormErr,
    /// An opcode or class we do not serve.
    NotImp,
    /// A query type we refuse (zone transfers).
    Refused,
}

/// Labels of `shoal_dns_queries_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// Query type.
    pub qtype: QType,
    /// Outcome.
    pub outcome: Outcome,
}

/// Result of one forwarded query.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ForwardResult {
    /// An upstream answered.
    Ok,
    /// No usable upstream was configured.
    NoUpstream,
    /// Every upstream timed out.
    Timeout,
    /// The in-flight bound was reached.
    Busy,
    /// Socket error or an unusable reply.
    Error,
}

/// Labels of `shoal_dns_forwarded_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// Result.
    pub result: ForwardResult,
}

/// The resolver's metrics. Cheap to clone (the metrics are shared handles); register once with
/// [`Metrics::register`].
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Queries by type and outcome.
    pub queries: Family<QueryLabels, Counter>,
    /// Forwarded queries by result.
    pub forwarded: Family<ForwardLabels, Counter>,
    /// Seconds from parsed query to reply sent.
    pub latency: Histogram,
    /// Task namespaces currently served.
    pub listeners: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queries: Family::default(),
            forwarded: Family::default(),
            // 10 µs .. ~5 s
            latency: Histogram::new(exponential_buckets(1e-5, 3.0, 13)),
            listeners: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Fresh, unregistered metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric under `dns_*` in `registry`: `shoal_dns_*` in the agent's
    /// registry, whose prefix is `shoal`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("dns");
        sub.register("queries", "DNS queries by type and outcome", self.queries.clone());
        sub.register(
            "forwarded",
            "Queries forwarded to the host's resolvers, by result",
            self.forwarded.clone(),
        );
        sub.register(
            "request_duration_seconds",
            "Time from a parsed query to its reply",
            self.latency.clone(),
        );
        sub.register(
            "listeners",
            "Task namespaces with a listener at 127.0.0.11:53",
            self.listeners.clone(),
        );
    }

    /// Counts one query.
    pub fn query(&self, qtype: RecordType, outcome: Outcome, took: Duration) {
        self.queries.get_or_create(&QueryLabels { qtype: qtype.into(), outcome }).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts one forwarding attempt.
    pub fn forward(&self, result: ForwardResult) {
        self.forwarded.get_or_create(&ForwardLabels { result }).inc();
    }
}
