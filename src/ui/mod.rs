//! The visualizer: a read-only web page managers serve (default port 8089) that shows one
//! column per node and a card per task, coloured by service, updating live over server-sent
//! events as tasks move, with a filter box and per-service mesh figures. The page is three static
//! files embedded in the binary; no toolchain runs at build or run time.
//!
//! The agent feeds a [`watch`] channel of [`ClusterView`]; every change is pushed whole to every
//! open page (a view of a few hundred nodes is a few tens of kB, and whole views never leave a
//! page half-updated).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Everything the page shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    pub services: Vec<ServiceView>,
}

/// One node column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub hostname: String,
    /// `manager` or `worker`.
    pub role: String,
    /// `Leader`, `Reachable` or `Unreachable` for managers.
    pub manager_status: Option<String>,
    /// `Ready` or `Down`.
    pub status: String,
    /// `Active`, `Pause` or `Drain`.
    pub availability: String,
    pub addr: String,
    pub tasks: Vec<TaskView>,
}

/// One task card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub name: String,
    pub service: String,
    pub slot: u64,
    /// Docker's task state: new, preparing, starting, running, complete, failed, shutdown.
    pub state: String,
    /// `healthy`, `unhealthy` or `starting` when the task has a health check.
    pub health: Option<String>,
    pub ips: Vec<String>,
}

/// One service row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    /// `replicated` or `global`.
    pub mode: String,
    pub desired: u64,
    pub running: u64,
    /// e.g. `8100:8100/tcp`.
    pub published: Vec<String>,
    pub mesh: Option<MeshView>,
}

/// Routing-mesh figures of a service, summed over the nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshView {
    pub active_connections: u64,
    pub requests_per_second: Option<f64>,
    pub bytes_per_second: f64,
    pub healthy_backends: u64,
    pub backends: u64,
}

/// The page's routes: `/`, its assets, `/view` (JSON) and `/events` (SSE).
pub fn router(views: watch::Receiver<ClusterView>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/view", get(view))
        .route("/events", get(events))
        .with_state(views)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response()
}

async fn view(State(views): State<watch::Receiver<ClusterView>>) -> axum::Json<ClusterView> {
    axum::Json(views.borrow().clone())
}

async fn events(
    State(views): State<watch::Receiver<ClusterView>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut rx = views.clone();
    rx.mark_changed();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let json = serde_json::to_string(&*rx.borrow_and_update()).unwrap_or_default();
        Some((Ok(Event::default().event("view").data(json)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Serves the page on `addr` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    views: watch::Receiver<ClusterView>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the visualizer at {addr}"))?;
    axum::serve(listener, router(views)).with_graceful_shutdown(stop).await?;
    Ok(())
}
