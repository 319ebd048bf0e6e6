//! The vocabulary the scheduler reasons over. Times are milliseconds on the leader's clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Constraint;

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

/// Whether a node takes tasks (`docker node update --availability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Schedulable.
    Active,
    /// No new tasks; running ones stay.
    Pause,
    /// Tasks are moved off.
    Drain,
}

/// Liveness, from gossip membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    pub role: Role,
    pub availability: Availability,
    pub status: NodeStatus,
    pub labels: BTreeMap<String, String>,
}

/// Replicated with a count, or one task per eligible node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Replicated { replicas: u64 },
    Global,
}

/// When a task that ended is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    Any,
    OnFailure,
    None,
}

/// Docker's restart policy; defaults: any, 5 s, no attempt limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    pub delay_ms: u64,
    /// 0 = no limit.
    pub max_attempts: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { condition: RestartCondition::Any, delay_ms: 5_000, max_attempts: 0 }
    }
}

/// Rolling update order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    #[default]
    StopFirst,
    StartFirst,
}

/// How a rolling update walks through the tasks (Docker's `--update-parallelism`,
/// `--update-delay` and `--update-monitor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePolicy {
    /// Tasks being replaced at once; 0 replaces them all at once. Docker's default: 1.
    pub parallelism: u64,
    /// Wait after a new task runs before the next one is replaced.
    pub delay_ms: u64,
    /// How long a new task is watched: it still counts as being replaced until it has run
    /// this long, and its failure within this long of its creation fails the update.
    #[serde(default = "default_monitor_ms")]
    pub monitor_ms: u64,
}

/// Docker's default `--update-monitor`.
pub const DEFAULT_UPDATE_MONITOR_MS: u64 = 5_000;

fn default_monitor_ms() -> u64 {
    DEFAULT_UPDATE_MONITOR_MS
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy { parallelism: 1, delay_ms: 0, monitor_ms: DEFAULT_UPDATE_MONITOR_MS }
    }
}

/// The parts of a service's spec the scheduler needs. `version` goes up on every spec change;
/// tasks of an older version are replaced by a rolling update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub mode: Mode,
    pub constraints: Vec<Constraint>,
    pub restart: RestartPolicy,
    pub update_order: UpdateOrder,
    #[serde(default)]
    pub update: UpdatePolicy,
    /// A failure paused the rolling update: no outdated task is replaced until the next one.
    #[serde(default)]
    pub update_paused: bool,
    pub version: u64,
    /// Ports published in host mode: a node where a live task holds one of them takes no
    /// other task that publishes it.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
}

/// A port published in host mode, which one task per node can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostPort {
    pub port: u16,
    /// UDP rather than TCP.
    pub udp: bool,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub spec: ServiceSpec,
}

/// Docker's task states, in lifecycle order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Preparing,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Orphaned,
}

impl TaskState {
    /// Whether the task's process is gone for good.
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }

    /// Docker's lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Orphaned => "orphaned",
        }
    }
}

/// What the leader wants of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Shutdown,
}

/// A task: one slot's (or, for global services, one node's) instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    /// 1.. for replicated services; 0 for global ones (the node is the slot).
    pub slot: u64,
    /// None while pending: no node could take it.
    pub node_id: Option<String>,
    pub spec_version: u64,
    pub desired: DesiredState,
    pub state: TaskState,
    /// When `state` last changed.
    pub state_since_ms: u64,
    pub created_ms: u64,
    /// How many tasks of this slot ran before this one (for `max_attempts`).
    pub attempt: u64,
}

/// Everything [`crate::plan`] looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub tasks: Vec<Task>,
}
