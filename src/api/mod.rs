//! The agent's HTTP/JSON API, served on a unix socket (and `/metrics` optionally on TCP).
//! The types here are the wire contract between `shoal` the CLI and `shoal agent`.

pub mod attach;
pub mod client;
pub mod cni;
pub mod containers;
mod lookup;
pub mod networks;
pub mod rollout;
pub mod services;
pub mod swarm;
pub mod swarm_ca;
pub mod volumes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::metrics::Metrics;

/// The API version this build speaks; bumped on incompatible changes.
pub const API_VERSION: u32 = 1;

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub api_version: u32,
    pub os: String,
    pub arch: String,
}

impl VersionInfo {
    /// This build's version.
    pub fn current() -> Self {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: API_VERSION,
            os: std::env::consts::OS.to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
        }
    }
}

/// The ports a node uses, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub control: u16,
    pub gossip: u16,
    pub data_path: u16,
    pub wireguard: u16,
}

/// `GET /info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_name: String,
    /// The address others reach this node at: the swarm's advertise address in a swarm, else
    /// the configured one (None: not set, chosen at `swarm init/join`).
    pub advertise_addr: Option<std::net::IpAddr>,
    /// The ports in use: in a swarm, `data_path` is the swarm's.
    pub ports: Ports,
    pub uptime_seconds: f64,
    pub pid: u32,
    pub data_dir: String,
    pub socket: String,
    pub version: String,
    /// Gossip membership, when this agent has joined gossip.
    pub gossip: Option<GossipInfo>,
    /// The swarm, when this node is in one.
    pub swarm: Option<SwarmInfo>,
}

/// This node's place in its swarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmInfo {
    pub node_id: String,
    /// `manager` or `worker`.
    pub role: String,
    /// The Raft leader's node id, as a manager sees it.
    pub leader: Option<String>,
    /// Managers' control addresses.
    pub managers: Vec<String>,
    /// Where this node's VXLAN and WireGuard traffic goes (`--data-path-addr`).
    #[serde(default)]
    pub data_path_addr: Option<std::net::IpAddr>,
}

/// What an agent sees of gossip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipInfo {
    /// Every member known, this node first.
    pub members: Vec<MemberInfo>,
    pub networks: Vec<String>,
    /// Keyring ids, primary first.
    pub key_ids: Vec<u32>,
    /// Visible replicated table entries.
    pub entries: usize,
}

impl GossipInfo {
    /// What `/info` shows of a gossip snapshot.
    pub fn of(snap: &shoal_gossip::Snapshot) -> GossipInfo {
        GossipInfo {
            members: snap
                .members
                .iter()
                .map(|m| MemberInfo {
                    name: m.meta.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
                    addr: m.id.addr,
                    state: member_state(m.state).to_owned(),
                    incarnation: m.incarnation,
                    generation: m.id.generation,
                })
                .collect(),
            networks: snap.networks.clone(),
            key_ids: snap.key_ids.clone(),
            entries: snap.entries.len(),
        }
    }
}

fn member_state(s: shoal_gossip::MemberState) -> &'static str {
    use shoal_gossip::MemberState;
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

/// One gossip member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    pub addr: std::net::SocketAddr,
    /// `alive`, `suspect` or `down`.
    pub state: String,
    /// SWIM incarnation (goes up when it refutes a suspicion).
    pub incarnation: u16,
    /// Process start of that member's agent (goes up when it restarts).
    pub generation: u64,
}

/// An error body, as Docker's API has it: `{"message": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

/// Shared state of the API handlers.
#[derive(Debug)]
pub struct ApiState {
    pub config: AgentConfig,
    pub started: Instant,
    pub metrics: Metrics,
    /// The gossip instance running now: standalone (key file) or the swarm's.
    pub gossip: Arc<arc_swap::ArcSwapOption<shoal_gossip::Gossip>>,
    /// Set while this node is in a swarm.
    pub swarm: tokio::sync::Mutex<Option<crate::swarm::Swarm>>,
    /// A copy of the swarm's handle for readers that must not wait on `swarm`'s lock.
    pub cluster: Arc<arc_swap::ArcSwapOption<shoal_cluster::Cluster>>,
    /// This node's tasks and data path, while in a swarm.
    pub engine: Arc<arc_swap::ArcSwapOption<crate::engine::NodeEngine>>,
}

/// The largest request body the API reads. Every request is a small JSON document (the largest,
/// `service create`, is a few kilobytes); a larger one is refused before it is buffered.
pub const API_BODY_LIMIT: usize = 1024 * 1024;

/// The full API router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .merge(swarm::routes())
        .merge(swarm_ca::routes())
        .merge(networks::routes())
        .merge(services::routes())
        .merge(containers::routes())
        .merge(volumes::routes())
        .merge(attach::routes())
        .merge(cni::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Only `/metrics`, for the optional TCP listener.
pub fn metrics_router(state: Arc<ApiState>) -> Router {
    Router::new().route("/metrics", get(metrics)).fallback(not_found).with_state(state)
}

async fn count_requests(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let path = match req.uri().path() {
        p @ ("/version" | "/info" | "/metrics" | "/nodes") => p.to_owned(),
        p if p.starts_with("/swarm/") => p.to_owned(),
        p if p.starts_with("/nodes/") => "/nodes/{id}".to_owned(),
        _ => "other".to_owned(),
    };
    let resp = next.run(req).await;
    state.metrics.api_request(&path, resp.status().as_u16());
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The extractor's own text says only that a limit was hit; say which.
        state.metrics.api_refused("body_too_large");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the API's limit of {API_BODY_LIMIT} bytes"),
        );
    }
    resp
}

async fn version() -> axum::Json<VersionInfo> {
    axum::Json(VersionInfo::current())
}

async fn info(State(state): State<Arc<ApiState>>) -> axum::Json<NodeInfo> {
    let c = &state.config;
    let swarm = state.cluster.load().as_ref().map(|c| c.info());
    axum::Json(NodeInfo {
        node_name: c.node_name.clone(),
        advertise_addr: swarm.as_ref().map(|i| i.advertise_addr.ip()).or(c.advertise_addr),
        ports: Ports {
            control: swarm.as_ref().map_or(c.control_port, |i| i.listen_addr.port()),
            gossip: c.gossip_port,
            data_path: swarm.as_ref().map_or(c.data_path_port, |i| i.data_path_port),
            wireguard: c.wireguard_port,
        },
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        pid: std::process::id(),
        data_dir: c.data_dir.display().to_string(),
        socket: c.socket.display().to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        gossip: state.gossip.load().as_ref().map(|g| GossipInfo::of(&g.snapshot())),
        swarm: swarm.map(|i| SwarmInfo {
            node_id: i.node.to_string(),
            role: i.role.to_string(),
            leader: i.leader.map(|l| l.to_string()),
            managers: i.managers.iter().map(ToString::to_string).collect(),
            data_path_addr: Some(i.data_addr),
        }),
    })
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    state.metrics.set_uptime(state.started.elapsed().as_secs_f64());
    match state.metrics.encode() {
        Ok(text) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")),
    }
}

async fn not_found(req: Request) -> Response {
    error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", req.method(), req.uri().path()))
}

/// A JSON error response.
pub fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(ErrorBody { message })).into_response()
}
