//! What an operator sees of the control plane: gossip's and Raft's metrics on `/metrics`, and the
//! visualizer's view of the cluster, rebuilt from the managers' store.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use shoal_cluster::Cluster;
use tokio::sync::watch;

use crate::ui::{ClusterView, MeshView, NodeView, ServiceView, TaskView};

/// Forwards a scrape to whichever gossip instance runs now (standalone or the swarm's), so the
/// registry holds one collector however often the node joins and leaves swarms.
#[derive(Debug)]
pub struct CurrentGossip(pub Arc<ArcSwapOption<shoal_gossip::Gossip>>);

impl Collector for CurrentGossip {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        match self.0.load().as_ref() {
            Some(g) => g.collector().encode(encoder),
            None => Ok(()),
        }
    }
}

/// Raft figures of this manager, read at scrape time (nothing on workers or outside a swarm).
#[derive(Debug)]
pub struct RaftCollector(pub Arc<ArcSwapOption<Cluster>>);

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for RaftCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(c) = self.0.load_full() else { return Ok(()) };
        refusals(&mut e, c.refusals())?;
        let Some(r) = c.raft_status() else { return Ok(()) };
        let me = c.info().node;
        let idx = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&mut e, "raft_term", "Current Raft term", idx(Some(r.term)))?;
        gauge(
            &mut e,
            "raft_is_leader",
            "1 when this manager is the Raft leader",
            i64::from(r.leader == Some(me)),
        )?;
        gauge(
            &mut e,
            "raft_has_leader",
            "1 when this manager knows a leader",
            i64::from(r.leader.is_some()),
        )?;
        gauge(&mut e, "raft_voters", "Raft voters (managers)", r.voters.len() as i64)?;
        gauge(
            &mut e,
            "raft_last_applied_index",
            "Last log index applied to the store",
            idx(r.last_applied),
        )?;
        gauge(&mut e, "raft_last_log_index", "Last log index appended here", idx(r.last_log))?;
        gauge(
            &mut e,
            "raft_apply_lag",
            "Log entries appended here but not yet applied to the store",
            idx(r.last_log).saturating_sub(idx(r.last_applied)).max(0),
        )?;
        gauge(&mut e, "raft_snapshot_index", "Log index of the last snapshot", idx(r.snapshot))?;
        gauge(&mut e, "raft_purged_index", "Last log index removed by compaction", idx(r.purged))?;
        Ok(())
    }
}

/// What this node's control plane refused (see `shoal_cluster::authz`), on every node.
fn refusals(
    e: &mut DescriptorEncoder<'_>,
    r: shoal_cluster::authz::RefusalCounts,
) -> std::fmt::Result {
    use prometheus_client::metrics::counter::ConstCounter;
    for (name, help, v) in [
        (
            "raft_refused",
            "Raft messages refused: the sender is not in this manager's Raft membership",
            r.raft,
        ),
        (
            "node_requests_refused",
            "Direct requests refused: the caller is not a manager in the store",
            r.node_requests,
        ),
        (
            "untrusted_ca_refused",
            "Requests refused: the caller's certificate is from a CA the swarm no longer trusts",
            r.untrusted_ca,
        ),
    ] {
        let c = ConstCounter::new(v);
        c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)?;
    }
    Ok(())
}

