use super::*;
use crate::simulated;

pub(crate) fn node(id: u64, name: &str, role: Role) -> NodeRecord {
    NodeRecord {
        id: NodeId(id),
        hostname: name.into(),
        role,
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: "127.0.0.1:2377".parse().expect("addr"),
        data_addr: "127.0.0.1".parse().expect("ip"),
        wg_public_key: None,
        status: NodeStatus::Ready,
        status_message: String::new(),
        engine_version: "0".into(),
        created_ms: 0,
        updated_ms: 0,
    }
}

pub(super) fn init_state() -> ClusterState {
    let mut s = ClusterState::default();
    let info = ClusterInfo {
        id: "c".into(),
        ca_cert_pem: String::new(),
        ca_key_pem: String::new(),
        worker_secret: [1; 16],
        manager_secret: [2; 16],
        retired_secrets: vec![],
        default_addr_pool: vec!["10.0.0.0/8".parse().expect("net")],
        subnet_size: 24,
        data_path_port: 4789,
        created_ms: 0,
        security: Default::default(),
    };
    // The store gives it 10.0.0.0/24 and VNI 4096, the pool's first.
    let ingress = NetworkSpec {
        id: "ing".into(),
        name: "ingress".into(),
        subnet: None,
        ingress: true,
        attachable: false,
        encrypted: false,
        labels: BTreeMap::new(),
    };
    let keyring = Keyring { keys: vec![GossipKey { id: 1, key: [9; 32] }], primary: 1, version: 1 };
    s.apply(&Command::Init { info, node: node(1, "node1", Role::Manager), keyring, ingress }, 0)
        .expect("init");
    s
}

#[test]
fn node_ids_print_and_parse() {
    for v in [1u64, 42, u64::MAX] {
        let id = NodeId(v);
        assert_eq!(id.to_string().len(), 13);
        assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
    }
    assert!("short".parse::<NodeId>().is_err());
}

#[test]
fn subnets_vnis_and_service_names_are_decided_by_the_store() {
    let mut s = init_state();
    let net = |id: &str, name: &str, subnet: &str, vni: u32| NetworkRecord {
        id: id.into(),
        name: name.into(),
        driver: "overlay".into(),
        subnet: subnet.parse().expect("net"),
        gateway: "10.0.1.1".parse().expect("ip"),
        vni,
        ingress: false,
        attachable: true,
        encrypted: false,
        labels: BTreeMap::new(),
    };
    s.apply(&Command::PutNetwork(net("a", "a", "10.0.1.0/24", 4097)), 1).expect("first");
    let before = s.clone();
    // Two creates that read the same store: the second one's picks are refused.
    let same_subnet = s.apply(&Command::PutNetwork(net("b", "b", "10.0.1.0/24", 4098)), 2);
    assert!(same_subnet.unwrap_err().to_string().contains("overlaps"));
    let wider = s.apply(&Command::PutNetwork(net("b", "b", "10.0.0.0/16", 4098)), 2);
    assert!(wider.unwrap_err().to_string().contains("overlaps"));
    let same_vni = s.apply(&Command::PutNetwork(net("b", "b", "10.0.2.0/24", 4097)), 2);
    assert!(same_vni.unwrap_err().to_string().contains("VNI 4097"));
    assert_eq!(s, before);
    // Updating a network in place is no conflict with itself.
    s.apply(&Command::PutNetwork(net("a", "a", "10.0.1.0/24", 4097)), 3).expect("same id");

    let svc = |id: &str, name: &str| {
        let mut svc = simulated::service(1, 4);
        (svc.id, svc.name) = (id.into(), name.into());
        Command::PutService(Box::new(svc))
    };
    s.apply(&svc("s1", "web"), 4).expect("first web");
    s.apply(&svc("s1", "web"), 5).expect("the same service again");
    let before = s.clone();
    let dup = s.apply(&svc("s2", "web"), 6).unwrap_err();
    assert!(matches!(&dup, Refusal::Conflict(m) if m.contains("already exists")), "{dup}");
    assert_eq!(s, before);
    s.apply(&svc("s2", "api"), 7).expect("another name");
    let published = |id: &str, name: &str, port: u16| {
        let mut svc = simulated::service(0, 4);
        (svc.id, svc.name) = (id.into(), name.into());
        svc.ports[0].published = port;
        Command::PutService(Box::new(svc))
    };
    s.apply(&published("s3", "front", 8100), 8).expect("first on 8100");
    let e = s.apply(&published("s4", "other", 8100), 9).unwrap_err();
    assert!(
        matches!(&e, Refusal::Conflict(m) if m.contains("port '8100' is already in use by service 'front'")),
        "{e}"
    );
    s.apply(&published("s3", "front", 8100), 10).expect("its own port again");
}

