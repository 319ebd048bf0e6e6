//! The leader's loop: the scheduler's plan turned into store writes.
//!
//! The pass says which addresses are wanted (a VIP per service and network, a sandbox address
//! per node, an address per network of each new task); the store picks them when it applies the
//! writes (`shoal_cluster::model::alloc`), so a pass never decides an address from a copy of the
//! store that may be stale. An address is free again when nothing in the store holds it: a task
//! that ended, a VIP of a service that is gone, the sandbox of a node that left.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_cluster::model::{ClusterState, Command, now_ms};
use shoal_cluster::{Cluster, NodeId};
use shoal_scheduler::{self as sched, Action, DesiredState, TaskState};

use super::records::{self, TaskRecord};

/// A new task or service id: 25 base-36 characters, like Docker's.
pub fn new_id() -> String {
    let mut s = format!("{}{}", NodeId::random(), NodeId::random());
    s.truncate(25);
    s
}

/// Runs passes while this node leads: on every store change, when a restart delay ends, and once
/// a second regardless.
pub async fn run(cluster: Cluster, wake: std::sync::Arc<tokio::sync::Notify>) {
    let mut wake_at: Option<u64> = None;
    let mut seen = 0;
    loop {
        let until = wake_at
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        // Any store change (a service created, a task reported, a node down) wakes the pass.
        tokio::select! {
            index = cluster.applied_after(seen, until) => seen = index,
            _ = wake.notified() => {}
        }
        let info = cluster.info();
        if !info.raft || info.leader != Some(info.node) {
            continue;
        }
        match cluster.store().await {
            Ok(state) => match pass(&cluster, &state).await {
                Ok(w) => wake_at = w,
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "scheduling pass"),
            },
            Err(e) => tracing::debug!(error = %e, "reading the store for a scheduling pass"),
        }
    }
}

/// How long a node may be down before its tasks are moved away. An agent restart, crash or
/// upgrade leaves the node's tasks running (the next run adopts them) and is back well within
/// it; until then the node keeps its tasks and takes no new ones, as if paused.
const RESTART_GRACE_MS: u64 = 5_000;

/// Shows the scheduler nodes that went down less than [`RESTART_GRACE_MS`] ago (and did not
/// leave) as ready but paused. Passes run at least once a second, so the grace ends on time.
fn hold_restarting(view: &mut sched::ClusterState, state: &ClusterState, now: u64) {
    use shoal_cluster::model::NodeStatus;
    for n in &mut view.nodes {
        let Some(rec) = state.nodes.values().find(|r| r.id.to_string() == n.id) else { continue };
        let restarting = rec.status == NodeStatus::Down
            && rec.status_message != "node left the swarm"
            && now.saturating_sub(rec.updated_ms) < RESTART_GRACE_MS;
        if restarting {
            n.status = sched::NodeStatus::Ready;
            if n.availability == sched::Availability::Active {
                n.availability = sched::Availability::Pause;
            }
        }
    }
}

/// One scheduling pass; returns when to plan again at the latest.
async fn pass(cluster: &Cluster, state: &ClusterState) -> anyhow::Result<Option<u64>> {
    let (writes, wake_at) = plan_writes(state, now_ms())?;
    // Submitted together, in order: Raft appends and commits them in one round rather than
    // one round (and one log sync on each manager) per write, so every task of a new service
    // reaches its node at once. Each write stands alone (no two touch the same entry); one
    // that fails leaves the others, and the next pass plans from what the store then holds.
    let results = futures::future::join_all(writes.into_iter().map(|w| cluster.write(w))).await;
    for r in results {
        r?;
    }
    Ok(wake_at)
}

