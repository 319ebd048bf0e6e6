//! `/volumes`: the verbs of `shoal volume`. Volumes belong to the node whose agent is asked
//! (Docker's `local` scope), so these answer from this node's data dir alone and never touch
//! the store; a volume that a running task of this node mounts is not removed.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::Path as FsPath;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::{ApiState, error};
use crate::volumes::{VolumeError, Volumes};

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/volumes", get(volume_ls).post(volume_create))
        .route("/volumes/{name}", get(volume_inspect).delete(volume_rm))
}

/// `POST /volumes`: `shoal volume create [--label k=v] NAME`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

fn volumes(st: &ApiState) -> Volumes {
    Volumes::new(&st.config.data_dir, &st.config.node_name)
}

fn refused(e: VolumeError) -> Response {
    let status = match e {
        VolumeError::InvalidName(_) => StatusCode::BAD_REQUEST,
        VolumeError::NotFound(_) => StatusCode::NOT_FOUND,
        VolumeError::InUse { .. } => StatusCode::CONFLICT,
        VolumeError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn volume_create(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<VolumeCreate>,
) -> Response {
    match volumes(&st).create(&req.name, &req.labels) {
        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Err(e) => refused(e),
    }
}

async fn volume_ls(State(st): State<Arc<ApiState>>) -> Response {
    axum::Json(volumes(&st).list()).into_response()
}

async fn volume_inspect(State(st): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    match volumes(&st).get(&name) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => refused(e),
    }
}

/// The names of this node's live tasks that mount `mountpoint`.
fn users(st: &ApiState, mountpoint: &FsPath) -> Vec<String> {
    let Some(engine) = st.engine.load_full() else { return Vec::new() };
    let rt = engine.runtime();
    rt.list()
        .into_iter()
        .filter(|s| !s.state.is_terminal())
        .filter(|s| {
            rt.spec(&s.id).is_ok_and(|spec| spec.mounts.iter().any(|m| m.source == mountpoint))
        })
        .map(|s| s.name)
        .collect()
}

/// Docker's `-f` only makes a missing volume no error; one in use stays.
async fn volume_rm(
    State(st): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Response {
    let vols = volumes(&st);
    let removed = match vols.get(&name) {
        Ok(v) => {
            let by = users(&st, &v.mountpoint);
            if by.is_empty() {
                let name = name.clone();
                tokio::task::spawn_blocking(move || vols.remove(&name)).await.unwrap_or_else(|e| {
                    Err(VolumeError::Io {
                        op: "remove",
                        path: v.mountpoint.clone(),
                        source: std::io::Error::other(e),
                    })
                })
            } else {
                Err(VolumeError::InUse { name: name.clone(), by })
            }
        }
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(VolumeError::NotFound(_)) if q.force => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}
