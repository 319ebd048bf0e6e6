//! The scheduler against Swarm's behaviour, with a tiny simulator that applies plans the way the
//! leader and the nodes would (a created task starts running at once unless told otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use shoal_scheduler::*;

fn node(i: u32, role: Role) -> Node {
    Node {
        id: format!("id{i}"),
        hostname: format!("node{i}"),
        role,
        availability: Availability::Active,
        status: NodeStatus::Ready,
        labels: BTreeMap::new(),
    }
}

fn service(id: &str, mode: Mode) -> Service {
    Service {
        id: id.into(),
        spec: ServiceSpec {
            name: id.into(),
            mode,
            constraints: vec![],
            restart: RestartPolicy::default(),
            update_order: UpdateOrder::StopFirst,
            // No watch after a new task runs: the simulator's clock stands still while settling.
            update: UpdatePolicy { monitor_ms: 0, ..UpdatePolicy::default() },
            update_paused: false,
            version: 1,
            host_ports: vec![],
        },
    }
}

struct Sim {
    state: ClusterState,
    now: u64,
    next: u64,
    /// State a newly created task reaches when the nodes act.
    start_as: TaskState,
}

impl Sim {
    fn new(nodes: Vec<Node>, services: Vec<Service>) -> Sim {
        Sim {
            state: ClusterState { nodes, services, tasks: vec![] },
            now: 1_000_000,
            next: 0,
            start_as: TaskState::Running,
        }
    }

    fn apply(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Create { service_id, slot, node_id, spec_version, attempt, port_held } => {
                    self.next += 1;
                    self.state.tasks.push(Task {
                        id: format!("t{:03}", self.next),
                        service_id: service_id.clone(),
                        slot: *slot,
                        node_id: node_id.clone(),
                        spec_version: *spec_version,
                        desired: DesiredState::Running,
                        state: if node_id.is_some() && !port_held {
                            self.start_as
                        } else {
                            TaskState::Pending
                        },
                        state_since_ms: self.now,
                        created_ms: self.now + self.next,
                        attempt: *attempt,
                    });
                }
                Action::Assign { task_id, node_id } => {
                    let t = self.task_mut(task_id);
                    t.node_id = Some(node_id.clone());
                    t.state = TaskState::Running;
                }
                Action::Shutdown { task_id, .. } => {
                    let now = self.now;
                    let t = self.task_mut(task_id);
                    t.desired = DesiredState::Shutdown;
                    if !t.state.is_terminal() {
                        t.state = TaskState::Shutdown;
                        t.state_since_ms = now;
                    }
                }
                Action::Delete { task_id } => self.state.tasks.retain(|t| &t.id != task_id),
            }
        }
    }

    fn task_mut(&mut self, id: &str) -> &mut Task {
        self.state.tasks.iter_mut().find(|t| t.id == id).unwrap()
    }

    /// Plans and applies until nothing is left to do; returns every action taken.
    fn settle(&mut self) -> Vec<Action> {
        let mut all = vec![];
        for _ in 0..50 {
            let p = plan(self.now, &self.state);
            if p.actions.is_empty() {
                return all;
            }
            self.apply(&p.actions);
            all.extend(p.actions);
        }
        panic!("did not converge: {:#?}", self.state);
    }

    fn running_per_node(&self, svc: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in &self.state.tasks {
            if t.service_id == svc
                && t.desired == DesiredState::Running
                && t.state == TaskState::Running
            {
                *m.entry(t.node_id.clone().unwrap()).or_default() += 1;
            }
        }
        m
    }

    fn running(&self, svc: &str) -> usize {
        self.running_per_node(svc).values().sum()
    }

    fn set_replicas(&mut self, svc: &str, n: u64) {
        self.state.services.iter_mut().find(|s| s.id == svc).unwrap().spec.mode =
            Mode::Replicated { replicas: n };
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        self.state.nodes.iter_mut().find(|n| n.id == format!("id{i}")).unwrap()
    }
}

fn three_nodes() -> Vec<Node> {
    vec![node(1, Role::Manager), node(2, Role::Worker), node(3, Role::Worker)]
}

