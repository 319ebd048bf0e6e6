//! Task states, health states, the status snapshot and the events the runtime sends.

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A task's lifecycle, named and ordered as swarmkit's `TaskState` (the node-side part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Known to the runtime, nothing made yet.
    New,
    /// Its network namespace and files are being made.
    Preparing,
    /// Namespace ready (lo up): attach networks and DNS now, then call `start`.
    Ready,
    /// The process is being started.
    Starting,
    /// The process runs.
    Running,
    /// The process exited with code 0.
    Complete,
    /// The process was stopped on request (or never started before a stop).
    Shutdown,
    /// The process exited non-zero, or could not be started.
    Failed,
}

impl TaskState {
    /// Whether the task is finished (no process, no further state change).
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Complete | TaskState::Shutdown | TaskState::Failed)
    }

    /// Lower-case name as Docker prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Preparing => "preparing",
            TaskState::Ready => "ready",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health of a task that has a health check, as Docker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No probe has passed yet, and not enough have failed.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

impl Health {
    /// Lower-case name as Docker prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about one task at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task id.
    pub id: String,
    /// Task name from the spec.
    pub name: String,
    /// Name of its network namespace (`PREFIX-t-<short id>`, under `/run/netns`).
    pub netns: String,
    /// Lifecycle state.
    pub state: TaskState,
    /// Health, when the spec has a health check.
    pub health: Option<Health>,
    /// Failed probes in a row.
    pub failing_streak: u32,
    /// Output of the last probe (at most 4 KiB).
    pub last_probe_output: Option<String>,
    /// Pid (and process group) of the task's process while it runs.
    pub pid: Option<u32>,
    /// Exit code once finished (128 + signal when killed by one).
    pub exit_code: Option<i32>,
    /// Why it failed or could not start.
    pub error: Option<String>,
    /// Addresses written to its `/etc/hosts`.
    pub addresses: Vec<IpAddr>,
    /// When the runtime learnt of it.
    pub created_at: SystemTime,
    /// When its process started.
    pub started_at: Option<SystemTime>,
    /// When it reached a terminal state.
    pub finished_at: Option<SystemTime>,
}

impl TaskStatus {
    /// Whether DNS and the mesh should send traffic to it: running, and healthy if it has a
    /// health check (Swarm activates a task's service binding only then).
    pub fn is_serving(&self) -> bool {
        self.state == TaskState::Running && self.health.is_none_or(|h| h == Health::Healthy)
    }
}

/// What changed in an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `status.state` changed.
    State,
    /// `status.health` changed.
    Health,
    /// The task and everything it had were removed.
    Removed,
}

/// A change of one task, with the status after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// What changed.
    pub kind: EventKind,
    /// The task's status after the change.
    pub status: TaskStatus,
}
