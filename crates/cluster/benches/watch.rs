//! The watch's fan-out on a simulated swarm of 100 nodes, 500 services and 5,000 tasks: what one
//! single-task change costs. Two figures, each against its goal:
//!
//! - the bytes a node receives for the change: the largest encoded delta any of the 100 nodes
//!   is answered with (goal: at most 2 KiB);
//! - a leader pass: apply and log the change, then answer all 100 nodes with their encoded
//!   deltas (goal: under 50 ms).
//!
//! Each round makes `PASSES` changes (a task report each, on tasks spread over the swarm) after
//! a warm-up round; a round's figures are the largest delta of its changes and its median pass.
//! The full copy one worker would otherwise receive is printed beside them.
//!
//! ```text
//! cargo bench -p shoal-cluster --bench watch [-- --quick] [--rounds N] [--out FILE]
//! ```
//!
//! With `--out FILE` the rows go to benches/common's JSON report, for the suite's `fanout`
//! section (`cargo bench -p shoal --bench system -- --only fanout`). A row compares the figure
//! with its goal as the peer; a figure that misses its goal makes a failed row that says so.

#[path = "../../../benches/common/mod.rs"]
mod suite;

use std::time::Instant;

use shoal_cluster::model::{ClusterState, Command, TaskReport};
use shoal_cluster::simulated::{self, node_id};
use shoal_cluster::watch::{ChangeLog, Mirror, Placement, Position, Reader, Slot, delta};
use shoal_cluster::wire::encode_frame;
use suite::{Conditions, Options, Report, Row, Status};

const NODES: usize = 100;
const SERVICES: usize = 500;
const TASKS: usize = 5000;
const NETWORKS: usize = 20;

/// The most a node may receive for one single-task change.
const GOAL_BYTES: f64 = 2048.0;
/// The time a leader pass must stay under.
const GOAL_PASS_MS: f64 = 50.0;
/// The "peer" of a row measured against its goal.
const GOAL: &str = "goal (no peer)";

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

/// One leader pass for one change: apply and log it, then encode every node's answer. Returns
/// the largest answer in bytes.
fn pass(s: &mut Swarm, cmd: &Command) -> usize {
    s.revision += 1;
    s.state.apply(cmd, 1).expect("report");
    s.log.record(s.revision, Slot::touched_by(cmd));
    // Built once per revision, as the state machine caches it.
    let placement = Placement::of(&s.state);
    let mut largest = 0;
    for (reader, pos) in &mut s.positions {
        let frame = encode_frame(&delta(&s.state, s.revision, &s.log, &placement, *reader, pos));
        largest = largest.max(frame.len());
        // The node applied it and asks from there next time.
        pos.revision = s.revision;
    }
    largest
}

/// One round of `passes` changes: the largest answer in bytes and the median pass in ms.
fn round(s: &mut Swarm, next: &mut usize, passes: usize) -> (f64, f64) {
    let mut largest = 0;
    let mut ms = Vec::with_capacity(passes);
    for _ in 0..passes {
        *next = (*next + 7) % TASKS;
        let cmd = report(&s.state, *next);
        let t0 = Instant::now();
        largest = largest.max(pass(s, &cmd));
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let median = suite::Stats::of(&ms).map_or(f64::NAN, |st| st.median);
    (largest as f64, median)
}

/// A figure against its goal (lower is better): compared with the goal as the peer; failed,
/// with the figure kept, when `met` says the median misses it.
fn against_goal(
    metric: &str,
    unit: &str,
    samples: &[f64],
    goal: f64,
    met: fn(f64, f64) -> bool,
    conditions: &str,
) -> Row {
    let mut r = Row::new(metric, unit, true, samples, GOAL, Some(&[goal]), conditions);
    if let Some(s) = r.shoal.filter(|s| !met(*s, goal)) {
        r.status = Status::Failed;
        r.note = Some(format!("misses its goal: {} {unit} against {} {unit}", s, goal));
    }
    r
}

fn main() -> anyhow::Result<()> {
    let opts = Options::from_args("watch", 5, 1);
    let rounds = opts.rounds_or_env();
    let passes = if opts.quick { 10 } else { 50 };
    let mut s = swarm();
    let worker = s.positions[49].clone();
    let copy = encode_frame(&delta(
        &s.state,
        s.revision,
        &s.log,
        &Placement::of(&s.state),
        worker.0,
        &Position::default(),
    ))
    .len();
    let mut next = 0;
    let samples = suite::rounds(1, rounds, |i, warmup| {
        let (bytes, ms) = round(&mut s, &mut next, passes);
        let tag = if warmup { "warm-up" } else { "round" };
        println!("{tag} {}: largest answer {bytes} B, median leader pass {ms:.2} ms", i + 1);
        Ok((bytes, ms))
    })?;
    let (bytes, ms): (Vec<f64>, Vec<f64>) = samples.into_iter().unzip();
    let setup = format!(
        "{NODES} nodes, {SERVICES} services, {TASKS} tasks, {NETWORKS} networks (simulated, in \
         memory); {passes} single-task changes a round; a full copy for one worker is {copy} B"
    );
    let rows = vec![
        against_goal(
            "bytes to a node per task change (largest)",
            "B",
            &bytes,
            GOAL_BYTES,
            |s, g| s <= g,
            &setup,
        ),
        against_goal(
            "leader pass, one task change to 100 nodes",
            "ms",
            &ms,
            GOAL_PASS_MS,
            |s, g| s < g,
            &setup,
        ),
    ];
    let report = Report::new("watch", opts.quick, rounds, Conditions::detect(), rows);
    report.print();
    if opts.out_given {
        report.write_json(&opts.out)?;
    }
    Ok(())
}
