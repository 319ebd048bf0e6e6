//! What a worker reads of the store. Every node long-polls the store to run its tasks and to
//! check gossip against it, so a worker needs every node record, network, service name and
//! port, task assignment and address. It does not need how other nodes' tasks run: the command,
//! environment, working directory, mounts and health command of a service it runs no task of,
//! or of another node's standalone task, are blanked (to empty values the records still parse
//! with), as are the secrets only managers hold.

use crate::model::{ClusterState, NodeId, tables};

/// Fields of a service record (and of a standalone task's `standalone`) that say how its tasks
/// run. Blanked, a list becomes empty and anything else null: the records still parse.
const HOW_IT_RUNS: [&str; 5] = ["argv", "env", "workdir", "mounts", "health"];

fn blank(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else { return };
    for field in HOW_IT_RUNS {
        if let Some(f) = obj.get_mut(field) {
            *f = match f {
                serde_json::Value::Array(_) => serde_json::Value::Array(Vec::new()),
                _ => serde_json::Value::Null,
            };
        }
    }
}

/// The store without the CA key and the join secrets, which never leave the managers.
pub fn without_secrets(mut s: ClusterState) -> ClusterState {
    if let Some(c) = s.cluster.as_mut() {
        c.ca_key_pem.clear();
        if let Some(crate::ca::CaRotation::Trust { key_pem, .. }) = &mut c.security.ca_rotation {
            key_pem.clear();
        }
        c.worker_secret = [0; 16];
        c.manager_secret = [0; 16];
        c.retired_secrets.clear();
    }
    s
}

/// The store as worker `node` reads it: [`without_secrets`], and how other nodes' tasks run
/// blanked.
pub fn for_worker(s: ClusterState, node: NodeId) -> ClusterState {
    let mut s = without_secrets(s);
    let me = node.to_string();
    let on_me = |t: &serde_json::Value| t.get("node_id").and_then(|n| n.as_str()) == Some(&me);
    let mut mine = std::collections::BTreeSet::new();
    if let Some(tasks) = s.entries.get_mut(tables::TASKS) {
        for t in tasks.values_mut() {
            if on_me(t) {
                if let Some(svc) = t.get("service_id").and_then(|v| v.as_str()) {
                    mine.insert(svc.to_owned());
                }
            } else if let Some(standalone) = t.get_mut("standalone") {
                blank(standalone);
            }
        }
    }
    if let Some(services) = s.entries.get_mut(tables::SERVICES) {
        for (id, svc) in services.iter_mut() {
            if !mine.contains(id) {
                blank(svc);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store(services: usize) -> ClusterState {
        let mut s = ClusterState::default();
        let env: Vec<(String, String)> =
            (0..20).map(|i| (format!("VAR_{i}"), "x".repeat(40))).collect();
        for i in 0..services {
            let id = format!("s{i}");
            let svc = json!({
                "id": id, "name": format!("web{i}"), "version": 1, "argv": ["server", "--secret-flag"],
                "env": env, "workdir": "/srv", "networks": ["n"], "ports": [],
                "mounts": [{"type": "bind", "src": "/etc/app", "dst": "/etc/app"}],
                "health": {"cmd": "check", "interval_ms": 1, "timeout_ms": 1, "retries": 1},
            });
            s.entries.entry(tables::SERVICES.into()).or_default().insert(id.clone(), svc);
            // Service i runs on node (i % 10) + 1.
            let task = json!({
                "id": format!("t{i}"), "service_id": id, "slot": 1,
                "node_id": NodeId((i % 10) as u64 + 1).to_string(),
                "addresses": {"n": format!("10.0.{}.{}", i / 250, i % 250 + 2)},
            });
            s.entries.entry(tables::TASKS.into()).or_default().insert(format!("t{i}"), task);
        }
        let standalone = json!({
            "id": "c1", "service_id": "", "slot": 0, "node_id": NodeId(2).to_string(),
            "standalone": {"name": "db", "argv": ["db", "--password=hunter2"], "env": [["PW", "x"]]},
        });
        s.entries.entry(tables::TASKS.into()).or_default().insert("c1".into(), standalone);
        s
    }

    #[test]
    fn a_worker_reads_how_only_its_own_tasks_run() {
        let s = for_worker(store(20), NodeId(1));
        let services = &s.entries[tables::SERVICES];
        // s0 and s10 run on node 1: whole. The others: names, ports and networks only.
        for (id, svc) in services {
            let own = id == "s0" || id == "s10";
            assert_eq!(svc["env"].as_array().is_some_and(|e| !e.is_empty()), own, "{id}");
            assert_eq!(svc["argv"].as_array().is_some_and(|e| !e.is_empty()), own, "{id}");
            assert_eq!(svc["mounts"].as_array().is_some_and(|e| !e.is_empty()), own, "{id}");
            assert_eq!(!svc["health"].is_null(), own, "{id}");
            assert_eq!(svc["networks"], json!(["n"]), "{id}");
        }
        let c1 = &s.entries[tables::TASKS]["c1"]["standalone"];
        assert_eq!(
            (c1["name"].as_str(), c1["argv"].as_array().map(Vec::len)),
            (Some("db"), Some(0))
        );
        // Node 2 reads its own standalone task whole.
        let s2 = for_worker(store(20), NodeId(2));
        assert_eq!(s2.entries[tables::TASKS]["c1"]["standalone"]["argv"][1], "--password=hunter2");
    }

    /// Every node receives the whole store on every change: the bytes a worker receives per
    /// change, before and after, with 200 services over 10 workers.
    #[test]
    fn bytes_per_change_for_a_worker() {
        let s = store(200);
        let before = serde_json::to_vec(&without_secrets(s.clone())).unwrap().len();
        let after = serde_json::to_vec(&for_worker(s, NodeId(1))).unwrap().len();
        eprintln!("bytes per change for a worker running 20 of 200 services: {before} -> {after}");
        assert!(after * 3 < before, "{before} -> {after}");
    }
}
