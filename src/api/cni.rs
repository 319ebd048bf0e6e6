//! `/cni/add`, `/cni/check` and `/cni/del`: the agent's side of the CNI plugin (`shoal cni`).
//!
//! A CNI container becomes a standalone task record with a `cni` field, keyed in the store by
//! its container id: an ADD repeated for the same container finds the record it made before
//! and answers with the same address, so a runtime that retries, or an agent that crashed
//! between ADD's steps, never leaves a second record or one that DEL cannot find. The leader
//! gives the address; the node's pass attaches the namespace (`engine::node::cni`); ADD
//! answers once that is done. The answers speak CNI: a result, or a CNI error code and
//! message that the plugin prints as they are.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use shoal_cluster::model::{ClusterState, now_ms};

use super::ApiState;
use crate::engine::leader::new_id;
use crate::engine::records::{self, CniAttachment, Standalone, TaskRecord};
use crate::engine::{CniState, NodeEngine};

/// How long ADD waits for the address and the attachment: the leader's pass and this node's
/// pass, each normally well under a second, on a busy machine a few.
const ADD_TIMEOUT: Duration = Duration::from_secs(30);
const ADD_RECHECK: Duration = Duration::from_millis(50);
/// How long DEL waits for this node's view of the store to lose the record it removed.
const DEL_SETTLE: Duration = Duration::from_secs(5);

/// The error codes of the CNI specification that the plugin and the agent return.
pub mod code {
    /// The runtime asked for a CNI version the plugin does not speak.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The container (its network namespace) does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A CNI_* environment variable is missing or malformed.
    pub const INVALID_ENV: u32 = 4;
    /// Reading or writing failed.
    pub const IO: u32 = 5;
    /// The configuration on stdin is not JSON of the expected shape.
    pub const DECODE: u32 = 6;
    /// A field of the network configuration is invalid (an unknown or non-attachable network).
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: the agent does not answer, or is not in a swarm yet.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent could not attach the container (plugin-specific, 100 and up).
    pub const ATTACH_FAILED: u32 = 100;
}

/// What the plugin sends for ADD, CHECK and DEL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (a path); DEL may come without one.
    #[serde(default)]
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// The shoal network (the configuration's `network`, else its `name`).
    pub network: String,
    /// The container's DNS name (K8S_POD_NAME in CNI_ARGS, else a short container id).
    pub name: String,
    /// Further DNS names (the configuration's and the runtime's `aliases`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// What ADD gave the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttached {
    pub ifname: String,
    pub mac: String,
    /// The namespace path, as CNI_NETNS said.
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The resolver the container should use: shoal's, inside its namespace.
    pub nameserver: Ipv4Addr,
}

/// A CNI error: code, message and details, as the spec's error result has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniFailure {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniFailure {
    pub fn new(code: u32, msg: impl Into<String>) -> CniFailure {
        CniFailure { code, msg: msg.into(), details: String::new() }
    }
}

/// Every answer of these endpoints (HTTP 200): the result, or a CNI error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CniAnswer<T> {
    Ok(T),
    Error(CniFailure),
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/cni/add", post(cni_add))
        .route("/cni/check", post(cni_check))
        .route("/cni/del", post(cni_del))
}

fn answer<T: Serialize>(r: Result<T, CniFailure>) -> Response {
    let a = match r {
        Ok(v) => CniAnswer::Ok(v),
        Err(e) => CniAnswer::Error(e),
    };
    axum::Json(a).into_response()
}

fn later(msg: impl Into<String>) -> CniFailure {
    CniFailure::new(code::TRY_AGAIN_LATER, msg)
}

fn engine_and_cluster(
    st: &ApiState,
) -> Result<(Arc<NodeEngine>, Arc<shoal_cluster::Cluster>), CniFailure> {
    let none = || later("this agent is not in a swarm yet: no network can be attached");
    let engine = st.engine.load_full().ok_or_else(none)?;
    let cluster = st.cluster.load_full().ok_or_else(none)?;
    Ok((engine, cluster))
}

async fn read_store(c: &shoal_cluster::Cluster) -> Result<ClusterState, CniFailure> {
    c.task_state().await.map_err(|e| later(format!("reading the swarm's state: {e}")))
}

