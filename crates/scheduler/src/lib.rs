//! The leader's decisions, as pure functions over the cluster's desired state: no sockets, no
//! clocks, no Raft. The control plane calls [`plan`] with the current state and the time, applies
//! the returned [`Action`]s through Raft, and calls again after any change or at
//! [`Plan::wake_at`]. [`Ipam`] is the arithmetic of subnets, task addresses and VIPs from the
//! cluster's pool; the store's state machine uses it to pick each address as it applies a
//! command, so no address is ever handed out twice.
//!
//! Swarm's behaviour is the reference: spread by fewest tasks of the service then fewest tasks
//! overall; only Ready + Active nodes take new tasks; `pause` keeps what runs, `drain` and `Down`
//! move tasks away; restart policy `any`/`on-failure`/`none` with a 5 s delay; rolling updates one
//! task at a time, stop-first or start-first; five dead tasks kept per slot as history.

#![forbid(unsafe_code)]

mod constraint;
mod ipam;
mod model;
mod plan;

pub use constraint::{Constraint, ConstraintError};
pub use ipam::{Ipam, IpamError};
pub use model::{
    Availability, ClusterState, DEFAULT_UPDATE_MONITOR_MS, DesiredState, HostPort, Mode, Node,
    NodeStatus, RestartCondition, RestartPolicy, Role, Service, ServiceSpec, Task, TaskState,
    UpdateOrder, UpdatePolicy,
};
pub use plan::{Action, HISTORY_PER_SLOT, Plan, plan};