/// The store writes of one scheduling pass at `now`, in order, and when to plan again at the
/// latest. Pure, so a simulated swarm can run the leader without a cluster.
pub(crate) fn plan_writes(
    state: &ClusterState,
    now: u64,
) -> anyhow::Result<(Vec<Command>, Option<u64>)> {
    let services = records::services(state);
    let tasks = records::tasks(state);
    let held = records::held(state);
    let mut writes: Vec<Command> = Vec::new();

    // Addresses that belong to no task: each node's ingress sandbox, each service's VIPs.
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    if let Some(ing) = records::ingress(state) {
        for n in state.nodes.values() {
            wanted.insert(records::sandbox_key(&n.id.to_string()), ing.id.clone());
        }
    }
    for svc in services.values() {
        for net in svc.vip_networks() {
            wanted.insert(records::vip_key(&svc.id, &net), net);
        }
    }
    for key in held.keys().filter(|k| !wanted.contains_key(*k)) {
        writes.push(Command::RemoveAddress(key.clone()));
    }
    // An address outside its network's subnet is one a replaced ingress network gave.
    let fits = |key: &String, net: &String| {
        let subnet = state.networks.get(net).map(|n| n.subnet);
        held.get(key).is_some_and(|ip| subnet.is_some_and(|s| s.contains(&IpAddr::V4(*ip))))
    };
    for (key, net) in wanted.into_iter().filter(|(k, net)| !fits(k, net)) {
        writes.push(Command::AllocateAddress { key, network: net });
    }

    // A rolling update whose new tasks fail stops first (paused, or rolled back); the next
    // pass plans from the spec written here.
    let stopped = super::rollout::failure_actions(services, tasks, now);
    if !stopped.is_empty() {
        // Only the stopped updates: the addresses above are planned again next pass.
        let mut writes = Vec::new();
        for svc in stopped {
            let status = svc.update_status.as_ref().map(|s| s.message.clone()).unwrap_or_default();
            tracing::warn!(service = %svc.name, %status, "rolling update stopped");
            writes.push(Command::PutService(Box::new(svc)));
        }
        return Ok((writes, Some(now)));
    }

    let mut view = records::sched_state(state);
    hold_restarting(&mut view, state, now);
    let plan = sched::plan(now, &view);
    for action in plan.actions {
        match action {
            Action::Create { service_id, slot, node_id, spec_version, attempt, port_held } => {
                let Some(svc) = services.get(&service_id) else { continue };
                let id = new_id();
                let networks = records::task_networks(state, svc);
                let placed = node_id.is_some() && !port_held;
                let state = if placed { TaskState::Assigned } else { TaskState::Pending };
                let rec = TaskRecord {
                    task: sched::Task {
                        id: id.clone(),
                        service_id,
                        slot,
                        node_id,
                        spec_version,
                        desired: DesiredState::Running,
                        state,
                        state_since_ms: now,
                        created_ms: now,
                        attempt,
                    },
                    // The store gives the addresses when it applies the write.
                    addresses: BTreeMap::new(),
                    networks,
                    message: if state == TaskState::Pending {
                        plan.pending
                            .get(&svc.id)
                            .cloned()
                            .unwrap_or_else(|| "no suitable node".into())
                    } else {
                        String::new()
                    },
                    exit_code: None,
                    health: None,
                    standalone: None,
                };
                writes.push(Command::PutTask(Box::new(rec)));
            }
            Action::Assign { task_id, node_id } => {
                let Some(mut t) = tasks.get(&task_id).cloned().map(Arc::unwrap_or_clone) else {
                    continue;
                };
                t.task.node_id = Some(node_id);
                t.task.state = TaskState::Assigned;
                t.task.state_since_ms = now;
                t.message.clear();
                writes.push(Command::PutTask(Box::new(t)));
            }
            Action::Shutdown { task_id, reason } => {
                let Some(mut t) = tasks.get(&task_id).cloned().map(Arc::unwrap_or_clone) else {
                    continue;
                };
                t.task.desired = DesiredState::Shutdown;
                if t.task.state < TaskState::Assigned || t.task.node_id.is_none() {
                    // Never reached a node: nothing to stop.
                    t.task.state = TaskState::Shutdown;
                    t.task.state_since_ms = now;
                }
                t.message = reason.to_owned();
                writes.push(Command::PutTask(Box::new(t)));
            }
            Action::Delete { task_id } => writes.push(Command::RemoveTask(task_id)),
        }
    }

    // Standalone tasks: forget ended `--rm` ones and those of nodes that are gone; one written
    // without addresses (by an older agent) is written again for the store to give them.
    for t in tasks.values().filter(|t| t.standalone.is_some()) {
        let gone = t
            .task
            .node_id
            .as_ref()
            .is_none_or(|n| !state.nodes.keys().any(|id| id.to_string() == *n));
        let ended =
            t.task.state.is_terminal() && t.standalone.as_ref().is_some_and(|s| s.auto_remove);
        if gone || ended {
            writes.push(Command::RemoveTask(t.task.id.clone()));
        } else if !t.addressed() && t.task.desired == DesiredState::Running {
            writes.push(Command::PutTask(Box::new(TaskRecord::clone(t))));
        }
    }

    Ok((writes, plan.wake_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_just_down_keeps_its_tasks_for_a_grace() {
        use shoal_cluster::model::{Availability, NodeRecord, NodeStatus, Role};
        let node = |id: u64, status, message: &str, updated_ms| NodeRecord {
            id: NodeId(id),
            hostname: format!("node{id}"),
            role: Role::Worker,
            availability: Availability::Active,
            labels: Default::default(),
            addr: "127.0.0.1:2377".parse().unwrap(),
            data_addr: "127.0.0.1".parse().unwrap(),
            wg_public_key: None,
            status,
            status_message: message.into(),
            engine_version: "0".into(),
            created_ms: 0,
            updated_ms,
        };
        let now = 100_000;
        let mut s = ClusterState::default();
        for n in [
            node(1, NodeStatus::Ready, "", 0),
            node(2, NodeStatus::Down, "heartbeat failure", now - 1_000),
            node(3, NodeStatus::Down, "heartbeat failure", now - RESTART_GRACE_MS),
            node(4, NodeStatus::Down, "node left the swarm", now - 1_000),
        ] {
            s.nodes.insert(n.id, n.into());
        }
        let mut view = records::sched_state(&s);
        hold_restarting(&mut view, &s, now);
        let got: Vec<(String, sched::NodeStatus, sched::Availability)> =
            view.nodes.iter().map(|n| (n.hostname.clone(), n.status, n.availability)).collect();
        use sched::{Availability as A, NodeStatus as S};
        assert_eq!(
            got,
            [
                ("node1".to_string(), S::Ready, A::Active),
                ("node2".to_string(), S::Ready, A::Pause),
                ("node3".to_string(), S::Down, A::Active),
                ("node4".to_string(), S::Down, A::Active),
            ]
        );
    }
}