/// This node's record of the container `container_id`.
fn find(state: &ClusterState, me: &str, container_id: &str) -> Option<TaskRecord> {
    let mine = |t: &&Arc<TaskRecord>| {
        t.task.node_id.as_deref() == Some(me)
            && t.cni().is_some_and(|c| c.container_id == container_id)
    };
    records::tasks(state).values().find(mine).cloned().map(Arc::unwrap_or_clone)
}

/// The name under `/run/netns` of the namespace at `path`: the overlay and a restarted agent
/// open it again by that name, so it must live there (as podman's, containerd's and
/// `ip netns`'s do).
pub fn netns_name(path: &str) -> Result<String, CniFailure> {
    let p = std::path::Path::new(path);
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let dir = p.parent().and_then(|d| std::fs::canonicalize(d).ok());
    if name.is_empty() || dir.as_deref() != Some(std::path::Path::new(shoal_netns::NETNS_DIR)) {
        return Err(CniFailure::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS={path:?}: shoal attaches namespaces named under {} only",
                shoal_netns::NETNS_DIR
            ),
        ));
    }
    if !shoal_netns::NetNs::exists(name) {
        return Err(CniFailure::new(
            code::UNKNOWN_CONTAINER,
            format!("the container's network namespace {path} does not exist"),
        ));
    }
    Ok(name.to_owned())
}

fn check_req(req: &CniRequest) -> Result<(), CniFailure> {
    let bad = |m: String| Err(CniFailure::new(code::INVALID_ENV, m));
    if req.container_id.is_empty()
        || req.container_id.len() > 255
        || !req.container_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return bad(format!("CNI_CONTAINERID={:?} is not a container id", req.container_id));
    }
    if req.ifname.is_empty() || req.ifname.len() > 15 || req.ifname.contains(['/', ' ']) {
        return bad(format!("CNI_IFNAME={:?} is not an interface name", req.ifname));
    }
    for n in std::iter::once(&req.name).chain(&req.aliases) {
        let ok = !n.is_empty()
            && n.len() <= 63
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && n.as_bytes()[0].is_ascii_alphanumeric();
        if !ok {
            return Err(CniFailure::new(
                code::INVALID_CONFIG,
                format!(
                    "invalid DNS name {n:?}: 1-63 of [a-zA-Z0-9_-], starting with a letter or digit"
                ),
            ));
        }
    }
    Ok(())
}

fn attached(state: &ClusterState, t: &TaskRecord, path: &str) -> Option<CniAttached> {
    let cni = t.cni()?;
    let net = t.networks.first().and_then(|n| state.networks.get(n))?;
    let spec = records::overlay_spec(net)?;
    let ip = *t.addresses.get(&net.id)?;
    Some(CniAttached {
        ifname: cni.ifname.clone(),
        mac: shoal_vxlan::Mac::from_ipv4(ip).to_string(),
        netns: path.to_owned(),
        ip,
        prefix_len: spec.subnet.prefix_len(),
        gateway: spec.gateway,
        nameserver: Ipv4Addr::new(127, 0, 0, 11),
    })
}

async fn cni_add(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<CniRequest>,
) -> Response {
    answer(add(&st, &req).await)
}

