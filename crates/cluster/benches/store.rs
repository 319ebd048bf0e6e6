//! The Raft state machine on redb with a simulated swarm of 100 nodes, 500 services and 5,000
//! tasks (criterion): what one applied single-task batch costs (time, and, printed once, the
//! bytes the process writes for it), the same for a task the store gives an address, and what a
//! copy of the whole store costs (what `Cluster::store`, the State request and a node's resync
//! start from); and the address pick alone, applied in memory.
//! `cargo bench -p shoal-cluster --bench store`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use shoal_cluster::model::{Command, Keyring, TaskRecord, TaskReport};
use shoal_cluster::raft::{StateMachine, TypeConfig, open_db};
use shoal_cluster::simulated::{self, node_id};
use tokio::sync::{broadcast, watch};

const NODES: usize = 100;
const SERVICES: usize = 500;
const TASKS: usize = 5000;
const NETWORKS: usize = 20;

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

/// Task `n` as the swarm holds it (tasks go round-robin over the nodes).
fn task(n: usize) -> TaskRecord {
    let per_service = TASKS / SERVICES;
    simulated::task(n / per_service, n % per_service + 1, node_id(n % NODES + 1), NETWORKS)
}

/// One of the first 200 tasks written again without its address, as the leader writes a task to
/// start: the store picks one (the old record's is held until this one replaces it). Few enough
/// that the picks stay inside the networks' /24s however many rounds run.
fn restart(n: usize) -> Command {
    let mut t = task(n % 200);
    t.addresses.clear();
    Command::PutTask(Box::new(t))
}

/// A report on task `n`, from the node that runs it.
fn report(n: usize) -> Command {
    let t = task(n);
    let report = TaskReport {
        state: shoal_scheduler::TaskState::Failed,
        state_since_ms: None,
        exit_code: Some(1),
        health: None,
        message: Some(format!("exit status {n}")),
    };
    Command::ReportTask { owner: node_id(n % NODES + 1), key: t.task.id, report }
}

/// Bytes this process has handed to `write`-family calls so far (Linux's `wchar`).
fn written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok())
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let (ev, _) = broadcast::channel(16);
    let (kr, _) = watch::channel(Keyring::default());
    let mut sm = StateMachine::open(open_db(&dir.path().join("raft.redb")).expect("db"), ev, kr)
        .expect("state machine");
    let mut index = 0;
    let batch: Vec<_> = simulated::swarm(NODES, SERVICES, TASKS, NETWORKS)
        .into_iter()
        .map(|cmd| {
            index += 1;
            entry(index, cmd)
        })
        .collect();
    rt.block_on(sm.apply(batch)).expect("swarm");

    let mut n = 0;
    let mut one = |sm: &mut StateMachine, cmd: fn(usize) -> Command| {
        n = (n + 7) % TASKS;
        index += 1;
        let res = rt.block_on(sm.apply([entry(index, cmd(n))])).expect("apply");
        assert!(res[0].error.is_none(), "{:?}", res[0].error);
    };
    const ROUNDS: u64 = 50;
    if let Some(before) = written() {
        for _ in 0..ROUNDS {
            one(&mut sm, report);
        }
        let per = written().map_or(0, |after| (after - before) / ROUNDS);
        println!(
            "store/apply: one single-task batch writes {per} B (the store holds {TASKS} tasks, \
             {SERVICES} services)"
        );
    }

    let mut g = c.benchmark_group("store 100 nodes, 500 services, 5000 tasks");
    g.sample_size(20);
    g.bench_function("apply one single-task batch (redb commit)", |b| {
        b.iter(|| one(&mut sm, report))
    });
    g.bench_function("apply one task that gets an address (redb commit)", |b| {
        b.iter(|| one(&mut sm, restart))
    });
    g.bench_function("copy of the whole store", |b| b.iter(|| black_box(sm.state())));
    // The pick alone: the same writes applied to a copy of the state, without redb.
    let mut state = sm.state();
    let restarts: Vec<Command> = (0..200).map(restart).collect();
    let mut k = 0;
    g.bench_function("apply one task that gets an address (in memory)", |b| {
        b.iter(|| {
            k = (k + 7) % restarts.len();
            state.apply(&restarts[k], 1).expect("apply")
        })
    });
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
