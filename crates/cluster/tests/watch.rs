//! The per-node watch without a network: a store applies commands and logs what they changed,
//! nodes follow it with deltas from their positions, and what they hold is compared with what
//! they may see of the store.

use proptest::prelude::*;
use shoal_cluster::NodeId;
use shoal_cluster::model::{ClusterState, Command, NodeStatus, Role, TaskReport};
use shoal_cluster::simulated::{self, CA_KEY, ENV_SECRET, WORKER_SECRET, node_id};
use shoal_cluster::watch::{
    ChangeLog, Delta, DeltaBody, LOG_CAPACITY, Mirror, Placement, Reader, Slot, delta, view,
    whole_services,
};

/// A store that logs what each revision changed, as the Raft state machine does.
struct Store {
    state: ClusterState,
    revision: u64,
    log: ChangeLog,
}

impl Store {
    fn new(capacity: usize) -> Store {
        Store {
            state: ClusterState::default(),
            revision: 0,
            log: ChangeLog::with_capacity(0, capacity),
        }
    }

    /// One revision per command, refused ones included (as Raft log entries are).
    fn apply(&mut self, cmd: &Command) {
        self.revision += 1;
        if self.state.apply(cmd, 1).is_ok() {
            self.log.record(self.revision, Slot::touched_by(cmd));
        }
    }

    fn answer(&self, reader: Reader, m: &Mirror, me: NodeId) -> Delta {
        delta(
            &self.state,
            self.revision,
            &self.log,
            &Placement::of(&self.state),
            reader,
            &m.position(me),
        )
    }
}

/// Asserts that nothing worker `me` received holds a secret only managers may read, or the
/// environment of a service it runs no task of (simulated service `i` has `{ENV_SECRET}-{i}-`).
fn no_secrets(d: &Delta, s: &ClusterState, me: NodeId) {
    let text = serde_json::to_string(d).expect("json");
    assert!(!text.contains("SIMULATED-CA-KEY"), "the CA key reached a worker");
    let secret = serde_json::to_string(&WORKER_SECRET).expect("json");
    assert!(!text.contains(&secret[1..secret.len() - 1]), "a join secret reached a worker");
    let whole = whole_services(s, me);
    for i in 0..600 {
        if !whole.contains(&format!("svc{i:05}")) {
            let env = format!("{ENV_SECRET}-{i}-");
            assert!(!text.contains(&env), "service {i}'s environment reached worker {me}");
        }
    }
}

const NODES: usize = 4;
const NETWORKS: usize = 3;

/// One random change to a small swarm: (what, which service or task, which node).
fn command((what, i, n): (u8, usize, usize)) -> Command {
    let node = node_id(n % NODES + 1);
    match what % 7 {
        0 => Command::PutService(Box::new(simulated::service(i % 6, NETWORKS))),
        1 | 2 => Command::PutTask(Box::new(simulated::task(i % 6, i % 3 + 1, node, NETWORKS))),
        3 => Command::RemoveTask(format!("task{:05}x{:02}", i % 6, i % 3 + 1)),
        4 => Command::RemoveService(format!("svc{:05}", i % 6)),
        5 => Command::SetStatus {
            id: node,
            status: if i % 2 == 0 { NodeStatus::Down } else { NodeStatus::Ready },
            message: format!("step {i}"),
        },
        _ => Command::SetJoinSecret { role: Role::Worker, secret: [i as u8; 16] },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Deltas applied in order leave every follower (two workers and a manager) with exactly
    /// what it may see of the store, whether it polls after each change or now and then, and
    /// whether or not it falls behind a short log.
    #[test]
    fn deltas_applied_in_order_equal_the_view_of_the_store(
        steps in proptest::collection::vec((any::<u8>(), 0usize..12, 0usize..NODES, any::<bool>()), 1..60),
        capacity in prop_oneof![Just(3usize), Just(1024usize)],
    ) {
        let mut store = Store::new(capacity);
        for c in simulated::bootstrap(NODES, NETWORKS) {
            store.apply(&c);
        }
        let readers = [(Reader::Worker(node_id(2)), node_id(2)), (Reader::Worker(node_id(3)), node_id(3)), (Reader::Manager, node_id(1))];
        let mut mirrors: Vec<Mirror> = readers.iter().map(|_| Mirror::default()).collect();
        for (what, i, n, poll) in steps {
            store.apply(&command((what, i, n)));
            if !poll {
                continue;
            }
            for ((reader, me), m) in readers.iter().zip(mirrors.iter_mut()) {
                let d = store.answer(*reader, m, *me);
                if let Reader::Worker(_) = reader {
                    no_secrets(&d, &store.state, *me);
                }
                m.apply(d).expect("apply");
                prop_assert_eq!(m.revision(), store.revision);
                prop_assert_eq!(m.state(), &view(store.state.clone(), *reader));
            }
        }
    }
}

#[test]
fn a_follower_behind_the_log_resyncs_and_then_gets_changes_again() {
    let mut store = Store::new(4);
    for c in simulated::swarm(5, 6, 12, 3) {
        store.apply(&c);
    }
    let me = node_id(2);
    let reader = Reader::Worker(me);
    let mut m = Mirror::default();
    let first = store.answer(reader, &m, me);
    assert!(matches!(first.body, DeltaBody::Resync(_)), "a new follower starts from a copy");
    m.apply(first).expect("apply");

    // Ten changes to node records: more than the log keeps.
    for i in 0..10 {
        let status = if i % 2 == 0 { NodeStatus::Down } else { NodeStatus::Ready };
        store.apply(&Command::SetStatus { id: node_id(3), status, message: format!("{i}") });
    }
    let behind = store.answer(reader, &m, me);
    assert!(matches!(behind.body, DeltaBody::Resync(_)), "{:?}", behind.body);
    m.apply(behind).expect("apply");
    assert_eq!(m.state(), &view(store.state.clone(), reader));

    // Within the log again: only the one changed entry comes.
    store.apply(&Command::SetStatus {
        id: node_id(4),
        status: NodeStatus::Down,
        message: "x".into(),
    });
    let d = store.answer(reader, &m, me);
    let DeltaBody::Changes(changes) = &d.body else { panic!("expected changes, got {:?}", d.body) };
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].slot, Slot::Node(node_id(4)));
    m.apply(d).expect("apply");
    assert_eq!(m.state(), &view(store.state.clone(), reader));

    // A node that says it was served as a manager is answered with a copy as a worker.
    let mut lying = m.position(me);
    lying.role = Some(Role::Manager);
    let d = delta(
        &store.state,
        store.revision,
        &store.log,
        &Placement::of(&store.state),
        reader,
        &lying,
    );
    assert!(matches!(d.body, DeltaBody::Resync(_)) && d.role == Role::Worker);
}

