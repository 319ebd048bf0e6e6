//! `/containers`: `shoal run` and the verbs on this node's standalone tasks.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_cluster::Cluster;
use shoal_cluster::model::now_ms;
use shoal_model::{MountSpec, Standalone, TaskRecord};
use shoal_scheduler::DesiredState;

use super::lookup::{find_network, model_error, not_found};
use super::services::task_views;
use super::swarm::{bad_request, cluster, cluster_error};
use super::{ApiState, error};
use crate::engine::leader::new_id;
use crate::engine::records;
use crate::mounts;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/containers", get(container_ls).post(container_run))
        .route("/containers/{name}", get(container_inspect).delete(container_rm))
        .route("/containers/{name}/stop", post(container_stop))
        .route("/containers/{name}/logs", get(container_logs))
}

/// `POST /containers`: `shoal run`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRequest {
    pub name: String,
    pub network: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub auto_remove: bool,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn container_run(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<RunRequest>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        shoal_model::check_name("container", &req.name).map_err(model_error)?;
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(bad_request(
                "shoal run needs a command: shoal run --name N --network NET -- CMD",
            ));
        }
        let state = c.task_state().await.map_err(cluster_error)?;
        let net = find_network(&state, &req.network)?;
        if !net.attachable {
            return Err(bad_request(format!(
                "Could not attach to network {}: rpc error: code = PermissionDenied desc = network {} not manually attachable",
                req.network, net.name
            )));
        }
        let id = new_id();
        let standalone = Standalone {
            name: req.name.clone(),
            argv: req.argv.clone(),
            env: shoal_model::parse_env(&req.env).map_err(model_error)?,
            auto_remove: req.auto_remove,
            mounts: mounts::check_all(&req.mounts).map_err(bad_request)?,
            cni: None,
        };
        let rec = TaskRecord::standalone(&id, engine.node_id(), &net.id, standalone, now_ms());
        // The store refuses a name in use (409) and gives the addresses.
        c.put_standalone(&id, Some(rec)).await.map_err(cluster_error)?;
        engine.kick();
        Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "id": id }))).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

/// This node's standalone task called `name`.
pub(super) async fn own_container(
    st: &ApiState,
    name: &str,
) -> Result<(Arc<Cluster>, TaskRecord), Response> {
    let c = cluster(st)?;
    let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
    let state = c.task_state().await.map_err(cluster_error)?;
    let t = records::tasks(&state)
        .values()
        .find(|t| {
            t.standalone.as_ref().is_some_and(|s| s.name == name)
                && t.task.node_id.as_deref() == Some(engine.node_id())
        })
        .cloned()
        .ok_or_else(|| not_found("container", name))?;
    Ok((c, Arc::unwrap_or_clone(t)))
}

/// This node's standalone tasks, as `docker ps` lists one engine's containers: the ones that
/// `stop`, `rm` and `logs` here can reach.
async fn container_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = c.task_state().await.map_err(cluster_error)?;
        let me = st.engine.load_full().map(|e| e.node_id().to_owned());
        let mine = |t: &TaskRecord| {
            t.standalone.is_some() && t.task.node_id.is_some() && t.task.node_id == me
        };
        Ok(axum::Json(task_views(&state, mine)).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn container_inspect(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = c.task_state().await.map_err(cluster_error)?;
        let v = task_views(&state, |t| t.standalone.as_ref().is_some_and(|s| s.name == name));
        match v.into_iter().next() {
            Some(v) => Ok(axum::Json(v).into_response()),
            None => Err(not_found("container", &name)),
        }
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn container_stop(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let (c, mut t) = own_container(&st, &name).await?;
        t.task.desired = DesiredState::Shutdown;
        c.put_standalone(&t.task.id.clone(), Some(t)).await.map_err(cluster_error)?;
        if let Some(e) = st.engine.load_full() {
            e.kick();
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn container_rm(
    State(st): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Response {
    let run = async {
        let (c, t) = own_container(&st, &name).await?;
        if !t.task.state.is_terminal() && !q.force {
            return Err(error(
                StatusCode::CONFLICT,
                format!(
                    "You cannot remove a running container {name}. Stop the container before attempting removal or force remove"
                ),
            ));
        }
        c.put_standalone(&t.task.id, None).await.map_err(cluster_error)?;
        if let Some(e) = st.engine.load_full() {
            e.kick();
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

async fn container_logs(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    let run = async {
        let (_, t) = own_container(&st, &name).await?;
        let engine = st.engine.load_full().ok_or_else(|| bad_request("this node runs no tasks"))?;
        let logs = engine.runtime().logs(&t.task.id).map_err(|e| bad_request(e.to_string()))?;
        let text: String = logs.lines().into_iter().map(|l| l.line + "\n").collect();
        Ok(text.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}