#[test]
fn replicas_spread_one_per_node_then_two_two_one() {
    let mut sim = Sim::new(three_nodes(), vec![service("web", Mode::Replicated { replicas: 3 })]);
    sim.settle();
    assert_eq!(sim.running_per_node("web").values().copied().collect::<Vec<_>>(), [1, 1, 1]);
    sim.set_replicas("web", 5);
    sim.settle();
    let mut counts: Vec<_> = sim.running_per_node("web").values().copied().collect();
    counts.sort();
    assert_eq!(counts, [1, 2, 2]);
    // Spread also counts other services' tasks: a new service prefers the emptiest node.
    sim.state.services.push(service("db", Mode::Replicated { replicas: 1 }));
    sim.settle();
    let db_node = sim.running_per_node("db").into_keys().next().unwrap();
    let web = sim.running_per_node("web");
    assert_eq!(web[&db_node], 1, "db goes where web has fewest tasks");
}

#[test]
fn scale_down_stops_the_highest_slots() {
    let mut sim = Sim::new(three_nodes(), vec![service("web", Mode::Replicated { replicas: 5 })]);
    sim.settle();
    sim.set_replicas("web", 2);
    let slot_of: BTreeMap<String, u64> =
        sim.state.tasks.iter().map(|t| (t.id.clone(), t.slot)).collect();
    let actions = sim.settle();
    let stopped: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Shutdown { task_id, reason: "scaled down" } => Some(slot_of[task_id]),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, [3, 4, 5]);
    assert!(
        sim.state.tasks.iter().all(|t| t.slot <= 2),
        "scaled-away slots are forgotten once stopped"
    );
    assert_eq!(sim.running("web"), 2);
}

#[test]
fn drain_moves_tasks_pause_keeps_them_and_down_moves_them() {
    let mut sim = Sim::new(three_nodes(), vec![service("web", Mode::Replicated { replicas: 5 })]);
    sim.settle();
    sim.node_mut(1).availability = Availability::Drain;
    sim.settle();
    assert_eq!(sim.running("web"), 5);
    assert!(!sim.running_per_node("web").contains_key("id1"), "drained node keeps nothing");

    sim.node_mut(1).availability = Availability::Active;
    sim.node_mut(2).availability = Availability::Pause;
    let before = sim.running_per_node("web");
    assert!(sim.settle().is_empty(), "active again or paused: nothing moves by itself");
    assert_eq!(sim.running_per_node("web"), before);
    sim.set_replicas("web", 7);
    sim.settle();
    assert_eq!(
        sim.running_per_node("web")["id2"],
        before["id2"],
        "a paused node takes no new task"
    );

    sim.node_mut(3).status = NodeStatus::Down;
    sim.settle();
    assert_eq!(sim.running("web"), 7);
    assert!(!sim.running_per_node("web").contains_key("id3"));
}

#[test]
fn constraints_place_and_pending_tasks_wait_for_a_fitting_node() {
    let mut svc = service("mgmt", Mode::Replicated { replicas: 2 });
    svc.spec.constraints = vec!["node.labels.zone==b".parse().unwrap()];
    let mut sim = Sim::new(three_nodes(), vec![svc]);
    let actions = sim.settle();
    assert!(
        actions.iter().all(|a| matches!(a, Action::Create { node_id: None, .. })),
        "{actions:?}"
    );
    assert_eq!(sim.running("mgmt"), 0);
    sim.node_mut(2).labels.insert("zone".into(), "b".into());
    sim.settle();
    assert_eq!(
        sim.running_per_node("mgmt").into_iter().collect::<Vec<_>>(),
        [("id2".to_string(), 2)]
    );
    // The label goes away: the tasks cannot stay, and wait again.
    sim.node_mut(2).labels.clear();
    sim.settle();
    assert_eq!(sim.running("mgmt"), 0);
}

