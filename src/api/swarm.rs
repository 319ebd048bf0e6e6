//! `/swarm/*` and `/nodes/*`: the control-plane verbs. Errors carry the control plane's own
//! words (Docker's, where Docker has them) and change nothing.

// Handlers return a ready error `Response` from their checks; it is built once per request and
// never travels far, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_cluster::{
    Cluster, Error as ClusterError, InitOptions, JoinOptions, NodeUpdate, NodeView, Role,
};

use super::{ApiState, error};
use crate::swarm::Swarm;
use crate::swarm::addr::{self, Interfaces, parse_addr};

/// Docker's answer when a node outside any swarm is asked a swarm question.
pub const NOT_IN_SWARM: &str = "This node is not a swarm manager. Use \"shoal swarm init\" or \"shoal swarm join\" to connect this node to swarm and try again.";

/// `POST /swarm/init`. Addresses are `ADDR|IFACE[:PORT]` as Docker takes them (see
/// [`crate::swarm::addr`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InitRequest {
    pub advertise_addr: Option<String>,
    pub listen_addr: Option<String>,
    /// `ADDR|IFACE` for VXLAN and WireGuard (default: the advertise address).
    #[serde(default)]
    pub data_path_addr: Option<String>,
    pub data_path_port: Option<u16>,
    pub default_addr_pool: Option<ipnet::IpNet>,
    /// `--cert-expiry`, e.g. `2160h` (default 90 days).
    #[serde(default)]
    pub cert_expiry: Option<String>,
}

/// The answer to `init` and `join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwarmJoined {
    pub node_id: String,
    pub role: String,
    /// `shoal swarm join --token … ADDR` for a worker (on init).
    pub worker_command: Option<String>,
}

/// `POST /swarm/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub remote_addr: String,
    pub advertise_addr: Option<String>,
    pub listen_addr: Option<String>,
    /// `ADDR|IFACE` for VXLAN and WireGuard (default: the advertise address).
    #[serde(default)]
    pub data_path_addr: Option<String>,
}

/// `POST /swarm/leave`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaveRequest {
    pub force: bool,
}

/// `GET /swarm/join-token/{role}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    pub command: String,
}

