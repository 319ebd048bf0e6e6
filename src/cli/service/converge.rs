//! How `service create`, `update`, `rollback` and `scale` wait for a service to converge, with
//! Docker's progress bars.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::api::client::Host;
use crate::api::services::{ServiceView, TaskView};

/// How far along Docker's task lifecycle a state is, for the per-task bars.
fn progress_of(state: shoal_scheduler::TaskState) -> u64 {
    use shoal_scheduler::TaskState as S;
    match state {
        S::New => 1,
        S::Pending => 2,
        S::Assigned => 3,
        S::Preparing => 5,
        S::Starting => 7,
        S::Running => 8,
        _ => 0,
    }
}

/// Docker's progress display: one bar per task of the current spec ("2/3: running [====>]")
/// and the overall count; waits until every task runs and stays up a moment, and gives up
/// (exit 1) after 120 s without progress.
pub(super) async fn converge(host: &Host, id: &str) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let bar_style = ProgressStyle::with_template("{prefix}: {msg:<10} [{bar:40}]")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = multi.add(ProgressBar::new_spinner());
    overall.set_style(
        ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let mut last_change = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut stable = 0;
    loop {
        let v: ServiceView = host.get_json(&format!("/services/{id}")).await?;
        let tasks: Vec<TaskView> = host.get_json(&format!("/services/{id}/tasks")).await?;
        for t in tasks.iter().filter(|t| {
            t.task.task.desired == shoal_scheduler::DesiredState::Running
                && t.task.task.spec_version == v.service.version
        }) {
            let key = t.task.slot_label();
            let bar = bars.entry(key.clone()).or_insert_with(|| {
                let b = multi.insert_before(&overall, ProgressBar::new(8));
                b.set_style(bar_style.clone());
                b.set_prefix(match v.service.mode {
                    shoal_scheduler::Mode::Replicated { replicas } => format!("{key}/{replicas}"),
                    shoal_scheduler::Mode::Global => t.node.clone(),
                });
                b
            });
            bar.set_message(t.task.task.state.as_str());
            bar.set_position(progress_of(t.task.task.state));
        }
        overall.set_message(format!("overall progress: {} out of {} tasks", v.running, v.desired));
        if (v.running, v.desired) != last {
            last = (v.running, v.desired);
            last_change = Instant::now();
        }
        if let Some(s) = v.service.update_status.as_ref().filter(|s| s.state == "paused") {
            overall.abandon();
            bail!("{}: {}", v.service.name, s.message);
        }
        if v.running == v.desired {
            // Docker waits for the tasks to stay up a moment: "verify: Service converged".
            stable += 1;
            if stable >= 3 {
                let done = format!(
                    "overall progress: {} out of {} tasks\nverify: Service {} converged",
                    v.running, v.desired, v.service.name
                );
                if overall.is_hidden() {
                    // Not a terminal: no bars, just the outcome.
                    println!("{done}");
                } else {
                    for b in bars.values() {
                        b.finish();
                    }
                    overall.finish_with_message(done);
                }
                return Ok(());
            }
        } else {
            stable = 0;
        }
        if last_change.elapsed() > Duration::from_secs(120) {
            overall.abandon();
            bail!(
                "service {} did not converge: {} of {} tasks running (see `shoal service ps {}`)",
                v.service.name,
                v.running,
                v.desired,
                v.service.name
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
