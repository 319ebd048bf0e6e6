//! Tasks as the store keeps them (table `tasks`, key = id): the scheduler's task plus what a
//! node needs to run it, and the keys of the `ipam` table, which holds the addresses that
//! belong to no task (service VIPs, each node's ingress sandbox).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use shoal_scheduler as sched;

use crate::{MountSpec, Service};

/// A task as the store holds it (table `tasks`, key = id): the scheduler's task plus
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
    pub fn display_name(&self, service: Option<&Service>) -> String {
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

/// Key in the `ipam` table of a service's VIP on a network.
pub fn vip_key(service: &str, network: &str) -> String {
    format!("vip/{service}/{network}")
}

/// Key in the `ipam` table of a node's ingress sandbox address.
pub fn sandbox_key(node: &str) -> String {
    format!("sbox/{node}")
}