#[test]
fn restart_policy_delay_conditions_and_attempts() {
    let mut sim = Sim::new(three_nodes(), vec![service("job", Mode::Replicated { replicas: 1 })]);
    sim.settle();
    let id = sim.state.tasks[0].id.clone();
    let now = sim.now;
    let t = sim.task_mut(&id);
    t.state = TaskState::Failed;
    t.state_since_ms = now;
    let p = plan(now + 1_000, &sim.state);
    assert!(p.actions.is_empty());
    assert_eq!(p.wake_at, Some(now + 5_000), "restart after the 5 s delay");
    sim.now = now + 5_000;
    let actions = sim.settle();
    assert!(matches!(&actions[0], Action::Shutdown { reason: "restarting", .. }));
    assert!(matches!(&actions[1], Action::Create { slot: 1, attempt: 1, .. }));
    assert_eq!(sim.running("job"), 1);

    // on-failure does not restart a task that completed; none restarts nothing.
    for (cond, end, restarts) in [
        (RestartCondition::OnFailure, TaskState::Complete, false),
        (RestartCondition::OnFailure, TaskState::Failed, true),
        (RestartCondition::None, TaskState::Failed, false),
    ] {
        let mut s = service("x", Mode::Replicated { replicas: 1 });
        s.spec.restart.condition = cond;
        let mut sim = Sim::new(three_nodes(), vec![s]);
        sim.settle();
        let id = sim.state.tasks[0].id.clone();
        sim.task_mut(&id).state = end;
        sim.now += 60_000;
        assert_eq!(!sim.settle().is_empty(), restarts, "{cond:?} {end:?}");
    }

    let mut s = service("x", Mode::Replicated { replicas: 1 });
    s.spec.restart.max_attempts = 2;
    let mut sim = Sim::new(three_nodes(), vec![s]);
    sim.settle();
    for _ in 0..4 {
        let live =
            sim.state.tasks.iter().find(|t| t.desired == DesiredState::Running).unwrap().id.clone();
        sim.task_mut(&live).state = TaskState::Failed;
        sim.now += 60_000;
        sim.settle();
    }
    assert_eq!(sim.state.tasks.len(), 3, "the first run and two restarts, then no more");
}

#[test]
fn history_keeps_five_dead_tasks_per_slot() {
    let mut sim = Sim::new(three_nodes(), vec![service("flaky", Mode::Replicated { replicas: 1 })]);
    sim.settle();
    for _ in 0..9 {
        let live =
            sim.state.tasks.iter().find(|t| t.desired == DesiredState::Running).unwrap().id.clone();
        sim.task_mut(&live).state = TaskState::Failed;
        sim.now += 10_000;
        sim.settle();
    }
    let dead = sim.state.tasks.iter().filter(|t| t.desired == DesiredState::Shutdown).count();
    assert_eq!(dead, HISTORY_PER_SLOT);
    assert_eq!(sim.running("flaky"), 1);
}

#[test]
fn rolling_update_one_at_a_time_stop_first_and_start_first() {
    for order in [UpdateOrder::StopFirst, UpdateOrder::StartFirst] {
        let mut s = service("web", Mode::Replicated { replicas: 3 });
        s.spec.update_order = order;
        let mut sim = Sim::new(three_nodes(), vec![s]);
        sim.settle();
        sim.state.services[0].spec.version = 2;
        sim.start_as = TaskState::Starting;
        let first = plan(sim.now, &sim.state);
        let creates = first
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Create { spec_version: 2, .. }))
            .count();
        let stops = first.actions.iter().filter(|a| matches!(a, Action::Shutdown { .. })).count();
        assert_eq!(creates, 1, "{order:?}: one task at a time");
        assert_eq!(stops, usize::from(order == UpdateOrder::StopFirst), "{order:?}");
        sim.apply(&first.actions);
        assert!(
            plan(sim.now, &sim.state).actions.is_empty(),
            "{order:?}: waits while the new task starts"
        );
        // The nodes bring new tasks up; the update walks through every slot.
        sim.start_as = TaskState::Running;
        for t in sim.state.tasks.iter_mut().filter(|t| t.state == TaskState::Starting) {
            t.state = TaskState::Running;
        }
        sim.settle();
        let live: Vec<_> =
            sim.state.tasks.iter().filter(|t| t.desired == DesiredState::Running).collect();
        assert_eq!(live.len(), 3, "{order:?}");
        assert!(
            live.iter().all(|t| t.spec_version == 2 && t.state == TaskState::Running),
            "{order:?}"
        );
    }
}

