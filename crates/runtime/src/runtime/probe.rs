//! Commands run inside a running task: its health probes and `exec`.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::health::{HealthMonitor, ProbeOutcome};
use crate::process::{self, TaskNamespaces};
use crate::shim::{self};
use crate::spec::{HealthCheck, TaskSpec};
use crate::state::{EventKind, TaskState, TaskStatus};

use super::task::{Inner, Task, lock};
use super::{HEALTH_FILE, PROBE_OUTPUT_CAP};

/// Runs the health probes of a running task until it stops (the supervisor aborts this).
pub(super) async fn health_loop(
    inner: Arc<Inner>,
    task: Arc<Task>,
    spec: TaskSpec,
    check: HealthCheck,
    pid: u32,
    started: Instant,
) {
    let mut monitor = HealthMonitor::new(&check, started);
    while let Some(due) = monitor.poll_timeout() {
        tokio::time::sleep_until(due.into()).await;
        let Some(timeout) = monitor.poll_probe(Instant::now()) else { continue };
        let (outcome, output) = run_probe(&spec, &check.argv, pid, timeout).await;
        let change = monitor.handle_result(Instant::now(), outcome);
        let _ctl = lock(&task.ctl);
        if task.state() != TaskState::Running {
            return;
        }
        let streak = monitor.failing_streak();
        let apply = |s: &mut TaskStatus| {
            s.failing_streak = streak;
            s.last_probe_output = Some(output);
            if let Some(h) = change {
                s.health = Some(h);
            }
        };
        if let Some(h) = change {
            let _ = shim::write_json(&task.dir, HEALTH_FILE, &h);
            inner.update(&task, EventKind::Health, apply);
        } else {
            task.status.send_modify(apply);
        }
    }
}

/// How a command run inside a task's namespaces ended.
pub(super) enum InTask {
    Done(std::process::Output),
    TimedOut,
    Failed(String),
}

/// Runs `argv` inside the namespaces of process `pid` with the task's environment; kills its
/// process group after `timeout`.
pub(super) async fn run_in_task(
    spec: &TaskSpec,
    argv: &[String],
    pid: u32,
    timeout: Duration,
) -> InTask {
    let ns = match TaskNamespaces::of_pid(pid) {
        Ok(ns) => ns,
        Err(e) => return InTask::Failed(format!("entering the task's namespaces: {e}")),
    };
    let child = match process::probe_command(spec, argv, ns).spawn() {
        Ok(child) => child,
        Err(e) => return InTask::Failed(format!("{:?}: {e}", argv[0])),
    };
    let child_pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => InTask::Done(out),
        Ok(Err(e)) => InTask::Failed(format!("{:?}: {e}", argv[0])),
        Err(_) => {
            if let Some(p) = child_pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(Pid::from_raw(p), Signal::SIGKILL);
            }
            InTask::TimedOut
        }
    }
}

/// Runs one health probe; returns its outcome and (capped) output.
pub(super) async fn run_probe(
    spec: &TaskSpec,
    argv: &[String],
    pid: u32,
    timeout: Duration,
) -> (ProbeOutcome, String) {
    match run_in_task(spec, argv, pid, timeout).await {
        InTask::Done(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            if text.len() > PROBE_OUTPUT_CAP {
                let mut cut = PROBE_OUTPUT_CAP;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            let outcome =
                if out.status.success() { ProbeOutcome::Passed } else { ProbeOutcome::Failed };
            (outcome, text)
        }
        InTask::Failed(e) => (ProbeOutcome::Failed, format!("health command {e}")),
        InTask::TimedOut => {
            (ProbeOutcome::TimedOut, format!("Health check exceeded timeout ({timeout:?})"))
        }
    }
}

/// What [`Runtime::exec`](super::Runtime::exec) returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by one).
    pub exit_code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

pub(super) fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