/// The visualizer's view from a manager's store: one column per node with its current tasks,
/// and one row per service with this manager's routing-mesh figures for it.
pub async fn cluster_view(
    c: &Cluster,
    engine: Option<&crate::engine::NodeEngine>,
) -> Option<ClusterView> {
    use crate::engine::records;
    let nodes = c.nodes().await.ok()?;
    let state = c.store().await.ok()?;
    let services = records::services(&state);
    let net_name = |id: &str| state.networks.get(id).map_or(id.to_owned(), |n| n.name.clone());
    let mut view = ClusterView {
        nodes: nodes
            .into_iter()
            .map(|n| NodeView {
                id: n.record.id.to_string(),
                hostname: n.record.hostname.clone(),
                role: n.record.role.to_string(),
                manager_status: n.manager_status.map(|m| m.to_string()),
                status: n.record.status.to_string(),
                availability: n.record.availability.to_string(),
                addr: n.record.data_addr.to_string(),
                tasks: Vec::new(),
            })
            .collect(),
        services: Vec::new(),
    };
    let tasks = records::tasks(&state);
    for t in tasks.values() {
        // Current tasks only: wanted running, or still stopping.
        let current =
            t.task.desired == shoal_scheduler::DesiredState::Running || !t.task.state.is_terminal();
        let Some(node) = t.task.node_id.as_ref() else { continue };
        let Some(col) = view.nodes.iter_mut().find(|n| n.id == *node) else { continue };
        if !current {
            continue;
        }
        let svc = services.get(&t.task.service_id);
        col.tasks.push(TaskView {
            name: t.display_name(svc.map(Arc::as_ref)),
            // A standalone task is coloured and filtered by its own name.
            service: svc.map_or_else(|| t.display_name(None), |s| s.name.clone()),
            slot: t.task.slot,
            state: t.task.state.as_str().to_owned(),
            health: t.health.clone(),
            ips: t.addresses.iter().map(|(n, ip)| format!("{}={ip}", net_name(n))).collect(),
        });
    }
    for n in &mut view.nodes {
        n.tasks.sort_by(|a, b| (&a.service, a.slot, &a.name).cmp(&(&b.service, b.slot, &b.name)));
    }
    let mesh = engine.map(|e| e.mesh().metrics()).unwrap_or_default();
    for svc in services.values() {
        let running = tasks
            .values()
            .filter(|t| {
                t.task.service_id == svc.id
                    && t.task.desired == shoal_scheduler::DesiredState::Running
                    && t.task.state == shoal_scheduler::TaskState::Running
            })
            .count() as u64;
        let (mode, desired) = match svc.mode {
            shoal_scheduler::Mode::Replicated { replicas } => ("replicated", replicas),
            shoal_scheduler::Mode::Global => ("global", running),
        };
        let m = mesh.iter().find(|m| m.name == svc.name).map(|m| MeshView {
            active_connections: m.backends.iter().map(|b| b.active).sum(),
            requests_per_second: None,
            bytes_per_second: 0.0,
            healthy_backends: m
                .backends
                .iter()
                .filter(|b| b.health == shoal_ingress::HealthState::Up)
                .count() as u64,
            backends: m.backends.len() as u64,
        });
        view.services.push(ServiceView {
            name: svc.name.clone(),
            mode: mode.into(),
            desired,
            running,
            published: svc
                .ports
                .iter()
                .map(|p| format!("{}:{}/{}", p.published, p.target, p.protocol.as_str()))
                .collect(),
            mesh: m,
        });
    }
    view.nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    Some(view)
}

/// Bytes through the mesh per service at the last look, for a rate.
type MeshBytes = std::collections::BTreeMap<String, (std::time::Instant, u64)>;

fn mesh_rates(
    view: &mut ClusterView,
    engine: Option<&crate::engine::NodeEngine>,
    last: &mut MeshBytes,
) {
    let Some(e) = engine else { return };
    let now = std::time::Instant::now();
    for m in e.mesh().metrics() {
        let total: u64 = m.backends.iter().map(|b| b.bytes_in + b.bytes_out).sum();
        if let Some((t, before)) = last.insert(m.name.clone(), (now, total)) {
            let secs = now.duration_since(t).as_secs_f64();
            if let Some(mv) =
                view.services.iter_mut().find(|s| s.name == m.name).and_then(|s| s.mesh.as_mut())
                && secs > 0.0
            {
                mv.bytes_per_second = total.saturating_sub(before) as f64 / secs;
            }
        }
    }
}