#[test]
fn an_update_never_takes_down_a_slot_while_another_is_down() {
    let mut sim = Sim::new(three_nodes(), vec![service("web", Mode::Replicated { replicas: 2 })]);
    sim.settle();
    // Slot 1's task died and waits out its restart delay.
    let now = sim.now;
    let t = sim.state.tasks.iter_mut().find(|t| t.slot == 1).unwrap();
    t.state = TaskState::Failed;
    t.state_since_ms = now;
    sim.state.services[0].spec.version = 2;
    let p = plan(sim.now, &sim.state);
    assert!(
        !p.actions.iter().any(|a| matches!(a, Action::Shutdown { .. })),
        "slot 2 keeps serving while slot 1 serves nothing: {p:?}"
    );
    // Once slot 1 runs again (its restart is of the new version), slot 2 is updated.
    sim.now += RestartPolicy::default().delay_ms;
    sim.settle();
    assert!(
        sim.state
            .tasks
            .iter()
            .filter(|t| t.desired == DesiredState::Running)
            .all(|t| t.spec_version == 2 && t.state == TaskState::Running)
    );
}

#[test]
fn a_new_task_is_watched_for_the_monitor_period_before_the_next() {
    let mut s = service("web", Mode::Replicated { replicas: 2 });
    s.spec.update.monitor_ms = 5_000;
    let mut sim = Sim::new(three_nodes(), vec![s]);
    sim.settle();
    sim.state.services[0].spec.version = 2;
    let first = plan(sim.now, &sim.state);
    assert_eq!(new_creates(&first), 1);
    sim.apply(&first.actions);
    let watching = plan(sim.now + 4_999, &sim.state);
    assert!(watching.actions.is_empty(), "the new task runs, but is watched: {watching:?}");
    assert_eq!(watching.wake_at, Some(sim.now + 5_000), "wakes when the watch ends");
    assert_eq!(new_creates(&plan(sim.now + 5_000, &sim.state)), 1);
}

/// New tasks of version 2 that one plan creates.
fn new_creates(p: &Plan) -> usize {
    p.actions.iter().filter(|a| matches!(a, Action::Create { spec_version: 2, .. })).count()
}

#[test]
fn rolling_update_parallelism_and_delay() {
    for (parallelism, batch) in [(2, 2), (0, 5)] {
        let mut s = service("web", Mode::Replicated { replicas: 5 });
        s.spec.update = UpdatePolicy { parallelism, delay_ms: 0, monitor_ms: 0 };
        let mut sim = Sim::new(three_nodes(), vec![s]);
        sim.settle();
        sim.state.services[0].spec.version = 2;
        sim.start_as = TaskState::Starting;
        let first = plan(sim.now, &sim.state);
        assert_eq!(new_creates(&first), batch, "parallelism {parallelism}");
        sim.apply(&first.actions);
        assert!(plan(sim.now, &sim.state).actions.is_empty(), "the batch is in flight");
        // One of the batch runs: its place goes to the next outdated slot at once.
        if let Some(t) = sim.state.tasks.iter_mut().find(|t| t.state == TaskState::Starting) {
            t.state = TaskState::Running;
        }
        let next = plan(sim.now, &sim.state);
        assert_eq!(new_creates(&next), usize::from(parallelism == 2), "a sliding window");
    }

    // A delay: the next task is replaced only `delay` after the last new one runs.
    let mut s = service("web", Mode::Replicated { replicas: 3 });
    s.spec.update = UpdatePolicy { parallelism: 1, delay_ms: 10_000, monitor_ms: 0 };
    let mut sim = Sim::new(three_nodes(), vec![s]);
    sim.settle();
    sim.state.services[0].spec.version = 2;
    let first = plan(sim.now, &sim.state);
    assert_eq!(new_creates(&first), 1, "the first batch goes at once");
    sim.apply(&first.actions);
    let waiting = plan(sim.now + 9_999, &sim.state);
    assert!(waiting.actions.is_empty(), "{waiting:?}");
    assert_eq!(waiting.wake_at, Some(sim.now + 10_000), "wakes when the delay ends");
    sim.now += 10_000;
    assert_eq!(new_creates(&plan(sim.now, &sim.state)), 1);
}