#[derive(Debug, Deserialize)]
struct RotateQuery {
    #[serde(default)]
    rotate: bool,
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Warnings a verb wants the user to read (e.g. an even number of managers).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Warnings {
    pub warnings: Vec<String>,
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/swarm/init", post(init))
        .route("/swarm/join", post(join))
        .route("/swarm/leave", post(leave))
        .route("/swarm/join-token/{role}", get(join_token))
        .route("/swarm/rotate-gossip-key", post(rotate_key))
        .route("/nodes", get(nodes))
        .route("/nodes/{id}", get(node).delete(node_rm))
        .route("/nodes/{id}/update", post(node_update))
        .route("/nodes/{id}/diagnostics", get(node_diagnostics))
        .route("/nodes/{id}/promote", post(promote))
        .route("/nodes/{id}/demote", post(demote))
}

pub(super) fn cluster_error(e: ClusterError) -> Response {
    let status = match &e {
        ClusterError::NotManager(_) | ClusterError::NoLeader(_) => StatusCode::SERVICE_UNAVAILABLE,
        ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
        ClusterError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        ClusterError::AlreadyInSwarm(_) | ClusterError::Conflict(_) => StatusCode::CONFLICT,
        ClusterError::Token(_)
        | ClusterError::WrongToken(_)
        | ClusterError::RotatedToken(_)
        | ClusterError::CaMismatch
        | ClusterError::Refused(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

pub(super) fn bad_request(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, msg.into())
}

pub(super) fn cluster(state: &ApiState) -> Result<Arc<Cluster>, Response> {
    state
        .cluster
        .load_full()
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, NOT_IN_SWARM.to_owned()))
}

/// Where a node entering a swarm listens, what it advertises, and its data-path address.
struct Addrs {
    listen: SocketAddr,
    advertise: SocketAddr,
    data: Ipv4Addr,
}

/// Resolves the address flags of `init`/`join` against this host's interfaces; a bad one is a
/// 400 naming it, before anything is made.
fn addrs(
    state: &ApiState,
    advertise: Option<&str>,
    listen: Option<&str>,
    data: Option<&str>,
) -> Result<Addrs, Response> {
    let ifaces = Interfaces::read();
    let listen =
        addr::listen_addr(&ifaces, listen, state.config.control_port).map_err(bad_request)?;
    let advertise =
        addr::advertise_addr(&ifaces, advertise, state.config.advertise_addr, listen.port())
            .map_err(bad_request)?;
    let data = addr::data_path_addr(&ifaces, data, advertise.ip()).map_err(bad_request)?;
    let tunnels = state.config.wireguard_tunnel_prefix;
    if tunnels.contains(&data) {
        return Err(bad_request(format!(
            "data path address {data} is inside the WireGuard tunnel range {tunnels}; set another wireguard_tunnel_prefix in the agent's configuration"
        )));
    }
    Ok(Addrs { listen, advertise, data })
}

/// `--data-path-port` of `init`: Docker's range, and no udp port this agent already uses.
fn data_path_port(state: &ApiState, given: Option<u16>, listen: u16) -> Result<u16, Response> {
    let port =
        addr::data_path_port(given.or(Some(state.config.data_path_port))).map_err(bad_request)?;
    let c = &state.config;
    for (name, used) in
        [("control", listen), ("gossip", c.gossip_port), ("WireGuard", c.wireguard_port)]
    {
        if port == used {
            return Err(bad_request(format!(
                "data path port {port} is also this node's {name} port (udp)"
            )));
        }
    }
    Ok(port)
}

/// Starts gossip, the data path and the liveness/keyring tasks for a node that just entered a
/// swarm; `verb` is `init` or `join`. Entering is all or nothing: if this node cannot start, it
/// leaves the swarm it just made or joined (`swarm leave --force`: the managers mark it down,
/// and its swarm state goes from the data dir), so the agent keeps running outside any swarm
/// and its next start does not trip over a half-made one.
async fn enter(
    state: &ApiState,
    slot: &mut Option<Swarm>,
    c: Cluster,
    verb: &str,
) -> Result<(), Response> {
    match Swarm::start(&state.config, c.clone()).await {
        Ok(s) => {
            state.gossip.store(Some(s.gossip.clone()));
            state.cluster.store(Some(Arc::new(c)));
            state.engine.store(Some(Arc::new(s.engine.clone())));
            *slot = Some(s);
            Ok(())
        }
        Err(e) => {
            let undone = match c.leave(true).await {
                Ok(()) => "this node is still outside any swarm".to_owned(),
                Err(u) => format!("undoing it failed too: {u}"),
            };
            tracing::warn!(error = %format!("{e:#}"), %undone, "swarm {verb} failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("swarm {verb} failed, {undone}: {e:#}"),
            ))
        }
    }
}

fn refuse_if_busy(state: &ApiState, slot: &Option<Swarm>) -> Result<(), Response> {
    if slot.is_some() {
        return Err(error(
            StatusCode::CONFLICT,
            "This node is already part of a swarm. Use \"shoal swarm leave\" to leave this swarm and join another one.".to_owned(),
        ));
    }
    if state.config.gossip_key_file.is_some() {
        return Err(error(
            StatusCode::CONFLICT,
            "this agent runs standalone gossip (gossip_key_file is set); remove it from the agent's configuration to use a swarm".to_owned(),
        ));
    }
    Ok(())
}

async fn init(
    State(state): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<InitRequest>,
) -> Response {
    let mut slot = state.swarm.lock().await;
    if let Err(r) = refuse_if_busy(&state, &slot) {
        return r;
    }
    let a = match addrs(
        &state,
        req.advertise_addr.as_deref(),
        req.listen_addr.as_deref(),
        req.data_path_addr.as_deref(),
    ) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let data_path_port = match data_path_port(&state, req.data_path_port, a.listen.port()) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let expiry = super::swarm_ca::duration_secs(
        "--cert-expiry",
        req.cert_expiry.as_deref(),
        shoal_cluster::model::security::check_cert_expiry,
    );
    let cert_expiry = match expiry {
        Ok(e) => e.map(std::time::Duration::from_secs),
        Err(e) => return bad_request(e),
    };
    let advertise = a.advertise;
    let mut opts = InitOptions::new(&state.config.data_dir, &state.config.node_name, advertise);
    if let Some(e) = cert_expiry {
        opts.cert_expiry = e;
    }
    opts.listen_addr = a.listen;
    opts.data_addr = Some(a.data.into());
    opts.data_path_port = data_path_port;
    if let Some(pool) = req.default_addr_pool {
        opts.default_addr_pool = vec![pool];
    }
    opts.tuning = state.config.tuning();
    let c = match Cluster::init(opts).await {
        Ok(c) => c,
        Err(e) => return cluster_error(e),
    };
    let worker_command = c.join_command(Role::Worker).await.ok();
    let node_id = c.info().node.to_string();
    if let Err(r) = enter(&state, &mut slot, c, "init").await {
        return r;
    }
    tracing::info!(node = %node_id, %advertise, "swarm initialized");
    axum::Json(SwarmJoined { node_id, role: "manager".into(), worker_command }).into_response()
}

async fn join(
    State(state): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<JoinRequest>,
) -> Response {
    let mut slot = state.swarm.lock().await;
    if let Err(r) = refuse_if_busy(&state, &slot) {
        return r;
    }
    let remote = match parse_addr(&req.remote_addr, shoal_cluster::DEFAULT_CONTROL_PORT) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let a = match addrs(
        &state,
        req.advertise_addr.as_deref(),
        req.listen_addr.as_deref(),
        req.data_path_addr.as_deref(),
    ) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut opts = JoinOptions::new(
        &state.config.data_dir,
        &state.config.node_name,
        a.advertise,
        req.token,
        remote,
    );
    opts.listen_addr = a.listen;
    opts.data_addr = Some(a.data.into());
    opts.tuning = state.config.tuning();
    let c = match Cluster::join(opts).await {
        Ok(c) => c,
        Err(e) => return cluster_error(e),
    };
    let info = c.info();
    if let Err(r) = enter(&state, &mut slot, c, "join").await {
        return r;
    }
    tracing::info!(node = %info.node, role = %info.role, "joined a swarm");
    axum::Json(SwarmJoined {
        node_id: info.node.to_string(),
        role: info.role.to_string(),
        worker_command: None,
    })
    .into_response()
}

async fn leave(
    State(state): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<LeaveRequest>,
) -> Response {
    let mut slot = state.swarm.lock().await;
    let Some(swarm) = slot.as_ref() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "This node is not part of a swarm".to_owned(),
        );
    };
    if let Err(e) = swarm.cluster.leave(req.force).await {
        return cluster_error(e);
    }
    state.cluster.store(None);
    state.engine.store(None);
    state.gossip.store(None);
    if let Some(s) = slot.take() {
        s.stop().await;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn join_token(
    State(state): State<Arc<ApiState>>,
    Path(role): Path<String>,
    Query(q): Query<RotateQuery>,
) -> Response {
    let c = match cluster(&state) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let role: Role = match role.parse() {
        Ok(r) => r,
        Err(_) => return bad_request(format!("unknown role {role:?}: use worker or manager")),
    };
    let token = match c.join_token(role, q.rotate).await {
        Ok(t) => t,
        Err(e) => return cluster_error(e),
    };
    match c.join_command(role).await {
        Ok(command) => axum::Json(JoinToken { token, command }).into_response(),
        Err(e) => cluster_error(e),
    }
}

async fn rotate_key(State(state): State<Arc<ApiState>>) -> Response {
    match cluster(&state) {
        Ok(c) => match c.rotate_gossip_key().await {
            Ok(warnings) => axum::Json(Warnings { warnings }).into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

async fn nodes(State(state): State<Arc<ApiState>>) -> Response {
    match cluster(&state) {
        Ok(c) => match c.nodes().await {
            Ok(n) => axum::Json::<Vec<NodeView>>(n).into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

async fn node(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match cluster(&state) {
        Ok(c) => match c.node(&id).await {
            Ok(n) => axum::Json(n).into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

/// The node's data path from inside, asked of the node itself over the control plane.
async fn node_diagnostics(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match cluster(&state) {
        Ok(c) => {
            let n = match c.node(&id).await {
                Ok(n) => n,
                Err(e) => return cluster_error(e),
            };
            match c.ask_node(n.record.addr, shoal_cluster::NodeRequest::Diagnostics).await {
                Ok(v) => axum::Json(v).into_response(),
                Err(e) => cluster_error(e),
            }
        }
        Err(r) => r,
    }
}

async fn node_update(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::Json(update): axum::Json<NodeUpdate>,
) -> Response {
    match cluster(&state) {
        Ok(c) => match c.node_update(&id, update).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

async fn promote(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match cluster(&state) {
        Ok(c) => match c.promote(&id).await {
            Ok(warnings) => axum::Json(Warnings { warnings }).into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

async fn demote(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match cluster(&state) {
        Ok(c) => match c.demote(&id).await {
            Ok(warnings) => axum::Json(Warnings { warnings }).into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}

async fn node_rm(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Response {
    match cluster(&state) {
        Ok(c) => match c.node_rm(&id, q.force).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => cluster_error(e),
        },
        Err(r) => r,
    }
}