#[test]
fn a_worker_sees_a_service_whole_only_while_it_runs_one_of_its_tasks() {
    let mut store = Store::new(1024);
    for c in simulated::swarm(3, 2, 2, 2) {
        store.apply(&c);
    }
    // Task 0 of svc00000 is on node 1, task 1 of svc00001 on node 2.
    let me = node_id(3);
    let reader = Reader::Worker(me);
    let mut m = Mirror::default();
    m.apply(store.answer(reader, &m, me)).expect("apply");
    let env = |m: &Mirror| m.state().services["svc00000"].env.clone();
    assert_eq!(env(&m), []);

    let moved = simulated::task(0, 1, me, 2);
    store.apply(&Command::PutTask(Box::new(moved)));
    m.apply(store.answer(reader, &m, me)).expect("apply");
    assert!(env(&m).iter().any(|(_, v)| v.contains(ENV_SECRET)), "its task's service comes whole");

    let away = simulated::task(0, 1, node_id(1), 2);
    store.apply(&Command::PutTask(Box::new(away)));
    let d = store.answer(reader, &m, me);
    no_secrets(&d, &store.state, me);
    m.apply(d).expect("apply");
    assert_eq!(env(&m), [], "and blanked again once the task left");
    assert_eq!(m.state(), &view(store.state.clone(), reader));
    assert!(!serde_json::to_string(m.state()).expect("json").contains(CA_KEY));
}

/// The scale goal: on a simulated 100 nodes, 500 services and 5,000 tasks, a worker receives
/// at most 2 KiB for a change to one task (the benchmark `watch` reports the figure).
#[test]
fn a_single_task_change_costs_a_worker_under_2_kib() {
    let mut store = Store::new(LOG_CAPACITY);
    for c in simulated::swarm(100, 500, 5000, 20) {
        store.apply(&c);
    }
    let me = node_id(50);
    let reader = Reader::Worker(me);
    let mut m = Mirror::default();
    let copy = store.answer(reader, &m, me);
    let copy_bytes = serde_json::to_vec(&copy).expect("json").len();
    m.apply(copy).expect("apply");

    // Another node's task changes state.
    let report: TaskReport =
        serde_json::from_value(serde_json::json!({"state": "failed", "message": "exit status 1"}))
            .expect("report");
    let key = simulated::task(6, 1, me, 20).task.id;
    let owner: NodeId = store.state.tasks[&key]
        .task
        .node_id
        .as_deref()
        .and_then(|n| n.parse().ok())
        .expect("owner");
    assert_ne!(owner, me);
    store.apply(&Command::ReportTask { owner, key: key.clone(), report });
    let d = store.answer(reader, &m, me);
    let DeltaBody::Changes(changes) = &d.body else { panic!("expected changes") };
    assert_eq!(changes.iter().map(|c| &c.slot).collect::<Vec<_>>(), [&Slot::Task(key)]);
    let bytes = serde_json::to_vec(&d).expect("json").len();
    eprintln!("worker receives {bytes} B per single-task change (a full copy is {copy_bytes} B)");
    assert!(bytes <= 2048, "{bytes} B per single-task change");
    m.apply(d).expect("apply");
    assert_eq!(m.state(), &view(store.state.clone(), reader));
}
