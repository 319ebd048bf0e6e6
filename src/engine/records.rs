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

use serde::{Deserialize, Serialize};
use shoal_cluster::model::{ClusterState, NetworkRecord, tables};
use shoal_scheduler as sched;

use crate::mounts::MountSpec;

/// The gossip table every node publishes its local endpoints to (one per network).
pub const ENDPOINT_TABLE: &str = "endpoint_table";

/// A published port of a service (`-p 8100:8100[/udp]`, `mode=host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub published: u16,
    pub target: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Routing mesh (`ingress`, every node answers) or `host` (only nodes running a task).
    #[serde(default)]
    pub host_mode: bool,
    /// A PROXY protocol header the mesh sends the task before the client's bytes (TCP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyVersion>,
}

/// How the routing mesh picks a task for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbAlgorithm {
    /// Power of two random choices, fewer open connections wins.
    #[default]
    P2c,
    /// Strict rotation.
    RoundRobin,
    /// Client-address affinity, the same on every node (every node builds the same Maglev
    /// table from the same backends).
    Maglev,
}

/// The PROXY protocol version of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as Docker prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A health command run inside each task (Docker's HEALTHCHECK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// Shell command; exit 0 is healthy.
    pub cmd: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
}

/// A service as the store holds it (table [`tables::SERVICES`], key = id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    /// Bumped on every change that needs new tasks (command, env, networks, …).
    pub version: u64,
    pub mode: sched::Mode,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Network ids (not including ingress, which ports imply).
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortRecord>,
    /// DNS round robin instead of a virtual IP.
    #[serde(default)]
    pub dnsrr: bool,
    /// How the routing mesh balances connections to the published ports.
    #[serde(default)]
    pub lb_algorithm: LbAlgorithm,
    /// Idle timeout, limits and health check of the routing mesh.
    #[serde(default)]
    pub mesh: super::mesh_policy::MeshPolicy,
    #[serde(default)]
    pub constraints: Vec<sched::Constraint>,
    pub restart: sched::RestartPolicy,
    #[serde(default)]
    pub update_order: sched::UpdateOrder,
    /// `--update-parallelism`, `--update-delay` and `--update-monitor`.
    #[serde(default)]
    pub update: sched::UpdatePolicy,
    /// `--update-failure-action`: what a task of a new spec failing during an update does.
    #[serde(default)]
    pub update_failure_action: FailureAction,
    /// Set when a failure stopped the last rolling update; cleared by the next update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
    #[serde(default)]
    pub health: Option<HealthRecord>,
    /// Volumes and bind mounts of each task (`--mount`), checked when the request came in.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    pub stop_grace_ms: u64,
    /// The signal a stop sends first (`--stop-signal`); SIGTERM when `None`.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// The spec before the last update, which `service rollback` puts back (without its own
    /// previous: one level, as in Docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<ServiceRecord>>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// Docker's `--update-failure-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Replace no more tasks until the next update (Docker's default).
    #[default]
    Pause,
    /// Put the previous spec back.
    Rollback,
    /// Go on as if nothing failed.
    Continue,
}

/// Why a rolling update stopped, as `service inspect` shows it (Docker's `UpdateStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// `paused` or `rollback_started`.
    pub state: String,
    pub message: String,
}

impl UpdateStatus {
    /// A status with its message.
    pub fn new(state: &str, message: String) -> UpdateStatus {
        UpdateStatus { state: state.to_owned(), message }
    }
}

impl ServiceRecord {
    /// The networks its tasks attach to: ingress first when it publishes ports. A host-mode
    /// port is served by the node's mesh too, to the node's own tasks only, through the same
    /// ingress endpoint that keeps the client's address.
    pub fn task_networks(&self, state: &ClusterState) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ports.is_empty()
            && let Some(ing) = ingress(state)
        {
            out.push(ing.id.clone());
        }
        for n in &self.networks {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }

    /// The networks that get a VIP: every task network but ingress, in vip mode. (The routing
    /// mesh balances ingress itself, and ingress takes no part in service discovery, as in
    /// Swarm: a name resolves on the networks a task shares with the service.)
    pub fn vip_networks(&self) -> Vec<String> {
        if self.dnsrr { Vec::new() } else { self.networks.clone() }
    }

    pub(crate) fn to_sched(&self) -> sched::Service {
        sched::Service {
            id: self.id.clone(),
            spec: sched::ServiceSpec {
                name: self.name.clone(),
                mode: self.mode,
                constraints: self.constraints.clone(),
                restart: self.restart,
                update_order: self.update_order,
                update: self.update,
                update_paused: self.update_status.as_ref().is_some_and(|s| s.state == "paused"),
                version: self.version,
                host_ports: self
                    .ports
                    .iter()
                    .filter(|p| p.host_mode)
                    .map(|p| sched::HostPort {
                        port: p.published,
                        udp: p.protocol == Protocol::Udp,
                    })
                    .collect(),
            },
        }
    }
}