/// Keeps `tx` up to date with the cluster, once a second; an empty view outside a swarm or on a
/// worker (whose store is not the cluster's).
pub async fn follow_cluster(
    cluster: Arc<ArcSwapOption<Cluster>>,
    engine: Arc<ArcSwapOption<crate::engine::NodeEngine>>,
    tx: watch::Sender<ClusterView>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut bytes = MeshBytes::new();
    loop {
        tick.tick().await;
        let engine = engine.load_full();
        let view = match cluster.load_full() {
            Some(c) => {
                let mut v = cluster_view(&c, engine.as_deref()).await.unwrap_or_default();
                mesh_rates(&mut v, engine.as_deref(), &mut bytes);
                v
            }
            None => ClusterView::default(),
        };
        tx.send_if_modified(|v| {
            let changed = *v != view;
            if changed {
                *v = view;
            }
            changed
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// Serves the visualizer on `addr` while this node is a manager, and not otherwise: it binds
/// when the node becomes a manager (init, join as manager, promote) and lets go on demote or
/// leave. Stops with the agent.
pub async fn serve_ui_on_managers(
    addr: std::net::SocketAddr,
    cluster: Arc<ArcSwapOption<Cluster>>,
    engine: Arc<ArcSwapOption<crate::engine::NodeEngine>>,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = watch::channel(ClusterView::default());
    tokio::spawn(follow_cluster(cluster.clone(), engine, tx));
    let mut serving: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let manager = cluster.load().as_ref().is_some_and(|c| c.info().raft);
        match (&serving, manager) {
            (None, true) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "serving the visualizer");
                    let (off_tx, mut off_rx) = watch::channel(false);
                    let app = crate::ui::router(rx.clone());
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app)
                            .with_graceful_shutdown(async move {
                                let _ = off_rx.wait_for(|s| *s).await;
                            })
                            .await;
                    });
                    serving = Some((off_tx, task));
                }
                Err(e) => tracing::warn!(%addr, error = %e, "binding the visualizer"),
            },
            (Some(_), false) => {
                if let Some((off, task)) = serving.take() {
                    stop_serving(off, task).await;
                }
            }
            _ => {}
        }
    }
    if let Some((off, task)) = serving.take() {
        stop_serving(off, task).await;
    }
}

/// Open pages hold their event streams forever; give them a moment, then cut them.
async fn stop_serving(off: watch::Sender<bool>, mut task: tokio::task::JoinHandle<()>) {
    let _ = off.send(true);
    if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
        task.abort();
    }
}

