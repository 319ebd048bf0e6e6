//! The task table of `service ps` and `ps`: Docker's columns, with each task's history under it.

use std::collections::BTreeMap;

use crate::api::services::TaskView;

fn ago(ms: u64) -> String {
    let now = shoal_cluster::model::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=1 => "Less than a second".into(),
        2..=59 => format!("{s} seconds"),
        60..=3599 => format!("{} minutes", s / 60),
        _ => format!("{} hours", s / 3600),
    }
}

/// Docker's IMAGE column: what the tasks run, here the program of the command.
pub(super) fn image(argv: &[String]) -> &str {
    argv.first().map_or("", String::as_str)
}

/// What `service ps` shows of a task's service besides the task: Docker's IMAGE (the program)
/// and PORTS (the host-mode ports, served on the nodes that run a task).
pub(super) struct TaskExtras {
    image: String,
    ports: String,
}

impl TaskExtras {
    pub(super) fn of(s: &crate::engine::records::Service) -> TaskExtras {
        let ports: Vec<String> = s
            .ports
            .iter()
            .filter(|p| !p.is_ingress())
            .map(|p| format!("*:{}->{}/{}", p.published, p.target, p.protocol.as_str()))
            .collect();
        TaskExtras { image: image(&s.argv).to_owned(), ports: ports.join(",") }
    }
}

/// Docker's `service ps` columns (IMAGE, PORTS from `extras` by service id), plus ADDRESSES.
pub(super) fn print(tasks: &[TaskView], extras: &BTreeMap<String, TaskExtras>) {
    println!(
        "{:<26} {:<24} {:<10} {:<14} {:<28} {:<28} {:<20} {:<10} PORTS",
        "ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ADDRESSES", "IMAGE", "ERROR"
    );
    let mut last_slot = None;
    for t in tasks {
        let slot = (t.task.task.service_id.clone(), t.task.task.slot, t.task.task.node_id.clone());
        // Standalone tasks have no service and no slot: each is its own row.
        let history = !slot.0.is_empty() && last_slot.as_ref() == Some(&slot);
        last_slot = Some(slot);
        let name = if history { format!(" \\_ {}", t.name) } else { t.name.clone() };
        let desired = match t.task.task.desired {
            shoal_scheduler::DesiredState::Running => "Running",
            shoal_scheduler::DesiredState::Shutdown => "Shutdown",
        };
        let state = t.task.task.state.as_str();
        let current = format!(
            "{}{} {} ago",
            state[..1].to_uppercase(),
            &state[1..],
            ago(t.task.task.state_since_ms)
        );
        let addrs: Vec<String> = t.addresses.iter().map(|(n, ip)| format!("{n}={ip}")).collect();
        let err = if matches!(
            t.task.task.state,
            shoal_scheduler::TaskState::Failed
                | shoal_scheduler::TaskState::Rejected
                | shoal_scheduler::TaskState::Pending
        ) {
            t.task.message.as_str()
        } else {
            ""
        };
        let extra = extras.get(&t.task.task.service_id);
        println!(
            "{:<26} {:<24} {:<10} {:<14} {:<28} {:<28} {:<20} {:<10} {}",
            t.task.task.id,
            name,
            t.node,
            desired,
            current,
            addrs.join(","),
            extra.map_or("", |e| e.image.as_str()),
            err,
            extra.map_or("", |e| e.ports.as_str())
        );
    }
}
