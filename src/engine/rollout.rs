//! Rolling updates that can go back: `service rollback` puts back the spec a service had
//! before its last update (the one it replaces becomes the previous, so a second rollback undoes
//! the first, as in Docker), and the leader applies `--update-failure-action` when a task of a
//! new spec fails within `--update-monitor` of its creation: the update pauses, or rolls back.
//! Pure functions of the store; the leader writes what they return.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_scheduler::TaskState;

use super::records::{FailureAction, Service, TaskRecord, UpdateStatus};

/// The record that puts `cur`'s previous spec back, keeping `cur` as the new previous; `None`
/// when there is nothing to roll back to. The version goes up (new tasks) unless only the
/// replica count differs, as for an update.
pub fn rolled_back(cur: &Service, now: u64) -> Option<Service> {
    let prev = cur.previous.as_deref()?;
    let mut svc = Service {
        id: cur.id.clone(),
        name: cur.name.clone(),
        created_ms: cur.created_ms,
        updated_ms: now,
        version: cur.version,
        previous: Some(Box::new(Service { previous: None, ..cur.clone() })),
        update_status: None,
        ..prev.clone()
    };
    if !same_tasks(&svc, cur) {
        svc.version += 1;
    }
    Some(svc)
}

/// Whether two specs of a service run the same tasks: everything but the replica count,
/// the bookkeeping and the history is equal.
pub fn same_tasks(a: &Service, b: &Service) -> bool {
    let bare = |s: &Service| Service {
        mode: b.mode,
        // The mesh policy changes every node's mesh in place, not the tasks.
        lb_algorithm: b.lb_algorithm,
        mesh: b.mesh.clone(),
        version: 0,
        previous: None,
        update_status: None,
        created_ms: 0,
        updated_ms: 0,
        ..s.clone()
    };
    bare(a) == bare(b)
}

