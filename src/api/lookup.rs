//! Reading the store for a request: the lookups by name or id prefix that every handler
//! makes, and the model's errors as answers.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use shoal_cluster::Cluster;
use shoal_cluster::model::{ClusterState, Command, NetworkRecord};
use shoal_model::{Context, Error as ModelError, ErrorKind, MountSpec, Service};

use super::error;
use super::swarm::cluster_error;
use crate::engine::records;
use crate::mounts;

pub(super) async fn store(c: &Cluster) -> Result<ClusterState, Response> {
    c.store().await.map_err(cluster_error)
}

pub(super) async fn write(c: &Cluster, cmd: Command) -> Result<(), Response> {
    c.write(cmd).await.map_err(cluster_error)
}

pub(super) fn not_found(what: &str, name: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("No such {what}: {name}"))
}

/// Docker's lookup: the exact id, else the one item whose name is `what` or whose id starts
/// with it (3 characters at least); none or several is an error naming `kind`.
fn find_one<'a, T>(
    kind: &'static str,
    what: &str,
    items: &'a BTreeMap<String, T>,
    name_of: impl Fn(&T) -> &str,
) -> Result<&'a T, ModelError> {
    if let Some(x) = items.get(what) {
        return Ok(x);
    }
    let matches: Vec<&T> = items
        .iter()
        .filter(|(id, x)| name_of(x) == what || (what.len() >= 3 && id.starts_with(what)))
        .map(|(_, x)| x)
        .collect();
    match matches[..] {
        [x] => Ok(x),
        [] => Err(ModelError::NotFound { kind, name: what.to_owned() }),
        _ => Err(ModelError::Ambiguous { kind, name: what.to_owned(), matches: matches.len() }),
    }
}

pub(super) fn find_network<'a>(
    state: &'a ClusterState,
    what: &str,
) -> Result<&'a NetworkRecord, Response> {
    find_one("network", what, &state.networks, |n| &n.name).map(Arc::as_ref).map_err(model_error)
}

pub(super) fn find_service(state: &ClusterState, what: &str) -> Result<Service, Response> {
    find_one("service", what, records::services(state), |s| &s.name)
        .map(|s| Service::clone(s))
        .map_err(model_error)
}

/// The model's error as the API's answer: nothing was written.
pub(super) fn model_error(e: ModelError) -> Response {
    let status = match e.kind() {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
    };
    error(status, e.to_string())
}

/// What the model asks of the world while it reads a request: this store's networks and this
/// node's rules for mounts and signals.
#[derive(Debug)]
pub(super) struct StoreContext<'a>(pub &'a ClusterState);

impl Context for StoreContext<'_> {
    fn network_id(&self, what: &str) -> Result<String, ModelError> {
        find_one("network", what, &self.0.networks, |n| &n.name).map(|n| n.id.clone())
    }

    fn check_mounts(&self, m: &[MountSpec]) -> Result<Vec<MountSpec>, ModelError> {
        mounts::check_all(m).map_err(ModelError::Mount)
    }

    fn check_signal(&self, signal: &str) -> Result<(), ModelError> {
        shoal_runtime::parse_signal(signal).map(drop).map_err(ModelError::StopSignal)
    }
}
