//! What services, tasks and endpoints look like in the store and in the gossip tables, and how
//! they turn into the inputs of the scheduler, the overlay, DNS, the mesh and the VIP rules.
//!
//! The store (Raft) holds the desired state: services (`services` table), tasks (`tasks`) with
//! their assigned node and addresses, and the addresses that belong to no task (`ipam`: service
//! VIPs and each node's ingress sandbox). The gossip `endpoint_table` of each network holds what
//! runs where right now: every node publishes its own running tasks there, so DNS, the mesh and
//! VXLAN forwarding follow tasks within a gossip round, not a store round trip.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_cluster::model::{ClusterState, NetworkRecord};
pub use shoal_model::{
    CniAttachment, FailureAction, Protocol, ProxyVersion, Service, Standalone, TaskRecord,
    UpdateStatus, sandbox_key, vip_key,
};
use shoal_scheduler as sched;

/// The gossip table every node publishes its local endpoints to (one per network).
pub const ENDPOINT_TABLE: &str = "endpoint_table";

/// The service's task networks on this store: ingress first when it publishes ports.
pub fn task_networks(state: &ClusterState, svc: &Service) -> Vec<String> {
    svc.task_networks(ingress(state).map(|n| n.id.as_str()))
}

/// One endpoint in a network's gossip `endpoint_table` (key: task id, or `sbox-<node>` for a
/// node's ingress sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Node id of its host.
    pub node: String,
    pub ip: Ipv4Addr,
    /// Service id (empty for standalone tasks and sandboxes).
    #[serde(default)]
    pub service: String,
    /// Task id (empty for sandboxes).
    #[serde(default)]
    pub task: String,
    /// Slot label (`1`, or the node id of a global task).
    #[serde(default)]
    pub slot: String,
    /// Container name of a standalone task.
    #[serde(default)]
    pub name: String,
    /// Running and, if it has a health check, healthy: only then does it take traffic.
    #[serde(default)]
    pub serving: bool,
    /// Further DNS names of a standalone task (a CNI container's aliases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// The ingress network.
pub fn ingress(state: &ClusterState) -> Option<&NetworkRecord> {
    state.networks.values().map(Arc::as_ref).find(|n| n.ingress)
}

/// The services in the store, by id.
pub fn services(state: &ClusterState) -> &BTreeMap<String, Arc<Service>> {
    &state.services
}

/// The tasks in the store, by id.
pub fn tasks(state: &ClusterState) -> &BTreeMap<String, Arc<TaskRecord>> {
    &state.tasks
}

/// The `ipam` table: key → address.
pub fn held(state: &ClusterState) -> BTreeMap<String, Ipv4Addr> {
    state.ipam.iter().map(|(k, a)| (k.clone(), a.ip)).collect()
}

/// A service's VIP on a network, if allocated.
pub fn vip_of(held: &BTreeMap<String, Ipv4Addr>, service: &str, network: &str) -> Option<Ipv4Addr> {
    held.get(&vip_key(service, network)).copied()
}

/// The scheduler's view of the store: nodes, services and the service tasks.
pub fn sched_state(state: &ClusterState) -> sched::ClusterState {
    use shoal_cluster::model::{Availability as A, NodeStatus as S, Role as R};
    let nodes = state
        .nodes
        .values()
        .map(|n| sched::Node {
            id: n.id.to_string(),
            hostname: n.hostname.clone(),
            role: match n.role {
                R::Manager => sched::Role::Manager,
                R::Worker => sched::Role::Worker,
            },
            availability: match n.availability {
                A::Active => sched::Availability::Active,
                A::Pause => sched::Availability::Pause,
                A::Drain => sched::Availability::Drain,
            },
            status: match n.status {
                S::Ready => sched::NodeStatus::Ready,
                S::Down | S::Unknown => sched::NodeStatus::Down,
            },
            labels: n.labels.clone(),
        })
        .collect();
    sched::ClusterState {
        nodes,
        services: services(state).values().map(|s| crate::from_model::sched_service(s)).collect(),
        tasks: tasks(state)
            .values()
            .filter(|t| t.standalone.is_none())
            .map(|t| t.task.clone())
            .collect(),
    }
}

/// The overlay's view of a network.
pub fn overlay_spec(n: &NetworkRecord) -> Option<shoal_vxlan::NetworkSpec> {
    let (ipnet::IpNet::V4(subnet), std::net::IpAddr::V4(gateway)) = (n.subnet, n.gateway) else {
        return None;
    };
    Some(shoal_vxlan::NetworkSpec {
        id: n.id.clone(),
        vni: n.vni,
        subnet,
        gateway,
        encrypted: n.encrypted,
    })
}
