//! `/services`: the verbs of `shoal service`. A request arrives as the model's
//! [`ServiceCreate`] or [`ServiceUpdate`], becomes a [`Service`] by the model's rules, and is
//! checked against the store's other services before it is written; a refused one changes
//! nothing.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_cluster::Cluster;
use shoal_cluster::model::{ClusterState, Command, now_ms};
use shoal_model::NetworkRef;
use shoal_model::{Service, ServiceCreate, ServiceUpdate, TaskRecord};
use shoal_scheduler::{self as sched, DesiredState, TaskState};

use super::ApiState;
use super::lookup::{StoreContext, model_error, write};
pub(super) use super::lookup::{find_service, store};
use super::swarm::cluster;
use crate::engine::leader::new_id;
use crate::engine::records;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/services", get(service_ls).post(service_create))
        .route("/services/{id}", get(service_inspect).delete(service_rm))
        .route("/services/{id}/update", post(service_update))
        .route("/services/{id}/rollback", post(super::rollout::service_rollback))
        .route("/services/{id}/tasks", get(service_ps))
        .route("/services/{id}/logs", post(service_logs))
}

/// A service as `service ls` / `inspect` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: Service,
    /// Running tasks of the current spec.
    pub running: u64,
    /// Tasks wanted (replicas, or eligible nodes for global services).
    pub desired: u64,
    /// VIP per network name.
    pub vips: BTreeMap<String, std::net::Ipv4Addr>,
    /// Network names.
    pub networks: Vec<String>,
    /// What its tasks see as the peer of a connection to an ingress-mode published port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    /// The routing mesh's path per published port (`8100/tcp`: `kernel` or `proxy`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mesh_paths: BTreeMap<String, String>,
}

/// One row of `service ps` / `ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub task: TaskRecord,
    pub name: String,
    pub node: String,
    /// Address per network name.
    pub addresses: BTreeMap<String, std::net::Ipv4Addr>,
}

/// `POST /services/{id}/logs`: where each task's output was read up to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Task id → next position to read.
    #[serde(default)]
    pub cursors: BTreeMap<String, u64>,
}

/// One line of a service's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    /// `myhelloworld.1.<id prefix>@node1`, as Docker prefixes lines.
    pub source: String,
    pub stream: String,
    pub time_ms: u64,
    pub line: String,
}

/// The answer: new lines and the cursors to ask with next time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsResponse {
    pub entries: Vec<LogEntry>,
    pub cursors: BTreeMap<String, u64>,
    /// Nodes that did not answer.
    pub unreachable: Vec<String>,
}

/// Writes `svc` once it keeps the model's rules among the store's other services.
pub(super) async fn put_service(
    c: &Cluster,
    state: &ClusterState,
    svc: &Service,
) -> Result<(), Response> {
    let services = records::services(state);
    let network =
        |id: &str| state.networks.get(id).map(|n| NetworkRef { name: &n.name, ingress: n.ingress });
    svc.check_against(services.values().map(Arc::as_ref), network).map_err(model_error)?;
    // Between `network rm ingress` and the next `network create --ingress` the mesh has no
    // network to reach tasks through.
    if records::ingress(state).is_none() && svc.ports.iter().any(|p| p.is_ingress()) {
        return Err(model_error(shoal_model::Error::NoIngress));
    }
    write(c, Command::PutService(Box::new(svc.clone()))).await
}

async fn service_create(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<ServiceCreate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc =
            req.into_service(&StoreContext(&state), new_id(), now_ms()).map_err(model_error)?;
        put_service(&c, &state, &svc).await?;
        Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "id": svc.id }))).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

pub(super) fn service_view(state: &ClusterState, svc: &Service) -> ServiceView {
    let held = records::held(state);
    let tasks = records::tasks(state);
    let running = tasks
        .values()
        .filter(|t| {
            t.task.service_id == svc.id
                && t.task.state == TaskState::Running
                && t.task.desired == DesiredState::Running
                && t.task.spec_version == svc.version
        })
        .count() as u64;
    let desired = match svc.mode {
        sched::Mode::Replicated { replicas } => replicas,
        // One per node that may run it: Ready, not draining, meeting the constraints.
        sched::Mode::Global => records::sched_state(state)
            .nodes
            .iter()
            .filter(|n| {
                n.status == sched::NodeStatus::Ready
                    && n.availability != sched::Availability::Drain
                    && svc.constraints.iter().all(|c| c.matches(n))
            })
            .count() as u64,
    };
    let name_of = |id: &str| state.networks.get(id).map_or(id.to_owned(), |n| n.name.clone());
    let networks = records::task_networks(state, svc);
    ServiceView {
        running,
        desired,
        vips: networks
            .iter()
            .filter_map(|n| records::vip_of(&held, &svc.id, n).map(|ip| (name_of(n), ip)))
            .collect(),
        networks: networks.iter().map(|n| name_of(n)).collect(),
        client_address: client_address(state, svc),
        mesh_paths: svc
            .ports
            .iter()
            .map(|p| {
                let port = format!("{}/{}", p.published, p.protocol.as_str());
                (port, p.path(&svc.mesh).as_str().to_owned())
            })
            .collect(),
        service: svc.clone(),
    }
}

