//! `POST /services/{id}/rollback`: Docker's `service rollback` (see [`crate::engine::rollout`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use shoal_cluster::model::now_ms;

use super::ApiState;
use super::services::{find_service, put_service, service_view, store};
use super::swarm::{bad_request, cluster};
use crate::engine::rollout::rolled_back;

/// Puts back the service's previous spec; a rolling update takes the tasks there.
pub(super) async fn service_rollback(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let cur = find_service(&state, &id)?;
        let svc = rolled_back(&cur, now_ms()).ok_or_else(|| {
            bad_request(format!("service {} has no previous spec to roll back to", cur.name))
        })?;
        put_service(&c, &state, &svc).await?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}
