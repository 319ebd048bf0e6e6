//! `service rollback`: the spec a service had before its last update comes back, through the
//! same rolling update as any other change. The spec it replaces becomes the previous one, so a
//! second rollback undoes the first (as in Docker).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use shoal_cluster::model::now_ms;

use super::ApiState;
use super::services::{find_service, put_service, service_view, store};
use super::swarm::{bad_request, cluster};
use crate::engine::records::ServiceRecord;

/// `POST /services/{id}/rollback`.
pub(super) async fn service_rollback(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let c = cluster(&st)?;
        let state = store(&c).await?;
        let cur = find_service(&state, &id)?;
        let svc = rolled_back(&cur, now_ms()).ok_or_else(|| {
            bad_request(format!("service {} has no previous spec to roll back to", cur.name))
        })?;
        put_service(&c, &state, &svc).await?;
        Ok(axum::Json(service_view(&state, &svc)).into_response())
    };
    run.await.unwrap_or_else(|r| r)
}

/// The record that puts `cur`'s previous spec back, keeping `cur` as the new previous; `None`
/// when there is nothing to roll back to. The version goes up (new tasks) unless only the
/// replica count differs, as for an update.
pub fn rolled_back(cur: &ServiceRecord, now: u64) -> Option<ServiceRecord> {
    let prev = cur.previous.as_deref()?;
    let mut svc = ServiceRecord {
        id: cur.id.clone(),
        name: cur.name.clone(),
        created_ms: cur.created_ms,
        updated_ms: now,
        version: cur.version,
        previous: Some(Box::new(ServiceRecord { previous: None, ..cur.clone() })),
        ..prev.clone()
    };
    if !same_tasks(&svc, cur) {
        svc.version += 1;
    }
    Some(svc)
}

/// Whether two specs of a service run the same tasks: everything but the replica count,
/// the bookkeeping and the history is equal.
pub fn same_tasks(a: &ServiceRecord, b: &ServiceRecord) -> bool {
    let bare = |s: &ServiceRecord| ServiceRecord {
        mode: b.mode,
        version: 0,
        previous: None,
        created_ms: 0,
        updated_ms: 0,
        ..s.clone()
    };
    bare(a) == bare(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_scheduler as sched;

    fn svc(replicas: u64, env: &[(&str, &str)], version: u64) -> ServiceRecord {
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

    #[test]
    fn a_rollback_of_a_scale_keeps_the_tasks() {
        let mut cur = svc(2, &[], 3);
        cur.previous = Some(Box::new(svc(4, &[], 3)));
        let back = rolled_back(&cur, 9).expect("a previous spec");
        assert_eq!(back.version, 3, "only the replica count differs: no new tasks");
    }
}
