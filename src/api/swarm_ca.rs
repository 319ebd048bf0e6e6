//! `/swarm/update` and `/swarm/ca`: the swarm's certificate expiry, gossip key rotation period
//! and CA (see `shoal_cluster::ca`). Durations are Docker's (`2160h`, `90m`); a bad one is a
//! 400 that names the flag, and changes nothing.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_cluster::ca::CaAnswer;
use shoal_cluster::model::security::{self, SwarmUpdate};

use super::ApiState;
use super::swarm::{bad_request, cluster, cluster_error};

/// `POST /swarm/update`: what to change; `None` keeps a setting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// `--cert-expiry`, e.g. `2160h`.
    #[serde(default)]
    pub cert_expiry: Option<String>,
    /// `--gossip-key-rotation`, e.g. `12h`.
    #[serde(default)]
    pub gossip_key_rotation: Option<String>,
}

/// `GET /swarm/ca`, `POST /swarm/ca/rotate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaCert {
    /// The swarm's CA certificate, PEM.
    pub cert_pem: String,
    /// Nodes that did not follow a rotation step in time.
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct CaQuery {
    #[serde(default)]
    rotate: bool,
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/swarm/update", post(update))
        .route("/swarm/ca", get(ca_cert).post(ca_cert))
}

/// Reads `--cert-expiry`-style flags: `Ok(None)` when absent.
pub fn duration_secs(
    flag: &str,
    text: Option<&str>,
    check: fn(std::time::Duration) -> Result<(), String>,
) -> Result<Option<u64>, String> {
    let Some(text) = text else { return Ok(None) };
    let d = security::parse_duration(text).map_err(|e| format!("{flag}: {e}"))?;
    check(d)?;
    Ok(Some(d.as_secs()))
}

async fn update(
    State(state): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<UpdateRequest>,
) -> Response {
    let c = match cluster(&state) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let parsed =
        duration_secs("--cert-expiry", req.cert_expiry.as_deref(), security::check_cert_expiry)
            .and_then(|cert_expiry_secs| {
                let rotation = duration_secs(
                    "--gossip-key-rotation",
                    req.gossip_key_rotation.as_deref(),
                    security::check_gossip_key_rotation,
                )?;
                Ok(SwarmUpdate { cert_expiry_secs, gossip_key_rotation_secs: rotation })
            });
    let update = match parsed {
        Ok(u) if u == SwarmUpdate::default() => {
            return bad_request("nothing to update: give --cert-expiry or --gossip-key-rotation");
        }
        Ok(u) => u,
        Err(e) => return bad_request(e),
    };
    match c.update_swarm(update).await {
        Ok(()) => axum::http::StatusCode::NO_CONTENT.into_response(),
        Err(e) => cluster_error(e),
    }
}

async fn ca_cert(State(state): State<Arc<ApiState>>, Query(q): Query<CaQuery>) -> Response {
    let c = match cluster(&state) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match c.ca(q.rotate).await {
        Ok(CaAnswer { cert_pem, warnings }) => {
            axum::Json(CaCert { cert_pem, warnings }).into_response()
        }
        Err(e) => cluster_error(e),
    }
}
