//! A simulated swarm's store for the watch's tests and benchmark: nodes, networks, services,
//! their tasks and VIPs, with records shaped and sized like the agent's own (a service with its
//! command, environment, ports and update policy; a task with its state and addresses).
//! Not part of the API.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::json;

use crate::model::{
    Availability, ClusterInfo, ClusterState, Command, GossipKey, Keyring, NetworkRecord, NodeId,
    NodeRecord, NodeStatus, Role, Service, TaskRecord,
};

/// The CA key the simulated store holds: no delta to a node may carry it.
pub const CA_KEY: &str = "-----BEGIN PRIVATE KEY-----\nSIMULATED-CA-KEY\n-----END PRIVATE KEY-----";
/// The worker join secret; the manager's is its bitwise complement.
pub const WORKER_SECRET: [u8; 16] = [0x5e; 16];
/// A word in every service's environment: only nodes running one of its tasks may read it.
pub const ENV_SECRET: &str = "S3CRET-ENV-VALUE";

/// Node `i`'s id (1-based: node 1 is the manager).
pub fn node_id(i: usize) -> NodeId {
    NodeId(0x1000 + i as u64)
}

/// A node record.
pub fn node(i: usize, role: Role) -> NodeRecord {
    NodeRecord {
        id: node_id(i),
        hostname: format!("node-{i}"),
        role,
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, i as u8)), 2377),
        data_addr: IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, i as u8)),
        wg_public_key: Some([i as u8; 32]),
        status: NodeStatus::Ready,
        status_message: String::new(),
        engine_version: "0.1.0".into(),
        created_ms: 1,
        updated_ms: 1,
    }
}

/// Network `i` (0 is the ingress network).
pub fn network(i: usize) -> NetworkRecord {
    let subnet: ipnet::IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().expect("subnet");
    NetworkRecord {
        id: format!("net{i:04}"),
        name: if i == 0 { "ingress".into() } else { format!("net-{i}") },
        driver: "overlay".into(),
        gateway: IpAddr::V4(Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 1)),
        subnet,
        vni: 4096 + i as u32,
        ingress: i == 0,
        attachable: false,
        encrypted: i.is_multiple_of(2),
        labels: BTreeMap::new(),
    }
}

/// The commands that create the store up to the first service: init, the nodes, the networks.
pub fn bootstrap(nodes: usize, networks: usize) -> Vec<Command> {
    let info = ClusterInfo {
        id: "simulated".into(),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nSIMULATED\n-----END CERTIFICATE-----".into(),
        ca_key_pem: CA_KEY.into(),
        worker_secret: WORKER_SECRET,
        manager_secret: WORKER_SECRET.map(|b| !b),
        retired_secrets: vec![[0x77; 16]],
        default_addr_pool: vec!["10.0.0.0/8".parse().expect("pool")],
        subnet_size: 24,
        data_path_port: 4789,
        created_ms: 1,
        security: Default::default(),
    };
    let keyring = Keyring { keys: vec![GossipKey { id: 1, key: [9; 32] }], primary: 1, version: 1 };
    let mut out = vec![Command::Init {
        info,
        node: node(1, Role::Manager),
        keyring,
        ingress: network(0).spec(),
    }];
    out.extend((2..=nodes).map(|i| Command::AddNode(node(i, Role::Worker))));
    out.extend((1..networks).map(|i| Command::PutNetwork(network(i))));
    out
}

/// Service `i` on network `(i % (networks - 1)) + 1`; every fifth one publishes a port.
pub fn service(i: usize, networks: usize) -> Service {
    let id = format!("svc{i:05}");
    let net = network(i % (networks - 1).max(1) + 1).id;
    let ports = if i.is_multiple_of(5) {
        json!([{"protocol": "tcp", "target": 80, "published": 20000 + i, "mode": "ingress"}])
    } else {
        json!([])
    };
    let env: Vec<(String, String)> =
        (0..8).map(|k| (format!("APP_VAR_{k}"), format!("{ENV_SECRET}-{i}-{k}"))).collect();
    let v = json!({
        "id": id, "name": format!("web-{i}"), "version": 1, "mode": {"replicated": {"replicas": 10}},
        "argv": ["/usr/bin/server", "--listen", ":80", "--workers", "4"], "env": env,
        "workdir": "/srv", "networks": [net], "ports": ports, "dnsrr": false,
        "lb_algorithm": "round-robin", "constraints": [],
        "restart": {"condition": "any", "delay_ms": 5000, "max_attempts": 0},
        "update_order": "stop-first",
        "update": {"parallelism": 1, "delay_ms": 0, "monitor_ms": 5000},
        "update_failure_action": "pause", "health": null,
        "mounts": [{"type": "bind", "source": "/etc/app", "target": "/etc/app", "readonly": true}],
        "stop_grace_ms": 10000, "stop_signal": null, "created_ms": 1, "updated_ms": 1,
    });
    // Written as the JSON the store keeps, so the simulation also pins the record's shape.
    serde_json::from_value(v).expect("simulated service")
}

/// Task `slot` (1-based) of service `i`, on `node`.
pub fn task(i: usize, slot: usize, node: NodeId, networks: usize) -> TaskRecord {
    let id = format!("task{i:05}x{slot:02}");
    let net = network(i % (networks - 1).max(1) + 1).id;
    let host = i * 10 + slot;
    let addr = format!("10.{}.{}.{}", host / 65536, (host / 256) % 256, host % 256);
    let v = json!({
        "id": id, "service_id": format!("svc{i:05}"), "slot": slot, "node_id": node.to_string(),
        "spec_version": 1, "desired": "running", "state": "running", "state_since_ms": 1,
        "created_ms": 1, "attempt": 0, "addresses": {net.clone(): addr}, "networks": [net],
        "message": "", "exit_code": null, "health": null,
    });
    serde_json::from_value(v).expect("simulated task")
}

/// The commands that build a swarm of `nodes` nodes (one manager), `services` services and
/// `tasks` tasks spread round-robin over the nodes, over `networks` networks, with a VIP per
/// service.
pub fn swarm(nodes: usize, services: usize, tasks: usize, networks: usize) -> Vec<Command> {
    let mut out = bootstrap(nodes, networks);
    for i in 0..services {
        out.push(Command::PutService(Box::new(service(i, networks))));
        let net = network(i % (networks - 1).max(1) + 1).id;
        let ip = Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 250);
        out.push(Command::PutAddress {
            key: shoal_model::vip_key(&format!("svc{i:05}"), &net),
            ip,
        });
    }
    let per_service = tasks / services.max(1);
    for n in 0..tasks {
        let (i, slot) = (n / per_service.max(1), n % per_service.max(1) + 1);
        let t = task(i % services.max(1), slot, node_id(n % nodes + 1), networks);
        out.push(Command::PutTask(Box::new(t)));
    }
    out
}

/// Applies `cmds` to an empty store, revisions counting from 1; panics on a refused command.
pub fn build(cmds: &[Command]) -> ClusterState {
    let mut s = ClusterState::default();
    for (i, c) in cmds.iter().enumerate() {
        if let Err(e) = s.apply(c, 1) {
            panic!("simulated command {i} refused: {e}");
        }
    }
    s
}
