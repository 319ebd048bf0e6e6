//! What this node tells a manager that asks it directly: a task's logs, and its data path as
//! it is now (`node inspect --pretty`).

use std::collections::BTreeMap;

use shoal_cluster::NodeRequest;

use super::{Inner, kernel_mesh, lock};

/// What this node tells a manager that asks it directly.
pub(super) async fn answer(inner: &Inner, req: NodeRequest) -> Result<serde_json::Value, String> {
    match req {
        NodeRequest::TaskLogs { task, since } => {
            let logs = inner.runtime.logs(&task).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({
                "lines": logs.since(since),
                "next": logs.next_seq(),
                "closed": logs.is_closed(),
            }))
        }
        NodeRequest::Diagnostics => Ok(diagnostics(inner).await),
    }
}

/// The node's data path as it is now, for `node inspect --pretty`.
async fn diagnostics(inner: &Inner) -> serde_json::Value {
    let snap = inner.gossip.snapshot();
    let members: Vec<serde_json::Value> = snap
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.meta.as_ref().map(|x| x.name.clone()).unwrap_or_default(),
                "addr": m.id.addr.to_string(),
                "state": format!("{:?}", m.state),
                "incarnation": m.incarnation,
            })
        })
        .collect();
    let (tables, dns_input) = {
        let l = lock(&inner.local);
        (l.tables.get().cloned().unwrap_or_default(), l.dns.get().cloned().unwrap_or_default())
    };
    let networks = inner.overlay.networks().await;
    let store = inner.store.borrow().clone();
    let name_of = |id: &str| {
        store.as_ref().and_then(|s| s.networks.get(id)).map_or(id.to_owned(), |n| n.name.clone())
    };
    let fdb: serde_json::Value = networks
        .iter()
        .map(|n| {
            let remote: Vec<serde_json::Value> = tables
                .endpoints
                .iter()
                .filter(|e| e.network == n.spec.id && e.node != inner.me)
                .map(|e| serde_json::json!({"ip": e.ip, "mac": e.mac.to_string(), "node": e.node}))
                .collect();
            (
                name_of(&n.spec.id),
                serde_json::json!({
                    "vni": n.spec.vni,
                    "subnet": n.spec.subnet,
                    "encrypted": n.spec.encrypted,
                    "local_endpoints": n.endpoints,
                    "remote": remote,
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let mut names: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for svc in &dns_input.services {
        for sn in &svc.networks {
            let per = names.entry(name_of(&sn.network)).or_default();
            let tasks: Vec<String> = svc
                .tasks
                .iter()
                .filter(|t| t.healthy)
                .flat_map(|t| t.attachments.iter().filter(|a| a.network == sn.network))
                .map(|a| a.addr.to_string())
                .collect();
            let own = match sn.vip {
                Some(vip) => vec![vip.to_string()],
                None => tasks.clone(),
            };
            per.insert(svc.name.clone(), own);
            per.insert(format!("tasks.{}", svc.name), tasks);
        }
    }
    for s in &dns_input.standalone {
        for a in &s.attachments {
            names
                .entry(name_of(&a.network))
                .or_default()
                .insert(s.name.clone(), vec![a.addr.to_string()]);
        }
    }
    let mesh: Vec<serde_json::Value> = inner
        .mesh
        .metrics()
        .iter()
        .map(|s| {
            serde_json::json!({
                "service": s.name,
                "no_backend": s.no_backend,
                "client_addr_kept": s.client_kept,
                "client_addr_fallback": s.client_fallback,
                "backends": s.backends.iter().map(|b| serde_json::json!({
                    "id": b.id, "addr": b.addr, "health": b.health.as_str(),
                    "active": b.active, "connections": b.total, "errors": b.errors,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tasks: Vec<serde_json::Value> = inner
        .runtime
        .list()
        .iter()
        .map(|t| {
            serde_json::json!({"id": t.id, "name": t.name, "state": t.state.as_str(),
            "health": t.health.map(|h| h.as_str()), "pid": t.pid, "addresses": t.addresses})
        })
        .collect();
    serde_json::json!({
        "gossip": { "members": members, "entries": snap.entries.len(), "networks": snap.networks },
        "peers": inner.overlay.peer_stats(),
        "networks": fdb,
        "mesh": mesh,
        "kernel_mesh": kernel_mesh::describe(inner),
        "dns": names,
        "tasks": tasks,
    })
}