#[test]
fn refused_commands_change_nothing() {
    let mut s = init_state();
    let before = s.clone();
    assert!(s.apply(&Command::RemoveNode(NodeId(99)), 1).is_err());
    assert!(s.apply(&Command::RetireGossipKey(1), 1).unwrap_err().to_string().contains("primary"));
    assert!(s.apply(&Command::SetPrimaryGossipKey(7), 1).is_err());
    assert!(s.apply(&Command::RemoveService("x".into()), 1).is_err());
    assert!(s.apply(&Command::RemoveTask("x".into()), 1).is_err());
    assert!(s.apply(&Command::RemoveAddress("x".into()), 1).is_err());
    assert_eq!(s, before);
    let mut fresh = ClusterState::default();
    assert!(fresh.apply(&Command::AddNode(node(2, "n", Role::Worker)), 0).is_err());
    assert!(
        s.apply(
            &Command::Init {
                info: before.cluster.clone().expect("info"),
                node: node(3, "x", Role::Manager),
                keyring: Keyring::default(),
                ingress: before.networks["ing"].spec()
            },
            0
        )
        .is_err()
    );
}

pub(super) fn task(key: &str, node: NodeId, service: &str) -> TaskRecord {
    let mut t = simulated::task(1, 1, node, 4);
    (t.task.id, t.task.service_id) = (key.into(), service.into());
    t
}

fn report(state: &str) -> TaskReport {
    serde_json::from_value(serde_json::json!({ "state": state })).expect("report")
}

#[test]
fn nodes_write_only_their_own_tasks() {
    let mut s = init_state();
    let (me, other) = (NodeId(1), NodeId(2));
    let put = |t: TaskRecord| Command::PutTask(Box::new(t));
    s.apply(&put(task("svc-task", me, "svc1")), 1).expect("leader writes a service task");
    s.apply(&put(task("theirs", other, "svc1")), 1).expect("leader writes a service task");
    let before = s.clone();
    let reported = |key: &str, report| Command::ReportTask { owner: me, key: key.into(), report };
    // Refused: another node's task, a missing task, a malformed health or message.
    assert!(s.apply(&reported("theirs", report("running")), 2).is_err());
    assert!(s.apply(&reported("nope", report("running")), 2).is_err());
    let mut bad = report("running");
    bad.health = Some("OK; drop".into());
    assert!(s.apply(&reported("svc-task", bad), 2).unwrap_err().to_string().contains("malformed"));
    let mut long = report("running");
    long.message = Some("x".repeat(5000));
    assert!(s.apply(&reported("svc-task", long), 2).unwrap_err().to_string().contains("longer"));
    // What a report cannot say does not parse: a state that is none, a desired state.
    for v in [
        serde_json::json!({ "state": "RUNNING; drop" }),
        serde_json::json!({ "state": 7 }),
        serde_json::json!({ "state": "running", "state_since_ms": "soon" }),
        serde_json::json!({ "state": "running", "exit_code": "x" }),
        serde_json::json!({ "state": "running", "desired": "shutdown" }),
    ] {
        assert!(serde_json::from_value::<TaskReport>(v.clone()).is_err(), "{v}");
    }
    // Standalone: only with no service, only for oneself, only over one's own standalone.
    let standalone = |owner, key: &str, value: Option<TaskRecord>| Command::PutStandalone {
        owner,
        key: key.into(),
        value: value.map(Box::new),
    };
    assert!(s.apply(&standalone(me, "x", Some(task("x", me, "svc1"))), 2).is_err());
    assert!(s.apply(&standalone(me, "x", Some(task("x", other, ""))), 2).is_err());
    assert!(s.apply(&standalone(me, "x", Some(task("y", me, ""))), 2).is_err());
    assert!(s.apply(&standalone(me, "svc-task", Some(task("svc-task", me, ""))), 2).is_err());
    assert!(s.apply(&standalone(me, "absent", None), 2).is_err());
    let mut huge = task("big", me, "");
    huge.networks = vec!["x".repeat(70_000)];
    assert!(
        s.apply(&standalone(me, "big", Some(huge)), 2).unwrap_err().to_string().contains("larger")
    );
    assert_eq!(s, before, "refused writes changed the store");

    let mut ok = report("failed");
    ok.message = Some("exit status 3".into());
    ok.exit_code = Some(3);
    s.apply(&reported("svc-task", ok), 3).expect("report");
    let t = &s.tasks["svc-task"];
    assert_eq!((t.task.state, t.exit_code), (shoal_scheduler::TaskState::Failed, Some(3)));
    assert_eq!(t.message, "exit status 3");
    // The store gives a standalone task its addresses; one the node names is not taken.
    let mut run1 = task("run1", me, "");
    run1.networks = vec!["ing".into()];
    run1.addresses = [("ing".to_owned(), Ipv4Addr::new(10, 0, 0, 200))].into();
    s.apply(&standalone(me, "run1", Some(run1)), 3).expect("run");
    assert_eq!(s.tasks["run1"].addresses["ing"], Ipv4Addr::new(10, 0, 0, 2));
    assert!(s.apply(&standalone(other, "run1", None), 3).is_err(), "not theirs to remove");
    s.apply(&standalone(me, "run1", None), 3).expect("rm");
    assert!(!s.tasks.contains_key("run1"));
}