/// Services whose rolling update a failed task stops now, as they must be written: paused
/// (the scheduler replaces no more tasks) or rolled back. A failure counts when a task of the
/// service's current spec, made by an update, failed within the monitor period of its creation
/// and after the update began; a service already paused or rolling back is left alone.
pub fn failure_actions(
    services: &BTreeMap<String, Arc<Service>>,
    tasks: &BTreeMap<String, Arc<TaskRecord>>,
    now: u64,
) -> Vec<Service> {
    let mut out = Vec::new();
    for svc in services.values() {
        let updated = svc.previous.as_ref().is_some_and(|p| p.version < svc.version);
        if !updated
            || svc.update_status.is_some()
            || svc.update_failure_action == FailureAction::Continue
        {
            continue;
        }
        let failed = tasks.values().map(|t| &t.task).find(|t| {
            t.service_id == svc.id
                && t.spec_version == svc.version
                && matches!(t.state, TaskState::Failed | TaskState::Rejected)
                && t.state_since_ms >= svc.updated_ms
                && t.state_since_ms.saturating_sub(t.created_ms) <= svc.update.monitor_ms
        });
        let Some(failed) = failed else { continue };
        let why = format!("failure or early termination of task {}", failed.id);
        match svc.update_failure_action {
            FailureAction::Pause => {
                let mut s = Service::clone(svc);
                s.update_status =
                    Some(UpdateStatus::new("paused", format!("update paused due to {why}")));
                s.updated_ms = now;
                out.push(s);
            }
            FailureAction::Rollback => {
                if let Some(mut s) = rolled_back(svc, now) {
                    s.update_status = Some(UpdateStatus::new(
                        "rollback_started",
                        format!("update rolled back due to {why}"),
                    ));
                    out.push(s);
                }
            }
            FailureAction::Continue => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_scheduler as sched;

    fn svc(replicas: u64, env: &[(&str, &str)], version: u64) -> Service {
        let value = serde_json::json!({
            "id": "s1", "name": "web", "version": version,
            "mode": {"replicated": {"replicas": replicas}},
            "argv": ["nginx"], "env": env, "restart": sched::RestartPolicy::default(),
            "stop_grace_ms": 10_000, "created_ms": 1, "updated_ms": 2,
        });
        serde_json::from_value(value).expect("a service record")
    }

    #[test]
    fn rollback_restores_the_previous_spec_and_can_be_undone() {
        assert!(rolled_back(&svc(2, &[], 1), 5).is_none(), "nothing to roll back to");
        let mut cur = svc(2, &[("V", "2")], 2);
        cur.previous = Some(Box::new(svc(4, &[], 1)));
        let back = rolled_back(&cur, 9).expect("a previous spec");
        assert!(back.env.is_empty());
        assert_eq!(back.mode, svc(4, &[], 1).mode, "the replica count comes back too");
        assert_eq!(back.version, 3, "new tasks");
        assert_eq!(back.updated_ms, 9);
        assert_eq!(back.previous.as_ref().map(|p| p.env.clone()), Some(cur.env.clone()));
        assert!(back.previous.as_ref().is_some_and(|p| p.previous.is_none()), "one level kept");
        let again = rolled_back(&back, 10).expect("the rolled-back spec");
        assert_eq!(again.env, cur.env, "a second rollback undoes the first");
        assert_eq!(again.version, 4);
    }

    fn task(id: &str, version: u64, state: &str, created: u64, since: u64) -> TaskRecord {
        let value = serde_json::json!({
            "id": id, "service_id": "s1", "slot": 1, "node_id": "n1", "spec_version": version,
            "desired": "running", "state": state, "state_since_ms": since,
            "created_ms": created, "attempt": 0,
        });
        serde_json::from_value(value).expect("a task record")
    }

    fn updated(action: FailureAction) -> BTreeMap<String, Arc<Service>> {
        let mut cur = svc(2, &[("V", "2")], 2);
        cur.updated_ms = 1_000;
        cur.update_failure_action = action;
        cur.previous = Some(Box::new(svc(2, &[], 1)));
        BTreeMap::from([("s1".to_owned(), Arc::new(cur))])
    }

    #[test]
    fn a_failed_new_task_pauses_or_rolls_back_the_update() {
        let early =
            BTreeMap::from([("t1".to_owned(), Arc::new(task("t1", 2, "failed", 1_100, 3_000)))]);
        let paused = failure_actions(&updated(FailureAction::Pause), &early, 4_000);
        assert_eq!(paused.len(), 1);
        let status = paused[0].update_status.clone().expect("a status");
        assert_eq!(status.state, "paused");
        assert!(status.message.contains("t1"), "{status:?}");
        assert!(crate::from_model::sched_service(&paused[0]).spec.update_paused);
        assert!(
            failure_actions(
                &BTreeMap::from([("s1".into(), Arc::new(paused[0].clone()))]),
                &early,
                5_000
            )
            .is_empty(),
            "acted on once"
        );

        let back = failure_actions(&updated(FailureAction::Rollback), &early, 4_000);
        assert_eq!(back.len(), 1);
        assert!(back[0].env.is_empty(), "the previous spec is back");
        assert_eq!(back[0].version, 3);
        assert_eq!(
            back[0].update_status.as_ref().map(|s| s.state.as_str()),
            Some("rollback_started")
        );

        assert!(failure_actions(&updated(FailureAction::Continue), &early, 4_000).is_empty());
    }

    #[test]
    fn failures_that_do_not_count() {
        let none = |tasks: &[TaskRecord]| {
            let tasks = tasks.iter().map(|t| (t.task.id.clone(), Arc::new(t.clone()))).collect();
            failure_actions(&updated(FailureAction::Pause), &tasks, 99_000).is_empty()
        };
        assert!(none(&[task("t1", 2, "failed", 1_100, 9_000)]), "after the monitor period");
        assert!(none(&[task("t1", 1, "failed", 1_100, 2_000)]), "a task of the old spec");
        assert!(none(&[task("t1", 2, "failed", 100, 900)]), "before the update began");
        assert!(none(&[task("t1", 2, "running", 1_100, 2_000)]), "running");
        let fresh = BTreeMap::from([("s1".to_owned(), Arc::new(svc(2, &[], 1)))]);
        let t =
            BTreeMap::from([("t1".to_owned(), Arc::new(task("t1", 1, "failed", 1_100, 2_000)))]);
        assert!(failure_actions(&fresh, &t, 3_000).is_empty(), "a new service is no update");
    }

    #[test]
    fn a_rollback_of_a_scale_keeps_the_tasks() {
        let mut cur = svc(2, &[], 3);
        cur.previous = Some(Box::new(svc(4, &[], 3)));
        let back = rolled_back(&cur, 9).expect("a previous spec");
        assert_eq!(back.version, 3, "only the replica count differs: no new tasks");
    }
}