#[test]
fn global_services_run_once_per_eligible_node() {
    let mut sim = Sim::new(three_nodes(), vec![service("agent", Mode::Global)]);
    sim.settle();
    assert_eq!(sim.running_per_node("agent").len(), 3);
    sim.state.nodes.push(node(4, Role::Worker));
    sim.settle();
    assert_eq!(sim.running_per_node("agent").len(), 4);
    sim.node_mut(2).availability = Availability::Drain;
    sim.settle();
    assert!(!sim.running_per_node("agent").contains_key("id2"));
    assert_eq!(sim.running("agent"), 3);
    let mut m = service("mon", Mode::Global);
    m.spec.constraints = vec!["node.role==manager".parse().unwrap()];
    sim.state.services.push(m);
    sim.settle();
    assert_eq!(sim.running_per_node("mon").into_keys().collect::<Vec<_>>(), ["id1"]);
}

#[test]
fn removed_service_stops_then_forgets_its_tasks() {
    let mut sim = Sim::new(three_nodes(), vec![service("web", Mode::Replicated { replicas: 3 })]);
    sim.settle();
    sim.state.services.clear();
    sim.settle();
    assert!(sim.state.tasks.is_empty(), "{:?}", sim.state.tasks);
}

proptest! {
    /// From any mix of nodes (roles, availability, status) and services, planning converges; then
    /// every live task sits on a node it may stay on, and each replicated service has as many live
    /// tasks as it wants, all placed whenever some node takes tasks.
    #[test]
    fn converges_places_validly_and_spreads(
        nodes in proptest::collection::vec((any::<bool>(), 0u8..3, any::<bool>()), 1..7),
        replicas in proptest::collection::vec(0u64..9, 1..4),
        churn in proptest::collection::vec((0usize..7, 0u8..3), 0..4),
    ) {
        let nodes: Vec<Node> = nodes.iter().enumerate().map(|(i, (mgr, av, up))| {
            let mut n = node(i as u32 + 1, if *mgr { Role::Manager } else { Role::Worker });
            n.availability = [Availability::Active, Availability::Pause, Availability::Drain][usize::from(*av)];
            n.status = if *up { NodeStatus::Ready } else { NodeStatus::Down };
            n
        }).collect();
        let services: Vec<Service> = replicas.iter().enumerate()
            .map(|(i, r)| service(&format!("s{i}"), Mode::Replicated { replicas: *r })).collect();
        let mut sim = Sim::new(nodes, services);
        sim.settle();
        for (i, av) in churn {
            if let Some(n) = sim.state.nodes.get_mut(i) {
                n.availability = [Availability::Active, Availability::Pause, Availability::Drain][usize::from(av)];
            }
            sim.settle();
        }
        let takers: Vec<String> = sim.state.nodes.iter()
            .filter(|n| n.status == NodeStatus::Ready && n.availability == Availability::Active)
            .map(|n| n.id.clone()).collect();
        let nodes: BTreeMap<String, Node> = sim.state.nodes.iter().map(|n| (n.id.clone(), n.clone())).collect();
        for t in sim.state.tasks.iter().filter(|t| t.desired == DesiredState::Running) {
            if let Some(n) = &t.node_id {
                let n = &nodes[n];
                prop_assert!(n.status == NodeStatus::Ready && n.availability != Availability::Drain);
            }
        }
        for (i, r) in replicas.iter().enumerate() {
            let svc = format!("s{i}");
            let live = sim.state.tasks.iter().filter(|t| t.service_id == svc && t.desired == DesiredState::Running).count();
            prop_assert_eq!(live as u64, *r);
            if !takers.is_empty() {
                prop_assert!(sim.state.tasks.iter().filter(|t| t.service_id == svc && t.desired == DesiredState::Running).all(|t| t.node_id.is_some()));
            }
        }
    }
}

