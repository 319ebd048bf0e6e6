//! Metrics per service and backend, read from the data path's atomic counters.

use std::fmt::Write;
use std::net::IpAddr;

use crate::health::HealthState;

/// Counters of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMetrics {
    /// Task id.
    pub id: String,
    /// Task address.
    pub addr: IpAddr,
    /// Health state now.
    pub health: HealthState,
    /// Open connections (TCP) plus live flows (UDP).
    pub active: u64,
    /// Connections and flows ever opened.
    pub total: u64,
    /// Times the balancer chose it.
    pub selected: u64,
    /// Bytes client → backend.
    pub bytes_in: u64,
    /// Bytes backend → client.
    pub bytes_out: u64,
    /// Connect failures, resets and errors.
    pub errors: u64,
}

/// Counters of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMetrics {
    /// Service name.
    pub name: String,
    /// Connections or datagrams refused because no backend was eligible.
    pub no_backend: u64,
    /// Connections and flows that reached their task from the client's own address.
    pub client_kept: u64,
    /// Connections and flows that reached their task from the ingress sandbox's address (the
    /// client's could not be kept: see [`crate::ClientAddr`]).
    pub client_fallback: u64,
    /// TCP connections refused because the service had `max_connections` open.
    pub refused_connections: u64,
    /// UDP datagrams dropped because a new flow would pass the service's `max_udp_flows`.
    pub refused_flows_service: u64,
    /// UDP datagrams dropped because a new flow would pass `max_udp_flows_per_source`.
    pub refused_flows_source: u64,
    /// Backends sorted by id (including draining ones until they are forgotten).
    pub backends: Vec<BackendMetrics>,
}

impl ServiceMetrics {
    /// Open connections over all backends.
    pub fn active(&self) -> u64 {
        self.backends.iter().map(|b| b.active).sum()
    }
    /// Connections ever opened over all backends.
    pub fn total(&self) -> u64 {
        self.backends.iter().map(|b| b.total).sum()
    }
    /// A backend by id.
    pub fn backend(&self, id: &str) -> Option<&BackendMetrics> {
        self.backends.iter().find(|b| b.id == id)
    }
}

type Getter = fn(&BackendMetrics) -> u64;
type ServiceGetter = fn(&ServiceMetrics) -> u64;

/// Renders metrics in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(services: &[ServiceMetrics]) -> String {
    let mut out = String::new();
    let gauges: [(&str, &str, Getter); 7] = [
        ("shoal_mesh_backend_active", "gauge", |b| b.active),
        ("shoal_mesh_backend_connections_total", "counter", |b| b.total),
        ("shoal_mesh_backend_selected_total", "counter", |b| b.selected),
        ("shoal_mesh_backend_bytes_in_total", "counter", |b| b.bytes_in),
        ("shoal_mesh_backend_bytes_out_total", "counter", |b| b.bytes_out),
        ("shoal_mesh_backend_errors_total", "counter", |b| b.errors),
        ("shoal_mesh_backend_up", "gauge", |b| u64::from(b.health == HealthState::Up)),
    ];
    for (name, kind, get) in gauges {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in services {
            for b in &s.backends {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",backend=\"{}\",addr=\"{}\",health=\"{}\"}} {}",
                    esc(&s.name),
                    esc(&b.id),
                    b.addr,
                    b.health.as_str(),
                    get(b)
                );
            }
        }
    }
    let per_service: [(&str, ServiceGetter); 4] = [
        ("shoal_mesh_no_backend_total", |s| s.no_backend),
        ("shoal_mesh_client_addr_kept_total", |s| s.client_kept),
        ("shoal_mesh_client_addr_fallback_total", |s| s.client_fallback),
        ("shoal_mesh_connections_refused_total", |s| s.refused_connections),
    ];
    for (name, get) in per_service {
        let _ = writeln!(out, "# TYPE {name} counter");
        for s in services {
            let _ = writeln!(out, "{name}{{service=\"{}\"}} {}", esc(&s.name), get(s));
        }
    }
    let name = "shoal_mesh_udp_flows_refused_total";
    let _ = writeln!(out, "# TYPE {name} counter");
    for s in services {
        let limits = [("service", s.refused_flows_service), ("source", s.refused_flows_source)];
        for (limit, n) in limits {
            let _ = writeln!(out, "{name}{{service=\"{}\",limit=\"{limit}\"}} {n}", esc(&s.name));
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
