//! What an operator sees of the control plane: Raft metrics on `/metrics`, and the visualizer's
//! view of the cluster, rebuilt from the managers' store.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use shoal_cluster::Cluster;
use tokio::sync::watch;

use crate::ui::{ClusterView, NodeView};

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
        gauge(&mut e, "raft_snapshot_index", "Log index of the last snapshot", idx(r.snapshot))?;
        gauge(&mut e, "raft_purged_index", "Last log index removed by compaction", idx(r.purged))?;
        Ok(())
    }
}

/// The visualizer's view from a manager's store: one column per node. (Tasks and services join
/// it when the control plane schedules them.)
pub async fn cluster_view(c: &Cluster) -> Option<ClusterView> {
    let nodes = c.nodes().await.ok()?;
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
    view.nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    Some(view)
}

/// Keeps `tx` up to date with the cluster, once a second; an empty view outside a swarm or on a
/// worker (whose store is not the cluster's).
pub async fn follow_cluster(cluster: Arc<ArcSwapOption<Cluster>>, tx: watch::Sender<ClusterView>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let view = match cluster.load_full() {
            Some(c) => cluster_view(&c).await.unwrap_or_default(),
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
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = watch::channel(ClusterView::default());
    tokio::spawn(follow_cluster(cluster.clone(), tx));
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
