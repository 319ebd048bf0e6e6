//! The orchestrator and scheduler in one pass: from the desired state and the time, what to
//! create, where, what to stop, and what to forget.

use std::collections::{BTreeMap, HashMap};

use crate::model::{
    Availability, ClusterState, DesiredState, HostPort, Mode, Node, NodeStatus, RestartCondition,
    Service, Task, TaskState, UpdateOrder,
};

/// Dead tasks kept per slot for `service ps` (Swarm's task history retention).
pub const HISTORY_PER_SLOT: usize = 5;

/// One change for the leader to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new task for the slot (0 for global services), desired running. `node_id` is `None`
    /// when no node can take it now: the task stays pending until one can.
    Create {
        service_id: String,
        slot: u64,
        node_id: Option<String>,
        spec_version: u64,
        attempt: u64,
        /// A global task's node is its own, but another live task holds one of the service's
        /// host-mode ports there: the task stays pending on that node until an `Assign`.
        port_held: bool,
    },
    /// Put a pending task on a node.
    Assign { task_id: String, node_id: String },
    /// Make the task's desired state shutdown; its node stops it.
    Shutdown { task_id: String, reason: &'static str },
    /// Forget a dead task: history beyond the limit, or its service is gone.
    Delete { task_id: String },
}

/// The result of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Plan again at this time (a restart delay ends) even if nothing else changes.
    pub wake_at: Option<u64>,
    /// Why a service's new tasks found no node, in Docker's words, e.g.
    /// `no suitable node (host-mode port already in use on 2 nodes)`; by service id.
    pub pending: BTreeMap<String, String>,
}

/// Why a global task waits on its node: swarmkit's words for a pre-assigned task whose node
/// fails the host-port filter.
const PORT_HELD_ON_ITS_NODE: &str = "no suitable node (host-mode port already in use on 1 node)";

/// Tasks per node, counted as the plan goes so that each decision sees the ones before it.
#[derive(Debug, Default)]
struct Load {
    total: HashMap<String, u64>,
    per_service: HashMap<(String, String), u64>,
    /// Live tasks holding a host-mode port, per node and port.
    host_ports: HashMap<(String, HostPort), u64>,
    /// The host-mode ports of each service.
    ports_of: HashMap<String, Vec<HostPort>>,
}

impl Load {
    fn add(&mut self, node: &str, service: &str, delta: i64) {
        let apply = |v: &mut u64| *v = v.saturating_add_signed(delta);
        apply(self.total.entry(node.to_owned()).or_default());
        apply(self.per_service.entry((node.to_owned(), service.to_owned())).or_default());
        for p in self.ports_of.get(service).into_iter().flatten() {
            apply(self.host_ports.entry((node.to_owned(), *p)).or_default());
        }
    }

    /// Whether a live task on `node` holds one of `svc`'s host-mode ports.
    fn port_taken(&self, node: &str, svc: &Service) -> bool {
        svc.spec
            .host_ports
            .iter()
            .any(|p| self.host_ports.get(&(node.to_owned(), *p)).is_some_and(|n| *n > 0))
    }

    fn of(&self, node: &str, service: &str) -> (u64, u64) {
        (
            self.per_service.get(&(node.to_owned(), service.to_owned())).copied().unwrap_or(0),
            self.total.get(node).copied().unwrap_or(0),
        )
    }
}

fn is_live(t: &Task) -> bool {
    t.desired == DesiredState::Running
}

/// Whether the restart policy replaces this dead task (at once or after its delay).
fn restarts(svc: &Service, t: &Task) -> bool {
    let p = &svc.spec.restart;
    (match p.condition {
        RestartCondition::Any => true,
        RestartCondition::OnFailure => t.state != TaskState::Complete,
        RestartCondition::None => false,
    }) && (p.max_attempts == 0 || t.attempt < p.max_attempts)
}