#[test]
fn status_change_emits_an_event_once() {
    let mut s = init_state();
    s.apply(&Command::AddNode(node(2, "node2", Role::Worker)), 1).expect("add");
    let ev = s
        .apply(
            &Command::SetStatus {
                id: NodeId(2),
                status: NodeStatus::Down,
                message: "gossip".into(),
            },
            2,
        )
        .expect("down");
    assert_eq!(
        ev,
        vec![ClusterEvent::NodeStatus {
            id: NodeId(2),
            hostname: "node2".into(),
            from: NodeStatus::Ready,
            to: NodeStatus::Down
        }]
    );
    let ev = s
        .apply(
            &Command::SetStatus {
                id: NodeId(2),
                status: NodeStatus::Down,
                message: "gossip".into(),
            },
            3,
        )
        .expect("down");
    assert!(ev.is_empty());
}

#[test]
fn keyring_rotation_steps() {
    let mut s = init_state();
    s.apply(&Command::AddGossipKey(GossipKey { id: 2, key: [3; 32] }), 1).expect("add");
    s.apply(&Command::SetPrimaryGossipKey(2), 1).expect("primary");
    s.apply(&Command::RetireGossipKey(1), 1).expect("retire");
    assert_eq!(s.keyring.primary, 2);
    assert_eq!(s.keyring.keys.len(), 1);
    assert_eq!(s.keyring.version, 4);
}

#[test]
fn find_node_by_name_id_and_prefix() {
    let mut s = init_state();
    s.apply(&Command::AddNode(node(2, "node2", Role::Worker)), 1).expect("add");
    assert_eq!(s.find_node("node2").expect("name").id, NodeId(2));
    assert_eq!(s.find_node(&NodeId(1).to_string()).expect("id").id, NodeId(1));
    assert_eq!(s.find_node("nope").unwrap_err(), "No such node: nope");
    // Both ids start with zeros: a short prefix is ambiguous.
    assert!(s.find_node("0").unwrap_err().to_string().contains("ambiguous"));
}

#[test]
fn records_and_labels() {
    let mut s = init_state();
    s.apply(&Command::PutService(Box::new(simulated::service(3, 4))), 1).expect("put");
    assert_eq!(s.services["svc00003"].name, "web-3");
    s.apply(&Command::PutAddress { key: "vip/a/b".into(), ip: [10, 0, 0, 9].into() }, 1)
        .expect("hold");
    assert_eq!(s.ipam["vip/a/b"].ip, std::net::Ipv4Addr::new(10, 0, 0, 9));
    let mut add = BTreeMap::new();
    add.insert("zone".to_string(), "a".to_string());
    s.apply(
        &Command::UpdateNode {
            id: NodeId(1),
            availability: Some(Availability::Drain),
            label_add: add,
            label_rm: vec![],
        },
        1,
    )
    .expect("upd");
    assert_eq!(s.nodes[&NodeId(1)].labels["zone"], "a");
    assert_eq!(s.nodes[&NodeId(1)].availability, Availability::Drain);
}
