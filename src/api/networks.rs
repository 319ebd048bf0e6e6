//! `/networks`: the verbs of `shoal network`. A network is created, shown and removed here;
//! its subnet and VNI are picked by the store as it applies the create.

// Handlers return a ready error `Response` from their checks; see swarm.rs.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shoal_cluster::model::{ClusterState, Command, NetworkRecord, NetworkSpec};
use shoal_model::NetworkCreate;
use shoal_scheduler::TaskState;

use super::lookup::{find_network, model_error, store, write};
use super::swarm::cluster;
use super::{ApiState, error};
use crate::engine::leader::new_id;
use crate::engine::records;

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/networks", get(network_ls).post(network_create))
        .route("/networks/{id}", get(network_inspect).delete(network_rm))
}

/// A network with what uses it (`network ls` / `network inspect`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkView {
    pub network: NetworkRecord,
    /// Services attached.
    pub services: Vec<String>,
    /// Running task endpoints per node host name: (task name, address).
    pub tasks: BTreeMap<String, Vec<(String, std::net::Ipv4Addr)>>,
    /// Containers a CNI runtime attached (`shoal cni`), per node host name: (container name,
    /// address, the runtime's container id).
    #[serde(default)]
    pub containers: BTreeMap<String, Vec<(String, std::net::Ipv4Addr, String)>>,
    /// VIPs per service name.
    pub vips: BTreeMap<String, std::net::Ipv4Addr>,
    /// This node's view of the network's peers (encryption state), when it hosts the network.
    #[serde(default)]
    pub local: Option<serde_json::Value>,
}

async fn network_create(
    State(st): State<Arc<ApiState>>,
    axum::Json(req): axum::Json<NetworkCreate>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        req.validate().map_err(model_error)?;
        // The store decides: a name taken (or a second ingress network) is a conflict, an
        // asked-for subnet that overlaps another is refused, and the subnet (when none is asked
        // for) and the VNI are picked as the command is applied, so creates that race all land.
        let id = new_id();
        let spec = NetworkSpec {
            id: id.clone(),
            name: req.name.clone(),
            subnet: req.subnet.map(ipnet::IpNet::V4),
            ingress: req.ingress,
            attachable: req.attachable,
            encrypted: req.encrypted,
            labels: req.labels.clone(),
        };
        write(&c, Command::CreateNetwork(spec)).await?;
        Ok((StatusCode::CREATED, axum::Json(serde_json::json!({ "id": id }))).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

fn network_view(state: &ClusterState, n: &NetworkRecord) -> NetworkView {
    let services = records::services(state);
    let held = records::held(state);
    let hostname = |id: &str| {
        state
            .nodes
            .values()
            .find(|x| x.id.to_string() == id)
            .map_or_else(|| id.to_owned(), |x| x.hostname.clone())
    };
    let mut tasks: BTreeMap<String, Vec<(String, std::net::Ipv4Addr)>> = BTreeMap::new();
    let mut containers: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for t in records::tasks(state).values() {
        if t.task.state != TaskState::Running {
            continue;
        }
        if let (Some(ip), Some(node)) = (t.addresses.get(&n.id), &t.task.node_id) {
            let name = t.display_name(services.get(&t.task.service_id).map(Arc::as_ref));
            match t.cni() {
                Some(c) => containers.entry(hostname(node)).or_default().push((
                    name,
                    *ip,
                    c.container_id.clone(),
                )),
                None => tasks.entry(hostname(node)).or_default().push((name, *ip)),
            }
        }
    }
    NetworkView {
        network: n.clone(),
        services: services
            .values()
            .filter(|s| records::task_networks(state, s).contains(&n.id))
            .map(|s| s.name.clone())
            .collect(),
        tasks,
        containers,
        vips: services
            .values()
            .filter_map(|s| records::vip_of(&held, &s.id, &n.id).map(|ip| (s.name.clone(), ip)))
            .collect(),
        local: None,
    }
}

async fn network_ls(State(st): State<Arc<ApiState>>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let views: Vec<NetworkView> =
            state.networks.values().map(|n| network_view(&state, n)).collect();
        Ok(axum::Json(views).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn network_inspect(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let state = store(&*cluster(&st)?).await?;
        let n = find_network(&state, &id)?;
        let mut view = network_view(&state, n);
        if let Some(engine) = st.engine.load_full() {
            let local = engine.overlay().networks().await;
            let peers = engine.overlay().peer_stats();
            if let Some(l) = local.into_iter().find(|l| l.spec.id == n.id) {
                view.local = Some(serde_json::json!({
                    "sandbox": l.sandbox,
                    "endpoints": l.endpoints,
                    "encrypted_peers": if n.encrypted {
                        serde_json::to_value(&peers).unwrap_or_default()
                    } else {
                        serde_json::Value::Null
                    },
                }));
            }
        }
        Ok(axum::Json(view).into_response())
    };
    run.await.unwrap_or_else(|r: Response| r)
}

async fn network_rm(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let n = find_network(&state, &id)?.clone();
        let view = network_view(&state, &n);
        let in_use = records::tasks(&state)
            .values()
            .any(|t| t.holds_addresses() && t.addresses.contains_key(&n.id));
        if !view.services.is_empty() || in_use {
            let users = if view.services.is_empty() {
                "tasks".to_owned()
            } else {
                format!("service(s) {}", view.services.join(", "))
            };
            // The ingress network goes like any other once nothing publishes through it; the
            // nodes then take their sandboxes off it (and onto the next one made `--ingress`).
            let message = if n.ingress {
                format!("ingress network cannot be removed because {users} depend on it")
            } else {
                format!("network {} is in use by {users}", n.name)
            };
            return Err(error(StatusCode::CONFLICT, message));
        }
        write(&c, Command::RemoveNetwork(n.id)).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    run.await.unwrap_or_else(|r| r)
}