/// How the routing mesh presents clients to the service's tasks (`None`: no published port).
fn client_address(state: &ClusterState, svc: &Service) -> Option<String> {
    if svc.ports.is_empty() {
        return None;
    }
    let subnet =
        records::ingress(state).map_or("the ingress subnet".into(), |n| n.subnet.to_string());
    Some(format!(
        "kept: tasks see the client's own address and port (TCP and UDP); clients on {subnet}, \
         loopback and IPv6 clients arrive from the receiving node's ingress address instead \
         (counted in /metrics as shoal_mesh_client_addr_fallback_total)"
    ))
}

async fn service_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let views: Vec<ServiceView> =
            records::services(&state).values().map(|s| service_view(&state, s)).collect();
        Ok(axum::Json(views).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn service_inspect(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let svc = find_service(&state, &id)?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

pub(super) fn task_views(
    state: &ClusterState,
    filter: impl Fn(&TaskRecord) -> bool,
) -> Vec<TaskView> {
    let services = records::services(state);
    let mut out: Vec<TaskView> = records::tasks(state)
        .values()
        .filter(|t| filter(t))
        .map(|t| TaskView {
            name: t.display_name(services.get(&t.task.service_id).map(Arc::as_ref)),
            node: t
                .task
                .node_id
                .as_ref()
                .and_then(|n| state.nodes.values().find(|x| x.id.to_string() == *n))
                .map(|n| n.hostname.clone())
                .unwrap_or_default(),
            addresses: t
                .addresses
                .iter()
                .map(|(n, ip)| (state.networks.get(n).map_or(n.clone(), |x| x.name.clone()), *ip))
                .collect(),
            task: TaskRecord::clone(t),
        })
        .collect();
    // Docker's order: by slot, the current task first, then newest history first.
    out.sort_by_cached_key(|v| {
        let t = &v.task.task;
        (
            t.slot,
            t.node_id.clone(),
            t.desired != DesiredState::Running,
            std::cmp::Reverse(t.created_ms),
        )
    });
    out
}

async fn service_ps(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let svc = find_service(&state, &id)?;
        Ok(axum::Json(task_views(&state, |t| t.task.service_id == svc.id)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

/// Collects the service's output from every node that runs (or ran) its tasks, through this
/// manager: each node is asked directly over the control plane.
async fn service_logs(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::Json(req): axum::Json<LogsRequest>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc = find_service(&state, &id)?;
        let mut out = LogsResponse::default();
        let mut per_time: Vec<(u64, LogEntry)> = Vec::new();
        for t in records::tasks(&state).values().filter(|t| t.task.service_id == svc.id) {
            let Some(node) = t
                .task
                .node_id
                .as_ref()
                .and_then(|n| state.nodes.values().find(|x| x.id.to_string() == *n))
            else {
                continue;
            };
            let since = req.cursors.get(&t.task.id).copied().unwrap_or(0);
            let ask = shoal_cluster::NodeRequest::TaskLogs { task: t.task.id.clone(), since };
            let v = match c.ask_node(node.addr, ask).await {
                Ok(v) => v,
                Err(shoal_cluster::Error::BadRequest(_)) => continue, // no longer on that node
                Err(_) => {
                    if !out.unreachable.contains(&node.hostname) {
                        out.unreachable.push(node.hostname.clone());
                    }
                    continue;
                }
            };
            let source = format!(
                "{}.{}@{}",
                t.display_name(Some(&svc)),
                &t.task.id[..t.task.id.len().min(12)],
                node.hostname
            );
            let lines: Vec<shoal_runtime::LogLine> =
                serde_json::from_value(v["lines"].clone()).unwrap_or_default();
            for l in lines {
                let time_ms = l
                    .time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
                let stream = serde_json::to_value(l.stream)
                    .ok()
                    .and_then(|s| s.as_str().map(str::to_owned))
                    .unwrap_or_default();
                per_time.push((
                    time_ms,
                    LogEntry { source: source.clone(), stream, time_ms, line: l.line },
                ));
            }
            out.cursors.insert(t.task.id.clone(), v["next"].as_u64().unwrap_or(since));
        }
        per_time.sort_by_key(|(t, _)| *t);
        out.entries = per_time.into_iter().map(|(_, e)| e).collect();
        Ok(axum::Json(out).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn service_update(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::Json(req): axum::Json<ServiceUpdate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let old = find_service(&state, &id)?;
        let mut svc = req.apply(&old, &StoreContext(&state)).map_err(model_error)?;
        // Anything but the replica count needs new tasks: a rolling update.
        if !crate::engine::rollout::same_tasks(&svc, &old) || req.force {
            svc.version += 1;
        }
        // What `service rollback` goes back to: the spec before any change, a scale included.
        if svc != old || req.force {
            svc.previous = Some(Box::new(Service { previous: None, ..old.clone() }));
        }
        svc.updated_ms = now_ms();
        put_service(&c, &state, &svc).await?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn service_rm(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let svc = find_service(&state, &id)?;
        write(&c, Command::RemoveService(svc.id)).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}