/// A task as the store holds it (table [`tables::TASKS`], key = id): the scheduler's task plus
/// what the node needs to run it. Standalone tasks (`shoal run`) have an empty `service_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    #[serde(flatten)]
    pub task: sched::Task,
    /// Address per network id; the leader fills them before the node starts the task.
    #[serde(default)]
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// Networks the task needs addresses on.
    #[serde(default)]
    pub networks: Vec<String>,
    /// What the node last said (an error, an exit).
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// `starting`, `healthy` or `unhealthy` when the task has a health check.
    #[serde(default)]
    pub health: Option<String>,
    /// Standalone tasks: name and command (service tasks take theirs from the service).
    #[serde(default)]
    pub standalone: Option<Standalone>,
}

/// Whether a service or a standalone task already has `name`: the two share one namespace of
/// DNS names in the swarm.
pub fn name_taken(state: &ClusterState, name: &str) -> bool {
    tasks(state).values().any(|t| t.standalone.as_ref().is_some_and(|s| s.name == name))
        || services(state).values().any(|s| s.name == name)
}

/// What `shoal run` asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standalone {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Remove the record once the task ends (`--rm`).
    #[serde(default)]
    pub auto_remove: bool,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Set for a container a CNI runtime attached (`shoal cni`): it has no process of ours,
    /// only the runtime's namespace, which the node wires up like a task's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniAttachment>,
}

/// A container attached through `shoal cni`: what the runtime's ADD named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// CNI_CONTAINERID: the key ADD, CHECK and DEL find the record by.
    pub container_id: String,
    /// The namespace's name under `/run/netns` (CNI_NETNS names its file there).
    pub netns: String,
    /// CNI_IFNAME: the interface name inside the container.
    pub ifname: String,
    /// Further DNS names of the container on its network.
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl TaskRecord {
    /// A standalone task (`shoal run`, a CNI container) assigned to `node` on one network, as
    /// the API writes it: the leader gives it its address, then the node starts or attaches it.
    pub fn standalone(
        id: &str,
        node: &str,
        network: &str,
        standalone: Standalone,
        now_ms: u64,
    ) -> TaskRecord {
        TaskRecord {
            task: sched::Task {
                id: id.to_owned(),
                service_id: String::new(),
                slot: 0,
                node_id: Some(node.to_owned()),
                spec_version: 1,
                desired: sched::DesiredState::Running,
                state: sched::TaskState::Assigned,
                state_since_ms: now_ms,
                created_ms: now_ms,
                attempt: 0,
            },
            addresses: BTreeMap::new(),
            networks: vec![network.to_owned()],
            message: String::new(),
            exit_code: None,
            health: None,
            standalone: Some(standalone),
        }
    }

    /// What a CNI runtime attached, for a container it runs.
    pub fn cni(&self) -> Option<&CniAttachment> {
        self.standalone.as_ref().and_then(|s| s.cni.as_ref())
    }

    /// Whether every network has its address.
    pub fn addressed(&self) -> bool {
        self.networks.iter().all(|n| self.addresses.contains_key(n))
    }

    /// Docker's task name: `service.slot.id` (global: `service.node.id`), or the container name.
    pub fn display_name(&self, service: Option<&ServiceRecord>) -> String {
        match (&self.standalone, service) {
            (Some(s), _) => s.name.clone(),
            (None, Some(svc)) => format!("{}.{}", svc.name, self.slot_label()),
            (None, None) => self.task.id.clone(),
        }
    }

    /// The middle label of the task's DNS name: the slot, or the node for global services.
    pub fn slot_label(&self) -> String {
        if self.task.slot == 0 {
            self.task.node_id.clone().unwrap_or_default()
        } else {
            self.task.slot.to_string()
        }
    }

    /// Whether the task's addresses are still held (it may yet run or is running).
    pub fn holds_addresses(&self) -> bool {
        !self.task.state.is_terminal() || self.task.desired == sched::DesiredState::Running
    }
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
    state.networks.values().find(|n| n.ingress)
}

/// The services in the store (malformed entries are skipped).
pub fn services(state: &ClusterState) -> BTreeMap<String, ServiceRecord> {
    state
        .table(tables::SERVICES)
        .filter_map(|(k, v)| serde_json::from_value(v.clone()).ok().map(|s| (k.clone(), s)))
        .collect()
}

/// The tasks in the store (malformed entries are skipped).
pub fn tasks(state: &ClusterState) -> BTreeMap<String, TaskRecord> {
    state
        .table(tables::TASKS)
        .filter_map(|(k, v)| serde_json::from_value(v.clone()).ok().map(|t| (k.clone(), t)))
        .collect()
}

/// Key in the `ipam` table of a service's VIP on a network.
pub fn vip_key(service: &str, network: &str) -> String {
    format!("vip/{service}/{network}")
}

/// Key in the `ipam` table of a node's ingress sandbox address.
pub fn sandbox_key(node: &str) -> String {
    format!("sbox/{node}")
}

/// The `ipam` table: key → address.
pub fn held(state: &ClusterState) -> BTreeMap<String, Ipv4Addr> {
    state
        .table(tables::IPAM)
        .filter_map(|(k, v)| {
            v.get("ip")
                .and_then(|ip| ip.as_str())
                .and_then(|ip| ip.parse().ok())
                .map(|ip| (k.clone(), ip))
        })
        .collect()
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
        services: services(state).values().map(ServiceRecord::to_sched).collect(),
        tasks: tasks(state)
            .into_values()
            .filter(|t| t.standalone.is_none())
            .map(|t| t.task)
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

/// Serializes a record for the store.
pub fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    // Our records are plain data: serializing them cannot fail.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}