#[test]
fn a_host_mode_port_holds_its_node_and_the_extra_task_waits_with_dockers_message() {
    let mut svc = service("edge", Mode::Replicated { replicas: 4 });
    svc.spec.host_ports = vec![HostPort { port: 8300, udp: false }];
    // Another service on the same port number, but UDP: no conflict.
    let mut other = service("dns", Mode::Replicated { replicas: 3 });
    other.spec.host_ports = vec![HostPort { port: 8300, udp: true }];
    let mut sim = Sim::new(three_nodes(), vec![svc, other]);
    sim.settle();
    assert_eq!(sim.running_per_node("edge").values().copied().collect::<Vec<_>>(), [1, 1, 1]);
    assert_eq!(sim.running("dns"), 3);
    let pending: Vec<&Task> = sim
        .state
        .tasks
        .iter()
        .filter(|t| t.service_id == "edge" && t.state == TaskState::Pending)
        .collect();
    assert_eq!(pending.len(), 1, "{:#?}", sim.state.tasks);
    let p = plan(sim.now, &sim.state);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(
        p.pending.get("edge").map(String::as_str),
        Some("no suitable node (host-mode port already in use on 3 nodes)")
    );
    // A fourth node takes the waiting task.
    sim.state.nodes.push(node(4, Role::Worker));
    sim.settle();
    assert_eq!(sim.running_per_node("edge").len(), 4);
}

#[test]
fn a_global_host_mode_task_waits_on_a_node_whose_port_another_service_holds() {
    let mut edge = service("edge", Mode::Global);
    edge.spec.host_ports = vec![HostPort { port: 8300, udp: false }];
    // A replicated service already holds tcp/8300 on one node.
    let mut web = service("web", Mode::Replicated { replicas: 1 });
    web.spec.host_ports = vec![HostPort { port: 8300, udp: false }];
    let mut sim = Sim::new(three_nodes(), vec![web]);
    sim.settle();
    let held_on = sim.running_per_node("web").into_keys().next().unwrap();
    sim.state.services.push(edge);
    sim.settle();

    // One task per node; the one on the held node is pending there with swarmkit's message.
    let edge_tasks: Vec<&Task> =
        sim.state.tasks.iter().filter(|t| t.service_id == "edge").collect();
    assert_eq!(edge_tasks.len(), 3, "{edge_tasks:#?}");
    let running = sim.running_per_node("edge");
    assert_eq!(running.len(), 2);
    assert!(!running.contains_key(&held_on), "edge runs beside web's port: {running:?}");
    let waiting: Vec<Task> =
        edge_tasks.iter().filter(|t| t.state == TaskState::Pending).map(|t| (*t).clone()).collect();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].node_id.as_deref(), Some(held_on.as_str()));
    let p = plan(sim.now, &sim.state);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(
        p.pending.get("edge").map(String::as_str),
        Some("no suitable node (host-mode port already in use on 1 node)")
    );

    // The same port over UDP, or another port, is no conflict.
    let mut dns = service("dns", Mode::Global);
    dns.spec.host_ports = vec![HostPort { port: 8300, udp: true }];
    sim.state.services.push(dns);
    sim.settle();
    assert_eq!(sim.running_per_node("dns").len(), 3);

    // Once web is gone the waiting task is placed on its own node, and nothing else moves.
    sim.state.services.retain(|s| s.id != "web");
    let actions = sim.settle();
    assert!(
        actions
            .contains(&Action::Assign { task_id: waiting[0].id.clone(), node_id: held_on.clone() }),
        "{actions:?}"
    );
    assert_eq!(sim.running_per_node("edge").len(), 3);
    assert_eq!(sim.state.tasks.iter().filter(|t| t.service_id == "edge").count(), 3);
}

#[test]
fn a_global_host_mode_task_restarting_does_not_wait_on_its_own_port() {
    let mut edge = service("edge", Mode::Global);
    edge.spec.host_ports = vec![HostPort { port: 8300, udp: false }];
    let mut sim = Sim::new(three_nodes(), vec![edge]);
    sim.settle();
    assert_eq!(sim.running_per_node("edge").len(), 3);
    // A task dies: its replacement takes the port its predecessor held.
    let dead = sim.state.tasks[0].id.clone();
    sim.task_mut(&dead).state = TaskState::Failed;
    sim.now += 60_000;
    sim.settle();
    assert_eq!(sim.running_per_node("edge").len(), 3);
    assert!(plan(sim.now, &sim.state).pending.is_empty());
}