async fn add(st: &ApiState, req: &CniRequest) -> Result<CniAttached, CniFailure> {
    check_req(req)?;
    let netns = netns_name(&req.netns)?;
    let (engine, c) = engine_and_cluster(st)?;
    let me = engine.node_id().to_owned();
    let id = {
        // One ADD at a time decides whether a record exists, so a runtime's retry racing its
        // first call finds the record instead of writing a second one.
        static DECIDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = DECIDING.lock().await;
        let state = read_store(&c).await?;
        match find(&state, &me, &req.container_id) {
            Some(t) if t.cni().is_some_and(|a| a.netns == netns) => t.task.id,
            stale => {
                // The same container in a new namespace (its runtime restarted it without a
                // DEL): the old attachment goes first.
                if let Some(t) = stale {
                    remove(&engine, &c, &t.task.id).await?;
                }
                let state = read_store(&c).await?;
                create(&c, &state, &me, req, netns).await?
            }
        }
    };
    engine.kick();
    let deadline = Instant::now() + ADD_TIMEOUT;
    loop {
        match engine.cni_state(&id) {
            CniState::Attached => {
                let state = read_store(&c).await?;
                if let Some(t) = find(&state, &me, &req.container_id)
                    && let Some(a) = attached(&state, &t, &req.netns)
                {
                    return Ok(a);
                }
            }
            CniState::Failed(e) => {
                return Err(CniFailure::new(
                    code::ATTACH_FAILED,
                    format!("attaching the container to {}: {e}", req.network),
                ));
            }
            CniState::Pending => {}
        }
        if Instant::now() > deadline {
            return Err(later(format!(
                "the container was not attached to {} within {} s (is the swarm's leader reachable?)",
                req.network,
                ADD_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(ADD_RECHECK).await;
    }
}

/// Writes the container's record; refuses, and writes nothing, for an unknown or
/// non-attachable network or a name in use.
async fn create(
    c: &shoal_cluster::Cluster,
    state: &ClusterState,
    me: &str,
    req: &CniRequest,
    netns: String,
) -> Result<String, CniFailure> {
    let invalid = |m: String| Err(CniFailure::new(code::INVALID_CONFIG, m));
    let found: Vec<_> =
        state.networks.values().filter(|n| n.name == req.network || n.id == req.network).collect();
    let net = match found.as_slice() {
        [n] => *n,
        [] => return invalid(format!("network {} not found", req.network)),
        _ => return invalid(format!("network {} is ambiguous", req.network)),
    };
    if !net.attachable || net.ingress {
        return invalid(format!(
            "network {} is not attachable: create it with `shoal network create --attachable`",
            net.name
        ));
    }
    if records::overlay_spec(net).is_none() {
        return invalid(format!("network {} is not IPv4", net.name));
    }
    let id = new_id();
    let standalone = Standalone {
        name: req.name.clone(),
        argv: Vec::new(),
        env: Vec::new(),
        auto_remove: false,
        mounts: Vec::new(),
        cni: Some(CniAttachment {
            container_id: req.container_id.clone(),
            netns,
            ifname: req.ifname.clone(),
            aliases: req.aliases.clone(),
        }),
    };
    let rec = TaskRecord::standalone(&id, me, &net.id, standalone, now_ms());
    // The store decides whether the name is free.
    match c.put_standalone(&id, Some(rec)).await {
        Ok(()) => {}
        Err(shoal_cluster::Error::Conflict(_)) => {
            return invalid(format!("the name {} is already in use in the swarm", req.name));
        }
        Err(e) => return Err(later(format!("writing the container's record: {e}"))),
    }
    Ok(id)
}

async fn cni_check(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<CniRequest>,
) -> Response {
    let run = async {
        check_req(&req)?;
        netns_name(&req.netns)?;
        let (engine, c) = engine_and_cluster(&st)?;
        let state = read_store(&c).await?;
        let t = find(&state, engine.node_id(), &req.container_id).ok_or_else(|| {
            CniFailure::new(
                code::UNKNOWN_CONTAINER,
                format!("container {} is not attached to {}", req.container_id, req.network),
            )
        })?;
        let a = attached(&state, &t, &req.netns).ok_or_else(|| {
            CniFailure::new(code::ATTACH_FAILED, "the container has no address yet")
        })?;
        engine.cni_check(&t.task.id, &a.ifname, a.ip).await.map_err(|e| {
            CniFailure::new(code::ATTACH_FAILED, format!("container {}: {e}", req.container_id))
        })?;
        Ok(())
    };
    answer(run.await)
}

async fn cni_del(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<CniRequest>,
) -> Response {
    let run = async {
        // Outside a swarm nothing is attached (leaving takes every attachment down).
        if st.engine.load().is_none() {
            return Ok(());
        }
        let (engine, c) = engine_and_cluster(&st)?;
        let state = read_store(&c).await?;
        // Already gone: DEL succeeds, as the spec asks.
        let Some(t) = find(&state, engine.node_id(), &req.container_id) else { return Ok(()) };
        remove(&engine, &c, &t.task.id).await
    };
    answer(run.await)
}

/// Withdraws a container everywhere and removes its record.
async fn remove(
    engine: &NodeEngine,
    c: &shoal_cluster::Cluster,
    id: &str,
) -> Result<(), CniFailure> {
    engine.cni_release(id).await;
    let removed = c.put_standalone(id, None).await;
    if removed.is_ok() {
        // The pass must not attach it again from a store view that still holds it.
        let deadline = Instant::now() + DEL_SETTLE;
        while engine.store().is_some_and(|s| records::tasks(&s).contains_key(id))
            && Instant::now() < deadline
        {
            tokio::time::sleep(ADD_RECHECK).await;
        }
    }
    engine.cni_released(id);
    removed.map_err(|e| later(format!("removing the container's record: {e}")))
}
