//! What the data path shares with a service's control task: the [`Service`] cell (spec,
//! snapshot, health view, counters) and the node-wide [`Ctx`]. The mesh driver, the control
//! task, the TCP path and the UDP path all read these; this module imports none of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::balancer::{Backend, BackendSet};
use crate::forward::{ForwardMode, PipePool};
use crate::health::HealthState;
use crate::metrics::{BackendMetrics, ServiceMetrics};
use crate::spec::{BackendSpec, ClientAddr, ServiceSpec};
use crate::upstream::Upstream;

/// A message to a service's control task.
pub(crate) enum Ctl {
    /// A new spec and the full backend set.
    Update(Box<ServiceSpec>, Vec<BackendSpec>),
    /// A connect outcome to a backend (by id) seen on the data path.
    Connect(String, bool),
    /// The service is gone: drain its backends, then end.
    Shutdown,
}

/// What the data path shares with a service's control task.
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) spec: ArcSwap<ServiceSpec>,
    pub(crate) snapshot: ArcSwap<BackendSet>,
    /// The backends with their health, for metrics; rebuilt with the snapshot.
    pub(crate) view: ArcSwap<Vec<(Arc<Backend>, HealthState)>>,
    pub(crate) ctl: mpsc::UnboundedSender<Ctl>,
    pub(crate) no_backend: AtomicU64,
    /// Connections and flows that reached their task from the client's own address.
    client_kept: AtomicU64,
    /// Connections and flows that reached their task from the sandbox's address instead.
    client_fallback: AtomicU64,
    /// TCP connections open now (what `max_connections` limits).
    pub(crate) open_connections: AtomicU64,
    /// Connections refused at `max_connections`.
    pub(crate) refused_connections: AtomicU64,
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
    /// A service with no eligible backend yet, whose control task listens on `ctl`'s other end.
    pub(crate) fn new(spec: &ServiceSpec, ctl: mpsc::UnboundedSender<Ctl>) -> Service {
        Service {
            name: spec.name.clone(),
            spec: ArcSwap::from_pointee(spec.clone()),
            snapshot: ArcSwap::from_pointee(BackendSet::default()),
            view: ArcSwap::from_pointee(Vec::new()),
            ctl,
            no_backend: AtomicU64::new(0),
            client_kept: AtomicU64::new(0),
            client_fallback: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            udp_flows: AtomicU64::new(0),
            refused_flows_service: AtomicU64::new(0),
            refused_flows_source: AtomicU64::new(0),
        }
    }

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

    /// The service's counters and its backends' now.
    pub(crate) fn metrics(&self) -> ServiceMetrics {
        let view = self.view.load();
        ServiceMetrics {
            name: self.name.clone(),
            no_backend: self.no_backend.load(Ordering::Relaxed),
            client_kept: self.client_kept.load(Ordering::Relaxed),
            client_fallback: self.client_fallback.load(Ordering::Relaxed),
            refused_connections: self.refused_connections.load(Ordering::Relaxed),
            refused_flows_service: self.refused_flows_service.load(Ordering::Relaxed),
            refused_flows_source: self.refused_flows_source.load(Ordering::Relaxed),
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
}

/// What every data-path task needs from the node.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) upstream: Upstream,
    pub(crate) pipes: PipePool,
    pub(crate) forward: ForwardMode,
    pub(crate) attempts: u32,
    pub(crate) client_addr: ArcSwap<ClientAddr>,
    /// Counts changes of any backend's health, for whoever follows them ([`Mesh::health_changes`](crate::Mesh::health_changes)).
    pub(crate) health_changes: tokio::sync::watch::Sender<u64>,
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
