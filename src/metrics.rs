//! The agent's own Prometheus metrics. Each crate brings its own families; they register into
//! the one registry kept here, and `/metrics` encodes it in the text format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    path: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The registry and the agent-level metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    uptime: Gauge<f64, AtomicU64>,
    api_requests: Family<ApiLabels, Counter>,
    api_refused: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn new(node_name: &str) -> Self {
        let mut registry = Registry::with_prefix("shoal");
        registry.register(
            "build",
            "Build information",
            Info::new(vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("node".to_owned(), node_name.to_owned()),
            ]),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        registry.register("uptime_seconds", "Seconds since the agent started", uptime.clone());
        let api_requests = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by path and status code",
            api_requests.clone(),
        );
        let api_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "api_refused",
            "API requests refused by a limit, by reason",
            api_refused.clone(),
        );
        Metrics { registry, uptime, api_requests, api_refused }
    }

    /// The registry, for crates that register their own families at start-up.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn set_uptime(&self, secs: f64) {
        self.uptime.set(secs);
    }

    pub fn api_request(&self, path: &str, code: u16) {
        self.api_requests.get_or_create(&ApiLabels { path: path.to_owned(), code }).inc();
    }

    /// A request refused by a limit (`body_too_large`).
    pub fn api_refused(&self, reason: &'static str) {
        self.api_refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The whole registry in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
