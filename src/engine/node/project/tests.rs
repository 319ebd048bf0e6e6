//! The projection without a kernel: the same inputs give the same plane, and a simulated
//! three-node swarm runs the tutorial (network create, service create with a published port,
//! scale, drain) through the leader's scheduling pass and every node's projection, with the
//! runtime and gossip played by plain maps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use shoal_cluster::model::{Availability, ClusterState, Command, NetworkRecord};
use shoal_cluster::simulated;
use shoal_gossip::{EntryKey, Identity, MemberState, MemberView, NodeMeta, Snapshot};
use shoal_ingress::{self as ing, HealthState};
use shoal_model::{Error, MountSpec, ServiceCreate, ServiceUpdate};
use shoal_runtime as rt;
use shoal_scheduler::{DesiredState, TaskState};

use super::{DesiredDataPlane, Inputs, LocalView, project};
use crate::engine::leader;
use crate::engine::records::{self, EndpointRecord};

/// Resolves network names against the simulated store, as the API does.
struct Ctx<'a>(&'a ClusterState);

impl shoal_model::Context for Ctx<'_> {
    fn network_id(&self, what: &str) -> Result<String, Error> {
        let n = self.0.networks.values().find(|n| n.name == what || n.id == what);
        Ok(n.expect("a network the test made").id.clone())
    }
    fn check_mounts(&self, mounts: &[MountSpec]) -> Result<Vec<MountSpec>, Error> {
        Ok(mounts.to_vec())
    }
    fn check_signal(&self, _: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// One simulated node: its runtime's tasks, what it holds, and its gossip entries.
#[derive(Default)]
struct Node {
    id: String,
    statuses: BTreeMap<String, rt::TaskStatus>,
    local: LocalView,
    published: BTreeMap<EntryKey, EndpointRecord>,
}

struct Swarm {
    state: ClusterState,
    nodes: Vec<Node>,
    /// Nodes (by index) gossip holds suspect.
    suspected: BTreeSet<usize>,
    now_ms: u64,
    /// One instant for every projection: nothing in the tutorial waits on the clock.
    now: Instant,
}

fn status(id: &str, state: rt::TaskState) -> rt::TaskStatus {
    rt::TaskStatus {
        id: id.into(),
        name: id.into(),
        netns: format!("sim-t-{id}"),
        state,
        health: None,
        failing_streak: 0,
        last_probe_output: None,
        pid: None,
        exit_code: None,
        error: None,
        addresses: Vec::new(),
        created_at: SystemTime::UNIX_EPOCH,
        started_at: None,
        finished_at: None,
    }
}

impl Swarm {
    fn new(nodes: usize) -> Swarm {
        let state = simulated::build(&simulated::bootstrap(nodes, 1));
        let nodes = (1..=nodes)
            .map(|i| Node { id: simulated::node_id(i).to_string(), ..Node::default() })
            .collect();
        Swarm { state, nodes, suspected: BTreeSet::new(), now_ms: 1_000, now: Instant::now() }
    }

    fn write(&mut self, cmd: Command) {
        self.state.apply(&cmd, self.now_ms).expect("the store takes the command");
    }

    /// Every node alive in gossip, saying what its store record says, with its endpoints.
    fn gossip(&self) -> Snapshot {
        let mut members = Vec::new();
        let mut entries = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let rec = self.state.nodes.values().find(|r| r.id.to_string() == n.id).unwrap();
            let gossip_id = shoal_gossip::NodeId::from_name(&n.id);
            members.push(MemberView {
                id: Identity {
                    addr: (rec.addr.ip(), 7946).into(),
                    node: gossip_id,
                    generation: 1,
                    bump: 0,
                },
                state: if self.suspected.contains(&i) {
                    MemberState::Suspect
                } else {
                    MemberState::Alive
                },
                incarnation: 0,
                meta: Some(NodeMeta {
                    id: n.id.clone(),
                    underlay: Some(rec.data_addr),
                    wg_public_key: rec.wg_public_key,
                    ..NodeMeta::default()
                }),
                networks: Vec::new(),
            });
            for (k, v) in &n.published {
                entries.push((k.clone(), gossip_id, serde_json::to_vec(v).unwrap().into()));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            identity: None,
            members,
            entries,
            networks: Vec::new(),
            key_ids: Vec::new(),
            metrics: Default::default(),
        }
    }

    /// Node `i`'s projection of the swarm as it is.
    fn project(&self, i: usize) -> DesiredDataPlane {
        let n = &self.nodes[i];
        let gossip = self.gossip();
        let (services, tasks) = (records::services(&self.state), records::tasks(&self.state));
        project(&Inputs {
            me: &n.id,
            tunnels: "100.96.0.0/11".parse().unwrap(),
            state: &self.state,
            services,
            tasks,
            gossip: &gossip,
            statuses: &n.statuses,
            local: &n.local,
            now: self.now,
            now_ms: self.now_ms,
        })
    }

    /// Node `i` applies its projection the way its subsystems would: tasks start (and accept
    /// connections) and stop at once, reports reach the store, endpoints reach gossip.
    fn apply(&mut self, i: usize, d: &DesiredDataPlane) {
        let tasks = records::tasks(&self.state);
        let n = &mut self.nodes[i];
        n.local.sandbox_ip = d.sandbox;
        n.local.kernel_written = d.kernel.as_ref().map(|k| k.ports.clone());
        // The mesh's checks reach every serving backend at once.
        n.local.mesh_health = d
            .mesh
            .iter()
            .map(|(name, (_, backends))| {
                let serving = backends.iter().filter(|b| b.state == ing::TaskState::Healthy);
                (name.clone(), serving.map(|b| (b.id.clone(), HealthState::Up)).collect())
            })
            .collect();
        for id in &d.tasks.start {
            n.statuses.insert(id.clone(), status(id, rt::TaskState::Running));
            n.local.attached.insert(id.clone(), tasks[id].addresses.keys().cloned().collect());
            // Its program listens at once (the readiness probe's part).
            n.local.ready.insert(id.clone());
        }
        for (id, _) in &d.tasks.stop {
            n.statuses.get_mut(id).unwrap().state = rt::TaskState::Shutdown;
        }
        for id in &d.tasks.remove {
            n.statuses.remove(id);
        }
        for id in &d.tasks.detach {
            n.local.attached.remove(id);
        }
        n.published = d.endpoints.clone();
        let owner = self.state.nodes.keys().find(|k| k.to_string() == n.id).copied().unwrap();
        for r in &d.reports {
            let (key, report) = (r.task.clone(), r.report.clone());
            self.write(Command::ReportTask { owner, key, report });
        }
    }

    /// Leader and node passes until nothing changes any more.
    fn settle(&mut self) {
        for _ in 0..20 {
            self.now_ms += 1_000;
            let before = (self.state.clone(), self.gossip().entries);
            let (writes, _) = leader::plan_writes(&self.state, self.now_ms).unwrap();
            for w in writes {
                self.write(w);
            }
            for i in 0..self.nodes.len() {
                let d = self.project(i);
                self.apply(i, &d);
            }
            if (self.state.clone(), self.gossip().entries) == before {
                return;
            }
        }
        panic!("the simulated swarm does not settle");
    }

    fn network(&self, name: &str) -> &NetworkRecord {
        self.state.networks.values().find(|n| n.name == name).unwrap()
    }

    fn service_id(&self, name: &str) -> String {
        let services = records::services(&self.state);
        services.values().find(|s| s.name == name).unwrap().id.clone()
    }

    /// The running tasks of a service, by node index.
    fn running(&self, service: &str) -> BTreeMap<usize, BTreeSet<String>> {
        let svc = self.service_id(service);
        let mut out: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for t in records::tasks(&self.state).values() {
            let running = t.task.state == TaskState::Running;
            if t.task.service_id == svc && running && t.task.desired == DesiredState::Running {
                let node = t.task.node_id.as_deref().unwrap();
                let i = self.nodes.iter().position(|n| n.id == node).unwrap();
                out.entry(i).or_default().insert(t.task.id.clone());
            }
        }
        out
    }

    fn create_service(&mut self, req: ServiceCreate) {
        let svc = req.into_service(&Ctx(&self.state), leader::new_id(), self.now_ms).unwrap();
        self.write(Command::PutService(Box::new(svc)));
    }
}

/// The tasks of `running` across every node, sorted.
fn all(running: &BTreeMap<usize, BTreeSet<String>>) -> Vec<String> {
    running.values().flatten().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Every node's mesh backends of `service`: (task, address, local) as node `i` sees them.
fn backends(d: &DesiredDataPlane, service: &str) -> Vec<(String, bool, bool)> {
    let (_, b) = &d.mesh[service];
    b.iter()
        .map(|b| (b.id.clone(), b.state == shoal_ingress::TaskState::Healthy, b.local))
        .collect()
}

/// A settled swarm of `nodes` nodes running the service "web" (`replicas` tasks) that
/// publishes `publish`.
fn web_swarm(nodes: usize, replicas: u64, publish: &str) -> Swarm {
    let mut swarm = Swarm::new(nodes);
    swarm.create_service(ServiceCreate {
        name: "web".into(),
        argv: vec!["serve".into()],
        replicas: Some(replicas),
        publish: vec![publish.parse().unwrap()],
        ..ServiceCreate::default()
    });
    swarm.settle();
    swarm
}

#[test]
fn the_same_inputs_give_the_same_plane() {
    let mut swarm = Swarm::new(3);
    let req = ServiceCreate {
        name: "web".into(),
        argv: vec!["serve".into()],
        replicas: Some(3),
        publish: vec!["8100:8100".parse().unwrap()],
        ..ServiceCreate::default()
    };
    swarm.create_service(req);
    swarm.settle();
    for i in 0..3 {
        let (a, b) = (swarm.project(i), swarm.project(i));
        assert_eq!(a, b, "node {i}");
        assert!(a.dropped.is_empty(), "{:?}", a.dropped);
    }
    // The order gossip lists entries in is not an input.
    let gossip = swarm.gossip();
    let mut reversed = swarm.gossip();
    reversed.entries.reverse();
    let n = &swarm.nodes[1];
    let (services, tasks) = (records::services(&swarm.state), records::tasks(&swarm.state));
    let inputs = |gossip| Inputs {
        me: &n.id,
        tunnels: "100.96.0.0/11".parse().unwrap(),
        state: &swarm.state,
        services,
        tasks,
        gossip,
        statuses: &n.statuses,
        local: &n.local,
        now: swarm.now,
        now_ms: swarm.now_ms,
    };
    assert_eq!(project(&inputs(&reversed)), project(&inputs(&gossip)));
}

#[test]
fn a_simulated_three_node_swarm_runs_the_tutorial() {
    let mut swarm = Swarm::new(3);
    swarm.settle();
    // Every node has its ingress sandbox address and takes part in every network.
    let ingress = swarm.network("ingress").id.clone();
    let sandboxes: Vec<Ipv4Addr> = (0..3).map(|i| swarm.project(i).sandbox.unwrap()).collect();
    assert_eq!(sandboxes.iter().collect::<BTreeSet<_>>().len(), 3, "{sandboxes:?}");

    // network create -d overlay my-overlay
    let mut net = simulated::network(1);
    net.name = "my-overlay".into();
    swarm.write(Command::PutNetwork(net));
    let overlay = swarm.network("my-overlay").id.clone();

    // service create --replicas 3 --name myhelloworld --network my-overlay -p 8100:8100
    swarm.create_service(ServiceCreate {
        name: "myhelloworld".into(),
        argv: vec!["demo".into(), "visitor".into()],
        replicas: Some(3),
        networks: vec!["my-overlay".into()],
        publish: vec!["8100:8100".parse().unwrap()],
        ..ServiceCreate::default()
    });
    swarm.settle();
    let running = swarm.running("myhelloworld");
    assert_eq!(running.keys().copied().collect::<Vec<_>>(), [0, 1, 2], "one task per node");
    let tasks = all(&running);
    assert_eq!(tasks.len(), 3);
    let svc = swarm.service_id("myhelloworld");
    let vip = records::vip_of(&records::held(&swarm.state), &svc, &overlay).unwrap();
    let addr_of =
        |swarm: &Swarm, id: &str, net: &str| records::tasks(&swarm.state)[id].addresses[net];
    for i in 0..3 {
        let d = swarm.project(i);
        assert_eq!(d.networks, BTreeSet::from([ingress.clone(), overlay.clone()]), "node {i}");
        assert!(d.tasks.start.is_empty() && d.tasks.stop.is_empty(), "node {i}: {:?}", d.tasks);
        // The mesh on every node reaches all three tasks, its own marked local.
        let want: Vec<(String, bool, bool)> =
            tasks.iter().map(|t| (t.clone(), true, running[&i].contains(t))).collect();
        assert_eq!(backends(&d, "myhelloworld"), want, "node {i}");
        // Forwarding knows the other nodes' tasks and sandboxes, and every peer.
        assert_eq!(d.overlay.peers.len(), 3);
        assert_eq!(d.overlay.endpoints.len(), 3 + 3 + 3, "3 tasks on 2 networks, 3 sandboxes");
        // DNS answers the service's VIP on my-overlay, with its three tasks behind it.
        let s = d.dns.services.iter().find(|s| s.name == "myhelloworld").unwrap();
        assert_eq!(s.networks.len(), 1);
        assert_eq!(s.networks[0].vip, Some(vip.into()));
        assert_eq!(s.tasks.len(), 3);
        assert!(s.tasks.iter().all(|t| t.healthy && t.attachments[0].network == overlay));
        // Each local task's VIP rule sends the VIP to the three tasks' my-overlay addresses.
        let behind: Vec<Ipv4Addr> = {
            let mut v: Vec<_> = tasks.iter().map(|t| addr_of(&swarm, t, &overlay)).collect();
            v.sort();
            v
        };
        for t in &running[&i] {
            assert_eq!(d.vips[t], vec![(vip, behind.clone())], "node {i}");
            assert_eq!(
                d.returns[t],
                { sandboxes.clone().into_iter().collect::<BTreeSet<_>>() }
                    .into_iter()
                    .collect::<Vec<_>>()
            );
        }
        let c = d.confirm.as_ref().unwrap();
        assert_eq!(c.serving.iter().cloned().collect::<Vec<_>>(), tasks);
    }

    // service scale myhelloworld=5
    let scale = ServiceUpdate { replicas: Some(5), ..ServiceUpdate::default() };
    let services = records::services(&swarm.state);
    let scaled = scale.apply(&services[&svc], &Ctx(&swarm.state)).unwrap();
    swarm.write(Command::PutService(Box::new(scaled)));
    swarm.settle();
    let tasks = all(&swarm.running("myhelloworld"));
    assert_eq!(tasks.len(), 5);
    for i in 0..3 {
        let d = swarm.project(i);
        let ids: Vec<String> = backends(&d, "myhelloworld").into_iter().map(|b| b.0).collect();
        assert_eq!(ids, tasks, "node {i}");
        let s = d.dns.services.iter().find(|s| s.name == "myhelloworld").unwrap();
        assert_eq!(s.tasks.len(), 5);
    }

    // node update --availability drain node1: its tasks stop, the others take their slots.
    let node1 = simulated::node_id(1);
    swarm.write(Command::UpdateNode {
        id: node1,
        availability: Some(Availability::Drain),
        label_add: BTreeMap::new(),
        label_rm: Vec::new(),
    });
    swarm.now_ms += 1_000;
    let (writes, _) = leader::plan_writes(&swarm.state, swarm.now_ms).unwrap();
    for w in writes {
        swarm.write(w);
    }
    let d = swarm.project(0);
    assert!(!d.tasks.stop.is_empty(), "node1 stops its tasks");
    assert!(d.tasks.stop.iter().all(|(_, grace)| *grace == Duration::from_secs(10)));
    swarm.settle();
    let running = swarm.running("myhelloworld");
    assert!(!running.contains_key(&0), "node1 drained: {running:?}");
    let tasks = all(&running);
    assert_eq!(tasks.len(), 5);
    for i in 0..3 {
        let d = swarm.project(i);
        let ids: Vec<String> = backends(&d, "myhelloworld").into_iter().map(|b| b.0).collect();
        assert_eq!(ids, tasks, "node {i}: the mesh follows the drain");
        if i == 0 {
            assert!(d.endpoints.values().all(|e| e.task.is_empty()), "node1 publishes no task");
        }
        assert!(d.vips.keys().all(|t| running.get(&i).is_some_and(|r| r.contains(t))));
    }
    // Node1 still serves the published port through its mesh, to the other nodes' tasks.
    let d = swarm.project(0);
    assert!(backends(&d, "myhelloworld").iter().all(|(_, healthy, local)| *healthy && !local));
}

#[test]
fn a_stopping_task_keeps_its_forwarding_but_leaves_the_mesh() {
    let mut swarm = web_swarm(2, 2, "8100:8100");
    // Node 1 withdraws its task: its endpoint stays in gossip, not serving.
    let mine = swarm.running("web")[&0].iter().next().unwrap().clone();
    for e in swarm.nodes[0].published.values_mut().filter(|e| e.task == mine) {
        e.serving = false;
    }
    let d = swarm.project(1);
    let b = backends(&d, "web");
    assert!(b.iter().any(|(id, healthy, _)| *id == mine && !healthy), "{b:?}");
    assert!(d.overlay.endpoints.iter().any(|e| e.node == swarm.nodes[0].id));
    assert!(!d.confirm.unwrap().serving.contains(&mine));
}

#[test]
fn a_task_record_the_store_does_not_know_is_removed() {
    let mut swarm = Swarm::new(1);
    swarm.settle();
    swarm.nodes[0].statuses.insert("stray".into(), status("stray", rt::TaskState::Running));
    let d = swarm.project(0);
    assert_eq!(d.tasks.remove, ["stray"]);
}

#[test]
fn an_adopted_task_s_vips_wait_for_gossip_to_catch_up_or_the_deadline() {
    let mut swarm = Swarm::new(2);
    let mut net = simulated::network(1);
    net.name = "backend".into();
    swarm.write(Command::PutNetwork(net));
    swarm.create_service(ServiceCreate {
        name: "api".into(),
        argv: vec!["serve".into()],
        replicas: Some(2),
        networks: vec!["backend".into()],
        ..ServiceCreate::default()
    });
    swarm.settle();
    let mine = swarm.running("api")[&0].iter().next().unwrap().clone();
    // Node 1's agent restarted: it adopted its task, and gossip has not brought node 2's yet.
    swarm.nodes[0].local.held_vips = BTreeSet::from([mine.clone()]);
    swarm.nodes[0].local.held_until = Some(swarm.now + Duration::from_secs(10));
    let others = std::mem::take(&mut swarm.nodes[1].published);
    let d = swarm.project(0);
    assert!(d.hold_vips && !d.vips.contains_key(&mine), "{:?}", d.vips);

    // Once the deadline passed, the rules are rewritten from what gossip holds by then.
    swarm.now += Duration::from_secs(11);
    let d = swarm.project(0);
    assert!(!d.hold_vips && d.vips[&mine][0].1.len() == 1, "{:?}", d.vips);

    // Before it, gossip catching up ends the wait as well, with both backends.
    swarm.now -= Duration::from_secs(11);
    swarm.nodes[1].published = others;
    let d = swarm.project(0);
    assert!(!d.hold_vips && d.vips[&mine][0].1.len() == 2, "{:?}", d.vips);
}

#[test]
fn an_adopted_task_s_reply_steering_waits_for_gossip_too() {
    let mut swarm = web_swarm(2, 2, "8100:8100");
    let mine = swarm.running("web")[&0].iter().next().unwrap().clone();
    assert_eq!(swarm.project(0).returns[&mine].len(), 2, "both nodes' sandboxes");
    // Node 1's agent restarted: gossip has not brought node 2's sandbox yet. Steering written
    // now would lose the replies of connections that came through node 2.
    swarm.nodes[0].local.held_vips = BTreeSet::from([mine.clone()]);
    swarm.nodes[0].local.held_until = Some(swarm.now + Duration::from_secs(10));
    let others = std::mem::take(&mut swarm.nodes[1].published);
    let d = swarm.project(0);
    assert!(d.hold_vips && !d.returns.contains_key(&mine), "{:?}", d.returns);

    swarm.nodes[1].published = others;
    let d = swarm.project(0);
    assert!(!d.hold_vips && d.returns[&mine].len() == 2, "{:?}", d.returns);
}

#[test]
fn the_kernel_path_leaves_out_a_suspected_node_s_tasks_unless_they_are_all_there_are() {
    let mut swarm = web_swarm(3, 3, "published=8100,target=80,mesh=kernel");
    let running = swarm.running("web");
    let ingress = swarm.network("ingress").id.clone();
    let addr = |swarm: &Swarm, node: usize| -> Vec<Ipv4Addr> {
        let tasks = records::tasks(&swarm.state);
        running[&node].iter().map(|t| tasks[t].addresses[&ingress]).collect()
    };
    let kernel_backends = |d: &DesiredDataPlane| -> BTreeSet<Ipv4Addr> {
        let ports = &d.kernel.as_ref().expect("the kernel path").ports;
        assert_eq!(ports.len(), 1, "{ports:?}");
        ports[0].backends.iter().copied().collect()
    };
    let everyone: BTreeSet<Ipv4Addr> = (0..3).flat_map(|n| addr(&swarm, n)).collect();
    assert_eq!(everyone.len(), 3);
    assert_eq!(kernel_backends(&swarm.project(0)), everyone);

    // Node 3 is suspected: node 1's kernel path sends no new flow to its task, the proxy
    // (which retries elsewhere when a connect times out) keeps it.
    swarm.suspected.insert(2);
    let d = swarm.project(0);
    let without: BTreeSet<Ipv4Addr> = (0..2).flat_map(|n| addr(&swarm, n)).collect();
    assert_eq!(kernel_backends(&d), without);
    assert_eq!(backends(&d, "web").len(), 3, "the proxy keeps every backend");
    assert!(backends(&d, "web").iter().all(|(_, healthy, _)| *healthy));

    // Every node with a task suspected: a port without backends would refuse every flow, so
    // the suspects' tasks stay.
    swarm.suspected.extend([0, 1]);
    assert_eq!(kernel_backends(&swarm.project(0)), everyone);

    // Refuted: the task is back.
    swarm.suspected.clear();
    assert_eq!(kernel_backends(&swarm.project(1)), everyone);
}

#[test]
fn a_task_enters_the_kernel_map_once_this_node_s_checks_see_it_up() {
    let mut swarm = web_swarm(3, 3, "published=8100,target=80,mesh=kernel");
    // Node 1 writes its maps once more with what its checks saw in the last pass.
    let d = swarm.project(0);
    swarm.apply(0, &d);
    let tasks = records::tasks(&swarm.state);
    let ingress = swarm.network("ingress").id.clone();
    let on_node3 = swarm.running("web").remove(&2).expect("a task on node 3");
    let task = on_node3.into_iter().next().unwrap();
    let addr = tasks[&task].addresses[&ingress];
    let in_map = |swarm: &Swarm| -> bool {
        let d = swarm.project(0);
        d.kernel.as_ref().expect("the kernel path").ports[0].backends.contains(&addr)
    };
    assert!(in_map(&swarm), "every checked task is in node 1's map");

    // Node 1's checks have not reached the task yet (node 3 just started it): it waits, while
    // its node already gossips it as serving.
    let set_health = |swarm: &mut Swarm, h: Option<HealthState>| {
        let web = swarm.nodes[0].local.mesh_health.get_mut("web").unwrap();
        match h {
            Some(h) => web.insert(task.clone(), h),
            None => web.remove(&task),
        };
    };
    let written = swarm.nodes[0].local.kernel_written.clone().unwrap();
    let mut without = written.clone();
    for p in &mut without {
        p.backends.retain(|b| *b != addr);
    }
    swarm.nodes[0].local.kernel_written = Some(without);
    set_health(&mut swarm, None);
    assert!(!in_map(&swarm), "a new task the mesh has not taken yet is not in the map");
    set_health(&mut swarm, Some(HealthState::Unchecked));
    assert!(!in_map(&swarm), "a new task whose first check has not run is not in the map");
    set_health(&mut swarm, Some(HealthState::Down));
    assert!(!in_map(&swarm), "a new task whose first check failed is not in the map");
    set_health(&mut swarm, Some(HealthState::Up));
    assert!(in_map(&swarm), "the check passed");

    // An agent that just started takes the map as its last run left it: gossip's serving tasks,
    // until its checks catch up; one already written stays until a check fails.
    set_health(&mut swarm, Some(HealthState::Unchecked));
    swarm.nodes[0].local.kernel_written = None;
    assert!(in_map(&swarm), "after a restart, gossip's word");
    swarm.nodes[0].local.kernel_written = Some(written);
    assert!(in_map(&swarm), "already in the map, not checked yet");
    set_health(&mut swarm, Some(HealthState::Down));
    assert!(!in_map(&swarm), "a failed check takes it out");
}
