//! The watch's fan-out on a simulated swarm of 100 nodes, 500 services and 5,000 tasks
//! (criterion): what one single-task change costs the leader (apply it, log it, and answer all
//! 100 nodes with their encoded deltas: one pass), and, printed once, the bytes a worker receives
//! for it against the full copy it would otherwise get. Goals: a pass under 50 ms, a worker's
//! delta under 2 KiB. `cargo bench -p shoal-cluster --bench watch`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use shoal_cluster::model::{ClusterState, Command, TaskReport};
use shoal_cluster::simulated::{self, node_id};
use shoal_cluster::watch::{ChangeLog, Mirror, Placement, Position, Reader, Slot, delta};
use shoal_cluster::wire::encode_frame;

const NODES: usize = 100;
const SERVICES: usize = 500;
const TASKS: usize = 5000;
const NETWORKS: usize = 20;

/// The simulated store at its revision, and every node's position (caught up).
struct Swarm {
    state: ClusterState,
    revision: u64,
    log: ChangeLog,
    positions: Vec<(Reader, Position)>,
}

fn swarm() -> Swarm {
    let mut state = ClusterState::default();
    let mut log = ChangeLog::new(0);
    let mut revision = 0;
    for c in simulated::swarm(NODES, SERVICES, TASKS, NETWORKS) {
        revision += 1;
        state.apply(&c, 1).expect("simulated command");
        log.record(revision, Slot::touched_by(&c));
    }
    let placement = Placement::of(&state);
    let positions = (1..=NODES)
        .map(|i| {
            let me = node_id(i);
            let reader = if i == 1 { Reader::Manager } else { Reader::Worker(me) };
            let mut m = Mirror::default();
            m.apply(delta(&state, revision, &log, &placement, reader, &m.position(me)))
                .expect("copy");
            (reader, m.position(me))
        })
        .collect();
    Swarm { state, revision, log, positions }
}

/// A report on one task, from the node that runs it.
fn report(s: &ClusterState, n: usize) -> Command {
    let key = simulated::task(n / 10, n % 10 + 1, node_id(1), NETWORKS).task.id;
    let owner = s.tasks[&key].task.node_id.as_deref().and_then(|o| o.parse().ok()).expect("owner");
    let report = TaskReport {
        state: shoal_scheduler::TaskState::Failed,
        state_since_ms: None,
        exit_code: Some(1),
        health: None,
        message: Some(format!("exit status {n}")),
    };
    Command::ReportTask { owner, key, report }
}

/// One leader pass for one change: apply and log it, then encode every node's answer.
fn pass(s: &mut Swarm, cmd: &Command) -> usize {
    s.revision += 1;
    s.state.apply(cmd, 1).expect("report");
    s.log.record(s.revision, Slot::touched_by(cmd));
    // Built once per revision, as the state machine caches it.
    let placement = Placement::of(&s.state);
    let mut bytes = 0;
    for (reader, pos) in &mut s.positions {
        bytes += encode_frame(&delta(&s.state, s.revision, &s.log, &placement, *reader, pos)).len();
        // The node applied it and asks from there next time.
        pos.revision = s.revision;
    }
    bytes
}

fn fan_out(c: &mut Criterion) {
    let base = swarm();
    let worker = base.positions[49].clone();
    let copy = encode_frame(&delta(
        &base.state,
        base.revision,
        &base.log,
        &Placement::of(&base.state),
        worker.0,
        &Position::default(),
    ));
    {
        let mut s = swarm();
        let cmd = report(&s.state, 1234);
        let total = pass(&mut s, &cmd);
        let one = encode_frame(&delta(
            &s.state,
            s.revision,
            &s.log,
            &Placement::of(&s.state),
            worker.0,
            &worker.1,
        ))
        .len();
        println!(
            "watch/fan-out: a worker receives {one} B per single-task change (goal <= 2048 B; a \
             full copy is {} B); all {NODES} nodes together {total} B",
            copy.len()
        );
    }
    let mut g = c.benchmark_group("watch/fan-out 100 nodes, 500 services, 5000 tasks");
    g.sample_size(20);
    let mut s = swarm();
    let mut n = 0;
    g.bench_function("leader pass: apply one task report, answer 100 nodes", |b| {
        b.iter(|| {
            n = (n + 7) % TASKS;
            let cmd = report(&s.state, n);
            black_box(pass(&mut s, &cmd))
        })
    });
    g.bench_function("full copy for one worker (a resync)", |b| {
        b.iter(|| {
            encode_frame(&delta(
                &base.state,
                base.revision,
                &base.log,
                &Placement::of(&base.state),
                worker.0,
                &Position::default(),
            ))
            .len()
        })
    });
    g.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
