//! The store keeps services and tasks as JSON written by whichever agent version led when they
//! were written. These records are that JSON as the agent wrote it before the model crate
//! existed; each must read into the model's types and write back unchanged.

#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

use serde_json::{Value, json};
use shoal_model::{
    FailureAction, LbAlgorithm, MeshCheck, Mode, MountKind, PortMode, Protocol, ProxyVersion,
    RestartCondition, Service, TaskRecord, UpdateOrder,
};

fn full_service() -> Value {
    json!({
        "id": "svc1", "name": "web", "version": 3,
        "mode": {"replicated": {"replicas": 3}},
        "argv": ["python3", "-m", "http.server"],
        "env": [["A", "1"]],
        "workdir": "/srv",
        "networks": ["net1"],
        "ports": [
            {"published": 8100, "target": 80, "protocol": "tcp", "host_mode": false,
             "proxy_protocol": "v2"},
            {"published": 53, "target": 5353, "protocol": "udp", "host_mode": true}
        ],
        "dnsrr": false,
        "lb_algorithm": "maglev",
        "mesh": {"idle_timeout_ms": 60000, "max_connections": 100, "check": "http:/healthz",
                 "check_interval_ms": 500, "check_rise": 2, "check_fall": 3,
                 "max_udp_flows": 10000, "max_udp_flows_per_source": 256},
        "constraints": [{"key": "role", "equal": true, "value": "manager"},
                        {"key": {"label": "zone"}, "equal": false, "value": "a"}],
        "restart": {"condition": "on-failure", "delay_ms": 5000, "max_attempts": 2},
        "update_order": "start-first",
        "update": {"parallelism": 2, "delay_ms": 1000, "monitor_ms": 5000},
        "update_failure_action": "rollback",
        "update_status": {"state": "paused", "message": "task failed"},
        "health": {"cmd": "true", "interval_ms": 1000, "timeout_ms": 500, "retries": 3},
        "mounts": [{"type": "volume", "source": "logs", "target": "/logs", "readonly": false}],
        "stop_grace_ms": 10000,
        "stop_signal": "SIGQUIT",
        "previous": {
            "id": "svc1", "name": "web", "version": 2,
            "mode": "global",
            "argv": ["true"], "env": [], "workdir": null, "networks": [], "ports": [],
            "dnsrr": true, "lb_algorithm": "p2c",
            "mesh": {"idle_timeout_ms": 900000, "max_connections": 10000, "check": "tcp",
                     "check_interval_ms": 2000, "check_rise": 2, "check_fall": 3,
                     "max_udp_flows": 10000, "max_udp_flows_per_source": 256},
            "constraints": [],
            "restart": {"condition": "any", "delay_ms": 5000, "max_attempts": 0},
            "update_order": "stop-first",
            "update": {"parallelism": 1, "delay_ms": 0, "monitor_ms": 5000},
            "update_failure_action": "pause",
            "health": null, "mounts": [], "stop_grace_ms": 10000, "stop_signal": null,
            "created_ms": 1, "updated_ms": 2
        },
        "created_ms": 1, "updated_ms": 5
    })
}

#[test]
fn a_service_as_the_store_holds_it_reads_and_writes_back_unchanged() {
    let old = full_service();
    let svc: Service = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(svc.mode, Mode::Replicated { replicas: 3 });
    assert_eq!(svc.ports[0].proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!((svc.ports[1].protocol, svc.ports[1].mode), (Protocol::Udp, PortMode::Host));
    assert_eq!(svc.lb_algorithm, LbAlgorithm::Maglev);
    assert_eq!(svc.mesh.check, MeshCheck::Http("/healthz".into()));
    assert_eq!(svc.restart.condition, RestartCondition::OnFailure);
    assert_eq!(svc.update_order, UpdateOrder::StartFirst);
    assert_eq!(svc.update_failure_action, FailureAction::Rollback);
    assert!(svc.update_paused());
    assert_eq!(svc.mounts[0].kind, MountKind::Volume);
    let previous = svc.previous.as_deref().unwrap();
    assert_eq!((previous.mode, previous.dnsrr), (Mode::Global, true));
    assert_eq!(serde_json::to_value(&svc).unwrap(), old);
}

#[test]
fn an_early_service_without_the_later_fields_reads_with_their_defaults() {
    let old = json!({
        "id": "s", "name": "api", "version": 1,
        "mode": {"replicated": {"replicas": 1}},
        "argv": ["true"],
        "ports": [{"published": 8100, "target": 8100, "protocol": "tcp"}],
        "restart": {"condition": "any", "delay_ms": 5000, "max_attempts": 0},
        "stop_grace_ms": 10000, "created_ms": 0, "updated_ms": 0
    });
    let svc: Service = serde_json::from_value(old).unwrap();
    assert_eq!(svc.ports[0].mode, PortMode::Ingress);
    assert_eq!(svc.lb_algorithm, LbAlgorithm::P2c);
    assert_eq!(svc.update.parallelism, 1);
    assert_eq!(svc.update.monitor_ms, shoal_scheduler::DEFAULT_UPDATE_MONITOR_MS);
    assert!(svc.validate().is_ok());
}

#[test]
fn a_task_as_the_store_holds_it_reads_and_writes_back_unchanged() {
    let old = json!({
        "id": "t1", "service_id": "", "slot": 0, "node_id": "n1", "spec_version": 1,
        "desired": "running", "state": "running", "state_since_ms": 7, "created_ms": 7,
        "attempt": 0,
        "addresses": {"net1": "10.0.1.5"},
        "networks": ["net1"],
        "message": "", "exit_code": null, "health": "healthy",
        "standalone": {
            "name": "c1", "argv": ["sleep", "1"], "env": [], "auto_remove": true, "mounts": [],
            "cni": {"container_id": "abc", "netns": "cni-1", "ifname": "eth0", "aliases": ["x"]}
        }
    });
    let t: TaskRecord = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(t.cni().unwrap().container_id, "abc");
    assert!(t.addressed());
    assert_eq!(t.display_name(None), "c1");
    assert_eq!(serde_json::to_value(&t).unwrap(), old);
}