/// The node's data path and tasks, read at scrape time: tasks by state, WireGuard peers of the
/// encrypted overlays, the routing mesh's backends (nothing outside a swarm). Service DNS has
/// its own families, registered once at start ([`crate::engine::node::dns_metrics`]).
#[derive(Debug)]
pub struct EngineCollector(pub Arc<ArcSwapOption<crate::engine::NodeEngine>>);

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut rows = rows.into_iter().peekable();
    let Some((_, first)) = rows.peek() else { return Ok(()) };
    let mut me = e.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, m) in rows {
        m.encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for EngineCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::metrics::counter::ConstCounter;
        let Some(engine) = self.0.load_full() else { return Ok(()) };
        let mut by_state = std::collections::BTreeMap::<&'static str, i64>::new();
        for t in engine.runtime().list() {
            *by_state.entry(t.state.as_str()).or_default() += 1;
        }
        family(
            &mut e,
            "tasks",
            "Tasks this node's runtime holds, by state",
            by_state.into_iter().map(|(s, n)| (vec![("state", s.to_owned())], ConstGauge::new(n))),
        )?;
        let (starts, failures) = engine.task_counters();
        family(
            &mut e,
            "task_starts",
            "Tasks this node started (restarts included)",
            [(Vec::new(), ConstCounter::new(starts))],
        )?;
        family(
            &mut e,
            "task_failures",
            "Tasks on this node that failed (a non-zero exit, or could not start)",
            [(Vec::new(), ConstCounter::new(failures))],
        )?;
        let peers = engine.overlay().peer_stats();
        let peer = |p: &shoal_vxlan::PeerStats| vec![("peer", p.node.clone())];
        family(
            &mut e,
            "overlay_peer_established",
            "1 while a WireGuard session with the peer is up",
            peers.iter().map(|p| (peer(p), ConstGauge::new(i64::from(p.established)))),
        )?;
        family(
            &mut e,
            "overlay_peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with the peer",
            peers
                .iter()
                .filter_map(|p| p.handshake_age_secs.map(|a| (peer(p), ConstGauge::new(a)))),
        )?;
        for (name, help, get) in [
            (
                "overlay_peer_tx_bytes",
                "Plaintext bytes encrypted to the peer",
                (|p| p.tx_bytes) as fn(&shoal_vxlan::PeerStats) -> u64,
            ),
            ("overlay_peer_rx_bytes", "Plaintext bytes received from the peer", |p| p.rx_bytes),
            ("overlay_peer_tx_packets", "Packets encrypted to the peer", |p| p.tx_packets),
            ("overlay_peer_rx_packets", "Packets received from the peer", |p| p.rx_packets),
        ] {
            family(&mut e, name, help, peers.iter().map(|p| (peer(p), ConstCounter::new(get(p)))))?;
        }
        family(
            &mut e,
            "overlay_peer_handshakes_sent",
            "WireGuard handshake messages sent to the peer",
            peers.iter().map(|p| (peer(p), ConstCounter::new(p.handshakes_sent))),
        )?;
        family(
            &mut e,
            "overlay_peer_drops",
            "Packets from or for the peer dropped, by reason",
            peers.iter().flat_map(|p| {
                p.drops.iter().map(move |(reason, n)| {
                    let mut l = peer(p);
                    l.push(("reason", format!("{reason:?}").to_lowercase()));
                    (l, ConstCounter::new(*n))
                })
            }),
        )?;
        family(
            &mut e,
            "gossip_claims_dropped",
            "Gossip claims (a peer's address or WireGuard key, an endpoint) dropped because the store says otherwise",
            engine
                .dropped_claims()
                .into_iter()
                .map(|(kind, n)| (vec![("kind", kind.to_owned())], ConstCounter::new(n))),
        )?;
        if let Some(dev) = engine.overlay().device_stats() {
            family(
                &mut e,
                "overlay_guard_dropped_cleartext",
                "Cleartext VXLAN for encrypted networks dropped by the guard",
                [(Vec::new(), ConstCounter::new(dev.guard_dropped_cleartext))],
            )?;
            family(
                &mut e,
                "overlay_guard_reapplied",
                "Times the guard was found missing or stale and applied again",
                [(Vec::new(), ConstCounter::new(dev.guard_reapplied))],
            )?;
        }
        let mesh = engine.mesh().metrics();
        let backend = |s: &shoal_ingress::ServiceMetrics, b: &shoal_ingress::BackendMetrics| {
            vec![
                ("service", s.name.clone()),
                ("backend", b.id.clone()),
                ("addr", b.addr.to_string()),
            ]
        };
        let rows = |get: fn(&shoal_ingress::BackendMetrics) -> u64| {
            mesh.iter()
                .flat_map(move |s| s.backends.iter().map(move |b| (backend(s, b), get(b))))
                .collect::<Vec<_>>()
        };
        family(
            &mut e,
            "mesh_backend_active",
            "Open connections through the routing mesh to the backend",
            rows(|b| b.active).into_iter().map(|(l, v)| (l, ConstGauge::new(v as i64))),
        )?;
        family(
            &mut e,
            "mesh_backend_up",
            "1 while the mesh's health checks pass for the backend",
            rows(|b| u64::from(b.health == shoal_ingress::HealthState::Up))
                .into_iter()
                .map(|(l, v)| (l, ConstGauge::new(v as i64))),
        )?;
        family(
            &mut e,
            "mesh_backend_health",
            "1 for the backend's one health state: up, not_ready (its task is not running or its \
             health command fails), unchecked (the mesh check has not run yet), down (the mesh \
             check fails), ejected or draining",
            mesh.iter().flat_map(|s| {
                s.backends.iter().map(move |b| {
                    let mut l = backend(s, b);
                    l.push(("state", b.health.as_str().to_owned()));
                    (l, ConstGauge::new(1))
                })
            }),
        )?;
        family(
            &mut e,
            "mesh_connections_refused",
            "Connections refused because the service had its --mesh-max-connections open",
            mesh.iter().map(|s| {
                (vec![("service", s.name.clone())], ConstCounter::new(s.refused_connections))
            }),
        )?;
        family(
            &mut e,
            "mesh_udp_flows_refused",
            "UDP datagrams dropped because a new flow would pass the service's flow limit \
             (limit=service) or the client address's (limit=source)",
            mesh.iter().flat_map(|s| {
                [("service", s.refused_flows_service), ("source", s.refused_flows_source)]
                    .into_iter()
                    .map(|(limit, n)| {
                        let l = vec![("service", s.name.clone()), ("limit", limit.to_owned())];
                        (l, ConstCounter::new(n))
                    })
            }),
        )?;
        for (name, help, get) in [
            (
                "mesh_backend_connections",
                "Connections forwarded to the backend",
                (|b| b.total) as fn(&shoal_ingress::BackendMetrics) -> u64,
            ),
            ("mesh_backend_bytes_in", "Bytes from clients to the backend", |b| b.bytes_in),
            ("mesh_backend_bytes_out", "Bytes from the backend to clients", |b| b.bytes_out),
            ("mesh_backend_errors", "Failed connects to the backend", |b| b.errors),
        ] {
            family(
                &mut e,
                name,
                help,
                rows(get).into_iter().map(|(l, v)| (l, ConstCounter::new(v))),
            )?;
        }
        family(
            &mut e,
            "mesh_no_backend",
            "Connections refused because the service had no healthy backend",
            mesh.iter()
                .map(|s| (vec![("service", s.name.clone())], ConstCounter::new(s.no_backend))),
        )?;
        // Both paths of the mesh count here, told apart by `path`: the proxy's connections and
        // flows, and the kernel path's flows (read from its nftables counters).
        let by_path =
            |s: &str, path: &str| vec![("service", s.to_owned()), ("path", path.to_owned())];
        let kernel = engine.kernel_flows();
        family(
            &mut e,
            "mesh_client_addr_kept",
            "Connections and UDP flows that reached their task from the client's own address, \
             by the path that forwarded them (proxy or kernel)",
            mesh.iter()
                .map(|s| (by_path(&s.name, "proxy"), ConstCounter::new(s.client_kept)))
                .chain(kernel.iter().map(|(s, n)| (by_path(s, "kernel"), ConstCounter::new(*n)))),
        )?;
        family(
            &mut e,
            "mesh_flows_purged",
            "Kernel-path conntrack flows deleted because their backend left the service's map \
             (UDP flows, and TCP flows whose handshake had not completed), by path",
            engine
                .kernel_purged()
                .into_iter()
                .map(|(s, n)| (by_path(&s, "kernel"), ConstCounter::new(n))),
        )?;
        family(
            &mut e,
            "mesh_client_addr_fallback",
            "Connections and UDP flows that reached their task from this node's ingress address \
             (the client's could not be kept: IPv6, loopback or the ingress subnet); only the \
             proxy path falls back",
            mesh.iter().map(|s| (by_path(&s.name, "proxy"), ConstCounter::new(s.client_fallback))),
        )?;
        Ok(())
    }
}