/// Whether a task may keep running on its node: the node exists, is Ready, is not draining,
/// and still satisfies the service's constraints. (A paused node keeps its tasks.)
fn may_stay(node: Option<&Node>, svc: &Service) -> bool {
    node.is_some_and(|n| {
        n.status == NodeStatus::Ready
            && n.availability != Availability::Drain
            && svc.spec.constraints.iter().all(|c| c.matches(n))
    })
}

/// Whether a node may take a new task of the service.
fn may_take(n: &Node, svc: &Service) -> bool {
    n.status == NodeStatus::Ready
        && n.availability == Availability::Active
        && svc.spec.constraints.iter().all(|c| c.matches(n))
}

struct Planner<'a> {
    now: u64,
    nodes: BTreeMap<&'a str, &'a Node>,
    load: Load,
    out: Plan,
}

impl<'a> Planner<'a> {
    fn wake(&mut self, at: u64) {
        self.out.wake_at = Some(self.out.wake_at.map_or(at, |w| w.min(at)));
    }

    /// The eligible node with the fewest tasks of this service, then fewest overall, then by
    /// hostname so that the same state always gives the same answer. A node where one of the
    /// service's host-mode ports is held is not eligible. With no node, the reason is noted.
    fn pick(&mut self, svc: &Service) -> Option<&'a Node> {
        let found = self
            .nodes
            .values()
            .copied()
            .filter(|n| may_take(n, svc) && !self.load.port_taken(&n.id, svc))
            .min_by_key(|n| {
                let (mine, total) = self.load.of(&n.id, &svc.id);
                (mine, total, n.hostname.as_str(), n.id.as_str())
            });
        if found.is_none() {
            let why = self.why_no_node(svc);
            self.out.pending.insert(svc.id.clone(), why);
        }
        found
    }

    /// Docker's explanation of a task that no node takes.
    fn why_no_node(&self, svc: &Service) -> String {
        let active = || {
            self.nodes
                .values()
                .filter(|n| n.status == NodeStatus::Ready && n.availability == Availability::Active)
        };
        let unmet = active().filter(|n| !svc.spec.constraints.iter().all(|c| c.matches(n))).count();
        let ports =
            active().filter(|n| may_take(n, svc) && self.load.port_taken(&n.id, svc)).count();
        let on = |n: usize| if n == 1 { "1 node".to_owned() } else { format!("{n} nodes") };
        let mut parts = Vec::new();
        if unmet > 0 {
            parts.push(format!("scheduling constraints not satisfied on {}", on(unmet)));
        }
        if ports > 0 {
            parts.push(format!("host-mode port already in use on {}", on(ports)));
        }
        if parts.is_empty() {
            "no suitable node".into()
        } else {
            format!("no suitable node ({})", parts.join("; "))
        }
    }

    fn create(&mut self, svc: &Service, slot: u64, node: Option<&Node>, attempt: u64) {
        if let Some(n) = node {
            self.load.add(&n.id, &svc.id, 1);
        }
        self.out.actions.push(Action::Create {
            service_id: svc.id.clone(),
            slot,
            node_id: node.map(|n| n.id.clone()),
            spec_version: svc.spec.version,
            attempt,
            port_held: false,
        });
    }

    /// A new global task on its node, or, while another live task holds one of the service's
    /// host-mode ports there, a task that waits on that node (swarmkit's pre-assigned tasks).
    fn create_global(&mut self, svc: &Service, n: &Node, attempt: u64) {
        if !self.load.port_taken(&n.id, svc) {
            self.create(svc, 0, Some(n), attempt);
            return;
        }
        self.out.pending.insert(svc.id.clone(), PORT_HELD_ON_ITS_NODE.into());
        self.out.actions.push(Action::Create {
            service_id: svc.id.clone(),
            slot: 0,
            node_id: Some(n.id.clone()),
            spec_version: svc.spec.version,
            attempt,
            port_held: true,
        });
    }

    fn shutdown(&mut self, t: &Task, reason: &'static str) {
        // A pending task (a global one waiting on its node) was never counted there.
        if let Some(n) = &t.node_id
            && !t.state.is_terminal()
            && t.state != TaskState::Pending
        {
            self.load.add(n, &t.service_id, -1);
        }
        self.out.actions.push(Action::Shutdown { task_id: t.id.clone(), reason });
    }

    /// Whether a dead task's slot gets a new task now (true), later (wake-up set), or never.
    fn restart_due(&mut self, svc: &Service, t: &Task) -> bool {
        if !restarts(svc, t) {
            return false;
        }
        let p = &svc.spec.restart;
        let at = t.state_since_ms.saturating_add(p.delay_ms);
        if self.now >= at {
            true
        } else {
            self.wake(at);
            false
        }
    }

    /// One slot: its live tasks (desired running) oldest first, and its dead history.
    fn slot(&mut self, svc: &Service, slot: u64, global_node: Option<&Node>, tasks: &[&Task]) {
        let live: Vec<&Task> = tasks.iter().copied().filter(|t| is_live(t)).collect();
        let Some(newest) = live.last().copied() else {
            // Nothing wants to run here: start one. Global slots live on their own node.
            let attempt = tasks.iter().map(|t| t.attempt + 1).max().unwrap_or(0);
            match global_node {
                Some(n) => self.create_global(svc, n, attempt),
                None => {
                    let node = self.pick(svc);
                    self.create(svc, slot, node, attempt);
                }
            }
            return;
        };

        // A start-first update that has come up replaces the older tasks of the slot; one that
        // died leaves them running.
        if live.len() > 1 {
            if newest.state == TaskState::Running {
                for t in &live[..live.len() - 1] {
                    self.shutdown(t, "replaced by a newer version");
                }
            } else if newest.state.is_terminal() {
                self.shutdown(newest, "update failed; previous version kept");
            }
            return;
        }

        let t = newest;
        let node = t.node_id.as_deref().and_then(|id| self.nodes.get(id).copied());
        match &t.node_id {
            None => {
                if let Some(n) = global_node.or_else(|| self.pick(svc)) {
                    self.load.add(&n.id, &svc.id, 1);
                    self.out
                        .actions
                        .push(Action::Assign { task_id: t.id.clone(), node_id: n.id.clone() });
                }
            }
            Some(_) if !may_stay(node, svc) => {
                self.shutdown(t, "node is down, drained or no longer fits the constraints");
                if global_node.is_none() {
                    let n = self.pick(svc);
                    self.create(svc, slot, n, t.attempt);
                }
            }
            Some(_) if t.state.is_terminal() => {
                // A global task restarts on its own node, which must take new tasks.
                let node_takes = global_node.is_none_or(|n| may_take(n, svc));
                if node_takes && self.restart_due(svc, t) {
                    self.shutdown(t, "restarting");
                    match global_node {
                        Some(n) => self.create_global(svc, n, t.attempt + 1),
                        None => {
                            let n = self.pick(svc);
                            self.create(svc, slot, n, t.attempt + 1);
                        }
                    }
                }
            }
            // A global task waiting on its node for a host-mode port: placed once it is free.
            Some(_) if t.state == TaskState::Pending => match node {
                Some(n) if may_take(n, svc) && !self.load.port_taken(&n.id, svc) => {
                    self.load.add(&n.id, &svc.id, 1);
                    let (task_id, node_id) = (t.id.clone(), n.id.clone());
                    self.out.actions.push(Action::Assign { task_id, node_id });
                }
                _ => {
                    self.out.pending.insert(svc.id.clone(), PORT_HELD_ON_ITS_NODE.into());
                }
            },
            Some(_) => {}
        }
    }

    /// Rolling update, `parallelism` slots at a time. A slot is in flight, serving nothing or
    /// about to change, while a task of it is not running: starting, pending, or dead and due
    /// for a restart (or, start-first, while old and new both live). Free places go to the
    /// lowest outdated slots, each `delay` after the last new task ran: an update never takes
    /// down more than `parallelism` slots at once, counting those down for other reasons.
    fn update(&mut self, svc: &Service, slots: &BTreeMap<SlotKey, Vec<&Task>>, touched: usize) {
        let v = svc.spec.version;
        let live = || slots.values().flatten().filter(|t| is_live(t));
        let policy = svc.spec.update;
        // A new task is watched for the monitor period after it runs; it counts as in flight
        // until then (and the pass wakes when the watch ends).
        let mut watch_ends: Option<u64> = None;
        let mut down = |t: &Task| {
            if t.state.is_terminal() {
                return restarts(svc, t);
            }
            if t.state < TaskState::Running {
                return true;
            }
            let ends = t.state_since_ms.saturating_add(policy.monitor_ms);
            let watched = t.spec_version == v && ends > self.now;
            if watched {
                watch_ends = Some(watch_ends.map_or(ends, |w: u64| w.min(ends)));
            }
            watched
        };
        let in_flight = slots
            .values()
            .filter(|ts| {
                let live: Vec<&&Task> = ts.iter().filter(|t| is_live(t)).collect();
                let n = live.len();
                live.into_iter().filter(|t| down(t)).count() > 0 || n > 1
            })
            .count();
        if svc.spec.update_paused {
            return;
        }
        let width = if policy.parallelism == 0 { usize::MAX } else { policy.parallelism as usize };
        // Anything decided for this service in this pass (a create, a move) also waits its turn.
        if in_flight >= width || self.out.actions.len() > touched {
            if let Some(at) = watch_ends {
                self.wake(at);
            }
            return;
        }
        let outdated: Vec<&Task> = live()
            .filter(|t| t.spec_version < v && t.state == TaskState::Running)
            .take(width - in_flight)
            .copied()
            .collect();
        if outdated.is_empty() {
            return;
        }
        if policy.delay_ms > 0 {
            let last_up = live()
                .filter(|t| t.spec_version == v && t.state == TaskState::Running)
                .map(|t| t.state_since_ms)
                .max();
            if let Some(at) = last_up.map(|t| t.saturating_add(policy.delay_ms))
                && at > self.now
            {
                self.wake(at);
                return;
            }
        }
        for old in outdated {
            self.replace(svc, old);
        }
    }

    /// Replaces an outdated task by one of the service's version, in the update order.
    fn replace(&mut self, svc: &Service, old: &Task) {
        let global_node = match svc.spec.mode {
            Mode::Global => old.node_id.as_deref().and_then(|id| self.nodes.get(id).copied()),
            Mode::Replicated { .. } => None,
        };
        match svc.spec.update_order {
            UpdateOrder::StopFirst => {
                self.shutdown(old, "updating to a new version");
                match global_node {
                    Some(n) => self.create_global(svc, n, old.attempt),
                    None => {
                        let n = self.pick(svc);
                        self.create(svc, old.slot, n, old.attempt);
                    }
                }
            }
            UpdateOrder::StartFirst => {
                let n = global_node.or_else(|| self.pick(svc));
                self.create(svc, old.slot, n, old.attempt);
            }
        }
    }

    fn history(&mut self, tasks: &[&Task]) {
        let mut dead: Vec<&Task> =
            tasks.iter().copied().filter(|t| !is_live(t) && t.state.is_terminal()).collect();
        dead.sort_by_key(|t| std::cmp::Reverse((t.created_ms, t.id.clone())));
        for t in dead.into_iter().skip(HISTORY_PER_SLOT) {
            self.out.actions.push(Action::Delete { task_id: t.id.clone() });
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SlotKey {
    Slot(u64),
    Node(String),
}

/// Decides what the cluster should do next. Pure: the same state and time give the same plan.
/// Applying the plan and planning again converges; an empty plan means nothing to do until the
/// state changes or [`Plan::wake_at`].
pub fn plan(now_ms: u64, state: &ClusterState) -> Plan {
    let mut p = Planner {
        now: now_ms,
        nodes: state.nodes.iter().map(|n| (n.id.as_str(), n)).collect(),
        load: Load {
            ports_of: state
                .services
                .iter()
                .filter(|s| !s.spec.host_ports.is_empty())
                .map(|s| (s.id.clone(), s.spec.host_ports.clone()))
                .collect(),
            ..Load::default()
        },
        out: Plan::default(),
    };
    // A task still pending (a global one may wait on its node) holds nothing there.
    let holding = |t: &&Task| t.state != TaskState::Pending;
    for t in state.tasks.iter().filter(|t| is_live(t) && !t.state.is_terminal()).filter(holding) {
        if let Some(n) = &t.node_id {
            p.load.add(n, &t.service_id, 1);
        }
    }
    let services: BTreeMap<&str, &Service> =
        state.services.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut by_service: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in &state.tasks {
        by_service.entry(t.service_id.as_str()).or_default().push(t);
    }

    // Tasks of removed services: stop the live ones, forget the dead ones.
    for (sid, tasks) in &by_service {
        if services.contains_key(sid) {
            continue;
        }
        for t in tasks {
            if is_live(t) {
                p.shutdown(t, "service removed");
            } else if t.state.is_terminal() {
                p.out.actions.push(Action::Delete { task_id: t.id.clone() });
            }
        }
    }

    for svc in services.values() {
        let touched = p.out.actions.len();
        let mut slots: BTreeMap<SlotKey, Vec<&Task>> = BTreeMap::new();
        for t in by_service.get(svc.id.as_str()).into_iter().flatten() {
            let key = match (svc.spec.mode, &t.node_id) {
                (Mode::Global, Some(n)) => SlotKey::Node(n.clone()),
                (Mode::Global, None) => SlotKey::Node(String::new()),
                (Mode::Replicated { .. }, _) => SlotKey::Slot(t.slot),
            };
            slots.entry(key).or_default().push(t);
        }
        for tasks in slots.values_mut() {
            tasks.sort_by_key(|t| (t.created_ms, t.id.clone()));
        }
        match svc.spec.mode {
            Mode::Replicated { replicas } => {
                for (key, tasks) in &slots {
                    if let SlotKey::Slot(s) = key
                        && *s > replicas
                    {
                        for t in tasks.iter().filter(|t| is_live(t)) {
                            p.shutdown(t, "scaled down");
                        }
                        for t in tasks.iter().filter(|t| !is_live(t) && t.state.is_terminal()) {
                            p.out.actions.push(Action::Delete { task_id: t.id.clone() });
                        }
                    }
                }
                for slot in 1..=replicas {
                    let tasks = slots.get(&SlotKey::Slot(slot)).map(Vec::as_slice).unwrap_or(&[]);
                    p.slot(svc, slot, None, tasks);
                    p.history(tasks);
                }
            }
            Mode::Global => {
                let nodes: Vec<&Node> = p.nodes.values().copied().collect();
                for n in nodes {
                    let tasks =
                        slots.get(&SlotKey::Node(n.id.clone())).map(Vec::as_slice).unwrap_or(&[]);
                    if may_take(n, svc) || tasks.iter().any(|t| is_live(t)) {
                        p.slot(svc, 0, Some(n), tasks);
                    }
                    p.history(tasks);
                }
                // Tasks on nodes that left the cluster.
                for (key, tasks) in &slots {
                    if let SlotKey::Node(id) = key
                        && !p.nodes.contains_key(id.as_str())
                    {
                        for t in tasks.iter().filter(|t| is_live(t)) {
                            p.shutdown(t, "node removed");
                        }
                    }
                }
            }
        }
        p.update(svc, &slots, touched);
    }
    p.out
}
